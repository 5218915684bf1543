"""Compile speed, side by side in one run: graphprune vs Torch-Pruning on torchvision models.

graphprune: ``compress(model, "magnitude", flops_target=0.5)``, the whole call (copy + trace,
analysis, MACs counting, global L2 planning, pruning, re-measuring the pruned model); trace and
analyze are also timed alone. Torch-Pruning (1.6): ``MetaPruner`` with
``GroupMagnitudeImportance(p=2)`` and ``global_pruning=True`` (it builds its DependencyGraph
with a real forward pass), then ``step()``, the classifier ignored. Torch-Pruning takes a
channel ratio, not a MACs target: it gets ``1 - sqrt(0.5)`` (what halves the MACs of uniformly
pruned layers), and the MACs each side actually keeps are in the table. Both timings include
copying the model (compress copies it; Torch-Pruning prunes in place, so its copy is timed).

Both are timed interleaved (graphprune, then Torch-Pruning, per repeat) after one warm-up run
each, and the median is reported. Needs torchvision and torch-pruning (the zoo venv)::

    PYTHONPATH=/tmp/gp python benchmarks/compile_speed.py [--repeats 5] [--models resnet50 ...]
        [--label after] [--json benchmarks/results/compile_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import graphprune as gp

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

MODELS = (
    "resnet50",
    "resnet101",
    "resnet152",
    "mobilenet_v2",
    "densenet121",
    "efficientnet_b0",
    "regnet_y_400mf",
    "convnext_tiny",
)
TP_RATIO = 1 - math.sqrt(0.5)


def build(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_graphprune(model: nn.Module, x: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    result, seconds = timed(lambda: gp.compress(model, "magnitude", example_inputs=x))
    return seconds, result.report.macs_ratio


def tp_prune(model: nn.Module, x: tuple[torch.Tensor, ...]) -> nn.Module:
    """Torch-Pruning's side: copy (it prunes in place), dependency graph, global group-L2."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    classifier = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]
    tp.pruner.MetaPruner(
        pruned,
        x[0],
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=True,
        pruning_ratio=TP_RATIO,
        ignored_layers=[classifier],
    ).step()
    return pruned


def run_torch_pruning(model: nn.Module, x: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    _, seconds = timed(lambda: tp_prune(model, x))
    return seconds, float("nan")


def macs_ratio_torch_pruning(model: nn.Module, x) -> float:
    """Measured once, outside the timing, with the same counter graphprune uses."""
    return gp.count_macs(tp_prune(model, x), x).macs / gp.count_macs(model, x).macs


def attempt(fn, *args):
    try:
        return fn(*args), None
    except Exception as exc:  # a failure on one model is a row, not the end of the run
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def measure(name: str, repeats: int, peer: bool) -> dict:
    model = build(name)
    x = (torch.randn(1, 3, 224, 224),)
    row: dict[str, object] = {
        "model": name,
        "convs": sum(isinstance(m, nn.Conv2d) for m in model.modules()),
    }
    gm, error = attempt(gp.trace, model, x)
    if gm is not None:
        row["groups"] = len(gp.analyze(gm))
    sides = [("graphprune", run_graphprune)]
    if peer:
        sides.append(("torch_pruning", run_torch_pruning))
    times: dict[str, list[float]] = {s: [] for s, _ in sides}
    errors: dict[str, str] = {}
    for i in range(repeats + 1):  # the first round is the warm-up
        for side, fn in sides:
            if side in errors:
                continue
            out, error = attempt(fn, model, x)
            if error:
                errors[side] = error
                continue
            if i:
                times[side].append(out[0])
            if side == "graphprune":
                row["graphprune_macs_kept"] = round(out[1], 4)
    if gm is not None:
        row["trace_s"] = statistics.median(timed(lambda: gp.trace(model, x))[1] for _ in range(3))
        row["analyze_s"] = statistics.median(timed(lambda: gp.analyze(gm))[1] for _ in range(3))
    for side, ts in times.items():
        if ts:
            row[f"{side}_s"] = statistics.median(ts)
            row[f"{side}_all_s"] = [round(t, 3) for t in ts]
    if peer and "torch_pruning" not in errors:
        ratio, error = attempt(macs_ratio_torch_pruning, model, x)
        row["torch_pruning_macs_kept"] = round(ratio, 4) if ratio is not None else None
    if errors:
        row["errors"] = errors
    return row


def fmt(v: object, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    lines = [
        "| model | convs | groups | trace (s) | analyze (s) | graphprune compress (s) | "
        "Torch-Pruning (s) | graphprune / TP | MACs kept gp / TP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gp_s, tp_s = r.get("graphprune_s"), r.get("torch_pruning_s")
        ratio = gp_s / tp_s if gp_s and tp_s else None
        kept = f"{fmt(r.get('graphprune_macs_kept'), '.3f')} / "
        kept += fmt(r.get("torch_pruning_macs_kept"), ".3f")
        lines.append(
            f"| {r['model']} | {r['convs']} | {fmt(r.get('groups'))} | "
            f"{fmt(r.get('trace_s'))} | {fmt(r.get('analyze_s'))} | {fmt(gp_s)} | "
            f"{fmt(tp_s)} | {fmt(ratio) + 'x' if ratio else '—'} | {kept} |"
        )
    for r in rows:
        for side, error in r.get("errors", {}).items():
            lines.append(f"\n{r['model']}, {side} failed: {error}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--no-peer", action="store_true", help="graphprune only")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--label", default="after", help="names this run in the JSON (before/after)")
    p.add_argument("--json", default="benchmarks/results/compile_speed.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows.append(measure(name, args.repeats, not args.no_peer))
        print(json.dumps(rows[-1]), flush=True)
    info = {**machine(), "label": args.label, "repeats": args.repeats, "rows": rows}
    path = Path(args.json)
    runs = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(runs, dict) or "runs" not in runs:
        runs = {"runs": {}}
    runs["runs"][args.label] = info
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=2) + "\n")
    print(f"\n{info['date']}, {info['cpu']}, {info['threads']} threads, torch {info['torch']}")
    print(f"`{info['command']}`\n")
    print(table(rows))


if __name__ == "__main__":
    main()
