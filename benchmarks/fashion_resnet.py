"""ResRep (with and without distillation) vs prune-and-fine-tune on Fashion-MNIST, ResNet-20/56.

Data: Debian's dataset-fashion-mnist (the four original IDX files), 28x28, 10 classes; the full
10,000-image test set (``--test-subset`` for quick runs); on CPU a fixed training subset
(``--train-subset``, 10,000 by default), the full 60,000 on a GPU machine (``--train-subset 0``).

For each seed one base model is trained (``--base-epochs`` at lr 0.1, 1 warm-up epoch) and
every row of that seed starts from a copy of it. Every method gets the same ``--epochs`` at
lr 0.05 (batch ``--batch``, SGD momentum 0.9, weight decay 1e-4 off norms/biases, cosine lr):

- graphprune ResRep, the built-in defaults (``compress(model, "resrep", ...)``, nothing else);
- graphprune ResRep with distillation from the dense model (``distill=True``);
- graphprune CHEX, the built-in defaults (``compress(model, "chex", ...)``: prune and regrow);
- graphprune magnitude (one-shot, exact widths: ``round_to=1``) + fine-tuning;
- Torch-Pruning 1.6 global group-L2 (ratio bisected to the MACs target) + fine-tuning.

Any other registered graphprune method is a row by its name (``--methods chex slimming ...``):
``compress(base, NAME, train_loader=..., epochs=--epochs, lr=0.05, flops_target=target)``, so
every method gets the same epoch budget from the same base model. ``NAME:option=value,...``
passes config options (``resrep:cost_aware=False``; values are Python literals).

Base models are cached per (model, seed, base epochs, training subset, batch) in
benchmarks/results/cache/ (not committed), so runs of different methods, in different processes,
start from bit-identical bases. Rows are merged into the tag's JSON after every row (a row of the
same method, target and seed is replaced; ``--fresh`` starts over), and the markdown table of
mean ± std over seeds and the PNG of accuracy against MACs kept are written from all rows of the
tag into benchmarks/results/ (``--tag`` names the files). Runs of the same setting made in
parallel processes under other tags are combined with ``--tag T --merge T2 T3``. Each pruned
model is timed right after it is made, interleaved with its dense base (torch eager CPU, batch
64, graphprune's ``measure``): the speedup is the ratio of medians, so load affects both alike.

    python benchmarks/fashion_resnet.py --seeds 0 1 2 --base-epochs 15 --epochs 15
    python benchmarks/fashion_resnet.py --seeds 0 --base-epochs 3 --epochs 3 \\
        --train-subset 2000 --test-subset 2000 --batch 16 --tag smoke        # a smoke run
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from common import ROOT, machine, peer_row, save, train_base
from torch.utils.data import DataLoader, Subset

import graphprune as gp
from graphprune.apps.data import load_fashion_mnist
from graphprune.apps.models import cifar_resnet
from graphprune.training.loop import evaluate, fit

DEPTHS = {"resnet20": 20, "resnet56": 56}
TARGETS = (0.5, 0.3, 0.1, 0.02)  # MACs kept: 50 / 70 / 90 / 98% fewer
LR = 0.05
METHODS = ("resrep", "resrep+distill", "chex", "magnitude+ft", "torch-pruning+ft")
LABELS = {
    "resrep": "graphprune ResRep (defaults)",
    "resrep+distill": "graphprune ResRep + distill",
    "chex": "graphprune CHEX (defaults)",
    "chex-v1": "graphprune CHEX, first version (t_max 0.7; rows of 2026-12-01 only)",
    "magnitude+ft": "graphprune magnitude + fine-tune",
    "torch-pruning+ft": "Torch-Pruning group-L2 + fine-tune",
    "gsm": "graphprune GSM, structured (defaults)",
    "csgd": "graphprune C-SGD (defaults)",
}


def magnitude_row(base, example, target, train, test, *, epochs, seed) -> dict:
    t = time.perf_counter()
    # Exact widths, like the Torch-Pruning row (one-shot planning refuses a target that
    # multiples of 8 cannot reach at all, as 0.1 of ResNet-20's MACs).
    result = gp.compress(base, "magnitude", example_inputs=example, flops_target=target, round_to=1)
    torch.manual_seed(seed)
    fit(result.model, train, epochs=epochs, lr=LR, progress=False)
    return {
        "macs_kept": result.report.macs_ratio,
        "final_acc": evaluate(result.model, test),
        "seconds": time.perf_counter() - t,
        "model": result.model,
    }


def torch_pruning_row(base, example, target, train, test, *, epochs, seed) -> dict:
    row = peer_row(
        base,
        example,
        target,
        train,
        test,
        epochs=epochs,
        lr=LR,
        seed=seed,
        ignored=lambda m: [m.fc],
    )
    kept = None if row["macs_reduction"] is None else 1 - row["macs_reduction"]
    out = {"macs_kept": kept, "final_acc": row["final_acc"], "seconds": row["seconds"]}
    out["model"] = row.get("model")
    return out | ({"note": row["note"]} if "note" in row else {})


def generic_row(method, base, example, target, train, test, *, epochs, seed, **options) -> dict:
    """A registered method by name: trained for ``epochs`` (a method that ``can_train``, such
    as magnitude, fine-tunes its masked model inside compress; a one-shot one is fine-tuned
    after pruning). ``options`` go to compress (``distill=True``)."""
    torch.manual_seed(seed)
    t = time.perf_counter()
    cls = gp.methods.get_method(method)
    trains = cls.trains or cls.can_train
    training = dict(train_loader=train, epochs=epochs, lr=LR, progress=False) if trains else {}
    result = gp.compress(
        base,
        method,
        example_inputs=example,
        flops_target=target,
        val_loader=test,
        **training,
        **options,
    )
    if not trains:
        torch.manual_seed(seed)
        fit(result.model, train, epochs=epochs, lr=LR, progress=False)
    report = result.report
    return {
        "macs_kept": report.macs_ratio,
        "final_acc": evaluate(result.model, test),
        "acc_before_finalize": report.accuracy_before_finalize,
        "stats": report.stats_dict(),
        "seconds": time.perf_counter() - t,
        "model": result.model,
    }


def latency(base, pruned, example) -> dict:
    """Torch eager CPU at batch 64, dense and pruned interleaved (graphprune's ``measure``):
    the pruned median in ms and the dense/pruned ratio of medians."""
    from graphprune.backends.timing import measure
    from graphprune.backends.torch import TorchRunner

    runners = [TorchRunner(m, example_inputs=example) for m in (base, pruned)]
    timing = measure(runners, [64], warmup=3, rounds=15)
    dense, ours = (s.median_ms for s in timing.stats[64])
    return {"latency_ms_b64": ours, "speedup_b64": dense / ours}


def run_row(method, base, example, target, train, test, *, epochs, seed) -> dict:
    kw = dict(epochs=epochs, seed=seed)
    try:
        if method == "resrep+distill":
            row = generic_row("resrep", base, example, target, train, test, distill=True, **kw)
        elif method == "magnitude+ft":
            row = magnitude_row(base, example, target, train, test, **kw)
        elif method == "torch-pruning+ft":
            row = torch_pruning_row(base, example, target, train, test, **kw)
        else:
            name, options = parse_method(method)
            row = generic_row(name, base, example, target, train, test, **kw, **options)
    except gp.GraphpruneError as exc:  # recorded as a failed row, never dropped
        row = {"macs_kept": None, "final_acc": None, "seconds": None, "note": str(exc)}
    model = row.pop("model", None)
    if model is not None:
        row |= latency(base, model, example)
    return {"method": method, "target": target, "seed": seed} | row


def parse_method(spec: str) -> tuple[str, dict]:
    """``"resrep:cost_aware=False,min_keep_fraction=0.2"`` -> ("resrep", {options})."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key.strip()] = ast.literal_eval(value.strip())
    return name, options


PEER = "torch-pruning+ft"


def paired_vs_peer(rows: list[dict], method: str, target: float) -> tuple[float, float, int] | None:
    """Mean and standard error over seeds of (this method's accuracy - the peer's, on the same
    seed, base and target), and the number of seeds both have. Pairing removes the spread of
    the bases, the larger part of the seed spread, so a gap is resolved with fewer seeds."""

    def acc(m):
        return {
            r["seed"]: r["final_acc"]
            for r in rows
            if r["method"] == m and r["target"] == target and r["final_acc"] is not None
        }

    if method == PEER:
        return None
    mine, peer = acc(method), acc(PEER)
    diffs = [mine[s] - peer[s] for s in sorted(mine.keys() & peer.keys())]
    if not diffs:
        return None
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se, len(diffs)


def summarize(rows: list[dict], bases: dict[int, float]) -> list[dict]:
    out = []
    for target in sorted({r["target"] for r in rows}, reverse=True):
        for method in _ordered({r["method"] for r in rows}):
            same = [r for r in rows if r["method"] == method and r["target"] == target]
            ok = [r for r in same if r["final_acc"] is not None]
            if not same:
                continue
            accs = [r["final_acc"] for r in ok]
            deltas = [r["final_acc"] - bases[r["seed"]] for r in ok]
            out.append(
                {
                    "method": method,
                    "target": target,
                    "runs": len(same),
                    "failed": len(same) - len(ok),
                    "macs_kept": statistics.mean(r["macs_kept"] for r in ok) if ok else None,
                    "worst_miss": max((abs(r["macs_kept"] - target) for r in ok), default=None),
                    "acc": statistics.mean(accs) if accs else None,
                    "acc_std": statistics.pstdev(accs) if accs else None,
                    "delta": statistics.mean(deltas) if deltas else None,
                    "speedup": _mean([r.get("speedup_b64") for r in ok]),
                    "vs_peer": paired_vs_peer(rows, method, target),
                }
            )
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _ordered(methods) -> list[str]:
    """The fixed rows first, then other methods by name."""
    return [m for m in METHODS if m in methods] + sorted(set(methods) - set(METHODS))


def label(method: str) -> str:
    return LABELS.get(method, f"graphprune {method}")


def markdown(summary: list[dict], bases: dict[int, float]) -> str:
    accs = list(bases.values())
    lines = [
        f"base accuracy {statistics.mean(accs):.2f} ± {statistics.pstdev(accs):.2f}% "
        f"(seeds {', '.join(map(str, bases))})",
        "",
        "| MACs target (kept) | method | MACs kept | worst |kept − target| | accuracy (%) "
        "| Δ vs base | Δ vs peer, paired (± s.e., seeds) | CPU speedup (b64) | seeds "
        "| failed runs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        if s["acc"] is None:
            lines.append(
                f"| {s['target']} | {label(s['method'])} | — | — | — | — | — | — | {s['runs']} | "
                f"{s['failed']} |"
            )
            continue
        speed = "—" if s.get("speedup") is None else f"{s['speedup']:.2f}x"
        pair = s.get("vs_peer")
        paired = "—" if pair is None else f"{pair[0]:+.2f} ± {pair[1]:.2f} ({pair[2]})"
        lines.append(
            f"| {s['target']} | {label(s['method'])} | {s['macs_kept']:.3f} | "
            f"{s['worst_miss']:.3f} | {s['acc']:.2f} ± {s['acc_std']:.2f} | {s['delta']:+.2f} | "
            f"{paired} | {speed} | {s['runs'] - s['failed']} | {s['failed']} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], bases: dict[int, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    methods = _ordered({s["method"] for s in summary})
    colors = plt.cm.tab20.colors  # one distinct color and a marker per method
    for i, method in enumerate(methods):
        pts = [s for s in summary if s["method"] == method and s["acc"] is not None]
        if pts:
            ax.errorbar(
                [s["macs_kept"] for s in pts],
                [s["acc"] for s in pts],
                yerr=[s["acc_std"] for s in pts],
                marker="osD^v<>ph*"[i % 10],
                color=colors[(2 * i) % 20 + (i // 10) % 2],
                capsize=3,
                label=label(method),
            )
    ax.axhline(statistics.mean(bases.values()), color="gray", ls="--", label="dense base")
    ax.set_xscale("log")
    ax.set_xlabel("MACs kept (pruned / dense, conv + linear)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _method_spec(spec: str) -> str:
    name, _ = parse_method(spec)
    known = sorted(set(METHODS) | set(gp.methods.method_names()))
    if spec not in METHODS and name not in gp.methods.method_names():
        raise argparse.ArgumentTypeError(f"{spec!r}: not one of {', '.join(known)}")
    return spec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["resnet20"], choices=list(DEPTHS))
    p.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), type=_method_spec)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-subset", type=int, default=10_000)
    p.add_argument("--test-subset", type=int, default=0, help="0: the full 10,000")
    p.add_argument("--base-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--fresh", action="store_true", help="drop the tag's earlier rows")
    p.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="TAG",
        help="only merge these tags' rows (same setting) into --tag's and write its tables",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_set, test_set = load_fashion_mnist(train_subset=args.train_subset or None)
    if args.test_subset:
        test_set = Subset(test_set, range(args.test_subset))
    test = DataLoader(test_set, batch_size=500)
    example = (test_set[0][0][None],)
    stem = "fashion_resnet" + (f"_{args.tag}" if args.tag else "")
    out = f"benchmarks/results/{stem}.json"
    results = {} if args.fresh else _earlier(out, args)
    for tag in args.merge:  # rows of runs made in other processes with the same setting
        for name, other in _earlier(f"benchmarks/results/fashion_resnet_{tag}.json", args).items():
            mine = results.setdefault(name, {"bases": {}, "rows": []})
            mine["bases"] = {**other["bases"], **mine["bases"]}
            keys = {(r["method"], r["target"], r["seed"]) for r in mine["rows"]}
            mine["rows"] += [
                r for r in other["rows"] if (r["method"], r["target"], r["seed"]) not in keys
            ]
    if args.merge:
        print("\n\n".join(write(results, name, stem, out, args) for name in results))
        return
    for name in args.models:
        kept = results.get(name, {"bases": {}, "rows": []})
        rows, bases = kept["rows"], {int(k): v for k, v in kept["bases"].items()}
        for seed in args.seeds:
            gen = torch.Generator().manual_seed(seed)
            train = DataLoader(train_set, batch_size=args.batch, shuffle=True, generator=gen)
            base, bases[seed] = cached_base(name, seed, train, test, args)
            for target in args.targets:
                for method in args.methods:
                    row = run_row(
                        method,
                        copy.deepcopy(base),
                        example,
                        target,
                        train,
                        test,
                        epochs=args.epochs,
                        seed=seed,
                    )
                    key = (method, target, seed)
                    rows = [r for r in rows if (r["method"], r["target"], r["seed"]) != key]
                    rows.append(row)
                    print({k: v for k, v in row.items() if k != "stats"}, flush=True)
                    results[name] = {"bases": bases, "rows": rows, "summary": []}
                    write(results, name, stem, out, args)
    print("\n\n".join(write(results, name, stem, out, args) for name in results))


def cached_base(name: str, seed: int, train, test, args):
    """The seed's base model, trained once and cached, and its test accuracy."""
    key = f"{name}_s{seed}_e{args.base_epochs}_n{args.train_subset}_b{args.batch}"
    path = ROOT / "benchmarks" / "results" / "cache" / f"fashion_{key}.pt"
    torch.manual_seed(seed)
    base = cifar_resnet(DEPTHS[name], num_classes=10, in_channels=1)
    if path.exists():
        base.load_state_dict(torch.load(path, weights_only=True))
        acc = evaluate(base, test)
        print(f"{name} seed {seed}: cached base {acc:.2f}% ({path.name})", flush=True)
        return base, acc
    acc, seconds = train_base(base, train, test, epochs=args.base_epochs, lr=0.1, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(base.state_dict(), path)
    print(f"{name} seed {seed}: base {acc:.2f}% ({seconds:.0f} s)", flush=True)
    return base, acc


SAME_RUN = ("train_subset", "test_subset", "base_epochs", "epochs", "batch")


def _earlier(out: str, args) -> dict:
    """The tag's earlier results, if they were run with the same data and budgets."""
    path = ROOT / out
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    differ = [k for k in SAME_RUN if old["args"].get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(
            f"{out} holds rows of another setting ({', '.join(differ)} differ): "
            "use another --tag, or --fresh to replace them"
        )
    return old["results"]


def write(results: dict, name: str, stem: str, out: str, args) -> str:
    """JSON (all rows), the PNG and the markdown table of ``name``; returns the table."""
    rows = results[name]["rows"]
    bases = {int(k): v for k, v in results[name]["bases"].items()}
    summary = summarize(rows, bases)
    results[name]["summary"] = summary
    seeds = sorted({r["seed"] for r in rows})
    png = ROOT / "benchmarks" / "results" / f"{stem}_{name}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(
        summary,
        bases,
        png,
        f"{name}, Fashion-MNIST {args.train_subset or 60000} images, "
        f"{args.base_epochs}+{args.epochs} epochs, seeds {seeds}",
    )
    save(out, {"machine": machine(), "args": vars(args), "results": results})
    return f"### {name}\n\n" + markdown(summary, bases) + f"\n\nPlot: {png.name}"


if __name__ == "__main__":
    main()
