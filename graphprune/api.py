"""The one-call API: ``compress(model, method=..., ...)`` and friends.

Entry points copy the user's model (trace() does), so it is never mutated.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import fx, nn

from graphprune.analysis import build_channel_graph, prune_whole_heads
from graphprune.errors import PlanError
from graphprune.frontend.fallback import eval_mode_only, frozen_submodules, trace_with_fallback
from graphprune.frontend.trace import FUNCTIONAL_LAYERS, example_inputs_of
from graphprune.methods import DEFAULT_METHOD, Method, MethodConfig, get_method, method_names
from graphprune.methods.base import make_config
from graphprune.planning.macs import count_macs
from graphprune.planning.target import check_reached
from graphprune.report import CompressionReport, build_report
from graphprune.training import distributed
from graphprune.training.distill import DistillConfig, DistillLoss, frozen_teacher
from graphprune.training.loop import evaluate, fit, iterations_per_epoch
from graphprune.validation import check_compress_options


@dataclass(frozen=True, slots=True)
class CompressionResult:
    """The pruned model (an ordinary nn.Module) and what was done to get it."""

    model: fx.GraphModule
    report: CompressionReport


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingOptions:
    """How compress() trains a method that ``needs_training`` (all but ``val_loader`` apply
    only then: a method that ``trains``, or one that ``can_train`` given a ``train_loader``).

    ``val_loader`` measures top-1 accuracy right before and after the finalize passes (and per
    epoch while training). ``train_step(model, batch) -> loss`` replaces ``loss_fn`` for models
    that are not classifiers. ``checkpoint_dir``: atomic checkpoints per epoch and, with
    ``checkpoint_every=N``, every N iterations; ``resume=True`` continues from them after
    checking that the method's config and the training settings are the same (``"force"``:
    continue anyway). See graphprune.training.loop.fit. ``distill`` (True or a DistillConfig)
    adds a KL term toward the dense model's logits: the teacher is a frozen copy of the traced
    model taken before the method changes it."""

    train_loader: Iterable | None = None
    val_loader: Iterable | None = None
    epochs: int | None = None
    lr: float = 0.05
    loss_fn: Callable | None = None
    train_step: Callable | None = None
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int | None = None
    resume: bool | str = False
    progress: bool = True
    distill: DistillConfig | bool | None = None


TRAINING_OPTIONS = tuple(f.name for f in fields(TrainingOptions))


def compress(
    model: nn.Module,
    method: str | MethodConfig = DEFAULT_METHOD,
    *,
    example_inputs: Sequence[torch.Tensor],
    leaf_modules: Iterable[type[nn.Module]] = (),
    strict: bool = False,
    prune_heads: bool = False,
    verify: bool = False,
    **options: object,
) -> CompressionResult:
    """Prune ``model`` with ``method`` (a registered name, or a config instance such as
    ``ResRepConfig(flops_target=0.3)``) until its MACs are ``flops_target`` x the dense MACs.

    ``options`` are the method's config fields (every method: ``flops_target``, remaining MACs
    / dense MACs as in the papers, and ``round_to``; ``graphprune methods`` lists the rest)
    and the TrainingOptions. The stages: trace, analyze, build the method (its prepare passes
    run), train through its hooks if it trains, run its finalize passes, report.

    Attention prunes head dims (position j of every head); ``prune_heads=True`` prunes whole
    heads instead (``graphprune.analysis.prune_whole_heads``).
    """
    options = check_compress_options(options)  # before any tracing or training
    cls = get_method(method)
    config, training = _split_options(cls, method, options)
    trains = cls.needs_training(config, has_loader=training.train_loader is not None)
    if trains and distributed.active():  # the schedule must count this rank's iterations
        training = replace(training, train_loader=distributed.shard_loader(training.train_loader))
    iters = iterations_per_epoch(training.train_loader) if trains else None
    start = time.perf_counter()
    gm = trace_with_fallback(model, example_inputs, leaf_modules=leaf_modules)
    prune_whole_heads(gm, prune_heads)
    frozen = frozen_submodules(gm)  # what fx could not trace, kept whole
    graph = build_channel_graph(gm, strict=strict)
    groups = graph.groups
    dense = count_macs(gm, example_inputs_of(gm))
    if not any(g.prunable for g in groups):
        reasons = "; ".join(sorted({r for g in groups for r in g.reasons}))
        where = f"; frozen submodules: {', '.join(frozen)}" if frozen else ""
        raise PlanError(f"{type(model).__name__} has no prunable channel group ({reasons}{where})")
    teacher = frozen_teacher(gm) if trains and training.distill else None
    m = cls(
        gm,
        config,
        total_iters=None if iters is None else iters * training.epochs,  # type: ignore[operator]
        iters_per_epoch=iters,
        lr=training.lr if trains else None,
        graph=graph,
        layer_macs=dense.per_layer,
        verify=verify,
    )
    train_seconds = _train(m, config, training, teacher) if trains else None
    val = training.val_loader
    accuracy_before = evaluate(m.model, val) if val is not None else None
    pruned = m.finalize(verify=verify)
    pruned.eval()
    after = count_macs(pruned, example_inputs_of(gm))
    report = build_report(
        method=cls.name,
        config=config.to_dict(),
        before=dense,
        after=after,
        groups=groups,
        widths_after=m.widths,
        seconds=time.perf_counter() - start,
        train_seconds=train_seconds,
        accuracy_before_finalize=accuracy_before,
        accuracy_after_finalize=evaluate(pruned, val) if val is not None else None,
        stats=m.stats(),
        frozen_submodules=frozen,
        eval_mode_only=eval_mode_only(gm),
        functional_layers=gm.meta.get(FUNCTIONAL_LAYERS, {}),
    )
    # Never a silent shortfall: PlanError, or after training a TargetMissedError that carries
    # the trained model and this report (see check_reached).
    check_reached(
        config.flops_target,
        dense,
        after,
        graph,
        frozen,
        trained=trains,
        result=CompressionResult(pruned, report),
    )
    return CompressionResult(pruned, report)


def _split_options(
    cls: type[Method], method: str | MethodConfig, options: dict[str, object]
) -> tuple[MethodConfig, TrainingOptions]:
    """The method's config and the training options; anything else is a TypeError naming
    every valid option, and training options for a method that does not train are too."""
    config_names = [o.name for o in cls.config_class.options()]
    unknown = sorted(set(options) - set(config_names) - set(TRAINING_OPTIONS))
    if unknown:
        raise TypeError(
            f"compress() got unknown option(s) {', '.join(unknown)} for method {cls.name!r}; "
            f"its config takes {', '.join(config_names)}; training takes "
            f"{', '.join(TRAINING_OPTIONS)}"
        )
    training = {k: v for k, v in options.items() if k in TRAINING_OPTIONS}
    given = sorted(set(training) - {"val_loader"})
    if not (cls.trains or cls.can_train) and given:
        trainers = [n for n in method_names() if get_method(n).trains or get_method(n).can_train]
        raise TypeError(
            f"{cls.name} does not train, so {', '.join(given)} "
            f"do not apply (methods that train: {', '.join(trainers) or 'none'})"
        )
    base = method if isinstance(method, MethodConfig) else None
    config = make_config(cls, base, {k: v for k, v in options.items() if k in config_names})
    t = TrainingOptions(**training)  # type: ignore[arg-type]
    if t.distill and t.train_step is not None:
        raise TypeError(
            "distill= wraps the classification loss and cannot see inside a custom train_step; "
            "use graphprune.training.distill.DistillLoss in your step instead"
        )
    if cls.needs_training(config, has_loader=t.train_loader is not None) and (
        t.train_loader is None or t.epochs is None
    ):
        raise TypeError(f"{cls.name} trains: compress() needs train_loader= and epochs=")
    given = [k for k in given if k != "progress"]  # harmless when it does not train
    if given and t.train_loader is None:  # a method that only can train, given no data
        raise TypeError(
            f"{cls.name} trains only when given train_loader= (then with epochs=); "
            f"without it {', '.join(given)} do not apply"
        )
    return config, t


def _train(m: Method, config: MethodConfig, t: TrainingOptions, teacher: nn.Module | None) -> float:
    """Train ``m.model`` in place through the method's hooks; returns the seconds it took.
    The method's name and config (and the distillation setting) define the run: a resume with
    any other value is refused."""
    run = {"method": m.name, **config.to_dict(), "distill": t.distill}
    run_config = json.loads(json.dumps(run, default=str))
    extra = {"loss_fn": t.loss_fn} if t.loss_fn is not None else {}
    step = t.train_step
    if teacher is not None:
        kd = t.distill if isinstance(t.distill, DistillConfig) else DistillConfig()
        step = DistillLoss.from_config(teacher, kd, task_loss=t.loss_fn).train_step
    history = fit(
        m.model,
        t.train_loader,  # type: ignore[arg-type]
        epochs=t.epochs,  # type: ignore[arg-type]
        lr=t.lr,
        param_groups=m.param_groups(t.lr),
        hooks=m,
        train_step=step,
        val_loader=t.val_loader,
        checkpoint_dir=t.checkpoint_dir,
        checkpoint_every=t.checkpoint_every,
        resume=t.resume,
        run_config=run_config,
        progress=t.progress,
        desc=m.name,
        **extra,
    )
    return history.seconds


def export(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path,
    *,
    backend: str | None = None,
    fp16: bool = False,
    **options: object,
):
    """Write a deployable artifact with a registered backend (``graphprune.backends.
    backend_names()``; default ONNX, cleaned with onnx-graphsurgeon) and return its path.
    See graphprune.backends.export; imported lazily so ``import graphprune`` stays light."""
    from graphprune.backends import DEFAULT_BACKEND
    from graphprune.backends import export as _export

    chosen = backend or DEFAULT_BACKEND
    return _export(model, example_inputs, path, backend=chosen, fp16=fp16, **options)
