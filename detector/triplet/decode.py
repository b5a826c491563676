"""Decoding of the keypoint-triplet CenterNet with the original's numbers (Duan et al.,
github:Duankaiwen/CenterNet ``models/py_utils/kp_utils.py`` ``_decode`` and ``test/coco.py``
``kp_detection``; the simple CenterNet-47's ``utils/keypoint.py`` and ``test.py`` are the same).

Pipeline of one test scale, all batched tensor code in **output-map coordinates**:

1. `pair_corners`: sigmoid and 3x3 max-pool peaks of the three heatmaps, the top K (70) corners
   of each kind and top K centres over all classes; every (top-left, bottom-right) pair of one
   class whose embeddings differ by at most ``ae_threshold`` (0.5) and whose corners are ordered
   is a box scored (tl + br) / 2, the others score -1; the best ``num_pairs`` (1000) pairs.
2. `triplet_candidates`: the same for the mirrored images (flip test), whose boxes and centres
   are mirrored back and pooled with the others (averaging the heads would be wrong for
   corners: a mirrored top-left corner is a top-right one); boxes far outside the map are
   rejected and the rest clipped to it (`reject_outside`).
3. `match_centers`: a box is kept only if a centre keypoint of its class lies strictly inside
   its central region (the middle third of each side for boxes of at most 22500 image pixels,
   the middle fifth above), and then scores (tl + br + ct) / 3.
4. `batched_soft_nms`: per-class Gaussian soft-NMS and the top ``max_detections``, as a fixed
   number of tensor steps (no NonZero, no data-dependent shapes).

`decode_triplet` chains them (the head type's decoder; traceable by torch.export). For several
test scales the original pools the candidates of every scale (centres of scale 1 only), matches
centres once and merges boxes per class with `soft_nms_merge`: `merge_triplet_multiscale`, in
image pixels, eager.

Geometric thresholds of the original are in image pixels; they are converted with
``down_ratio`` image pixels per output cell, which is the original's single-scale test (image =
input pixels, 4 per cell). Deliberate difference: the original rejects and clips boxes at the
borders of the image inside its padded input; here the output map is the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..inference import tta

# The original's test configuration (config/CenterNet-*.json and db/detection.py).
TOP_K = 70
NUM_PAIRS = 1000
AE_THRESHOLD = 0.5
PEAK_WINDOW = 3
# Boxes whose corner lies this many image pixels beyond the image are rejected (_rescale_dets).
OUTSIDE_MARGIN_PIXELS = 5.0
# Boxes of at most this area (image pixels, 150 x 150) look for a centre in their middle third,
# larger ones in their middle fifth.
SMALL_AREA_PIXELS = 22500.0
DOWN_RATIO = 4.0
# Soft-NMS of the original test (exp_soft_nms): Gaussian with sigma 0.5, drop below 0.001;
# the multi-scale merge averages boxes with weight (1 - decay) ** 10.
SOFT_NMS_SIGMA = 0.5
SOFT_NMS_THRESHOLD = 0.001
MERGE_WEIGHT_EXP = 10.0
# A rejected candidate's score, as the original marks it.
REJECTED = -1.0
# Columns of a candidate row.
CANDIDATE_COLUMNS = ("x1", "y1", "x2", "y2", "score", "tl_score", "br_score", "class")

_OUTPUT_KEYS = (
    "tl_heatmap", "br_heatmap", "ct_heatmap", "tl_embedding", "br_embedding",
    "tl_offset", "br_offset", "ct_offset",
)


def _check_outputs(outputs: dict[str, Tensor], which: str) -> tuple[int, int, int, int]:
    if not isinstance(outputs, dict):
        hint = " (the model returns one dict per stack: pass outputs[-1])" if isinstance(
            outputs, (list, tuple)
        ) else ""
        raise TypeError(
            f"decode_triplet: {which} must be a dict of head outputs{hint}, got "
            f"{type(outputs).__name__}"
        )
    for key in _OUTPUT_KEYS:
        if key not in outputs:
            raise KeyError(f"decode_triplet: {which} has no {key!r} head; it has {sorted(outputs)}")
    heatmap = outputs["tl_heatmap"]
    if heatmap.dim() != 4:
        raise ValueError(
            f"decode_triplet: {which}['tl_heatmap'] must be (B, C, H, W), got "
            f"{tuple(heatmap.shape)}"
        )
    batch, classes, height, width = heatmap.shape
    expected = {"heatmap": classes, "embedding": 1, "offset": 2}
    for key in _OUTPUT_KEYS:
        channels = expected[key.split("_")[1]]
        if tuple(outputs[key].shape) != (batch, channels, height, width):
            raise ValueError(
                f"decode_triplet: {which}[{key!r}] must be {(batch, channels, height, width)}, "
                f"got {tuple(outputs[key].shape)}"
            )
    return batch, classes, height, width


def _peaks_top_k(heatmap_logits: Tensor, k) -> tuple[Tensor, Tensor, Tensor]:
    """Top k of the 3x3-peak-suppressed sigmoid over classes and cells: (scores, pixel index
    y * W + x, class), each (B, k), as the original's ``_nms`` + ``_topk``."""
    batch, _, height, width = heatmap_logits.shape
    heat = torch.sigmoid(heatmap_logits.float())
    neighbourhood_max = F.max_pool2d(heat, PEAK_WINDOW, stride=1, padding=PEAK_WINDOW // 2)
    heat = heat * (neighbourhood_max == heat).to(heat.dtype)
    scores, flat = heat.reshape(batch, -1).topk(k, dim=1)
    cells = height * width
    classes = torch.div(flat, cells, rounding_mode="floor")
    return scores, flat - classes * cells, classes


def _gather(dense: Tensor, pixels: Tensor) -> Tensor:
    """dense (B, D, H, W), pixels (B, k) -> (B, D, k)."""
    batch, channels = dense.shape[:2]
    flat = dense.float().reshape(batch, channels, -1)
    return flat.gather(2, pixels.unsqueeze(1).expand(batch, channels, pixels.shape[1]))


def _keypoints(outputs: dict[str, Tensor], kind: str, k) -> dict[str, Tensor]:
    """The top-k keypoints of one kind: x, y (cell + offset), score, class, pixel; (B, k)."""
    width = outputs[f"{kind}_heatmap"].shape[3]
    scores, pixels, classes = _peaks_top_k(outputs[f"{kind}_heatmap"], k)
    rows = torch.div(pixels, width, rounding_mode="floor")
    offset = _gather(outputs[f"{kind}_offset"], pixels)
    return {
        "x": (pixels - rows * width).float() + offset[:, 0],
        "y": rows.float() + offset[:, 1],
        "score": scores,
        "class": classes,
        "pixel": pixels,
    }


def pair_corners(
    outputs: dict[str, Tensor],
    K: int = TOP_K,
    num_pairs: int = NUM_PAIRS,
    ae_threshold: float = AE_THRESHOLD,
) -> tuple[Tensor, Tensor]:
    """Corner pairs and centre keypoints of one stack's raw outputs, the original's ``_decode``.

    outputs: "tl_heatmap", "br_heatmap", "ct_heatmap" (B, C, H, W) logits, "tl_embedding",
        "br_embedding" (B, 1, H, W), "tl_offset", "br_offset", "ct_offset" (B, 2, H, W).
    K: keypoints of each kind (clamped to C * H * W); num_pairs: pairs kept (clamped to K^2).

    Pair (i, j) of the top-K top-left corner i and bottom-right corner j is rejected (score
    -1) when their classes differ, ``|e_i - e_j| > ae_threshold``, ``x_br < x_tl`` or
    ``y_br < y_tl``; otherwise it scores (s_tl + s_br) / 2. The pairs are ranked over all K^2
    by score (rejected ones last, in no particular order).

    Returns (candidates (B, P, 8): x1, y1, x2, y2, score, tl_score, br_score, class;
    centres (B, K, 4): x, y, class, score), output-map coordinates, float32, dense: rejected
    pairs stay, scored -1.
    """
    batch, classes, height, width = _check_outputs(outputs, "outputs")
    if int(K) != K or K < 1:
        raise ValueError(f"decode_triplet: K must be a positive integer, got {K!r}")
    if int(num_pairs) != num_pairs or num_pairs < 1:
        raise ValueError(f"decode_triplet: num_pairs must be a positive integer, got {num_pairs!r}")
    # sym_min stays symbolic under torch.export; on plain ints it is min.
    k = torch.sym_min(int(K), classes * height * width)
    tl = _keypoints(outputs, "tl", k)
    br = _keypoints(outputs, "br", k)
    ct = _keypoints(outputs, "ct", k)
    tl_embedding = _gather(outputs["tl_embedding"], tl["pixel"])[:, 0]  # (B, k)
    br_embedding = _gather(outputs["br_embedding"], br["pixel"])[:, 0]

    def rows(values: Tensor) -> Tensor:  # top-left corners along dim 1
        return values.unsqueeze(2).expand(batch, k, k)

    def columns(values: Tensor) -> Tensor:  # bottom-right corners along dim 2
        return values.unsqueeze(1).expand(batch, k, k)

    tl_x, tl_y, br_x, br_y = rows(tl["x"]), rows(tl["y"]), columns(br["x"]), columns(br["y"])
    tl_score, br_score = rows(tl["score"]), columns(br["score"])
    rejected = (
        (rows(tl["class"]) != columns(br["class"]))
        | (torch.abs(rows(tl_embedding) - columns(br_embedding)) > ae_threshold)
        | (br_x < tl_x)
        | (br_y < tl_y)
    )
    scores = torch.where(rejected, torch.full_like(tl_score, REJECTED), (tl_score + br_score) / 2)
    candidates = torch.stack(
        [tl_x, tl_y, br_x, br_y, scores, tl_score, br_score, rows(tl["class"]).float()], dim=3
    ).reshape(batch, k * k, len(CANDIDATE_COLUMNS))
    pairs = torch.sym_min(int(num_pairs), k * k)
    _, order = scores.reshape(batch, k * k).topk(pairs, dim=1)
    candidates = candidates.gather(
        1, order.unsqueeze(2).expand(batch, pairs, len(CANDIDATE_COLUMNS))
    )
    centres = torch.stack([ct["x"], ct["y"], ct["class"].float(), ct["score"]], dim=2)
    return candidates, centres


def mirror(candidates: Tensor, centres: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Candidates and centres of a left-right mirrored map, mirrored back: x -> W - x, and the
    box's x1 and x2 swap roles, as the original (``out_width - x``; exactly, the mirror of a
    continuous x in cells is W - 1/down_ratio - x, a pixel apart, which the original ignores)."""
    x1, y1, x2, y2 = candidates[..., 0], candidates[..., 1], candidates[..., 2], candidates[..., 3]
    mirrored = torch.cat(
        [torch.stack([width - x2, y1, width - x1, y2], dim=-1), candidates[..., 4:]], dim=-1
    )
    mirrored_centres = torch.cat([(width - centres[..., 0]).unsqueeze(-1), centres[..., 1:]], -1)
    return mirrored, mirrored_centres


def reject_outside(
    candidates: Tensor, centres: Tensor, height, width, margin: float
) -> tuple[Tensor, Tensor]:
    """The original's ``_rescale_dets`` in the map's frame: a candidate with x1 <= -margin,
    x2 >= W + margin, y1 <= -margin or y2 >= H + margin scores -1; then boxes and centres are
    clipped to [0, W] x [0, H]. candidates (B, N, 8), centres (B, Q, 4)."""
    x1, y1, x2, y2 = (candidates[..., index] for index in range(4))
    outside = (x1 <= -margin) | (x2 >= width + margin) | (y1 <= -margin) | (y2 >= height + margin)
    scores = torch.where(outside, torch.full_like(x1, REJECTED), candidates[..., 4])
    clipped = torch.stack(
        [x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)], -1
    )
    candidates = torch.cat([clipped, scores.unsqueeze(-1), candidates[..., 5:]], dim=-1)
    centres = torch.cat(
        [
            centres[..., 0:1].clamp(0, width),
            centres[..., 1:2].clamp(0, height),
            centres[..., 2:],
        ],
        dim=-1,
    )
    return candidates, centres


def match_centers(candidates: Tensor, centres: Tensor, small_area: float) -> Tensor:
    """Scores after centre matching, the original's ``kp_detection`` loop (test/coco.py).

    candidates: (B, N, 8) rows x1, y1, x2, y2, score, tl_score, br_score, class; centres:
    (B, Q, 4) x, y, class, score; one frame; small_area: the area threshold in that frame.

    A candidate with score > -1 and area ``(x2 - x1)(y2 - y1) <= small_area`` looks in the
    central region between 1/3 and 2/3 of each side (n = 3), a larger one between 2/5 and 3/5
    (n = 5). The first centre in ``centres``' order of the candidate's class lying strictly
    inside gives the new score ``(2 score + centre score) / 3``, the mean of the three
    keypoint scores; candidates without one (and rejected ones) score -1. Returns (B, N).
    """
    x1, y1, x2, y2 = (candidates[..., index : index + 1] for index in range(4))  # (B, N, 1)
    scores, classes = candidates[..., 4], candidates[..., 7]
    small = (x2 - x1) * (y2 - y1) <= small_area
    # n = 3: (2 x1 + x2) / 3 .. (x1 + 2 x2) / 3; n = 5: (3 x1 + 2 x2) / 5 .. (2 x1 + 3 x2) / 5.
    left = torch.where(small, (2 * x1 + x2) / 3, (3 * x1 + 2 * x2) / 5)
    right = torch.where(small, (x1 + 2 * x2) / 3, (2 * x1 + 3 * x2) / 5)
    top = torch.where(small, (2 * y1 + y2) / 3, (3 * y1 + 2 * y2) / 5)
    bottom = torch.where(small, (y1 + 2 * y2) / 3, (2 * y1 + 3 * y2) / 5)
    centre_x, centre_y = centres[..., 0].unsqueeze(1), centres[..., 1].unsqueeze(1)  # (B, 1, Q)
    inside = (
        (centre_x > left)
        & (centre_x < right)
        & (centre_y > top)
        & (centre_y < bottom)
        & (centres[..., 2].unsqueeze(1) == classes.unsqueeze(2))
    )  # (B, N, Q)
    # argmax gives the first maximum: the first matching centre, as the original's np.argmax.
    first = inside.float().argmax(dim=2)
    centre_score = centres[..., 3].gather(1, first)
    matched = inside.any(dim=2) & (scores > REJECTED)
    return torch.where(matched, (scores * 2 + centre_score) / 3, torch.full_like(scores, REJECTED))


def batched_soft_nms(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    max_detections: int,
    sigma: float = SOFT_NMS_SIGMA,
    score_threshold: float = SOFT_NMS_THRESHOLD,
    pixel: float = 1.0,
) -> Tensor:
    """Per-class Gaussian soft-NMS and the best ``max_detections``, in ``max_detections`` fixed
    tensor steps (traceable; no NonZero).

    boxes (B, N, 4), scores (B, N), classes (B, N); candidates scoring -1 or less take no part.
    Each step takes the remaining candidate of highest (decayed) score; the remaining
    candidates of its class whose intersection (computed with ``pixel`` added to widths and
    heights: the original's plus-one on image pixels, ``1 / down_ratio`` in output cells) is
    non-empty are multiplied by exp(-IoU^2 / sigma) and dropped below ``score_threshold``.
    That is the original's per-class ``soft_nms`` (method 2) followed by its best
    ``max_per_image`` over all classes: the taken scores never rise, so the first steps take
    the best survivors of every class. As `detector.inference.tta.soft_nms`, only the
    survivors count (the original keeps stale rows, see there); ties go to the lower index.

    Returns (B, max_detections, 6) x1, y1, x2, y2, score, class, best first; rows past the
    survivors are zeros.
    """
    if int(max_detections) != max_detections or max_detections < 1:
        raise ValueError(
            f"decode_triplet: max_detections must be a positive integer, got {max_detections!r}"
        )
    boxes, scores, classes = boxes.float(), scores.float(), classes.float()
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = (x2 - x1 + pixel) * (y2 - y1 + pixel)
    remaining = scores > REJECTED
    positions = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)
    negative_infinity = torch.full_like(scores, -math.inf)
    taken_rows = []
    for _ in range(int(max_detections)):
        best = torch.where(remaining, scores, negative_infinity).argmax(dim=1, keepdim=True)
        taken = remaining.gather(1, best)  # (B, 1): anything left to take
        best_box = boxes.gather(1, best.unsqueeze(2).expand(-1, 1, 4))[:, 0]  # (B, 4)
        best_score, best_class = scores.gather(1, best), classes.gather(1, best)
        row = torch.cat([best_box, best_score, best_class], dim=1)
        taken_rows.append(torch.where(taken, row, torch.zeros_like(row)))
        remaining = remaining & (positions != best)

        inter_width = torch.minimum(best_box[:, 2:3], x2) - torch.maximum(best_box[:, 0:1], x1)
        inter_height = torch.minimum(best_box[:, 3:4], y2) - torch.maximum(best_box[:, 1:2], y1)
        inter_width, inter_height = inter_width + pixel, inter_height + pixel
        overlapping = (
            remaining & taken & (classes == best_class) & (inter_width > 0) & (inter_height > 0)
        )
        intersection = inter_width.clamp(min=0) * inter_height.clamp(min=0)
        iou = intersection / (areas.gather(1, best) + areas - intersection)
        scores = torch.where(overlapping, scores * torch.exp(-(iou * iou) / sigma), scores)
        remaining = remaining & ~(overlapping & (scores < score_threshold))
    return torch.stack(taken_rows, dim=1)


def triplet_candidates(
    outputs: dict[str, Tensor],
    flipped_outputs: dict[str, Tensor] | None = None,
    *,
    K: int = TOP_K,
    num_pairs: int = NUM_PAIRS,
    ae_threshold: float = AE_THRESHOLD,
    down_ratio: float = DOWN_RATIO,
) -> tuple[Tensor, Tensor]:
    """Steps 1 and 2 of the module docstring: `pair_corners` of the images and, for the flip
    test, of the mirrored images (mirrored back, pooled after them), then `reject_outside`
    with the original's 5-pixel margin. Returns (candidates (B, N, 8), centres (B, Q, 4)),
    N = 2P and Q = 2K with the flip test, output-map coordinates, rejected candidates at -1."""
    batch, _, height, width = _check_outputs(outputs, "outputs")
    candidates, centres = pair_corners(outputs, K, num_pairs, ae_threshold)
    if flipped_outputs is not None:
        flipped_shape = _check_outputs(flipped_outputs, "flipped_outputs")
        if flipped_shape != (batch, outputs["tl_heatmap"].shape[1], height, width):
            raise ValueError(
                f"decode_triplet: flipped_outputs must have the shapes of outputs, got "
                f"{flipped_shape} for {tuple(outputs['tl_heatmap'].shape)}"
            )
        flipped = mirror(*pair_corners(flipped_outputs, K, num_pairs, ae_threshold), width)
        candidates = torch.cat([candidates, flipped[0]], dim=1)
        centres = torch.cat([centres, flipped[1]], dim=1)
    return reject_outside(candidates, centres, height, width, OUTSIDE_MARGIN_PIXELS / down_ratio)


def decode_triplet(
    outputs: dict[str, Tensor],
    flipped_outputs: dict[str, Tensor] | None = None,
    max_detections: int = 100,
    *,
    K: int = TOP_K,
    num_pairs: int = NUM_PAIRS,
    ae_threshold: float = AE_THRESHOLD,
    down_ratio: float = DOWN_RATIO,
    soft_nms: bool = True,
) -> Tensor:
    """(B, max_detections, 6) x1, y1, x2, y2 in output-map coordinates, score, class from one
    stack's raw triplet outputs (and the mirrored images' for the flip test): the original's
    single-scale test (`triplet_candidates`, `match_centers`, `batched_soft_nms`).

    down_ratio: image pixels per output cell, to turn the original's thresholds in image
        pixels (5-pixel margin, 22500-pixel area, the soft-NMS plus-one) into cells.
    soft_nms: False skips soft-NMS and keeps the best ``max_detections`` centre-matched boxes.

    Rows past the surviving detections are zeros (score 0). Traceable by torch.export.
    """
    candidates, centres = triplet_candidates(
        outputs, flipped_outputs, K=K, num_pairs=num_pairs, ae_threshold=ae_threshold,
        down_ratio=down_ratio,
    )
    scores = match_centers(candidates, centres, SMALL_AREA_PIXELS / down_ratio**2)
    boxes, classes = candidates[..., :4], candidates[..., 7]
    if soft_nms:
        return batched_soft_nms(boxes, scores, classes, max_detections, pixel=1.0 / down_ratio)
    if int(max_detections) != max_detections or max_detections < 1:
        raise ValueError(
            f"decode_triplet: max_detections must be a positive integer, got {max_detections!r}"
        )
    count = torch.sym_min(int(max_detections), scores.shape[1])
    best, order = scores.topk(count, dim=1)
    rows = torch.cat(
        [
            boxes.gather(1, order.unsqueeze(2).expand(-1, -1, 4)),
            best.unsqueeze(2),
            classes.gather(1, order).unsqueeze(2),
        ],
        dim=2,
    )
    return torch.where((best > REJECTED).unsqueeze(2), rows, torch.zeros_like(rows))


# --- multi-scale merge (eager, image pixels) ----------------------------------------------------


def soft_nms_merge(
    rows: np.ndarray,
    sigma: float = SOFT_NMS_SIGMA,
    score_threshold: float = SOFT_NMS_THRESHOLD,
    weight_exp: float = MERGE_WEIGHT_EXP,
) -> np.ndarray:
    """The original's ``soft_nms_merge`` (external/nms.pyx, method 2) on one class's rows.

    rows: (N, 7) x1, y1, x2, y2, score, tl_score, br_score in image pixels.

    Repeatedly the remaining row of highest score is taken; every remaining row whose plus-one
    intersection with it is non-empty has its score multiplied by w = exp(-IoU^2 / sigma) and
    is dropped below ``score_threshold``; the taken box becomes the weighted mean of itself and
    those rows, its x1, y1 weighted by tl_score * (1 - w) ** weight_exp (its own weight
    tl_score), its x2, y2 by br_score * (1 - w) ** weight_exp.

    Returns (M, 5) x1, y1, x2, y2, score of the survivors, in the order taken. Deliberate
    differences: the original swaps only columns 0-4 when it moves the best row forward, so
    later rows are merged with another row's corner scores, and the caller then reads all N rows
    (dropped ones included, see `detector.inference.tta.soft_nms`); here each row keeps its own
    corner scores and only survivors are returned. Ties go to the lower index.
    """
    rows = np.array(rows, dtype=np.float64).reshape(-1, 7)
    boxes, scores, corner_scores = rows[:, :4], rows[:, 4].copy(), rows[:, 5:7]
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    remaining = np.ones(len(rows), dtype=bool)
    merged = []
    while remaining.any():
        best = int(np.argmax(np.where(remaining, scores, -np.inf)))
        remaining[best] = False
        taken = boxes[best]
        width = np.minimum(taken[2], boxes[:, 2]) - np.maximum(taken[0], boxes[:, 0]) + 1
        height = np.minimum(taken[3], boxes[:, 3]) - np.maximum(taken[1], boxes[:, 1]) + 1
        overlapping = remaining & (width > 0) & (height > 0)
        intersection = width * height
        iou = intersection / (areas[best] + areas - intersection)
        decay = np.where(overlapping, np.exp(-(iou * iou) / sigma), 1.0)
        merge_weight = np.where(overlapping, (1 - decay) ** weight_exp, 0.0)
        merge_weight[best] = 1.0
        tl_weight = corner_scores[:, 0] * merge_weight
        br_weight = corner_scores[:, 1] * merge_weight
        # A corner scored 0 (a top-K slot past the map's last peak, which an untrained model
        # has) has no weight: the taken box keeps that corner rather than dividing by zero.
        tl_total, br_total = tl_weight.sum(), br_weight.sum()
        box = np.concatenate(
            [
                (boxes[:, :2] * tl_weight[:, None]).sum(0) / tl_total if tl_total > 0
                else taken[:2],
                (boxes[:, 2:] * br_weight[:, None]).sum(0) / br_total if br_total > 0
                else taken[2:],
            ]
        )
        merged.append(np.append(box, scores[best]))
        scores = scores * decay
        remaining &= ~(overlapping & (scores < score_threshold))
    return np.array(merged, dtype=np.float32).reshape(-1, 5)


def merge_triplet_multiscale(
    candidates_per_scale: Sequence[np.ndarray],
    centres: np.ndarray,
    num_classes: int,
    max_detections: int = 100,
    weight_exp: float = MERGE_WEIGHT_EXP,
    merge: bool = True,
) -> np.ndarray:
    """The original's multi-scale test after decoding, for one image (test/coco.py with
    ``merge_bbox``).

    candidates_per_scale: per test scale, (N, 8) x1, y1, x2, y2, score, tl_score, br_score,
        class in image pixels (`triplet_candidates` of that scale mapped to the image, its
        rejected rows at -1).
    centres: (Q, 4) x, y, class, score in image pixels; the original uses scale 1's only.
    merge: `soft_nms_merge` per class (the original's multi-scale configuration, weight_exp
        10); False: plain Gaussian soft-NMS (`detector.inference.tta.soft_nms`).

    All candidates are pooled, matched with the centres (`match_centers`, 22500-pixel area
    threshold), then merged per class. Returns (M, 6) x1, y1, x2, y2, score, class, the best
    ``max_detections`` (exactly: the original keeps ties of the last score too).
    """
    pooled = np.concatenate(
        [np.asarray(rows, dtype=np.float32).reshape(-1, 8) for rows in candidates_per_scale]
    )
    centres = np.asarray(centres, dtype=np.float32).reshape(-1, 4)
    scores = match_centers(
        torch.from_numpy(pooled)[None], torch.from_numpy(centres)[None], SMALL_AREA_PIXELS
    )[0].numpy()
    pooled[:, 4] = scores
    pooled = pooled[scores > REJECTED]
    per_class = []
    for class_index in range(num_classes):
        rows = pooled[pooled[:, 7] == class_index]
        if not len(rows):
            continue
        if merge:
            kept = soft_nms_merge(rows[:, :7], weight_exp=weight_exp)
        else:
            keep, new_scores = tta.soft_nms(
                torch.from_numpy(rows[:, :4]), torch.from_numpy(rows[:, 4])
            )
            kept = np.concatenate([rows[keep.numpy(), :4], new_scores.numpy()[:, None]], axis=1)
        per_class.append(
            np.concatenate([kept, np.full((len(kept), 1), class_index, np.float32)], axis=1)
        )
    merged = np.concatenate([np.zeros((0, 6), np.float32), *per_class])
    order = np.argsort(-merged[:, 4], kind="stable")[: int(max_detections)]
    return merged[order].astype(np.float32)


# --- the head table's multi-scale hooks (`detector.heads.ScaleMerge`) ---------------------------


def triplet_scale_arrays(
    outputs: dict[str, Tensor], flipped_outputs: dict[str, Tensor] | None, max_detections: int
) -> dict[str, Tensor]:
    """One test scale's ``{"candidates": (B, N, 8), "centres": (B, Q, 4)}`` in output-map
    coordinates (`triplet_candidates`, flip test included), what the multi-scale merge pools.
    ``max_detections`` applies after the merge, not here."""
    candidates, centres = triplet_candidates(outputs, flipped_outputs)
    return {"candidates": candidates, "centres": centres}


def triplet_scale_arrays_to_image(
    arrays: dict[str, np.ndarray], inverse_affine: np.ndarray
) -> dict[str, np.ndarray]:
    """One image's `triplet_scale_arrays` mapped to image pixels by the 2x3 output-map -> image
    affine: the candidates' two corners and the centres' points; scores and classes kept."""
    inverse_affine = np.asarray(inverse_affine, dtype=np.float64)
    candidates = np.array(arrays["candidates"], dtype=np.float64)
    centres = np.array(arrays["centres"], dtype=np.float64)
    linear, shift = inverse_affine[:, :2].T, inverse_affine[:, 2]
    candidates[:, :4] = (candidates[:, :4].reshape(-1, 2, 2) @ linear + shift).reshape(-1, 4)
    centres[:, :2] = centres[:, :2] @ linear + shift
    return {"candidates": candidates.astype(np.float32), "centres": centres.astype(np.float32)}


def merge_triplet_scales(
    per_scale: Sequence[dict[str, np.ndarray]],
    scales: Sequence[float],
    num_classes: int,
    max_detections: int,
    soft_nms: str | None = "gaussian",
) -> np.ndarray:
    """The original's multi-scale test for one image from the per-scale arrays in image pixels:
    every scale's candidates pooled, matched with the centres of scale 1 (of the scale nearest
    1 when 1 is not tested; the original always tests 1) and merged per class with
    `soft_nms_merge` (`merge_triplet_multiscale`). Its merge is Gaussian: a ``soft_nms`` other
    than "gaussian" raises."""
    if soft_nms != "gaussian":
        raise ValueError(
            f"evaluate.soft_nms: the triplet head merges test scales with the original's Gaussian "
            f"soft-NMS merge; got {soft_nms!r}, expected 'gaussian'"
        )
    if len(per_scale) != len(scales) or not scales:
        raise ValueError(
            f"merge_triplet_scales: expected one array dict per scale, got {len(per_scale)} for "
            f"scales {list(scales)}"
        )
    nearest = min(range(len(scales)), key=lambda index: abs(scales[index] - 1.0))
    return merge_triplet_multiscale(
        [arrays["candidates"] for arrays in per_scale], per_scale[nearest]["centres"],
        num_classes, max_detections,
    )
