"""ctprune: compress CenterNet detectors by channel pruning and knowledge distillation.

Builds on `detector` (the CenterNet implementation): `prune(model, ratio, criterion)` on the
dependency graph, BN-gamma slimming, BN recalibration, recipes that chain baseline -> prune ->
fine-tune -> evaluate -> report (`load_recipe`, `run_recipe`) and the `ctprune` command line,
and knowledge distillation from the unpruned model or other teachers (`distillation_loss`).
"""

from importlib.metadata import PackageNotFoundError, version

from detector.lazy import lazy_exports

try:
    __version__ = version("ctprune")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

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

# Each public name -> the module that defines it, imported on first use (PEP 562), so that
# importing the package (for `ctprune --help`, the layout constants) does not import torch.
_EXPORTS = {
    "DistillConfig": ".distill",
    "TeacherConfig": ".distill",
    "distillation_loss": ".distill",
    "CRITERIA": ".pruning",
    "PruneOptions": ".pruning",
    "PruneResult": ".pruning",
    "PruneStats": ".pruning",
    "prune": ".pruning",
    "prune_with": ".pruning",
    "recalibrate_bn": ".pruning.recalibrate",
    "SparsityConfig": ".pruning.slimming",
    "bn_gamma_statistics": ".pruning.slimming",
    "sparsity_callbacks": ".pruning.slimming",
    "Recipe": ".recipe",
    "load_recipe": ".recipe",
    "run_recipe": ".run",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
