"""Coverage of the real model zoos (issue 8): one record per model, JSON plus COVERAGE.md.

    python benchmarks/zoo_coverage.py [--source timm ...] [--only resnet18 ...]
        [--json benchmarks/results/zoo_coverage.json] [--md COVERAGE.md]

Needs the zoo environment (``make zoo-venv``): torchvision, timm, ultralytics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from graphprune.testing.coverage import check_model
from graphprune.testing.real_zoos import zoo_specs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--source", nargs="*", default=["torchvision", "timm", "ultralytics", "segmentation"]
    )
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for spec in zoo_specs(tuple(args.source)):
        if args.only and spec.name not in args.only:
            continue
        t = time.perf_counter()
        r = check_model(spec.name, spec.source, spec.build, spec.input_shape)
        d = r.to_dict()
        d["total_s"] = time.perf_counter() - t
        rows.append(d)
        print(
            json.dumps(
                {
                    k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in d.items()
                    if k not in ("input_shape",)
                }
            ),
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
