"""The backbone table: a plain dict from architecture name to factory function."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from .centernet import HEAD_NAMES, CenterNet, output_layers
from .resnet import build_resnet

# name -> factory(num_classes, head_conv, widths, pretrained) -> CenterNet
ARCHITECTURES: dict[str, Callable[..., CenterNet]] = {
    "res18": partial(build_resnet, 18),
    "res34": partial(build_resnet, 34),
    "res50": partial(build_resnet, 50),
    "res101": partial(build_resnet, 101),
}


def build_model(
    arch: str,
    num_classes: int = 80,
    *,
    head_conv: int | None = None,
    widths: dict | None = None,
    pretrained: str | Path | None = None,
) -> CenterNet:
    """Build a CenterNet.

    Args:
        arch: a name from `ARCHITECTURES`, e.g. "res18".
        num_classes: heatmap channels.
        head_conv: width of each head's 3x3 conv; None takes the architecture's default
            (64 for ResNets, 256 for DLA, as the original), 0 makes each head one 1x1 conv.
        widths: channel widths for a scaled-down model (keys depend on the family).
        pretrained: a local file with torchvision ImageNet weights for the trunk.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; known architectures: {', '.join(ARCHITECTURES)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
    if head_conv is not None and head_conv < 0:
        raise ValueError(f"head_conv: expected None or an integer >= 0, got {head_conv!r}")
    return ARCHITECTURES[arch](num_classes, head_conv, widths, pretrained)


__all__ = [
    "ARCHITECTURES",
    "HEAD_NAMES",
    "CenterNet",
    "build_model",
    "output_layers",
]
