"""Import checkpoints saved by the original CenterNet code (github xingyizhou/CenterNet), by
the original TTFNet (github ZJULearning/ttfnet, mmdet v1) and by the keypoint-triplet CenterNet's
originals (github Duankaiwen/CenterNet and the simple CenterNet-47 re-implementation, github
zzzxxxttt/pytorch_simple_CenterNet_47: ``centernet52`` / ``centernet104``; HrCenterNet, github
lizhe960118/HrCenterNet: ``hrcenternet_w18`` / ``hrcenternet_dla34``; see
`triplet_original_key`).

The original CenterNet saves ``{"epoch": int, "state_dict": ..., "optimizer": ...}`` with its
own module names (``deconv_layers.*``, ``hm.*``, ``wh.*``, ``reg.*``, backbone keys at the top
level), prefixed with ``module.`` when it was trained under DataParallel. The converted model
reads its input the original's way, so it carries the ``centernet`` input preset (BGR, the COCO
BGR mean/std, keep-resolution testing with pad 31).

mmdet v1 (TTFNet) saves ``{"meta": {"epoch", "CLASSES", ...}, "state_dict": ...,
"optimizer": ...}`` with ``backbone.*`` and ``bbox_head.*`` keys (the neck lives in the head
there). TTFNet models get the ``ttfnet`` head type and the ``imagenet`` input preset: its
configs normalise RGB images by mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375)
on 0-255, the ImageNet mean/std on 0-1.
"""

from __future__ import annotations

import re
from functools import partial
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
from .models import hourglass, ttfnet

# The original's head names -> ctprune's.
HEAD_RENAMES = {"hm": "heads.heatmap", "wh": "heads.wh", "reg": "heads.offset"}

# Top-level module names of each original family -> ctprune's; keys not listed belong to the
# backbone. Later families (resdcn, dla, hourglass) add their entries.
NECK_RENAMES = {
    "res": {"deconv_layers": "neck"},
    # resnet_dcn.py: `deconv_layers` is the same Sequential of DCN, BN, ReLU, deconv, BN, ReLU
    # per stage, the DCN keeping DCNv2's `weight`, `bias` and `conv_offset_mask.*`.
    "resdcn": {"deconv_layers": "neck"},
    # large_hourglass: our HourglassNet keeps the original's module names; KEY_CONVERTERS
    # renames its per-stack heads.
    "hourglass": {},
    # pose_dla_dcn (dla34) and dlav0 (dlav0_34): `base` is our trunk; `dla_up` and `ida_up`
    # (dlav0 has no `ida_up`) sit under the neck with their module names unchanged.
    "dla": {"base": "backbone", "dla_up": "neck.dla_up", "ida_up": "neck.ida_up"},
    "dlav0_": {"base": "backbone", "dla_up": "neck.dla_up"},
    # mmdet v1 TTFNet (ttfnet18, ttfnet34): KEY_CONVERTERS moves the neck out of `bbox_head`.
    "ttfnet": {},
    # centernet52 / centernet104 (the keypoint triplet): the hourglass's names plus per-stack
    # poolings and heads; KEY_CONVERTERS renames them.
    "centernet": {},
    # HrCenterNet (hrcenternet_w18, hrcenternet_dla34): one stack; KEY_CONVERTERS renames.
    "hrcenternet_w": {},
    "hrcenternet_dla": {},
}

# Original keys dropped on import. The DLA checkpoints keep the 1000-class ImageNet classifier
# `base.fc` (Conv2d(512, 1000, 1): 513,000 parameters) that never runs in the detector; ctprune's
# DLA trunk has no classifier, so the imported model has 513,000 parameters fewer.
DROPPED_PREFIXES = {
    "dla": ("base.fc.",), "dlav0_": ("base.fc.",), "hrcenternet_dla": ("base.fc.",)
}

# The keypoint-triplet originals' per-stack modules -> ours (under ``heads.{stack}``): Duan et
# al.'s names (models/py_utils/kp.py) and the simple CenterNet-47's (nets/hourglass.py).
TRIPLET_RENAMES = {
    "tl_cnvs": "tl_pool", "br_cnvs": "br_pool", "ct_cnvs": "ct_pool",
    "tl_heats": "heads.tl_heatmap", "br_heats": "heads.br_heatmap", "ct_heats": "heads.ct_heatmap",
    "tl_tags": "heads.tl_embedding", "br_tags": "heads.br_embedding",
    "tl_regrs": "heads.tl_offset", "br_regrs": "heads.br_offset", "ct_regrs": "heads.ct_offset",
    # the simple CenterNet-47
    "cnvs_tl": "tl_pool", "cnvs_br": "br_pool", "cnvs_ct": "ct_pool",
    "hmap_tl": "heads.tl_heatmap", "hmap_br": "heads.br_heatmap", "hmap_ct": "heads.ct_heatmap",
    "embd_tl": "heads.tl_embedding", "embd_br": "heads.br_embedding",
    "regs_tl": "heads.tl_offset", "regs_br": "heads.br_offset", "regs_ct": "heads.ct_offset",
}
# The simple CenterNet-47 renames a few modules inside the hourglass and the corner pooling;
# ours keep Duan et al.'s (CornerNet's) names. Its ``down`` and ``up`` have no parameters.
SIMPLE_CENTERNET_PART_RENAMES = {
    "top": "up1", "p1_look_conv": "P1_look_conv", "p2_look_conv": "P2_look_conv"
}


def triplet_original_key(key: str, stacked: bool = True) -> str:
    """A keypoint-triplet original's state-dict key (either repository's names: they do not
    overlap) -> ours. The trunk (``pre``, ``kps``, ``cnvs``, ``inters``, ``inters_``,
    ``cnvs_``) keeps its names; ``tl_cnvs.{stack}.*`` moves to ``heads.{stack}.tl_pool.*``;
    an output head ``tl_heats.{stack}.{0.conv,1}.*`` (conv + empty BN + ReLU, then the 1x1
    conv) moves to ``heads.{stack}.heads.tl_heatmap.{0,2}.*``. ``stacked`` False: the
    original's modules have no stack index (HrCenterNet), nor do ours."""
    parts = [SIMPLE_CENTERNET_PART_RENAMES.get(part, part) for part in key.split(".")]
    top = parts[0]
    stack, rest = (parts[1:2], parts[2:]) if stacked else ([], parts[1:])
    if top not in TRIPLET_RENAMES:
        return ".".join(parts)
    if TRIPLET_RENAMES[top].startswith("heads."):
        # ".0.conv.weight" -> ".0.weight"; the 1x1 conv is element 1 there, 2 here.
        if rest[:2] == ["0", "conv"]:
            rest = ["0", *rest[2:]]
        elif rest[:1] == ["1"]:
            rest = ["2", *rest[1:]]
    return ".".join(["heads", *stack, TRIPLET_RENAMES[top], *rest])


# HrCenterNet's trunk and neck modules -> ours (its triplet head as `triplet_original_key`).
HRCENTERNET_RENAMES = {
    # HRNet.py: `pre` is conv, BN, conv, BN, ReLU; the HRNet stages sit at the top level.
    "hrcenternet_w": {
        "pre.0": "backbone.conv1", "pre.1": "backbone.bn1", "pre.2": "backbone.conv2",
        "pre.3": "backbone.bn2", "layer1": "backbone.layer1", "transition1":
        "backbone.transition1", "transition2": "backbone.transition2", "transition3":
        "backbone.transition3", "stage2": "backbone.stage2", "stage3": "backbone.stage3",
        "stage4": "backbone.stage4", "cnvs": "neck.1",
    },
    # DLANet.py: pose_dla_dcn's `base`, `dla_up`, `ida_up`.
    "hrcenternet_dla": {
        "base": "backbone", "dla_up": "neck.0.dla_up", "ida_up": "neck.0.ida_up", "cnvs": "neck.1"
    },
}


def hrcenternet_original_key(key: str, family: str) -> str:
    """An HrCenterNet state-dict key (HRNet.py or DLANet.py, ``family``) -> ours."""
    for prefix, ours in HRCENTERNET_RENAMES[family].items():
        if key == prefix or key.startswith(prefix + "."):
            return ours + key[len(prefix):]
    return triplet_original_key(key, stacked=False)


# Families whose keys are converted by a function of their own instead of the renames above.
KEY_CONVERTERS = {
    "hourglass": hourglass.original_key,
    "ttfnet": ttfnet.original_key,
    "centernet": triplet_original_key,
    "hrcenternet_w": partial(hrcenternet_original_key, family="hrcenternet_w"),
    "hrcenternet_dla": partial(hrcenternet_original_key, family="hrcenternet_dla"),
}
# The keypoint-triplet families.
TRIPLET_FAMILIES = ("centernet", "hrcenternet_w", "hrcenternet_dla")

# Each family's head type (`detector.heads.HEADS`) and input preset (`config.input_preset`) when
# not the original CenterNet's ("centernet" for both).
HEAD_TYPES = {"ttfnet": "ttfnet", **{family: "triplet" for family in TRIPLET_FAMILIES}}
INPUT_PRESETS = {"ttfnet": "imagenet"}
# What a family's heatmap head is called in the original's keys, for the error message.
ORIGINAL_HEATMAP_KEYS = {
    "ttfnet": "bbox_head.hm.*",
    **{family: "tl_heats.* or hmap_tl.*" for family in TRIPLET_FAMILIES},
}
# What the original is called in the error message.
ORIGINAL_NAMES = {"ttfnet": "TTFNet", **{family: "keypoint-triplet" for family in TRIPLET_FAMILIES}}


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
    family = _family(arch)
    dropped = DROPPED_PREFIXES.get(family, ())
    if family in KEY_CONVERTERS:
        return {
            KEY_CONVERTERS[family](key): value
            for key, value in ((k.removeprefix("module."), v) for k, v in state_dict.items())
            if not key.startswith(dropped)
        }
    neck_renames = NECK_RENAMES[family]
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(dropped):
            continue
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


def _head_shape(state_dict: dict[str, torch.Tensor], family: str) -> tuple[int, int]:
    """(num_classes, head_conv) read off the heatmap head's weights: the output channels of
    its last conv and of its first (0 when the head is one conv)."""
    # single-stack, stacked (hourglass), the keypoint triplet's top-left heatmap (stacked or not)
    for heatmap in (
        "heads.heatmap", "heads.0.heatmap", "heads.0.heads.tl_heatmap", "heads.heads.tl_heatmap"
    ):
        pattern = re.compile(rf"{re.escape(heatmap)}\.(\d+)\.weight")
        indices = sorted(int(match[1]) for key in state_dict if (match := pattern.fullmatch(key)))
        if indices:
            first = state_dict[f"{heatmap}.{indices[0]}.weight"]
            last = state_dict[f"{heatmap}.{indices[-1]}.weight"]
            return last.shape[0], first.shape[0] if len(indices) > 1 else 0
    raise CheckpointError(
        f"no heatmap head ('{ORIGINAL_HEATMAP_KEYS.get(family, 'hm.*')}') found: not an original "
        f"{ORIGINAL_NAMES.get(family, 'CenterNet ctdet')} checkpoint"
    )


def _original_epoch(data: dict) -> int | None:
    """The epoch the original saved: CenterNet's top-level ``epoch``, mmdet's ``meta.epoch``."""
    meta = data.get("meta")
    return data.get("epoch", meta.get("epoch") if isinstance(meta, dict) else None)


def _class_names(data: dict, num_classes: int) -> list[str] | None:
    """mmdet's ``meta.CLASSES`` (the data set's class names, in heatmap-channel order) when it
    names exactly ``num_classes`` classes."""
    meta = data.get("meta")
    names = meta.get("CLASSES") if isinstance(meta, dict) else None
    if isinstance(names, (list, tuple)) and len(names) == num_classes:
        if all(isinstance(name, str) for name in names):
            return list(names)
    return None


def import_original_checkpoint(
    path: str | Path,
    arch: str,
    out: str | Path,
    input_size: tuple[int, int] = (512, 512),
    widths: dict | None = None,
) -> Path:
    """Convert an original CenterNet or TTFNet checkpoint into a ctprune checkpoint at ``out``;
    ``widths`` describes a checkpoint of non-default widths (as `build_model` takes them)."""
    path = Path(path)
    data = load_tensors_only(path)
    state_dict = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError(f"{path}: expected a dict with a 'state_dict' of tensors")
    converted = convert_original_state_dict(state_dict, arch)
    family = _family(arch)
    try:
        num_classes, head_conv = _head_shape(converted, family)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    config = ModelConfig(
        arch=arch,
        head=HEAD_TYPES.get(family, "centernet"),
        num_classes=num_classes,
        head_conv=head_conv,
        widths=widths,
        class_names=_class_names(data, num_classes),
        input=input_preset(INPUT_PRESETS.get(family, "centernet"), input_size),
    )
    if family in ("hourglass", *TRIPLET_FAMILIES):
        # the originals' 127 for hourglasses; the triplet originals (HrCenterNet too) test
        # with CornerNet's `| 127` padding
        config.input.pad = hourglass.KEEP_RESOLUTION_PAD
    model = build_from_config(config)
    _check_state_dict(model, converted, f"{path} (as an original {arch!r})")
    model.load_state_dict(converted)
    meta = {"imported_from": str(path), "original_epoch": _original_epoch(data)}
    return save_checkpoint(out, model, config, meta=meta)
