"""Time of trace + analyze + magnitude compress for ResNet-50/101/152-shaped models (224x224).

Goal (issue 2): ResNet-50 under 1 s on a 2-core CPU, time growing about linearly with depth.
Each stage is timed separately; "compress" is the whole compress() call (it traces and
analyzes again, plans, prunes, and re-measures MACs). The first call in a process pays
one-time imports (FlopCounterMode pulls in torch._dynamo), so a warm-up run comes first.

    python benchmarks/compile_speed.py [--repeats 3] [--json benchmarks/results/compile_speed.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date

import torch
from common import machine, save

import graphprune as gp
from graphprune.apps.models import resnet50, resnet101, resnet152

MODELS = {"resnet50": resnet50, "resnet101": resnet101, "resnet152": resnet152}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = (torch.randn(1, 3, 224, 224),)
    rows = []
    for _ in range(repeats):
        gm, t_trace = timed(lambda: gp.trace(model, x))
        groups, t_analyze = timed(lambda gm=gm: gp.analyze(gm))
        result, t_compress = timed(
            lambda: gp.compress(model, "magnitude", example_inputs=x, flops_target=0.5)
        )
        rows.append((t_trace, t_analyze, t_compress))
    med = [statistics.median(r[i] for r in rows) for i in range(3)]
    return {
        "model": name,
        "convs": sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
        "groups": len(groups),
        "trace_s": med[0],
        "analyze_s": med[1],
        "compress_s": med[2],
        "macs_ratio": result.report.macs_ratio,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="benchmarks/results/compile_speed.json")
    args = p.parse_args()
    measure("resnet50", 1)  # warm-up: one-time imports
    rows = [measure(name, args.repeats) for name in MODELS]
    info = {
        "date": date.today().isoformat(),
        "machine": f"{machine()['cpu']}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
        "rows": rows,
    }
    save(args.json, info)
    print(f"{info['date']}, {info['machine']}, torch {info['torch']}: `{info['command']}`\n")
    print("| model | convs | groups | trace (s) | analyze (s) | compress() (s) | MACs kept |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['convs']} | {r['groups']} | {r['trace_s']:.3f} | "
            f"{r['analyze_s']:.3f} | {r['compress_s']:.3f} | {r['macs_ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
