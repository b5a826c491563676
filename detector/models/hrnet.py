"""HRNet: a high-resolution trunk (HRNetV2-W18 / -W32), a concatenating neck and CenterNet heads.

The fourth pruning seed (HrCenterNet) puts an HRNet in CenterNet; this is that backbone for the
ctdet heads. The trunk is HRNet's (Sun et al., 2019; the classification release's layout):
two 3x3 stride-2 convs (stride 4), four Bottlenecks, then stages 2-4 with 2, 3 and 4 parallel
branches at strides 4, 8, 16, 32 and widths C, 2C, 4C, 8C (C = 18 or 32), built from BasicBlocks
and ending every module with a fusion: each branch receives the sum of every branch, resampled
(1x1 conv + BN + nearest upsampling from lower resolutions, stride-2 3x3 convs from higher
ones), then a ReLU. The trunk returns all four branches.

The neck is HRNetV2's representation head: the lower-resolution branches are upsampled
bilinearly to stride 4, concatenated (C + 2C + 4C + 8C channels) and mixed by a 1x1 conv + BN +
ReLU, as wide as the concatenation by default; the heads (3x3 conv of ``head_conv`` = 64, the
original's default for every non-DLA backbone, + ReLU + 1x1) read it. Output stride 4; input
sides must be multiples of 32.

Module names follow the HRNet release (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``layer1``,
``transition1``, ``stage2.0.branches.0.0.conv1``, ``stage2.0.fuse_layers.0.1.0``, ...), so its
ImageNet checkpoints (and timm's ``hrnet_w18`` / ``hrnet_w32`` state dicts, which share them)
load from a local file with ``pretrained=``; their classification-only modules
(``incre_modules``, ``downsamp_modules``, ``final_layer``, ``classifier``) are dropped. Nothing is
downloaded (without them the trunk keeps PyTorch's default initialisation). Where the release
has ``None`` (a branch without transition, a branch's fusion with itself) this trunk has
``nn.Identity``: no parameters either way, so the keys are the same.

Pruning: every fusion adds all branches into each branch, so torch-pruning's dependency graph
couples each branch's channels across all of a stage's modules with the fusion convs writing
into them; nothing here needs special handling (no split or chunk of a conv output, no widths
read in forward).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .centernet import CenterNet, HeadFactory
from .pretrained import load_trunk_weights
from .widths import merge_widths

# HRNetV2-W{C}: branch widths C * (1, 2, 4, 8); stages 2-4 repeat 1, 4 and 3 modules; every
# branch of every module, and stage 1, has 4 blocks.
BASE_WIDTHS = {
    "stem": 64,
    "stage1": 64,
    "branches": None,
    "modules": [1, 4, 3],
    "blocks": 4,
    "neck": None,
}
DEFAULT_HEAD_CONV = 64
# Modules of the classification release that the detection trunk does not use.
CLASSIFIER_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def default_widths(channels: int) -> dict:
    """The widths of HRNetV2-W{channels}: branches C, 2C, 4C, 8C; the neck as wide as their
    concatenation."""
    branches = [channels * 2**index for index in range(4)]
    return {**BASE_WIDTHS, "branches": branches, "neck": sum(branches)}


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
) -> list[nn.Module]:
    return [
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    ]


def _blocks(block: type[nn.Module], in_channels: int, width: int, count: int) -> nn.Sequential:
    """``count`` blocks of ``width`` (x expansion) channels; the first gets a 1x1 conv + BN
    downsample when the input width differs."""
    out_channels = width * block.expansion
    downsample = None
    if in_channels != out_channels:
        downsample = nn.Sequential(*_conv_bn(in_channels, out_channels, 1))
    layers = [block(in_channels, width, 1, downsample)]
    layers += [block(out_channels, width) for _ in range(count - 1)]
    return nn.Sequential(*layers)


def _transition(previous: list[int], current: list[int]) -> nn.ModuleList:
    """From a stage's branches to the next stage's: a 3x3 conv + BN + ReLU where a width
    changes (identity otherwise); each new branch comes from the lowest-resolution one through
    stride-2 3x3 convs, one per halving."""
    layers: list[nn.Module] = []
    for index, width in enumerate(current):
        if index < len(previous):
            if width == previous[index]:
                layers.append(nn.Identity())
            else:
                layers.append(
                    nn.Sequential(*_conv_bn(previous[index], width, 3), nn.ReLU(inplace=True))
                )
            continue
        steps = []
        halvings = index + 1 - len(previous)
        for step in range(halvings):
            in_channels = previous[-1]
            out_channels = width if step == halvings - 1 else in_channels
            steps.append(
                nn.Sequential(
                    *_conv_bn(in_channels, out_channels, 3, stride=2), nn.ReLU(inplace=True)
                )
            )
        layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


def _fusion(source: int, target: int, widths: list[int]) -> nn.Module:
    """Resample branch ``source`` to branch ``target``'s resolution and width."""
    if source == target:
        return nn.Identity()
    if source > target:  # lower resolution: 1x1 conv + BN, then nearest upsampling
        return nn.Sequential(
            *_conv_bn(widths[source], widths[target], 1),
            nn.Upsample(scale_factor=2 ** (source - target), mode="nearest"),
        )
    steps = []  # higher resolution: stride-2 3x3 convs, ReLU between them but not after the last
    for step in range(target - source):
        if step == target - source - 1:
            steps.append(nn.Sequential(*_conv_bn(widths[source], widths[target], 3, stride=2)))
        else:
            steps.append(
                nn.Sequential(*_conv_bn(widths[source], widths[source], 3, stride=2), nn.ReLU())
            )
    return nn.Sequential(*steps)


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks, then every branch receives the sum of all branches.

    forward(list of B x widths[i] x H/2^i x W/2^i) -> a list of the same shapes."""

    def __init__(self, widths: list[int], blocks: int):
        super().__init__()
        self.branches = nn.ModuleList(_blocks(BasicBlock, width, width, blocks) for width in widths)
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(_fusion(source, target, widths) for source in range(len(widths)))
            for target in range(len(widths))
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, branches: list[torch.Tensor]) -> list[torch.Tensor]:
        branches = [branch(x) for branch, x in zip(self.branches, branches, strict=True)]
        fused = []
        for fusions in self.fuse_layers:
            total = fusions[0](branches[0])
            for fusion, x in zip(fusions[1:], branches[1:], strict=True):
                total = total + fusion(x)
            fused.append(self.relu(total))
        return fused


class HRNetTrunk(nn.Module):
    """Stem (stride 4), stage 1 (Bottlenecks), stages 2-4 (2, 3, 4 branches). ``stem_relu``
    False leaves out the ReLU between the two stem convs, as HrCenterNet's HRNet does
    (`detector.triplet.hrcenternet`); no parameters either way.

    forward(images: B x 3 x H x W) -> [B x branches[i] x H/(4 * 2^i) x W/(4 * 2^i), i = 0..3].
    """

    def __init__(
        self,
        stem_width: int = 64,
        stage1_width: int = 64,
        branches: tuple[int, ...] = (18, 36, 72, 144),
        modules: tuple[int, ...] = (1, 4, 3),
        blocks: int = 4,
        stem_relu: bool = True,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu1 = nn.ReLU(inplace=True) if stem_relu else nn.Identity()
        self.conv2 = nn.Conv2d(stem_width, stem_width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _blocks(Bottleneck, stem_width, stage1_width, blocks)
        previous = [stage1_width * Bottleneck.expansion]
        for stage, count in enumerate(modules, start=2):
            widths = list(branches[:stage])
            self.add_module(f"transition{stage - 1}", _transition(previous, widths))
            self.add_module(
                f"stage{stage}",
                nn.Sequential(*(HighResolutionModule(widths, blocks) for _ in range(count))),
            )
            previous = widths

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(images))))))
        branches = [self.layer1(x)]
        for stage in (2, 3, 4):
            transition = getattr(self, f"transition{stage - 1}")
            # Existing branches pass through (or change width); new ones come from the last.
            branches = [
                layer(branches[min(index, len(branches) - 1)])
                for index, layer in enumerate(transition)
            ]
            branches = getattr(self, f"stage{stage}")(branches)
        return branches


class UpsampleConcat(nn.Module):
    """[B x C_i x H/2^i x W/2^i] -> B x sum(C_i) x H x W: every branch bilinearly upsampled to
    the first one's size (HRNetV2's representation), then concatenated along channels."""

    def forward(self, branches: list[torch.Tensor]) -> torch.Tensor:
        size = branches[0].shape[-2:]
        upsampled = [branches[0]] + [
            F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in branches[1:]
        ]
        return torch.cat(upsampled, dim=1)


def load_imagenet_weights(trunk: HRNetTrunk, path: str | Path) -> None:
    """Load an HRNet ImageNet state dict (the release's ``hrnetv2_w18_imagenet_pretrained.pth``
    or timm's ``hrnet_w18`` weights) from a local file. Classification-only modules
    (`CLASSIFIER_PREFIXES`) are not part of the trunk and are ignored; every trunk tensor must be
    present with its shape. Nothing is downloaded."""
    load_trunk_weights(
        trunk,
        path,
        expected="HRNet ImageNet weights of the same width, e.g. "
        "hrnetv2_w18_imagenet_pretrained.pth for hrnet_w18",
    )


def build_hrnet(
    channels: int,
    make_heads: HeadFactory,
    head_conv: int | None = None,
    widths: dict | None = None,
    pretrained: str | Path | None = None,
) -> CenterNet:
    """HRNetV2-W{channels} CenterNet (``hrnet_w18``, ``hrnet_w32``). ``widths`` may override
    ``stem`` (int), ``stage1`` (the Bottlenecks' inner width; they output 4x), ``branches``
    (4 ints), ``modules`` (modules in stages 2-4), ``blocks`` (blocks per branch and in stage 1)
    and ``neck`` (the 1x1 conv's width; None: the concatenation's); missing keys take
    HRNetV2-W{channels}'s."""
    widths = merge_widths(default_widths(channels), widths, nullable=("neck",))
    branches, modules = list(widths["branches"]), list(widths["modules"])
    trunk = HRNetTrunk(
        widths["stem"], widths["stage1"], tuple(branches), tuple(modules), widths["blocks"]
    )
    if pretrained is not None:
        load_imagenet_weights(trunk, pretrained)
    neck_width = sum(branches) if widths["neck"] is None else widths["neck"]
    neck = nn.Sequential(
        UpsampleConcat(), *_conv_bn(sum(branches), neck_width, 1), nn.ReLU(inplace=True)
    )
    head_conv = DEFAULT_HEAD_CONV if head_conv is None else head_conv
    return CenterNet(trunk, neck, make_heads(neck_width, head_conv))
