"""Training targets for CenterNet, exactly as the original builds them (numpy; runs in data-loader
workers).

Every object becomes a Gaussian peak on its class's heatmap at the integer cell holding its
centre, plus a size ``(w, h)``, the sub-cell offset of the centre, and the flat index of that cell,
all in **output-map coordinates** (input pixels / down ratio). `encode_targets` gives the arrays
the loss consumes; `gaussian_radius` and `draw_gaussian` are its two building blocks.
"""

from __future__ import annotations

import functools
import math

import numpy as np

RADIUS_VARIANTS = ("original", "corrected", "mixed")


def gaussian_radius(
    height: float, width: float, min_overlap: float = 0.7, variant: str = "original"
) -> float:
    """Radius (output-map cells) of the heatmap peak for a ``height x width`` box.

    CornerNet's idea: the largest corner displacement r such that a box moved by r still has
    IoU >= ``min_overlap`` with the truth, taken as the minimum over three scenarios, each a
    quadratic ``a r^2 - b r + c = 0`` (o = ``min_overlap``)::

        1. one corner in, one out:  a1 = 1,  b1 = h + w,        c1 = w h (1 - o) / (1 + o)
        2. both corners inside:     a2 = 4,  b2 = 2 (h + w),    c2 = (1 - o) w h
        3. both corners outside:    a3 = 4o, b3 = -2o (h + w),  c3 = (o - 1) w h
        with sq_i = sqrt(b_i^2 - 4 a_i c_i)

    Variants (all three are in circulation; pick one together with ``min_overlap``):

    - ``"original"``: CornerNet's code as CenterNet (xingyizhou), CenterNet-better and the
      triplet CenterNet use it, with o = 0.7. It returns ``(b_i + sq_i) / 2`` for all three,
      i.e. the wrong root and no division by ``2 a``. The minimum is always r3, which for a
      square of side s at o = 0.7 is 0.27332 s (s = 4 -> 1.093, 10 -> 2.733, 128 -> 34.98),
      about 2.8x the intended radius. Kept because it gives the original's numbers.
    - ``"corrected"``: the algebra fixed, as mmdetection and centerX use it (usually with
      o = 0.3): r1 = (b1 - sq1) / 2, r2 = (b2 - sq2) / 8, r3 = (b3 + sq3) / (8 o).
    - ``"mixed"``: the corrected r1 and r2 with the original r3 (pytorch_simple_CenterNet_45).

    Zero-size boxes give 0.
    """
    if variant not in RADIUS_VARIANTS:
        raise ValueError(
            f"gaussian_radius: unknown variant {variant!r}; expected one of {list(RADIUS_VARIANTS)}"
        )
    if not isinstance(min_overlap, (int, float)) or not 0.0 < min_overlap < 1.0:
        raise ValueError(f"gaussian_radius: min_overlap must lie in (0, 1), got {min_overlap!r}")
    sizes_are_numbers = all(isinstance(side, (int, float, np.number)) for side in (height, width))
    if (
        not sizes_are_numbers
        or not (math.isfinite(height) and math.isfinite(width))
        or height < 0
        or width < 0
    ):
        raise ValueError(
            f"gaussian_radius: expected finite, non-negative height and width, "
            f"got {height!r} x {width!r}"
        )
    return _radius(height, width, min_overlap, variant)


def _radius(height: float, width: float, overlap: float, variant: str) -> float:
    """`gaussian_radius` without its argument checks, for the per-object loop."""
    # The arithmetic keeps the original's operation order, so that int() of the result (the
    # radius actually drawn) agrees with it bit for bit, even at integer boundaries.
    b1 = height + width
    c1 = width * height * (1 - overlap) / (1 + overlap)
    sq1 = math.sqrt(b1**2 - 4 * 1 * c1)

    a2 = 4
    b2 = 2 * (height + width)
    c2 = (1 - overlap) * width * height
    sq2 = math.sqrt(b2**2 - 4 * a2 * c2)

    a3 = 4 * overlap
    b3 = -2 * overlap * (height + width)
    c3 = (overlap - 1) * width * height
    sq3 = math.sqrt(b3**2 - 4 * a3 * c3)

    original_r3 = (b3 + sq3) / 2
    if variant == "original":
        return min((b1 + sq1) / 2, (b2 + sq2) / 2, original_r3)
    corrected_r1 = (b1 - sq1) / 2
    corrected_r2 = (b2 - sq2) / (2 * a2)
    if variant == "mixed":
        return min(corrected_r1, corrected_r2, original_r3)
    return min(corrected_r1, corrected_r2, (b3 + sq3) / (2 * a3))


@functools.cache  # lru_cache without a size limit: one kernel per (radius, divisor)
def _gaussian_kernel(radius: int, sigma_divisor: float = 6) -> np.ndarray:
    """Read-only float32 (2r+1, 2r+1) kernel with peak 1.0 at the centre, sigma = (2r + 1) /
    sigma_divisor.

    Computed in float64 as the original does, then stored as float32: the heatmap is float32
    and rounding is monotone, so max(heatmap, float32(g)) equals the original's
    float32(max(heatmap, g)).
    """
    diameter = 2 * radius + 1
    sigma = diameter / sigma_divisor
    steps = np.arange(-radius, radius + 1, dtype=np.float64)
    squared_distance = steps[:, None] * steps[:, None] + steps[None, :] * steps[None, :]
    kernel = np.exp(-squared_distance / (2 * sigma * sigma))
    # Tails too small to matter relative to the peak are exactly zero, as in the original.
    kernel[kernel < np.finfo(np.float64).eps * kernel.max()] = 0
    kernel = kernel.astype(np.float32)
    kernel.flags.writeable = False
    return kernel


def _paste_kernel(
    heatmap: np.ndarray, center_x: int, center_y: int, radius: int, sigma_divisor: float = 6
) -> None:
    """heatmap = max(heatmap, kernel) on the kernel's window, cropped at the borders."""
    height, width = heatmap.shape
    kernel = _gaussian_kernel(radius, sigma_divisor)
    top, bottom = max(0, center_y - radius), min(height, center_y + radius + 1)
    left, right = max(0, center_x - radius), min(width, center_x + radius + 1)
    window = heatmap[top:bottom, left:right]
    kernel_window = kernel[
        top - center_y + radius : bottom - center_y + radius,
        left - center_x + radius : right - center_x + radius,
    ]
    np.maximum(window, kernel_window, out=window)


def draw_gaussian(
    heatmap: np.ndarray, center: tuple[int, int], radius: int, sigma_divisor: float = 6
) -> np.ndarray:
    """Merge a Gaussian peak into one class's heatmap, in place (the original's
    ``draw_umich_gaussian``; with ``sigma_divisor``, the keypoint-triplet original's
    ``draw_gaussian(..., delte=sigma_divisor)``, 5 for its centre keypoints).

    heatmap: (H, W) float array, modified in place and returned.
    center: integer cell (x, y) inside the heatmap; it receives exactly 1.0.
    radius: r >= 0. The kernel is ``exp(-(dx^2 + dy^2) / (2 sigma^2))`` on the integer grid
    dx, dy in [-r, r] with sigma = (2r + 1) / sigma_divisor, and values below float64 eps
    (relative to the peak) are zeroed. Where it overlaps earlier peaks the element-wise
    maximum wins. r = 0 writes a single 1.
    """
    if heatmap.ndim != 2:
        raise ValueError(f"draw_gaussian: expected an (H, W) heatmap, got shape {heatmap.shape}")
    center_x, center_y = (int(value) for value in center)
    height, width = heatmap.shape
    if not (0 <= center_x < width and 0 <= center_y < height):
        raise ValueError(
            f"draw_gaussian: center {tuple(center)} lies outside the heatmap of (H, W) = "
            f"{heatmap.shape}"
        )
    if int(radius) != radius or radius < 0:
        raise ValueError(f"draw_gaussian: radius must be a non-negative integer, got {radius!r}")
    if not isinstance(sigma_divisor, (int, float)) or sigma_divisor <= 0:
        raise ValueError(f"draw_gaussian: sigma_divisor must be > 0, got {sigma_divisor!r}")
    _paste_kernel(heatmap, center_x, center_y, int(radius), sigma_divisor)
    return heatmap


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_target_inputs(
    name: str,
    boxes: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    output_size: tuple[int, int],
    max_objects: int = 0,
    min_overlap: float = 0.5,
    radius_variant: str = "original",
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Every head type's target encoder's arguments checked (``name``, the encoder, starts each
    message): (N, 4) finite boxes, N 0-based integer labels below ``num_classes``, a (height,
    width) of positive integers, and the radius settings. Returns the boxes, the labels as
    integers and the output size as ints."""
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"{name}: num_classes must be a positive integer, got {num_classes!r}")
    if (
        not isinstance(output_size, (tuple, list))
        or len(output_size) != 2
        or any(not _is_int(side) or side < 1 for side in output_size)
    ):
        raise ValueError(
            f"{name}: output_size must be (height, width) positive integers, got {output_size!r}"
        )
    if not _is_int(max_objects) or max_objects < 0:
        raise ValueError(f"{name}: max_objects must be a non-negative integer, got {max_objects!r}")
    if radius_variant not in RADIUS_VARIANTS:
        raise ValueError(
            f"{name}: unknown radius_variant {radius_variant!r}; "
            f"expected one of {list(RADIUS_VARIANTS)}"
        )
    if not isinstance(min_overlap, (int, float)) or not 0.0 < min_overlap < 1.0:
        raise ValueError(f"{name}: min_overlap must lie in (0, 1), got {min_overlap!r}")
    boxes = np.asarray(boxes)
    labels = np.asarray(labels)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: boxes must have shape (N, 4), got {boxes.shape}")
    if labels.shape != (len(boxes),):
        raise ValueError(
            f"{name}: labels must have shape ({len(boxes)},) to match the boxes, "
            f"got {labels.shape}"
        )
    if not np.isfinite(boxes).all():
        row = int(np.flatnonzero(~np.isfinite(boxes).all(axis=1))[0])
        raise ValueError(f"{name}: box {row} has a non-finite coordinate: {boxes[row]}")
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind != "f" or not np.array_equal(labels, np.round(labels)):
            raise ValueError(
                f"{name}: labels must be integer class indices, got dtype {labels.dtype}"
            )
        labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        outside = (labels < 0) | (labels >= num_classes)
        raise ValueError(
            f"{name}: label {int(labels[outside][0])} is outside [0, {num_classes}) "
            f"(labels are 0-based class indices)"
        )
    return boxes, labels, (int(output_size[0]), int(output_size[1]))


def encode_targets(
    boxes: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    output_size: tuple[int, int],
    max_objects: int = 128,
    min_overlap: float = 0.7,
    radius_variant: str = "original",
) -> dict[str, np.ndarray]:
    """The CenterNet training targets of one image.

    boxes: (N, 4) x1, y1, x2, y2 in output-map coordinates (already mapped through the output
        affine, not yet clipped); handled in float32 as the original does.
    labels: (N,) 0-based class indices in [0, num_classes).
    output_size: (height, width) of the output map.

    Box k (for k < min(N, max_objects)) fills slot k: it is clipped to the map (x to [0, W-1],
    y to [0, H-1]) and skipped unless the clipped box has positive width and height, so skipped
    boxes leave a zero row with mask 0. The peak is drawn at the integer cell of the clipped
    box's centre with radius ``max(0, int(gaussian_radius(ceil(h), ceil(w))))``.

    Returns:
        heatmap: (C, H, W) float32, peaks exactly 1.0 at object centres.
        wh: (M, 2) float32 clipped (width, height) in output-map cells (not normalised).
        offset: (M, 2) float32 centre minus its integer cell, in [0, 1).
        index: (M,) int64 flat cell index ``y * W + x``.
        mask: (M,) float32, 1 where the slot holds an object.
    with M = max_objects.
    """
    boxes, labels, (height, width) = check_target_inputs(
        "encode_targets", boxes, labels, num_classes, output_size, max_objects, min_overlap,
        radius_variant,
    )

    heatmap = np.zeros((num_classes, height, width), dtype=np.float32)
    wh = np.zeros((max_objects, 2), dtype=np.float32)
    offset = np.zeros((max_objects, 2), dtype=np.float32)
    index = np.zeros(max_objects, dtype=np.int64)
    mask = np.zeros(max_objects, dtype=np.float32)

    count = min(len(boxes), max_objects)
    # float32 throughout, as the original holds boxes, so sizes and centres match it exactly.
    clipped = boxes[:count].astype(np.float32)
    upper = np.array([width - 1, height - 1, width - 1, height - 1], dtype=np.float32)
    np.minimum(np.maximum(clipped, 0, out=clipped), upper, out=clipped)
    sizes = clipped[:, 2:] - clipped[:, :2]  # (n, 2) width, height
    centers = (clipped[:, :2] + clipped[:, 2:]) / np.float32(2)
    cells = centers.astype(np.int32)  # floor: clipped centres are >= 0
    valid = (sizes > 0).all(axis=1)

    # The per-object work that cannot be vectorised: radius and a paste of a cached kernel.
    for is_valid, (box_width, box_height), (cell_x, cell_y), label in zip(
        valid.tolist(), sizes.tolist(), cells.tolist(), labels[:count].tolist(), strict=True
    ):
        if is_valid:
            radius = _radius(
                math.ceil(box_height), math.ceil(box_width), min_overlap, radius_variant
            )
            _paste_kernel(heatmap[label], cell_x, cell_y, max(0, int(radius)))

    # Skipped boxes keep their slot as a zero row with mask 0.
    keep = valid[:, None]
    wh[:count] = np.where(keep, sizes, 0)
    offset[:count] = np.where(keep, centers - cells, 0)
    index[:count] = np.where(valid, cells[:, 1].astype(np.int64) * width + cells[:, 0], 0)
    mask[:count] = valid
    return {"heatmap": heatmap, "wh": wh, "offset": offset, "index": index, "mask": mask}
