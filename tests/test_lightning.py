"""GraphpruneCallback: ResRep trained by a Lightning Trainer ends where the same ResRep trained
by a plain loop ends (the hooks run at the same points), and its state rides in checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graphprune
from graphprune.errors import TrainingError
from graphprune.methods.resrep import ResRep, ResRepSchedule

pl = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is not installed")
from graphprune.training.lightning import GraphpruneCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = ResRepSchedule(
    warmup_iters=2,
    mask_interval=2,
    channels_per_update=4,
    penalty=1e-4,
    masked_penalty=1e-2,
    compactor_momentum=0.9,
    mask_until=10,
)
X = (torch.randn(1, 3, 8, 8),)


def _resrep() -> ResRep:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    return ResRep(
        graphprune.trace(model, X), flops_target=0.5, total_iters=16, schedule=SCHEDULE, round_to=1
    )


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    )
    return DataLoader(data, batch_size=8)


class Module(pl.LightningModule):
    def __init__(self, rr: ResRep) -> None:
        super().__init__()
        self.rr = rr
        self.net = rr.model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.rr.param_groups(lr=0.05), lr=0.05)


def _trainer(**kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**options, **kwargs})


def test_lightning_matches_the_plain_loop() -> None:
    plain = _resrep()
    opt = torch.optim.SGD(plain.param_groups(lr=0.05), lr=0.05)
    for _ in range(4):
        for x, y in _loader():
            loss = F.cross_entropy(plain.model(x), y)
            opt.zero_grad()
            loss.backward()
            plain.after_backward()
            opt.step()
            plain.step()
    plain_masks = [c.mask.clone() for c in plain.compactors]
    plain_out = plain.finalize()(X[0])

    rr = _resrep()
    callback = GraphpruneCallback(rr)
    _trainer(callbacks=[callback]).fit(Module(rr), _loader())
    assert rr.iteration == plain.iteration == 16
    assert any((m == 0).any() for m in plain_masks)
    assert all(torch.equal(c.mask, m) for c, m in zip(rr.compactors, plain_masks, strict=True))
    assert callback.pruned is not None
    with torch.no_grad():
        torch.testing.assert_close(callback.pruned(X[0]), plain_out, atol=1e-6, rtol=1e-6)


def test_state_rides_in_lightning_checkpoints() -> None:
    rr = _resrep()
    rr.iteration = 7
    callback = GraphpruneCallback(rr)
    other = _resrep()
    GraphpruneCallback(other).load_state_dict(callback.state_dict())
    assert other.iteration == 7


def test_gradient_accumulation_is_refused() -> None:
    rr = _resrep()
    with pytest.raises(TrainingError, match="accumulate_grad_batches=2"):
        _trainer(callbacks=[GraphpruneCallback(rr)], accumulate_grad_batches=2).fit(
            Module(rr), _loader()
        )
