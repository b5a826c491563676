"""Decoding: hand-placed peaks, parity with the original's two-stage top-K, and round trips
boxes -> targets -> perfect predictions -> decode (-> image pixels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.geometry import get_affine_transform, transform_boxes
from detector.inference.decode import ctdet_decode, detections_to_image
from detector.targets import encode_targets


def test_hand_placed_peaks() -> None:
    heatmap = torch.zeros(1, 3, 8, 8)
    wh = torch.zeros(1, 2, 8, 8)
    offset = torch.zeros(1, 2, 8, 8)
    heatmap[0, 2, 3, 5] = 0.9  # class 2 at x = 5, y = 3
    heatmap[0, 0, 1, 1] = 0.8  # class 0 at x = 1, y = 1
    wh[0, :, 3, 5] = torch.tensor([4.0, 2.0])
    wh[0, :, 1, 1] = torch.tensor([1.0, 3.0])
    offset[0, :, 3, 5] = torch.tensor([0.25, 0.75])
    offset[0, :, 1, 1] = torch.tensor([0.5, 0.0])

    detections = ctdet_decode(heatmap, wh, offset, K=2)

    assert detections.shape == (1, 2, 6) and detections.dtype == torch.float32
    # centre (5.25, 3.75), size 4 x 2; then centre (1.5, 1.0), size 1 x 3.
    assert detections[0, 0].tolist() == pytest.approx([3.25, 2.75, 7.25, 4.75, 0.9, 2.0])
    assert detections[0, 1].tolist() == pytest.approx([1.0, -0.5, 2.0, 2.5, 0.8, 0.0])


def test_without_offset_centres_sit_mid_cell() -> None:
    heatmap = torch.zeros(1, 1, 4, 4)
    heatmap[0, 0, 2, 1] = 0.7
    wh = torch.zeros(1, 2, 4, 4)
    wh[0, :, 2, 1] = torch.tensor([2.0, 2.0])
    detections = ctdet_decode(heatmap, wh, K=1)
    assert detections[0, 0].tolist() == pytest.approx([0.5, 1.5, 2.5, 3.5, 0.7, 0.0])


def test_sorted_by_score_and_k_clamped() -> None:
    generator = torch.Generator().manual_seed(0)
    heatmap = torch.rand(2, 2, 3, 3, generator=generator)
    detections = ctdet_decode(heatmap, torch.rand(2, 2, 3, 3, generator=generator), K=100)
    assert detections.shape == (2, 2 * 3 * 3, 6)
    scores = detections[..., 4]
    assert torch.all(scores[:, 1:] <= scores[:, :-1])


def test_peak_suppression_keeps_plateaus() -> None:
    heatmap = torch.zeros(1, 1, 5, 7)
    heatmap[0, 0, 2, 2] = 0.5
    heatmap[0, 0, 2, 3] = 0.5  # equal neighbour: a plateau, both survive
    heatmap[0, 0, 3, 3] = 0.4  # lower neighbour: suppressed
    heatmap[0, 0, 2, 6] = 0.3  # isolated: survives
    detections = ctdet_decode(heatmap, torch.zeros(1, 2, 5, 7), K=4)
    scores = detections[0, :, 4].tolist()
    assert scores == pytest.approx([0.5, 0.5, 0.3, 0.0])
    kept_x = sorted(detections[0, :2, 0].tolist())
    assert kept_x == pytest.approx([2.5, 3.5])


def reference_decode(
    heatmap: torch.Tensor, wh: torch.Tensor, offset: torch.Tensor, K: int
) -> torch.Tensor:
    """The original's route, one image and one class at a time: 3x3 peaks, a top K per class,
    then a top K of those C*K candidates."""
    batch, classes, height, width = heatmap.shape
    rows = []
    for image in range(batch):
        candidates = []  # (score, class, pixel)
        for label in range(classes):
            scores = heatmap[image, label]
            peaks = torch.zeros_like(scores)
            for y in range(height):
                for x in range(width):
                    window = scores[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
                    if scores[y, x] == window.max():
                        peaks[y, x] = scores[y, x]
            top_scores, top_pixels = peaks.flatten().topk(K)
            candidates += [
                (s, label, p) for s, p in zip(top_scores.tolist(), top_pixels.tolist(), strict=True)
            ]
        candidates.sort(key=lambda candidate: -candidate[0])
        image_rows = []
        for score, label, pixel in candidates[:K]:
            y, x = divmod(pixel, width)
            center_x = x + offset[image, 0, y, x].item()
            center_y = y + offset[image, 1, y, x].item()
            half_w, half_h = wh[image, 0, y, x].item() / 2, wh[image, 1, y, x].item() / 2
            image_rows.append(
                [
                    center_x - half_w,
                    center_y - half_h,
                    center_x + half_w,
                    center_y + half_h,
                    score,
                    label,
                ]
            )
        rows.append(image_rows)
    return torch.tensor(rows)


def test_matches_the_original_two_stage_top_k_without_ties() -> None:
    generator = torch.Generator().manual_seed(1)
    heatmap = torch.rand(2, 3, 6, 7, generator=generator)  # continuous: no ties
    wh = torch.rand(2, 2, 6, 7, generator=generator) * 6
    offset = torch.rand(2, 2, 6, 7, generator=generator)
    torch.testing.assert_close(
        ctdet_decode(heatmap, wh, offset, K=5), reference_decode(heatmap, wh, offset, K=5)
    )


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="wh must be"):
        ctdet_decode(torch.rand(1, 3, 4, 4), torch.rand(1, 2, 4, 5))
    with pytest.raises(ValueError, match="offset must be"):
        ctdet_decode(torch.rand(1, 3, 4, 4), torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="K must be"):
        ctdet_decode(torch.rand(1, 3, 4, 4), torch.rand(1, 2, 4, 4), K=0)
    with pytest.raises(ValueError, match=r"\(K, 6\)"):
        detections_to_image(np.zeros((2, 5)), np.eye(2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    generator = torch.Generator().manual_seed(2)
    inputs = [torch.rand(2, 4, 16, 16, generator=generator)] + [
        torch.rand(2, 2, 16, 16, generator=generator) for _ in range(2)
    ]
    on_cpu = ctdet_decode(*inputs, K=20)
    on_cuda = ctdet_decode(*(tensor.cuda() for tensor in inputs), K=20)
    assert on_cuda.is_cuda
    torch.testing.assert_close(on_cuda.cpu(), on_cpu)


# ---------------------------------------------------------------------------------------------
# Round trips


def _spread_boxes(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """Boxes inside an output map whose centres fall in distinct cells at least 2 cells apart."""
    boxes, cells = [], []
    while len(boxes) < count:
        size = rng.uniform(1.5, 12, size=2)
        center = rng.uniform(size / 2, [width - 1 - size[0] / 2, height - 1 - size[1] / 2])
        cell = np.floor(center)
        if all(np.abs(cell - other).max() >= 2 for other in cells):
            cells.append(cell)
            boxes.append([*(center - size / 2), *(center + size / 2)])
    return np.array(boxes)


def _perfect_predictions(
    targets: dict[str, np.ndarray], height: int, width: int
) -> tuple[torch.Tensor, ...]:
    """Prediction maps that hold each target's wh and offset at its cell."""
    heatmap = torch.from_numpy(targets["heatmap"])[None]
    wh = torch.zeros(1, 2, height * width)
    offset = torch.zeros(1, 2, height * width)
    valid = targets["mask"] > 0
    index = torch.from_numpy(targets["index"][valid])
    wh[0, :, index] = torch.from_numpy(targets["wh"][valid]).T
    offset[0, :, index] = torch.from_numpy(targets["offset"][valid]).T
    return heatmap, wh.view(1, 2, height, width), offset.view(1, 2, height, width)


def _match_rows(found: np.ndarray, expected_boxes: np.ndarray, expected_labels: np.ndarray) -> None:
    """Every expected box is found once, with score 1 and its class (order may differ: ties)."""
    assert len(found) == len(expected_boxes)
    assert np.all(found[:, 4] == 1.0)
    order_found = np.lexsort((found[:, 1], found[:, 0]))
    order_expected = np.lexsort((expected_boxes[:, 1], expected_boxes[:, 0]))
    np.testing.assert_allclose(found[order_found, :4], expected_boxes[order_expected], atol=1e-3)
    assert np.array_equal(found[order_found, 5], expected_labels[order_expected])


def test_round_trip_targets_to_decoded_boxes() -> None:
    rng = np.random.default_rng(3)
    height, width, classes = 40, 48, 4
    boxes = _spread_boxes(rng, 12, height, width)
    labels = rng.integers(0, classes, size=len(boxes))
    targets = encode_targets(boxes, labels, classes, (height, width), max_objects=16)
    assert targets["mask"].sum() == len(boxes)

    detections = ctdet_decode(*_perfect_predictions(targets, height, width), K=len(boxes))
    _match_rows(detections[0].numpy(), boxes, labels)


def test_round_trip_through_the_image_affine() -> None:
    rng = np.random.default_rng(4)
    image_height, image_width, down_ratio, classes = 300, 400, 4, 3
    input_size = 256
    out_size = input_size // down_ratio
    center = np.array([image_width / 2, image_height / 2])
    scale = max(image_height, image_width)
    to_output = get_affine_transform(center, scale, (out_size, out_size))
    to_image = get_affine_transform(center, scale, (out_size, out_size), inverse=True)

    output_boxes = _spread_boxes(rng, 8, out_size, out_size)
    # Work back to image-pixel boxes, then forward again as the data pipeline does.
    image_boxes = transform_boxes(output_boxes, to_image)
    inside = (image_boxes[:, 1] >= 0) & (image_boxes[:, 3] <= image_height - 1)
    image_boxes = image_boxes[inside]
    assert len(image_boxes) >= 3
    labels = rng.integers(0, classes, size=len(image_boxes))
    targets = encode_targets(
        transform_boxes(image_boxes, to_output),
        labels,
        classes,
        (out_size, out_size),
        max_objects=16,
    )
    detections = ctdet_decode(
        *_perfect_predictions(targets, out_size, out_size), K=len(image_boxes)
    )
    in_image = detections_to_image(detections[0], to_image)
    assert in_image.shape == (len(image_boxes), 6)
    _match_rows(in_image, image_boxes, labels)
