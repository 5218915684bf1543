"""The default job (``graphprune demo`` / ``make demo``): a real model on real bundled data.

1. Train a CIFAR-style ResNet-56 on scikit-learn's handwritten digits (upsampled to 16x16,
   fixed stratified split with 360 test images), or load the cached base checkpoint.
2. Compress it to a MACs target with a registered method (ResRep unless told otherwise).
3. Export dense and pruned models to ONNX, check ONNX Runtime parity, time both.
4. Print and save the report (report.json, report.md) in the output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from graphprune.api import compress
from graphprune.apps.data import loaders_for
from graphprune.apps.models import resnet56
from graphprune.backends import export, runner
from graphprune.backends.ort import parity
from graphprune.backends.timing import measure
from graphprune.errors import TrainingError
from graphprune.io import atomic_save, safe_load
from graphprune.methods import get_method
from graphprune.planning.macs import count_macs
from graphprune.training.loop import evaluate, fit

BASE_LR, METHOD_LR, BATCH = 0.1, 0.05, 32
DEMO_METHOD = "resrep"  # trains the pruned model losslessly; any registered name works


def _base_model(out: Path, train, test, epochs: int):
    """Train ResNet-56, or reuse ``out/base.pt`` if it was trained with the same recipe."""
    model = resnet56(num_classes=10, in_channels=1)
    path = out / "base.pt"
    recipe = {"epochs": epochs, "lr": BASE_LR, "warmup_epochs": 1, "batch": BATCH, "seed": 0}
    state = _cached_base(path, recipe)
    if state is not None:
        model.load_state_dict(state)
        print(f"[1/4] loaded cached base model {path}")
        return model
    print(f"[1/4] training the base ResNet-56 ({epochs} epochs, lr {BASE_LR}, batch {BATCH})")
    torch.manual_seed(0)
    fit(
        model,
        train,
        epochs=epochs,
        lr=BASE_LR,
        warmup_epochs=1,
        val_loader=test,
        eval_every=epochs,
        desc="base",
    )
    atomic_save({"model": model.state_dict(), "recipe": recipe}, path)
    return model


def _cached_base(path: Path, recipe: dict) -> dict | None:
    """The cached base state_dict if ``path`` holds one trained with ``recipe``. Read with
    weights_only (no code runs); anything else (unreadable, other recipe) means retrain."""
    if not path.exists():
        return None
    try:
        state = safe_load(path, what="base-model cache")
        if isinstance(state, dict) and state.get("recipe") == recipe:
            return state["model"]
    except Exception as exc:  # a broken or hostile cache is retrained, never trusted
        print(f"[1/4] ignoring unreadable cache {path}: {exc}")
    return None


def run_demo(
    *,
    method: str = DEMO_METHOD,
    flops_target: float = 0.3,
    epochs: int = 12,
    out: Path = Path("runs/demo"),
    base_epochs: int = 15,
) -> dict:
    start = time.perf_counter()
    cls = get_method(method)
    out.mkdir(parents=True, exist_ok=True)
    train, test = loaders_for("digits", batch_size=BATCH)
    if cls.trains and epochs * len(train) < cls.min_iters:
        raise TrainingError(
            f"epochs={epochs}: {cls.name} needs >= {cls.min_iters} iterations ({len(train)}/epoch)"
        )
    base = _base_model(out, train, test, base_epochs).eval()
    example = (next(iter(test))[0][:1],)
    base_acc = evaluate(base, test)
    print(f"      base accuracy {base_acc:.2f}% on {len(test.dataset)} test images")

    training: dict[str, object] = {}
    if cls.trains:
        training = dict(
            train_loader=train,
            epochs=epochs,
            lr=METHOD_LR,
            # One checkpoint folder per setting: resuming never mixes runs with other targets.
            checkpoint_dir=out / f"{cls.name}_target{flops_target}_epochs{epochs}_distill",
            resume=True,
            distill=True,  # the dense base is at hand: the pruned model learns from it too
        )
    how = f" ({epochs} epochs, lr {METHOD_LR})" if cls.trains else ""
    print(f"[2/4] {cls.name} to {flops_target:.2f} of the MACs{how}")
    torch.manual_seed(0)
    result = compress(
        base,
        cls.name,
        example_inputs=example,
        flops_target=flops_target,
        val_loader=test,
        **training,
    )
    pruned = result.model.eval()
    pruned_acc = evaluate(pruned, test)

    print("[3/4] exporting ONNX and checking ONNX Runtime parity")
    paths = {"dense": out / "dense.onnx", "pruned": out / "pruned.onnx"}
    export(base, example, paths["dense"])
    export(pruned, example, paths["pruned"])
    diffs = {k: parity(m, example, paths[k]) for k, m in (("dense", base), ("pruned", pruned))}

    print("[4/4] timing dense vs pruned with ONNX Runtime (CPU), interleaved")
    timing = measure([runner(p) for p in paths.values()], (1, 32), warmup=10, rounds=50)
    lat = {k: {b: s[i] for b, s in timing.stats.items()} for i, k in enumerate(paths)}
    dense_macs = count_macs(base, example)
    report = {
        "model": "CIFAR-style ResNet-56 (1x1 projection shortcuts), 1x16x16 input",
        "data": "scikit-learn digits, 1437 train / 360 test, stratified, random_state=0",
        "flops_target": flops_target,
        "base_accuracy": base_acc,
        "method": cls.name,
        "accuracy_before_finalize": result.report.accuracy_before_finalize,
        "accuracy_after_finalize": result.report.accuracy_after_finalize,
        "pruned_accuracy": pruned_acc,
        "dense_macs": dense_macs.macs,
        "pruned_macs": result.report.pruned_macs,
        "macs_reduction": 1 - result.report.pruned_macs / dense_macs.macs,
        "dense_params": dense_macs.params,
        "pruned_params": result.report.pruned_params,
        "onnx_max_abs_diff": diffs,
        "ort_latency_ms": {
            k: {
                b: {"median": s.median_ms, "p90": s.p90_ms, "threads": s.threads}
                for b, s in v.items()
            }
            for k, v in lat.items()
        },
        "method_config": result.report.config,
        "method_stats": result.report.stats_dict(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    text = _format(report, lat)
    (out / "report.md").write_text(text + "\n")
    print(text)
    return report


def _format(r: dict, lat: dict) -> str:
    lines = [
        f"## graphprune demo: {r['model']}",
        f"data: {r['data']}",
        "",
        "| | dense | pruned |",
        "|---|---|---|",
        f"| accuracy (%) | {r['base_accuracy']:.2f} | {r['pruned_accuracy']:.2f} |",
        f"| MACs (M, conv+linear) | {r['dense_macs'] / 1e6:.3f} | {r['pruned_macs'] / 1e6:.3f} |",
        f"| params (M) | {r['dense_params'] / 1e6:.4f} | {r['pruned_params'] / 1e6:.4f} |",
    ]
    for b in lat["dense"]:
        d, p = lat["dense"][b], lat["pruned"][b]
        lines.append(
            f"| ORT latency batch {b} (median ms, {d.threads} threads) | {d.median_ms:.3f} | "
            f"{p.median_ms:.3f} ({d.median_ms / p.median_ms:.2f}x) |"
        )
    lines += [
        "",
        f"{r['method']}: MACs reduction {r['macs_reduction']:.1%} "
        f"(target {1 - r['flops_target']:.0%} fewer); accuracy right before the finalize passes "
        f"{r['accuracy_before_finalize']:.2f}%, after them {r['accuracy_after_finalize']:.2f}%; "
        "ONNX Runtime max abs diff "
        f"dense {r['onnx_max_abs_diff']['dense']:.1e}, "
        f"pruned {r['onnx_max_abs_diff']['pruned']:.1e}; "
        f"{r['seconds']:.0f} s in all.",
    ]
    return "\n".join(lines)
