"""What a model is: its architecture and the input it expects.

`ModelConfig` is the `model` section of a recipe and the `model_config` entry of a checkpoint,
so a checkpoint alone says how to rebuild the network and how to prepare images for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# torchvision's ImageNet statistics, in RGB order: what its pretrained weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The original CenterNet's COCO statistics, in BGR order (it reads images with cv2 and never
# converts them), taken from its coco dataset definition.
CENTERNET_COCO_MEAN_BGR = (0.40789654, 0.44719302, 0.47026115)
CENTERNET_COCO_STD_BGR = (0.28863828, 0.27408164, 0.27809835)


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
    """(height, width) of the network input for training and fixed-resolution testing."""
    keep_resolution: bool = False
    """Test at the image's own resolution, padded up to a multiple of `pad + 1`."""
    pad: int = 31
    """Keep-resolution padding: a side of x pixels becomes (x | pad) + 1."""
    down_ratio: int = 4
    """Input pixels per output-map cell."""

    def __post_init__(self) -> None:
        if self.color_order not in ("RGB", "BGR"):
            raise ValueError(f"input.color_order: expected 'RGB' or 'BGR', got {self.color_order!r}")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.input_size = tuple(int(v) for v in self.input_size)
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3:
                raise ValueError(f"input.{name}: expected 3 values, got {len(values)}")
        if any(v <= 0 for v in self.std):
            raise ValueError(f"input.std: expected positive values, got {list(self.std)}")
        if len(self.input_size) != 2 or any(v % self.down_ratio for v in self.input_size):
            raise ValueError(
                f"input.input_size: expected (height, width) divisible by down_ratio "
                f"{self.down_ratio}, got {list(self.input_size)}"
            )


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
    raise ValueError(f"unknown input preset {name!r}; known presets: centernet, imagenet")


@dataclass
class ModelConfig:
    """The architecture: everything `build_model` needs, and the input it expects."""

    arch: str = "res18"
    """Backbone family and depth, e.g. res18, res50, res101 (see `detector.ARCHITECTURES`)."""
    num_classes: int = 80
    """Number of object classes, i.e. heatmap channels."""
    head_conv: int | None = None
    """Width of each head's 3x3 conv; None takes the architecture's default (64 for ResNets),
    0 makes every head a single 1x1 conv."""
    widths: dict | None = None
    """Channel widths of a scaled-down model (see the architecture's builder); None for the
    original widths. Pruned models keep the base widths here and store a channel plan."""
    class_names: list[str] | None = None
    """Names of the classes in heatmap-channel order, when known."""
    input: InputSpec = field(default_factory=InputSpec)
    """How images are prepared for this model."""

    def to_dict(self) -> dict:
        """Plain Python types only, so checkpoints load with ``weights_only=True``."""
        data = dataclasses.asdict(self)
        data["input"]["mean"] = list(self.input.mean)
        data["input"]["std"] = list(self.input.std)
        data["input"]["input_size"] = list(self.input.input_size)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model_config: unknown keys {unknown}; known keys: {sorted(known)}")
        data = dict(data)
        input_data = data.pop("input", None) or {}
        input_known = {f.name for f in dataclasses.fields(InputSpec)}
        unknown = sorted(set(input_data) - input_known)
        if unknown:
            raise ValueError(
                f"model_config.input: unknown keys {unknown}; known keys: {sorted(input_known)}"
            )
        return cls(**data, input=InputSpec(**input_data))
