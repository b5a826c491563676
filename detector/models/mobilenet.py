"""A mobile CenterNet: torchvision's MobileNetV3-Large trunk, a light up-sampling neck, heads.

For deployment where ResNet-18's 23 GMACs at 512 x 512 are too many. The trunk is
torchvision's own ``mobilenet_v3_large(...).features`` (inverted residuals with squeeze-
excitation and hard-swish; stride 32, 960 channels at width 1.0), so its state-dict keys are
torchvision's (``features.0.0.weight``, ...) and the ImageNet weights torchvision publishes
(``mobilenet_v3_large-8738ca79.pth`` or ``-5c1a4163.pth``) load unchanged from a local file; the
classifier is dropped. Nothing is downloaded. Its BatchNorms keep torchvision's eps 0.001 and
momentum 0.01, which the pretrained statistics were trained with.

The neck is light by design: per stage a 3x3 conv + BN + ReLU at the lower resolution, then a
bilinear x2 upsampling (no transposed convs), three stages from stride 32 to stride 4, 128, 64
and 64 channels wide by default (about 1.2 M parameters against the msra neck's 9.4 M for
ResNet-18; ``widths={"neck": [...]}`` changes them). The heads are the original's (3x3 conv of
``head_conv`` = 64, its default for non-DLA backbones, + ReLU + 1x1). Output stride 4; input
sides must be multiples of 32. Scaled-down trunks are torchvision's ``width_mult``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

try:  # a private torchvision function: guarded so that importing detector never fails
    from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf
except ImportError:  # pragma: no cover - depends on the installed torchvision
    MobileNetV3 = _mobilenet_v3_conf = None

from .centernet import CenterNet, HeadFactory
from .pretrained import load_trunk_weights
from .widths import merge_widths

# The neck's three x2 stages take the trunk's stride 32 to the output stride 4.
DEFAULT_WIDTHS = {"width_mult": 1.0, "neck": [128, 64, 64]}
DEFAULT_HEAD_CONV = 64
# The torchvision releases whose private `_mobilenet_v3_conf(arch, width_mult=...)` the trunk is
# built with (pyproject's torchvision>=0.19; tested with 0.29).
TORCHVISION_NEEDED = "torchvision >= 0.19 with torchvision.models.mobilenetv3._mobilenet_v3_conf"


def mobilenet_v3_parts():
    """torchvision's `MobileNetV3` class and its private `_mobilenet_v3_conf`; an ImportError
    naming the torchvision version needed when the installed one lacks them."""
    if _mobilenet_v3_conf is None or MobileNetV3 is None:
        import torchvision

        raise ImportError(
            f"mobilenet_v3_large needs {TORCHVISION_NEEDED}; the installed torchvision "
            f"{torchvision.__version__} lacks it. Install torchvision>=0.19 (the version that "
            f"matches your torch), or choose another model.arch"
        )
    return MobileNetV3, _mobilenet_v3_conf


class MobileNetV3Trunk(nn.Module):
    """torchvision's MobileNetV3-Large feature extractor at ``width_mult``, without its pooling
    and classifier. forward(images: B x 3 x H x W) -> B x out_channels x H/32 x W/32."""

    def __init__(self, width_mult: float = 1.0):
        super().__init__()
        network, configuration = mobilenet_v3_parts()
        settings, last_channel = configuration("mobilenet_v3_large", width_mult=width_mult)
        # Built through torchvision's class so blocks, initialisation and names are its own.
        self.features = network(settings, last_channel).features
        self.out_channels = self.features[-1].out_channels  # read by the builder, never in forward

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


def upsampling_neck(in_channels: int, widths: list[int]) -> nn.Sequential:
    """Per width: 3x3 conv (no bias) + BN + ReLU, then bilinear x2 upsampling."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        ]
        in_channels = width
    return nn.Sequential(*layers)


def load_imagenet_weights(trunk: MobileNetV3Trunk, path: str | Path) -> None:
    """Load a torchvision ``mobilenet_v3_large`` state dict from a local file. The classifier
    (``classifier.*``) is ignored; every trunk tensor must be present with its shape."""
    load_trunk_weights(
        trunk, path, expected="torchvision mobilenet_v3_large weights at the same width_mult"
    )


def build_mobilenet(
    make_heads: HeadFactory,
    head_conv: int | None = None,
    widths: dict | None = None,
    pretrained: str | Path | None = None,
) -> CenterNet:
    """MobileNetV3-Large CenterNet (``mobilenet_v3_large``). ``widths`` may override
    ``width_mult`` (torchvision's trunk width multiplier) and ``neck`` (3 ints, one per x2
    stage); missing keys take the defaults."""
    widths = merge_widths(DEFAULT_WIDTHS, widths)
    neck_widths = list(widths["neck"])
    trunk = MobileNetV3Trunk(float(widths["width_mult"]))
    if pretrained is not None:
        load_imagenet_weights(trunk, pretrained)
    neck = upsampling_neck(trunk.out_channels, neck_widths)
    head_conv = DEFAULT_HEAD_CONV if head_conv is None else head_conv
    return CenterNet(trunk, neck, make_heads(neck_widths[-1], head_conv))
