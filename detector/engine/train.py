"""From a recipe to a trained checkpoint: data -> datasets -> model (`prepare_run`) -> `fit`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .. import distributed
from ..checkpoint import unwrap_model
from ..config import ConfigError, ModelConfig, to_dict
from ..data.dataset import CenterNetDataset, collate, worker_init_fn
from ..data.sources import load_splits
from ..evaluate.run import make_evaluator
from ..files import atomic_write_text
from ..heads import task_loss
from ..layout import EVAL_FOLDER, MANIFEST_FILE, RECIPE_FILE
from ..models import build_model
from .config import TrainConfig, TrainRecipe
from .fit import FitResult, check_resumable, completed_epochs, fit
from .logs import run_log
from .optim import optimizer_steps_per_epoch

logger = logging.getLogger(__name__)

"""`ctprune.layout.MANIFEST_FILE` (detector cannot import ctprune): the file that marks a
`ctprune run` folder, whose recipe.yaml a training run must not replace."""


def resolve_model_config(config: ModelConfig, class_names: list[str]) -> ModelConfig:
    """The model section with the class count and names taken from the data where it leaves
    them out; a stated class count must match the data's."""
    if config.num_classes is not None and config.num_classes != len(class_names):
        raise ConfigError(
            f"model.num_classes is {config.num_classes} but the data has {len(class_names)} "
            f"classes ({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''})"
        )
    return dataclasses.replace(config, num_classes=len(class_names), class_names=list(class_names))


def train_loader(dataset: Dataset, config: TrainConfig, collate_fn=collate) -> DataLoader:
    """Shuffled batches whose order is a function of (seed, epoch) alone, so a resumed run
    sees the same batches as an uninterrupted one. Under torch.distributed each process
    takes its share of every epoch and ``config.batch_size / world size`` images per step."""
    world_size, rank = 1, 0
    if torch.distributed.is_initialized():
        world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if config.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size is {config.batch_size}, not divisible by the {world_size} processes"
        )
    if config.batch_size > len(dataset):
        raise ConfigError(
            f"train.batch_size is {config.batch_size} but the training set has only "
            f"{len(dataset)} images"
        )
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed, drop_last=True
    )
    return DataLoader(
        dataset,
        batch_size=config.batch_size // world_size,
        sampler=sampler,
        drop_last=True,
        num_workers=config.workers,
        collate_fn=collate_fn,
        worker_init_fn=worker_init_fn,
        pin_memory=torch.cuda.is_available(),
    )


@dataclasses.dataclass
class Prepared:
    """A training run ready for `fit`: what `prepare_run` builds from a recipe."""

    model: nn.Module
    """The model to train, on ``device``; wrapped in DistributedDataParallel under torchrun."""
    model_config: ModelConfig
    """The recipe's model section with the data's class count and names."""
    train_loader: DataLoader
    """The training batches (this process's share under torchrun)."""
    evaluate: Callable[[nn.Module], dict[str, float]] | None
    """Validation metrics of a model; None when the data has no val split."""
    device: torch.device
    """This process's device."""
    start_epoch: int
    """Epochs already done: those `fit` resumes from (0 for a fresh run)."""
    accumulate: int = 1
    """Batches per optimiser step (the recipe's train.accumulate)."""

    @property
    def plain_model(self) -> nn.Module:
        """The model outside its DistributedDataParallel wrapper (what fit's callables get)."""
        return unwrap_model(self.model)

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (fewer than batches with train.accumulate > 1): what the
        lr schedule counts."""
        return optimizer_steps_per_epoch(len(self.train_loader), self.accumulate)


def prepare_run(
    recipe: TrainRecipe,
    out_dir: str | Path,
    *,
    device: str | None = None,
    resume: bool = False,
    initial_model: nn.Module | None = None,
) -> Prepared:
    """Everything `fit` needs to train the recipe's model on its data: the model (built, or
    ``initial_model``, e.g. a pruned model to fine-tune, of ``recipe.model``'s architecture,
    trained in place), the loader, the evaluation, the device. The resolved recipe is written to
    ``out_dir/recipe.yaml``. Under torchrun every process calls this and joins the process group
    here. Seeds torch with ``recipe.train.seed`` first, so the model's initial weights and
    everything built after (distillation adapters, say) are a function of the recipe."""
    out_dir = Path(out_dir)
    if resume:
        check_resumable(out_dir)  # before the data and the model are built
    device = distributed.setup(device)
    torch.manual_seed(recipe.train.seed)
    if recipe.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Class indices are positions in the class list: splits with different lists would silently
    # mix classes (an error); a class with boxes in one split only is named (a warning).
    train_source, val_source = load_splits(recipe.data)
    model_config = resolve_model_config(recipe.model, train_source.class_names)
    resolved = dataclasses.replace(recipe, model=model_config)
    if distributed.is_main_process():
        if (out_dir / MANIFEST_FILE).is_file():
            raise ConfigError(
                f"{out_dir}: holds a ctprune run ({MANIFEST_FILE}); train into another "
                "folder, its recipe.yaml is the run's"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / RECIPE_FILE, yaml.safe_dump(to_dict(resolved), sort_keys=False))

    config = recipe.train
    if initial_model is not None:
        model = initial_model
    else:
        model = build_model(
            model_config.arch,
            model_config.num_classes,
            head_conv=model_config.head_conv,
            widths=model_config.widths,
            pretrained=config.pretrained,
            head=model_config.head,
        )
    dataset = CenterNetDataset(
        train_source.records,
        model_config.num_classes,
        model_config.input,
        train=True,
        augment=config.augment,
        max_objects=config.max_objects,
        seed=config.seed,
        min_overlap=config.min_overlap,
        radius_variant=config.radius,
        head=model_config.head,
    )
    evaluate = None
    if val_source is not None:
        # The validation loss with the training's heatmap loss, unbalanced (`task_loss`).
        evaluate = make_evaluator(
            val_source, model_config, recipe.evaluate, device, out_dir / EVAL_FOLDER,
            loss_fn=task_loss(model_config.head, config, balanced=False),
        )
    logger.info(
        "training %s on %d images, %d classes",
        model_config.arch,
        len(dataset),
        model_config.num_classes,
    )
    memory_format = torch.channels_last if config.channels_last else torch.preserve_format
    model = model.to(device, memory_format=memory_format)
    loader = train_loader(dataset, config)
    start_epoch = completed_epochs(out_dir) if resume else 0
    model = distributed.wrap(model, device, config.sync_batchnorm)
    return Prepared(model, model_config, loader, evaluate, device, start_epoch, config.accumulate)


def train_from_recipe(
    recipe: TrainRecipe,
    out_dir: str | Path,
    *,
    resume: bool = False,
    device: str | None = None,
    on_epoch_end: Callable[[int, nn.Module, dict], None] | None = None,
) -> FitResult:
    """Train the recipe's model on its data with the task loss: `prepare_run`, then `fit`;
    checkpoints, logs and the resolved recipe go to ``out_dir``. Under torchrun every process
    runs this and they train one model together. For another loss or callables, call
    `prepare_run` and `fit` yourself (as `ctprune.train.train` does)."""
    run = prepare_run(recipe, out_dir, device=device, resume=resume)
    with run_log(out_dir) as log:
        return fit(run.model, run.model_config, recipe.train, run.train_loader, out_dir,
                   evaluate=run.evaluate, on_epoch_end=on_epoch_end, resume=resume,
                   device=run.device, log=log)
