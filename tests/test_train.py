"""The built-in trainer: cosine lr and per-group momentum against hand arithmetic, hook order,
atomic checkpoints and resume, and its errors (empty loader, NaN loss, corrupt checkpoint)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from graphprune import io as gp_io
from graphprune.errors import TrainingError
from graphprune.training.loop import CHECKPOINT, cosine_lr, evaluate, fit

pytestmark = pytest.mark.usefixtures("one_thread")


class Scalar(nn.Module):
    """One parameter w; with train_step returning w the gradient is exactly 1 every step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.w * torch.ones_like(x)


def _w(model: nn.Module, batch) -> torch.Tensor:
    return model.w


def classifier() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def batches(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# --- schedule and optimizer ----------------------------------------------------------------------
def test_cosine_lr_values() -> None:
    assert cosine_lr(0.1, 0, 10) == pytest.approx(0.1)
    assert cosine_lr(0.1, 5, 10) == pytest.approx(0.05)
    assert cosine_lr(0.1, 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(0.1, 15, 10) == pytest.approx(0.0, abs=1e-12)  # clamped past the end


def test_fit_applies_cosine_lr_per_iteration() -> None:
    # dL/dw = 1, no momentum, no decay: w moves by -lr_t each step. 2 epochs x 2 batches,
    # lr_t = 0.5 (1 + cos(pi t / 4)) for t = 0..3: 1 + 0.8536 + 0.5 + 0.1464 = 2.5.
    model = Scalar()
    groups = [{"params": [model.w], "weight_decay": 0.0}]
    fit(
        model,
        batches(2),
        epochs=2,
        lr=1.0,
        momentum=0.0,
        param_groups=groups,
        train_step=_w,
        progress=False,
    )
    assert model.w.item() == pytest.approx(-2.5, abs=1e-6)


def test_each_param_group_keeps_its_momentum() -> None:
    # 2 steps, lr 1.0 then 0.5. Momentum 0: w = -1 - 0.5 = -1.5. Momentum 0.5: buffers 1 then
    # 0.5 * 1 + 1 = 1.5, so w = -1 - 0.5 * 1.5 = -1.75.
    a, b = Scalar(), Scalar()

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = a, b

    model = Both()
    groups = [
        {"params": [a.w], "momentum": 0.0, "weight_decay": 0.0},
        {"params": [b.w], "momentum": 0.5, "weight_decay": 0.0},
    ]
    fit(
        model,
        batches(2),
        epochs=1,
        lr=1.0,
        momentum=0.9,
        param_groups=groups,
        train_step=lambda m, batch: m.a.w + m.b.w,
        progress=False,
    )
    assert a.w.item() == pytest.approx(-1.5, abs=1e-6)
    assert b.w.item() == pytest.approx(-1.75, abs=1e-6)


def test_hooks_run_between_backward_and_step() -> None:
    model = Scalar()
    seen: list[tuple[str, float, float | None]] = []

    class Hooks:
        def after_backward(self) -> None:
            # the gradient is there and the optimizer has not stepped yet
            seen.append(("after_backward", model.w.item(), model.w.grad.item()))
            model.w.grad.mul_(3.0)  # the optimizer must use the hook's gradient

        def step(self) -> None:
            seen.append(("step", model.w.item(), None))

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            pass

    groups = [{"params": [model.w], "weight_decay": 0.0}]
    fit(
        model,
        batches(1),
        epochs=1,
        lr=1.0,
        momentum=0.0,
        param_groups=groups,
        hooks=Hooks(),
        train_step=_w,
        progress=False,
    )
    assert seen == [("after_backward", 0.0, 1.0), ("step", -3.0, None)]


def test_evaluate_counts_top1_and_restores_mode() -> None:
    # Identity "model": the logits are the inputs. Predictions 0, 1, 2, 1 vs labels 0, 1, 1, 1.
    x = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [0, 5.0, 0]])
    y = torch.tensor([0, 1, 1, 1])
    model = nn.Identity().train()
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    assert evaluate(model, loader) == pytest.approx(75.0)
    assert model.training


# --- checkpoints ---------------------------------------------------------------------------------
def test_checkpoints_are_atomic_and_loadable(tmp_path) -> None:
    torch.manual_seed(0)
    model = classifier()
    history = fit(model, batches(), epochs=2, lr=0.1, checkpoint_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["epoch"] == 2 and saved["hooks"] is None
    assert [r["epoch"] for r in saved["history"]] == [1, 2] == [r["epoch"] for r in history.epochs]
    want = _state(model)
    assert all(torch.equal(saved["model"][k], want[k]) for k in want)


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = classifier()
    first: dict = {}
    real_save = torch.save

    def save_then_tear(obj, f, *args, **kwargs):
        if not first:  # the epoch-1 checkpoint is written for real
            first["model"] = {k: v.clone() for k, v in obj["model"].items()}
            return real_save(obj, f, *args, **kwargs)
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoi")  # a torn write, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_then_tear)
    with pytest.raises(OSError):
        fit(model, batches(), epochs=3, lr=0.1, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]
    kept = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert kept["epoch"] == 1
    assert all(torch.equal(kept["model"][k], first["model"][k]) for k in first["model"])


def test_resume_equals_uninterrupted(tmp_path) -> None:
    data = TensorDataset(*batches(1, seed=3)[0])

    class Stop(Exception):
        pass

    def run(path, stop_at=None, resume=False):
        torch.manual_seed(0)
        model = classifier()
        loader = DataLoader(data, batch_size=2, shuffle=True)  # global RNG: checkpointed
        calls = 0

        def step(m, batch):
            nonlocal calls
            calls += 1
            if calls == stop_at:
                raise Stop
            return F.cross_entropy(m(batch[0]), batch[1])

        fit(
            model,
            loader,
            epochs=3,
            lr=0.2,
            train_step=step,
            checkpoint_dir=path,
            resume=resume,
            progress=False,
        )
        return _state(model)

    want = run(tmp_path / "a")
    with pytest.raises(Stop):
        run(tmp_path / "b", stop_at=7)  # epoch 2 of 3 (4 batches each)
    got = run(tmp_path / "b", resume=True)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path) -> None:
    torch.manual_seed(0)
    a = classifier()
    b = classifier()
    b.load_state_dict(a.state_dict())
    torch.manual_seed(1)
    fit(a, batches(), epochs=1, lr=0.1, progress=False)
    torch.manual_seed(1)
    fit(b, batches(), epochs=1, lr=0.1, checkpoint_dir=tmp_path, resume=True, progress=False)
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loader", [[], DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0).long()))]
)
def test_empty_loader(loader) -> None:
    with pytest.raises(TrainingError, match="empty"):
        fit(classifier(), loader, epochs=1, lr=0.1, progress=False)


def test_nan_loss_stops_and_the_last_good_checkpoint_loads(tmp_path) -> None:
    torch.manual_seed(0)
    model = classifier()
    calls = 0
    after_epoch_1: dict[str, torch.Tensor] = {}

    def step(m, batch):
        nonlocal calls
        calls += 1
        if calls == 5:  # first step of epoch 2: the state is what epoch 1 saved
            after_epoch_1.update(_state(m))
        if calls == 6:
            return torch.tensor(float("nan"), requires_grad=True)
        return F.cross_entropy(m(batch[0]), batch[1])

    with pytest.raises(TrainingError) as err:
        fit(
            model,
            batches(),
            epochs=3,
            lr=0.1,
            train_step=step,
            checkpoint_dir=tmp_path,
            progress=False,
        )
    msg = str(err.value)
    assert "nan" in msg and "epoch 2" in msg and "iteration 2" in msg
    assert str(tmp_path / CHECKPOINT) in msg
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["epoch"] == 1
    fresh = classifier()
    fresh.load_state_dict(saved["model"])
    got = _state(fresh)
    assert all(torch.equal(got[k], after_epoch_1[k]) for k in got)
    # and training resumes from it (with the run's own settings)
    fit(fresh, batches(), epochs=3, lr=0.1, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["epoch"] == 3


def test_huge_learning_rate_is_a_training_error(tmp_path) -> None:
    torch.manual_seed(0)
    with pytest.raises(TrainingError, match="learning rate"):
        fit(classifier(), batches(), epochs=5, lr=1e10, checkpoint_dir=tmp_path, progress=False)


def test_a_checkpoint_never_holds_non_finite_weights(tmp_path) -> None:
    torch.manual_seed(0)
    model = classifier()
    calls = 0

    def step(m, batch):
        nonlocal calls
        calls += 1
        loss = F.cross_entropy(m(batch[0]), batch[1])
        if calls == 4:  # last step of epoch 1: finite loss, infinite gradient (sqrt at 0)
            w = m[1].weight
            loss = loss + torch.sqrt(((w - w.detach()) ** 2).sum())
        return loss

    with pytest.raises(TrainingError):
        fit(
            model,
            batches(),
            epochs=3,
            lr=0.1,
            train_step=step,
            checkpoint_dir=tmp_path,
            progress=False,
        )
    if (tmp_path / CHECKPOINT).exists():
        saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
        assert all(torch.isfinite(v).all() for v in saved["model"].values())


@pytest.mark.parametrize("content", [b"not a checkpoint", b""])
def test_corrupt_checkpoint_on_resume_names_the_file(tmp_path, content: bytes) -> None:
    path = tmp_path / CHECKPOINT
    path.write_bytes(content)
    with pytest.raises(TrainingError) as err:
        fit(
            classifier(),
            batches(),
            epochs=1,
            lr=0.1,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )
    assert str(path) in str(err.value)


def test_checkpoint_of_another_model_on_resume_names_the_file(tmp_path) -> None:
    other = nn.Sequential(nn.Flatten(), nn.Linear(4, 5))
    fit(other, batches(), epochs=1, lr=0.1, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(TrainingError) as err:
        fit(
            classifier(),
            batches(),
            epochs=2,
            lr=0.1,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )
    assert str(tmp_path / CHECKPOINT) in str(err.value)


def test_atomic_save_leaves_no_temporary_file(tmp_path) -> None:
    target = tmp_path / "sub" / "x.pt"
    gp_io.atomic_save({"a": torch.arange(3)}, target)
    gp_io.atomic_save({"a": torch.arange(4)}, target)  # overwrite
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.pt"]
    assert torch.equal(torch.load(target)["a"], torch.arange(4))
