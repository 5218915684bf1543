"""Model files: nothing in a file runs on load (a malicious pickle never fires, through any
entry point), pruned models round-trip exactly, and hostile structure descriptions are refused.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from graphprune import compress, trace
from graphprune.analysis import analyze
from graphprune.apps.cli import main
from graphprune.apps.demo import _cached_base
from graphprune.errors import ModelFileError, TrainingError
from graphprune.io import atomic_save, load_model, load_report, save_model
from graphprune.testing.exactness import randomize_
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE
from graphprune.training.loop import CHECKPOINT, fit

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears iff code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _hostile_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    """The payload as torch.save's zip format (in a model-file-shaped dict) and as a raw pickle."""
    marker = tmp_path / "PWNED"
    zipped = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker), "example_inputs": (torch.zeros(1, 3, 8, 8),)}, zipped)
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps({"model": Payload(marker)}, protocol=2))
    return marker, [zipped, raw]


def test_the_payload_is_live(tmp_path) -> None:
    # The check below could fail: unpickling these files really does create the marker.
    marker, (zipped, raw) = _hostile_files(tmp_path)
    torch.load(zipped, weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(raw.read_bytes())
    assert marker.exists()


def test_load_model_never_runs_a_pickle(tmp_path) -> None:
    marker, files = _hostile_files(tmp_path)
    for f in files:
        with pytest.raises(ModelFileError) as err:
            load_model(f)
        msg = str(err.value)
        assert str(f) in msg and "graphprune convert --trust" in msg and "run code" in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    "argv",
    [["inspect", "{f}"], ["export", "{f}", "--out", "{d}/x.onnx"], ["bench", "{f}", "--runs", "1"]],
    ids=["inspect", "export", "bench"],
)
def test_cli_never_runs_a_pickle(tmp_path, capsys, argv: list[str]) -> None:
    marker, files = _hostile_files(tmp_path)
    for f in files:
        code = main([a.format(f=f, d=tmp_path) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and "refused to load" in err and "convert --trust" in err, err
    assert not marker.exists()


def test_resume_never_runs_a_pickle(tmp_path) -> None:
    marker, (zipped, _) = _hostile_files(tmp_path)
    (tmp_path / "ckpt").mkdir()
    zipped.rename(tmp_path / "ckpt" / CHECKPOINT)
    batches = [(torch.randn(4, 4), torch.randint(0, 3, (4,)))]
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(TrainingError, match="refused to load"):
        fit(
            model,
            batches,
            epochs=1,
            lr=0.1,
            checkpoint_dir=tmp_path / "ckpt",
            resume=True,
            progress=False,
        )
    assert not marker.exists()


def test_demo_cache_never_runs_a_pickle(tmp_path) -> None:
    marker, (zipped, raw) = _hostile_files(tmp_path)
    torch.save({"recipe": {"seed": 0}, "model": Payload(marker)}, zipped)
    for f in (zipped, raw):
        assert _cached_base(f, {"seed": 0}) is None  # retrained, never trusted
    assert not marker.exists()
    good = tmp_path / "base.pt"
    atomic_save({"recipe": {"seed": 0}, "model": {"w": torch.ones(2)}}, good)
    assert torch.equal(_cached_base(good, {"seed": 0})["w"], torch.ones(2))
    assert _cached_base(good, {"seed": 1}) is None  # another recipe


# --- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_pruned_zoo_model_round_trips(tmp_path, name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(ZOO_INPUT_SHAPE)
    model = randomize_(ZOO[name]())
    try:
        pruned = compress(model, "magnitude", example_inputs=(x,), flops_target=0.6).model
    except Exception as exc:  # a zoo pattern magnitude cannot prune is not this test's business
        pytest.skip(f"magnitude cannot prune {name}: {exc}")
    path = save_model(tmp_path / "m.pt", pruned, (x,), {"method": "magnitude"})
    loaded, (x2,) = load_model(path)
    assert torch.equal(x2, x) and load_report(path) == {"method": "magnitude"}
    assert type(loaded).__name__ == type(pruned).__name__
    want, got = pruned.state_dict(), loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    xb = torch.randn(2, *ZOO_INPUT_SHAPE[1:])
    for train in (False, True):  # BatchNorm uses batch statistics in train mode, dropout RNG
        pruned.train(train), loaded.train(train)
        with torch.no_grad():
            outs = [torch.manual_seed(1) and m(xb) for m in (loaded, pruned)]
        assert torch.equal(*outs)
    # and it is a model graphprune can work on again
    assert len(analyze(trace(loaded, (x,)))) == len(analyze(trace(pruned, (x,))))


def test_shared_parameters_stay_shared(tmp_path) -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    model[2].bias.requires_grad_(False)
    loaded, _ = load_model(save_model(tmp_path / "m.pt", model, (torch.randn(1, 4),)))
    assert loaded[0].weight is loaded[2].weight
    assert not loaded[2].bias.requires_grad and loaded[0].bias.requires_grad
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), model(x))


class Scaled(nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x):
        return self.k * x


def test_own_leaf_classes_need_to_be_named_on_both_sides(tmp_path) -> None:
    x = torch.randn(2, 4)
    model = nn.Sequential(nn.Linear(4, 4), Scaled(2.5))
    gm = trace(model, (x,), leaf_modules=[Scaled])  # Scaled kept as a module: its code is needed
    with pytest.raises(ModelFileError, match="Scaled.*extra_modules"):
        save_model(tmp_path / "m.pt", gm, (x,))
    path = save_model(tmp_path / "m.pt", gm, (x,), extra_modules=[Scaled])
    with pytest.raises(ModelFileError, match="Scaled.*extra_modules"):
        load_model(path)
    loaded, _ = load_model(path, extra_modules=[Scaled])
    assert isinstance(loaded.get_submodule("1"), Scaled) and loaded.get_submodule("1").k == 2.5
    assert torch.equal(loaded(x), model(x))


def test_a_model_of_your_own_class_is_saved_as_its_traced_graph(tmp_path) -> None:
    x = torch.randn(2, 4)
    model = nn.Sequential(nn.Linear(4, 4), Scaled(2.5))  # Scaled's forward is traced through
    loaded, _ = load_model(save_model(tmp_path / "m.pt", model, (x,)))
    assert isinstance(loaded, fx.GraphModule)
    assert torch.equal(loaded(x), model(x))


def test_hooks_are_refused_when_saving(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(ModelFileError, match="'0' has hooks"):
        save_model(tmp_path / "m.pt", model, (torch.randn(1, 4),))
    assert not (tmp_path / "m.pt").exists()


def _tamper(tmp_path: Path, edit) -> Path:
    """A valid file of a traced model, with its structure description edited."""
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (torch.randn(1, 3, 8, 8),))
    path = save_model(tmp_path / "m.pt", gm, (torch.randn(1, 3, 8, 8),))
    obj = torch.load(path, weights_only=True)
    structure = json.loads(obj["structure"])
    edit(structure)
    obj["structure"] = json.dumps(structure)
    torch.save(obj, path)
    return path


def _node(structure: dict, op: str) -> dict:
    return next(n for n in structure["graph"] if n["op"] == op)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: _node(s, "call_module").update(op="call_function", target="builtins.eval"),
            "'builtins.eval', not allow-listed",
        ),
        (
            lambda s: _node(s, "call_module").update(op="call_function", target="torch.load"),
            "'torch.load', not allow-listed",
        ),
        (
            lambda s: _node(s, "call_module").update(op="call_method", target="register_hook"),
            "method 'register_hook'",
        ),
        (
            lambda s: _node(s, "call_module").update(
                op="call_function",
                target="builtins.getattr",
                args=[{"$node": "input_1"}, "__class__"],
            ),
            "reads an attribute that is not allowed",
        ),
        (lambda s: s["children"]["0"].update({"class": "os.system"}), "os.system"),
        (lambda s: s["children"]["0"]["attrs"].update({"__class__": 1}), "invalid attribute"),
        (
            lambda s: _node(s, "call_module").update(name="x = __import__('os')"),
            "invalid node name",
        ),
        (lambda s: _node(s, "call_module").update(target="a;b"), "invalid"),
    ],
    ids=["eval", "torch.load", "hook", "dunder-getattr", "class", "dunder-attr", "name", "target"],
)
def test_hostile_structures_are_refused(tmp_path, edit, message: str) -> None:
    path = _tamper(tmp_path, edit)
    with pytest.raises(ModelFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(path)


def test_files_that_are_not_model_files(tmp_path) -> None:
    state = tmp_path / "state.pt"
    torch.save(nn.Linear(2, 2).state_dict(), state)
    with pytest.raises(ModelFileError, match="load_state_dict"):
        load_model(state)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a readable"):
        load_model(junk)


# --- converting a 0.1 file -----------------------------------------------------------------------
def test_convert_an_old_file_only_when_trusted(tmp_path, capsys) -> None:
    x = torch.randn(ZOO_INPUT_SHAPE)
    pruned = compress(ZOO["vgg"](), "magnitude", example_inputs=(x,), flops_target=0.6).model
    old = tmp_path / "old.pt"
    torch.save({"model": pruned, "example_inputs": (x,), "report": {"a": 1}}, old)  # 0.1 format
    with pytest.raises(ModelFileError, match="convert --trust"):
        load_model(old)
    new = tmp_path / "new.pt"
    assert main(["convert", str(old), "--out", str(new)]) == 2
    assert "trust" in capsys.readouterr().err and not new.exists()
    assert main(["convert", str(old), "--out", str(new), "--trust"]) == 0
    loaded, (x2,) = load_model(new)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x2), pruned.eval()(x))
    assert load_report(new) == {"a": 1}
