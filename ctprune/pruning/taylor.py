"""First-order Taylor importance (Molchanov et al. 2019, "Importance Estimation for Neural
Network Pruning"), as torch-pruning 1.6.1's `GroupTaylorImportance` computes it.

Removing a weight w changes the loss by about ``-w * dL/dw``; a channel's importance is the sum
of ``|w * dL/dw|`` over every weight that computes it (its filters in the producers) or reads it
(its input slices in the consumers), with the gradients of the loss summed over a few calibration
batches (`accumulate_gradients`). Per group the layers' scores are averaged (torch-pruning's
default ``group_reduction="mean"``); torch-pruning's ``normalizer="mean"`` is not applied here
because `allocate.allocate_global` divides every group's scores by their mean itself.

Where ctprune differs from torch-pruning 1.6.1, and why:
- BatchNorm scales count: ``|gamma * dL/dgamma|`` per channel joins the mean. torch-pruning's BN
  branch tests for the GroupNorm pruning function, so its BatchNorm term never runs (a bug; the
  branch is written to score them), and Molchanov et al.'s best variant scores exactly this
  gate after the BatchNorm.
- Depthwise convolutions (DLA's upsampling) count once, through their filters: torch-pruning
  prunes them with its depthwise function, which its Taylor importance does not list, so it
  scores them not at all.
- Deformable convolutions and their offset/mask convs count like convolutions; torch-pruning
  scores no layer that has a custom pruner.
A channel none of whose consumers reads it (all their input weights zero) gets no gradient
anywhere and scores 0, however large its filters: what L1 gets most wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .graph import (
    ChannelGroup,
    input_filters,
    is_depthwise,
    modes_restored,
    output_filters,
    requires_grad_restored,
)

LossFn = Callable[[list[dict[str, Tensor]], dict[str, Tensor]], tuple[Tensor, dict]]
# Calibration batches used when the caller gives more: Taylor scores settle after a few batches
# (torch-pruning's maintainer recommends accumulating several, issue #264).
DEFAULT_BATCHES = 8


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, Tensor) else value
            for key, value in batch.items()}


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: LossFn,
    max_batches: int = DEFAULT_BATCHES,
    squared: bool = False,
) -> int:
    """Sum the gradients of ``loss_fn(model(batch["image"]), batch)`` over up to
    ``max_batches`` of ``batches`` into every parameter's ``.grad`` (replacing what was there).
    Returns the number of batches used.

    ``squared``: instead, leave in ``.grad`` the mean over the batches' images of the squared
    gradient of each image's loss (the empirical Fisher, the diagonal Hessian estimate of the
    ``hessian`` criterion): one backward pass per image.

    The forward runs in eval mode, so BatchNorm normalises with its running statistics (the
    ones the pruned model will use) and none of them is updated by calibration. Autograd is
    switched on here (for frozen parameters too), outside any context that switches it off
    (`graph.build_graph` traces deformable convs with their offsets detached; gradients must
    not be taken under it).

    Raises:
        ValueError: a batch without an "image" tensor, or no batch at all.
    """
    parameter = next(model.parameters())
    used = 0
    with (
        modes_restored(model),
        requires_grad_restored(model),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        model.eval()
        model.zero_grad(set_to_none=True)
        for weight in model.parameters():
            weight.requires_grad_(True)  # a frozen layer is prunable, so it needs scores too
        squares: dict[Tensor, Tensor] = {}
        images = 0
        for index, batch in enumerate(batches):
            if used == max_batches:
                break
            if not isinstance(batch, dict) or not isinstance(batch.get("image"), Tensor):
                raise ValueError(
                    f"data[{index}]: expected a training batch (a dict with an 'image' tensor and "
                    f"its targets), got {type(batch).__name__}"
                )
            batch = _to_device(batch, parameter.device)
            if squared:
                images += _accumulate_squares(model, batch, loss_fn, squares)
            else:
                loss, _ = loss_fn(model(batch["image"].to(parameter.dtype)), batch)
                loss.backward()
            used += 1
        if squared and used:
            for weight in model.parameters():
                weight.grad = squares[weight] / images if weight in squares else None
    if used == 0:
        raise ValueError("data: no calibration batch; the taylor criterion needs at least one")
    return used


def _accumulate_squares(model: nn.Module, batch: dict, loss_fn: LossFn,
                        squares: dict[Tensor, Tensor]) -> int:
    """Add each image's squared gradient to ``squares`` (parameter -> sum); returns the image
    count. Each image is its own batch of one: the loss's batch keys are all batched tensors."""
    count = batch["image"].shape[0]
    for index in range(count):
        single = {key: value[index:index + 1] if isinstance(value, Tensor) else value
                  for key, value in batch.items()}
        model.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model(single["image"]), single)
        loss.backward()
        for weight in model.parameters():
            if weight.grad is not None:
                squares[weight] = squares.get(weight, 0) + weight.grad.detach().pow(2)
    model.zero_grad(set_to_none=True)
    return count


def _gradient(module: nn.Module, name: str) -> Tensor:
    parameter = getattr(module, name)
    if parameter.grad is None:
        raise ValueError(
            f"taylor/hessian: {type(module).__name__} has no gradient on its {name}; these "
            "criteria need calibration batches (prune(..., data=batches))"
        )
    return parameter.grad


def taylor(group: ChannelGroup) -> Tensor:
    """(width,) mean over the group's layers of sum |w * dL/dw| over each channel's weights
    (module docstring). Reads the gradients `accumulate_gradients` left on the weights."""
    return _saliency(group, power=1)


def hessian(group: ChannelGroup) -> Tensor:
    """(width,) Optimal Brain Damage (LeCun et al. 1989): mean over the group's layers of
    sum w^2 * H over each channel's weights, H the diagonal Hessian estimated by the empirical
    Fisher that `accumulate_gradients(..., squared=True)` leaves in ``.grad`` (the mean squared
    per-image gradient; torch-pruning's GroupHessianImportance scores the same product, up to
    its constant 1/2, which no ranking sees). Same layers as `taylor`."""
    return _saliency(group, power=2)


def _saliency(group: ChannelGroup, power: int) -> Tensor:
    """Mean over the group's layers of sum |w^power * g| per channel (g: ``.grad``)."""
    terms = []
    for layer in group.producers:
        weight = output_filters(layer).pow(power)
        gradient = output_filters(layer, _gradient(layer.module, "weight"))
        terms.append((weight * gradient).abs().sum(dim=1))
    for layer in group.consumers:
        if is_depthwise(layer.module):
            continue  # its weights per channel are its filters, counted among the producers
        weight = input_filters(layer).pow(power)
        gradient = input_filters(layer, _gradient(layer.module, "weight"))
        terms.append((weight * gradient).abs().sum(dim=1))
    for layer in group.norms:
        if layer.module.weight is None:
            continue
        gamma = layer.module.weight.detach()[layer.channels].pow(power)
        terms.append((gamma * _gradient(layer.module, "weight")[layer.channels]).abs())
    return (torch.stack([term.float() for term in terms]).sum(dim=0) / len(terms)).cpu()
