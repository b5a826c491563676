"""`ctprune train`: the detector's training, plus what ctprune adds to a training recipe.

A ctprune training recipe is a detector recipe (model, data, train, evaluate) with one more
optional section, ``sparsity`` (`SparsityConfig`): when present, the BatchNorm scales are
sparsity-trained for network slimming, so that the ``bn_gamma`` criterion has a ranking to act on.

    sparsity:
      method: proximal      # or l1 (with SGD)
      strength: 0.1

Distillation (`ctprune.distill`) plugs in the same way: `train(..., distill=config,
teacher_paths=[...])` swaps the task loss for the distillation loss and hands the feature
adapters to the optimiser; the training loop is unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from detector.config import from_dict
from detector.engine.config import TrainRecipe, read_recipe
from detector.engine.fit import FitResult
from detector.engine.train import resolve_model_config, train_from_recipe

from .distill import (
    DistillConfig,
    distillation_loss,
    feature_adapters,
    image_folder_json,
    load_teacher,
    request_features,
)
from .pruning.slimming import SparsityConfig, scheduled_lr, sparsity_callbacks

CTPRUNE_SECTIONS = ("sparsity",)


def load_training_recipe(
    path: str | Path, overrides: list[str] = ()
) -> tuple[TrainRecipe, SparsityConfig | None]:
    """The detector recipe and the sparsity section (None when absent), both strict."""
    raw = read_recipe(path, overrides)
    sparsity = raw.pop("sparsity", None)
    recipe = from_dict(TrainRecipe, raw, "")
    return recipe, (None if sparsity is None else from_dict(SparsityConfig, sparsity, "sparsity"))


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
    **options,
) -> FitResult:
    """`detector.engine.train.train_from_recipe` (``options`` pass through to it), with
    sparsity training and distillation when asked for. ``teacher_paths``: the checkpoint of
    each of ``distill.teachers`` (resolved by the caller), defaulting to their ``checkpoint``."""
    hooks = []
    if distill is not None and not distill.with_labels and distill.unlabelled_images is not None:
        recipe = unlabelled_recipe(recipe, distill.unlabelled_images, out_dir)

    def model_options(model: nn.Module, steps_per_epoch: int, start_epoch: int) -> dict:
        result = {}
        if sparsity is not None:
            learning_rate = scheduled_lr(recipe.train, steps_per_epoch, start_epoch)
            result["after_backward"], result["after_step"] = sparsity_callbacks(
                model, sparsity, learning_rate
            )
        if distill is not None:
            result.update(_distill_options(model, recipe, distill, teacher_paths, hooks))
        return result

    try:
        if sparsity is None and distill is None:
            return train_from_recipe(recipe, out_dir, resume=resume, device=device, **options)
        return train_from_recipe(
            recipe,
            out_dir,
            resume=resume,
            device=device,
            options_for_model=model_options,
            **options,
        )
    finally:
        for hook in hooks:
            hook.remove()


def _distill_options(
    model: nn.Module,
    recipe: TrainRecipe,
    config: DistillConfig,
    teacher_paths: list[str | Path] | None,
    hooks: list,
) -> dict:
    """The fit options of distillation for the built (plain, on-device) student."""
    from detector.data.sources import load_source

    paths = teacher_paths or [teacher.checkpoint for teacher in config.teachers]
    if len(paths) != len(config.teachers) or any(path is None for path in paths):
        raise ValueError(
            "distill.teachers: every teacher needs a checkpoint (outside `ctprune run`, "
            "where the default teacher is the run's baseline)"
        )
    class_names = load_source(recipe.data, "val" if recipe.data.val else "train").class_names
    student_config = resolve_model_config(recipe.model, class_names)
    teachers = [
        load_teacher(teacher, student_config, path)
        for teacher, path in zip(config.teachers, paths, strict=True)
    ]
    device = next(model.parameters()).device
    memory_format = torch.channels_last if recipe.train.channels_last else torch.preserve_format
    for teacher in teachers:
        # The student's memory format, so the teacher reads its input tensor without a copy.
        teacher.model.to(device, memory_format=memory_format)
    options = {}
    adapters = None
    if config.feature_weight > 0:
        example = torch.zeros(1, 3, *student_config.input.input_size, device=device)
        adapters = feature_adapters(model, teachers, example).to(device)
        hooks.append(request_features(model))
        options["extra_parameters"] = list(adapters.parameters())
    options["loss_fn"] = distillation_loss(
        teachers, config, adapters=adapters, precision=recipe.train.precision
    )
    return options
