"""The TTFNet training loss, as the original's ``TTFHead.loss_calc``: the focal loss on the class
heatmaps and a GIoU loss on the boxes the ``ltrb`` distances describe at every location that
has a box target, weighted by the targets' sample weights.

Shapes: B images, C classes, H x W output map; predictions are the model's raw outputs
(heatmap logits, ``ltrb`` distances in input pixels), targets the
`detector.ttfnet.targets.encode_ttfnet_targets` arrays, batched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..losses import HeatmapLoss, clamped_sigmoid, combine_terms, focal_loss
from .targets import DOWN_RATIO

# The original's hm_weight and wh_weight.
HEATMAP_WEIGHT = 1.0
GIOU_WEIGHT = 5.0
# Added to the weights' sum (the original's avg_factor), so a batch without objects divides by
# non-zero.
AVERAGE_EPSILON = 1e-4

_BATCH_KEYS = ("heatmap", "box_target", "box_weight")


def base_locations(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(2, H, W) float32 input-pixel location (x, y) = (4 column, 4 row) of every output-map
    cell: the original's ``base_loc``, with no half-stride offset."""
    xs = torch.arange(width, dtype=torch.float32, device=device) * DOWN_RATIO
    ys = torch.arange(height, dtype=torch.float32, device=device) * DOWN_RATIO
    return torch.stack([xs.expand(height, width), ys[:, None].expand(height, width)])


def ltrb_to_boxes(ltrb: Tensor) -> Tensor:
    """(B, 4, H, W) distances to the left, top, right and bottom sides (input pixels) ->
    (B, 4, H, W) boxes x1, y1, x2, y2 in input pixels around each cell's base location."""
    locations = base_locations(ltrb.shape[2], ltrb.shape[3], ltrb.device)
    return torch.cat([locations - ltrb[:, :2], locations + ltrb[:, 2:]], dim=1)


def giou_loss(pred: Tensor, target: Tensor, weight: Tensor, avg_factor: Tensor) -> Tensor:
    """mmdetection v1's ``giou_loss`` as TTFNet calls it, a scalar.

    pred, target: (..., 4) boxes x1, y1, x2, y2 in pixels; weight: (...) sample weights.
    ``sum(weight * (1 - GIoU)) / avg_factor`` over the entries with weight > 0, with the +1
    pixel convention (width = x2 - x1 + 1) for intersection, areas and enclosing box.

    Computed densely without selecting the positives (no host sync, no NonZero): elsewhere the
    target is replaced by the prediction, whose loss is finite and multiplied by a zero weight.
    """
    positive = (weight > 0).unsqueeze(-1)
    target = torch.where(positive, target, pred.detach())
    left_top = torch.max(pred[..., :2], target[..., :2])
    right_bottom = torch.min(pred[..., 2:], target[..., 2:])
    overlap_sides = (right_bottom - left_top + 1).clamp(min=0)
    enclose_sides = (
        torch.max(pred[..., 2:], target[..., 2:]) - torch.min(pred[..., :2], target[..., :2]) + 1
    ).clamp(min=0)
    overlap = overlap_sides[..., 0] * overlap_sides[..., 1]
    pred_area = (pred[..., 2] - pred[..., 0] + 1) * (pred[..., 3] - pred[..., 1] + 1)
    target_area = (target[..., 2] - target[..., 0] + 1) * (target[..., 3] - target[..., 1] + 1)
    union = pred_area + target_area - overlap
    enclose = enclose_sides[..., 0] * enclose_sides[..., 1]
    gious = overlap / union - (enclose - union) / enclose
    return ((1 - gious) * weight).sum() / avg_factor


def _boxes_last(ltrb: Tensor) -> Tensor:
    """(B, 4, H, W) distances -> (B, H, W, 4) boxes in input pixels."""
    return ltrb_to_boxes(ltrb).permute(0, 2, 3, 1)


def ttfnet_loss(
    outputs: list[dict[str, Tensor]],
    batch: dict[str, Tensor],
    *,
    heatmap_loss: HeatmapLoss = focal_loss,
    balance: dict[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total TTFNet loss and its detached parts.

    outputs: the model's list of per-stack dicts: "heatmap" (B, C, H, W) logits and "ltrb"
        (B, 4, H, W) distances in input pixels. Every stack is supervised.
    batch: "heatmap" (B, C, H, W), "box_target" (B, 4, H, W) x1, y1, x2, y2 in input pixels,
        "box_weight" (B, H, W), as `encode_ttfnet_targets` makes them, batched.
    heatmap_loss: (probabilities, gt) -> scalar on the class heatmaps, `focal_loss` by
        default: the CornerNet focal loss divided by the number of peaks, which is exactly the
        original's ``ct_focal_loss`` (same alpha 2, beta 4, and the negative part alone when a
        batch has no peak).
    balance: term name -> fixed magnitude (centerX's loss balancing, `combine_terms`).

    Terms, each averaged over the stacks: ``heatmap`` and ``ltrb``, the GIoU loss of the boxes
    (base location -/+ distances) against the box targets, summed with the box weights and
    divided by the weights' sum over the batch + 1e-4 (the original's ``avg_factor``).
    ``total = 1 * heatmap + 5 * ltrb`` (the original's hm_weight and wh_weight). Returns
    (total, {"heatmap", "ltrb", "total"}), the parts detached.
    """
    if not outputs:
        raise ValueError("ttfnet_loss: outputs is empty; expected one dict per stack")
    for key in _BATCH_KEYS:
        if key not in batch:
            raise ValueError(f"ttfnet_loss: batch has no {key!r} entry")
    for stack, output in enumerate(outputs):
        for key in ("heatmap", "ltrb"):
            if key not in output:
                raise ValueError(f"ttfnet_loss: outputs[{stack}] has no {key!r} entry")
        expected = (4, *batch["box_weight"].shape[1:])
        if tuple(output["ltrb"].shape[1:]) != expected:
            raise ValueError(
                f"ttfnet_loss: outputs[{stack}]['ltrb'] must be (B, 4, H, W) with the box "
                f"targets' H x W, (B, *{expected}), got {tuple(output['ltrb'].shape)}"
            )

    heatmap_term = sum(
        heatmap_loss(clamped_sigmoid(output["heatmap"]), batch["heatmap"]) for output in outputs
    ) / len(outputs)
    with torch.autocast(device_type=batch["box_weight"].device.type, enabled=False):
        weight = batch["box_weight"].float()
        target = batch["box_target"].float().permute(0, 2, 3, 1)
        avg_factor = weight.sum() + AVERAGE_EPSILON
        ltrb_term = sum(
            giou_loss(_boxes_last(output["ltrb"].float()), target, weight, avg_factor)
            for output in outputs
        ) / len(outputs)
    return combine_terms(
        {"heatmap": heatmap_term, "ltrb": ltrb_term},
        {"heatmap": HEATMAP_WEIGHT, "ltrb": GIOU_WEIGHT},
        balance,
    )
