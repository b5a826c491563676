"""Import checkpoints saved by the original CenterNet code (github xingyizhou/CenterNet).

The original saves ``{"epoch": int, "state_dict": ..., "optimizer": ...}`` with its own module
names (``deconv_layers.*``, ``hm.*``, ``wh.*``, ``reg.*``, backbone keys at the top level),
prefixed with ``module.`` when it was trained under DataParallel. The converted model reads
its input the original's way, so it carries the ``centernet`` input preset (BGR, the COCO
BGR mean/std, keep-resolution testing with pad 31).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import (
    CheckpointError,
    _check_state_dict,
    build_from_config,
    load_tensors_only,
    save_checkpoint,
)
from .config import ModelConfig, input_preset

# The original's head names -> ctprune's.
HEAD_RENAMES = {"hm": "heads.heatmap", "wh": "heads.wh", "reg": "heads.offset"}

# Top-level module names of each original family -> ctprune's; keys not listed belong to the
# backbone. Later families (resdcn, dla, hourglass) add their entries.
NECK_RENAMES = {
    "res": {"deconv_layers": "neck"},
}


def _family(arch: str) -> str:
    family = arch.rstrip("0123456789")
    if family not in NECK_RENAMES:
        raise ValueError(
            f"importing original {arch!r} checkpoints is not supported yet; supported families: "
            f"{', '.join(f + '*' for f in NECK_RENAMES)}"
        )
    return family


def convert_original_state_dict(
    state_dict: dict[str, torch.Tensor], arch: str
) -> dict[str, torch.Tensor]:
    """Rename an original CenterNet state dict to ctprune's module names."""
    neck_renames = NECK_RENAMES[_family(arch)]
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        top, _, rest = key.partition(".")
        if top in HEAD_RENAMES:
            # With head_conv 0 the original's head is a bare conv ("hm.weight"); ours is
            # always a Sequential, so the conv is its element 0.
            rest = rest if rest[:1].isdigit() else f"0.{rest}"
            converted[f"{HEAD_RENAMES[top]}.{rest}"] = value
        elif top in neck_renames:
            converted[f"{neck_renames[top]}.{rest}"] = value
        else:
            converted[f"backbone.{key}"] = value
    return converted


def _head_shape(state_dict: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(num_classes, head_conv) read off the heatmap head's weights."""
    if "heads.heatmap.2.weight" in state_dict:
        return state_dict["heads.heatmap.2.weight"].shape[0], state_dict["heads.heatmap.0.weight"].shape[0]
    if "heads.heatmap.0.weight" in state_dict:
        return state_dict["heads.heatmap.0.weight"].shape[0], 0
    raise CheckpointError("no heatmap head ('hm.*') found: not an original CenterNet ctdet checkpoint")


def import_original_checkpoint(
    path: str | Path, arch: str, out: str | Path, input_size: tuple[int, int] = (512, 512)
) -> Path:
    """Convert an original CenterNet checkpoint into a ctprune checkpoint at ``out``."""
    path = Path(path)
    data = load_tensors_only(path)
    state_dict = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError(f"{path}: expected a dict with a 'state_dict' of tensors")
    converted = convert_original_state_dict(state_dict, arch)
    try:
        num_classes, head_conv = _head_shape(converted)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    config = ModelConfig(
        arch=arch,
        num_classes=num_classes,
        head_conv=head_conv,
        input=input_preset("centernet", input_size),
    )
    model = build_from_config(config)
    _check_state_dict(model, converted, f"{path} (as an original {arch!r})")
    model.load_state_dict(converted)
    meta = {"imported_from": str(path), "original_epoch": data.get("epoch")}
    return save_checkpoint(out, model, config, meta=meta)
