"""The backbone table: a plain dict from architecture name to factory function."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from torch import nn

from ..triplet.hrcenternet import build_hrcenternet_dla, build_hrcenternet_hrnet
from .centernet import CenterNet, output_layers
from .dla import build_dla
from .hourglass import build_hourglass
from .hrnet import build_hrnet
from .mobilenet import build_mobilenet
from .resdcn import build_resdcn
from .resnet import build_resnet
from .resunet import build_resunet
from .ttfnet import build_ttfnet

# name -> factory(make_heads, head_conv, widths, pretrained) -> CenterNet (hourglass104: its
# two-stack HourglassNet, which returns the same list of per-stack dicts); make_heads builds
# one stack's heads (`centernet.HeadFactory`), bound from the head table (`detector.heads`)
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "res18": partial(build_resnet, 18),
    "res34": partial(build_resnet, 34),
    "res50": partial(build_resnet, 50),
    "res101": partial(build_resnet, 101),
    "resunet18": partial(build_resunet, 18),
    "resunet50": partial(build_resunet, 50),
    "resdcn18": partial(build_resdcn, 18),
    "resdcn101": partial(build_resdcn, 101),
    "dla34": partial(build_dla, "dcn"),
    "dlav0_34": partial(build_dla, "v0"),
    "hourglass104": build_hourglass,
    # The keypoint-triplet CenterNet (Duan et al.): the hourglass with one or two stacks and
    # the triplet head (cascade corner pooling, center pooling; `detector.triplet.heads`).
    "centernet52": partial(build_hourglass, num_stacks=1),
    "centernet104": partial(build_hourglass, num_stacks=2),
    # HrCenterNet: the same head on HRNet-W18 and DLA-34 (`detector.triplet.hrcenternet`).
    "hrcenternet_w18": build_hrcenternet_hrnet,
    "hrcenternet_dla34": build_hrcenternet_dla,
    "hrnet_w18": partial(build_hrnet, 18),
    "hrnet_w32": partial(build_hrnet, 32),
    "mobilenet_v3_large": build_mobilenet,
    "ttfnet18": partial(build_ttfnet, 18),
    "ttfnet34": partial(build_ttfnet, 34),
}

# Architectures that build with one head type only: arch -> that `model.head`.
REQUIRED_HEAD: dict[str, str] = {
    "centernet52": "triplet",
    "centernet104": "triplet",
    "hrcenternet_w18": "triplet",
    "hrcenternet_dla34": "triplet",
}


def build_model(
    arch: str,
    num_classes: int = 80,
    *,
    head: str = "centernet",
    head_conv: int | None = None,
    widths: dict | None = None,
    pretrained: str | Path | None = None,
) -> CenterNet:
    """Build a CenterNet.

    Args:
        arch: a name from `ARCHITECTURES`, e.g. "res18".
        num_classes: class heatmap channels.
        head: a name from `detector.heads.HEADS`: which outputs the heads predict. The
            architectures in `REQUIRED_HEAD` build with that head only.
        head_conv: width of each head's 3x3 conv; None takes the architecture's default
            (64 for ResNets, 256 for DLA, as the original; 256 for hourglass104, centernet52
            and centernet104, the originals' fixed head width; 64 for HRNet and MobileNetV3,
            the original's rule for non-DLA backbones; 128 for ttfnet18/34, the TTFNet configs'
            heatmap width; 270 for hrcenternet_w18 and 64 for hrcenternet_dla34, HrCenterNet's),
            0 makes each head one 1x1 conv.
        widths: channel widths for a scaled-down model (keys depend on the family).
        pretrained: a local file with ImageNet weights for the trunk (torchvision's for ResNet
            and MobileNetV3, the HRNet release's for HRNet; hourglass104 has none).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; known architectures: {', '.join(ARCHITECTURES)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
    if head_conv is not None and head_conv < 0:
        raise ValueError(f"head_conv: expected None or an integer >= 0, got {head_conv!r}")
    if REQUIRED_HEAD.get(arch, head) != head:
        raise ValueError(
            f"model.head: arch {arch!r} builds only with head {REQUIRED_HEAD[arch]!r}, "
            f"got {head!r}"
        )
    # Imported here: the head table imports the model modules (its head builders).
    from ..heads import head_factory

    make_heads = head_factory(head, num_classes)
    return ARCHITECTURES[arch](make_heads, head_conv, widths, pretrained)


__all__ = [
    "ARCHITECTURES",
    "REQUIRED_HEAD",
    "CenterNet",
    "build_model",
    "output_layers",
]
