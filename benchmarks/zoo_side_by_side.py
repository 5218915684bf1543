"""graphprune and Torch-Pruning side by side on the real zoos, in one run (issue 8).

For every model of graphprune.testing.real_zoos (randomly initialised, default input size):

- graphprune: ``compress(model, "magnitude", example_inputs=(x,), flops_target=0.5)``
  (round_to=8), timed as one call (it traces, analyzes, plans and prunes);
- Torch-Pruning: its own ``MagnitudePruner`` with ``GroupMagnitudeImportance(p=2)``, global
  pruning, 20 iterative steps up to a 0.9 channel ratio, stopping at the first step whose
  MACs are at most the target; the final classifier (and a detection head, FPN outputs)
  ignored. Timed from building its dependency graph to the last step.

Both are counted by graphprune.count_macs (FlopCounterMode, conv + linear MACs) against the
same dense model. "Reached" means: no exception, at most target + 0.01 of the dense MACs, and
every output shape kept.

    python benchmarks/zoo_side_by_side.py [--source timm] [--only resnet18 ...]
        [--json benchmarks/results/zoo_side_by_side.json] [--md BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import signal
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import graphprune as gp
from graphprune.planning.target import TOLERANCE
from graphprune.testing.coverage import _flatten, _short
from graphprune.testing.real_zoos import ZooSpec, zoo_specs

TARGET = 0.5
LIMIT_S = 420


def ignored_layers(spec: ZooSpec, model: nn.Module) -> list[nn.Module]:
    """What Torch-Pruning must leave alone: the layers that make the model's outputs."""
    if spec.source == "timm":
        head = model.get_classifier()
        return [head] if isinstance(head, nn.Module) else []
    if spec.source == "ultralytics":
        return [model.model[-1]]  # the Detect head
    if spec.name == "resnet18_fpn":
        return list(model.fpn.layer_blocks) + list(model.fpn.inner_blocks)
    if spec.source == "segmentation" and hasattr(model, "classifier"):
        heads = [model.classifier, getattr(model, "aux_classifier", None)]
        return [m for h in heads if h is not None for m in h.modules() if _is_layer(m)][-2:]
    layers = [m for m in model.modules() if _is_layer(m)]
    return layers[-1:]


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))


def run_gp(model: nn.Module, x: tuple, dense: int, shapes: list) -> dict:
    t = time.perf_counter()
    try:
        result = gp.compress(model, "magnitude", example_inputs=x, flops_target=TARGET)
    except Exception as exc:
        return {"reached": False, "seconds": time.perf_counter() - t, "why": _short(exc, 300)}
    seconds = time.perf_counter() - t
    return _verdict(result.model, x, dense, shapes, seconds)


def run_tp(spec: ZooSpec, model: nn.Module, x: tuple, dense: int, shapes: list) -> dict:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    t = time.perf_counter()
    try:
        pruner = tp.pruner.MagnitudePruner(
            model,
            x[0],
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            global_pruning=True,
            pruning_ratio=0.9,
            iterative_steps=20,
            ignored_layers=ignored_layers(spec, model),
        )
        for _ in range(20):
            pruner.step()
            if gp.count_macs(model, x).macs <= TARGET * dense:
                break
    except Exception as exc:
        return {"reached": False, "seconds": time.perf_counter() - t, "why": _short(exc, 300)}
    return _verdict(model, x, dense, shapes, time.perf_counter() - t)


def _verdict(model: nn.Module, x: tuple, dense: int, shapes: list, seconds: float) -> dict:
    try:
        ratio = gp.count_macs(model, x).macs / dense
        with torch.no_grad():
            kept = [t.shape for t in _flatten(model.eval()(*x))] == shapes
    except Exception as exc:
        return {"reached": False, "seconds": seconds, "why": "running it: " + _short(exc, 300)}
    ok = ratio <= TARGET + TOLERANCE and kept
    why = "" if ok else ("output shape changed" if not kept else f"{ratio:.3f} of the MACs")
    return {"reached": ok, "ratio": ratio, "seconds": seconds, "why": why}


def _alarm(signum, frame):
    raise TimeoutError(f"over {LIMIT_S} s")


def compare(spec: ZooSpec) -> dict:
    torch.manual_seed(0)
    row: dict = {"source": spec.source, "name": spec.name}
    try:
        model = spec.build().eval()
        x = (torch.randn(spec.input_shape),)
        with torch.no_grad():
            shapes = [t.shape for t in _flatten(model(*x))]
        dense = gp.count_macs(model, x).macs
    except Exception as exc:
        return {**row, "error": _short(exc)}
    for key, fn in (
        ("graphprune", lambda: run_gp(model, x, dense, shapes)),
        ("torch_pruning", lambda: run_tp(spec, model, x, dense, shapes)),
    ):
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(LIMIT_S)
        try:
            row[key] = fn()
        except TimeoutError as exc:
            row[key] = {"reached": False, "seconds": LIMIT_S, "why": str(exc)}
        finally:
            signal.alarm(0)
            gc.collect()
    return row


def summary(rows: list[dict]) -> str:
    lines = [
        "| source | models | graphprune reached | Torch-Pruning reached "
        "| graphprune median s/model | Torch-Pruning median s/model |",
        "|---|---|---|---|---|---|",
    ]
    for source in dict.fromkeys(r["source"] for r in rows):
        same = [r for r in rows if r["source"] == source and "error" not in r]
        cells = []
        for key in ("graphprune", "torch_pruning"):
            cells.append(sum(r[key]["reached"] for r in same))
        times = [
            statistics.median(r[k]["seconds"] for r in same)
            for k in ("graphprune", "torch_pruning")
        ]
        lines.append(f"| {source} | {len(same)} | {cells[0]} | {cells[1]} ")
        lines[-1] += f"| {times[0]:.1f} | {times[1]:.1f} |"
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--source", nargs="*", default=["torchvision", "timm", "ultralytics", "segmentation"]
    )
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--json", default="benchmarks/results/zoo_side_by_side.json")
    args = p.parse_args()
    rows = []
    for spec in zoo_specs(tuple(args.source)):
        if args.only and spec.name not in args.only:
            continue
        rows.append(compare(spec))
        print(json.dumps(rows[-1]), flush=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(summary(rows))


if __name__ == "__main__":
    main()
