"""How many channels each group keeps.

Rounding (`rounded_keep`), used by both scopes. A group of ``width`` channels asked to keep
``target`` channels keeps:
1. ``width`` when ``target >= width`` (a ratio of 0 never prunes, whatever the rounding);
2. otherwise the multiple of ``round_to`` nearest to ``target`` (halves round up, i.e. keep
   more), at least ``round_to``; with ``round_to=None``, the integer nearest to ``target``;
3. raised to the smallest count that removes at most ``max_layer_ratio`` of the group
   (``width - floor(max_layer_ratio * width)``), itself rounded up to a multiple of
   ``round_to``;
4. at least 1 and never more than ``width``, so a group narrower than ``round_to`` stays whole.
Examples with round_to=16: width 64 at ratio 0.2 keeps 48 (51.2 -> 48); width 256 at 0.5 keeps
128; width 40 at 0.2 keeps 32; width 8 keeps 8.

Layer scope: every group asks for ``(1 - ratio) * width`` (its override's ratio when one
matches). Global scope: `allocate_global`.
"""

from __future__ import annotations

import fnmatch
import math

import torch

from .graph import ChannelGroup

# Ratios and products of them are rounded to this many decimals before floor/round, so that
# (1 - 0.3) * 5 = 3.4999999999999996 counts as the 3.5 it means.
DECIMALS = 9


def min_keep(width: int, max_layer_ratio: float) -> int:
    """The fewest channels a group may keep: it loses at most ``max_layer_ratio`` of them."""
    return max(1, width - math.floor(round(max_layer_ratio * width, DECIMALS)))


def rounded_keep(target: float, width: int, round_to: int | None, max_layer_ratio: float) -> int:
    """The channels a group of ``width`` keeps when asked for ``target`` (module docstring)."""
    target = round(target, DECIMALS)
    if target >= width:
        return width
    floor = min_keep(width, max_layer_ratio)
    if round_to:
        keep = max(round_to * math.floor(target / round_to + 0.5), round_to)
        floor = round_to * math.ceil(floor / round_to)
    else:
        keep = math.floor(target + 0.5)
    return min(max(keep, floor, 1), width)


def match_overrides(
    groups: list[ChannelGroup], overrides: dict[str, float] | None
) -> dict[int, float]:
    """Group index -> ratio for the groups some pattern of ``overrides`` matches.

    A pattern (fnmatch, e.g. ``"neck.*"`` or ``"backbone.layer4*"``) matches a group when it
    matches the name of a layer whose OUTPUT channels are the group's (a conv, transposed conv
    or BatchNorm writing them), not of a layer merely reading them. When several patterns match
    a group, the last one in the dict wins, so later entries refine earlier ones.

    Raises:
        ValueError: a pattern matches no prunable layer.
    """
    ratios: dict[int, float] = {}
    for pattern, ratio in (overrides or {}).items():
        matched = [
            index
            for index, group in enumerate(groups)
            if any(fnmatch.fnmatchcase(name, pattern) for name in group.output_layer_names)
        ]
        if not matched:
            examples = ", ".join(groups[i].name for i in range(min(3, len(groups))))
            raise ValueError(
                f"ratio_overrides: pattern {pattern!r} matches no prunable layer (patterns "
                f"match module paths such as {examples}; output layers and ignored layers are "
                "not prunable)"
            )
        ratios.update(dict.fromkeys(matched, ratio))
    return ratios


def allocate_layer(
    groups: list[ChannelGroup],
    ratio: float,
    overrides: dict[int, float],
    round_to: int | None,
    max_layer_ratio: float,
) -> list[int]:
    """Channels kept per group when each loses its own ratio (layer scope)."""
    return [
        rounded_keep(
            (1 - overrides.get(index, ratio)) * group.width, group.width, round_to, max_layer_ratio
        )
        for index, group in enumerate(groups)
    ]


def normalised(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean, so groups of different sizes and scales can be ranked
    together (without it, small layers such as the heads' 3x3 convs are gutted)."""
    scores = scores.double()
    return scores / scores.mean().clamp_min(torch.finfo(torch.float64).tiny)


def allocate_global(
    groups: list[ChannelGroup],
    scores: list[torch.Tensor],
    ratio: float,
    overrides: dict[int, float],
    round_to: int | None,
    max_layer_ratio: float,
) -> list[int]:
    """Channels kept per group when all groups are ranked together (global scope).

    The groups without an override share one budget: ``ratio`` of their channels, counted
    over all of them together. Their channels are ranked by `normalised` score and removed
    lowest first, except that a group stops giving channels once it has lost
    ``max_layer_ratio`` of them (torch-pruning's own global mode does not enforce this cap).
    Each group's count is then rounded as in layer scope (`rounded_keep`), which moves the
    total by at most half a ``round_to`` step per group. Groups with an override lose their
    own ratio, as in layer scope.
    """
    keep = allocate_layer(groups, ratio, overrides, round_to, max_layer_ratio)
    free = [index for index in range(len(groups)) if index not in overrides]
    if not free:
        return keep
    total = sum(groups[index].width for index in free)
    budget = math.floor(round(ratio * total, DECIMALS) + 0.5)
    capacity = {
        index: groups[index].width - min_keep(groups[index].width, max_layer_ratio)
        for index in free
    }
    all_scores = torch.cat([normalised(scores[index]) for index in free])
    owners = torch.cat([torch.full((groups[index].width,), index) for index in free])
    removed = dict.fromkeys(free, 0)
    taken = 0
    # Stable sort: equal scores go in group order, then channel order.
    for owner in owners[torch.argsort(all_scores, stable=True)].tolist():
        if taken == budget:
            break
        if removed[owner] < capacity[owner]:
            removed[owner] += 1
            taken += 1
    for index in free:
        width = groups[index].width
        keep[index] = rounded_keep(width - removed[index], width, round_to, max_layer_ratio)
    return keep
