"""The ``graphprune`` command: inspect, compress, methods, export, convert, bench, demo."""

from __future__ import annotations

import argparse
import importlib
import json
import os
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
    from graphprune import analyze, count_macs, prune_whole_heads, trace

    model, inputs = _load(args.model)
    gm = prune_whole_heads(trace(model, inputs), args.prune_heads)
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


def _training_setup(args: argparse.Namespace):
    """Loaders of --data and the model built for them: a built-in model gets the data's image
    channels and class count; any other model must accept the images and give one score per
    class (both read from the data)."""
    import torch

    from graphprune.apps.data import loaders_for, num_classes
    from graphprune.frontend.modes import eval_mode
    from graphprune.io import load_model

    data = args.data or "digits"
    train, val = loaders_for(data, batch_size=args.batch_size or 64)
    sample = next(iter(val))[0][:1]
    classes = num_classes(train)
    if args.model.endswith((".pt", ".pth")):
        model, _ = load_model(args.model)
    else:
        from graphprune.apps.models import get_model

        model, _ = get_model(args.model, in_channels=sample.shape[1], num_classes=classes)
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(sample)
    except Exception as exc:
        raise ValueError(
            f"{args.model} does not accept the {data} images {tuple(sample.shape)}: {exc}. "
            f"Give a model built for {sample.shape[1]}-channel inputs and {classes} classes"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.shape[-1] != classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{args.model} must output {classes} class scores for {data}, got {got}")
    return model, (sample,), train, val


_TRAINING_FLAGS = ("data", "epochs", "lr", "batch_size", "checkpoint_dir", "resume", "distill")


def cmd_compress(args: argparse.Namespace) -> int:
    from graphprune import compress
    from graphprune.io import check_writable, save_model
    from graphprune.methods import get_method
    from graphprune.training.distributed import barrier, init_from_env, is_main_process

    init_from_env()  # under torchrun: one rank each, the data sharded, rank 0 writes
    cls = get_method(args.method)
    flags = {o.name: _dest(o.name) for o in cls.config_class.options()}
    config = cls.config_class(
        **{name: getattr(args, dest) for name, dest in flags.items() if hasattr(args, dest)}
    )
    if args.out:
        check_writable(args.out)  # before any training, not after
    options: dict[str, object] = {}
    given = [
        f"--{f.replace('_', '-')}" for f in _TRAINING_FLAGS if getattr(args, f) not in (None, False)
    ]
    if cls.needs_training(config, has_loader=bool(given)):
        model, inputs, train, val = _training_setup(args)
        options = dict(
            train_loader=train,
            val_loader=val,
            epochs=10 if args.epochs is None else args.epochs,
            lr=0.05 if args.lr is None else args.lr,
        )
        if args.checkpoint_dir:
            options.update(checkpoint_dir=args.checkpoint_dir, resume=args.resume)
        if args.distill:
            options["distill"] = True
    else:
        if given:
            raise ValueError(
                f"{', '.join(given)}: only for methods that train; {cls.name} does not"
            )
        model, inputs = _load(args.model)
    result = compress(model, config, example_inputs=inputs, prune_heads=args.prune_heads, **options)
    if args.out and is_main_process():  # under torchrun every rank has the model; one writes
        save_model(args.out, result.model, inputs, result.report.to_dict())
    barrier()
    print(result.report.to_json() if args.json else result.report.format())
    if args.out and not args.json:
        print(f"saved {args.out}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from graphprune.methods import get_method, method_names

    rows = []
    for name in method_names():
        cls = get_method(name)
        rows.append(
            {
                "name": name,
                "doc": _first_line(cls.__doc__),
                "trains": cls.trains,
                "can_train": cls.can_train,
                "options": [
                    {
                        "name": o.name,
                        "flag": f"--{o.name.replace('_', '-')}" if o.cli else None,
                        "type": o.type_name,
                        "default": o.default,
                        "doc": o.doc,
                    }
                    for o in cls.config_class.options()
                ],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for name, row in zip(method_names(), rows, strict=True):
        trains = "  (trains: takes the training flags --data, --epochs, --lr, ...)"
        can = "  (one-shot; trains, e.g. fine-tunes, when given --data, --epochs, --lr, ...)"
        note = trains if row["trains"] else can if row["can_train"] else ""
        print(f"{name}{note}\n  {row['doc']}")
        for o in get_method(name).config_class.options():
            usage = _flag_usage(o)
            print(f"    {usage:<34} default {o.default!s:<10} {o.doc}")
    return 0


def _flag_usage(o) -> str:
    """How an option is written on the command line, or its type when it has no flag."""
    spec = _flag_spec(o.hint) if o.cli else None
    flag = f"--{o.name.replace('_', '-')}"
    if spec is None:
        return f"{o.name}: {o.type_name} (API only)"
    if "choices" in spec:
        return f"{flag} {{{','.join(map(str, spec['choices']))}}}"  # type: ignore[call-overload]
    if "action" in spec:
        return f"{flag} / --no-{flag[2:]}"
    return f"{flag} {spec['type'].__name__.upper()}"  # type: ignore[union-attr]


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def cmd_export(args: argparse.Namespace) -> int:
    from graphprune.backends import export

    model, inputs = _load(args.model)
    path = export(model, inputs, args.out, backend=args.backend, fp16=args.fp16)
    print(f"wrote {path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from graphprune.io import convert_legacy

    print(f"wrote {convert_legacy(args.model, args.out, trust=args.trust)}")
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
        **({"method": args.method} if args.method else {}),
        flops_target=args.flops_target,
        epochs=args.epochs,
        out=Path(args.out),
        base_epochs=args.base_epochs,
    )
    return 0


def _prune_heads_flag(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--prune-heads",
        action="store_true",
        help="group attention channels by whole heads instead of head dims",
    )


def _backend_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--backend`` with the registry's names as choices and their descriptions as help."""
    from graphprune.backends import DEFAULT_BACKEND, backend_names, get_backend

    names = backend_names()
    about = "; ".join(f"{n}: {get_backend(n).description}" for n in names)
    parser.add_argument(
        "--backend", default=DEFAULT_BACKEND, choices=names, help=f"{what} ({about})"
    )


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``compress`` gets the flags of ``method`` (default: the default method)."""
    from graphprune.methods import DEFAULT_METHOD, get_method, method_names

    method = method or DEFAULT_METHOD
    p = argparse.ArgumentParser(prog="graphprune", description=__doc__, epilog=_PLUGINS_HELP)
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help=f"import MODULE first (it may register methods); also ${PLUGINS_ENV}",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="channel groups, MACs and params of a model")
    s.add_argument("model", help="built-in name (resnet56, ...), package.module:factory, or .pt")
    s.add_argument("--json", action="store_true")
    s.add_argument("--strict", action="store_true", help="fail on ops without a channel rule")
    _prune_heads_flag(s)
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser(
        "compress",
        help="prune a model to a MACs target",
        description="Prune a model with a method; its options (below) come from its config. "
        "`graphprune methods` lists every method's options.",
    )
    s.add_argument("model")
    s.add_argument(
        "--method", default=method, choices=method_names(), help="(default: %(default)s)"
    )
    if method in method_names():
        _add_config_flags(s, get_method(method))
    t = s.add_argument_group("training (methods that train only)")
    t.add_argument("--data", help="digits (default) or fashion-mnist; sets the model's input")
    t.add_argument("--epochs", type=int, help="default 10")
    t.add_argument("--lr", type=float, help="default 0.05")
    t.add_argument("--batch-size", type=int, help="default 64")
    t.add_argument("--checkpoint-dir")
    t.add_argument("--resume", action="store_true")
    t.add_argument(
        "--distill",
        action="store_true",
        help="distill from the dense model while compressing (KL on logits, T=4, weight 0.5)",
    )
    _prune_heads_flag(s)
    s.add_argument("--out", help="save the pruned model here (.pt)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_compress)

    s = sub.add_parser("methods", help="the registered methods, their options and defaults")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_methods)

    s = sub.add_parser("export", help="write a deployable artifact (ONNX file, TensorRT engine)")
    s.add_argument("model")
    s.add_argument("--out", required=True)
    _backend_flag(s, "write the artifact with this backend")
    s.add_argument("--fp16", action="store_true")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("convert", help="rewrite a graphprune 0.1 .pt (a pickle) as a safe file")
    s.add_argument("model", help="the old .pt file; unpickling it runs any code it holds")
    s.add_argument("--out", required=True)
    s.add_argument("--trust", action="store_true", help="required: you trust the file's origin")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("bench", help="MACs, params and latency of models side by side")
    s.add_argument("models", nargs="+", help="names, .pt, .onnx or .engine files")
    s.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    s.add_argument("--runs", type=int, default=30)
    s.add_argument("--threads", type=int, default=None)
    _backend_flag(s, "export models with this backend and time them with its runner")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("demo", help="the default job: a method on ResNet-56 / digits, exported")
    s.add_argument("--method", default=None, choices=method_names(), help="default: the demo's own")
    s.add_argument("--flops-target", type=float, default=0.3)
    s.add_argument("--epochs", type=int, default=12)
    s.add_argument("--base-epochs", type=int, default=15)
    s.add_argument("--out", default="runs/demo")
    s.set_defaults(fn=cmd_demo)
    return p


def _add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per config field: bools as --x/--no-x, Literals as choices, X | None as X."""
    group = parser.add_argument_group(f"{cls.name} options")
    for o in cls.config_class.options():
        spec = _flag_spec(o.hint) if o.cli else None
        if spec is None:
            continue
        try:
            group.add_argument(
                f"--{o.name.replace('_', '-')}",
                dest=_dest(o.name),
                default=o.default,
                **({"metavar": spec["type"].__name__.upper()} if "type" in spec else {}),
                help=f"{o.doc} (default: {o.default})",
                **spec,
            )
        except argparse.ArgumentError as exc:
            raise TypeError(
                f"{cls.name}: option {o.name!r} clashes with a compress flag ({exc}); rename it"
            ) from exc


def _flag_spec(hint) -> dict[str, object] | None:
    """argparse keywords for a config annotation, or None when it has no command-line form."""
    import typing
    from types import NoneType, UnionType

    parts = (
        typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, UnionType) else (hint,)
    )
    parts = tuple(a for a in parts if a is not NoneType)
    literals = [a for a in parts if typing.get_origin(a) is typing.Literal]
    if literals:
        return {"choices": [v for a in literals for v in typing.get_args(a)]}
    if parts == (bool,):
        return {"action": argparse.BooleanOptionalAction}
    simple = [a for a in parts if a in (int, float, str)]
    return {"type": simple[0]} if len(simple) == 1 else None


def _dest(name: str) -> str:
    return f"config_{name}"


PLUGINS_ENV = "GRAPHPRUNE_PLUGINS"
_PLUGINS_HELP = (
    f"Plugins: modules named by --plugin MODULE (repeatable) or ${PLUGINS_ENV} (comma-separated) "
    "are imported before anything else, so the methods they register with @register_method "
    "appear in `graphprune methods` and `compress --method`."
)


def _prescan(argv: list[str]) -> tuple[list[str], str | None]:
    """--plugin and --method before the real parse: both decide which flags exist."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--plugin", action="append", default=[])
    pre.add_argument("--method")
    try:
        known, _ = pre.parse_known_args(argv)
    except SystemExit:  # a malformed line: the real parser reports it
        return [], None
    env = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    return [*env, *known.plugin], known.method


def load_plugins(modules: list[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ImportError(
                f"cannot import plugin {name!r}: {type(exc).__name__}: {exc} (is its folder on "
                "PYTHONPATH?)"
            ) from exc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    plugins, method = _prescan(argv)
    try:
        load_plugins(plugins)
    except ImportError as exc:
        print(f"graphprune: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser(method).parse_args(argv)
    try:
        return args.fn(args)
    except (GraphpruneError, ValueError, OSError, ImportError) as exc:
        print(f"graphprune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
