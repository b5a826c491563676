"""msra_resnet: a torchvision ResNet trunk, a three-deconv neck and the CenterNet heads.

The original's `res_18` / `res_101` (the plain, DCN-free ResNets). The trunk is built from
torchvision's own blocks so its state-dict keys are torchvision's (`conv1`, `layer1.0.conv1`,
...) and ImageNet weights load unchanged, but its widths are arguments, so tiny test models and
scaled-down variants are just other widths.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .centernet import CenterNet, HeadFactory, deconv_neck, regression_heads
from .pretrained import load_trunk_weights
from .widths import merge_widths

DEPTHS: dict[int, tuple[type[nn.Module], list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
}

DEFAULT_WIDTHS = {"stem": 64, "stages": [64, 128, 256, 512], "neck": [256, 256, 256]}
DEFAULT_HEAD_CONV = 64


class ResNetTrunk(nn.Module):
    """conv1 7x7/2 + BN + ReLU + maxpool, then four stages; output stride 32.

    Unlike torchvision's ResNet it keeps PyTorch's default initialisation, as the original's
    PoseResNet does, and has no classifier.
    """

    def __init__(
        self,
        block: type[nn.Module],
        blocks_per_stage: list[int],
        stem_width: int = 64,
        stage_widths: tuple[int, ...] = (64, 128, 256, 512),
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = stem_width
        for index, (width, count) in enumerate(zip(stage_widths, blocks_per_stage, strict=True)):
            stride = 1 if index == 0 else 2
            stage = []
            for block_index in range(count):
                out_channels = width * block.expansion
                downsample = None
                if block_index == 0 and (stride != 1 or in_channels != out_channels):
                    downsample = nn.Sequential(
                        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                        nn.BatchNorm2d(out_channels),
                    )
                block_stride = stride if block_index == 0 else 1
                stage.append(block(in_channels, width, block_stride, downsample))
                in_channels = out_channels
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.out_channels = in_channels  # read once by the builder, never in forward

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def load_imagenet_weights(trunk: ResNetTrunk, path: str | Path) -> None:
    """Load a torchvision ResNet state dict (e.g. resnet18-f37072fd.pth) from a local file; the
    classifier (`fc.*`) is ignored, every trunk tensor must be present with its shape."""
    load_trunk_weights(
        trunk, path, expected="torchvision ResNet weights of the same depth at the original widths"
    )


def resnet_trunk(
    depth: int,
    widths: dict | None,
    defaults: dict,
    pretrained: str | Path | None = None,
    trunk_class: type[ResNetTrunk] = ResNetTrunk,
) -> tuple[ResNetTrunk, dict]:
    """The trunk every ResNet family (msra, resdcn, resunet) starts from, and its widths:
    ``defaults`` updated by ``widths`` (checked: `merge_widths`), ImageNet weights loaded when a
    local file is given."""
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth {depth} not supported; known depths: {sorted(DEPTHS)}")
    widths = merge_widths(defaults, widths)
    block, blocks_per_stage = DEPTHS[depth]
    trunk = trunk_class(block, blocks_per_stage, widths["stem"], tuple(widths["stages"]))
    if pretrained is not None:
        load_imagenet_weights(trunk, pretrained)
    return trunk, widths


def init_regression_heads(heads: nn.Module) -> None:
    """msra_resnet's head initialisation: the original touches only each head's last conv; the
    regression heads (wh and offset) get N(0, 0.001) weights and zero bias, so the first
    regression outputs are close to 0."""
    for head in regression_heads(heads):
        nn.init.normal_(head[-1].weight, std=0.001)
        nn.init.zeros_(head[-1].bias)


def build_resnet(
    depth: int,
    make_heads: HeadFactory,
    head_conv: int | None = None,
    widths: dict | None = None,
    pretrained: str | Path | None = None,
) -> CenterNet:
    """msra_resnet CenterNet. ``widths`` may override ``stem`` (int), ``stages`` (4 ints) and
    ``neck`` (one int per deconv stage); missing keys take the original widths."""
    trunk, widths = resnet_trunk(depth, widths, DEFAULT_WIDTHS, pretrained)
    neck = deconv_neck(trunk.out_channels, list(widths["neck"]))
    head_conv = DEFAULT_HEAD_CONV if head_conv is None else head_conv
    heads = make_heads(widths["neck"][-1], head_conv)
    init_regression_heads(heads)
    return CenterNet(trunk, neck, heads)
