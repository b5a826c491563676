"""ctprune: compress CenterNet detectors by channel pruning and knowledge distillation.

Builds on `detector` (the CenterNet implementation); the pruning engine, distillation and
recipes arrive in later issues. Today it provides the `ctprune` command line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctprune")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
