"""Budgets: what a plan costs (MACs, parameters, latency) and the allocation that meets a budget
with the least predicted loss.

A cost is a function of the layers' widths (module path -> [in, out] or [channels], as
`detector.layer_widths` gives them). `WidthCost` holds one per kind:
- "macs": each layer's MACs in the parent (torch.utils.flop_counter, as `detector.count_macs`)
  scaled by in/in0 * out/out0 (depthwise layers: by out/out0): exact for convolutions,
  transposed convolutions and linear layers, whose MACs are bilinear in their widths;
- "params": each layer's weights scaled the same way, biases and BatchNorm by out/out0, the
  parameters of layers that are never resized constant: exact;
- "latency": `latency.LatencyModel.predict_ms` on a `latency.LatencyTable`.

`allocate_budget` is a greedy descent over the groups' candidate widths (multiples of
``round_to``): from the parent, it repeatedly narrows the group whose next narrower candidate
costs the least predicted loss per unit of cost saved, until the cost is within budget; then it
widens again, the most loss recovered per unit of cost first, every group whose wider candidate
still fits (the last narrowing step may have saved more than needed). Steps that save nothing
are skipped (a narrower width that is no faster is never chosen: the stairs of the latency
model), and a group is widened for free when that costs nothing. Greedy, not exact: the costs
are not separable over groups (a convolution's MACs are the product of two groups' widths), so
no knapsack applies directly; tests/test_budget.py checks it against brute force where the
optimum is known.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from detector import count_macs
from detector.channel_plan import apply_channel_plan
from detector.stats import FLOP_FORMULAS

from .allocate import min_keep
from .graph import ChannelGroup, is_depthwise, meta_copy

# target_macs bisection stops when the ratio interval is this narrow.
RATIO_RESOLUTION = 1e-4
KINDS = ("macs", "params", "latency")
Widths = dict[str, list[int]]


def _scale(widths: list[int], parent: list[int], depthwise: bool) -> tuple[float, float]:
    """(weight scale, bias scale) of a layer at ``widths`` against the parent's."""
    out = widths[-1] / parent[-1]
    if len(widths) == 1 or depthwise:
        return out, out
    return widths[0] / parent[0] * out, out


@dataclass
class LayerCost:
    """A layer's cost in the parent: the part that scales with in x out (weights, MACs), the
    part that scales with out (biases, BatchNorm)."""

    weight: float
    bias: float
    depthwise: bool


class WidthCost:
    """The cost of ``kind`` of the parent ``model`` at any widths of its layers (module
    docstring). ``latency``: (LatencyModel, LatencyTable) for kind "latency"."""

    def __init__(self, kind: str, model: nn.Module, parent_widths: Widths,
                 input_size: tuple[int, int], latency=None):
        if kind not in KINDS:
            raise ValueError(f"budget kind: expected one of {KINDS}, got {kind!r}")
        self.kind, self.parent_widths = kind, parent_widths
        self.latency = latency
        modules = dict(model.named_modules())
        self.layers: dict[str, LayerCost] = {}
        self.fixed = 0.0
        if kind == "params":
            resized = set(parent_widths)
            for name, module in modules.items():
                own = dict(module.named_parameters(recurse=False))
                count = {key: value.numel() for key, value in own.items()}
                if name in resized:
                    bias = sum(n for key, n in count.items() if key != "weight")
                    weight = count.get("weight", 0)
                    if len(parent_widths[name]) == 1:  # a norm: everything per channel
                        weight, bias = 0, weight + bias
                    self.layers[name] = LayerCost(weight, bias, is_depthwise(module))
                else:
                    self.fixed += sum(count.values())
        elif kind == "macs":
            flops = _flops_per_module(model, input_size)
            for name in parent_widths:
                if len(parent_widths[name]) == 2 and flops.get(name):
                    self.layers[name] = LayerCost(flops[name] / 2, 0, is_depthwise(modules[name]))
            self.fixed = _total_flops(model, input_size) / 2 - sum(
                layer.weight for layer in self.layers.values()
            )
        elif latency is None:
            raise ValueError("budget kind latency: needs a latency model and table")
        self.parent = self(parent_widths)

    def __call__(self, widths: Widths) -> float:
        if self.kind == "latency":
            model, table = self.latency
            return model.predict_ms(table, widths)
        total = self.fixed
        for name, layer in self.layers.items():
            weight, bias = _scale(widths[name], self.parent_widths[name], layer.depthwise)
            total += layer.weight * weight + layer.bias * bias
        return total


def _count(model: nn.Module, input_size: tuple[int, int]) -> FlopCounterMode:
    copy = meta_copy(model).eval()
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with counter, torch.no_grad():
        copy(torch.zeros(1, 3, *input_size, device="meta"))
    return counter


def _total_flops(model: nn.Module, input_size: tuple[int, int]) -> int:
    return _count(model, input_size).get_total_flops()


def _flops_per_module(model: nn.Module, input_size: tuple[int, int]) -> dict[str, int]:
    """Module path -> FLOPs of the module itself (its submodules' own FLOPs subtracted, e.g. a
    deformable conv's offset conv)."""
    counts = _count(model, input_size).get_flop_counts()
    prefix = type(model).__name__ + "."
    totals = {key[len(prefix):]: sum(value.values()) for key, value in counts.items()
              if key.startswith(prefix)}
    own = {}
    for name, total in totals.items():
        children = [other for other in totals
                    if other.startswith(name + ".") and "." not in other[len(name) + 1:]]
        own[name] = total - sum(totals[child] for child in children)
    return own


def candidate_keeps(width: int, round_to: int | None, max_layer_ratio: float) -> list[int]:
    """The widths a group may keep, ascending: multiples of ``round_to`` (whole channels with
    None) from the fewest `min_keep` allows (rounded up) to the width itself."""
    step = round_to or 1
    low = step * math.ceil(min_keep(width, max_layer_ratio) / step)
    return sorted({*range(low, width, step), width})


def widen_for_free(
    candidates: list[list[int]], keeps: list[int], cost: Callable[[list[int]], float]
) -> list[int]:
    """``keeps`` with every group moved up its candidates while that costs nothing more: a width
    no faster than a wider one (a step of the latency model's stairs) is never kept. Groups are
    visited in order, each as far as it goes, until no group moves."""
    keeps = list(keeps)
    current = cost(keeps)
    moved = True
    while moved:
        moved = False
        for index, options in enumerate(candidates):
            wider = [option for option in options if option > keeps[index]]
            for option in wider:
                trial = keeps[:index] + [option] + keeps[index + 1:]
                after = cost(trial)
                if after <= current:
                    keeps, current, moved = trial, after, True
    return keeps


def allocate_budget(
    groups: list[ChannelGroup],
    candidates: list[list[int]],
    losses: list[dict[int, float]],
    cost: Callable[[list[int]], float],
    budget: float,
) -> list[int]:
    """Channels kept per group so that ``cost(keeps) <= budget`` with the least summed
    ``losses[i][keep]`` (module docstring: greedy narrowing, then widening).

    Args:
        groups: the groups (for error messages).
        candidates: per group, the widths it may keep, ascending, its full width last.
        losses: per group, predicted loss at each candidate (0 at the full width).
        cost: keeps -> cost of the whole model.
        budget: the most the cost may be.

    Raises:
        ValueError: even at the narrowest candidates the cost exceeds the budget.
    """
    keeps = [options[-1] for options in candidates]
    current = cost(keeps)
    narrowest = cost([options[0] for options in candidates])
    if narrowest > budget:
        raise ValueError(
            f"the budget is out of reach: with every group at its narrowest the cost is "
            f"{narrowest:.4g}, over the budget {budget:.4g}; raise max_layer_ratio or aim higher"
        )

    def trial(index: int, keep: int) -> float:
        return cost(keeps[:index] + [keep] + keeps[index + 1:])

    while current > budget:
        best = None
        for index, options in enumerate(candidates):
            position = options.index(keeps[index])
            # The nearest narrower candidate that saves anything: one that saves nothing is
            # never worth its loss (a stair of the latency model).
            for narrower in reversed(options[:position]):
                saved = current - trial(index, narrower)
                if saved > 0:
                    lost = max(losses[index][narrower] - losses[index][keeps[index]], 0.0)
                    rate = lost / saved
                    if best is None or rate < best[0]:
                        best = (rate, index, narrower)
                    break
        if best is None:
            break  # cannot happen below the narrowest cost; kept as a guard
        _, index, narrower = best
        keeps[index] = narrower
        current = cost(keeps)
    # Widen again while the budget allows, the most loss recovered per unit of cost first; a
    # wider candidate that costs nothing more is always taken.
    improved = True
    while improved:
        improved = False
        best = None
        for index, options in enumerate(candidates):
            position = options.index(keeps[index])
            if position + 1 == len(options):
                continue
            wider = options[position + 1]
            after = trial(index, wider)
            if after > budget:
                continue
            gained = losses[index][keeps[index]] - losses[index][wider]
            added = after - current
            rate = math.inf if added <= 0 else gained / added
            if (gained > 0 or added <= 0) and (best is None or rate > best[0]):
                best = (rate, index, wider, after)
        if best is not None:
            _, index, wider, current = best
            keeps[index] = wider
            improved = True
    if current > budget:
        names = ", ".join(group.name for group in groups[:3])
        raise ValueError(f"allocation missed the budget ({current:.4g} > {budget:.4g}; groups "
                         f"{names}, ...)")
    return keeps


def widths_after_pruning(
    widths: dict[str, list[int]], groups: list[ChannelGroup], keeps: list[int]
) -> dict[str, list[int]]:
    """The layer widths pruning to ``keeps`` will produce, without pruning: every layer writing
    a group's channels loses the removed channels from its outputs, every layer reading them
    from its inputs."""
    widths = copy.deepcopy(widths)
    for group, keep in zip(groups, keeps, strict=True):
        removed = group.width - keep
        for layer in group.producers:
            widths[layer.name][-1] -= removed
        for layer in group.norms:
            widths[layer.name][0] -= removed
        for layer in group.consumers:
            widths[layer.name][0] -= removed
    return widths


def macs_of_widths(
    model: nn.Module, before: dict, after: dict, input_size: tuple[int, int]
) -> int:
    """MACs of ``model`` resized to ``after`` widths, counted on a meta copy (no weights)."""
    plan = {name: value for name, value in after.items() if value != before[name]}
    return count_macs(apply_channel_plan(meta_copy(model), plan), input_size)


def bisect_ratio(target_macs: float, high: float, macs_of, what: str = "macs") -> float:
    """The smallest ratio in [0, high] whose MACs fraction (or ``what``'s: params, latency) is
    at most ``target_macs`` (they fall monotonically with the ratio in both scopes; predicted
    latency nearly so, and the bisection then finds one crossing)."""
    if macs_of(0.0) <= target_macs:
        return 0.0
    reachable = macs_of(high)
    if reachable > target_macs:
        noun = {"macs": "MACs", "params": "parameters", "latency": "predicted latency"}[what]
        raise ValueError(
            f"target_{what} {target_macs} is out of reach: with every layer at max_layer_ratio "
            f"({high}) the model keeps {reachable:.3f} of its {noun}; raise max_layer_ratio or "
            "aim higher"
        )
    low = 0.0
    while high - low > RATIO_RESOLUTION:
        middle = (low + high) / 2
        if macs_of(middle) <= target_macs:
            high = middle
        else:
            low = middle
    return high
