"""DLA-34 CenterNets: the original's pose_dla_dcn (`dla34`) and its DCN-free dlav0 (`dlav0_34`).

Both share the DLA-34 trunk (Yu et al. 2018, "Deep Layer Aggregation"): a stride-1 7x7 stem,
two plain conv levels, then four Trees that halve the resolution and merge their blocks'
outputs in Root nodes (concatenation + 1x1 conv). The trunk returns all six levels, at strides
1, 2, 4, 8, 16 and 32.

- `dla34` upsamples levels 2-5 with DLAUp, then merges the three finest results with one more
  IDAUp. Every projection and aggregation node there is a modulated deformable conv (DCNv2,
  `cuda_ops.ModulatedDeformConv2d`) + BN + ReLU, nodes merge by addition, and upsampling is a
  depthwise transposed conv (``groups = channels``) initialised to bilinear interpolation.
- `dlav0_34` has a plain-conv DLAUp only: 1x1 projections, the same depthwise upsampling, and
  3x3 nodes that merge by concatenation.

Module names are the original's (`base_layer`, `level0`-`level5`, `tree1`/`tree2`/`root`/
`project`, `dla_up.ida_i.proj_j`/`up_j`/`node_j`, `ida_up`): the trunk is the original's `base`
and `dla_up` / `ida_up` sit under `neck`, so original checkpoints import by renaming the
top-level modules only (`detector.original`). Unlike the original, the trunk has no `fc`: the
1000-class ImageNet classifier the original keeps in `base.fc` never runs in the detector.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from cuda_ops import ModulatedDeformConv2d

from .centernet import CenterNet, HeadFactory, regression_heads
from .pretrained import load_trunk_weights
from .widths import merge_widths

# Trunk widths of DLA-34, one per level (strides 1, 2, 4, 8, 16, 32), and the number of
# BasicBlock pairs per Tree level (levels 0 and 1 are single convs).
DEFAULT_CHANNELS = [16, 32, 64, 128, 256, 512]
DEFAULT_WIDTHS = {"channels": DEFAULT_CHANNELS}
DEFAULT_HEAD_CONV = 256
# The heads read stride 4, i.e. level log2(down_ratio 4) = 2 onwards; the original's
# `last_level` 5 makes the final IDAUp merge levels 2, 3 and 4 (after DLAUp).
DOWN_RATIO = 4
FIRST_LEVEL = int(math.log2(DOWN_RATIO))
LAST_LEVEL = 5


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual addition (the original's dla BasicBlock)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        residual = x if residual is None else residual
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + residual)


class Root(nn.Module):
    """Aggregation node: concatenate the children along channels, 1x1 conv + BN + ReLU.
    (DLA-34 uses no root residual, so the original's `residual` option is left out.)"""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, *children: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(torch.cat(children, 1))))


class Tree(nn.Module):
    """A DLA Tree of ``2 ** levels`` BasicBlocks whose outputs are merged by Root nodes.

    The first block downsamples by ``stride`` (the residual is max-pooled, then projected by a
    1x1 conv + BN when the width changes). A ``level_root`` tree also feeds its max-pooled
    input to the deepest Root, and every subtree's output is fed to the Roots after it, so the
    Root of the last leaf concatenates ``2 * out_channels`` plus every earlier child.
    """

    def __init__(
        self,
        levels: int,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        level_root: bool = False,
        root_channels: int = 0,
    ):
        super().__init__()
        root_channels = root_channels or 2 * out_channels
        if level_root:
            root_channels += in_channels
        if levels == 1:
            self.tree1 = BasicBlock(in_channels, out_channels, stride)
            self.tree2 = BasicBlock(out_channels, out_channels)
            self.root = Root(root_channels, out_channels)
        else:
            self.tree1 = Tree(levels - 1, in_channels, out_channels, stride)
            self.tree2 = Tree(
                levels - 1, out_channels, out_channels, root_channels=root_channels + out_channels
            )
        self.levels = levels
        self.level_root = level_root
        self.downsample = nn.MaxPool2d(stride, stride=stride) if stride > 1 else None
        # In a tree of two or more levels this projection is dead weight: the original computes
        # it and hands it to `tree1`, which computes its own residual and ignores it. It is kept
        # so the parameter count and the state-dict keys stay the original's, but never run
        # (pruning leaves it unchanged; its output reaches nothing).
        self.project = None
        if in_channels != out_channels:
            self.project = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor, children: list[torch.Tensor] | None = None) -> torch.Tensor:
        children = [] if children is None else list(children)
        bottom = self.downsample(x) if self.downsample is not None else x
        if self.level_root:
            children.append(bottom)
        if self.levels == 1:
            residual = self.project(bottom) if self.project is not None else bottom
            first = self.tree1(x, residual)
            second = self.tree2(first)
            return self.root(second, first, *children)
        first = self.tree1(x)
        return self.tree2(first, children + [first])


def conv_level(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """One 3x3 conv + BN + ReLU (the original's `_make_conv_level` with one conv)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DLATrunk(nn.Module):
    """DLA-34 without its classifier. forward(images: B x 3 x H x W) returns the six levels,
    ``[B x channels[i] x H / 2**i x W / 2**i for i in 0..5]``."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.base_layer = nn.Sequential(
            nn.Conv2d(3, channels[0], 7, 1, padding=3, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        self.level0 = conv_level(channels[0], channels[0])
        self.level1 = conv_level(channels[0], channels[1], stride=2)
        self.level2 = Tree(1, channels[1], channels[2], 2, level_root=False)
        self.level3 = Tree(2, channels[2], channels[3], 2, level_root=True)
        self.level4 = Tree(2, channels[3], channels[4], 2, level_root=True)
        self.level5 = Tree(1, channels[4], channels[5], 2, level_root=True)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.base_layer(images)
        levels = []
        for level in (self.level0, self.level1, self.level2, self.level3, self.level4, self.level5):
            x = level(x)
            levels.append(x)
        return levels


def bilinear_kernel(kernel_size: int) -> torch.Tensor:
    """(k, k) weights that make a transposed conv with stride ``ceil(k / 2)`` upsample by
    bilinear interpolation: the outer product of the tent ``1 - |i / f - c|`` with
    ``f = ceil(k / 2)`` and centre ``c = (2f - 1 - f % 2) / (2f)``, the original's
    `fill_up_weights` (k = 4 gives [0.25, 0.75, 0.75, 0.25])."""
    factor = math.ceil(kernel_size / 2)
    centre = (2 * factor - 1 - factor % 2) / (2 * factor)
    tent = 1 - (torch.arange(kernel_size, dtype=torch.float64) / factor - centre).abs()
    return torch.outer(tent, tent).float()


def bilinear_upsampling(channels: int, factor: int) -> nn.ConvTranspose2d:
    """Depthwise transposed conv (kernel 2f, stride f, padding f / 2, no bias) upsampling every
    channel by ``factor`` with a bilinear kernel; it stays trainable, as in the original."""
    up = nn.ConvTranspose2d(
        channels,
        channels,
        2 * factor,
        stride=factor,
        padding=factor // 2,
        groups=channels,
        bias=False,
    )
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(2 * factor).expand_as(up.weight))
    return up


class DeformConv(nn.Module):
    """Modulated deformable 3x3 conv (DCNv2, with bias) + BN + ReLU, the original's
    `DeformConv` (keys `conv.weight`, `conv.bias`, `conv.conv_offset_mask.*`, `actf.0.*`)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.actf = nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.conv = ModulatedDeformConv2d(
            in_channels, out_channels, 3, stride=1, padding=1, dilation=1, deformable_groups=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actf(self.conv(x))


class IDAUp(nn.Module):
    """Iterative deep aggregation with deformable convs (pose_dla_dcn).

    For each input ``i >= 1``: project it to ``out_channels`` (`proj_i`), upsample it by
    ``up_factors[i]`` (`up_i`), add the previous (already merged) input and aggregate
    (`node_i`). Input 0 must already have ``out_channels`` at the target resolution.
    """

    def __init__(self, out_channels: int, in_channels: list[int], up_factors: list[int]):
        super().__init__()
        for index in range(1, len(in_channels)):
            self.add_module(f"proj_{index}", DeformConv(in_channels[index], out_channels))
            self.add_module(f"up_{index}", bilinear_upsampling(out_channels, up_factors[index]))
            self.add_module(f"node_{index}", DeformConv(out_channels, out_channels))

    def forward(self, layers: list[torch.Tensor], start: int, end: int) -> list[torch.Tensor]:
        """Merge ``layers[start:end]`` in turn; returns a new list whose entries ``start + 1``
        to ``end - 1`` are replaced by the merged maps (the original updates it in place)."""
        layers = list(layers)
        for index in range(start + 1, end):
            step = index - start
            project = getattr(self, f"proj_{step}")
            upsample = getattr(self, f"up_{step}")
            node = getattr(self, f"node_{step}")
            layers[index] = node(upsample(project(layers[index])) + layers[index - 1])
        return layers


def _ida_tables(channels: list[int], scales: list[int]) -> list[tuple[int, list[int], list[int]]]:
    """(out_channels, in_channels, up_factors) of each IDA stage of DLAUp, coarsest first: stage
    ``i`` merges the last ``i + 2`` maps into width ``channels[j]``, ``j = -i - 2``, after which
    those maps have that width and that map's scale."""
    in_channels, scales = list(channels), list(scales)
    tables = []
    for stage in range(len(channels) - 1):
        j = len(channels) - 2 - stage
        tables.append((channels[j], in_channels[j:], [scale // scales[j] for scale in scales[j:]]))
        scales[j + 1 :] = [scales[j]] * (len(scales) - j - 1)
        in_channels[j + 1 :] = [channels[j]] * (len(in_channels) - j - 1)
    return tables


class DLAUp(nn.Module):
    """pose_dla_dcn's DLAUp over the trunk levels from `FIRST_LEVEL` (channels ``channels``,
    relative scales ``scales``). forward returns one map per input level, finest first: the
    fully merged map at the finest level's resolution, then the partial merges at coarser ones
    (the last is the coarsest level unchanged)."""

    def __init__(self, channels: list[int], scales: list[int]):
        super().__init__()
        for stage, table in enumerate(_ida_tables(channels, scales)):
            self.add_module(f"ida_{stage}", IDAUp(*table))

    def forward(self, layers: list[torch.Tensor]) -> list[torch.Tensor]:
        layers = list(layers)
        merged = [layers[-1]]
        for stage in range(len(layers) - 1):
            ida = getattr(self, f"ida_{stage}")
            layers = ida(layers, len(layers) - stage - 2, len(layers))
            merged.insert(0, layers[-1])
        return merged


class DLANeck(nn.Module):
    """pose_dla_dcn's neck: DLAUp over trunk levels 2-5, then IDAUp over DLAUp's three finest
    outputs. forward(trunk levels) returns B x channels[2] x H/4 x W/4."""

    def __init__(self, channels: list[int]):
        super().__init__()
        levels = channels[FIRST_LEVEL:]
        self.dla_up = DLAUp(levels, [2**i for i in range(len(levels))])
        merged = LAST_LEVEL - FIRST_LEVEL
        self.ida_up = IDAUp(levels[0], levels[:merged], [2**i for i in range(merged)])

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        pyramid = self.dla_up(levels[FIRST_LEVEL:])
        merged = LAST_LEVEL - FIRST_LEVEL
        return self.ida_up(pyramid[:merged], 0, merged)[-1]


def _init_like_dlav0(module: nn.Module) -> None:
    """dlav0's initialisation: conv weights N(0, 2 / (k * k * out_channels)) (He, fan-out),
    BatchNorm 1 / 0; transposed convs keep their bilinear weights."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            fan_out = layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels
            nn.init.normal_(layer.weight, std=math.sqrt(2 / fan_out))
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class IDAUpV0(nn.Module):
    """dlav0's iterative deep aggregation: every input ``i`` is projected to ``out_channels``
    (`proj_i`: 1x1 conv + BN + ReLU, identity when already that wide) and upsampled
    (`up_i`, identity for factor 1); then ``x = node_i(cat(x, input_i))`` in turn, each node a
    3x3 conv + BN + ReLU. forward returns every node's output, the last fully merged."""

    def __init__(self, out_channels: int, in_channels: list[int], up_factors: list[int]):
        super().__init__()
        node_kernel = 3
        for index, (width, factor) in enumerate(zip(in_channels, up_factors, strict=True)):
            project = (
                nn.Identity() if width == out_channels else _conv_bn_relu(width, out_channels, 1)
            )
            upsample = nn.Identity() if factor == 1 else bilinear_upsampling(out_channels, factor)
            self.add_module(f"proj_{index}", project)
            self.add_module(f"up_{index}", upsample)
        for index in range(1, len(in_channels)):
            node = _conv_bn_relu(2 * out_channels, out_channels, node_kernel)
            self.add_module(f"node_{index}", node)
        _init_like_dlav0(self)

    def forward(self, layers: list[torch.Tensor]) -> list[torch.Tensor]:
        layers = [
            getattr(self, f"up_{index}")(getattr(self, f"proj_{index}")(layer))
            for index, layer in enumerate(layers)
        ]
        x = layers[0]
        outputs = []
        for index in range(1, len(layers)):
            x = getattr(self, f"node_{index}")(torch.cat([x, layers[index]], 1))
            outputs.append(x)
        return outputs


class DLAUpV0(nn.Module):
    """dlav0's DLAUp: the same stage table as pose_dla_dcn's, with `IDAUpV0` stages whose
    node outputs replace the merged maps. forward returns the final map, at the finest level's
    resolution with its width."""

    def __init__(self, channels: list[int], scales: list[int]):
        super().__init__()
        for stage, table in enumerate(_ida_tables(channels, scales)):
            self.add_module(f"ida_{stage}", IDAUpV0(*table))

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        layers = list(layers)
        for stage in range(len(layers) - 1):
            outputs = getattr(self, f"ida_{stage}")(layers[-stage - 2 :])
            layers[-stage - 1 :] = outputs
        return outputs[-1]


class DLAV0Neck(nn.Module):
    """dlav0's neck: DLAUpV0 over trunk levels 2-5. forward(trunk levels) returns
    B x channels[2] x H/4 x W/4."""

    def __init__(self, channels: list[int]):
        super().__init__()
        levels = channels[FIRST_LEVEL:]
        self.dla_up = DLAUpV0(levels, [2**i for i in range(len(levels))])

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.dla_up(levels[FIRST_LEVEL:])


def load_imagenet_weights(trunk: DLATrunk, path: str | Path) -> None:
    """Load the DLA-34 ImageNet weights (the original's dla34-ba72cf86.pth: keys `base_layer.*`,
    `level0.*`, ..., `fc.*`, sometimes under `base.`) from a local file; the classifier `fc.*` is
    ignored and every trunk tensor must be present with its shape. Nothing is downloaded."""
    load_trunk_weights(
        trunk,
        path,
        expected="DLA-34 ImageNet weights at the original widths",
        strip_prefixes=("module.", "base."),
    )


def build_dla(
    version: str,
    make_heads: HeadFactory,
    head_conv: int | None = None,
    widths: dict | None = None,
    pretrained: str | Path | None = None,
) -> CenterNet:
    """DLA-34 CenterNet: ``version`` "dcn" is pose_dla_dcn (`dla34`), "v0" is dlav0
    (`dlav0_34`). ``widths`` may override ``channels``, the six trunk level widths; the neck's
    widths follow from them as in the original. The heads read the neck's
    ``channels[2]``-wide stride-4 map."""
    if version not in ("dcn", "v0"):
        raise ValueError(f"DLA version {version!r} not supported; known versions: 'dcn', 'v0'")
    channels = list(merge_widths(DEFAULT_WIDTHS, widths)["channels"])
    trunk = DLATrunk(channels)
    if version == "v0":
        _init_like_dlav0(trunk)  # pose_dla_dcn's trunk keeps PyTorch's default init
    if pretrained is not None:
        load_imagenet_weights(trunk, pretrained)
    neck = DLANeck(channels) if version == "dcn" else DLAV0Neck(channels)
    head_conv = DEFAULT_HEAD_CONV if head_conv is None else head_conv
    heads = make_heads(channels[FIRST_LEVEL], head_conv)
    # The originals' fill_fc_weights: every conv of the regression heads gets a zero bias;
    # pose_dla_dcn keeps the default weights, dlav0 draws them from N(0, 0.001).
    for head in regression_heads(heads):
        for layer in head.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.zeros_(layer.bias)
                if version == "v0":
                    nn.init.normal_(layer.weight, std=0.001)
    return CenterNet(trunk, neck, heads)
