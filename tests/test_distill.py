"""Distillation from the dense model: the loss against hand arithmetic, a frozen teacher, and
use as a train_step in the built-in loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphprune.training.distill import DistillConfig, DistillLoss, frozen_teacher
from graphprune.training.loop import fit


class Fixed(nn.Module):
    """Returns stored logits whatever the input (a teacher with known outputs)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def softmax(v: list[float]) -> list[float]:
    e = [math.exp(a) for a in v]
    return [a / sum(e) for a in e]


def test_loss_matches_hand_arithmetic() -> None:
    t_logits, s_logits, y, T, w = [2.0, 0.0, -2.0], [0.0, 1.0, 0.0], 1, 2.0, 0.3
    pt = softmax([a / T for a in t_logits])
    ps = softmax([a / T for a in s_logits])
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
    ce = -math.log(softmax(s_logits)[y])
    want = (1 - w) * ce + w * T * T * kl
    kd = DistillLoss(Fixed(torch.tensor([t_logits])), temperature=T, weight=w)
    got = kd(torch.tensor([s_logits]), torch.zeros(1, 1), torch.tensor([y]))
    assert got.item() == pytest.approx(want, rel=1e-6)
    # weight 0 is the task loss alone; a student equal to its teacher has zero KL
    plain = DistillLoss(Fixed(torch.tensor([t_logits])), weight=0.0)
    assert plain(torch.tensor([s_logits]), torch.zeros(1, 1), torch.tensor([y])).item() == (
        pytest.approx(ce, rel=1e-6)
    )
    same = DistillLoss(Fixed(torch.tensor([t_logits])), weight=1.0)
    assert same(torch.tensor([t_logits]), torch.zeros(1, 1), torch.tensor([0])).item() == (
        pytest.approx(0.0, abs=1e-7)
    )


def test_teacher_is_a_frozen_copy_and_the_student_learns_toward_it() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    teacher = frozen_teacher(dense)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in dense.parameters()), "the original must be untouched"
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(64, 1, 2, 2)
    y = torch.randint(0, 3, (64,))
    kd = DistillLoss(teacher, temperature=2.0, weight=1.0)

    def gap() -> float:
        with torch.no_grad():
            return F.mse_loss(student(x).softmax(1), teacher(x).softmax(1)).item()

    start = gap()
    fit(student, [(x, y)] * 20, epochs=3, lr=0.5, train_step=kd.train_step, progress=False)
    assert gap() < 0.2 * start
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_bad_settings_and_shapes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0.0)
    with pytest.raises(ValueError, match="weight"):
        DistillConfig(weight=1.5)
    kd = DistillLoss(Fixed(torch.zeros(1, 3)))
    with pytest.raises(ValueError, match="same shape|one shape"):
        kd(torch.zeros(2, 5), torch.zeros(2, 1), torch.tensor([0, 1]))
