"""ctprune: compress CenterNet detectors by channel pruning and knowledge distillation.

Builds on `detector` (the CenterNet implementation): `prune(model, ratio, criterion)` on the
dependency graph, BN-gamma slimming, BN recalibration and the `ctprune` command line.
Distillation and recipes arrive in later issues.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctprune")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

from .pruning import CRITERIA, PruneResult, PruneStats, prune
from .recalibrate import recalibrate_bn
from .slimming import SparsityConfig, bn_gamma_statistics, sparsity_callbacks

__all__ = [
    "CRITERIA",
    "PruneResult",
    "PruneStats",
    "SparsityConfig",
    "__version__",
    "bn_gamma_statistics",
    "prune",
    "recalibrate_bn",
    "sparsity_callbacks",
]
