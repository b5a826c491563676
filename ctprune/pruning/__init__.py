"""Channel pruning of CenterNet models on torch-pruning's dependency graph.

One entry point, `prune(model, ratio, criterion, ...) -> PruneResult(model, plan, stats)`;
the folders mirror the algorithm: `graph` (coupled channels) -> `criteria` (importance) ->
`allocate` (how many channels each group keeps) -> `merge` (k-means merging) -> `api`; beside
them `slimming` (sparsity training of BN scales) and `recalibrate` (BN statistics after pruning).
"""

import importlib

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
    "PruneResult": ".api",
    "PruneShortfallWarning": ".api",
    "PruneStats": ".api",
    "prune": ".api",
    "prune_with": ".api",
    "widths_after_pruning": ".api",
    "CRITERIA": ".criteria",
    "DEFAULT_ROUND_TO": ".options",
    "PruneOptions": ".options",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
