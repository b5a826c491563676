"""TTFNet (Liu et al. 2020, github ZJULearning/ttfnet): a ResNet trunk, an up-sampling neck of
modulated deformable convs with U-Net-style shortcuts from the trunk, and the heads.

The original's ``configs/ttfnet/ttfnet_r18_*.py`` and ``ttfnet_r34_*.py`` (mmdet v1, ``TTFHead``
in ``mmdet/models/anchor_heads/ttf_head.py``). Per up-sampling level, from the stride-32 map:

    DCN 3x3 (in -> p) + BN + ReLU, bilinear x2 (align_corners=True), + shortcut(trunk stage)

with p = 256, 128, 64; the shortcut of level i reads the trunk stage at the new resolution
(stride 16, 8, 4) through 1, 2, 3 convs 3x3 (with bias, ReLU between them, none after the
last). The heads read the 64-channel stride-4 map. With ``model.head: ttfnet`` (and the default
``head_conv`` 128) they are the original's: a heatmap branch of two 3x3 convs of 128 and a box
branch of one (TTFNet-18) or two (TTFNet-34) 3x3 convs of 64 (`detector.ttfnet.heads`). Any
other head type reads the same neck (e.g. the CenterNet heads, for comparing heads on one neck).

Where the original keeps its neck inside the head (``bbox_head.deconv_layers``,
``bbox_head.shortcut_layers``), ctprune keeps it in ``neck``; `original_key` maps the names.
The trunk is `resnet.ResNetTrunk` returning every stage: mmdet's ResNet has torchvision's
keys (``conv1``, ``bn1``, ``layer1.0.conv1``, ...), so its ``backbone.*`` keys load unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cuda_ops import ModulatedDeformConv2d

from .centernet import CenterNet, HeadFactory
from .resnet import DEPTHS, resnet_trunk
from .resunet import ResNetStages

DEFAULT_WIDTHS = {
    "stem": 64,
    "stages": [64, 128, 256, 512],
    "neck": [256, 128, 64],
    # Convs per shortcut, from the stride-16 level to the stride-4 one (the configs'
    # ``shortcut_cfg``): more layers where the trunk stage is shallower.
    "shortcut_convs": [1, 2, 3],
}
# The configs' ``head_conv``: the heatmap branch's width (the box branch's ``wh_conv`` 64 is
# `build_ttfnet_heads`' default of half of it).
DEFAULT_HEAD_CONV = 128
# The configs' ``wh_head_conv_num``: 3x3 convs in the box branch.
LTRB_CONVS = {18: 1, 34: 2}


class ShortcutNeck(nn.Module):
    """TTFNet's up-sampling path from stride 32 to stride 4 with shortcuts from the trunk.

    Args:
        stage_channels: output channels of the trunk's four stages (stride 4, 8, 16, 32).
        widths: one width per up-sampling level (stride 16, 8, 4), e.g. [256, 128, 64].
        shortcut_convs: 3x3 convs in each level's shortcut, e.g. [1, 2, 3].

    forward(stages: [B x C_i x H/s x W/s for s in 4, 8, 16, 32]) -> B x widths[-1] x H/4 x W/4.

    ``upsample[i]`` is the original's ``deconv_layers[i]`` without its parameter-free
    ``UpsamplingBilinear2d``: the interpolation runs in `forward`, to the shortcut stage's own
    size, which equals the original's x2 for inputs that are multiples of 32 (the original pads
    to 32) and still adds up for other sizes.
    """

    def __init__(self, stage_channels: list[int], widths: list[int], shortcut_convs: list[int]):
        super().__init__()
        if len(stage_channels) != 4 or len(widths) != 3 or len(shortcut_convs) != 3:
            raise ValueError(
                f"ShortcutNeck: expected 4 stage widths, 3 neck widths and 3 shortcut conv "
                f"counts, got {stage_channels}, {widths} and {shortcut_convs}"
            )
        inputs = [stage_channels[-1], *widths[:-1]]
        self.upsample = nn.ModuleList(
            nn.Sequential(
                ModulatedDeformConv2d(in_channels, width, kernel_size=3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
            for in_channels, width in zip(inputs, widths, strict=True)
        )
        # Shortcut i reads the stage at the resolution level i up-samples to: 16, 8, 4.
        self.shortcuts = nn.ModuleList(
            shortcut(in_channels, width, count)
            for in_channels, width, count in zip(
                stage_channels[-2::-1], widths, shortcut_convs, strict=True
            )
        )

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        features = stages[-1]
        for upsample, shortcut_layers, stage in zip(
            self.upsample, self.shortcuts, stages[-2::-1], strict=True
        ):
            # The original's nn.UpsamplingBilinear2d, which aligns corners.
            features = F.interpolate(
                upsample(features), size=stage.shape[-2:], mode="bilinear", align_corners=True
            )
            features = features + shortcut_layers(stage)
        return features


def shortcut(in_channels: int, out_channels: int, num_convs: int) -> nn.Sequential:
    """The original's ``ShortcutConv2d``: ``num_convs`` convs 3x3 with bias, a ReLU between
    consecutive ones and none after the last (its output is added to the up-sampled map before
    the next level's DCN); kaiming-normal (fan_out) weights and zero bias, as its
    ``init_weights``."""
    layers: list[nn.Module] = []
    for index in range(num_convs):
        if index > 0:
            layers.append(nn.ReLU(inplace=True))
        conv = nn.Conv2d(in_channels if index == 0 else out_channels, out_channels, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers.append(conv)
    return nn.Sequential(*layers)


def build_ttfnet(
    depth: int,
    make_heads: HeadFactory,
    head_conv: int | None = None,
    widths: dict | None = None,
    pretrained: str | Path | None = None,
) -> CenterNet:
    """TTFNet-18 / TTFNet-34. ``widths`` may override ``stem`` (int), ``stages`` (4 ints),
    ``neck`` (3 ints, the up-sampling levels from stride 16 to 4) and ``shortcut_convs`` (3
    positive ints); missing keys take the original's. ``head_conv`` None takes the original's
    128."""
    if depth not in LTRB_CONVS:
        raise ValueError(f"TTFNet depth {depth} not supported; known depths: {sorted(LTRB_CONVS)}")
    trunk, widths = resnet_trunk(depth, widths, DEFAULT_WIDTHS, pretrained, ResNetStages)
    expansion = DEPTHS[depth][0].expansion
    stage_channels = [width * expansion for width in widths["stages"]]
    neck = ShortcutNeck(stage_channels, list(widths["neck"]), list(widths["shortcut_convs"]))
    head_conv = DEFAULT_HEAD_CONV if head_conv is None else head_conv
    # The original's box-branch depth applies to the TTFNet head only.
    options = {"ttfnet": {"ltrb_convs": LTRB_CONVS[depth]}}
    heads = make_heads(widths["neck"][-1], head_conv, options=options)
    return CenterNet(trunk, neck, heads)


# The original's names of the heads' modules: ``hm`` and ``wh`` are Sequentials of mmdet
# ``ConvModule``s (the conv under ``.conv``, its ReLU without parameters) and a last bare conv;
# ours interleave conv and ReLU, so original element k is our element 2k.
_ORIGINAL_HEADS = {"hm": "heatmap", "wh": "ltrb"}
_HEAD_KEY = re.compile(r"bbox_head\.(hm|wh)\.(\d+)\.(?:conv\.)?(weight|bias)")
_UPSAMPLE_KEY = re.compile(r"bbox_head\.deconv_layers\.(\d+)\.(.*)")
_SHORTCUT_KEY = re.compile(r"bbox_head\.shortcut_layers\.(\d+)\.layers\.(.*)")


def original_key(key: str) -> str:
    """An original TTFNet (mmdet v1) state-dict key -> ours: ``backbone.*`` unchanged;
    ``bbox_head.deconv_layers.{i}.*`` -> ``neck.upsample.{i}.*``;
    ``bbox_head.shortcut_layers.{i}.layers.*`` -> ``neck.shortcuts.{i}.*``;
    ``bbox_head.{hm,wh}.{k}[.conv].*`` -> ``heads.{heatmap,ltrb}.{2k}.*``. Other keys are
    returned unchanged (and then fail the strict load, named)."""
    if match := _HEAD_KEY.fullmatch(key):
        branch, index, kind = match.groups()
        return f"heads.{_ORIGINAL_HEADS[branch]}.{2 * int(index)}.{kind}"
    if match := _UPSAMPLE_KEY.fullmatch(key):
        return f"neck.upsample.{match[1]}.{match[2]}"
    if match := _SHORTCUT_KEY.fullmatch(key):
        return f"neck.shortcuts.{match[1]}.{match[2]}"
    return key
