"""Pruning deformable convolutions (`cuda_ops.ModulatedDeformConv2d`) with torch-pruning.

torch-pruning 1.6.1 knows nothing of the layer: unregistered, its parameters are pruned along
the wrong axis (kernel width). Registered naively as a custom layer it is worse: the layer reads
its input twice, once directly and once through its offset/mask conv, and torch-pruning's
grouping of that graph never returns (see the torch-pruning reference notes, section 3). So
three things are done together, all here or through `graph.py`:

1. `ModulatedDeformConvPruner` prunes the layer's output channels (``weight`` dim 0, ``bias``)
   and input channels (``weight`` dim 1 *and* the input channels of ``conv_offset_mask``, which
   reads the same input). The offset/mask conv's outputs (offsets and mask per kernel tap) are
   never pruned; `detector.output_layers` declares them.
2. The graph is traced under `tracing()`, which computes the offsets outside autograd, so the
   trace sees the layer read its input once (outputs are unchanged).
3. The layer type is a root of groups (`graph.WEIGHTED_TYPES`), so its own output channels are
   pruned, not only its inputs.

A layer with several deformable groups keeps its input channels a multiple of their count;
the original models have one, and pruning refuses a count that does not divide.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch_pruning as tp
from torch import nn

from cuda_ops import ModulatedDeformConv2d
from cuda_ops import offsets_without_grad as tracing

__all__ = [
    "CUSTOMIZED_PRUNERS",
    "DEFORMABLE_TYPES",
    "ModulatedDeformConvPruner",
    "coupled_input_layers",
    "tracing",
]


class ModulatedDeformConvPruner(tp.pruner.BasePruningFunc):
    """torch-pruning's pruning functions for `ModulatedDeformConv2d` (conv-like: input and
    output channels are pruned separately, never aliased)."""

    def prune_out_channels(
        self, layer: ModulatedDeformConv2d, idxs: Sequence[int]
    ) -> ModulatedDeformConv2d:
        keep = sorted(set(range(layer.out_channels)) - set(idxs))
        layer.out_channels = len(keep)
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        return layer

    def prune_in_channels(
        self, layer: ModulatedDeformConv2d, idxs: Sequence[int]
    ) -> ModulatedDeformConv2d:
        keep = sorted(set(range(layer.in_channels)) - set(idxs))
        if len(keep) % layer.deformable_groups:
            raise ValueError(
                f"pruning a deformable conv with {layer.deformable_groups} deformable groups to "
                f"{len(keep)} input channels: the count must stay a multiple of the groups"
            )
        layer.in_channels = len(keep)
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        # The offset/mask conv reads the same input channels.
        tp.prune_conv_in_channels(layer.conv_offset_mask, idxs)
        return layer

    def get_out_channels(self, layer: ModulatedDeformConv2d) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ModulatedDeformConv2d) -> int:
        return layer.in_channels


# For `DependencyGraph.build_dependency(customized_pruners=...)`: class keys (an instance key
# raises inside torch-pruning).
CUSTOMIZED_PRUNERS: dict[type[nn.Module], tp.pruner.BasePruningFunc] = {
    ModulatedDeformConv2d: ModulatedDeformConvPruner()
}
DEFORMABLE_TYPES = (ModulatedDeformConv2d,)


def coupled_input_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Sub-layers reading the same input channels as ``module`` (relative name, layer), pruned
    with it by its pruner: a deformable conv's offset/mask conv. Listed as consumers of the
    group so that k-means folding and width predictions cover them too."""
    if isinstance(module, ModulatedDeformConv2d):
        return [("conv_offset_mask", module.conv_offset_mask)]
    return []
