"""Loading ImageNet weights into a trunk from a local file: one loader for every family.

Nothing is downloaded. A family's `load_imagenet_weights` names what it expects; this function
reads the file, accepts a bare state dict or ``{"state_dict": ...}``, strips DataParallel's
``module.`` (and any other prefix the release adds), and loads exactly the trunk's own tensors:
keys outside the trunk (a classifier) are ignored, a missing or misshapen one is an error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def load_trunk_weights(
    trunk: nn.Module,
    path: str | Path,
    *,
    expected: str,
    strip_prefixes: tuple[str, ...] = ("module.",),
) -> None:
    """Load ``trunk``'s tensors from the state dict in ``path``.

    Args:
        expected: what the file should hold, for the error message (e.g. "torchvision ResNet
            weights of the same depth at the original widths").
        strip_prefixes: removed from every key, in order, before matching.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path}: no such file")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"pretrained weights {path}: not a readable state dict ({error})"
        ) from None
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"pretrained weights {path}: expected a state dict, got {type(state_dict).__name__}"
        )
    renamed = {}
    for key, value in state_dict.items():
        for prefix in strip_prefixes:
            key = key.removeprefix(prefix)
        renamed[key] = value
    own = trunk.state_dict()
    missing = sorted(set(own) - set(renamed))
    wrong = [
        key
        for key in own
        if key in renamed
        and (not isinstance(renamed[key], torch.Tensor) or renamed[key].shape != own[key].shape)
    ]
    if missing or wrong:
        raise ValueError(
            f"pretrained weights {path} do not fit this trunk: missing {missing[:5]}, wrong "
            f"shapes {wrong[:5]} (expected {expected})"
        )
    trunk.load_state_dict({key: renamed[key] for key in own})
