"""The checkpoint format: ``{format, model_config, channel_plan, state_dict, meta}``.

Only tensors and plain Python types, so ``torch.load(path, weights_only=True)`` always works
and loading never executes pickled code. A pruned model is its base architecture
(``model_config``) plus its ``channel_plan``; loading rebuilds the architecture, resizes it to
the plan and loads the state dict strictly. Files are written atomically: a crash mid-write
leaves the previous file intact.

Format history:
    1: the first format.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .channel_plan import ChannelPlan, apply_channel_plan, channel_plan_of
from .config import ModelConfig, from_dict, to_dict
from .files import atomic_replace
from .models import build_model

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable ctprune checkpoint, or one that does not fit."""


@dataclass
class Checkpoint:
    model_config: ModelConfig
    channel_plan: ChannelPlan | None = None
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def atomic_save(obj: object, path: str | Path) -> Path:
    """torch.save ``obj`` to ``path`` atomically (`detector.files.atomic_replace`)."""
    return atomic_replace(path, lambda file: torch.save(obj, file))


def _check_plain(value: object, where: str) -> None:
    """Refuse anything torch.load(weights_only=True) could not read back."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: keys must be str or int, got {type(key).__name__}")
            _check_plain(item, f"{where}.{key}")
        return
    raise TypeError(
        f"{where}: checkpoints hold only tensors and plain types, got {type(value).__name__}"
    )


def build_from_config(config: ModelConfig, channel_plan: ChannelPlan | None = None) -> nn.Module:
    """The architecture of ``config``, resized to ``channel_plan``."""
    model = build_model(
        config.arch,
        config.num_classes,
        head=config.head,
        head_conv=config.head_conv,
        widths=config.widths,
    )
    return apply_channel_plan(model, channel_plan)


def save_checkpoint(
    path: str | Path, model: nn.Module, config: ModelConfig, meta: dict | None = None
) -> Path:
    """Save ``model`` (pruned or not) with its config; the channel plan is derived by comparing
    its layer widths with a fresh build of ``config`` (built on the meta device: no memory)."""
    model = unwrap_model(model)
    with torch.device("meta"):
        reference = build_from_config(config)
    try:
        plan = channel_plan_of(model, reference)
    except ValueError as error:
        raise CheckpointError(
            f"model does not match its config (arch {config.arch}): {error}"
        ) from None
    meta = dict(meta or {})
    _check_plain(meta, "meta")
    checkpoint = {
        "format": FORMAT_VERSION,
        "model_config": to_dict(config),
        "channel_plan": plan,
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "meta": meta,
    }
    return atomic_save(checkpoint, path)


def _looks_like_original_centernet(data: dict) -> bool:
    state_dict = data.get("state_dict")
    return isinstance(state_dict, dict) and any(
        key.removeprefix("module.").startswith(("hm.", "wh.", "reg.")) for key in state_dict
    )


def load_tensors_only(path: Path, map_location: str | torch.device = "cpu") -> object:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the cause."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: holds pickled Python objects (e.g. a whole module saved with "
            "torch.save(model)); ctprune checkpoints hold only tensors and plain types. If you "
            "trust the file, load it with torch.load(..., weights_only=False) and save the "
            "model with detector.save_checkpoint."
        ) from None
    except Exception as error:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({error})") from None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a ctprune checkpoint without building the model."""
    path = Path(path)
    data = load_tensors_only(path, map_location)
    if not isinstance(data, dict) or "format" not in data:
        if isinstance(data, dict) and _looks_like_original_centernet(data):
            raise CheckpointError(
                f"{path}: an original CenterNet checkpoint, not a ctprune one; convert it with "
                f"`ctprune import-original {path} --arch ARCH --out NEW.pt`"
            )
        raise CheckpointError(
            f"{path}: not a ctprune checkpoint (expected a dict with keys format, model_config, "
            "channel_plan, state_dict, meta)"
        )
    if not isinstance(data["format"], int) or data["format"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {data['format']!r} is newer than this ctprune reads "
            f"(format {FORMAT_VERSION}); upgrade ctprune"
        )
    missing = [k for k in ("model_config", "state_dict") if k not in data]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    try:
        config = from_dict(ModelConfig, data["model_config"], "model_config")
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid model_config: {error}") from None
    return Checkpoint(config, data.get("channel_plan"), data["state_dict"], data.get("meta") or {})


def _check_state_dict(model: nn.Module, state_dict: dict, source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source}: weights do not fit the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, shape mismatches (file vs model) {wrong[:3]}"
        )


def model_from_checkpoint(checkpoint: Checkpoint, source: str = "checkpoint") -> nn.Module:
    """Rebuild the architecture, apply the channel plan, load the weights strictly."""
    try:
        model = build_from_config(checkpoint.model_config, checkpoint.channel_plan)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None
    _check_state_dict(model, checkpoint.state_dict, source)
    model.load_state_dict(checkpoint.state_dict)
    return model


def load_model(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    arch: str | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, Checkpoint]:
    """Load a model from a ctprune checkpoint; ``arch`` / ``num_classes``, when given, must
    match the checkpoint's (e.g. when resuming or fine-tuning a given architecture)."""
    checkpoint = read_checkpoint(path, map_location)
    config = checkpoint.model_config
    if arch is not None and arch != config.arch:
        raise CheckpointError(f"{path}: a checkpoint of arch {config.arch!r}, expected {arch!r}")
    if num_classes is not None and num_classes != config.num_classes:
        raise CheckpointError(
            f"{path}: a checkpoint with {config.num_classes} classes, expected {num_classes}"
        )
    return model_from_checkpoint(checkpoint, str(path)), checkpoint
