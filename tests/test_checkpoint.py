"""Checkpoints and resume: a resume checks the configuration it continues, a run killed
mid-epoch (SIGKILL, in a subprocess) resumes bit-identical to one never stopped, and every RNG
(Python, NumPy, torch, a DataLoader's own generator) is part of that."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from graphprune import compress
from graphprune.errors import TargetMissedError, TrainingError
from graphprune.training.loop import CHECKPOINT, fit

pytestmark = pytest.mark.usefixtures("one_thread")

# Written to a file so the same code runs in the killed subprocess and in this process.
SCRIPT = '''
import random, sys, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from graphprune.training.loop import fit


class Stop(Exception):
    pass


def train(ckpt_dir, *, resume=False, hang_at=None, stop_at=None, ready=None):
    """3 epochs x 8 shuffled batches; the step draws from every RNG (dropout, NumPy, random)."""
    torch.set_num_threads(1)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g))
    gen = torch.Generator().manual_seed(2)
    loader = DataLoader(data, batch_size=6, shuffle=True, generator=gen)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    calls = 0

    def step(m, batch):
        nonlocal calls
        calls += 1
        if calls == hang_at:  # wait here to be killed
            Path(ready).touch()
            time.sleep(300)
        if calls == stop_at:
            raise Stop
        x, y = batch
        noise = 0.01 * float(np.random.randn()) + 0.01 * random.random()
        return F.cross_entropy(m(x + noise), y)

    fit(model, loader, epochs=3, lr=0.1, train_step=step, checkpoint_dir=ckpt_dir,
        checkpoint_every=3, resume=resume, progress=False)
    return model


if __name__ == "__main__":
    train(sys.argv[1], hang_at=int(sys.argv[2]), ready=sys.argv[3])
'''


@pytest.fixture
def script(tmp_path: Path):
    path = tmp_path / "killme.py"
    path.write_text(SCRIPT)
    spec = importlib.util.spec_from_file_location("killme", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def _assert_identical(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _saved(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, script) -> None:
    path, module = script
    ckpt, ready = tmp_path / "killed", tmp_path / "ready"
    # Call 14 is iteration 14 of 24 (epoch 2, batch 6); the last checkpoint before it is
    # iteration 12 (checkpoint_every=3), i.e. epoch 2 after 4 of its 8 batches.
    proc = subprocess.Popen([sys.executable, str(path), str(ckpt), "14", str(ready)])
    try:
        deadline = time.monotonic() + 600  # a loaded 2-core machine: imports alone take long
        while not ready.exists():
            assert proc.poll() is None, "the training subprocess died before the kill"
            assert time.monotonic() < deadline, "the training subprocess never got to the kill"
            time.sleep(0.05)
        saved = _saved(ckpt / CHECKPOINT)
        assert (saved["epoch"], saved["batch"]) == (1, 4)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(p.name for p in ckpt.iterdir()) == [CHECKPOINT]  # no temporary file left
    resumed = module.train(ckpt, resume=True)
    _assert_identical(resumed, module.train(tmp_path / "whole"))


def test_the_kill_test_can_fail(tmp_path, script) -> None:
    # Resuming with any RNG left out (here the loader's generator) gives another model.
    _, module = script
    with pytest.raises(module.Stop):
        module.train(tmp_path / "a", stop_at=14)
    saved = _saved(tmp_path / "a" / CHECKPOINT)
    for states in (saved["rng"]["now"], saved["rng"]["epoch_start"]):
        states[0]["loader"] = torch.Generator().manual_seed(99).get_state().tolist()
    torch.save(saved, tmp_path / "a" / CHECKPOINT)
    resumed = module.train(tmp_path / "a", resume=True)
    whole = module.train(tmp_path / "whole")
    pairs = zip(resumed.parameters(), whole.parameters(), strict=True)
    assert any(not torch.equal(p, q) for p, q in pairs)


def test_checkpoints_every_n_iterations(tmp_path, script) -> None:
    _, module = script
    with pytest.raises(module.Stop):
        module.train(tmp_path, stop_at=8)  # iteration 8 not done: the last save is after 6
    saved = _saved(tmp_path / CHECKPOINT)
    assert (saved["epoch"], saved["batch"], saved["seen"]) == (0, 6, 6)
    assert saved["history"] == []
    with pytest.raises(module.Stop):
        module.train(tmp_path, stop_at=3, resume=True)  # 2 more steps: through the epoch end
    saved = _saved(tmp_path / CHECKPOINT)
    assert (saved["epoch"], saved["batch"]) == (1, 0)
    assert [r["epoch"] for r in saved["history"]] == [1]


# --- the configuration a resume continues --------------------------------------------------------
def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def _resrep(ckpt: Path, flops_target: float, resume: bool | str = False):
    g = torch.Generator().manual_seed(0)
    # 2 epochs of 200 batches: about the shortest budget ResRep accepts (masked rows must
    # decay before the end, or it refuses the budget).
    data = TensorDataset(torch.randn(200, 3, 8, 8, generator=g), torch.randint(0, 3, (200,)))
    loader = DataLoader(data, batch_size=1)
    return compress(
        _tiny_cnn(),
        "resrep",
        example_inputs=(torch.randn(1, 3, 8, 8),),
        flops_target=flops_target,
        train_loader=loader,
        epochs=2,
        lr=0.05,
        round_to=1,
        checkpoint_dir=ckpt,
        resume=resume,
        progress=False,
    )


def test_resume_with_another_flops_target_is_an_error(tmp_path) -> None:
    _resrep(tmp_path, 0.7)
    with pytest.raises(TrainingError) as err:
        _resrep(tmp_path, 0.3, resume=True)
    msg = str(err.value)
    assert str(tmp_path / CHECKPOINT) in msg and "run.flops_target: 0.7 -> 0.3" in msg
    assert "resume='force'" in msg
    assert "fit." not in msg  # only what differs is listed
    _resrep(tmp_path, 0.7, resume=True)  # the same run resumes (here: nothing left to train)
    # forced: it continues with a warning; the masks trained for 0.7 then miss 0.3, which is
    # an error that carries the trained model
    with pytest.warns(UserWarning, match="flops_target: 0.7 -> 0.3"):
        with pytest.raises(TargetMissedError) as missed:
            _resrep(tmp_path, 0.3, resume="force")
    assert missed.value.result.report.macs_ratio > 0.3


def test_resume_with_other_loop_settings_lists_each_difference(tmp_path) -> None:
    data = [(torch.randn(4, 4), torch.randint(0, 3, (4,))) for _ in range(2)]
    model = nn.Sequential(nn.Linear(4, 3))
    fit(
        model,
        data,
        epochs=2,
        lr=0.1,
        checkpoint_dir=tmp_path,
        progress=False,
        run_config={"flops_target": 0.5, "tag": [1, 2]},
    )
    with pytest.raises(TrainingError) as err:
        fit(
            model,
            data,
            epochs=3,
            lr=0.2,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
            run_config={"flops_target": 0.5, "tag": (1, 2), "extra": True},
        )
    msg = str(err.value)
    assert "fit.epochs: 2 -> 3" in msg and "fit.lr: 0.1 -> 0.2" in msg
    assert "run.extra: '<absent>' -> True" in msg
    assert "tag" not in msg  # a tuple and the list JSON gives back are the same setting


def test_run_config_must_be_json_safe() -> None:
    with pytest.raises(TypeError, match=r"run_config\['fn'\]"):
        fit(
            nn.Linear(4, 3),
            [(torch.randn(2, 4), torch.zeros(2).long())],
            epochs=1,
            lr=0.1,
            progress=False,
            run_config={"fn": print},
        )


def test_a_checkpoint_from_an_older_graphprune_is_refused(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    torch.save({"epoch": 1, "model": model.state_dict()}, tmp_path / CHECKPOINT)  # 0.1 layout
    with pytest.raises(TrainingError, match="older graphprune"):
        fit(
            model,
            [(torch.randn(2, 4), torch.zeros(2).long())],
            epochs=2,
            lr=0.1,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resume": "yes"}, "resume='yes'"),
        ({"checkpoint_every": 0}, "checkpoint_every=0"),
        ({"epochs": 2.5}, "epochs=2.5"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    options = {"epochs": 1, "lr": 0.1, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        fit(nn.Linear(4, 3), [(torch.randn(2, 4), torch.zeros(2).long())], **options)
