"""Pruning criteria: how important each channel of a group is.

A criterion is one function ``(group: ChannelGroup) -> scores``, a float tensor of shape
``(group.width,)``, higher meaning more important; `CRITERIA` maps names to them, so a new
criterion is one small function and one dict entry. In ``scope="layer"`` only the order of a
group's scores matters; in ``scope="global"`` they are divided by their group's mean before all
groups are ranked together (`allocate.allocate_global`).

``taylor`` and ``hessian`` (`taylor.py`) read gradients of the loss on calibration batches
(the Fisher for ``hessian``), which `prune` accumulates first (`DATA_CRITERIA`).

A group keeps its highest-scoring channels (`keep_highest`), except for criteria listed in
`SELECTORS`, which choose the kept channels themselves: k-means keeps one channel per cluster
and folds the others into it (`merge.py`); its score (`merge.merge_distance`, how far a channel
is from the channels it could merge into) only decides, in global scope, how many channels each
group keeps.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .graph import ChannelGroup, output_filters
from .merge import kmeans_selection, merge_distance
from .taylor import hessian, taylor


@dataclass
class Selection:
    """Which channels of a group survive.

    Attributes:
        kept: root channel indices kept, ascending.
        merged: kept channel -> the removed channels folded into it (k-means only).
    """

    kept: list[int]
    merged: dict[int, list[int]] = field(default_factory=dict)


def l1(group: ChannelGroup) -> torch.Tensor:
    """Sum over the group's producers of the L1 norm of the filter computing each channel
    (Li et al. 2017, "Pruning Filters for Efficient ConvNets", extended to coupled groups)."""
    return sum(output_filters(layer).abs().sum(dim=1) for layer in group.producers).float()


def l2(group: ChannelGroup) -> torch.Tensor:
    """The L2 norm of all producer filters of each channel taken together (group lasso norm)."""
    return sum(output_filters(layer).pow(2).sum(dim=1) for layer in group.producers).float().sqrt()


def _affine_norms(group: ChannelGroup) -> list:
    return [layer for layer in group.norms if layer.module.weight is not None]


def bn_gamma(group: ChannelGroup) -> torch.Tensor:
    """Sum of |gamma| over the BatchNorms on each channel (network slimming, Liu et al. 2017).

    Groups without an affine BatchNorm (the heads' 3x3 convs) are ranked by `l1` instead: in
    layer scope only their order matters, and in global scope every group's scores are divided
    by their mean first, so L1-ranked and gamma-ranked groups meet on the same scale."""
    norms = _affine_norms(group)
    if not norms:
        return l1(group)
    return sum(layer.module.weight.detach()[layer.channels].abs() for layer in norms).float()


def random(group: ChannelGroup) -> torch.Tensor:
    """Uniform random scores, the baseline every criterion must beat. Seeded by the group's
    name, so the same model is always pruned the same way."""
    generator = torch.Generator().manual_seed(zlib.crc32(group.name.encode()))
    return torch.rand(group.width, generator=generator)


CRITERIA: dict[str, Callable[[ChannelGroup], torch.Tensor]] = {
    "l1": l1,
    "l2": l2,
    "bn_gamma": bn_gamma,
    "kmeans": merge_distance,
    "random": random,
    "taylor": taylor,
    "hessian": hessian,
}
# Criteria that read gradients of the loss on calibration batches: prune(..., data=batches).
DATA_CRITERIA = ("taylor", "hessian")


def keep_highest(group: ChannelGroup, scores: torch.Tensor, keep: int) -> Selection:
    """Keep the ``keep`` highest-scoring channels; ties keep the lower index."""
    order = torch.argsort(-scores, stable=True)
    return Selection(sorted(order[:keep].tolist()))


def _kmeans(group: ChannelGroup, scores: torch.Tensor, keep: int) -> Selection:
    kept, merged = kmeans_selection(group, keep)
    return Selection(kept, merged)


# Criteria that choose the kept channels themselves; the others use `keep_highest`.
SELECTORS: dict[str, Callable[[ChannelGroup, torch.Tensor, int], Selection]] = {"kmeans": _kmeans}


def check_criterion(name: str) -> Callable[[ChannelGroup], torch.Tensor]:
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; known criteria: {', '.join(CRITERIA)}")
    return CRITERIA[name]


def check_applicable(name: str, groups: list[ChannelGroup]) -> None:
    """Refuse a criterion the model gives nothing to rank with."""
    if name == "bn_gamma" and not any(_affine_norms(group) for group in groups):
        raise ValueError(
            "bn_gamma: no prunable group has a BatchNorm with affine parameters; use l1"
        )


def check_ties(name: str, groups: list[ChannelGroup], scores: list[torch.Tensor]) -> None:
    """Refuse scores that cannot rank anything.

    A group whose channels all score the same gives no reason to keep one channel over another.
    For ``bn_gamma`` that is what untrained or not sparsity-trained BatchNorms look like (every
    gamma is 1 at initialisation): when it holds for every group ranked by gamma this raises,
    when it holds for some (e.g. a fresh neck on a pretrained backbone) it warns. Other
    criteria raise only when every group is tied.
    """
    if name == "bn_gamma":
        ranked = [(g, s) for g, s in zip(groups, scores, strict=True) if _affine_norms(g)]
    else:
        ranked = list(zip(groups, scores, strict=True))
    tied = [g.name for g, s in ranked if g.width > 1 and bool((s == s[0]).all())]
    if not tied:
        return
    if name == "bn_gamma":
        what = f"all BatchNorm gammas in {len(tied)} groups are equal"
        advice = "train with sparsity first (train.sparsity) or use l1"
    else:
        what = f"all channels score the same in {len(tied)} groups"
        advice = "the weights look untrained or constant; use another criterion"
    if len(tied) == len(ranked):
        raise ValueError(f"{name}: {what} — {advice}")
    warnings.warn(
        f"{name}: {what} ({', '.join(tied[:5])}{', ...' if len(tied) > 5 else ''}), so which of "
        f"their channels go is arbitrary — {advice}",
        stacklevel=3,
    )
