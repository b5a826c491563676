"""The dependency graph: which channels must be pruned together, as plain data.

torch-pruning traces the model once and knows, for every convolution, every layer whose
channels are coupled to its output channels: the BatchNorm after it, the layers reading them,
and, through residual additions, every other layer writing into the same channels. ctprune calls
such a set of coupled channels a *group* and describes each one as a `ChannelGroup`: the layers
that write the channels (`producers`), the BatchNorms on them (`norms`) and the layers that read
them (`consumers`), each with the index of every group channel in that layer. Criteria, the
allocation and k-means merging read only these descriptions; torch-pruning is touched here and
nowhere else.

torch-pruning 1.6.1's pitfalls handled here (see the reference notes): the graph is traced with
autograd on even when the caller is in `no_grad` or `inference_mode`; tracing switches the
model to eval, so every module's mode is restored afterwards; layers are ignored by *instance*
when asking for groups (a class is silently dropped by torch-pruning), and ignored layers are
not hidden from the trace, which would turn them into unknown ops that couple unrelated channels.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from detector import output_layers

from .dcn import CUSTOMIZED_PRUNERS, DEFORMABLE_TYPES, coupled_input_layers, tracing

# Layer types whose weights hold channels in a known layout (convs, transposed convs, linear,
# deformable convs: out x in x k x k). Each is also a root torch-pruning grows groups from.
WEIGHTED_TYPES = (nn.modules.conv._ConvNd, nn.Linear, *DEFORMABLE_TYPES)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
# Measured with torch-pruning 1.6.1: an in-place operation on a convolution's raw output
# (`out += identity` in a ResNet block without BatchNorm) hides the convolution from its trace
# and couples the wrong layers. ctprune's own blocks always have a BatchNorm there.
MISTRACE_HINT = (
    "in-place operations right after a convolution, e.g. `out += identity` with no BatchNorm "
    "between, hide it from the trace; make them out-of-place or add the block to ignored_layers"
)


@dataclass
class LayerSlice:
    """One layer's view of a group: ``channels[j]`` is the index, in this layer's own output
    (producers, norms) or input (consumers) channels, of the group's channel ``j``."""

    name: str
    module: nn.Module
    channels: torch.Tensor  # (width,) int64


@dataclass
class ChannelGroup:
    """Channels that are pruned together, in the order of the root layer's output channels.

    Attributes:
        name: the module path of the root layer (the layer torch-pruning grew the group from).
        root: that layer.
        width: the number of channels.
        producers: convolutions, transposed convolutions and linear layers whose OUTPUT
            channels are the group's channels (several in a residual stream).
        norms: BatchNorm layers on the group's channels.
        consumers: layers that read the group's channels as INPUT channels; a layer reading
            them at several places (a DLA Root) appears once per place, a depthwise layer
            both here and among the producers.
    """

    name: str
    root: nn.Module
    width: int
    producers: list[LayerSlice] = field(default_factory=list)
    norms: list[LayerSlice] = field(default_factory=list)
    consumers: list[LayerSlice] = field(default_factory=list)

    @property
    def output_layer_names(self) -> list[str]:
        """Names of every layer whose output channels are the group's (producers and norms),
        the names `ratio_overrides` patterns are matched against."""
        return [layer.name for layer in self.producers + self.norms]


def is_transposed(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvTransposeNd)


def is_depthwise(module: nn.Module) -> bool:
    """A grouped conv with one input and one output channel per group."""
    groups = getattr(module, "groups", 1)
    return groups > 1 and groups == module.in_channels == module.out_channels


def output_filters(layer: LayerSlice, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(width, -1): the weights computing each group channel in a producer, one row per channel.
    Conv weights are out x in/groups x k x k; transposed conv weights are in x out/groups x k x k,
    i.e. per group g an (in/groups) x (out/groups) block: output channel g * out/groups + j is
    computed by column j of group g's block (for a depthwise one, DLA's upsampling, channel c
    by weight[c, 0]). ``weight``: a tensor of the weight's shape to read instead (its
    gradient, for the Taylor criterion)."""
    module = layer.module
    weight = (module.weight if weight is None else weight).detach()
    if is_transposed(module):
        groups = module.groups
        weight = weight.unflatten(0, (groups, -1)).transpose(1, 2).flatten(0, 1)
    return weight[layer.channels].flatten(1)


def input_filters(layer: LayerSlice, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(width, -1): the weights of a consumer that read each group channel, one row per channel
    (``weight``: a tensor of the weight's shape to read instead). A conv's input channel c of
    group g = c // (in/groups) is read by the rows of group g at column c % (in/groups); a
    transposed conv's by row c; a linear layer's by column c. Not for depthwise layers, whose
    only weights per channel are the producer's (`output_filters`)."""
    module = layer.module
    weight = (module.weight if weight is None else weight).detach()
    if is_transposed(module):
        return weight[layer.channels].flatten(1)
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return weight.transpose(0, 1)[layer.channels].flatten(1)
    per_group_in = module.in_channels // groups
    blocks = weight.unflatten(0, (groups, -1))  # groups x out/groups x in/groups x k x k
    group_of = torch.div(layer.channels, per_group_in, rounding_mode="floor")
    return blocks[group_of, :, layer.channels % per_group_in].flatten(1)


def input_weight_dim(module: nn.Module) -> int:
    """The weight dimension indexing a layer's input channels: 0 for transposed convs
    (in x out x k x k), 1 for convs (out x in x k x k) and linear layers (out x in)."""
    return 0 if is_transposed(module) else 1


@contextmanager
def modes_restored(model: nn.Module) -> Iterator[None]:
    """Put every module back in its own train/eval mode on exit (a model may mix them, e.g.
    frozen BatchNorms inside a training model, so one `model.train(flag)` is not enough)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def requires_grad_restored(model: nn.Module) -> Iterator[None]:
    """torch-pruning replaces pruned parameters by new `nn.Parameter`s, which always require
    grad; keep frozen parameters frozen."""
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    try:
        yield
    finally:
        for name, parameter in model.named_parameters():
            if name in frozen:
                parameter.requires_grad_(False)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device: the same
    architecture, no memory, no copying of weights. Used to count MACs and to try
    allocations (target_macs) at no cost."""
    memo: dict[int, torch.Tensor] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(
            torch.empty_like(parameter, device="meta"), requires_grad=parameter.requires_grad
        )
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model`` on ``example_inputs`` (one forward pass) into torch-pruning's graph.

    Autograd is switched on for the trace, with every parameter requiring grad (torch-pruning
    follows grad_fns, so a frozen stem would vanish from the graph); every module's mode and
    every parameter's requires_grad are restored afterwards (torch-pruning leaves the model in
    eval). Deformable convs are traced with their offsets outside autograd (see `dcn.py`)."""
    with (
        modes_restored(model),
        requires_grad_restored(model),
        torch.inference_mode(False),
        torch.enable_grad(),
        tracing(),
    ):
        for parameter in model.parameters():
            parameter.requires_grad_(True)  # a frozen layer would be invisible to the trace
        return tp.DependencyGraph().build_dependency(
            model, example_inputs, customized_pruners=CUSTOMIZED_PRUNERS, verbose=False
        )


def resolve_ignored_layers(
    model: nn.Module, ignored: Iterable | None, source: nn.Module
) -> list[nn.Module]:
    """Modules of ``model`` that must keep their output channels: the heads' output convs
    (`detector.output_layers`) plus ``ignored`` and all their submodules.

    ``ignored`` holds module paths or module instances of ``source`` (the model the caller
    passed; ``model`` is the copy being pruned, whose modules have the same paths).

    Raises:
        ValueError: an entry is not a module path of the model, not a module of it, or a class.
    """
    modules = dict(model.named_modules())
    source_names = {id(module): name for name, module in source.named_modules()}
    layers = list(output_layers(model))
    for index, entry in enumerate(ignored or []):
        if isinstance(entry, str):
            if entry not in modules:
                close = difflib.get_close_matches(entry, list(modules), n=3)
                hint = f"; did you mean {close}?" if close else ""
                raise ValueError(
                    f"ignored_layers[{index}]: {entry!r} is not a module of the model{hint}"
                )
            name = entry
        elif isinstance(entry, type):
            raise ValueError(
                f"ignored_layers[{index}]: got the class {entry.__name__}; pass module names "
                "(e.g. 'backbone.layer4') or module instances of the model"
            )
        elif isinstance(entry, nn.Module):
            if id(entry) not in source_names:
                raise ValueError(
                    f"ignored_layers[{index}]: a {type(entry).__name__} that is not a module of "
                    "the model being pruned (pass modules of the model given to prune(), or "
                    "their names)"
                )
            name = source_names[id(entry)]
        else:
            raise ValueError(
                f"ignored_layers[{index}]: expected a module name or an nn.Module, got "
                f"{type(entry).__name__}"
            )
        layers.extend(modules[name].modules())
    return layers


def _channel_map(
    name: str, group_name: str, width: int, size: int, idxs: list[int], root_idxs: list[int]
) -> list[torch.Tensor]:
    """Member index of each root channel, from torch-pruning's (idxs, root_idxs) pairs, one
    (width,) map per copy: a layer reading the group's channels at several places of its input
    (a DLA Root concatenating a block's input and output, which a residual addition couples)
    gets one map per place, in input order. ``size`` is the layer's own channel count on that
    side."""
    if max(idxs, default=0) >= size or max(root_idxs, default=0) >= width:
        raise ValueError(
            f"torch-pruning's graph couples {width} channels of group {group_name} to layer "
            f"{name}, which has {size}: it mis-traced this model ({MISTRACE_HINT})"
        )
    places: list[list[int]] = [[] for _ in range(width)]
    for root, index in sorted(set(zip(root_idxs, idxs, strict=True))):
        places[root].append(index)
    copies = {len(indices) for indices in places}
    if len(copies) != 1 or 0 in copies:
        raise ValueError(
            f"layer {name} holds only part of group {group_name}'s channels (a split or slice "
            "along channels); ctprune cannot prune such a layer (add it to ignored_layers)"
        )
    return [torch.tensor(column, dtype=torch.long) for column in zip(*places, strict=True)]


def _channel_count(module: nn.Module, consumer: bool) -> int:
    if isinstance(module, NORM_TYPES):
        return module.num_features
    if isinstance(module, nn.Linear):
        return module.in_features if consumer else module.out_features
    return module.in_channels if consumer else module.out_channels


def collect_groups(
    graph: tp.DependencyGraph, model: nn.Module, ignored_layers: list[nn.Module]
) -> list[ChannelGroup]:
    """Every prunable group of ``model``, in torch-pruning's order (model outputs first).

    A group is left out when one of the layers writing its channels is ignored, so ignoring a
    layer keeps its output channels and everything coupled to them, and when its channels are
    returned by the model."""
    names = {module: name for name, module in model.named_modules()}
    groups = []
    for group in graph.get_all_groups(
        ignored_layers=ignored_layers, root_module_types=WEIGHTED_TYPES
    ):
        if any(
            not item.dep.target.outputs and graph.is_out_channel_pruning_fn(item.dep.handler)
            for item in group
        ):
            # A layer writing these channels feeds nothing else in the graph: its output is a
            # model output. A second guard beside output_layers, for models declaring none.
            continue
        root = group[0].dep.target.module
        width = len(group[0].idxs)
        channel_group = ChannelGroup(names[root], root, width)
        seen = set()
        for item in group:
            module = item.dep.target.module
            handler = item.dep.handler
            if not isinstance(module, nn.Module) or module not in names:
                continue  # element-wise ops (ReLU, add, pooling) carry channels but hold nothing
            if isinstance(module, NORM_TYPES):
                role = channel_group.norms
            elif isinstance(module, WEIGHTED_TYPES) and graph.is_out_channel_pruning_fn(handler):
                role = channel_group.producers
            elif isinstance(module, WEIGHTED_TYPES) and graph.is_in_channel_pruning_fn(handler):
                role = channel_group.consumers
            else:
                raise ValueError(
                    f"group {channel_group.name}: layer {names[module]} ({type(module).__name__}) "
                    "is coupled to it but ctprune does not know how to prune it; add it to "
                    "ignored_layers"
                )
            key = (id(role), module)
            if key in seen:
                continue
            seen.add(key)
            size = _channel_count(module, consumer=role is channel_group.consumers)
            copies = _channel_map(
                names[module], channel_group.name, width, size, item.idxs, item.root_idxs
            )
            if len(copies) > 1 and role is not channel_group.consumers:
                raise ValueError(
                    f"layer {names[module]} writes a channel of group {channel_group.name} "
                    "twice; ctprune cannot prune such a layer (add it to ignored_layers)"
                )
            for channels in copies:  # a consumer reading the channels twice is listed twice
                role.append(LayerSlice(names[module], module, channels))
                if role is channel_group.consumers:  # e.g. a deformable conv's offset/mask conv
                    for suffix, layer in coupled_input_layers(module):
                        role.append(LayerSlice(f"{names[module]}.{suffix}", layer, channels))
            consumer_key = (id(channel_group.consumers), module)
            if role is channel_group.producers and is_depthwise(module):
                if consumer_key not in seen:
                    # Its input channels are its output channels (torch-pruning prunes both
                    # through one dependency, DLA's upsampling): it reads the group too.
                    seen.add(consumer_key)
                    channel_group.consumers.append(LayerSlice(names[module], module, copies[0]))
        groups.append(channel_group)
    return groups


def prune_channels(graph: tp.DependencyGraph, group: ChannelGroup, removed: list[int]) -> None:
    """Remove the group's channels ``removed`` (root channel indices) from every coupled layer."""
    if not removed:
        return
    pruner = graph.get_pruner_of_module(group.root)
    graph.get_pruning_group(group.root, pruner.prune_out_channels, sorted(removed)).prune(
        record_history=False
    )
