"""A small built-in trainer: SGD, cosine lr per iteration, tqdm progress, periodic eval,
atomic per-epoch checkpoints with resume, and a clear stop on a NaN loss.

Pruning methods plug in through ``hooks`` (any object with ``after_backward()``, ``step()``,
``state_dict()`` and ``load_state_dict()``), the same calls a user's own loop makes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.errors import TrainingError
from graphprune.frontend.modes import eval_mode
from graphprune.io import atomic_save, safe_load

CHECKPOINT = "last.pt"


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
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
) -> History:
    """Train in place. ``train_step(model, batch) -> loss`` replaces ``loss_fn`` for models
    that are not classifiers. Each param group may carry its own ``momentum``. The lr follows
    a cosine from ``lr`` to 0 per iteration, after ``warmup_epochs`` of linear warm-up (deep
    ResNets trained from scratch at lr 0.1 need it)."""
    iters_per_epoch = iterations_per_epoch(train_loader)
    if epochs < 1:
        raise ValueError(f"epochs={epochs}: train for at least one epoch")
    groups = param_groups if param_groups is not None else default_param_groups(model)
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    total = epochs * iters_per_epoch
    warmup = round(warmup_epochs * iters_per_epoch)
    history, start_epoch = History(), 0
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if resume and ckpt is not None and ckpt.exists():
        start_epoch = _load_checkpoint(ckpt, model, opt, hooks, history)
    step_fn = train_step or (lambda m, batch: loss_fn(m(batch[0]), batch[1]))
    t0 = time.perf_counter()
    bar = _progress(total, start_epoch * iters_per_epoch, desc, progress)
    for epoch in range(start_epoch, epochs):
        model.train()
        running, seen = 0.0, 0
        for i, batch in enumerate(train_loader):
            it = epoch * iters_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = cosine_lr(g["base_lr"], it, total, warmup)
            loss = step_fn(model, batch)
            if not torch.isfinite(loss):
                where = (
                    f"last good checkpoint: {ckpt}" if ckpt and ckpt.exists() else "no checkpoint"
                )
                raise TrainingError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, iteration {i + 1} ({where}); "
                    "lower the learning rate or check the data"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hooks is not None:
                hooks.after_backward()
            opt.step()
            if hooks is not None:
                hooks.step()
            running, seen = running + loss.item(), seen + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{running / seen:.3f}")
        record = {"epoch": epoch + 1, "loss": running / seen}
        if val_loader is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            record["val_acc"] = evaluate(model, val_loader)
        history.epochs.append(record)
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            where = f"last good checkpoint: {ckpt}" if ckpt and ckpt.exists() else "no checkpoint"
            raise TrainingError(
                f"parameters {bad[:3]} became non-finite in epoch {epoch + 1} ({where}); "
                "lower the learning rate or check the data"
            )
        if ckpt is not None:
            atomic_save(
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "hooks": hooks.state_dict() if hooks is not None else None,
                    "history": history.epochs,
                    "rng": torch.get_rng_state(),
                },
                ckpt,
            )
    if bar is not None:
        bar.close()
    history.seconds = time.perf_counter() - t0
    return history


def _load_checkpoint(path: Path, model, opt, hooks, history: History) -> int:
    try:
        state = safe_load(path, what="checkpoint")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if hooks is not None and state.get("hooks") is not None:
            hooks.load_state_dict(state["hooks"])
        history.epochs = list(state["history"])
        torch.set_rng_state(state["rng"])
        return int(state["epoch"])
    except Exception as exc:
        raise TrainingError(
            f"cannot resume from {path}: {type(exc).__name__}: {exc}. The file is corrupt or "
            "from another model; delete it or run without resume"
        ) from exc


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
