"""Optimiser and learning-rate schedule from a `TrainConfig`."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .config import TrainConfig


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], config: TrainConfig
) -> torch.optim.Optimizer:
    """Adam or SGD at the batch-scaled learning rate, over the trainable parameters."""
    trainable = [p for p in parameters if p.requires_grad]
    lr = config.scaled_lr()
    if config.optimizer == "adam":
        return torch.optim.Adam(trainable, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        trainable, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def lr_factor(config: TrainConfig, epoch: float) -> float:
    """Multiplier of the peak lr at fractional ``epoch`` (0 = start of training)."""
    if config.warmup_epochs > 0 and epoch < config.warmup_epochs:
        progress = epoch / config.warmup_epochs
        return config.warmup_factor + (1 - config.warmup_factor) * progress
    if config.schedule == "multistep":
        return config.gamma ** sum(epoch >= step for step in config.lr_steps)
    if config.schedule == "step":
        return config.gamma ** math.floor(epoch / config.lr_steps[0])
    span = max(config.epochs - config.warmup_epochs, 1e-9)
    progress = min((epoch - config.warmup_epochs) / span, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def optimizer_steps_per_epoch(batches: int, accumulate: int) -> int:
    """Optimiser steps in an epoch of ``batches`` batches, stepping every ``accumulate`` of them
    and once more on a partial group at the epoch's end (groups never span epochs)."""
    return math.ceil(batches / accumulate)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimiser-step schedule; epoch-denominated settings become steps here.
    ``steps_per_epoch`` counts optimiser steps (`optimizer_steps_per_epoch`), not batches."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config, step / max(steps_per_epoch, 1))
    )
