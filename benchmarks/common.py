"""Shared pieces of the accuracy benchmarks: recipes, a graphprune method's row, the peer row.

The peer is Torch-Pruning (PyPI ``torch-pruning``): global group-L2 magnitude pruning
(GroupMagnitudeImportance(p=2), MetaPruner with global_pruning=True) to the same MACs target,
then fine-tuning for the same number of epochs the graphprune method trains. MACs are counted
the same way for both (graphprune.count_macs: conv + linear multiply-accumulates).
"""

from __future__ import annotations

import copy
import functools
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

import graphprune as gp
from graphprune.methods import get_method, method_names
from graphprune.training.loop import evaluate, fit


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": date.today().isoformat(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
    }


def add_method_arg(parser) -> None:
    """--method: any registered method (these benchmarks were written for ResRep)."""
    parser.add_argument("--method", default="resrep", choices=method_names())


def train_base(model, train, test, *, epochs: int, lr: float, seed: int):
    torch.manual_seed(seed)
    t = time.perf_counter()
    fit(model, train, epochs=epochs, lr=lr, warmup_epochs=1, progress=False)
    return evaluate(model, test), time.perf_counter() - t


def method_row(method, base, example, target, train, test, *, epochs, lr, seed) -> dict:
    """A registered graphprune method at ``target``; one that trains gets ``epochs`` at ``lr``."""
    trains = get_method(method).trains
    torch.manual_seed(seed)
    t = time.perf_counter()
    training = dict(train_loader=train, epochs=epochs, lr=lr, progress=False) if trains else {}
    result = gp.compress(
        base,
        method,
        example_inputs=example,
        flops_target=target,
        round_to=1,
        val_loader=test,
        **training,
    )
    report = result.report
    return {
        "method": f"graphprune {method}",
        "target": target,
        "macs_reduction": 1 - report.macs_ratio,
        "acc_before_finalize": report.accuracy_before_finalize,
        "acc_after_finalize": report.accuracy_after_finalize,
        "final_acc": evaluate(result.model, test),
        "stats": report.stats_dict(),
        "seconds": time.perf_counter() - t,
    }


def _peer_prune(model, example, ratio: float, ignored):
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(
        model,
        example[0],
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=True,
        pruning_ratio=ratio,
        ignored_layers=ignored(model),
    )
    pruner.step()
    return model


def peer_row(base, example, target, train, test, *, epochs, lr, seed, ignored) -> dict:
    """Torch-Pruning group-L2 one-shot to the MACs target (ratio by bisection), then fine-tune."""
    t = time.perf_counter()
    dense = gp.count_macs(base, example).macs
    lo, hi, best = 0.0, 0.999, None
    for _ in range(14):
        mid = (lo + hi) / 2
        candidate = _peer_prune(copy.deepcopy(base), example, mid, ignored)
        ratio = gp.count_macs(candidate, example).macs / dense
        if ratio <= target:
            hi, best = mid, candidate
        else:
            lo = mid
    if best is None:  # the peer's own floor: record it rather than stop the whole run
        return {
            "method": "Torch-Pruning group-L2 + fine-tune",
            "target": target,
            "macs_reduction": None,
            "acc_before_finalize": None,
            "acc_after_finalize": None,
            "final_acc": None,
            "stats": None,
            "seconds": time.perf_counter() - t,
            "note": f"could not reach {target} of the MACs",
        }
    torch.manual_seed(seed)
    fit(best, train, epochs=epochs, lr=lr, progress=False)
    return {
        "method": "Torch-Pruning group-L2 + fine-tune",
        "target": target,
        "macs_reduction": 1 - gp.count_macs(best, example).macs / dense,
        "acc_before_finalize": None,
        "acc_after_finalize": None,
        "final_acc": evaluate(best, test),
        "stats": None,
        "seconds": time.perf_counter() - t,
        "model": best,
    }


def compare(
    base, example, targets, train, test, *, method: str, epochs: int, seed: int
) -> list[dict]:
    """A graphprune method and the peer at each target, from copies of the same base model."""
    rows = []
    for target in targets:
        for row_fn in (functools.partial(method_row, method), peer_row):
            extra = {"ignored": lambda m: [m.fc]} if row_fn is peer_row else {}
            row = row_fn(
                copy.deepcopy(base),
                example,
                target,
                train,
                test,
                epochs=epochs,
                lr=0.05,
                seed=seed,
                **extra,
            )
            row["seed"] = seed
            row.pop("model", None)
            rows.append(row)
            print(
                {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True
            )
    return rows


def mean_rows(rows: list[dict]) -> list[dict]:
    """Average rows of the same (method, target) over seeds."""
    keys = sorted({(r["method"], r["target"]) for r in rows}, key=lambda k: (-k[1], k[0]))
    out = []
    for method, target in keys:
        same = [r for r in rows if r["method"] == method and r["target"] == target]
        avg = {"method": method, "target": target, "seeds": len(same)}
        for field in (
            "macs_reduction",
            "acc_before_finalize",
            "acc_after_finalize",
            "final_acc",
            "seconds",
        ):
            values = [r[field] for r in same if r[field] is not None]
            avg[field] = statistics.mean(values) if values else None
        accs = [r["final_acc"] for r in same if r["final_acc"] is not None]
        avg["final_acc_std"] = statistics.pstdev(accs) if accs else None
        avg["failed_seeds"] = len(same) - len(accs)
        out.append(avg)
    return out


def markdown(rows: list[dict], base_acc: float) -> str:
    fmt = lambda v, d=2: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [
        f"base accuracy {base_acc:.2f}%",
        "",
        "| method | MACs reduction | acc. before finalize | acc. after finalize | final acc. "
        "| Δ vs base | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["final_acc"] is None:  # the method could not reach the target at all
            lines.append(f"| {r['method']} | not reachable | — | — | — | — | {r['seconds']:.0f} |")
            continue
        std = f" ± {r['final_acc_std']:.2f}" if r.get("seeds", 1) > 1 else ""
        lines.append(
            f"| {r['method']} | {r['macs_reduction']:.1%} | {fmt(r['acc_before_finalize'])} | "
            f"{fmt(r['acc_after_finalize'])} | {r['final_acc']:.2f}{std} | "
            f"{r['final_acc'] - base_acc:+.2f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


ROOT = Path(__file__).resolve().parent.parent


def save(path: str, payload: dict) -> None:
    """Write JSON; a relative path is taken from the repository root, wherever we run."""
    target = Path(path) if Path(path).is_absolute() else ROOT / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, default=str))
