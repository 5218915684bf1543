"""Measured latency speedup of magnitude-pruned ResNet-50 / MobileNetV2 shapes (224x224).

Does a MACs reduction turn into latency? Each model is pruned with ``compress(..., "magnitude")``
to 0.7, 0.5 and 0.3 of its dense MACs, with round_to=8 and round_to=1, exported to ONNX (the
default exporter, as ``graphprune export`` does) and timed with ONNX Runtime on CPU at a fixed
thread count. Random weights: latency does not depend on their values.

Timing is graphprune.backends.timing.measure: for each batch size the dense model and every
pruned variant take turns one forward pass at a time (the order rotates each round), so load
from other processes and clock drift hit all of them alike. Speedup = dense median / pruned
median from the same rounds; "drift" compares the dense median of the first and second half of
the rounds. Efficiency =
speedup / (dense MACs / pruned MACs); 1.0 means latency fell exactly as MACs did.
With a CUDA device, torch fp16 channels_last eager and CUDA-graph latencies are added.

    python benchmarks/speedup.py [--quick] [--models resnet50 mobilenet_v2]
        [--batch-sizes 1 16] [--runs 40] [--seconds 90] [--threads 2] [--out PATH]

Writes JSON (default benchmarks/results/speedup.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import onnxruntime
import torch

from graphprune import compress, count_macs
from graphprune.apps.models import get_model
from graphprune.backends import get_backend
from graphprune.backends.timing import available_cpus, cpu_name, measure

OUT = Path(__file__).resolve().parent / "results" / "speedup.json"
MIN_RUNS = 10  # a median of fewer runs moves with a single hiccup
ONNX = get_backend("onnx")  # ONNX files timed by ONNX Runtime on CPU


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_variants(name: str, targets, round_tos, tmp: Path) -> list[dict]:
    """Dense model first, then one pruned copy per (target, round_to), each exported to ONNX."""
    model, inputs = get_model(name)
    dense = count_macs(model, inputs)
    variants = [dict(target=None, round_to=None, model=model, macs=dense.macs, params=dense.params)]
    for target in targets:
        for round_to in round_tos:
            t = time.perf_counter()
            res = compress(
                model, "magnitude", example_inputs=inputs, flops_target=target, round_to=round_to
            )
            log(f"{name} target {target} round_to {round_to}: {time.perf_counter() - t:.1f} s")
            r = res.report
            variants.append(
                dict(target=target, round_to=round_to, model=res.model, macs=r.pruned_macs,
                     params=r.pruned_params)
            )  # fmt: skip
    for i, v in enumerate(variants):
        t = time.perf_counter()
        v["onnx"] = ONNX.export(v["model"], inputs, tmp / f"{name}_{i}{ONNX.suffix}")
        log(f"{name} export {i + 1}/{len(variants)}: {time.perf_counter() - t:.1f} s")
        v.update(name=name, inputs=inputs, macs_ratio=v["macs"] / dense.macs)
    return variants


def gpu_latency(variants, batch_sizes) -> None:
    """torch fp16 channels_last on CUDA, eager and CUDA graphs; stored in each variant."""
    torch_backend = get_backend("torch")
    for mode, graphs in (("eager", False), ("cuda_graphs", True)):
        runners = [
            torch_backend.runner(v["model"], example_inputs=v["inputs"], device="cuda",
                                 fp16=True, channels_last=True, cuda_graphs=graphs)
            for v in variants
        ]  # fmt: skip
        timing = measure(runners, batch_sizes, warmup=20, rounds=100)
        for i, v in enumerate(variants):
            v.setdefault("gpu", {})[mode] = {b: s[i].median_ms for b, s in timing.stats.items()}


def machine(threads: int) -> dict:
    return {
        "cpu": cpu_name(),
        "cores_available": available_cpus(),
        "cores_total": os.cpu_count(),
        "ort_threads": threads,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "loadavg_start": os.getloadavg(),
    }


def rows_for(variants, timing) -> list[dict]:
    rows = []
    for i, v in enumerate(variants):
        row = {k: v[k] for k in ("name", "target", "round_to", "macs", "macs_ratio", "params")}
        row.update(latency={}, speedup={}, efficiency={}, speedup_paired={})
        for b, stats in timing.stats.items():
            s = stats[i]
            row["latency"][b] = {"median_ms": s.median_ms, "p90_ms": s.p90_ms, "runs": s.runs}
            row["speedup"][b] = timing.speedup(b, i)
            # Same-round ratios: robust to load that changes between rounds.
            row["speedup_paired"][b] = timing.paired_speedup(b, i)
            row["efficiency"][b] = row["speedup"][b] * v["macs_ratio"]
        if "gpu" in v:
            row["gpu_fp16_channels_last_ms"] = v["gpu"]
            row["gpu_speedup"] = {
                mode: {b: variants[0]["gpu"][mode][b] / ms for b, ms in per_b.items()}
                for mode, per_b in v["gpu"].items()
            }
        rows.append(row)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    bs = list(rows[0]["latency"])
    head = "| model | MACs target | round_to | MACs kept | params (M) |"
    for b in bs:
        head += f" b={b} median / p90 ms | b={b} speedup | b={b} eff. |"
    gpu = "gpu_speedup" in rows[0]
    if gpu:
        per = " / ".join(f"b={b}" for b in bs)
        head += f" GPU fp16 eager speedup ({per}) | GPU fp16 CUDA graphs speedup ({per}) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        target = "dense" if r["target"] is None else f"{r['target']:.1f}"
        line = (
            f"| {r['name']} | {target} | {r['round_to'] or '—'} | {r['macs_ratio']:.3f} |"
            f" {r['params'] / 1e6:.2f} |"
        )
        for b in bs:
            lat = r["latency"][b]
            eff = "—" if r["target"] is None else f"{r['efficiency'][b]:.2f}"
            line += (
                f" {lat['median_ms']:.1f} / {lat['p90_ms']:.1f} | {r['speedup'][b]:.2f}x | {eff} |"
            )
        if gpu:
            for mode in ("eager", "cuda_graphs"):
                line += (
                    " " + " / ".join(f"{s:.2f}x" for s in r["gpu_speedup"][mode].values()) + " |"
                )
        lines.append(line)
    drift = ", ".join(f"{k} {v:+.1%}" for k, v in meta["dense_drift"].items())
    lines += [
        "",
        f"ONNX Runtime {meta['onnxruntime']} CPU, {meta['ort_threads']} intra-op threads, on "
        f"{meta['cpu']} ({meta['cores_available']} cores); torch {meta['torch']}; "
        f"{meta['date']}; `{meta['command']}`.",
        "MACs = conv+linear multiply-accumulates; MACs kept = pruned / dense; speedup = dense "
        "median / pruned median, measured interleaved in the same rounds (ORT thread pools "
        "not spinning between turns); eff. = speedup / (dense MACs / pruned MACs). "
        "Random weights.",
        f"Load average at start/end {meta['loadavg_start'][0]:.1f} / {meta['loadavg_end'][0]:.1f};"
        f" dense median drift (2nd half vs 1st half of rounds): {drift}.",
    ]
    if not gpu:
        lines.append("No CUDA device: GPU columns (torch fp16 channels_last, CUDA graphs) skipped.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="MobileNetV2 at 0.5 only, few runs")
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    p.add_argument("--round-to", type=int, nargs="+", default=[8, 1])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--runs", type=int, default=40, help="most timed rounds per batch size")
    p.add_argument("--seconds", type=float, default=90, help="time budget per batch size")
    p.add_argument("--threads", type=int, default=None, help="ORT threads (default: all cores)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.targets, args.runs, args.seconds = ["mobilenet_v2"], [0.5], 10, 5
    threads = args.threads or available_cpus()
    meta = machine(threads)
    if not torch.cuda.is_available():
        log("no CUDA device: skipping torch fp16 channels_last / CUDA graphs columns")
    rows, drift = [], {}
    with tempfile.TemporaryDirectory(prefix="graphprune-speedup-") as tmp:
        for name in args.models:
            variants = build_variants(name, args.targets, args.round_to, Path(tmp))
            runners = [ONNX.runner(v["onnx"], threads=threads) for v in variants]
            t = time.perf_counter()
            timing = measure(
                runners, args.batch_sizes, warmup=3, rounds=args.runs, seconds=args.seconds,
                min_rounds=MIN_RUNS,
            )  # fmt: skip
            for b in args.batch_sizes:
                drift[f"{name} b={b}"] = timing.drift(b)
                rounds = len(timing.times_ms[b][0])
                log(f"{name} b={b}: {rounds} rounds, drift {timing.drift(b):+.1%}")
            log(f"{name}: timed in {time.perf_counter() - t:.0f} s")
            if torch.cuda.is_available():
                gpu_latency(variants, args.batch_sizes)
            rows += rows_for(variants, timing)
    meta.update(loadavg_end=os.getloadavg(), dense_drift=drift)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n")
    print(markdown(rows, meta))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
