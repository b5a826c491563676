"""The CenterNet ("Objects as Points") detector: models, targets, losses, decoding, data,
training and evaluation. It depends only on `cuda_ops`; `ctprune` builds on it."""

from .channel_plan import apply_channel_plan, channel_plan_of, layer_widths
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    load_model,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .config import InputSpec, ModelConfig, input_preset
from .models import ARCHITECTURES, CenterNet, build_model, output_layers
from .stats import count_macs, count_parameters, state_dict_mib

__all__ = [
    "ARCHITECTURES",
    "CenterNet",
    "Checkpoint",
    "CheckpointError",
    "InputSpec",
    "ModelConfig",
    "apply_channel_plan",
    "build_model",
    "channel_plan_of",
    "count_macs",
    "count_parameters",
    "input_preset",
    "layer_widths",
    "load_model",
    "model_from_checkpoint",
    "output_layers",
    "read_checkpoint",
    "save_checkpoint",
    "state_dict_mib",
]
