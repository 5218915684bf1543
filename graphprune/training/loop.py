"""A small built-in trainer: SGD, cosine lr per iteration, tqdm progress, periodic eval,
atomic checkpoints (per epoch and every N iterations) with an exact resume, torch.distributed,
and a clear stop on a NaN loss.

Pruning methods plug in through ``hooks`` (any object with ``after_backward()``, ``step()``,
``state_dict()`` and ``load_state_dict()``), the same calls a user's own loop makes.

Invariant: a run stopped at any point (even by SIGKILL) and resumed from its last checkpoint
ends bit-identical to the run never stopped: same weights, method state, data order and RNG
draws (see checkpoint.py for what is stored).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.errors import TrainingError
from graphprune.frontend.modes import eval_mode
from graphprune.training import distributed as D
from graphprune.training.checkpoint import (
    CHECKPOINT,
    capture_rng,
    check_resume_config,
    load_checkpoint,
    normalize_config,
    restore_rng,
    save_checkpoint,
)

__all__ = [
    "CHECKPOINT",
    "History",
    "cosine_lr",
    "default_param_groups",
    "evaluate",
    "fit",
    "iterations_per_epoch",
]


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def default_param_groups(
    model: nn.Module,
    weight_decay: float = 1e-4,
    *,
    lr: float | None = None,
    momentum: float | None = None,
    extra: Sequence[dict] = (),
) -> list[dict]:
    """Weight decay on conv/linear weights only; norms and biases get none.

    ``extra`` groups (e.g. a method's compactors) keep their own settings and come last; their
    parameters are left out of the two default groups. ``lr`` and ``momentum``, when given, are
    set on every group that does not set its own (an optimizer's defaults fill in the rest).
    """
    own = {id(p) for g in extra for p in g["params"]}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in own:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *({**g, "params": list(g["params"])} for g in extra),
    ]
    for key, value in (("lr", lr), ("momentum", momentum)):
        if value is not None:
            for g in groups:
                g.setdefault(key, value)
    return groups


def iterations_per_epoch(train_loader: Iterable) -> int:
    """``len(train_loader)``; an empty loader is a TrainingError, not a silent no-op."""
    n = len(train_loader)  # type: ignore[arg-type]
    if n == 0:
        raise TrainingError("train_loader is empty: it yields no batch to train on")
    return n


def cosine_lr(base: float, iteration: int, total: int, warmup: int = 0) -> float:
    """Cosine decay from ``base`` to 0 over ``total`` iterations, after a linear warm-up."""
    if iteration < warmup:
        return base * (iteration + 1) / warmup
    return 0.5 * base * (1.0 + math.cos(math.pi * min(iteration, total) / max(total, 1)))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy in percent."""
    correct = total = 0
    with eval_mode(model):
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / max(total, 1)


@dataclass
class _Position:
    """Where training stands: ``batch`` batches of ``epoch`` done, and that epoch's loss sums."""

    epoch: int = 0
    batch: int = 0
    running: float = 0.0
    seen: int = 0
    rng_epoch_start: list | None = None  # per rank


def fit(
    model: nn.Module,
    train_loader: Iterable,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    param_groups: list[dict] | None = None,
    hooks: object | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    train_step: Callable[[nn.Module, object], torch.Tensor] | None = None,
    val_loader: Iterable | None = None,
    eval_every: int = 1,
    warmup_epochs: float = 0.0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool | str = False,
    run_config: Mapping[str, object] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> History:
    """Train ``model`` in place.

    ``train_step(model, batch) -> loss`` replaces ``loss_fn`` for models that are not
    classifiers. Each param group may carry its own ``momentum``. The lr follows a cosine from
    ``lr`` to 0 per iteration, after ``warmup_epochs`` of linear warm-up.

    Checkpoints go to ``checkpoint_dir/last.pt`` after every epoch and, with
    ``checkpoint_every=N``, every N iterations. ``resume=True`` continues from that file when it
    exists, after checking that it was written with the same ``run_config`` (what the caller
    says defines the run: method, flops_target, ...) and the same loop settings; a difference
    is an error listing each key's old and new value, unless ``resume="force"``.

    Under torch.distributed (torchrun), the loader is sharded with a DistributedSampler, the
    model wrapped in DistributedDataParallel, rank 0's buffers (masks) broadcast after every
    method step, and checkpoints written by rank 0 only (see distributed.py).
    """
    if resume not in (True, False, "force"):
        raise ValueError(f"resume={resume!r}: use False, True or 'force'")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: train for a whole number of epochs, at least one")
    if checkpoint_every is not None and (
        not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every={checkpoint_every!r}: a number of iterations >= 1")
    if D.active():
        train_loader = D.shard_loader(train_loader)
    iters_per_epoch = iterations_per_epoch(train_loader)
    config = {
        "fit": {
            "epochs": epochs,
            "lr": lr,
            "momentum": momentum,
            "warmup_epochs": warmup_epochs,
            "iters_per_epoch": iters_per_epoch,
            "world_size": D.world_size(),
        },
        "run": normalize_config(run_config, what="run_config"),
    }
    groups = param_groups if param_groups is not None else default_param_groups(model)
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    total = epochs * iters_per_epoch
    warmup = round(warmup_epochs * iters_per_epoch)
    history, pos = History(), _Position()
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    pending = None  # the saved RNG states while a resumed epoch is being rebuilt
    if ckpt is not None and resume:
        pending = _resume(ckpt, config, resume == "force", model, opt, hooks, history, pos)
    net = D.wrap(model) if D.active() else model
    step_fn = train_step or (lambda m, batch: loss_fn(m(batch[0]), batch[1]))

    def save() -> None:
        rng = {"now": D.gather(capture_rng(train_loader)), "epoch_start": pos.rng_epoch_start}
        state = {
            "config": config,
            "epoch": pos.epoch,
            "batch": pos.batch,
            "running": pos.running,
            "seen": pos.seen,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "hooks": hooks.state_dict() if hooks is not None else None,
            "history": history.epochs,
            "rng": rng,
        }
        if D.is_main_process():
            save_checkpoint(ckpt, state)  # type: ignore[arg-type]
        D.barrier()

    t0 = time.perf_counter()
    bar = _progress(total, pos.epoch * iters_per_epoch + pos.batch, desc, progress)
    while pos.epoch < epochs:
        epoch = pos.epoch
        model.train()
        D.set_epoch(train_loader, epoch)
        mid_epoch = pending is not None and pos.batch > 0
        if mid_epoch:  # replay this epoch's data order from its start, then skip what was seen
            pos.rng_epoch_start = pending["epoch_start"]
            restore_rng(pending["epoch_start"][D.rank()], train_loader)
        else:
            if pending is not None:
                restore_rng(pending["now"][D.rank()], train_loader)
            pos.rng_epoch_start = D.gather(capture_rng(train_loader)) if ckpt else None
        batches = iter(train_loader)
        if mid_epoch:
            for _ in range(pos.batch):
                next(batches)  # loads and drops them: the price of an identical data order
            restore_rng(pending["now"][D.rank()], train_loader)
        pending = None
        for i in range(pos.batch, iters_per_epoch):
            batch = next(batches)
            it = epoch * iters_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = cosine_lr(g["base_lr"], it, total, warmup)
            loss = step_fn(net, batch)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, iteration {i + 1} "
                    f"({_where(ckpt)}); lower the learning rate or check the data"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hooks is not None:
                hooks.after_backward()
            opt.step()
            if hooks is not None:
                hooks.step()
            D.sync_buffers(model)  # rank 0's masks and norm statistics on every rank
            pos.batch, pos.running, pos.seen = i + 1, pos.running + loss.item(), pos.seen + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{pos.running / pos.seen:.3f}")
            last_of_epoch = i + 1 == iters_per_epoch
            if ckpt and checkpoint_every and (it + 1) % checkpoint_every == 0 and not last_of_epoch:
                _check_finite(model, epoch, ckpt)
                save()
        record = {"epoch": epoch + 1, "loss": pos.running / max(pos.seen, 1)}
        if val_loader is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            record["val_acc"] = evaluate(model, val_loader)
        history.epochs.append(record)
        _check_finite(model, epoch, ckpt)
        pos.epoch, pos.batch, pos.running, pos.seen = epoch + 1, 0, 0.0, 0
        if ckpt is not None:
            save()
    if bar is not None:
        bar.close()
    history.seconds = time.perf_counter() - t0
    return history


def _resume(
    path: Path, config: dict, force: bool, model, opt, hooks, history: History, pos: _Position
) -> dict | None:
    """Load ``path`` into the run if it exists; returns its RNG states, or None when there is
    nothing to resume."""
    # Rank 0 decides whether there is a checkpoint; every rank then reads the same file
    # (the checkpoint folder must be shared, as it is for torchrun on one machine).
    exists = D.from_main(path.exists() if D.is_main_process() else None)
    if not exists:
        return None
    state = load_checkpoint(path)
    check_resume_config(path, state.get("config", {}), config, force=force)
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if hooks is not None and state.get("hooks") is not None:
            hooks.load_state_dict(state["hooks"])
        history.epochs = list(state["history"])
        pos.epoch, pos.batch = int(state["epoch"]), int(state["batch"])
        pos.running, pos.seen = float(state["running"]), int(state["seen"])
        rng = state["rng"]
        if len(rng["now"]) != D.world_size():
            raise ValueError(f"it holds RNG states of {len(rng['now'])} ranks")
    except Exception as exc:
        raise TrainingError(
            f"cannot resume from {path}: {type(exc).__name__}: {exc}. The checkpoint is from "
            "another model or damaged; delete it or use another checkpoint_dir"
        ) from exc
    return rng


def _check_finite(model: nn.Module, epoch: int, ckpt: Path | None) -> None:
    """Never checkpoint (or continue with) non-finite weights."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(
            f"parameters {bad[:3]} became non-finite in epoch {epoch + 1} ({_where(ckpt)}); "
            "lower the learning rate or check the data"
        )


def _where(ckpt: Path | None) -> str:
    return f"last good checkpoint: {ckpt}" if ckpt and ckpt.exists() else "no checkpoint"


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled or not D.is_main_process():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
