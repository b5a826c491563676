"""`ctprune train`: the detector's training, plus what ctprune adds to it.

A training recipe is a run recipe (`ctprune.recipe.Recipe`) without `prune`; `ctprune train`
trains its baseline (`Recipe.train_recipe()`). Its optional ``sparsity`` section
(`SparsityConfig`) sparsity-trains the BatchNorm scales for network slimming, so that the
``bn_gamma`` criterion has a ranking to act on:

    sparsity:
      method: proximal      # or l1 (with SGD)
      strength: 0.1

`train` prepares the run (`detector.engine.train.prepare_run`) and calls `fit` itself with what
it adds: sparsity training's ``after_backward`` / ``after_step``, and distillation's loss
(`train(..., distill=config, teacher_paths=[...])`), its feature adapters as extra parameters
and ``forward_kwargs={"return_features": True}`` for feature distillation.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from detector.data.sources import DataWarning
from detector.engine.config import TrainConfig, TrainRecipe
from detector.engine.fit import FitResult, LossFn, fit
from detector.engine.logs import run_log
from detector.engine.train import Prepared, prepare_run
from detector.heads import task_loss

from .distill import (
    DistillConfig,
    distillation_loss,
    feature_adapters,
    image_folder_json,
    load_teacher,
)
from .pruning.slimming import SparsityConfig, scheduled_lr, sparsity_callbacks


def unlabelled_recipe(recipe: TrainRecipe, images: str | Path, out_dir: str | Path) -> TrainRecipe:
    """``recipe`` training on the images of folder ``images`` (no annotations) instead of its
    train split, through the same loader and input pipeline; the val split is unchanged."""
    from detector.data.sources import load_source

    if recipe.data.format != "coco":
        raise ValueError(
            f"distill.unlabelled_images: needs data in COCO format (the val split is read "
            f"as before), got data.format {recipe.data.format!r}"
        )
    class_names = load_source(recipe.data, "val" if recipe.data.val else "train").class_names
    listing = image_folder_json(images, class_names, Path(out_dir) / "unlabelled_images.json")
    data = dataclasses.replace(
        recipe.data,
        format="coco",
        train=str(listing.resolve()),
        train_images=str(Path(images).expanduser().resolve()),
    )
    if data.val is not None and data.val_images is None:
        data = dataclasses.replace(data, val_images=recipe.data.images)
    return dataclasses.replace(recipe, data=data)


def train(
    recipe: TrainRecipe,
    out_dir: str | Path,
    *,
    sparsity: SparsityConfig | None = None,
    distill: DistillConfig | None = None,
    teacher_paths: list[str | Path] | None = None,
    resume: bool = False,
    device: str | None = None,
    initial_model: nn.Module | None = None,
    on_epoch_end: Callable[[int, nn.Module, dict], None] | None = None,
) -> FitResult:
    """Train ``recipe``'s model (or ``initial_model``, in place) into ``out_dir``: `prepare_run`,
    then `fit` with sparsity training's callables and distillation's loss when asked for.
    ``teacher_paths``: the checkpoint of each of ``distill.teachers`` (resolved by the caller),
    defaulting to their ``checkpoint``."""
    unlabelled = (distill is not None and not distill.with_labels
                  and distill.unlabelled_images is not None)
    if unlabelled:
        recipe = unlabelled_recipe(recipe, distill.unlabelled_images, out_dir)
    with warnings.catch_warnings():
        if unlabelled:  # a folder of images has no boxes by design: not a class missing in it
            warnings.filterwarnings("ignore", "classes with boxes in the val split", DataWarning)
        run = prepare_run(recipe, out_dir, device=device, resume=resume,
                          initial_model=initial_model)
    after_backward = after_step = None
    if sparsity is not None:
        learning_rate = scheduled_lr(recipe.train, run.steps_per_epoch, run.start_epoch)
        after_backward, after_step = sparsity_callbacks(run.plain_model, sparsity, learning_rate)
    loss_fn, extra_parameters, forward_kwargs = None, [], {}  # None: the head type's loss
    if distill is not None:
        loss_fn, extra_parameters, forward_kwargs = _distillation(
            run, recipe.train, distill, teacher_paths
        )
    with run_log(out_dir) as log:
        return fit(run.model, run.model_config, recipe.train, run.train_loader, out_dir,
                   evaluate=run.evaluate, loss_fn=loss_fn, forward_kwargs=forward_kwargs,
                   after_backward=after_backward, after_step=after_step,
                   on_epoch_end=on_epoch_end, extra_parameters=extra_parameters, resume=resume,
                   device=run.device, log=log)


def _distillation(
    run: Prepared,
    config: TrainConfig,
    distill: DistillConfig,
    teacher_paths: list[str | Path] | None,
) -> tuple[LossFn, list[nn.Parameter], dict]:
    """Distillation's loss function, its extra parameters (the feature adapters) and what the
    student must return (its neck features, for feature distillation)."""
    paths = teacher_paths or [teacher.checkpoint for teacher in distill.teachers]
    if len(paths) != len(distill.teachers) or any(path is None for path in paths):
        raise ValueError(
            "distill.teachers: every teacher needs a checkpoint (outside `ctprune run`, "
            "where the default teacher is the run's baseline)"
        )
    teachers = [
        load_teacher(teacher, run.model_config, path)
        for teacher, path in zip(distill.teachers, paths, strict=True)
    ]
    memory_format = torch.channels_last if config.channels_last else torch.preserve_format
    for teacher in teachers:
        # The student's memory format, so the teacher reads its input tensor without a copy.
        teacher.model.to(run.device, memory_format=memory_format)
    adapters, extra_parameters, forward_kwargs = None, [], {}
    if distill.feature_weight > 0:
        example = torch.zeros(1, 3, *run.model_config.input.input_size, device=run.device)
        adapters = feature_adapters(run.plain_model, teachers, example).to(run.device)
        extra_parameters = list(adapters.parameters())
        forward_kwargs = {"return_features": True}
    head = run.model_config.head
    loss_fn = distillation_loss(teachers, distill, adapters=adapters, precision=config.precision,
                                task_loss=task_loss(head, config), head=head)
    return loss_fn, extra_parameters, forward_kwargs
