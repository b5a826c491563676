"""Decoding TTFNet outputs: the peaks of the class heatmaps, then at each peak's cell the box
that the ``ltrb`` distances describe around the cell's base location, as the original's
``TTFHead.get_bboxes``; with a flip test, which the original does not have.

Uses the peak suppression and top-K of `detector.inference.decode.ctdet_decode`
(`peak_topk`), so the exported graph runs it too: only MaxPool, Equal, Mul, TopK,
GatherElements, arithmetic and Concat; no NonZero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..inference.decode import gather_pixels, peak_topk
from .targets import DOWN_RATIO


def _check(name: str, outputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    for key in ("heatmap", "ltrb"):
        if key not in outputs:
            raise ValueError(f"decode_ttfnet: {name} has no {key!r} entry")
    heatmap, ltrb = outputs["heatmap"], outputs["ltrb"]
    if heatmap.dim() != 4:
        raise ValueError(
            f"decode_ttfnet: {name}['heatmap'] must be (B, C, H, W), got {tuple(heatmap.shape)}"
        )
    expected = (heatmap.shape[0], 4, *heatmap.shape[2:])
    if tuple(ltrb.shape) != expected:
        raise ValueError(
            f"decode_ttfnet: {name}['ltrb'] must be (B, 4, H, W) = {expected}, "
            f"got {tuple(ltrb.shape)}"
        )
    return heatmap, ltrb


def flip_merge_ttfnet(
    outputs: dict[str, Tensor], flipped_outputs: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """The flip test for TTFNet outputs: (heatmap probabilities, ltrb distances) of an image
    merged with those of its left-right mirror, in the unflipped output-map frame.

    The heatmaps are averaged as the CenterNet flip test does,
    ``(sigmoid(heatmap) + flip(sigmoid(flipped heatmap))) / 2``. The mirror's distance to the
    left side is a distance to the right side of the image's box (and vice versa), so its l and
    r channels are swapped before it is mirrored back and averaged. Base locations sit at
    (4 x, 4 y) with no half-stride: mirrored cell W-1-x reads from input pixel 4 x + 3 of the
    image (the mirror maps pixel p to 4 W - 1 - p, as mmdetection flips boxes), so the
    mirror's distances are moved by 3 = down ratio - 1 pixels to cell x's location (l - 3,
    r + 3) before averaging; t and b are averaged as they are.
    """
    heatmap, ltrb = _check("outputs", outputs)
    flipped_heatmap, flipped_ltrb = _check("flipped_outputs", flipped_outputs)
    if flipped_heatmap.shape != heatmap.shape:
        raise ValueError(
            f"decode_ttfnet: outputs and flipped_outputs must have the same shapes, got heatmap "
            f"{tuple(heatmap.shape)} vs {tuple(flipped_heatmap.shape)}"
        )
    shift = DOWN_RATIO - 1
    mirrored = flipped_ltrb.float().flip(3)
    left, top, right, bottom = mirrored.unbind(1)
    unmirrored = torch.stack([right - shift, top, left + shift, bottom], dim=1)
    merged_heatmap = (heatmap.float().sigmoid() + flipped_heatmap.float().sigmoid().flip(3)) / 2
    return merged_heatmap, (ltrb.float() + unmirrored) / 2


def decode_ttfnet(
    outputs: dict[str, Tensor],
    flipped_outputs: dict[str, Tensor] | None = None,
    max_detections: int = 100,
) -> Tensor:
    """(B, K, 6) detections from one stack's raw TTFNet outputs: x1, y1, x2, y2 in
    **output-map coordinates**, score, 0-based class as a float; sorted by score.

    outputs: "heatmap" (B, C, H, W) logits, "ltrb" (B, 4, H, W) distances in input pixels.
    flipped_outputs: the same for the mirrored images (the flip test, `flip_merge_ttfnet`),
        or None.
    max_detections: K, clamped to C * H * W.

    The original's ``get_bboxes``: peaks (3x3 max-pool) and top K of the sigmoid heatmaps
    (`peak_topk`), then at peak cell (x, y) the box ``(4 x - l, 4 y - t, 4 x + r, 4 y + b)``
    in input pixels, here divided by the down ratio 4: every head type's decoder returns
    output-map coordinates, which evaluation, the predictor and export map to image or input
    pixels (the map's frame is the input's scaled by 1/4, so the division is exact). Unlike
    the original, no score threshold (0.01) and no clipping to the image here, as for the
    CenterNet head: those belong to the callers.
    """
    if isinstance(max_detections, bool) or int(max_detections) != max_detections or (
        max_detections < 1
    ):
        raise ValueError(
            f"decode_ttfnet: max_detections must be a positive integer, got {max_detections!r}"
        )
    if flipped_outputs is not None:
        probabilities, ltrb = flip_merge_ttfnet(outputs, flipped_outputs)
    else:
        heatmap, ltrb = _check("outputs", outputs)
        probabilities, ltrb = heatmap.float().sigmoid(), ltrb.float()
    scores, labels, pixels, xs, ys = peak_topk(probabilities, max_detections)
    distances = gather_pixels(ltrb, pixels) / DOWN_RATIO  # (B, 4, K) in output-map cells
    boxes = torch.stack(
        [xs - distances[:, 0], ys - distances[:, 1], xs + distances[:, 2], ys + distances[:, 3]],
        dim=2,
    )
    return torch.cat([boxes, scores.unsqueeze(2), labels.float().unsqueeze(2)], dim=2)
