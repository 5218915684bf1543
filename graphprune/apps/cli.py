"""The ``graphprune`` command: inspect, compress, export, bench, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from graphprune.errors import GraphpruneError


def _load(spec: str):
    """A built-in name, ``package.module:factory``, or a file saved by ``compress --out``."""
    from graphprune.apps.models import get_model
    from graphprune.io import load_model

    if spec.endswith((".pt", ".pth")):
        return load_model(spec)
    return get_model(spec)


def cmd_inspect(args: argparse.Namespace) -> int:
    from graphprune import analyze, count_macs, trace

    model, inputs = _load(args.model)
    gm = trace(model, inputs)
    groups = analyze(gm, strict=args.strict)
    macs = count_macs(gm, inputs)
    if args.json:
        out = {
            "model": args.model,
            "macs": macs.macs,
            "params": macs.params,
            "groups": [
                {
                    "id": g.id,
                    "channels": g.channels,
                    "producers": list(g.producers),
                    "members": [f"{m.name}:{m.role}" for m in g.members],
                    "prunable": g.prunable,
                    "reasons": list(g.reasons),
                    "exact": g.exact,
                }
                for g in groups
            ],
        }
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{args.model}: {macs.macs / 1e6:.3f} M MACs (conv+linear), "
        f"{macs.params / 1e6:.4f} M params"
    )
    print(f"{len(groups)} channel groups, {sum(g.prunable for g in groups)} prunable")
    print(f"{'id':>4} {'channels':>8} {'members':>7}  {'status':<10} producers / reason")
    for g in groups:
        status = ("prunable" if g.exact else "inexact") if g.prunable else "fixed"
        why = ", ".join(g.producers) if g.prunable else "; ".join(g.reasons)
        print(f"{g.id:>4} {g.channels:>8} {len(g.members):>7}  {status:<10} {why}")
    return 0


def _check_accepts(model, sample, args: argparse.Namespace) -> None:
    """ResRep trains on --data: the model must take its images and give 10 class scores."""
    import torch

    from graphprune.frontend.modes import eval_mode

    try:
        with torch.no_grad(), eval_mode(model):
            out = model(sample)
    except Exception as exc:
        raise ValueError(
            f"{args.model} does not accept the {args.data} images {tuple(sample.shape)}: {exc}. "
            f"Give a model built for {sample.shape[1]}-channel inputs and 10 classes"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.shape[-1] != 10:
        raise ValueError(f"{args.model} must output 10 class scores for {args.data}")


def cmd_compress(args: argparse.Namespace) -> int:
    from graphprune import compress
    from graphprune.io import check_writable, save_model

    if args.out:
        check_writable(args.out)  # before any training, not after
    options: dict[str, object] = {}
    if args.method == "resrep":
        from graphprune.apps.data import loaders_for
        from graphprune.apps.models import cifar_resnet

        train, val = loaders_for(args.data, batch_size=args.batch_size)
        sample = next(iter(val))[0][:1]
        inputs = (sample,)
        if args.model in ("resnet20", "resnet56"):  # built for the data's image channels
            model = cifar_resnet(int(args.model[6:]), in_channels=sample.shape[1])
        else:
            model, _ = _load(args.model)
            _check_accepts(model, sample, args)
        options = dict(train_loader=train, val_loader=val, epochs=args.epochs, lr=args.lr)
        if args.checkpoint_dir:
            options.update(checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    else:
        model, inputs = _load(args.model)
    result = compress(
        model,
        args.method,
        example_inputs=inputs,
        flops_target=args.flops_target,
        round_to=args.round_to,
        **options,
    )
    if args.out:
        save_model(args.out, result.model, inputs, result.report.to_dict())
    print(result.report.to_json() if args.json else result.report.format())
    if args.out and not args.json:
        print(f"saved {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from graphprune.backends import export

    model, inputs = _load(args.model)
    path = export(model, inputs, args.out, backend=args.backend, fp16=args.fp16)
    print(f"wrote {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from graphprune.apps.bench import bench, format_bench

    rows = bench(
        args.models,
        batch_sizes=args.batch_sizes,
        runs=args.runs,
        threads=args.threads,
        backend=args.backend,
    )
    print(json.dumps(rows, indent=2) if args.json else format_bench(rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from graphprune.apps.demo import run_demo

    run_demo(
        flops_target=args.flops_target,
        epochs=args.epochs,
        out=Path(args.out),
        base_epochs=args.base_epochs,
    )
    return 0


def _backend_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--backend`` with the registry's names as choices and their descriptions as help."""
    from graphprune.backends import DEFAULT_BACKEND, backend_names, get_backend

    names = backend_names()
    about = "; ".join(f"{n}: {get_backend(n).description}" for n in names)
    parser.add_argument(
        "--backend", default=DEFAULT_BACKEND, choices=names, help=f"{what} ({about})"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphprune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="channel groups, MACs and params of a model")
    s.add_argument("model", help="built-in name (resnet56, ...), package.module:factory, or .pt")
    s.add_argument("--json", action="store_true")
    s.add_argument("--strict", action="store_true", help="fail on ops without a channel rule")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("compress", help="prune a model to a MACs target")
    s.add_argument("model")
    s.add_argument("--method", default="magnitude", choices=["magnitude", "resrep"])
    s.add_argument(
        "--flops-target",
        type=float,
        default=0.5,
        help="remaining MACs / dense MACs (0.5 keeps half)",
    )
    s.add_argument("--round-to", type=int, default=8)
    s.add_argument("--data", default="digits", help="resrep: digits or fashion-mnist")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--lr", type=float, default=0.05)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--checkpoint-dir")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--out", help="save the pruned model here (.pt)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_compress)

    s = sub.add_parser("export", help="write a deployable artifact (ONNX file, TensorRT engine)")
    s.add_argument("model")
    s.add_argument("--out", required=True)
    _backend_flag(s, "write the artifact with this backend")
    s.add_argument("--fp16", action="store_true")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("bench", help="MACs, params and latency of models side by side")
    s.add_argument("models", nargs="+", help="names, .pt, .onnx or .engine files")
    s.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    s.add_argument("--runs", type=int, default=30)
    s.add_argument("--threads", type=int, default=None)
    _backend_flag(s, "export models with this backend and time them with its runner")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("demo", help="the default job: ResRep on ResNet-56 / digits, exported")
    s.add_argument("--flops-target", type=float, default=0.3)
    s.add_argument("--epochs", type=int, default=12)
    s.add_argument("--base-epochs", type=int, default=15)
    s.add_argument("--out", default="runs/demo")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (GraphpruneError, ValueError, OSError, ImportError) as exc:
        print(f"graphprune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
