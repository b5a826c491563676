"""Test-time merging, as the original CenterNet: flip test, multi-scale merge, soft-NMS.

- `flip_merge` averages the head outputs of an image and of its horizontal mirror (output-map
  frame, before decoding).
- `merge_multiscale` merges decoded detections of several test scales (image-pixel frame,
  after decoding and mapping back) with per-class soft-NMS and keeps the best ones.
- `soft_nms` is the Gaussian / linear soft-NMS of Bodla et al. with the original's parameters,
  in plain torch on any device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

SOFT_NMS_METHODS = ("gaussian", "linear")
# The original merge_outputs keeps this many detections per image (opts.K).
MAX_DETECTIONS = 100


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    method: str = "gaussian",
    iou_threshold: float = 0.5,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    plus_one: bool = True,
) -> tuple[Tensor, Tensor]:
    """Soft-NMS: repeatedly take the highest-scoring box and decay the scores of the rest.

    Args:
        boxes: (N, 4) x1, y1, x2, y2, any frame (image pixels when merging detections).
        scores: (N,) scores.
        method: "gaussian": each remaining box that overlaps the taken one is multiplied by
            exp(-IoU² / sigma) (note: sigma, not 2·sigma², as the original Cython); "linear": by
            1 - IoU when IoU > iou_threshold, else unchanged.
        iou_threshold: the linear method's threshold (the original's ``Nt``; CenterNet passes
            0.5). Unused by the Gaussian method.
        sigma: the Gaussian method's width (the original's default 0.5).
        score_threshold: a box whose decayed score falls below this is dropped (0.001).
        plus_one: compute IoU on inclusive pixel indices (width = x2 - x1 + 1), as the
            original Cython ``soft_nms`` does. It makes IoU smaller for small boxes.

    Returns:
        (keep, new_scores): keep (M,) int64 indices into `boxes` of the surviving boxes in the
        order they were taken, which is by decayed score, highest first; new_scores (M,) their
        decayed scores. Both on the device of `boxes`.

    As the original, a box is only tested against `score_threshold` right after a taken box
    decays it, and only boxes whose (plus-one) intersection with the taken box is non-empty are
    decayed; so a box that overlaps no higher-scoring box keeps its score even if it starts
    below the threshold.

    Deliberate difference: the original works in place on an (N, 5) array, moves dropped rows
    past a shrinking end and returns ``keep = range(N_left)``, which CenterNet's
    ``merge_outputs`` then ignores, keeping stale and duplicated rows. Here the survivors and
    their scores are returned and should be used. Ties between equal scores go to the lower
    index; the original's choice depends on its row swaps.
    """
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"soft_nms: method must be one of {SOFT_NMS_METHODS}, got {method!r}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"soft_nms: boxes must be (N, 4) x1, y1, x2, y2, got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"soft_nms: scores must be (N,) = ({boxes.shape[0]},), got {tuple(scores.shape)}"
        )
    if sigma <= 0:
        raise ValueError(f"soft_nms: sigma must be positive, got {sigma!r}")

    count = boxes.shape[0]
    dtype = torch.promote_types(boxes.dtype, torch.float32)
    boxes = boxes.to(dtype)
    scores = scores.to(device=boxes.device, dtype=dtype).clone()
    pixel = 1.0 if plus_one else 0.0
    areas = (boxes[:, 2] - boxes[:, 0] + pixel) * (boxes[:, 3] - boxes[:, 1] + pixel)
    remaining = torch.ones(count, dtype=torch.bool, device=boxes.device)
    keep = []
    for _ in range(count):
        if not bool(remaining.any()):
            break
        best = torch.where(remaining, scores, torch.full_like(scores, -math.inf)).argmax()
        keep.append(best)
        remaining[best] = False

        taken = boxes[best]
        width = torch.minimum(taken[2], boxes[:, 2]) - torch.maximum(taken[0], boxes[:, 0]) + pixel
        height = torch.minimum(taken[3], boxes[:, 3]) - torch.maximum(taken[1], boxes[:, 1]) + pixel
        overlapping = remaining & (width > 0) & (height > 0)
        intersection = width.clamp(min=0) * height.clamp(min=0)
        iou = intersection / (areas[best] + areas - intersection)
        if method == "gaussian":
            weight = torch.exp(-(iou * iou) / sigma)
        else:
            weight = torch.where(iou > iou_threshold, 1.0 - iou, torch.ones_like(iou))
        scores = torch.where(overlapping, scores * weight, scores)
        remaining &= ~(overlapping & (scores < score_threshold))

    if not keep:
        empty = torch.zeros(0, dtype=torch.int64, device=boxes.device)
        return empty, scores[empty]
    keep_indices = torch.stack(keep).to(torch.int64)
    return keep_indices, scores[keep_indices]


def _flip_width(tensor: Tensor) -> Tensor:
    """Mirror a (B, C, H, W) map left-right."""
    return torch.flip(tensor, dims=[3])


def _head(outputs: Mapping[str, Tensor], key: str, which: str) -> Tensor:
    if not isinstance(outputs, Mapping):
        hint = (
            " (the model returns one dict per stack: pass outputs[-1])"
            if isinstance(outputs, (list, tuple))
            else ""
        )
        raise TypeError(
            f"flip_merge: {which} must be a dict of head outputs{hint}, got "
            f"{type(outputs).__name__}"
        )
    if key not in outputs:
        raise KeyError(f"flip_merge: {which} has no '{key}' head; it has {sorted(outputs)}")
    tensor = outputs[key]
    if tensor.dim() != 4:
        raise ValueError(
            f"flip_merge: {which}['{key}'] must be (B, C, H, W), got {tuple(tensor.shape)}"
        )
    return tensor


def flip_merge(
    outputs: Mapping[str, Tensor], flipped_outputs: Mapping[str, Tensor]
) -> dict[str, Tensor | None]:
    """The original's flip test: average the heads of an image and of its mirror image.

    Args:
        outputs: head outputs of the images (one stack's dict, e.g. ``model(images)[-1]``):
            "heatmap" (B, C, H, W) logits, "wh" (B, 2, H, W), optionally "offset" (B, 2, H, W);
            output-map frame.
        flipped_outputs: the same heads for the left-right mirrored images.

    Returns:
        {"heatmap": (sigmoid(heatmap) + flip(sigmoid(flipped heatmap))) / 2, probabilities;
        "wh": (wh + flip(flipped wh)) / 2; "offset": the unflipped pass's offset, or None}, in
        the unflipped output-map frame, ready for ``ctdet_decode``. As the original, the offset
        is not averaged: a mirrored x offset would need its sign changed and its cell shifted,
        and the original simply takes it from the unflipped pass.
    """
    heatmap = _head(outputs, "heatmap", "outputs")
    flipped_heatmap = _head(flipped_outputs, "heatmap", "flipped_outputs")
    wh = _head(outputs, "wh", "outputs")
    flipped_wh = _head(flipped_outputs, "wh", "flipped_outputs")
    if heatmap.shape != flipped_heatmap.shape or wh.shape != flipped_wh.shape:
        raise ValueError(
            "flip_merge: outputs and flipped_outputs must have the same shapes, got heatmap "
            f"{tuple(heatmap.shape)} vs {tuple(flipped_heatmap.shape)} and wh "
            f"{tuple(wh.shape)} vs {tuple(flipped_wh.shape)}"
        )
    offset = _head(outputs, "offset", "outputs") if outputs.get("offset") is not None else None
    return {
        "heatmap": (heatmap.sigmoid() + _flip_width(flipped_heatmap.sigmoid())) / 2,
        "wh": (wh + _flip_width(flipped_wh)) / 2,
        "offset": offset,
    }


def merge_multiscale(
    detections_per_scale: Sequence[np.ndarray],
    num_classes: int,
    max_detections: int = MAX_DETECTIONS,
    method: str | None = "gaussian",
) -> np.ndarray:
    """Merge one image's detections from several test scales, as the original's merge_outputs.

    Args:
        detections_per_scale: per scale, (K, 6) x1, y1, x2, y2 in image pixels (already divided
            by the scale), score, 0-based class.
        num_classes: number of classes; class indices must lie in [0, num_classes).
        max_detections: how many detections to keep over all classes (the original's K, 100).
        method: soft-NMS method per class ("gaussian" as the original, or "linear"), or None
            for no soft-NMS. The original runs soft-NMS when there is more than one scale or
            ``--nms`` is set; a single scale without ``--nms`` corresponds to None.

    Returns:
        (M, 6) float32 in image pixels, M <= max_detections, sorted by (decayed) score, highest
        first. Deliberate difference: the original keeps every detection scoring at least the
        max_detections-th score, so ties can keep more; this keeps exactly the top
        max_detections (stable: ties go to the lower class, then the earlier row).
    """
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or (num_classes < 1)
    ):
        raise ValueError(
            f"merge_multiscale: num_classes must be a positive integer, got {num_classes!r}"
        )
    if int(max_detections) != max_detections or max_detections < 0:
        raise ValueError(
            f"merge_multiscale: max_detections must be a non-negative integer, got "
            f"{max_detections!r}"
        )
    if method is not None and method not in SOFT_NMS_METHODS:
        raise ValueError(
            f"merge_multiscale: method must be one of {SOFT_NMS_METHODS} or None, got {method!r}"
        )
    arrays = []
    for scale_index, detections in enumerate(detections_per_scale):
        array = np.asarray(detections, dtype=np.float32)
        if array.size == 0:
            array = array.reshape(0, 6)
        if array.ndim != 2 or array.shape[1] != 6:
            raise ValueError(
                f"merge_multiscale: detections_per_scale[{scale_index}] must be (K, 6) = x1, y1, "
                f"x2, y2, score, class, got {array.shape}"
            )
        classes = array[:, 5]
        if len(classes) and (
            (classes != np.round(classes)).any()
            or classes.min() < 0
            or classes.max() >= num_classes
        ):
            raise ValueError(
                f"merge_multiscale: detections_per_scale[{scale_index}] class column must hold "
                f"indices 0..{num_classes - 1}"
            )
        arrays.append(array)
    merged = np.concatenate([np.zeros((0, 6), dtype=np.float32)] + arrays)

    per_class = []
    for class_index in range(num_classes):
        rows = merged[merged[:, 5] == class_index]
        if len(rows) and method is not None:
            keep, new_scores = soft_nms(
                torch.from_numpy(rows[:, :4]), torch.from_numpy(rows[:, 4]), method=method
            )
            rows = rows[keep.numpy()]
            rows[:, 4] = new_scores.numpy()
        per_class.append(rows)
    merged = np.concatenate([np.zeros((0, 6), dtype=np.float32)] + per_class)
    order = np.argsort(-merged[:, 4], kind="stable")[: int(max_detections)]
    return merged[order]
