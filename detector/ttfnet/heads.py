"""The TTFNet head: a class-heatmap branch and a box branch that predicts, at every output-map
location, the distances to the left, top, right and bottom sides of the object's box.

As the original ``TTFHead`` (ZJULearning/ttfnet, ``mmdet/models/anchor_heads/ttf_head.py``)
builds and initialises its ``hm`` and ``wh`` heads; its upsampling neck is not part of the head
here (each backbone family brings its own neck).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The original's ``wh_offset_base``: the box branch's output is relu(x) * 16, so that a small
# initial output already spans a useful range of distances in input pixels.
WH_OFFSET_BASE = 16.0
# The heatmap's last bias starts at the logit of this probability (the original's
# ``bias_init_with_prob(0.01)``), not CenterNet's 0.1.
HEATMAP_PRIOR = 0.01
# The original's ``normal_init`` standard deviations of every conv in each branch (biases 0).
HEATMAP_INIT_STD = 0.01
LTRB_INIT_STD = 0.001
# Distances to the four sides; class-agnostic (the original's ``wh_agnostic=True``).
LTRB_CHANNELS = 4
OUTPUT_NAMES = ("heatmap", "ltrb")


class TTFNetHeads(nn.ModuleDict):
    """The two branches of one stack, reading the same features.

    forward(features: B x in_channels x H x W) -> ``{"heatmap": B x C x H x W logits,
    "ltrb": B x 4 x H x W}``; ``ltrb`` = relu(branch(features)) * `WH_OFFSET_BASE`: the
    distances (>= 0) from each location to the box's left, top, right and bottom sides in
    **input pixels**. Each branch is an ``nn.Sequential`` ending with its output 1x1 conv, so
    module paths read ``heatmap.0``, ``ltrb.2`` as in the CenterNet heads.
    """

    head_type = "ttfnet"

    def __init__(self, heatmap: nn.Sequential, ltrb: nn.Sequential):
        super().__init__({"heatmap": heatmap, "ltrb": ltrb})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "heatmap": self["heatmap"](features),
            "ltrb": torch.relu(self["ltrb"](features)) * WH_OFFSET_BASE,
        }

    def output_convs(self) -> list[nn.Conv2d]:
        """The convs whose output channels are the model's outputs (never pruned)."""
        return [self["heatmap"][-1], self["ltrb"][-1]]


def _branch(
    in_channels: int, width: int, num_convs: int, out_channels: int, std: float
) -> nn.Sequential:
    """``num_convs`` x (3x3 conv(width) + ReLU), then a 1x1 conv; every conv N(0, std), bias 0
    (the original's ``build_head`` with mmdet's ``ConvModule``: conv with bias, no norm, ReLU)."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        in_channels = width
    layers.append(nn.Conv2d(in_channels, out_channels, 1))
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"build_ttfnet_heads: {name} must be an integer >= 0, got {value!r}")
    return value


def build_ttfnet_heads(
    in_channels: int,
    head_conv: int,
    outputs: dict[str, int],
    *,
    heatmap_convs: int = 2,
    ltrb_convs: int = 1,
    ltrb_width: int | None = None,
) -> TTFNetHeads:
    """The TTFNet head of one stack (a `TTFNetHeads`).

    in_channels: channels of the neck's features (B x in_channels x H/4 x W/4).
    head_conv: width of the heatmap branch's 3x3 convs; 0 builds both branches as a lone 1x1
        conv (as the original's ``build_head`` with no convs).
    outputs: ``{"heatmap": C, "ltrb": 4}`` (the head table's ``ttfnet`` outputs).
    heatmap_convs: 3x3 conv + ReLU layers in the heatmap branch (the original's
        ``hm_head_conv_num``: 2 in every TTFNet config).
    ltrb_convs: 3x3 conv + ReLU layers in the box branch (``wh_head_conv_num``: 1 in
        TTFNet-18's configs, 2 in TTFNet-34's and the DarkNet-53 ones).
    ltrb_width: width of the box branch's 3x3 convs (the original's ``wh_conv``); None takes
        ``max(1, head_conv // 2)``.

    Default widths: the original pairs ``head_conv=128`` with ``wh_conv=64`` on a 64-channel
    neck output; our backbones come with their own ``head_conv`` (64 for the msra ResNets, 256
    for DLA and hourglass), so the box branch keeps the original's ratio and gets half of it.
    At ``head_conv=128, ltrb_width=64`` on 64 input channels this is exactly the original
    TTFNet-18 head (``ltrb_convs=2``: TTFNet-34's).

    Initialisation as the original's ``init_weights``: every heatmap conv N(0, 0.01) with zero
    bias, the last bias ``-log((1 - 0.01) / 0.01)`` (prior 0.01); every box conv N(0, 0.001)
    with zero bias.
    """
    if set(outputs) != set(OUTPUT_NAMES):
        raise ValueError(
            f"build_ttfnet_heads: outputs must name exactly {list(OUTPUT_NAMES)}, "
            f"got {list(outputs)}"
        )
    if outputs["ltrb"] != LTRB_CHANNELS:
        raise ValueError(
            f"build_ttfnet_heads: outputs['ltrb'] must be {LTRB_CHANNELS} (class-agnostic "
            f"distances to the four sides), got {outputs['ltrb']!r}"
        )
    for name, value in (("in_channels", in_channels), ("outputs['heatmap']", outputs["heatmap"])):
        if _check_count(name, value) < 1:
            raise ValueError(f"build_ttfnet_heads: {name} must be >= 1, got {value!r}")
    _check_count("head_conv", head_conv)
    _check_count("heatmap_convs", heatmap_convs)
    _check_count("ltrb_convs", ltrb_convs)
    if ltrb_width is None:
        ltrb_width = max(1, head_conv // 2)
    elif _check_count("ltrb_width", ltrb_width) < 1:
        raise ValueError(f"build_ttfnet_heads: ltrb_width must be >= 1, got {ltrb_width!r}")
    if head_conv == 0:
        heatmap_convs = ltrb_convs = 0

    heatmap = _branch(in_channels, head_conv, heatmap_convs, outputs["heatmap"], HEATMAP_INIT_STD)
    nn.init.constant_(heatmap[-1].bias, -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
    ltrb = _branch(in_channels, ltrb_width, ltrb_convs, LTRB_CHANNELS, LTRB_INIT_STD)
    return TTFNetHeads(heatmap, ltrb)
