"""The CenterNet meta-architecture: backbone -> neck -> one small head per output.

Every backbone family builds its trunk and neck in its own file and assembles them here. The
model returns raw head outputs in every mode; losses, decoding and distillation are separate
functions that take them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cuda_ops import ModulatedDeformConv2d

# The original initialises the heatmap's last bias to the constant -2.19, its rounding of
# -log((1 - prior) / prior) for a prior of 0.1; sigmoid(-2.19) = 0.1006. Keeping its constant
# keeps fresh models identical to the original's.
HEATMAP_BIAS_INIT = -2.19

HeadFactory = Callable[..., nn.Module]
"""``make_heads(in_channels, head_conv, options=None)`` -> the heads of one stack: a module
mapping the neck's features (B x in_channels x H/4 x W/4) to the dict of raw outputs, with
``output_convs()``. `build_model` binds it from the head table (`detector.heads.head_factory`,
which documents ``options``); every backbone family calls it with its neck width and its
default head width."""


class CenterNet(nn.Module):
    """A single-stack CenterNet.

    forward(images: B x 3 x H x W) returns ``[{"heatmap": B x C x H/4 x W/4 (logits),
    "wh": B x 2 x H/4 x W/4, "offset": B x 2 x H/4 x W/4}]`` in train and eval mode alike: a
    list with one dict per stack, so multi-stack models (hourglass) share the contract. With
    ``return_features=True`` the dict also holds ``features``, the neck output the heads read.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, heads: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.heads = heads

    def forward(
        self, images: torch.Tensor, return_features: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        features = self.neck(self.backbone(images))
        outputs = self.heads(features)
        if return_features:
            outputs["features"] = features
        return [outputs]


class HeadSet(nn.ModuleDict):
    """One head per output, each reading the same features (`FusedHeads` runs them fused)."""

    head_type = "centernet"
    """The head-table entry that builds this module (`detector.heads.head_type_of`)."""

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.items()}

    def output_convs(self) -> list[nn.Conv2d]:
        """The last conv of every head: its output channels are the model's outputs."""
        return [head[-1] for head in self.values()]


class FusedHeads(nn.Module):
    """The heads of a deployed model (`fuse_heads`) with their first 3x3 convs merged into one:
    the features are read once, and one wide conv does the work of three narrow ones, which
    after pruning run far below their ideal speed on CPU. The same outputs as the heads."""

    head_type = "centernet"

    def __init__(self, first: nn.Conv2d, lasts: dict[str, nn.Conv2d]):
        super().__init__()
        self.first = first
        self.lasts = nn.ModuleDict(lasts)
        self.splits = [conv.in_channels for conv in lasts.values()]

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.relu(self.first(features)).split(self.splits, dim=1)
        return {
            name: conv(part) for (name, conv), part in zip(self.lasts.items(), hidden, strict=True)
        }

    def output_convs(self) -> list[nn.Conv2d]:
        return list(self.lasts.values())


def per_output_heads(in_channels: int, head_conv: int, outputs: dict[str, int]) -> HeadSet:
    """The centernet head type's heads (`build_heads`) as one module."""
    return HeadSet(build_heads(in_channels, head_conv, outputs))


def build_heads(
    in_channels: int, head_conv: int, outputs: dict[str, int]
) -> dict[str, nn.Sequential]:
    """One head per output (name -> channels, from the head table: `HeadType.output_channels`):
    3x3 conv(head_conv) + ReLU + 1x1 conv, or a lone 1x1 conv when ``head_conv`` is 0, as in
    the original. Only the class heatmaps' last bias (`is_class_heatmap`) is initialised here;
    each backbone family applies its own initialisation to the regression heads."""
    heads = {}
    for name, channels in outputs.items():
        if head_conv > 0:
            head = nn.Sequential(
                nn.Conv2d(in_channels, head_conv, kernel_size=3, padding=1, bias=True),
                nn.ReLU(inplace=True),
                nn.Conv2d(head_conv, channels, kernel_size=1),
            )
        else:
            head = nn.Sequential(nn.Conv2d(in_channels, channels, kernel_size=1))
        if is_class_heatmap(name):
            nn.init.constant_(head[-1].bias, HEATMAP_BIAS_INIT)
        heads[name] = head
    return heads


def is_class_heatmap(output_name: str) -> bool:
    """Outputs named ``heatmap`` or ``*_heatmap`` (the triplet's ``tl_heatmap``, ...) are class
    heatmaps (logits); every other output is a regression (centernet: ``wh``, ``offset``)."""
    return output_name == "heatmap" or output_name.endswith("_heatmap")


def regression_heads(heads: nn.Module) -> list[nn.Sequential]:
    """The heads each backbone family initialises as regression outputs the original's way,
    in build order: the non-heatmap heads of a `HeadSet`. Other head types (TTFNet, the
    keypoint triplet) initialise their own heads as their originals do: none here."""
    if not isinstance(heads, HeadSet):
        return []
    return [head for name, head in heads.items() if not is_class_heatmap(name)]


def output_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose output channels must never be pruned: every head module's
    ``output_convs()`` in every stack (the model's outputs), and the offset/mask conv of every
    deformable conv (its output channels are the kernel taps' offsets and mask). The one place
    pruning asks."""
    heads: list[nn.Module] = []
    for module in model.modules():
        if callable(getattr(module, "output_convs", None)):
            heads += [conv for conv in module.output_convs() if conv not in heads]
    offsets = [
        module.conv_offset_mask
        for module in model.modules()
        if isinstance(module, ModulatedDeformConv2d)
    ]
    return heads + offsets


def deconv_neck(in_channels: int, widths: list[int], kernel_size: int = 4) -> nn.Sequential:
    """The msra_resnet neck: per width, ConvTranspose(k4, s2, p1, no bias) + BN + ReLU, each
    doubling the resolution. Initialised as the original: deconv weights N(0, 0.001), BN 1/0."""
    layers: list[nn.Module] = []
    for width in widths:
        deconv = nn.ConvTranspose2d(
            in_channels, width, kernel_size, stride=2, padding=(kernel_size - 2) // 2, bias=False
        )
        nn.init.normal_(deconv.weight, std=0.001)
        layers += [deconv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers)
