"""Targets: radius formulas, the Gaussian kernel and encode_targets, against hand-computed values
and slow, obviously-correct references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detector.targets import draw_gaussian, encode_targets, gaussian_radius

# ---------------------------------------------------------------------------------------------
# gaussian_radius


@pytest.mark.parametrize(("side", "expected"), [(4, 1.0933), (10, 2.7332), (128, 34.985)])
def test_original_radius_of_squares(side: int, expected: float) -> None:
    assert gaussian_radius(side, side) == pytest.approx(expected, abs=1e-4)
    # The quirky r3 = (b3 + sq3) / 2 is, for a square of side s, 2 s (sqrt(o) - o).
    assert gaussian_radius(side, side) == pytest.approx(2 * side * (math.sqrt(0.7) - 0.7))


@pytest.mark.parametrize(("height", "width", "expected"), [(1, 100, 0.59), (2, 128, 1.17)])
def test_original_radius_of_thin_boxes(height: int, width: int, expected: float) -> None:
    assert gaussian_radius(height, width) == pytest.approx(expected, abs=5e-3)
    assert gaussian_radius(width, height) == gaussian_radius(height, width)


@pytest.mark.parametrize("overlap", [0.3, 0.5, 0.7, 0.9])
def test_corrected_radius_of_squares(overlap: float) -> None:
    # For a square of side s the three corrected roots are s (1 - sqrt(2o / (1 + o))),
    # s (1 - sqrt(o)) / 2 and s (sqrt(o) - o) / (2 o); the second is always the smallest.
    side = 10.0
    r1 = side * (1 - math.sqrt(2 * overlap / (1 + overlap)))
    r2 = side * (1 - math.sqrt(overlap)) / 2
    r3 = side * (math.sqrt(overlap) - overlap) / (2 * overlap)
    expected = min(r1, r2, r3)
    assert expected == r2
    assert gaussian_radius(side, side, overlap, "corrected") == pytest.approx(expected)
    assert gaussian_radius(side, side, overlap, "mixed") == pytest.approx(expected)


@pytest.mark.parametrize(("height", "width"), [(6.0, 11.0), (3.0, 40.0), (17.0, 17.0)])
def test_corrected_radius_keeps_the_overlap(height: float, width: float) -> None:
    """Each corrected root is the displacement at which that scenario's IoU is exactly o."""
    overlap = 0.3
    radius = gaussian_radius(height, width, overlap, "corrected")
    shrunk = (height - 2 * radius) * (width - 2 * radius) / (height * width)
    grown = height * width / ((height + 2 * radius) * (width + 2 * radius))
    shifted_intersection = (height - radius) * (width - radius)
    shifted = shifted_intersection / (2 * height * width - shifted_intersection)
    # Every scenario still has IoU >= o at the radius, and the tightest one meets it exactly.
    ious = [shrunk, grown, shifted]
    assert min(ious) == pytest.approx(overlap)
    assert all(iou >= overlap - 1e-9 for iou in ious)


def test_radius_is_zero_for_zero_size_boxes() -> None:
    for variant in ("original", "corrected", "mixed"):
        assert gaussian_radius(0, 0, variant=variant) == 0
        assert gaussian_radius(0, 25, variant=variant) == 0


def test_radius_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="'original', 'corrected', 'mixed'"):
        gaussian_radius(4, 4, variant="fixed")
    with pytest.raises(ValueError, match="min_overlap"):
        gaussian_radius(4, 4, min_overlap=1.5)
    with pytest.raises(ValueError, match="non-negative"):
        gaussian_radius(-1, 4)


# ---------------------------------------------------------------------------------------------
# draw_gaussian


def slow_gaussian(heatmap: np.ndarray, center: tuple[int, int], radius: int) -> np.ndarray:
    """Cell by cell: max with exp(-(dx^2 + dy^2) / (2 sigma^2)) inside the (2r+1)^2 window."""
    result = heatmap.copy()
    sigma = (2 * radius + 1) / 6
    for y in range(heatmap.shape[0]):
        for x in range(heatmap.shape[1]):
            dx, dy = x - center[0], y - center[1]
            if abs(dx) <= radius and abs(dy) <= radius:
                value = math.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma))
                result[y, x] = max(result[y, x], np.float32(value))
    return result


def test_kernel_values_at_hand_computed_points() -> None:
    heatmap = draw_gaussian(np.zeros((9, 9), np.float32), (4, 4), 2)
    # r = 2: sigma = 5/6, so 2 sigma^2 = 50/36.
    assert heatmap[4, 4] == 1.0
    assert heatmap[4, 5] == pytest.approx(math.exp(-36 / 50))
    assert heatmap[3, 5] == pytest.approx(math.exp(-72 / 50))
    assert heatmap[6, 6] == pytest.approx(math.exp(-8 * 36 / 50))
    assert heatmap[4, 7] == 0  # outside the 5x5 window
    assert heatmap.sum() == pytest.approx(
        slow_gaussian(np.zeros((9, 9), np.float32), (4, 4), 2).sum()
    )
    assert np.count_nonzero(heatmap) == 25
    assert np.array_equal(heatmap, heatmap.T)


@pytest.mark.parametrize("radius", [0, 1, 3, 7])
def test_kernel_matches_slow_reference(radius: int) -> None:
    heatmap = draw_gaussian(np.zeros((20, 20), np.float32), (9, 11), radius)
    np.testing.assert_allclose(
        heatmap, slow_gaussian(np.zeros((20, 20), np.float32), (9, 11), radius), rtol=1e-6
    )
    assert heatmap.max() == 1.0 and np.argwhere(heatmap == 1.0).tolist() == [[11, 9]]


def test_radius_zero_writes_a_single_one() -> None:
    heatmap = draw_gaussian(np.zeros((4, 5), np.float32), (3, 1), 0)
    assert heatmap.sum() == 1.0 and heatmap[1, 3] == 1.0


@pytest.mark.parametrize("center", [(0, 0), (5, 0), (0, 3), (5, 3), (2, 3)])
def test_kernel_is_cropped_at_the_borders(center: tuple[int, int]) -> None:
    heatmap = draw_gaussian(np.zeros((4, 6), np.float32), center, 3)
    np.testing.assert_allclose(
        heatmap, slow_gaussian(np.zeros((4, 6), np.float32), center, 3), rtol=1e-6
    )
    assert heatmap[center[1], center[0]] == 1.0


def test_overlapping_peaks_merge_by_maximum() -> None:
    first = draw_gaussian(np.zeros((12, 12), np.float32), (4, 5), 3)
    second = draw_gaussian(np.zeros((12, 12), np.float32), (7, 6), 2)
    merged = draw_gaussian(draw_gaussian(np.zeros((12, 12), np.float32), (4, 5), 3), (7, 6), 2)
    assert np.array_equal(merged, np.maximum(first, second))
    assert merged.sum() < first.sum() + second.sum()  # a maximum, not a sum


def test_draw_gaussian_is_in_place_and_rejects_bad_input() -> None:
    heatmap = np.zeros((5, 5), np.float32)
    assert draw_gaussian(heatmap, (2, 2), 1) is heatmap and heatmap[2, 2] == 1.0
    with pytest.raises(ValueError, match="outside the heatmap"):
        draw_gaussian(heatmap, (5, 2), 1)
    with pytest.raises(ValueError, match="radius"):
        draw_gaussian(heatmap, (2, 2), -1)


# ---------------------------------------------------------------------------------------------
# encode_targets


def slow_encode(boxes, labels, num_classes, output_size, max_objects):
    """The spec, one object at a time, in float32 like the original."""
    height, width = output_size
    heatmap = np.zeros((num_classes, height, width), np.float32)
    wh = np.zeros((max_objects, 2), np.float32)
    offset = np.zeros((max_objects, 2), np.float32)
    index = np.zeros(max_objects, np.int64)
    mask = np.zeros(max_objects, np.float32)
    for slot in range(min(len(boxes), max_objects)):
        x1, y1, x2, y2 = (np.float32(value) for value in boxes[slot])
        x1, x2 = (min(max(v, np.float32(0)), np.float32(width - 1)) for v in (x1, x2))
        y1, y2 = (min(max(v, np.float32(0)), np.float32(height - 1)) for v in (y1, y2))
        box_height, box_width = y2 - y1, x2 - x1
        if not (box_height > 0 and box_width > 0):
            continue
        radius = max(0, int(gaussian_radius(math.ceil(box_height), math.ceil(box_width))))
        center = np.array([(x1 + x2) / 2, (y1 + y2) / 2], np.float32)
        cell_x, cell_y = int(center[0]), int(center[1])
        heatmap[labels[slot]] = slow_gaussian(heatmap[labels[slot]], (cell_x, cell_y), radius)
        wh[slot] = box_width, box_height
        index[slot] = cell_y * width + cell_x
        offset[slot] = center - np.array([cell_x, cell_y], np.float32)
        mask[slot] = 1
    return {"heatmap": heatmap, "wh": wh, "offset": offset, "index": index, "mask": mask}


def test_encode_one_box_by_hand() -> None:
    boxes = np.array([[2.0, 3.0, 7.0, 9.5]])
    targets = encode_targets(
        boxes, np.array([1]), num_classes=2, output_size=(16, 20), max_objects=4
    )
    # w = 5, h = 6.5, centre (4.5, 6.25) -> cell (4, 6); radius int(r(7, 5)) = 1.
    assert int(gaussian_radius(7, 5)) == 1
    assert targets["wh"][0].tolist() == [5.0, 6.5]
    assert targets["offset"][0].tolist() == [0.5, 0.25]
    assert targets["index"][0] == 6 * 20 + 4
    assert targets["mask"].tolist() == [1, 0, 0, 0]
    assert targets["heatmap"][1, 6, 4] == 1.0 and targets["heatmap"][0].sum() == 0
    assert np.count_nonzero(targets["heatmap"]) == 9  # a 3x3 window
    assert {key: value.dtype for key, value in targets.items()} == {
        "heatmap": np.float32,
        "wh": np.float32,
        "offset": np.float32,
        "index": np.int64,
        "mask": np.float32,
    }
    assert targets["heatmap"].shape == (2, 16, 20) and targets["wh"].shape == (4, 2)


def test_encode_clips_and_skips_boxes_keeping_their_slots() -> None:
    boxes = np.array(
        [
            [-5.0, -5.0, -1.0, 3.0],  # entirely left of the map: zero width after clipping
            [4.0, 4.0, 4.0, 9.0],  # zero width
            [-4.0, 2.0, 6.0, 30.0],  # clipped to x 0..6, y 2..15
        ]
    )
    targets = encode_targets(boxes, np.array([0, 0, 0]), 1, (16, 16), max_objects=5)
    assert targets["mask"].tolist() == [0, 0, 1, 0, 0]
    assert targets["wh"][:2].sum() == 0 and targets["index"][:2].sum() == 0
    assert targets["wh"][2].tolist() == [6.0, 13.0]
    assert targets["offset"][2].tolist() == [0.0, 0.5]  # centre of the CLIPPED box: (3, 8.5)
    assert targets["index"][2] == 8 * 16 + 3


def test_encode_matches_slow_reference_on_random_boxes() -> None:
    rng = np.random.default_rng(0)
    count = 40
    corners = rng.uniform(-10, 60, size=(count, 2))
    sizes = rng.uniform(0, 25, size=(count, 2)) * (rng.random((count, 1)) > 0.1)
    boxes = np.concatenate([corners, corners + sizes], axis=1)
    labels = rng.integers(0, 3, size=count)
    fast = encode_targets(boxes, labels, 3, (48, 56), max_objects=32)
    slow = slow_encode(boxes, labels, 3, (48, 56), max_objects=32)
    for key in slow:
        np.testing.assert_allclose(fast[key], slow[key], rtol=1e-6, atol=0, err_msg=key)
    assert 0 < fast["mask"].sum() < 32  # some boxes skipped, the last 8 beyond max_objects


def test_encode_with_no_boxes() -> None:
    targets = encode_targets(np.zeros((0, 4)), np.zeros(0, np.int64), 3, (8, 8), max_objects=6)
    assert targets["heatmap"].sum() == 0 and targets["mask"].sum() == 0


def test_encode_rejects_bad_input() -> None:
    boxes = np.array([[1.0, 1.0, 3.0, 3.0]])
    with pytest.raises(ValueError, match="label 5 is outside"):
        encode_targets(boxes, np.array([5]), 3, (8, 8))
    with pytest.raises(ValueError, match="label -1 is outside"):
        encode_targets(boxes, np.array([-1]), 3, (8, 8))
    with pytest.raises(ValueError, match=r"boxes must have shape \(N, 4\)"):
        encode_targets(np.ones((2, 3)), np.array([0, 0]), 3, (8, 8))
    with pytest.raises(ValueError, match="labels must have shape"):
        encode_targets(boxes, np.array([0, 1]), 3, (8, 8))
    with pytest.raises(ValueError, match="non-finite"):
        encode_targets(np.array([[1.0, np.nan, 3.0, 3.0]]), np.array([0]), 3, (8, 8))
    with pytest.raises(ValueError, match="integer class indices"):
        encode_targets(boxes, np.array([0.5]), 3, (8, 8))
    with pytest.raises(ValueError, match="output_size"):
        encode_targets(boxes, np.array([0]), 3, (8,))
    with pytest.raises(ValueError, match="radius_variant"):
        encode_targets(boxes, np.array([0]), 3, (8, 8), radius_variant="buggy")
