"""ResNet with a U-Net-style neck: the trunk's stages feed the up-sampling path directly.

Not in the original CenterNet. The msra_resnet neck (`resnet.py`) rebuilds the stride-4 map from
the stride-32 one alone: at 128 px that is a 4 x 4 map, so the shape of a 12 px object has to
survive a 32x bottleneck and be painted back by three deconvolutions. TTFNet (ZJULearning/ttfnet)
adds shortcuts from the stride-16, -8 and -4 stages into the up-sampling path and trains in a
fraction of the epochs; this family does the same with plain 3 x 3 convolutions where TTFNet uses
deformable ones, and keeps CenterNet's heads, targets and decoding unchanged.

Per level, from the stride-32 map up: conv 3x3 + BN + ReLU at the coarse resolution, bilinear x2,
then add a conv 3x3 + BN + ReLU of the trunk stage at the new resolution. Measured on the
synthetic benchmark (experiments/shapes_res18): it learns several times faster per image than
msra res18 and costs 0.88 instead of 1.41 GMACs at 128 px.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .centernet import CenterNet, HeadFactory
from .resnet import DEFAULT_HEAD_CONV, DEPTHS, ResNetTrunk, init_regression_heads, resnet_trunk

DEFAULT_WIDTHS = {"stem": 64, "stages": [64, 128, 256, 512], "neck": [256, 128, 64]}


class ResNetStages(ResNetTrunk):
    """The ResNet trunk returning every stage: [stride 4, 8, 16, 32] feature maps."""

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        stride4 = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(images)))))
        stride8 = self.layer2(stride4)
        stride16 = self.layer3(stride8)
        return [stride4, stride8, stride16, self.layer4(stride16)]


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SkipNeck(nn.Module):
    """Up-sampling from stride 32 to stride 4 with shortcuts from the trunk.

    Args:
        stage_channels: output channels of the trunk's four stages (stride 4, 8, 16, 32).
        widths: one width per up-sampling level (stride 16, 8, 4), e.g. [256, 128, 64].

    forward(stages: [B x C_i x H/s x W/s for s in 4, 8, 16, 32]) -> B x widths[-1] x H/4 x W/4.
    """

    def __init__(self, stage_channels: list[int], widths: list[int]):
        super().__init__()
        if len(stage_channels) != 4 or len(widths) != 3:
            raise ValueError(
                f"SkipNeck: expected 4 stage widths and 3 neck widths, got {stage_channels} "
                f"and {widths}"
            )
        inputs = [stage_channels[-1], *widths[:-1]]
        self.up = nn.ModuleList(conv_bn_relu(i, o) for i, o in zip(inputs, widths, strict=True))
        # Shortcut k reads the stage at the resolution level k up-samples to: 16, 8, 4.
        shortcut_inputs = stage_channels[-2::-1]
        self.shortcuts = nn.ModuleList(
            conv_bn_relu(i, o) for i, o in zip(shortcut_inputs, widths, strict=True)
        )

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        features = stages[-1]
        for up, shortcut, stage in zip(self.up, self.shortcuts, stages[-2::-1], strict=True):
            coarse = up(features)
            # Interpolate to the stage's own size, not x2: odd input sizes round differently.
            features = F.interpolate(
                coarse, size=stage.shape[-2:], mode="bilinear", align_corners=False
            )
            features = features + shortcut(stage)
        return features


def build_resunet(
    depth: int,
    make_heads: HeadFactory,
    head_conv: int | None = None,
    widths: dict | None = None,
    pretrained: str | Path | None = None,
) -> CenterNet:
    """ResNet-U-Net CenterNet. ``widths`` may override ``stem`` (int), ``stages`` (4 ints) and
    ``neck`` (3 ints, the up-sampling levels from stride 16 to 4); missing keys take the
    defaults (the torchvision trunk, a 256/128/64 neck)."""
    trunk, widths = resnet_trunk(depth, widths, DEFAULT_WIDTHS, pretrained, ResNetStages)
    expansion = DEPTHS[depth][0].expansion
    stage_channels = [width * expansion for width in widths["stages"]]
    neck = SkipNeck(stage_channels, list(widths["neck"]))
    head_conv = DEFAULT_HEAD_CONV if head_conv is None else head_conv
    heads = make_heads(widths["neck"][-1], head_conv)
    init_regression_heads(heads)  # as msra_resnet: regression outputs start close to 0
    return CenterNet(trunk, neck, heads)
