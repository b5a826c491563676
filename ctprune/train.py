"""`ctprune train`: the detector's training, plus what ctprune adds to a training recipe.

A ctprune training recipe is a detector recipe (model, data, train, evaluate) with one more
optional section, ``sparsity`` (`SparsityConfig`): when present, the BatchNorm scales are
sparsity-trained for network slimming, so that the ``bn_gamma`` criterion has a ranking to act on.

    sparsity:
      method: proximal      # or l1 (with SGD)
      strength: 0.1
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from detector.config import from_dict
from detector.engine.config import TrainRecipe, read_recipe
from detector.engine.fit import FitResult
from detector.engine.train import train_from_recipe

from .slimming import SparsityConfig, scheduled_lr, sparsity_callbacks

CTPRUNE_SECTIONS = ("sparsity",)


def load_training_recipe(
    path: str | Path, overrides: list[str] = ()
) -> tuple[TrainRecipe, SparsityConfig | None]:
    """The detector recipe and the sparsity section (None when absent), both strict."""
    raw = read_recipe(path, overrides)
    sparsity = raw.pop("sparsity", None)
    recipe = from_dict(TrainRecipe, raw, "")
    return recipe, (None if sparsity is None else from_dict(SparsityConfig, sparsity, "sparsity"))


def train(
    recipe: TrainRecipe,
    out_dir: str | Path,
    *,
    sparsity: SparsityConfig | None = None,
    resume: bool = False,
    device: str | None = None,
    **options,
) -> FitResult:
    """`detector.engine.train.train_from_recipe` (``options`` pass through to it), with
    sparsity training when asked for."""
    if sparsity is None:
        return train_from_recipe(recipe, out_dir, resume=resume, device=device, **options)

    def sparsity_options(model: nn.Module, steps_per_epoch: int, start_epoch: int) -> dict:
        learning_rate = scheduled_lr(recipe.train, steps_per_epoch, start_epoch)
        after_backward, after_step = sparsity_callbacks(model, sparsity, learning_rate)
        return {"after_backward": after_backward, "after_step": after_step}

    return train_from_recipe(recipe, out_dir, resume=resume, device=device, options_for_model=sparsity_options,
                             **options)
