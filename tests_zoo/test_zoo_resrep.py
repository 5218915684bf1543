"""ResRep on real models of every family: a short run through its training hooks reaches the
MACs target and finalize (fold the compactors, remove the zeroed channels) changes no output.

Compactor groups (dense conv producers) and kernel-row groups (depthwise-separable blocks,
Linear producers, layer scales) are both exercised. A model whose prunable groups are all
inexact (a zeroed channel still moves the others, e.g. LayerNorm over channels) refuses with
a PlanError saying so; those are listed in REFUSED. Results go into COVERAGE.md with the
main table (conftest.py).
"""

from __future__ import annotations

import gc

import pytest
from conftest import RESREP_RECORDS, write_results

from graphprune.testing.coverage import check_resrep
from graphprune.testing.real_zoos import CI_MODELS, zoo_specs

# At least one model per family; all from the CI list, so `make test-zoo` runs them.
MODELS = (
    "timm/resnet18 timm/dla34 timm/res2net50_26w_4s timm/resnest14d timm/skresnet18 "
    "timm/cspresnet50 timm/regnetx_002 timm/repvgg_a0 timm/nf_resnet26 timm/vgg11_bn "
    "timm/efficientnet_b0 timm/mobilenetv3_large_100 timm/vit_tiny_patch16_224 "
    "timm/mixer_s16_224 timm/levit_128s timm/efficientformer_l1 "
    "timm/swin_tiny_patch4_window7_224 timm/hgnetv2_b0 timm/convnextv2_atto "
    "torchvision/alexnet torchvision/mobilenet_v2 torchvision/mobilenet_v3_small "
    "torchvision/efficientnet_b0 torchvision/densenet121 torchvision/shufflenet_v2_x1_0 "
    "torchvision/swin_t ultralytics/yolov8n segmentation/unet "
    "segmentation/lraspp_mobilenet_v3_large"
).split()
# Every prunable group inexact: ResRep cannot mask losslessly, and must say so.
REFUSED = {
    "timm/hgnetv2_b0": "a learnable shift shared by every channel after each activation",
    "timm/convnextv2_atto": "LayerNorm and GRN over channels",
}
SPECS = [s for s in zoo_specs() if f"{s.source}/{s.name}" in MODELS]


def test_the_list_spans_enough_families() -> None:
    assert set(MODELS) <= CI_MODELS  # so `make test-zoo` (and CI) runs every one
    assert len(MODELS) - len(REFUSED) >= 15


@pytest.mark.parametrize("spec", SPECS, ids=[f"{s.source}/{s.name}" for s in SPECS])
def test_resrep(spec, request: pytest.FixtureRequest) -> None:
    key = f"{spec.source}/{spec.name}"
    try:
        record = check_resrep(spec.name, spec.source, spec.build, spec.input_shape)
    finally:
        gc.collect()
    RESREP_RECORDS.append(record.to_dict())
    write_results(request.config)
    if key in REFUSED:
        assert record.status == "refused", f"{key}: {record.status} {record.reason}"
        assert "inexact" in record.reason
        return
    assert record.status == "ok", f"{key}: {record.status}: {record.reason}"
