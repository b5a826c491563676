"""Keypoint-triplet targets: a hand-computed box, and parity with a slow re-derivation of the
original's per-object loop on random boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detector.targets import draw_gaussian
from detector.triplet.targets import encode_triplet_targets

pytestmark = pytest.mark.timeout(60)


# --- slow reference: Duan et al.'s sample/utils.py and sample/coco.py kp_detection -------------
# (github:Duankaiwen/CenterNet), written from reading them; the simple CenterNet-47
# (github:zzzxxxttt/pytorch_simple_CenterNet_47 utils/image.py) differs only in the radius roots.


def reference_radius(height, width, min_overlap, corrected):
    """sample/utils.py gaussian_radius (corrected: simple-47's utils/image.py version)."""
    a1 = 1
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    sq1 = np.sqrt(b1**2 - 4 * a1 * c1)
    r1 = (b1 - sq1) / (2 * a1) if corrected else (b1 + sq1) / 2
    a2 = 4
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    sq2 = np.sqrt(b2**2 - 4 * a2 * c2)
    r2 = (b2 - sq2) / (2 * a2) if corrected else (b2 + sq2) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    sq3 = np.sqrt(b3**2 - 4 * a3 * c3)
    r3 = (b3 + sq3) / (2 * a3) if corrected else (b3 + sq3) / 2
    return min(r1, r2, r3)


def reference_gaussian2d(shape, sigma):
    m, n = [(ss - 1.0) / 2.0 for ss in shape]
    y, x = np.ogrid[-m : m + 1, -n : n + 1]
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return h


def reference_draw(heatmap, center, radius, delte=6):
    diameter = 2 * radius + 1
    gaussian = reference_gaussian2d((diameter, diameter), sigma=diameter / delte)
    x, y = center
    height, width = heatmap.shape[0:2]
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    masked_heatmap = heatmap[y - top : y + bottom, x - left : x + right]
    masked_gaussian = gaussian[radius - top : radius + bottom, radius - left : radius + right]
    np.maximum(masked_heatmap, masked_gaussian, out=masked_heatmap)


def reference_targets(boxes, labels, num_classes, size, max_tags, corrected):
    """kp_detection's target loop for one image whose boxes are already in output-map cells
    (width_ratio = height_ratio = 1) and inside the map."""
    height, width = size
    maps = {k: np.zeros((num_classes, height, width), np.float32) for k in ("tl", "br", "ct")}
    regrs = {k: np.zeros((max_tags, 2), np.float32) for k in ("tl", "br", "ct")}
    tags = {k: np.zeros(max_tags, np.int64) for k in ("tl", "br", "ct")}
    mask = np.zeros(max_tags, np.float32)
    for ind, (detection, category) in enumerate(zip(boxes, labels, strict=True)):
        xtl, ytl, xbr, ybr = detection
        xct, yct = (detection[2] + detection[0]) / 2.0, (detection[3] + detection[1]) / 2.0
        fx = {"tl": xtl, "br": xbr, "ct": xct}
        fy = {"tl": ytl, "br": ybr, "ct": yct}
        box_width = math.ceil(detection[2] - detection[0])
        box_height = math.ceil(detection[3] - detection[1])
        radius = max(0, int(reference_radius(box_height, box_width, 0.7, corrected)))
        for kind in ("tl", "br", "ct"):
            cell = (int(fx[kind]), int(fy[kind]))
            reference_draw(maps[kind][category], cell, radius, delte=5 if kind == "ct" else 6)
            regrs[kind][ind] = [fx[kind] - cell[0], fy[kind] - cell[1]]
            tags[kind][ind] = cell[1] * width + cell[0]
        mask[ind] = 1
    return maps, regrs, tags, mask


# --- hand-computed case ------------------------------------------------------------------------


def test_one_box_by_hand() -> None:
    # w = 10.25, h = 7.25 -> ceil 11 x 8. Original radius at 0.7: the third root,
    # (b3 + sq3) / 2 with b3 = -1.4 * 19 = -26.6, sq3 = sqrt(26.6^2 + 4 * 2.8 * 0.3 * 88)
    # = sqrt(1003.24) = 31.674, so r = 2.537 -> 2.
    box = np.array([[2.5, 3.25, 12.75, 10.5]], dtype=np.float32)
    targets = encode_triplet_targets(box, np.array([1]), 2, (16, 16), max_objects=4)
    assert targets["tl_heatmap"].shape == (2, 16, 16)
    assert not targets["tl_heatmap"][0].any()
    tl, br, ct = (targets[f"{k}_heatmap"][1] for k in ("tl", "br", "ct"))
    # peaks: tl at cell (2, 3), br at (12, 10), centre (7.625, 6.875) at (7, 6)
    assert tl[3, 2] == 1 and br[10, 12] == 1 and ct[6, 7] == 1
    assert tl.sum() > 1 and (tl == 1).sum() == 1
    corner_sigma, center_sigma = 5 / 6, 5 / 5  # diameter 5 over 6 and over 5
    assert tl[3, 3] == pytest.approx(math.exp(-1 / (2 * corner_sigma**2)), rel=1e-6)
    assert tl[5, 4] == pytest.approx(math.exp(-8 / (2 * corner_sigma**2)), rel=1e-6)
    assert tl[3, 5] == 0 and tl[6, 2] == 0  # radius 2: nothing 3 cells away
    assert ct[6, 8] == pytest.approx(math.exp(-1 / (2 * center_sigma**2)), rel=1e-6)
    assert ct[4, 7] == pytest.approx(math.exp(-4 / (2 * center_sigma**2)), rel=1e-6)
    assert ct[6, 10] == 0
    assert targets["tl_index"].tolist() == [3 * 16 + 2, 0, 0, 0]
    assert targets["br_index"][0] == 10 * 16 + 12
    assert targets["ct_index"][0] == 6 * 16 + 7
    np.testing.assert_allclose(targets["tl_offset"][0], [0.5, 0.25])
    np.testing.assert_allclose(targets["br_offset"][0], [0.75, 0.5])
    np.testing.assert_allclose(targets["ct_offset"][0], [0.625, 0.875])
    assert targets["mask"].tolist() == [1, 0, 0, 0]


def test_corrected_radius_is_the_simple_centernet47s() -> None:
    # Corrected roots for 11 x 8 at 0.7: r1 = 0.855, r2 = 0.755, r3 = 0.906 -> radius 0.
    box = np.array([[2.5, 3.25, 12.75, 10.5]], dtype=np.float32)
    targets = encode_triplet_targets(
        box, np.array([0]), 1, (16, 16), max_objects=2, radius_variant="corrected"
    )
    for kind in ("tl", "br", "ct"):
        assert targets[f"{kind}_heatmap"].sum() == 1.0


def test_sigma_divisors_of_draw_gaussian() -> None:
    corner = draw_gaussian(np.zeros((9, 9), np.float32), (4, 4), 3)
    center = draw_gaussian(np.zeros((9, 9), np.float32), (4, 4), 3, sigma_divisor=5)
    assert corner[4, 5] == pytest.approx(math.exp(-1 / (2 * (7 / 6) ** 2)), rel=1e-6)
    assert center[4, 5] == pytest.approx(math.exp(-1 / (2 * (7 / 5) ** 2)), rel=1e-6)
    with pytest.raises(ValueError, match="sigma_divisor"):
        draw_gaussian(np.zeros((9, 9), np.float32), (4, 4), 3, sigma_divisor=0)


# --- parity with the slow reference --------------------------------------------------------------


@pytest.mark.parametrize("variant", ["original", "corrected"])
def test_matches_the_original_loop_on_random_boxes(variant) -> None:
    rng = np.random.default_rng(0)
    height, width, classes = 24, 32, 3
    for _ in range(20):
        count = int(rng.integers(1, 7))
        x1 = rng.uniform(0, width - 2, count)
        y1 = rng.uniform(0, height - 2, count)
        x2 = np.minimum(x1 + rng.uniform(0.3, 20, count), width - 1)
        y2 = np.minimum(y1 + rng.uniform(0.3, 15, count), height - 1)
        boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
        labels = rng.integers(0, classes, count)
        got = encode_triplet_targets(
            boxes, labels, classes, (height, width), max_objects=8, radius_variant=variant
        )
        maps, regrs, tags, mask = reference_targets(
            boxes, labels, classes, (height, width), 8, corrected=variant == "corrected"
        )
        for kind in ("tl", "br", "ct"):
            np.testing.assert_array_equal(got[f"{kind}_heatmap"], maps[kind])
            np.testing.assert_allclose(got[f"{kind}_offset"], regrs[kind], atol=1e-6)
            np.testing.assert_array_equal(got[f"{kind}_index"], tags[kind])
        np.testing.assert_array_equal(got["mask"], mask)


def test_clipping_skipping_and_slots() -> None:
    boxes = np.array(
        [
            [-3.0, -2.0, 5.5, 4.5],  # clipped to (0, 0, 5.5, 4.5)
            [20.0, 1.0, 30.0, 5.0],  # entirely right of the map: zero width after clipping
            [1.0, 1.0, 40.0, 9.0],  # clipped to (1, 1, 15, 9)
        ],
        dtype=np.float32,
    )
    targets = encode_triplet_targets(boxes, np.array([0, 0, 1]), 2, (10, 16), max_objects=3)
    assert targets["mask"].tolist() == [1, 0, 1]
    assert targets["tl_index"].tolist() == [0, 0, 1 * 16 + 1]
    assert targets["br_index"].tolist() == [4 * 16 + 5, 0, 9 * 16 + 15]
    np.testing.assert_allclose(targets["br_offset"][2], [0, 0])
    np.testing.assert_allclose(targets["ct_offset"][0], [0.75, 0.25])
    assert targets["tl_heatmap"][0, 0, 0] == 1 and targets["br_heatmap"][1, 9, 15] == 1
    assert not targets["ct_offset"][1].any()
    # More boxes than slots: the first max_objects are kept.
    assert encode_triplet_targets(boxes, np.array([0, 0, 1]), 2, (10, 16), 1)["mask"].tolist() == [
        1
    ]


def test_no_boxes() -> None:
    targets = encode_triplet_targets(np.zeros((0, 4)), np.zeros(0, np.int64), 2, (8, 8), 4)
    assert set(targets) == {
        "tl_heatmap", "br_heatmap", "ct_heatmap", "tl_index", "br_index", "ct_index",
        "tl_offset", "br_offset", "ct_offset", "mask",
    }
    assert not any(value.any() for value in targets.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"output_size": (8,)}, "output_size"),
        ({"max_objects": -1}, "max_objects"),
        ({"radius_variant": "mine"}, "radius_variant"),
        ({"min_overlap": 1.5}, "min_overlap"),
        ({"labels": np.array([3])}, "label 3"),
        ({"boxes": np.array([[0, 0, np.nan, 1]])}, "non-finite"),
    ],
)
def test_bad_input_names_the_argument(kwargs, message) -> None:
    arguments = {
        "boxes": np.array([[1.0, 1.0, 3.0, 3.0]]),
        "labels": np.array([0]),
        "num_classes": 2,
        "output_size": (8, 8),
        "max_objects": 4,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        encode_triplet_targets(**arguments)
