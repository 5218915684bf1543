"""The ``graphprune`` command end to end: in-process through ``cli.main`` and as a real process.

Facts checked against hand computation (ResNet-20 for 32x32 CIFAR, 16/32/64 wide, 1x1 conv+BN
projection shortcuts where the shape changes, as in ResRep):

- MACs (conv+linear): stem 3*16*9*32^2 = 442,368; stage 1: 6 * 16*16*9*32^2 = 14,155,776;
  stages 2 and 3: 13,107,200 each (strided conv 1,179,648 + 5 convs of 2,359,296 + projection
  131,072); fc 640. Total 40,813,184, the published ~41M for ResNet-20.
- Params: 272,474 (the published 0.27M), conv + BN affine + fc.
- 14 channel groups: the input (3), 12 prunable (per stage one residual group tying every
  block's output, plus three inner conv1 groups), the output (10).
- With round_to=8 every prunable group keeps at least 8 channels, which leaves 4,886,608 MACs:
  0.1197 of dense is the smallest reachable target.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from graphprune.apps.bench import bench, format_bench
from graphprune.apps.cli import main
from graphprune.io import load_model

DENSE_MACS = 40_813_184
DENSE_PARAMS = 272_474
FLOOR_ROUND8 = 4_886_608 / DENSE_MACS


def _run(argv: list[str]) -> tuple[int, str, str]:
    """main() in-process with stdout/stderr captured (for module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _console(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, falling back to ``python -m`` when it is not on disk."""
    script = Path(sys.executable).with_name("graphprune")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "graphprune.apps.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("cli") / "tmp.pt"
    argv = ["compress", "resnet20", "--method", "magnitude", "--flops-target", "0.5"]
    code, out, err = _run([*argv, "--out", str(path)])
    assert code == 0, err
    return path, out


@pytest.fixture(scope="module")
def exported(pruned: tuple[Path, str]) -> Path:
    onnx_path = pruned[0].with_name("x.onnx")
    code, out, err = _run(["export", str(pruned[0]), "--out", str(onnx_path)])
    assert code == 0, err
    assert f"wrote {onnx_path}" in out
    return onnx_path


def test_inspect_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert f"{DENSE_MACS / 1e6:.3f} M MACs (conv+linear)" in out
    assert f"{DENSE_PARAMS / 1e6:.4f} M params" in out
    assert "14 channel groups, 12 prunable" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d+\s", line)]
    assert [r[0] for r in rows] == [str(i) for i in range(14)]
    assert rows[0][1:4] == ["3", "1", "fixed"] and "input" in " ".join(rows[0])
    assert rows[-1][1] == "10" and rows[-1][3] == "fixed" and "output" in " ".join(rows[-1])
    widths = sorted(int(r[1]) for r in rows if r[3] == "prunable")
    assert widths == [16] * 4 + [32] * 4 + [64] * 4


def test_inspect_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "resnet20", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["macs"], data["params"]) == (DENSE_MACS, DENSE_PARAMS)
    groups = data["groups"]
    assert len(groups) == 14 and sum(g["prunable"] for g in groups) == 12
    assert [groups[0]["channels"], groups[-1]["channels"]] == [3, 10]
    assert not groups[0]["prunable"] and not groups[-1]["prunable"]


def test_compress_writes_a_model_inspect_reads(pruned: tuple[Path, str], capsys) -> None:
    path, out = pruned
    assert path.is_file() and f"saved {path}" in out
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["macs"] <= (0.5 + 0.01) * DENSE_MACS
    assert data["params"] < DENSE_PARAMS
    assert len(data["groups"]) == 14  # pruning narrows groups, it never removes them


def test_console_script_unknown_model_exits_2() -> None:
    proc = _console("inspect", "resnet21")  # the real process: entry point and exit status
    assert proc.returncode == 2
    assert "unknown model 'resnet21'" in proc.stderr
    assert "resnet20" in proc.stderr and "mobilenet_v2" in proc.stderr  # lists known names
    assert "Traceback" not in proc.stderr


def test_export_matches_torch_in_onnxruntime(pruned: tuple[Path, str], exported: Path) -> None:
    model, (example,) = load_model(pruned[0])
    x = torch.randn(4, *example.shape[1:])  # the batch axis is dynamic
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert actual.shape == expected.shape == (4, 10)
    assert np.abs(actual - expected).max() <= 1e-4


def test_bench_dense_vs_pruned(pruned: tuple[Path, str], capsys) -> None:
    assert main(["bench", "resnet20", str(pruned[0]), "--batch-sizes", "1", "--runs", "3"]) == 0
    out = capsys.readouterr().out
    assert "threads" in out and "conv+linear" in out
    dense = next(line for line in out.splitlines() if line.startswith("resnet20 "))
    row = next(line for line in out.splitlines() if line.startswith(str(pruned[0])))
    assert dense.split()[1] == f"{DENSE_MACS / 1e6:.3f}"
    ratios = [float(v[:-1]) for v in re.findall(r"\d+\.\d+x", row)]  # MACs x, speedup
    assert len(ratios) == 2 and ratios[0] >= 1.9
    # Both ratios are the dense row's number over this row's, as the header says: check them
    # against the printed MACs and medians (rounded to 3 decimals, ratios to 2).
    macs = [float(line.split()[1]) for line in (dense, row)]
    assert ratios[0] == pytest.approx(macs[0] / macs[1], abs=0.006)
    medians = [float(line.split("|")[1].split()[0]) for line in (dense, row)]
    assert ratios[1] == pytest.approx(medians[0] / medians[1], rel=0.01, abs=0.006)


def test_bench_onnx_file_has_latency_but_no_macs(exported: Path, capsys) -> None:
    (row,) = bench([str(exported)], batch_sizes=(1, 2), runs=2, warmup=1, threads=1)
    assert row["macs"] is None and row["params"] is None and row["threads"] == 1
    assert set(row["latency"]) == {1, 2} and row["latency"][2]["median_ms"] > 0
    assert main(["bench", str(exported), "--batch-sizes", "1", "--runs", "2", "--json"]) == 0
    (data,) = json.loads(capsys.readouterr().out)
    assert data["macs"] is None and data["speedup"] is None


def test_format_bench_states_threads_and_ratios() -> None:
    lat = {1: {"median_ms": 2.0, "p90_ms": 2.5}}
    rows = [
        {"name": "dense", "backend": "onnxruntime", "threads": 2, "macs": 4e6, "params": 1e5,
         "latency": lat, "speedup": None, "macs_ratio": None, "device": "cpu"},
        {"name": "pruned", "backend": "onnxruntime", "threads": 2, "macs": 2e6, "params": 5e4,
         "latency": {1: {"median_ms": 1.25, "p90_ms": 1.5}}, "speedup": {1: 1.6},
         "macs_ratio": 2.0, "device": "cpu"},
    ]  # fmt: skip
    text = format_bench(rows)
    assert "onnxruntime (2 threads)" in text and "conv+linear" in text
    pruned_line = text.splitlines()[-1]
    assert pruned_line.split()[:4] == ["pruned", "2.000", "0.0500", "2.00x"]
    assert "1.60x" in pruned_line


@pytest.mark.parametrize("target", ["0", "1.5"])
def test_flops_target_outside_0_1(target: str, capsys) -> None:
    assert main(["compress", "resnet20", "--flops-target", target]) == 2
    assert "must be in (0, 1)" in capsys.readouterr().err


def test_unreachable_target_names_the_minimum(capsys) -> None:
    assert main(["compress", "resnet20", "--flops-target", "0.001"]) == 2
    err = capsys.readouterr().err
    floor = float(re.search(r"at least (\d\.\d+)", err).group(1))
    assert floor == pytest.approx(FLOOR_ROUND8, abs=1e-3)


def test_unknown_backend_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", "resnet20", "--out", "x.onnx", "--backend", "openvino"])
    assert exc.value.code == 2
    assert "invalid choice: 'openvino'" in capsys.readouterr().err


def test_export_to_unwritable_path_exits_2(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a regular file cannot be a folder, even for root
    assert main(["export", "resnet20", "--out", str(blocker / "x.onnx")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_compress_to_unwritable_path_exits_2(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["compress", "resnet_basic", "--out", str(blocker / "tmp.pt")]) == 2
    assert str(blocker) in capsys.readouterr().err


def test_training_method_builds_the_model_for_the_data(tmp_path: Path) -> None:
    """resnet20 is built for the data (1-channel digits, 10 classes read from the labels), not
    for its default 3-channel CIFAR input; training runs through the method's hooks."""
    path = tmp_path / "r20.pt"
    argv = ["compress", "resnet20", "--method", "resrep", "--data", "digits", "--epochs", "1"]
    argv += ["--batch-size", "4", "--round-to", "1", "--out", str(path), "--json"]
    code, out, err = _run(argv)  # 360 small iterations: enough for masked rows to decay
    assert code == 0, err
    report = json.loads(out)
    assert report["method"] == "resrep" and report["config"]["round_to"] == 1
    assert report["train_seconds"] > 0 and report["accuracy_after_finalize"] is not None
    model, (example,) = load_model(path)
    assert tuple(example.shape) == (1, 1, 16, 16)
    with torch.no_grad():
        assert model.eval()(example).shape == (1, 10)


def test_training_method_refuses_a_budget_too_short_for_its_schedule(capsys) -> None:
    argv = ["compress", "resnet20", "--method", "resrep", "--data", "digits", "--epochs", "1"]
    assert main([*argv, "--batch-size", "256"]) == 2  # 6 iterations
    err = capsys.readouterr().err
    assert "6 iterations" in err and "at least 120" in err and "epochs of 6" in err


def test_training_method_refuses_a_model_that_does_not_fit_the_data(capsys) -> None:
    # mobilenet_v2 takes num_classes but not in_channels: its stem wants 3-channel images.
    assert main(["compress", "mobilenet_v2", "--method", "resrep", "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert "mobilenet_v2 does not accept the digits images (1, 1, 16, 16)" in err
    assert "1-channel inputs and 10 classes" in err
