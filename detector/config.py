"""What a model is: its architecture and the input it expects.

`ModelConfig` is the `model` section of a recipe and the `model_config` entry of a checkpoint,
so a checkpoint alone says how to rebuild the network and how to prepare images for it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .heads import head_type

# torchvision's ImageNet statistics, in RGB order: what its pretrained weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The original CenterNet's COCO statistics, in BGR order (it reads images with cv2 and never
# converts them), taken from its coco dataset definition.
CENTERNET_COCO_MEAN_BGR = (0.40789654, 0.44719302, 0.47026115)
CENTERNET_COCO_STD_BGR = (0.28863828, 0.27408164, 0.27809835)

# Input pixels per output cell of every architecture in `detector.models` (their heads read
# the stride-4 feature map, as the original CenterNet's do).
OUTPUT_STRIDE = 4


@dataclass
class InputSpec:
    """How images are turned into the network's input tensor."""

    color_order: str = "RGB"
    """Channel order of the input tensor: "RGB" or "BGR"."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean of pixels scaled to [0, 1], in `color_order`."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation of pixels scaled to [0, 1], in `color_order`."""
    input_size: tuple[int, int] = (512, 512)
    """(height, width) of the network input for training and fixed-resolution testing: positive
    multiples of down_ratio, and for a model multiples of pad + 1 (its total stride)."""
    keep_resolution: bool = False
    """Test at the image's own resolution, padded up to a multiple of `pad + 1`."""
    pad: int = 31
    """Keep-resolution padding: a side of x pixels becomes (x | pad) + 1; pad + 1 is a power of
    two, the network's total stride (32 for ResNet and DLA, 128 for hourglass)."""
    down_ratio: int = 4
    """Input pixels per output-map cell: a power of two, at most pad + 1 (every architecture
    here predicts at stride 4)."""

    def __post_init__(self) -> None:
        if self.color_order not in ("RGB", "BGR"):
            raise ValueError(f"color_order: expected 'RGB' or 'BGR', got {self.color_order!r}")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.input_size = tuple(int(v) for v in self.input_size)
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3:
                raise ValueError(f"{name}: expected 3 values, got {len(values)}")
        if not all(math.isfinite(v) for v in self.mean):
            raise ValueError(f"mean: expected finite values, got {list(self.mean)}")
        if not all(0 < v < math.inf for v in self.std):
            raise ValueError(f"std: expected positive finite values, got {list(self.std)}")
        require_int(self.pad, "pad", 0)
        if not is_power_of_two(self.pad + 1):
            raise ValueError(
                f"pad: expected pad + 1 a power of two (0, 1, 3, 7, 15, 31, 63, 127, ...), "
                f"got {self.pad!r}"
            )
        require_int(self.down_ratio, "down_ratio", 1)
        if not is_power_of_two(self.down_ratio) or self.down_ratio > self.pad + 1:
            raise ValueError(
                f"down_ratio: expected a power of two at most pad + 1 = {self.pad + 1}, "
                f"got {self.down_ratio!r}"
            )
        if len(self.input_size) != 2 or any(
            v < 1 or v % self.down_ratio for v in self.input_size
        ):
            raise ValueError(
                f"input_size: expected (height, width), positive multiples of down_ratio "
                f"{self.down_ratio}, got {list(self.input_size)}"
            )


    @staticmethod
    def expand_shorthand(data: dict, path: str) -> dict:
        """``{preset: centernet, ...}`` (a recipe's ``model.input``) as the preset's keys with
        the keys given beside ``preset`` on top; other mappings unchanged."""
        if "preset" not in data:
            return data
        name = data["preset"]
        if name not in INPUT_PRESETS:
            raise ConfigError(
                f"{path}.preset: expected one of {', '.join(INPUT_PRESETS)}, got {name!r}"
            )
        rest = {key: value for key, value in data.items() if key != "preset"}
        return {**to_dict(input_preset(name)), **rest}


INPUT_PRESETS = ("centernet", "imagenet")
"""The names `input_preset` knows (and a recipe's ``model.input.preset`` takes)."""


def input_preset(name: str, input_size: tuple[int, int] = (512, 512)) -> InputSpec:
    """Named input conventions.

    - ``imagenet``: RGB with ImageNet mean/std, the default for new models (it is what
      torchvision's pretrained backbones were trained on).
    - ``centernet``: the original CenterNet exactly: BGR, its COCO BGR mean/std and
      keep-resolution testing with pad 31 (127 for hourglass: pass ``pad`` yourself).
    """
    if name == "imagenet":
        return InputSpec(input_size=input_size)
    if name == "centernet":
        return InputSpec(
            color_order="BGR",
            mean=CENTERNET_COCO_MEAN_BGR,
            std=CENTERNET_COCO_STD_BGR,
            input_size=input_size,
            keep_resolution=True,
            pad=31,
        )
    raise ValueError(f"unknown input preset {name!r}; known presets: {', '.join(INPUT_PRESETS)}")


@dataclass
class ModelConfig:
    """The architecture: everything `build_model` needs, and the input it expects."""

    arch: str = "res18"
    """Backbone family and depth, e.g. res18, res50, res101 (see `detector.ARCHITECTURES`)."""
    head: str = "centernet"
    """Head type: the outputs the model predicts, their training targets, loss and decoder
    (see `detector.heads.HEADS`); centernet: class heatmaps, box size and centre offset;
    ttfnet: class heatmaps and the distances to the box's four sides, trained over each
    object's Gaussian area with a GIoU loss (`detector.ttfnet`). Checkpoints written before
    this key existed are centernet."""
    num_classes: int | None = None
    """Number of object classes, i.e. heatmap channels (>= 1); None takes the data's class
    count."""
    head_conv: int | None = None
    """Width of each head's 3x3 conv (>= 0); None takes the architecture's default (64 for
    ResNets), 0 makes every head a single 1x1 conv. ttfnet: the heatmap branch's two 3x3
    convs; its box branch is half as wide."""
    widths: dict | None = None
    """Channel widths of a scaled-down model (see the architecture's builder); None for the
    original widths. Pruned models keep the base widths here and store a channel plan."""
    class_names: list[str] | None = None
    """Names of the classes in heatmap-channel order, when known."""
    input: InputSpec = field(default_factory=InputSpec)
    """How images are prepared for this model. In a recipe, ``{preset: centernet}`` (or
    ``imagenet``) stands for that preset's keys (see `input_preset`); keys beside ``preset``
    override it, e.g. ``{preset: centernet, input_size: [384, 384]}``."""

    def __post_init__(self) -> None:
        try:
            head_type(self.head)
        except ValueError as error:
            raise ConfigError(f"model.head: {error}") from None
        from .models import ARCHITECTURES  # here: the model table imports torch and the heads

        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch: expected one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if self.num_classes is not None:
            require_int(self.num_classes, "num_classes", 1)
        if self.head_conv is not None:
            require_int(self.head_conv, "head_conv", 0)
        if self.input.down_ratio != OUTPUT_STRIDE:
            raise ValueError(
                f"input.down_ratio: expected {OUTPUT_STRIDE} (every architecture predicts at "
                f"stride {OUTPUT_STRIDE}), got {self.input.down_ratio!r}"
            )
        multiple = self.input.pad + 1
        if any(side % multiple for side in self.input.input_size):
            # pad + 1 is the network's total stride: other sides do not map exactly onto
            # input / down_ratio output cells.
            raise ValueError(
                f"input.input_size: expected multiples of input.pad + 1 = {multiple} (the "
                f"network's total stride), got {list(self.input.input_size)}"
            )
        if self.class_names is not None and self.num_classes is not None:
            if len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"class_names: expected num_classes = {self.num_classes} names, got "
                    f"{len(self.class_names)}"
                )


# ---------------------------------------------------------------------------------------------
# Strict loading of config dataclasses from plain data (YAML, checkpoints, --set overrides).


class ConfigError(ValueError):
    """A config value that does not fit: the message starts with its dotted path."""


# Range checks for `__post_init__`: they raise ValueError("<field>: expected <range>, got
# <value>"), and `from_dict` puts the section's dotted path in front of the field.


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_int(value: Any, name: str, minimum: int, maximum: int | None = None) -> None:
    """``value`` is an integer >= ``minimum`` (and <= ``maximum`` when given)."""
    if maximum is None:
        expected = f"an integer >= {minimum}"
    else:
        expected = f"an integer from {minimum} to {maximum}"
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (
        maximum is not None and value > maximum
    ):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def require_number(
    value: Any,
    name: str,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> None:
    """``value`` is a finite number within the given bounds (``above``/``below`` exclusive,
    ``at_least``/``at_most`` inclusive): ``lr: expected a finite number > 0, got -1.0``."""
    bounds = []
    if above is not None:
        bounds.append(f"> {above:g}")
    if at_least is not None:
        bounds.append(f">= {at_least:g}")
    if below is not None:
        bounds.append(f"< {below:g}")
    if at_most is not None:
        bounds.append(f"<= {at_most:g}")
    ok = _is_number(value) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (below is None or value < below) and (at_most is None or value <= at_most)
    if not ok:
        expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


# A run name becomes one folder under runs/: no separators, no "..", nothing hidden.
FOLDER_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def require_folder_name(value: Any, name: str) -> None:
    """``value`` is usable as one folder name under runs/ (``../../x``, an absolute path,
    ``""`` and ``.hidden`` are not)."""
    if not isinstance(value, str) or not FOLDER_NAME.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{name}: expected letters, digits, '.', '_' or '-' (a folder name under runs/, not "
            f"starting with '.'), got {value!r}"
        )


def is_power_of_two(value: int) -> bool:
    return isinstance(value, int) and value >= 1 and value & (value - 1) == 0


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(repr(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _convert(value: Any, annotation: Any, path: str) -> Any:
    """``value`` checked against (and converted to) ``annotation``; raises ConfigError."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        errors = []
        for option in arguments:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1:  # an optional section: its own error names the key inside it
            raise errors[0]
        raise ConfigError(f"{path}: expected {_describe(annotation)}, got {value!r}")
    if origin is Literal:
        if value in arguments:
            return value
        raise ConfigError(f"{path}: expected {_describe(annotation)}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"{path}: expected a mapping of {annotation.__name__} fields, got {value!r}"
            )
        return from_dict(annotation, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and arguments and arguments[-1] is not Ellipsis:
            if len(value) != len(arguments):
                raise ConfigError(f"{path}: expected {len(arguments)} values, got {value!r}")
            items = [
                _convert(v, a, f"{path}[{i}]")
                for i, (v, a) in enumerate(zip(value, arguments, strict=True))
            ]
        else:
            item_type = arguments[0] if arguments else Any
            items = [_convert(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation in (bool, str):
        if isinstance(value, annotation):
            return value
    else:
        raise TypeError(f"{path}: unsupported config annotation {annotation!r}")
    raise ConfigError(f"{path}: expected {_describe(annotation)}, got {value!r}")


def from_dict(cls: type, data: dict | None, path: str) -> Any:
    """Build config dataclass ``cls`` from plain data, strictly: unknown keys and wrong types
    raise `ConfigError` naming the dotted path (``train.lr: expected float, got 'fast'``)."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'recipe'}: expected a mapping, got {data!r}")
    if hasattr(cls, "expand_shorthand"):  # e.g. InputSpec's ``preset``
        data = cls.expand_shorthand(data, path or "recipe")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{path or 'recipe'}: unknown keys {unknown}; known keys: {sorted(fields)}"
        )
    prefix = f"{path}." if path else ""
    values = {name: _convert(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        # __post_init__ checks name their field first ("std: expected ..." or "augment.flip:
        # ..."): put the full dotted path in front of the field.
        # A check on a nested section's key names it from the field ("input.down_ratio: ...").
        named, colon, rest = str(error).partition(":")
        if colon and " " not in named and named.split(".", 1)[0] in fields:
            raise ConfigError(f"{prefix}{named}:{rest}") from None
        field_name = named.rsplit(".", 1)[-1]
        if colon and field_name in fields:
            raise ConfigError(f"{prefix}{field_name}:{rest}") from None
        raise ConfigError(f"{path or 'recipe'}: {error}") from None


def to_dict(config: Any) -> dict:
    """Plain Python types only (lists for tuples), e.g. for YAML and checkpoints."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(config)


def parse_overrides(overrides: list[str], sections: Iterable[str] | None = None) -> dict:
    """``["train.lr=1e-4", "model.arch=res50"]`` -> ``{"train": {"lr": 1e-4}, ...}``; values
    are read as YAML scalars or lists (``[1, 2]``), so types follow YAML's rules. With
    ``sections`` (the recipe's top-level keys), a key outside them is refused, naming the
    override (a command that reads only some sections must not ignore the others silently),
    and a top-level key among them (``name=x``) is allowed."""
    nested: dict = {}
    for override in overrides:
        key, separator, raw = override.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"--set {override!r}: expected section.key=value")
        parts = key.strip().split(".")
        # A top-level key (a recipe's `name`) needs no section, but only a known one.
        top_level = len(parts) == 1 and sections is not None and parts[0] in sections
        if (len(parts) < 2 and not top_level) or not all(part.strip() for part in parts):
            raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. train.lr=1e-4")
        if sections is not None and parts[0] not in sections:
            known = ", ".join(sections)
            raise ConfigError(
                f"--set {override!r}: section {parts[0]!r} is not read here; expected a key of: "
                f"{known}"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {override!r}: unreadable value ({error})") from None
        target = nested
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {override!r}: {part} is not a section")
        target[parts[-1]] = value
    return nested


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge plain mappings; overrides win."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_text(path: str | Path) -> str:
    """The text of a YAML file; a missing, binary or non-UTF-8 file raises `ConfigError`
    naming it (rather than a codec error that names no file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not a UTF-8 YAML text (undecodable byte at offset {error.start})"
        ) from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a YAML text (it holds NUL bytes, as binary files do)")
    return text


def read_yaml(path: str | Path) -> dict:
    """A YAML file that must hold a non-empty mapping; errors name the file."""
    path = Path(path)
    text = read_yaml_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if data is None:
        raise ConfigError(f"{path}: empty; expected a mapping of sections (name, model, data, ...)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data
