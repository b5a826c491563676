"""TTFNet training targets, as the original's ``TTFHead.target_single_image`` builds them (numpy;
runs in data-loader workers).

Every object draws an elliptical Gaussian on its class's heatmap whose radii are alpha = 0.54
times its half height and half width, and writes its box (x1, y1, x2, y2 in input pixels) as the
regression target at every location of its beta = 0.54 Gaussian, with sample weights from that
Gaussian normalised to sum to the log of its area. Objects are drawn from the largest to the
smallest, so a smaller object overwrites the box targets and weights of a larger one where they
overlap; heatmaps merge by maximum.
"""

from __future__ import annotations

import functools

import numpy as np

from ..targets import check_target_inputs

# The output stride the original's targets assume; every architecture here predicts at stride
# 4 (`detector.config.OUTPUT_STRIDE`, not imported: the config imports the head table, which
# imports this module).
DOWN_RATIO = 4
# Gaussian radii relative to half the box's sides: alpha for the heatmap, beta for the region
# that gets box targets. The original uses the same 0.54 for both.
ALPHA = 0.54
BETA = 0.54


@functools.cache  # one kernel per (height radius, width radius)
def elliptical_gaussian(height_radius: int, width_radius: int) -> np.ndarray:
    """Read-only float32 (2 h_r + 1, 2 w_r + 1) kernel with peak 1.0 at the centre: the
    original's ``gaussian_2d`` with sigma_x = (2 w_r + 1) / 6 and sigma_y = (2 h_r + 1) / 6,
    computed in float64, values below float64 eps relative to the peak zeroed, then stored as
    float32 as the original's ``heatmap.new_tensor(gaussian)`` does."""
    sigma_x = (2 * width_radius + 1) / 6
    sigma_y = (2 * height_radius + 1) / 6
    y = np.arange(-height_radius, height_radius + 1, dtype=np.float64)[:, None]
    x = np.arange(-width_radius, width_radius + 1, dtype=np.float64)[None, :]
    kernel = np.exp(-(x * x / (2 * sigma_x * sigma_x) + y * y / (2 * sigma_y * sigma_y)))
    kernel[kernel < np.finfo(np.float64).eps * kernel.max()] = 0
    kernel = kernel.astype(np.float32)
    kernel.flags.writeable = False
    return kernel


def encode_ttfnet_targets(
    boxes: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    output_size: tuple[int, int],
    max_objects: int = 128,
    min_overlap: float = 0.7,
    radius_variant: str = "original",
) -> dict[str, np.ndarray]:
    """The TTFNet training targets of one image, equal to the original's
    ``target_single_image`` (``wh_agnostic``, ``wh_gaussian``, ``wh_area_process='log'``).

    boxes: (N, 4) x1, y1, x2, y2 in output-map coordinates (as `detector.targets.
        encode_targets` takes them: mapped through the output affine, not yet clipped).
    labels: (N,) 0-based class indices in [0, num_classes).
    output_size: (H, W) of the output map; the input is (4 H, 4 W) pixels.
    max_objects, min_overlap, radius_variant: accepted for the head table's common signature
        and ignored: the targets are dense maps without object slots (the original's
        ``max_objs`` is unused too), and the radii come from alpha and beta, not from an
        overlap.

    Conversion and the original's conventions, in order:

    1. Boxes become input pixels (times the down ratio 4, exact in float32) and are clipped to
       the input, x to [0, 4 W - 1] and y to [0, 4 H - 1], as mmdetection's pipeline clips
       them before the original sees them. Deliberate difference: boxes left without width or
       height by the clipping (outside the view) are dropped; the original never gets them.
    2. Areas with the +1-pixel convention, ``(x2 - x1 + 1) (y2 - y1 + 1)``, and their log; the
       objects are drawn in order of decreasing log area (ties keep the input order; the
       original's ``topk`` leaves their order unspecified).
    3. Output-map boxes: input boxes / 4 clamped to [0, W - 1] x [0, H - 1]; the radii are
       ``int(h / 2 * 0.54)`` and ``int(w / 2 * 0.54)`` of their height and width (float32);
       the centre cell is the input box's centre / 4, truncated.
    4. Per object: its Gaussian (`elliptical_gaussian`) merges into its class's heatmap by
       maximum; where the (beta) Gaussian is positive, the box target becomes the input box
       and the weight the Gaussian times log(area) divided by the Gaussian's sum there (what
       lies inside the map), so one object's weights sum to log(area).

    Returns:
        heatmap: (C, H, W) float32, 1.0 at object centres.
        box_target: (4, H, W) float32 x1, y1, x2, y2 in input pixels, -1 where no object.
        box_weight: (H, W) float32 sample weights of the box targets, 0 where no object.
    """
    del max_objects, min_overlap, radius_variant  # see the docstring
    boxes, labels, (height, width) = check_target_inputs(
        "encode_ttfnet_targets", boxes, labels, num_classes, output_size
    )
    heatmap = np.zeros((num_classes, height, width), dtype=np.float32)
    box_target = np.full((4, height, width), -1, dtype=np.float32)
    box_weight = np.zeros((height, width), dtype=np.float32)

    # float32 throughout, as the original holds the boxes.
    input_boxes = boxes.astype(np.float32) * np.float32(DOWN_RATIO)
    input_boxes[:, 0::2] = input_boxes[:, 0::2].clip(0, DOWN_RATIO * width - 1)
    input_boxes[:, 1::2] = input_boxes[:, 1::2].clip(0, DOWN_RATIO * height - 1)
    visible = (input_boxes[:, 2] > input_boxes[:, 0]) & (input_boxes[:, 3] > input_boxes[:, 1])
    input_boxes, labels = input_boxes[visible], labels[visible]

    one = np.float32(1)
    x1, y1, x2, y2 = input_boxes.T
    log_areas = np.log((y2 - y1 + one) * (x2 - x1 + one))
    order = np.argsort(-log_areas, kind="stable")
    input_boxes, labels, log_areas = input_boxes[order], labels[order], log_areas[order]

    map_boxes = input_boxes / np.float32(DOWN_RATIO)
    map_boxes[:, 0::2] = map_boxes[:, 0::2].clip(0, width - 1)
    map_boxes[:, 1::2] = map_boxes[:, 1::2].clip(0, height - 1)
    half, alpha, beta = np.float32(2), np.float32(ALPHA), np.float32(BETA)
    map_heights = map_boxes[:, 3] - map_boxes[:, 1]
    map_widths = map_boxes[:, 2] - map_boxes[:, 0]
    radii_alpha = np.stack([map_heights / half * alpha, map_widths / half * alpha], 1)
    radii_beta = np.stack([map_heights / half * beta, map_widths / half * beta], 1)
    x1, y1, x2, y2 = input_boxes.T
    centre_cells = np.stack([(x1 + x2) / half, (y1 + y2) / half], 1) / np.float32(DOWN_RATIO)
    centre_cells = centre_cells.astype(np.int32)  # truncation; the clipped centres are >= 0

    # The per-object work that cannot be vectorised (later objects overwrite earlier ones):
    # pastes of cached kernels on each object's window.
    for box, label, log_area, radius_alpha, radius_beta, (x, y) in zip(
        input_boxes,
        labels.tolist(),
        log_areas,
        radii_alpha.astype(np.int32).tolist(),
        radii_beta.astype(np.int32).tolist(),
        centre_cells.tolist(),
        strict=True,
    ):
        window, kernel = _window(elliptical_gaussian(*radius_alpha), x, y, height, width)
        class_window = heatmap[label][window]
        np.maximum(class_window, kernel, out=class_window)
        if radius_beta != radius_alpha:
            window, kernel = _window(elliptical_gaussian(*radius_beta), x, y, height, width)
        region = kernel > 0
        box_target[(slice(None), *window)][:, region] = box[:, None]  # a view: writes through
        local = kernel[region]
        weights = box_weight[window]
        weights[region] = local * log_area / local.sum()
    return {"heatmap": heatmap, "box_target": box_target, "box_weight": box_weight}


def _window(kernel: np.ndarray, x: int, y: int, height: int, width: int) -> tuple:
    """(the map's window around cell (x, y), the kernel cropped to it), as the original's
    ``draw_truncate_gaussian`` crops at the borders."""
    height_radius, width_radius = kernel.shape[0] // 2, kernel.shape[1] // 2
    left, right = min(x, width_radius), min(width - x, width_radius + 1)
    top, bottom = min(y, height_radius), min(height - y, height_radius + 1)
    window = (slice(y - top, y + bottom), slice(x - left, x + right))
    cropped = kernel[
        height_radius - top : height_radius + bottom, width_radius - left : width_radius + right
    ]
    return window, cropped
