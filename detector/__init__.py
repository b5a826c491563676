"""The CenterNet ("Objects as Points") detector: models, targets, losses, decoding, data,
training and evaluation. It depends only on `cuda_ops`; `ctprune` builds on it."""

from .lazy import lazy_exports

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

# Each public name -> the module that defines it, imported on first use (PEP 562), so that
# importing the package (for `ctprune --help`, the layout constants) does not import torch.
_EXPORTS = {
    "apply_channel_plan": ".channel_plan",
    "channel_plan_of": ".channel_plan",
    "layer_widths": ".channel_plan",
    "Checkpoint": ".checkpoint",
    "CheckpointError": ".checkpoint",
    "load_model": ".checkpoint",
    "model_from_checkpoint": ".checkpoint",
    "read_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    "InputSpec": ".config",
    "ModelConfig": ".config",
    "input_preset": ".config",
    "ARCHITECTURES": ".models",
    "CenterNet": ".models",
    "build_model": ".models",
    "output_layers": ".models",
    "count_macs": ".stats",
    "count_parameters": ".stats",
    "state_dict_mib": ".stats",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
