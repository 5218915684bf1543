"""ONNX Runtime parity for every zoo model, dense and pruned (issue: backends)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

import graphprune as gp
from graphprune.backends.ort import parity
from graphprune.testing.exactness import randomize_
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE


@pytest.mark.parametrize("name", sorted(ZOO))
def test_dense_and_pruned_zoo_models_match_onnx_runtime(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_(ZOO[name]()).eval()
    x = torch.randn(ZOO_INPUT_SHAPE)
    pruned = gp.compress(model, "magnitude", example_inputs=(x,), flops_target=0.6, round_to=1)
    assert pruned.report.pruned_macs < pruned.report.dense_macs  # really a different graph
    batch = torch.randn(3, *ZOO_INPUT_SHAPE[1:])  # exported at batch 1: the axis is dynamic
    for label, m in (("dense", model), ("pruned", pruned.model)):
        path = gp.export(m, (x,), tmp_path / f"{label}.onnx")
        assert parity(m, (batch,), path) <= 1e-4, label
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert "Identity" not in ops, label
