"""The real model lists of the zoo tier: torchvision, timm, ultralytics, segmentation nets.

Every model is built randomly initialised (no weights are downloaded) at its library's default
input size, batch 1. The libraries are imported lazily, so this module imports without them;
``zoo_specs`` lists only the sources whose library is installed.

SKIPPED names the models left out and why (memory or time on the 2-core, 24 GB CI machine):
they are listed in the coverage table, never silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class ZooSpec:
    name: str
    source: str  # torchvision | timm | ultralytics | segmentation
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    note: str = ""


_BIG = "over 15 GMACs or 200 M parameters: too slow or large for the 2-core CI machine"
# Measured under load: convnext_large took 71 s in compress alone; the biggest are left out.
SKIPPED: dict[str, str] = {
    **{
        f"torchvision/{n}": _BIG
        for n in (
            "vit_h_14 vit_l_16 vit_l_32 regnet_y_128gf regnet_y_32gf regnet_x_32gf "
            "efficientnet_b7 efficientnet_b6 efficientnet_v2_l efficientnet_v2_m convnext_large "
            "wide_resnet101_2 swin_v2_b vgg19 vgg19_bn"
        ).split()
    },
}

# One or more architectures of every timm family: CNNs, NAS nets, hybrids, ViT-style and
# MLP-style, the smallest variant of each.
TIMM_MODELS = """
resnet18 resnet26t resnet50d seresnext26d_32x4d ecaresnet26t skresnet18 res2net50_26w_4s
resnest14d nf_resnet26 resnetv2_50 densenet121 dpn68 dla34 vgg11_bn repvgg_a0 mobileone_s0
cspdarknet53 cspresnet50 darknet53 cs3darknet_s gernet_s regnetx_002 regnety_016 regnetz_b16
inception_v3 inception_v4 xception41 ese_vovnet19b_dw selecsls42b hrnet_w18_small hgnet_tiny
hgnetv2_b0 rdnet_tiny starnet_s1 ghostnet_100 ghostnetv2_100
efficientnet_b0 tf_efficientnetv2_b0 mobilenetv2_100 mobilenetv3_large_100
mobilenetv4_conv_small fbnetc_100 mnasnet_100 spnasnet_100 semnasnet_100 hardcorenas_a
tinynet_a lcnet_050 rexnet_100 mixnet_s tf_mixnet_s
convnext_atto convnextv2_atto inception_next_tiny edgenext_xx_small poolformer_s12
poolformerv2_s12 mambaout_femto
botnet26t_256 halonet26t lambda_resnet26t bat_resnext26ts
levit_128s efficientformer_l1 efficientformerv2_s0 mobilevit_xxs mobilevitv2_050
efficientvit_b0 efficientvit_m0 fastvit_t8 repvit_m1 tiny_vit_5m_224 coat_lite_tiny
coatnet_nano_rw_224 maxvit_nano_rw_256 pit_ti_224 convit_tiny visformer_tiny
vit_tiny_patch16_224 deit_tiny_patch16_224 vit_small_patch16_224 eva02_tiny_patch14_224
cait_xxs24_224 xcit_nano_12_p16_224 crossvit_tiny_240 swin_tiny_patch4_window7_224
swinv2_cr_tiny_224 pvt_v2_b0 twins_pcpvt_small mvitv2_tiny davit_tiny focalnet_tiny_srf
gcvit_xxtiny hiera_tiny_224 nest_tiny volo_d1_224 tnt_s_patch16_224
mixer_s16_224 resmlp_12_224 gmlp_ti16_224 sequencer2d_s
""".split()


def torchvision_specs() -> list[ZooSpec]:
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        weights = torchvision.models.get_model_weights(name)
        size = 224
        for w in weights:  # the size the weights were trained at (inception_v3: 299)
            size = w.transforms().crop_size[0]
            break
        out.append(
            ZooSpec(
                name,
                "torchvision",
                lambda n=name: torchvision.models.get_model(n, weights=None),
                (1, 3, size, size),
            )
        )
    return out


def timm_specs(names: list[str] | None = None) -> list[ZooSpec]:
    import timm

    out = []
    for name in names or TIMM_MODELS:
        cfg = timm.models.get_pretrained_cfg(name)
        size = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
        out.append(
            ZooSpec(
                name,
                "timm",
                lambda n=name: timm.create_model(n, pretrained=False),
                (1, *size),
            )
        )
    return out


def ultralytics_specs() -> list[ZooSpec]:
    os.environ.setdefault("YOLO_OFFLINE", "1")

    def yolov8n() -> nn.Module:
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel("yolov8n.yaml", verbose=False)

    return [ZooSpec("yolov8n", "ultralytics", yolov8n, (1, 3, 640, 640), "built from its yaml")]


def segmentation_specs() -> list[ZooSpec]:
    from torchvision.models import segmentation as seg
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    def tv(name: str) -> Callable[[], nn.Module]:
        return lambda: getattr(seg, name)(weights=None, weights_backbone=None)

    specs = [
        ZooSpec(n, "segmentation", tv(n), (1, 3, 224, 224), "224x224 instead of 520")
        for n in (
            "lraspp_mobilenet_v3_large",
            "deeplabv3_mobilenet_v3_large",
            "fcn_resnet50",
            "deeplabv3_resnet50",
        )
    ]
    specs.append(
        ZooSpec(
            "resnet18_fpn",
            "segmentation",
            lambda: resnet_fpn_backbone(
                backbone_name="resnet18",
                weights=None,
                norm_layer=nn.BatchNorm2d,
                trainable_layers=5,
            ),
            (1, 3, 224, 224),
            "torchvision FPN over ResNet-18 (BatchNorm instead of FrozenBatchNorm)",
        )
    )
    specs.append(ZooSpec("unet", "segmentation", UNet, (1, 3, 256, 256), "classic U-Net, width 32"))
    return specs


# The CI list: the models measured and triaged so far (one or more per family and source),
# small enough that `make test-zoo` fits in CI's time on 2 shared cores (about 2 minutes on an
# idle machine, measured 2026-12-01); GRAPHPRUNE_ZOO=full (make test-zoo ZOO=full) runs every
# list above. Grow it as models are triaged into known_failures.json.
CI_MODELS = set(
    """
timm/cspresnet50 timm/densenet121 timm/dla34 timm/efficientnet_b0
timm/hgnetv2_b0 timm/nf_resnet26 timm/regnetx_002 timm/repvgg_a0
timm/res2net50_26w_4s timm/resnest14d timm/resnet18 timm/skresnet18
timm/vgg11_bn torchvision/alexnet torchvision/convnext_tiny torchvision/densenet121
torchvision/efficientnet_b0 torchvision/googlenet torchvision/mnasnet0_5 torchvision/mobilenet_v2
torchvision/mobilenet_v3_small ultralytics/yolov8n segmentation/lraspp_mobilenet_v3_large
segmentation/unet timm/convnextv2_atto timm/mixer_s16_224 timm/mobilenetv3_large_100
timm/vit_tiny_patch16_224 timm/levit_128s timm/efficientformer_l1 timm/swin_tiny_patch4_window7_224
torchvision/shufflenet_v2_x1_0 torchvision/swin_t
""".split()
)


def zoo_specs(
    sources: tuple[str, ...] = ("torchvision", "timm", "ultralytics", "segmentation"),
    *,
    full: bool | None = None,
) -> list[ZooSpec]:
    """Specs of every listed source whose library is installed, skipped models left out;
    only CI_MODELS unless ``full`` (default: the GRAPHPRUNE_ZOO=full environment variable)."""
    if full is None:
        full = os.environ.get("GRAPHPRUNE_ZOO", "ci") == "full"
    makers = {
        "torchvision": torchvision_specs,
        "timm": timm_specs,
        "ultralytics": ultralytics_specs,
        "segmentation": segmentation_specs,
    }
    out = []
    for source in sources:
        try:
            specs = makers[source]()
        except ImportError:
            continue
        out.extend(
            s
            for s in specs
            if f"{s.source}/{s.name}" not in SKIPPED
            and (full or f"{s.source}/{s.name}" in CI_MODELS)
        )
    return out


class UNet(nn.Module):
    """The U-Net of Ronneberger et al. (2015) with padding, BatchNorm and width 32: encoder
    double-convs, max-pool down, transposed-conv up, skip connections by concatenation."""

    def __init__(self, cin: int = 3, classes: int = 2, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c = cin
        for w in widths:
            self.down.append(_double_conv(c, w))
            c = w
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c, w, 2, stride=2))
            self.merge.append(_double_conv(2 * w, w))
            c = w
        self.head = nn.Conv2d(c, classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )
