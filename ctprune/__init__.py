"""ctprune: compress CenterNet detectors by channel pruning and knowledge distillation.

Builds on `detector` (the CenterNet implementation): `prune(model, ratio, criterion)` on the
dependency graph, BN-gamma slimming, BN recalibration, recipes that chain baseline -> prune ->
fine-tune -> evaluate -> report (`load_recipe`, `run_recipe`) and the `ctprune` command line,
and knowledge distillation from the unpruned model or other teachers (`distillation_loss`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctprune")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

from .distill import DistillConfig, TeacherConfig, distillation_loss
from .pruning import CRITERIA, PruneOptions, PruneResult, PruneStats, prune, prune_with
from .pruning.recalibrate import recalibrate_bn
from .pruning.slimming import SparsityConfig, bn_gamma_statistics, sparsity_callbacks
from .recipe import Recipe, load_recipe
from .run import run_recipe

__all__ = [
    "CRITERIA",
    "DistillConfig",
    "PruneOptions",
    "PruneResult",
    "PruneStats",
    "Recipe",
    "SparsityConfig",
    "TeacherConfig",
    "__version__",
    "bn_gamma_statistics",
    "distillation_loss",
    "load_recipe",
    "prune",
    "prune_with",
    "recalibrate_bn",
    "run_recipe",
    "sparsity_callbacks",
]
