"""The checkpoint format: ``{format, model_config, channel_plan, state_dict, meta}``.

Only tensors and plain Python types, so ``torch.load(path, weights_only=True)`` always works
and loading never executes pickled code. A pruned model is its base architecture
(``model_config``) plus its ``channel_plan``; loading rebuilds the architecture, resizes it to
the plan and loads the state dict strictly. Files are written atomically: a crash mid-write
leaves the previous file intact.

Format history:
    1: the first format.

Reading checks every field before anything is built (`read_checkpoint`), and loading refuses
weights that are NaN or infinite (`model_from_checkpoint`): every error names the file and the
field at fault.
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
SUPPORTED_FORMATS = (1,)
"""The format versions this ctprune reads."""
CHECKPOINT_KEYS = ("format", "model_config", "channel_plan", "state_dict", "meta")
ZIP_MAGIC = b"PK\x03\x04"
"""The first bytes of a torch.save file (a zip archive) since PyTorch 1.6."""
PICKLE_MAGIC = b"\x80"
"""The first byte of a pickle (protocol 2+): torch.save's legacy, pre-zip format."""


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


def _describe_foreign_file(head: bytes) -> str:
    """What a file that is not a torch.save file probably is, from its first bytes."""
    if not head:
        return "the file is empty"
    if head[:1] == b"\x08":  # protobuf field 1 (ir_version), as every ONNX file starts
        return "it looks like an ONNX model (a protobuf file); give the .pt checkpoint instead"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with the bytes {head[:8]!r}, not a zip archive"
    return "it is a text file"


def load_tensors_only(path: Path, map_location: str | torch.device = "cpu") -> object:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the cause."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as file:
        head = file.read(64)
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint file ({_describe_foreign_file(head)})"
        )
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
        if head.startswith(ZIP_MAGIC):
            cause = str(error).splitlines()[0].split(". ")[0]  # torch's advice follows
            raise CheckpointError(
                f"{path}: a damaged or truncated PyTorch checkpoint (the file is cut short or "
                f"corrupt: {cause}); use an intact copy"
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({error})") from None


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_fields(data: dict, path: Path) -> None:
    """Each top-level field's type, naming the file and the field; widths and weights are
    checked against the model when it is built (`model_from_checkpoint`)."""
    version = data["format"]
    if type(version) is not int or version not in SUPPORTED_FORMATS:  # not bool, not 1.0
        newer = (
            "; it is newer than this ctprune: upgrade ctprune"
            if isinstance(version, int) and not isinstance(version, bool)
            and version > FORMAT_VERSION
            else ""
        )
        raise CheckpointError(
            f"{path}: format: {version!r} is not a checkpoint format this ctprune reads "
            f"(supported: {list(SUPPORTED_FORMATS)}){newer}"
        )
    missing = [key for key in ("model_config", "state_dict") if key not in data]
    if missing:
        raise CheckpointError(
            f"{path}: checkpoint lacks {missing} (expected keys {list(CHECKPOINT_KEYS)})"
        )
    unknown = [key for key in data if key not in CHECKPOINT_KEYS]
    if unknown:
        raise CheckpointError(
            f"{path}: unknown checkpoint keys {unknown} (expected {list(CHECKPOINT_KEYS)})"
        )
    state_dict = data["state_dict"]
    if not isinstance(state_dict, dict):
        raise CheckpointError(
            f"{path}: state_dict: expected a mapping of parameter name -> tensor, got "
            f"{type(state_dict).__name__}"
        )
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{path}: state_dict[{name!r}]: expected a tensor, got "
                f"{type(tensor).__name__} {_short(tensor)}"
            )
    plan = data.get("channel_plan")
    if plan is not None:
        if not isinstance(plan, dict):
            raise CheckpointError(
                f"{path}: channel_plan: expected null or a mapping of module path -> list of "
                f"widths, got {type(plan).__name__} {_short(plan)}"
            )
        for name, widths in plan.items():
            if not isinstance(name, str) or not (
                isinstance(widths, (list, tuple)) and widths
                and all(_is_positive_int(width) for width in widths)
            ):
                raise CheckpointError(
                    f"{path}: channel_plan[{name!r}]: expected a list of positive integer "
                    f"widths, got {_short(widths)}"
                )
    meta = data.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{path}: meta: expected a mapping, got {type(meta).__name__}")
    if not isinstance(data["model_config"], dict):
        raise CheckpointError(
            f"{path}: model_config: expected a mapping of ModelConfig keys, got "
            f"{type(data['model_config']).__name__} {_short(data['model_config'])}"
        )


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_model_config(config: ModelConfig, path: Path) -> None:
    """What a loadable model needs beyond `ModelConfig`'s own checks (which cover the class
    names' count, the input spec and the architecture): a class count, which a recipe may
    leave to the data but a checkpoint must state."""
    if not _is_positive_int(config.num_classes):
        raise CheckpointError(
            f"{path}: model_config.num_classes: expected a positive integer, got "
            f"{config.num_classes!r}"
        )


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
    _check_fields(data, path)
    try:
        config = from_dict(ModelConfig, data["model_config"], "model_config")
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid model_config: {error}") from None
    _check_model_config(config, path)
    return Checkpoint(config, data.get("channel_plan"), data["state_dict"], data.get("meta") or {})


def check_checkpoint_matches(
    path: str | Path,
    num_classes: int,
    class_names: list[str] | None = None,
    arch: str | None = None,
) -> Checkpoint:
    """Read the checkpoint at ``path`` and check it fits data of ``num_classes`` classes (named
    ``class_names``, in heatmap-channel order, when given) and, when given, architecture
    ``arch``; for checks before work starts (a baseline or teacher for a recipe's data).

    Returns:
        the checkpoint, read (the model is not built).

    Raises:
        CheckpointError: the file is not a usable checkpoint, or its classes or architecture
            differ (the message names the checkpoint, its classes and the expected ones).
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    config = checkpoint.model_config
    if arch is not None and arch != config.arch:
        raise CheckpointError(f"{path}: a checkpoint of arch {config.arch!r}, expected {arch!r}")
    theirs = config.class_names
    if num_classes != config.num_classes or (
        class_names is not None and theirs is not None and list(class_names) != list(theirs)
    ):
        raise CheckpointError(
            f"{path}: a checkpoint for {config.num_classes} classes "
            f"({_names(theirs)}), but the data has {num_classes} classes "
            f"({_names(class_names)}); use a checkpoint trained on this data's classes"
        )
    return checkpoint


def _names(names: list[str] | None, limit: int = 8) -> str:
    if names is None:
        return "names not recorded"
    shown = ", ".join(names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "")


def _check_finite(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN or infinite weights: a model holding them predicts garbage (or NaN) for
    every image. No layer here stores non-finite values on purpose (BatchNorm running
    variances are positive)."""
    bad = [
        name
        for name, tensor in state_dict.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} tensors hold NaN or infinite values, e.g. {bad[:3]}; the "
            "run that wrote them diverged: use an earlier checkpoint"
        )


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
    _check_finite(checkpoint.state_dict, source)
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
