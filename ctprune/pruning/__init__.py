"""Channel pruning of CenterNet models on torch-pruning's dependency graph.

One entry point, `prune(model, ratio, criterion, ...) -> PruneResult(model, plan, stats)`
(`api`; its knobs and their checks in `options`, what it returns in `result`); the modules
mirror the algorithm: `graph` (coupled channels) -> `criteria` (importance; `taylor` reads
calibration gradients) -> `allocate` (how many channels each group keeps; `budget` and
`sensitivity` for a MAC, parameter or `latency` budget) -> `merge` (k-means merging) -> `api`;
beside them `slimming` (sparsity training of BN scales) and `recalibrate` (BN statistics after
pruning).
"""

from detector.lazy import lazy_exports

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

# Each public name -> the module that defines it, imported on first use (PEP 562), so that
# importing the package (for `ctprune --help`, the layout constants) does not import torch.
_EXPORTS = {
    "rounded_keep": ".allocate",
    "PruneResult": ".result",
    "PruneShortfallWarning": ".result",
    "PruneStats": ".result",
    "prune": ".api",
    "prune_with": ".api",
    "widths_after_pruning": ".budget",
    "CRITERIA": ".criteria",
    "DEFAULT_ROUND_TO": ".options",
    "PruneOptions": ".options",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
