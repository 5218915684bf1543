"""``graphprune bench``: MACs, params and latency of several models side by side.

Modules (built-in names, ``package.module:factory``, model files from ``compress --out``) are
exported with one backend (``--backend``, default onnx: ONNX Runtime on CPU at a fixed thread
count), so dense and pruned models are timed alike. Other files are artifacts, timed as given
by the backend their suffix belongs to (``.onnx``, ``.engine``, ...). All models take turns in
the same rounds (:func:`graphprune.backends.timing.measure`), so machine drift hits them alike.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Files from ``compress --out``: models, re-exported with the chosen backend like built-in names.
MODEL_FILES = (".pt", ".pth")


def bench(
    specs: Sequence[str],
    *,
    batch_sizes: Iterable[int] = (1, 16),
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    backend: str | None = None,
) -> list[dict[str, Any]]:
    """One dict per spec: name, kind ("model", or the backend of a given artifact), backend
    (the runtime that timed it), threads (None where it does not apply), device, macs, params,
    ``latency[b] = {"median_ms", "p90_ms"}``, and versus the first row ``speedup[b]`` (its median
    / this row's, from the same rounds) and ``macs_ratio`` (its MACs / this row's). None where
    it does not apply: ratios of the first row, MACs and params of artifact files.
    """
    from graphprune.backends import DEFAULT_BACKEND, backend_for_path, get_backend
    from graphprune.backends.timing import measure

    if not specs:
        raise ValueError("bench needs at least one model")
    batch_sizes = list(batch_sizes)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
    exporter = get_backend(backend or DEFAULT_BACKEND)
    owners = []
    for spec in specs:  # fail before minutes of exporting, not after
        owner = exporter if _is_model(spec) else backend_for_path(spec)
        if Path(spec).suffix in (*MODEL_FILES, owner.suffix) and not Path(spec).is_file():
            raise FileNotFoundError(f"no such file: {spec}")
        owner.require()
        owners.append(owner)
    options = {} if threads is None else {"threads": threads}
    with tempfile.TemporaryDirectory(prefix="graphprune-bench-") as tmp:
        rows, runners = [], []
        for i, (spec, owner) in enumerate(zip(specs, owners, strict=True)):
            path = Path(tmp) / f"model{i}{owner.suffix}"
            row, artifact = _prepare(spec, owner, path, batch_sizes)
            runner = owner.runner(artifact, **options)
            rows.append({**row, "backend": runner.backend, "threads": runner.threads})
            runners.append(runner)
        timing = measure(runners, batch_sizes, warmup=warmup, rounds=runs)
    for i, row in enumerate(rows):
        row["device"] = timing.stats[batch_sizes[0]][i].device
        row["latency"] = {
            b: {"median_ms": s[i].median_ms, "p90_ms": s[i].p90_ms} for b, s in timing.stats.items()
        }
        row["speedup"] = row["macs_ratio"] = None
        if i:
            row["speedup"] = {b: timing.speedup(b, i) for b in batch_sizes}
            if rows[0]["macs"] and row["macs"]:
                row["macs_ratio"] = rows[0]["macs"] / row["macs"]
    return rows


def _is_model(spec: str) -> bool:
    """Built-in names have no suffix, factories a ``module:callable`` colon, model files one
    of MODEL_FILES; anything else is an artifact file."""
    suffix = Path(spec).suffix
    return ":" in spec or not suffix or suffix in MODEL_FILES


def _prepare(
    spec: str, owner: Any, path: Path, batch_sizes: list[int]
) -> tuple[dict[str, Any], str | Path]:
    """The row's static fields and the artifact to time; modules are counted and exported."""
    row: dict[str, Any] = {"name": spec, "kind": "model", "macs": None, "params": None}
    if not _is_model(spec):
        # An artifact file: an ONNX graph or engine has no MACs counter here.
        return {**row, "kind": owner.name}, spec

    from graphprune.apps.models import get_model
    from graphprune.io import load_model
    from graphprune.planning.macs import count_macs

    model, inputs = load_model(spec) if Path(spec).suffix in MODEL_FILES else get_model(spec)
    macs = count_macs(model, inputs)
    artifact = owner.export(model, inputs, path, batch_sizes=batch_sizes)
    return {**row, "macs": macs.macs, "params": macs.params}, artifact


def format_bench(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of bench() rows: median / p90 ms and speedup per batch size."""
    batch_sizes = list(rows[0]["latency"])
    backends = sorted(
        {r["backend"] + (f" ({r['threads']} threads)" if r["threads"] else "") for r in rows}
    )
    lines = [
        f"latency: {', '.join(backends)} on {rows[0].get('device', '?')}; "
        "MACs = multiply-accumulates of conv+linear layers per example input",
        "speedup = first row's median latency / this row's; MACs x = first row's MACs / this row's",
    ]
    if len(backends) > 1:
        lines.append("note: rows use different backends, so speedups compare runtimes too")
    width = max(len("model"), *(len(r["name"]) for r in rows))
    head = f"{'model':<{width}} {'MACs (M)':>9} {'params (M)':>10} {'MACs x':>7}"
    for b in batch_sizes:
        head += f" | {f'b={b} median':>11} {'p90 ms':>8} {'speedup':>7}"
    lines += [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r['name']:<{width}} {_num(r['macs'], 1e6, 3):>9} {_num(r['params'], 1e6, 4):>10}"
            f" {_ratio(r['macs_ratio']):>7}"
        )
        for b, lat in r["latency"].items():
            speedup = _ratio((r["speedup"] or {}).get(b))
            line += f" | {lat['median_ms']:>11.3f} {lat['p90_ms']:>8.3f} {speedup:>7}"
        lines.append(line)
    return "\n".join(lines)


def _num(value: float | None, scale: float, digits: int) -> str:
    return "n/a" if value is None else f"{value / scale:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
