"""CenterNet training losses: the CornerNet focal loss on the heatmap and masked L1 losses on
size and offset, weighted and averaged over stacks as the original does.

Shapes: B images, C classes, H x W output map, M object slots (`encode_targets`' max_objects),
D regression channels (2 for wh and offset). Predictions are the model's raw head outputs
(heatmap logits); targets are the `detector.targets.encode_targets` arrays, batched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Probabilities are kept this far from 0 and 1 so that log(p) and log(1 - p) stay finite.
PROBABILITY_MARGIN = 1e-4
# Added to the regression denominator so an image batch without objects divides by non-zero.
REGRESSION_EPSILON = 1e-4


def clamped_sigmoid(logits: Tensor) -> Tensor:
    """sigmoid(logits) clamped to [1e-4, 1 - 1e-4], as a new tensor.

    The original's ``_sigmoid`` calls ``sigmoid_()`` in place, so its loss overwrote the model's
    heatmap output with probabilities; this one leaves ``logits`` untouched.
    """
    return torch.clamp(torch.sigmoid(logits), PROBABILITY_MARGIN, 1 - PROBABILITY_MARGIN)


def focal_loss(pred: Tensor, gt: Tensor) -> Tensor:
    """CornerNet's penalty-reduced focal loss (alpha = 2, beta = 4), a scalar.

    pred: (B, C, H, W) probabilities (e.g. `clamped_sigmoid` of the heatmap logits).
    gt: (B, C, H, W) target heatmap, exactly 1.0 at object centres.

    ``L = -[sum_pos log(p) (1-p)^2 + sum_neg log(1-p) p^2 (1-gt)^4] / num_pos`` with
    pos = (gt == 1), neg = (gt < 1) and num_pos counted over the whole batch. Without any
    positive the loss is the negative part alone, not normalised. Computed in float32, also
    under autocast.
    """
    if pred.shape != gt.shape:
        raise ValueError(
            f"focal_loss: pred and gt must have the same shape, got {tuple(pred.shape)} "
            f"and {tuple(gt.shape)}"
        )
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred = pred.float()
        gt = gt.float()
        positive = gt.eq(1).float()
        negative = gt.lt(1).float()
        positive_loss = torch.log(pred) * (1 - pred).pow(2) * positive
        negative_loss = torch.log(1 - pred) * pred.pow(2) * (1 - gt).pow(4) * negative
        num_positive = positive.sum()
        # Dividing by max(num_pos, 1) gives the original's two cases without a host sync:
        # with no positive the positive sum is 0 and the negative sum is returned as is.
        return -(positive_loss.sum() + negative_loss.sum()) / num_positive.clamp(min=1)


def mse_heatmap_loss(pred: Tensor, gt: Tensor) -> Tensor:
    """centerX's MSE heatmap loss (``LOSS.MSE``), a scalar: the mean of ``(pred - gt)^2`` over
    every image, class and cell, background included (``torch.nn.MSELoss()``).

    pred: (B, C, H, W) probabilities; gt: (B, C, H, W) target heatmap. Unlike the focal loss it
    is not divided by the number of objects, so it is orders of magnitude smaller (a heatmap
    weight or ``train.balance_losses`` makes up for it). Computed in float32.
    """
    _check_same_shape("mse_heatmap_loss", pred, gt)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        return (pred.float() - gt.float()).pow(2).mean()


def ignore_unlabelled_focal_loss(pred: Tensor, gt: Tensor) -> Tensor:
    """`focal_loss` without the negatives of every (image, class) channel that holds no
    positive (centerX's ``ignore_unlabel_focal_loss``, ``LOSS.IGNORE_UNLABEL``), a scalar.

    For data sets merged from single-class sets: an image of the "person" set has no "car"
    labels although it may show cars, so its car channel says nothing and must not teach the
    model that everything there is background. Only channels with an object (gt == 1
    somewhere) contribute negatives; positives and the normaliser (the batch's positives) are
    the focal loss's. centerX tests ``gt[n, c].sum() == 0``; that is the same test here, where
    every drawn Gaussian has its peak of 1. A batch without any positive gives 0.

    pred, gt: (B, C, H, W) probabilities and target heatmap. Computed in float32.
    """
    _check_same_shape("ignore_unlabelled_focal_loss", pred, gt)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred = pred.float()
        gt = gt.float()
        positive = gt.eq(1).float()
        # (B, C, 1, 1): 1 for the channels that hold an object; vectorised, not centerX's loop
        labelled = positive.amax(dim=(2, 3), keepdim=True)
        negative = gt.lt(1).float() * labelled
        positive_loss = torch.log(pred) * (1 - pred).pow(2) * positive
        negative_loss = torch.log(1 - pred) * pred.pow(2) * (1 - gt).pow(4) * negative
        return -(positive_loss.sum() + negative_loss.sum()) / positive.sum().clamp(min=1)


HEATMAP_LOSSES = {
    "focal": focal_loss,
    "mse": mse_heatmap_loss,
    "focal_labelled": ignore_unlabelled_focal_loss,
}
"""``train.heatmap_loss`` -> the ``heatmap_loss(probabilities, gt) -> scalar`` every head's loss
applies to its class heatmaps."""


def heatmap_loss_named(name: str) -> HeatmapLoss:
    """The `HEATMAP_LOSSES` entry ``name``; a ValueError listing the known ones otherwise."""
    if name not in HEATMAP_LOSSES:
        raise ValueError(
            f"heatmap_loss: expected one of {', '.join(HEATMAP_LOSSES)}, got {name!r}"
        )
    return HEATMAP_LOSSES[name]


def _check_same_shape(function: str, pred: Tensor, gt: Tensor) -> None:
    if pred.shape != gt.shape:
        raise ValueError(
            f"{function}: pred and gt must have the same shape, got {tuple(pred.shape)} "
            f"and {tuple(gt.shape)}"
        )


def _gather_at(output: Tensor, index: Tensor) -> Tensor:
    """output (B, D, H, W), index (B, M) flat cells -> (B, M, D) values at those cells."""
    batch, channels = output.shape[:2]
    flat = output.reshape(batch, channels, -1)
    gathered = flat.gather(2, index.unsqueeze(1).expand(batch, channels, index.shape[1]))
    return gathered.permute(0, 2, 1)


def reg_l1_loss(output: Tensor, mask: Tensor, index: Tensor, target: Tensor) -> Tensor:
    """Masked L1 between a dense regression map read at the object cells and its targets.

    output: (B, D, H, W) predictions in output-map units.
    mask: (B, M), 1 for slots holding an object.
    index: (B, M) int64 flat cell ``y * W + x`` of each object.
    target: (B, M, D).

    ``L = sum |pred * m - target * m| / (sum(m expanded to (B, M, D)) + 1e-4)``: the
    denominator counts objects times D, so this is a mean per coordinate, as in the original.
    """
    if output.dim() != 4:
        raise ValueError(f"reg_l1_loss: output must be (B, D, H, W), got {tuple(output.shape)}")
    batch, channels, height, width = output.shape
    slots = index.shape[-1] if index.dim() == 2 else -1
    if index.shape != (batch, slots) or mask.shape != (batch, slots):
        raise ValueError(
            f"reg_l1_loss: index and mask must be (B, M) = ({batch}, M), got "
            f"{tuple(index.shape)} and {tuple(mask.shape)}"
        )
    if target.shape != (batch, slots, channels):
        raise ValueError(
            f"reg_l1_loss: target must be (B, M, D) = {(batch, slots, channels)}, "
            f"got {tuple(target.shape)}"
        )
    with torch.autocast(device_type=output.device.type, enabled=False):
        pred = _gather_at(output.float(), index.long())
        expanded_mask = mask.float().unsqueeze(2).expand_as(pred)
        absolute_error = torch.abs(pred * expanded_mask - target.float() * expanded_mask)
        return absolute_error.sum() / (expanded_mask.sum() + REGRESSION_EPSILON)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three CenterNet loss terms (the original's hm/wh/off weights); frozen, so
    a shared default instance cannot be changed by accident."""

    heatmap: float = 1.0
    """Weight of the focal loss on the class heatmaps."""
    wh: float = 0.1
    """Weight of the L1 loss on box sizes (output-map cells, so larger than the others)."""
    offset: float = 1.0
    """Weight of the L1 loss on the sub-cell centre offsets."""


HeatmapLoss = Callable[[Tensor, Tensor], Tensor]
"""(probabilities (B, C, H, W), gt (B, C, H, W)) -> scalar: the loss on class heatmaps."""

_BATCH_KEYS = ("heatmap", "wh", "index", "mask")


def centernet_loss(
    outputs: list[dict[str, Tensor]],
    batch: dict[str, Tensor],
    weights: LossWeights = LossWeights(),  # noqa: B008 (frozen, so safe to share)
    *,
    heatmap_loss: HeatmapLoss = focal_loss,
    balance: dict[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total CenterNet loss and its detached parts.

    outputs: the model's list of per-stack dicts: "heatmap" (B, C, H, W) logits, "wh" and
        optionally "offset" (B, 2, H, W). Every stack is supervised (hourglass intermediate
        supervision).
    batch: "heatmap" (B, C, H, W), "wh" (B, M, 2), "offset" (B, M, 2), "index" (B, M),
        "mask" (B, M), as `encode_targets` makes them, batched.
    weights: the term weights, by default the original's (1, 0.1, 1).
    heatmap_loss: (probabilities, gt) -> scalar on the class heatmaps, `focal_loss` by default.
    balance: term name -> fixed magnitude, centerX's loss balancing (`combine_terms`).

    Each term is averaged over the stacks (the offset term over the stacks that have an
    "offset" output; stacks without one skip it), then
    ``total = heatmap_w * heatmap + wh_w * wh + offset_w * offset``.
    Returns (total, {"heatmap", "wh", "offset", "total"}), the dict values detached.
    """
    if not outputs:
        raise ValueError("centernet_loss: outputs is empty; expected one dict per stack")
    for key in _BATCH_KEYS:
        if key not in batch:
            raise ValueError(f"centernet_loss: batch has no {key!r} entry")
    for stack, output in enumerate(outputs):
        for key in ("heatmap", "wh"):
            if key not in output:
                raise ValueError(f"centernet_loss: outputs[{stack}] has no {key!r} entry")

    heatmap_term = sum(
        heatmap_loss(clamped_sigmoid(output["heatmap"]), batch["heatmap"]) for output in outputs
    ) / len(outputs)
    wh_term = sum(
        reg_l1_loss(output["wh"], batch["mask"], batch["index"], batch["wh"]) for output in outputs
    ) / len(outputs)
    offset_stacks = [output["offset"] for output in outputs if "offset" in output]
    if offset_stacks:
        if "offset" not in batch:
            raise ValueError("centernet_loss: the model predicts 'offset' but batch has none")
        offset_term = sum(
            reg_l1_loss(offset, batch["mask"], batch["index"], batch["offset"])
            for offset in offset_stacks
        ) / len(offset_stacks)
    else:
        offset_term = torch.zeros((), device=heatmap_term.device)
    return combine_terms(
        {"heatmap": heatmap_term, "wh": wh_term, "offset": offset_term},
        {"heatmap": weights.heatmap, "wh": weights.wh, "offset": weights.offset},
        balance,
    )


def combine_terms(
    terms: dict[str, Tensor],
    weights: dict[str, float],
    balance: dict[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(total, parts) of a head's loss from its unweighted terms (each already averaged over
    the stacks): ``total = sum(weights[name] * term)``; parts hold every term detached (as
    logged: unweighted) and "total". Every head type's loss ends here.

    balance: term name -> magnitude c, centerX's "communism" loss balancing: the term's
    contribution becomes ``c * term / term.detach()``, worth c in value whatever the term's
    scale, its gradient the term's scaled by c / term (its weight no longer matters). Terms
    not named keep their weights.
    """
    unknown = set(balance or {}) - set(terms)
    if unknown:
        raise ValueError(
            f"loss balance: unknown term(s) {sorted(unknown)}; this head's terms: {sorted(terms)}"
        )
    total = torch.zeros((), device=next(iter(terms.values())).device)
    for name, term in terms.items():
        if balance and name in balance:
            # A zero term (no objects) has no scale to balance; it contributes nothing.
            total = total + balance[name] * term / term.detach().clamp(min=1e-12)
        else:
            total = total + weights[name] * term
    parts = {name: term.detach() for name, term in terms.items()}
    parts["total"] = total.detach()
    return total, parts
