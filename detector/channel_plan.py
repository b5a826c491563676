"""Channel plans: the widths of a pruned model, as data.

A channel plan maps module paths to widths: ``[in_channels, out_channels]`` for convolutions,
transposed convolutions and linear layers, ``[num_features]`` for norm layers. It holds only
the layers whose widths differ from the freshly built architecture, so it is generic across
backbones and describes merged channels just as well as removed ones.

Applying a plan resizes layers of a freshly built model in place (their values are then
overwritten by ``load_state_dict``); it lives here, in `detector`, so loading a pruned model
never needs `ctprune`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cuda_ops import ModulatedDeformConv2d

ChannelPlan = dict[str, list[int]]


def _conv_widths(module: nn.Module) -> list[int]:
    return [module.in_channels, module.out_channels]


def _resize_conv(module: nn.Module, widths: list[int]) -> None:
    in_channels, out_channels = widths
    depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
    if depthwise:
        if in_channels != out_channels:
            raise ValueError(f"a depthwise conv keeps in == out channels, got {widths}")
        module.groups = in_channels
    elif in_channels % module.groups or out_channels % module.groups:
        raise ValueError(f"widths {widths} are not divisible by the conv's {module.groups} groups")
    module.in_channels, module.out_channels = in_channels, out_channels
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        shape = (in_channels, out_channels // module.groups, *module.kernel_size)
    else:
        shape = (out_channels, in_channels // module.groups, *module.kernel_size)
    _replace(module, "weight", shape)
    _replace(module, "bias", (out_channels,))


def _linear_widths(module: nn.Linear) -> list[int]:
    return [module.in_features, module.out_features]


def _resize_linear(module: nn.Linear, widths: list[int]) -> None:
    module.in_features, module.out_features = widths
    _replace(module, "weight", (widths[1], widths[0]))
    _replace(module, "bias", (widths[1],))


def _norm_widths(module: nn.Module) -> list[int]:
    return [module.num_features]


def _resize_norm(module: nn.Module, widths: list[int]) -> None:
    (module.num_features,) = widths
    for name in ("weight", "bias", "running_mean", "running_var"):
        _replace(module, name, widths)


def _replace(module: nn.Module, name: str, shape) -> None:
    """Swap a parameter or buffer for a zero-filled one of the new shape (same dtype and
    device); its values come from the state dict that is loaded next. Zeros, not
    `torch.empty`: a resized model used before loading must not compute with garbage (NaNs)."""
    old = getattr(module, name, None)
    if old is None:
        return
    new = torch.zeros(tuple(shape), dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, new)


def _resize_deformable_conv(module: ModulatedDeformConv2d, widths: list[int]) -> None:
    """A deformable conv and its offset/mask conv read the same input, so the offset conv's
    input channels follow the layer's; its outputs (offsets and mask per tap) never change."""
    in_channels, out_channels = widths
    if in_channels % module.deformable_groups:
        raise ValueError(
            f"widths {widths} are not divisible by the layer's {module.deformable_groups} "
            "deformable groups"
        )
    module.in_channels, module.out_channels = in_channels, out_channels
    _replace(module, "weight", (out_channels, in_channels, *module.kernel_size))
    _replace(module, "bias", (out_channels,))
    _resize_conv(module.conv_offset_mask, [in_channels, module.conv_offset_mask.out_channels])


# Layer type -> (read widths, resize). The first matching type wins.
RESIZABLE: dict[type[nn.Module], tuple[Callable, Callable]] = {
    nn.modules.conv._ConvNd: (_conv_widths, _resize_conv),
    ModulatedDeformConv2d: (_conv_widths, _resize_deformable_conv),
    nn.Linear: (_linear_widths, _resize_linear),
    nn.modules.batchnorm._BatchNorm: (_norm_widths, _resize_norm),
}


def _handlers(module: nn.Module) -> tuple[Callable, Callable] | None:
    for layer_type, handlers in RESIZABLE.items():
        if isinstance(module, layer_type):
            return handlers
    return None


def layer_widths(model: nn.Module) -> ChannelPlan:
    """Widths of every resizable layer, in module order."""
    widths = {}
    for name, module in model.named_modules():
        handlers = _handlers(module)
        if handlers is not None:
            widths[name] = handlers[0](module)
    return widths


def channel_plan_of(model: nn.Module, reference: nn.Module) -> ChannelPlan | None:
    """The plan that turns ``reference`` (the freshly built architecture) into ``model``:
    the layers whose widths differ, or None when none do."""
    base = layer_widths(reference)
    current = layer_widths(model)
    if set(base) != set(current):
        raise ValueError(
            "the model's layers differ from its architecture's: "
            f"{sorted(set(base) ^ set(current))[:5]}"
        )
    plan = {name: widths for name, widths in current.items() if widths != base[name]}
    return plan or None


def apply_channel_plan(model: nn.Module, plan: ChannelPlan | None) -> nn.Module:
    """Resize the model's layers to the plan, in place, and return the model."""
    if not plan:
        return model
    modules = dict(model.named_modules())
    for name, widths in plan.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"channel plan names {name!r}, which is not a layer of this model")
        handlers = _handlers(module)
        if handlers is None:
            raise ValueError(
                f"channel plan names {name!r}, a {type(module).__name__}, which has no widths"
            )
        widths = [int(w) for w in widths]
        if len(widths) != len(handlers[0](module)) or min(widths) < 1:
            raise ValueError(
                f"channel plan entry {name!r}: expected {len(handlers[0](module))} positive "
                f"widths, got {widths}"
            )
        try:
            handlers[1](module, widths)
        except ValueError as error:
            raise ValueError(f"channel plan entry {name!r}: {error}") from None
    return model
