"""Which channel widths pay in ONNX Runtime on this CPU, and what that means for pruned plans.

1. Six 3x3 convs (stride 1, ReLU) at 16x16 of one width each, ORT CPU at batch 32, all widths
   timed interleaved (graphprune's ``measure``): the median ms per width. ORT's blocked
   convolutions (NCHWc) work in blocks of 8 (AVX2) or 16 (AVX-512) channels, so time jumps
   where a width crosses a block.
2. One-shot magnitude plans of the demo's ResNet-56 (1x16x16) and of ResNet-20 (1x28x28) at
   ``--target`` of the MACs with ``round_to=8`` (the default) and ``round_to=1`` (exact widths),
   each timed with its dense model at batch 1 and 32: dense / pruned speed.

    python benchmarks/ort_widths.py            # writes benchmarks/results/ort_widths.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import machine, save
from torch import nn

import graphprune as gp
from graphprune.apps.models import cifar_resnet, resnet56
from graphprune.backends import export, runner
from graphprune.backends.timing import measure

WIDTHS = (4, 8, 12, 14, 16, 17, 20, 24, 28, 29, 32, 40, 48, 56, 64)
MODELS = {
    "resnet56 (demo, 1x16x16)": (lambda: resnet56(num_classes=10, in_channels=1), (1, 1, 16, 16)),
    "resnet20 (1x28x28)": (lambda: cifar_resnet(20, num_classes=10, in_channels=1), (1, 1, 28, 28)),
}


def conv_stack_ms(tmp: Path, rounds: int) -> dict[int, float]:
    paths = []
    for w in WIDTHS:
        stack = [nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU()) for _ in range(6)]
        path = tmp / f"width{w}.onnx"
        export(nn.Sequential(*stack).eval(), (torch.randn(1, w, 16, 16),), path)
        paths.append(path)
    timing = measure([runner(p) for p in paths], (32,), warmup=5, rounds=rounds)
    return {w: s.median_ms for w, s in zip(WIDTHS, timing.stats[32], strict=True)}


def plan_speedups(tmp: Path, target: float, rounds: int) -> dict[str, dict]:
    out = {}
    for name, (build, shape) in MODELS.items():
        torch.manual_seed(0)
        base = build().eval()
        example = (torch.randn(shape),)
        paths = [tmp / "dense.onnx"]
        export(base, example, paths[0])
        rows = {}
        for round_to in (8, 1):
            result = gp.compress(
                base, "magnitude", example_inputs=example, flops_target=target, round_to=round_to
            )
            convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
            rows[f"round_to={round_to}"] = {
                "macs_kept": result.report.macs_ratio,
                "widths": sorted({m.out_channels for m in convs}),
            }
            paths.append(tmp / f"round{round_to}.onnx")
            export(result.model.eval(), example, paths[-1])
        timing = measure([runner(p) for p in paths], (1, 32), warmup=10, rounds=rounds)
        for b, stats in timing.stats.items():
            for row, s in zip(rows.values(), stats[1:], strict=True):
                row[f"speedup_b{b}"] = stats[0].median_ms / s.median_ms
        out[name] = rows
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        widths = conv_stack_ms(Path(d), args.rounds)
        print(" | ".join(f"{w}: {ms:.2f} ms" for w, ms in widths.items()), flush=True)
        plans = plan_speedups(Path(d), args.target, args.rounds)
    for name, rows in plans.items():
        for label, row in rows.items():
            print(
                f"{name} {label}: {row['macs_kept']:.3f} of the MACs, widths {row['widths']}, "
                f"{row['speedup_b1']:.2f}x / {row['speedup_b32']:.2f}x at batch 1 / 32"
            )
    save(
        "benchmarks/results/ort_widths.json",
        {"machine": machine(), "args": vars(args), "conv_stack_ms_b32": widths, "plans": plans},
    )


if __name__ == "__main__":
    main()
