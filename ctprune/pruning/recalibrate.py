"""BatchNorm recalibration: re-estimate the running statistics after pruning.

Removing channels changes what every later BatchNorm sees, so the running mean and variance
learnt before pruning no longer describe its inputs, and the eval-mode model (which normalises
with them) drifts from the train-mode one (which normalises with batch statistics). A few
forward passes over training batches re-estimate them without touching any weight.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

# Show a progress bar only when recalibration takes longer than this.
PROGRESS_DELAY_SECONDS = 3.0


def _images(batch: object) -> torch.Tensor:
    """The image tensor of a batch: the project's collate gives dicts with ``image``; plain
    tensors and (image, target) tuples are accepted too."""
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(
                f"recalibrate_bn: a batch dict needs an 'image' key, got keys {sorted(batch)}"
            )
        batch = batch["image"]
    elif isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        batch = batch[0]
    if not torch.is_tensor(batch):
        raise TypeError(
            "recalibrate_bn: expected batches that are dicts with an 'image' tensor, image tensors "
            f"or (image, target) tuples, got {type(batch).__name__}"
        )
    return batch


def _statistics(norm: _BatchNorm) -> list[torch.Tensor]:
    return [norm.running_mean, norm.running_var, norm.num_batches_tracked]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    loader: Iterable,
    batches: int = 20,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Re-estimate the running mean and variance of every BatchNorm of ``model`` (in place,
    returned for chaining) from the first ``batches`` batches of ``loader``.

    Each BatchNorm that tracks running statistics is reset and, for the pass, given
    ``momentum=None``: PyTorch then keeps the cumulative average of the per-batch statistics
    (the mean of the batch means and of the unbiased batch variances over the N x H x W
    positions), so every batch counts equally and no old statistic survives. Only the
    BatchNorms are put in train mode; every other module runs in eval mode (no dropout noise in
    the statistics). Afterwards each module's momentum and train/eval flag are restored, and
    ``num_batches_tracked`` holds the number of batches used. If the pass fails, the old
    statistics are put back before the error propagates.

    Args:
        model: the (pruned) model, e.g. a CenterNet taking B x 3 x H x W images.
        loader: yields dicts with an ``image`` tensor (the project's collate), image tensors or
            (image, target) tuples; training batches, ideally with training augmentation.
        batches: how many batches to use (fewer if the loader ends first).
        device: where to run; None uses the device of the model's parameters.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches: expected an integer >= 1, got {batches!r}")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    parameter = next(model.parameters(), None)
    if device is None:
        device = parameter.device if parameter is not None else torch.device("cpu")
    modes = {module: module.training for module in model.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    # Kept to put the old statistics back if the pass fails (e.g. an empty loader).
    saved = {norm: [buffer.clone() for buffer in _statistics(norm)] for norm in norms}
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        total = min(batches, len(loader)) if hasattr(loader, "__len__") else batches
        seen = 0
        progress = tqdm(islice(loader, batches), total=total, desc="recalibrate BN",
                        delay=PROGRESS_DELAY_SECONDS, leave=False)
        for batch in progress:
            images = _images(batch).to(device)
            if parameter is not None and images.is_floating_point():
                images = images.to(parameter.dtype)
            model(images)
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate_bn: the loader yielded no batches")
    except BaseException:
        for norm, statistics in saved.items():
            for buffer, value in zip(_statistics(norm), statistics, strict=True):
                buffer.copy_(value)
        raise
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes.items():
            module.training = training
    return model
