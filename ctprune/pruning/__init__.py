"""Channel pruning of CenterNet models on torch-pruning's dependency graph.

One entry point, `prune(model, ratio, criterion, ...) -> PruneResult(model, plan, stats)`;
the folders mirror the algorithm: `graph` (coupled channels) -> `criteria` (importance) ->
`allocate` (how many channels each group keeps) -> `merge` (k-means merging) -> `api`; beside
them `slimming` (sparsity training of BN scales) and `recalibrate` (BN statistics after pruning).
"""

from .allocate import rounded_keep
from .api import (
    PruneResult,
    PruneShortfallWarning,
    PruneStats,
    prune,
    prune_with,
    widths_after_pruning,
)
from .criteria import CRITERIA
from .options import DEFAULT_ROUND_TO, PruneOptions

__all__ = [
    "CRITERIA",
    "DEFAULT_ROUND_TO",
    "PruneOptions",
    "PruneResult",
    "PruneShortfallWarning",
    "PruneStats",
    "prune",
    "prune_with",
    "rounded_keep",
    "widths_after_pruning",
]
