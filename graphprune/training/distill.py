"""Knowledge distillation from the dense model while it is being pruned.

The dense model is the best teacher a pruned model can have: same data, same architecture,
already trained. Matching its softened outputs (Hinton et al. 2015) gives the narrowing network
a richer target than the labels alone, which matters most when the budget is short.

In ``compress(..., distill=DistillConfig())`` the teacher is a frozen copy of the dense traced
model. In a user's own loop::

    kd = DistillLoss(frozen_teacher(model), temperature=4.0, weight=0.5)
    for x, y in loader:
        loss = kd(rr.model(x), x, y)      # instead of F.cross_entropy(rr.model(x), y)
        ...
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True, kw_only=True)
class DistillConfig:
    """KL divergence on logits softened by ``temperature``, weighted ``weight`` against the task
    loss (``1 - weight``). T = 4 and an even mix are the common choice for CIFAR-size models."""

    temperature: float = 4.0
    weight: float = 0.5

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"distill temperature={self.temperature!r}: must be > 0 (e.g. 4.0)")
        if not (isinstance(self.weight, (int, float)) and 0.0 <= self.weight <= 1.0):
            raise ValueError(
                f"distill weight={self.weight!r}: must be in [0, 1], the share of the loss that "
                "is the KL term (0.5 mixes it evenly with the task loss)"
            )


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with no trainable parameters (the original is
    untouched, so pruning it cannot change the teacher)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class DistillLoss:
    """``(1 - w)·task(s, y) + w·T²·KL(softmax(t/T) ‖ softmax(s/T))``, batch mean.

    The T² keeps the KL gradient on the scale of the task loss's as T changes (Hinton et al.).
    The teacher runs under ``torch.no_grad()`` in eval mode on the same inputs. ``inputs`` is
    one tensor or a tuple of the model's positional inputs.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        temperature: float = 4.0,
        weight: float = 0.5,
        task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    ) -> None:
        cfg = DistillConfig(temperature=temperature, weight=weight)  # validates
        self.teacher = teacher.eval()
        self.temperature, self.weight = float(cfg.temperature), float(cfg.weight)
        self.task_loss = task_loss

    @staticmethod
    def from_config(teacher: nn.Module, config: DistillConfig, task_loss=None) -> DistillLoss:
        extra = {"task_loss": task_loss} if task_loss is not None else {}
        return DistillLoss(teacher, temperature=config.temperature, weight=config.weight, **extra)

    def __call__(
        self, student_logits: torch.Tensor, inputs: object, targets: torch.Tensor
    ) -> torch.Tensor:
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        with torch.no_grad():
            teacher_logits = self.teacher(*args)
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"distillation needs teacher and student logits of one shape; got teacher "
                f"{tuple(teacher_logits.shape)}, student {tuple(student_logits.shape)}"
            )
        t = self.temperature
        kl = F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        task = self.task_loss(student_logits, targets) if self.weight < 1.0 else 0.0
        return (1.0 - self.weight) * task + self.weight * t * t * kl

    def train_step(self, model: nn.Module, batch) -> torch.Tensor:
        """For ``fit(train_step=...)``: ``batch`` is (inputs, targets)."""
        x, y = batch[0], batch[1]
        return self(model(x), x, y)
