"""resnet_dcn: a ResNet trunk, a neck of deformable convs and deconvs, and the CenterNet heads.

The original's `resdcn_18` / `resdcn_101`, the paper's "ResNet-18/101" rows. The trunk is the
msra_resnet one (`resnet.ResNetTrunk`, torchvision's keys). Each of the three neck stages is

    DCN 3x3 (in -> p) + BN + ReLU + ConvTranspose(p -> p, k4, s2, p1, no bias) + BN + ReLU

with p = 256, 128, 64, laid out as one Sequential in that order, so the state-dict keys are the
original's under `neck.` instead of `deconv_layers.` (`neck.0.conv_offset_mask.weight`,
`neck.3.weight`, ...). Heads read the 64-channel neck output with head_conv 64.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from cuda_ops import ModulatedDeformConv2d

from .centernet import CenterNet, HeadFactory, regression_heads
from .resnet import resnet_trunk

DEFAULT_WIDTHS = {"stem": 64, "stages": [64, 128, 256, 512], "neck": [256, 128, 64]}
DEFAULT_HEAD_CONV = 64
DECONV_KERNEL = 4


def fill_up_weights(deconv: nn.ConvTranspose2d) -> None:
    """The original's `fill_up_weights`, quirk included: the bilinear up-sampling kernel (for
    k = 4 the outer product of [1/4, 3/4, 3/4, 1/4]) is written to ``weight[:, 0]`` only, i.e.
    from every input channel to output channel 0; ``weight[:, 1:]`` keeps its default random
    initialisation. (A clean per-channel bilinear up-sampler would need a grouped deconv.)"""
    kernel_size = deconv.weight.shape[2]
    factor = math.ceil(kernel_size / 2)
    center = (2 * factor - 1 - factor % 2) / (2 * factor)
    positions = torch.arange(kernel_size, dtype=deconv.weight.dtype, device=deconv.weight.device)
    taps = 1 - (positions / factor - center).abs()
    kernel = torch.outer(taps, taps)
    with torch.no_grad():
        deconv.weight[:, 0] = kernel


def dcn_neck(in_channels: int, widths: list[int]) -> nn.Sequential:
    """Per width p: DCN 3x3 (in -> p) + BN + ReLU + ConvTranspose(p -> p, k4, s2, p1, no bias)
    + BN + ReLU, each stage doubling the resolution. Initialised as the original: DCN as in
    DCNv2 (zero offset/mask conv), deconvs by `fill_up_weights`, BN 1/0."""
    layers: list[nn.Module] = []
    for width in widths:
        deform = ModulatedDeformConv2d(in_channels, width, kernel_size=3, stride=1, padding=1)
        deconv = nn.ConvTranspose2d(
            width, width, DECONV_KERNEL, stride=2, padding=(DECONV_KERNEL - 2) // 2, bias=False
        )
        fill_up_weights(deconv)
        layers += [
            deform,
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            deconv,
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    return nn.Sequential(*layers)


def build_resdcn(
    depth: int,
    make_heads: HeadFactory,
    head_conv: int | None = None,
    widths: dict | None = None,
    pretrained: str | Path | None = None,
) -> CenterNet:
    """resnet_dcn CenterNet. ``widths`` may override ``stem`` (int), ``stages`` (4 ints) and
    ``neck`` (one int per DCN + deconv stage); missing keys take the original widths."""
    trunk, widths = resnet_trunk(depth, widths, DEFAULT_WIDTHS, pretrained)
    neck = dcn_neck(trunk.out_channels, list(widths["neck"]))
    head_conv = DEFAULT_HEAD_CONV if head_conv is None else head_conv
    heads = make_heads(widths["neck"][-1], head_conv)
    # Unlike msra_resnet, the original initialises EVERY conv of the wh and offset heads with
    # N(0, 0.001) weights and zero bias; the heatmap head keeps its default init (but the
    # bias of its last conv, set by build_heads).
    for head in regression_heads(heads):
        for module in head.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.001)
                nn.init.zeros_(module.bias)
    return CenterNet(trunk, neck, heads)
