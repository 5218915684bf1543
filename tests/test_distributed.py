"""The built-in loop and the own-loop route under torch.distributed: 2 gloo processes on
loopback train ResRep; masks and weights are identical on both ranks and equal (within float
tolerance) to one process with the same global batch; only rank 0 writes checkpoints."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import graphprune
from graphprune.errors import TrainingError
from graphprune.methods.resrep import ResRep, ResRepSchedule
from graphprune.training import distributed as D
from graphprune.training import loop
from graphprune.training.loop import fit

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD, GLOBAL_BATCH, EPOCHS = 2, 8, 5
SCHEDULE = ResRepSchedule(
    warmup_iters=2,
    mask_interval=2,
    channels_per_update=4,
    penalty=1e-4,
    masked_penalty=1e-2,
    compactor_momentum=0.9,
    mask_until=12,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    )


X = (torch.randn(1, 3, 8, 8),)


def _result(rr: ResRep) -> dict:
    masks = {str(i): c.mask.clone() for i, c in enumerate(rr.compactors)}
    state = {k: v.clone() for k, v in rr.model.state_dict().items()}
    pruned = rr.finalize()
    probe = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = pruned(probe)
    return {"masks": masks, "state": state, "out": out}


def run_builtin(ckpt: Path | None, batch: int) -> dict:
    """ResRep through fit(): under torch.distributed fit shards this loader itself."""
    rr = ResRep(
        graphprune.trace(_model(), X),
        flops_target=0.5,
        total_iters=20,
        schedule=SCHEDULE,
        round_to=1,
    )
    # In order: rank r's shard is samples r, r+2, ..., so each global batch is the same 8
    # samples one process with batch 8 sees.
    loader = DataLoader(_data(), batch_size=batch, shuffle=False)
    fit(
        rr.model,
        loader,
        epochs=EPOCHS,
        lr=0.05,
        param_groups=rr.param_groups(0.05),
        hooks=rr,
        checkpoint_dir=ckpt,
        progress=False,
    )
    return _result(rr)


def run_own_loop(batch: int) -> dict:
    """The user's own loop: their DistributedSampler, their DDP around rr.model."""
    rr = ResRep(
        graphprune.trace(_model(), X),
        flops_target=0.5,
        total_iters=20,
        schedule=SCHEDULE,
        round_to=1,
    )
    data = _data()
    if D.active():
        from torch.nn.parallel import DistributedDataParallel

        net: nn.Module = DistributedDataParallel(rr.model)
        loader = DataLoader(data, batch_size=batch, sampler=DistributedSampler(data, shuffle=False))
    else:
        net, loader = rr.model, DataLoader(data, batch_size=batch)
    opt = torch.optim.SGD(rr.param_groups(lr=0.05), lr=0.05)
    for _ in range(EPOCHS):
        for x, y in loader:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            rr.after_backward()
            opt.step()
            rr.step()
    return _result(rr)


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        writes = []
        real = loop.save_checkpoint
        loop.save_checkpoint = lambda path, state: writes.append(path) or real(path, state)
        result = {
            "builtin": run_builtin(Path(out) / "ckpt", GLOBAL_BATCH // WORLD),
            "own": run_own_loop(GLOBAL_BATCH // WORLD),
            "writes": len(writes),
        }
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _same(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if tol:
            torch.testing.assert_close(a[k], b[k], msg=k, **tol)
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("route", ["builtin", "own"])
def test_ranks_agree_and_match_one_process(ranks, route: str) -> None:
    r0, r1 = (r[route] for r in ranks)
    assert any((m == 0).any() for m in r0["masks"].values())  # masking happened
    _same(r0["masks"], r1["masks"])
    _same(r0["state"], r1["state"])
    assert torch.equal(r0["out"], r1["out"])
    # One process with the global batch: the same masks, the same weights up to rounding.
    with torch.random.fork_rng():
        one = run_builtin(None, GLOBAL_BATCH) if route == "builtin" else run_own_loop(GLOBAL_BATCH)
    _same(one["masks"], r0["masks"])
    _same(one["state"], r0["state"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(one["out"], r0["out"], atol=1e-4, rtol=1e-4)


def test_only_rank_0_writes_checkpoints(ranks) -> None:
    assert ranks[0]["writes"] == EPOCHS and ranks[1]["writes"] == 0


def test_a_loader_that_cannot_be_sharded_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(D, "active", lambda: True)
    with pytest.raises(TrainingError, match="needs a torch DataLoader"):
        fit(
            nn.Linear(4, 3),
            [(torch.randn(2, 4), torch.zeros(2).long())],
            epochs=1,
            lr=0.1,
            progress=False,
        )
