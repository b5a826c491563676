"""The keypoint-triplet head (Duan et al., CenterNet: Keypoint Triplets): cascade corner pooling
and center pooling, then a heatmap, an embedding and an offset head per keypoint type.

One `TripletHeads` maps a stack's features (B x in_channels x H/4 x W/4, the hourglass's
``cnvs`` output or any backbone's neck output) to one dict of raw outputs:

- ``tl_heatmap``, ``br_heatmap``, ``ct_heatmap``: B x C x H/4 x W/4 class logits (top-left
  corners, bottom-right corners, centers);
- ``tl_embedding``, ``br_embedding``: B x 1 x ... associative embeddings pairing corners;
- ``tl_offset``, ``br_offset``, ``ct_offset``: B x 2 x ... sub-cell offsets.

The top-left outputs read the top-left pooling's features, the bottom-right ones the
bottom-right pooling's, the center ones the center pooling's, as the original's ``kp._train``.
Each output head is the original's ``make_kp_layer``: 3x3 conv (with bias, no BN) + ReLU + 1x1
conv, built by `detector.models.centernet.build_heads`; the heatmaps' last bias starts at the
original's -2.19, everything else keeps PyTorch's default initialisation, as the original.

Module names inside the poolings are the original's (``p1_conv1``, ``look_conv1``,
``P1_look_conv``, ...; its 3x3 conv + BN + ReLU is the hourglass's `ConvolutionBlock`), so
its checkpoints import by renaming the top-level modules only (`detector.original`). Widths: the
pooling branches are half as wide as the features they pool (the originals: 128 for their
256-wide ``cnvs``, on every backbone), the poolings return ``in_channels``, and the output heads'
3x3 convs are ``head_conv`` wide (the originals: their ``curr_dim``, 256 on the hourglass, 270
on HrCenterNet's HRNet, 64 on its DLA), so ``build_triplet_heads(256, 256, ...)`` is the
CenterNet-52/104 head exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from cuda_ops.corner_pool import bottom_pool, center_pool, left_pool, right_pool, top_pool

from ..models.centernet import build_heads
from ..models.hourglass import ConvolutionBlock

# Output name -> which pooling's features it reads.
OUTPUT_POOLS = {
    "tl_heatmap": "tl",
    "br_heatmap": "br",
    "ct_heatmap": "ct",
    "tl_embedding": "tl",
    "br_embedding": "br",
    "tl_offset": "tl",
    "br_offset": "br",
    "ct_offset": "ct",
}
POOLS = {"top": top_pool, "bottom": bottom_pool, "left": left_pool, "right": right_pool}


class PoolFusion(nn.Module):
    """What the two pooling modules share: the pooled sum -> 3x3 conv + BN (``p_conv1``,
    ``p_bn1``), added to a 1x1 conv + BN shortcut of the input (``conv1``, ``bn1``), ReLU, then
    a 3x3 conv + BN + ReLU (``conv2``). The pooled and shortcut branches are added, so pruning
    keeps ``p_conv1`` and ``conv1`` at equal widths."""

    def __init__(self, channels: int, pool_width: int):
        super().__init__()
        self.p_conv1 = nn.Conv2d(pool_width, channels, 3, padding=1, bias=False)
        self.p_bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = ConvolutionBlock(3, channels, channels)

    def fuse(self, pooled: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        shortcut = self.bn1(self.conv1(features))
        return self.conv2(self.relu1(self.p_bn1(self.p_conv1(pooled)) + shortcut))


class CascadeCornerPool(PoolFusion):
    """The original's ``pool`` (``tl_pool``: first = top, second = left; ``br_pool``: bottom,
    right): cascade corner pooling. Branch 1 pools a 3x3 conv of the input along ``second``,
    adds a second 3x3 conv of the input (``p1_conv1``), convolves the sum (``P1_look_conv``) and
    pools it along ``first``; branch 2 is the same with the directions swapped. Their sum goes
    through `PoolFusion`. B x channels x H x W -> same shape."""

    def __init__(self, channels: int, pool_width: int, first: str, second: str):
        super().__init__(channels, pool_width)
        self.first, self.second = first, second
        self.p1_conv1 = ConvolutionBlock(3, channels, pool_width)
        self.p2_conv1 = ConvolutionBlock(3, channels, pool_width)
        self.look_conv1 = ConvolutionBlock(3, channels, pool_width)
        self.look_conv2 = ConvolutionBlock(3, channels, pool_width)
        self.P1_look_conv = nn.Conv2d(pool_width, pool_width, 3, padding=1, bias=False)
        self.P2_look_conv = nn.Conv2d(pool_width, pool_width, 3, padding=1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        first, second = POOLS[self.first], POOLS[self.second]
        look_second = second(self.look_conv1(features))
        pooled1 = first(self.P1_look_conv(self.p1_conv1(features) + look_second))
        look_first = first(self.look_conv2(features))
        pooled2 = second(self.P2_look_conv(self.p2_conv1(features) + look_first))
        return self.fuse(pooled1 + pooled2, features)


class CenterPoolBlock(PoolFusion):
    """The original's ``pool_cross`` (``center_pool``): the column max of one 3x3 conv branch
    (``p1_conv1``: top then bottom pooling) plus the row max of another (``p2_conv1``: left then
    right), through `PoolFusion`. B x channels x H x W -> same shape."""

    def __init__(self, channels: int, pool_width: int):
        super().__init__(channels, pool_width)
        self.p1_conv1 = ConvolutionBlock(3, channels, pool_width)
        self.p2_conv1 = ConvolutionBlock(3, channels, pool_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fuse(center_pool(self.p1_conv1(features), self.p2_conv1(features)), features)


class TripletHeads(nn.Module):
    """One stack's triplet head: ``tl_pool``, ``br_pool``, ``ct_pool`` (the original's
    ``tl_cnvs``, ``br_cnvs``, ``ct_cnvs``) and one output head per output (``heads``, keyed by
    output name). forward(features: B x in_channels x H x W) -> dict of raw outputs (see the
    module docstring)."""

    head_type = "triplet"

    def __init__(self, in_channels: int, head_conv: int, outputs: dict[str, int]):
        super().__init__()
        unknown = sorted(set(outputs) - set(OUTPUT_POOLS))
        if unknown:
            raise ValueError(
                f"triplet head: unknown outputs {unknown}; it builds {', '.join(OUTPUT_POOLS)}"
            )
        if in_channels < 2:
            raise ValueError(
                f"triplet head: in_channels must be at least 2 (the pooling branches are "
                f"in_channels // 2 wide), got {in_channels!r}"
            )
        pool_width = in_channels // 2
        self.tl_pool = CascadeCornerPool(in_channels, pool_width, "top", "left")
        self.br_pool = CascadeCornerPool(in_channels, pool_width, "bottom", "right")
        self.ct_pool = CenterPoolBlock(in_channels, pool_width)
        self.heads = nn.ModuleDict(build_heads(in_channels, head_conv, outputs))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = {
            "tl": self.tl_pool(features),
            "br": self.br_pool(features),
            "ct": self.ct_pool(features),
        }
        return {name: head(pooled[OUTPUT_POOLS[name]]) for name, head in self.heads.items()}

    def output_convs(self) -> list[nn.Conv2d]:
        """The last conv of every output head: their output channels are the model's outputs."""
        return [head[-1] for head in self.heads.values()]


def build_triplet_heads(
    in_channels: int, head_conv: int, outputs: dict[str, int]
) -> TripletHeads:
    """The triplet head type's ``build_heads``: a `TripletHeads` reading ``in_channels``
    features, with ``in_channels // 2``-wide pooling branches and ``head_conv``-wide output
    heads (0: a lone 1x1 conv each), predicting ``outputs`` (name -> channels, from the head
    table)."""
    return TripletHeads(in_channels, head_conv, outputs)
