"""``graphprune bench``: MACs, params and latency of several models side by side.

Modules (built-in names, ``package.module:factory``, ``.pt`` files from ``compress --out``) are
exported to a temporary ONNX file, so dense and pruned models are timed alike: ONNX Runtime on
CPU at a fixed thread count. ``.onnx`` files are timed as given, ``.engine`` files by TensorRT.
Each batch size is timed across all models in turn, so machine drift hits them alike.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from graphprune.backends.timing import LatencyStats, available_cpus
from graphprune.errors import BackendUnavailableError


def bench(
    specs: Sequence[str],
    *,
    batch_sizes: Iterable[int] = (1, 16),
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """One dict per spec: name, kind, backend, threads (None on TensorRT), macs, params,
    ``latency[b] = {"median_ms", "p90_ms"}``, and versus the first row ``speedup[b]`` (its median
    / this row's) and ``macs_ratio`` (its MACs / this row's). None where it does not apply:
    ratios of the first row, MACs and params of ``.onnx`` and ``.engine`` files.
    """
    if not specs:
        raise ValueError("bench needs at least one model")
    batch_sizes = list(batch_sizes)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
    threads = threads or available_cpus()
    for spec in specs:  # fail before minutes of exporting, not after
        _check(spec)
    with tempfile.TemporaryDirectory(prefix="graphprune-bench-") as tmp:
        rows = [
            _prepare(spec, Path(tmp) / f"model{i}.onnx", threads) for i, spec in enumerate(specs)
        ]
        for b in batch_sizes:
            for row in rows:
                stats = _time(row, b, runs=runs, warmup=warmup)
                row["latency"][b] = {"median_ms": stats.median_ms, "p90_ms": stats.p90_ms}
                row["device"] = stats.device
    first = rows[0]
    for row in rows:
        del row["_artifact"]  # a temporary file, gone with the folder
        row["speedup"] = row["macs_ratio"] = None
        if row is not first:
            row["speedup"] = {
                b: first["latency"][b]["median_ms"] / row["latency"][b]["median_ms"]
                for b in batch_sizes
            }
            if first["macs"] and row["macs"]:
                row["macs_ratio"] = first["macs"] / row["macs"]
    return rows


def _check(spec: str) -> None:
    suffix = Path(spec).suffix
    if suffix in (".onnx", ".engine", ".pt", ".pth") and not Path(spec).is_file():
        raise FileNotFoundError(f"no such file: {spec}")
    from graphprune.backends import tensorrt

    if suffix == ".engine" and not tensorrt.available():
        raise BackendUnavailableError(
            f"timing {spec} needs TensorRT and a CUDA GPU: pip install 'graphprune[tensorrt]'"
        )


def _prepare(spec: str, onnx_path: Path, threads: int) -> dict[str, Any]:
    """Resolve ``spec`` to something timeable; modules are counted and exported here."""
    suffix = Path(spec).suffix
    row: dict[str, Any] = {
        "name": spec,
        "kind": suffix[1:] if suffix in (".onnx", ".engine") else "torch",
        "backend": "onnxruntime",
        "threads": threads,
        "macs": None,  # counted on the torch module only; an ONNX graph has no counter here
        "params": None,
        "latency": {},
        "_artifact": spec,
    }
    if suffix == ".engine":
        return {**row, "backend": "tensorrt", "threads": None}
    if suffix == ".onnx":
        return row

    from graphprune.apps.models import get_model
    from graphprune.backends.onnx import export_onnx
    from graphprune.io import load_model
    from graphprune.planning.macs import count_macs

    model, inputs = load_model(spec) if suffix in (".pt", ".pth") else get_model(spec)
    macs = count_macs(model, inputs)
    export_onnx(model, inputs, onnx_path)
    return {**row, "macs": macs.macs, "params": macs.params, "_artifact": str(onnx_path)}


def _time(row: dict[str, Any], batch: int, *, runs: int, warmup: int) -> LatencyStats:
    from graphprune.backends import ort, tensorrt

    path, opts = row["_artifact"], {"warmup": warmup, "runs": runs}
    if row["backend"] == "tensorrt":
        return tensorrt.latency(path, [batch], **opts)[batch]
    return ort.latency(path, [batch], threads=row["threads"], **opts)[batch]


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
