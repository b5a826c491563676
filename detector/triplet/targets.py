"""Training targets of the keypoint-triplet CenterNet, as the original builds them (numpy; runs
in data-loader workers).

Every object is three keypoints: its top-left corner, its bottom-right corner and its centre
``((x1 + x2) / 2, (y1 + y2) / 2)``. Each keypoint becomes a Gaussian peak on its class's
heatmap of that kind at the integer cell holding it, plus the sub-cell offset of the keypoint and
the flat index of the cell (the corners' indices also say where the loss reads the two
embeddings of the object). All in **output-map coordinates** (input pixels / down ratio).

Read from Duan et al.'s code (github:Duankaiwen/CenterNet ``sample/coco.py`` ``kp_detection``
and ``sample/utils.py``) and the simple CenterNet-47 (github:zzzxxxttt/pytorch_simple_CenterNet_47
``datasets/coco.py``), which agree except for the radius formula (`radius_variant`).
"""

from __future__ import annotations

import math

import numpy as np

from ..targets import _paste_kernel, _radius, check_target_inputs

# The original draws corner peaks with sigma = diameter / 6 (``draw_gaussian``'s default
# ``delte=6``) and centre peaks with sigma = diameter / 5 (``delte=5``): a centre peak of the same
# radius is wider, since a centre is less well defined than a corner.
CORNER_SIGMA_DIVISOR = 6
CENTER_SIGMA_DIVISOR = 5
KEYPOINTS = ("tl", "br", "ct")


def encode_triplet_targets(
    boxes: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    output_size: tuple[int, int],
    max_objects: int = 128,
    min_overlap: float = 0.7,
    radius_variant: str = "original",
) -> dict[str, np.ndarray]:
    """The keypoint-triplet training targets of one image.

    boxes: (N, 4) x1, y1, x2, y2 in output-map coordinates (mapped through the output affine,
        not yet clipped); handled in float32 as the original holds them.
    labels: (N,) 0-based class indices in [0, num_classes).
    output_size: (height, width) of the output map.
    min_overlap, radius_variant: the Gaussian radius (`detector.targets.gaussian_radius`).
        The default, ``"original"`` at 0.7, is Duan et al.'s (CornerNet's uncorrected formula,
        ``gaussian_iou`` 0.7); the simple CenterNet-47 uses ``"corrected"`` at 0.7.

    Box k (k < min(N, max_objects)) fills slot k. It is clipped to the map (x to [0, W-1], y to
    [0, H-1]) and skipped (a zero row, mask 0) unless the clipped box has positive width and
    height. Its keypoints are the clipped corners and their midpoint; keypoint p lands in cell
    ``int(p)`` with offset ``p - int(p)``. All three peaks share one radius,
    ``max(0, int(gaussian_radius(ceil(h), ceil(w))))``; corners are drawn with sigma
    ``(2r + 1) / 6``, centres with ``(2r + 1) / 5``.

    Deliberate differences: the original clips in input pixels to [0, W_in - 1] (in output
    cells about [0, W - 1/4]) and compacts the kept boxes to the first slots; here the clip is
    at W - 1 as `detector.targets.encode_targets` and skipped boxes keep their slot. Neither
    changes the loss of boxes inside [0, W - 1] x [0, H - 1].

    Returns (M = max_objects):
        tl_heatmap, br_heatmap, ct_heatmap: (C, H, W) float32, peaks exactly 1.0.
        tl_index, br_index, ct_index: (M,) int64 flat cells ``y * W + x``.
        tl_offset, br_offset, ct_offset: (M, 2) float32 (x, y) keypoint minus its cell, in [0, 1).
        mask: (M,) float32, 1 where the slot holds an object.
    """
    boxes, labels, (height, width) = check_target_inputs(
        "encode_triplet_targets", boxes, labels, num_classes, output_size, max_objects,
        min_overlap, radius_variant,
    )
    targets: dict[str, np.ndarray] = {}
    for keypoint in KEYPOINTS:
        targets[f"{keypoint}_heatmap"] = np.zeros((num_classes, height, width), dtype=np.float32)
    for keypoint in KEYPOINTS:
        targets[f"{keypoint}_index"] = np.zeros(max_objects, dtype=np.int64)
    for keypoint in KEYPOINTS:
        targets[f"{keypoint}_offset"] = np.zeros((max_objects, 2), dtype=np.float32)
    targets["mask"] = np.zeros(max_objects, dtype=np.float32)

    count = min(len(boxes), max_objects)
    clipped = boxes[:count].astype(np.float32)
    upper = np.array([width - 1, height - 1, width - 1, height - 1], dtype=np.float32)
    np.minimum(np.maximum(clipped, 0, out=clipped), upper, out=clipped)
    sizes = clipped[:, 2:] - clipped[:, :2]  # (n, 2) width, height
    valid = (sizes > 0).all(axis=1)
    points = {
        "tl": clipped[:, :2],
        "br": clipped[:, 2:],
        # The original: (x1 + x2) / 2 of the clipped box, then int() for the cell.
        "ct": (clipped[:, :2] + clipped[:, 2:]) / np.float32(2),
    }
    cells = {keypoint: point.astype(np.int32) for keypoint, point in points.items()}  # floor

    for slot in np.flatnonzero(valid).tolist():
        box_width, box_height = sizes[slot].tolist()
        radius = max(
            0,
            int(_radius(math.ceil(box_height), math.ceil(box_width), min_overlap, radius_variant)),
        )
        label = int(labels[slot])
        for keypoint in KEYPOINTS:
            cell_x, cell_y = cells[keypoint][slot].tolist()
            divisor = CENTER_SIGMA_DIVISOR if keypoint == "ct" else CORNER_SIGMA_DIVISOR
            _paste_kernel(targets[f"{keypoint}_heatmap"][label], cell_x, cell_y, radius, divisor)

    keep = valid[:, None]
    for keypoint in KEYPOINTS:
        point, cell = points[keypoint], cells[keypoint]
        targets[f"{keypoint}_offset"][:count] = np.where(keep, point - cell, 0)
        targets[f"{keypoint}_index"][:count] = np.where(
            valid, cell[:, 1].astype(np.int64) * width + cell[:, 0], 0
        )
    targets["mask"][:count] = valid
    return targets
