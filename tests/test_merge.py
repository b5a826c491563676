"""Test-time merging: soft-NMS against the classic loop, flip test, multi-scale merge."""

import math

import numpy as np
import pytest
import torch

from detector.inference.tta import flip_merge, merge_multiscale, soft_nms


def _reference_soft_nms(boxes, scores, method, iou_threshold, sigma, score_threshold):
    """The classic soft-NMS loop on rows [x1, y1, x2, y2, score, original index], in place:
    bring the best remaining row to position i, decay the rows after it, and overwrite a row
    that falls below the threshold with the last row. Returns the original indices and scores
    of rows 0..N_left-1."""
    rows = [
        list(box) + [score, index]
        for index, (box, score) in enumerate(zip(boxes, scores, strict=True))
    ]
    count = len(rows)
    i = 0
    while i < count:
        best = i
        for position in range(i + 1, count):
            if rows[best][4] < rows[position][4]:
                best = position
        rows[i], rows[best] = rows[best], rows[i]
        tx1, ty1, tx2, ty2 = rows[i][:4]
        position = i + 1
        while position < count:
            x1, y1, x2, y2 = rows[position][:4]
            width = min(tx2, x2) - max(tx1, x1) + 1
            if width > 0:
                height = min(ty2, y2) - max(ty1, y1) + 1
                if height > 0:
                    union = (
                        (tx2 - tx1 + 1) * (ty2 - ty1 + 1)
                        + (x2 - x1 + 1) * (y2 - y1 + 1)
                        - width * height
                    )
                    overlap = width * height / union
                    if method == "linear":
                        weight = 1 - overlap if overlap > iou_threshold else 1.0
                    else:
                        weight = math.exp(-(overlap * overlap) / sigma)
                    rows[position][4] *= weight
                    if rows[position][4] < score_threshold:
                        rows[position] = list(rows[count - 1])
                        count -= 1
                        position -= 1
            position += 1
        i += 1
    return [int(row[5]) for row in rows[:count]], [row[4] for row in rows[:count]]


def _clustered_boxes(generator, count, clusters):
    """Boxes around a few centres (heavy overlaps) plus scattered ones, and scores; some scores
    start below the 0.001 threshold."""
    centres = generator.uniform(20, 200, (clusters, 2))
    chosen = centres[generator.integers(0, clusters, count)] + generator.normal(0, 6, (count, 2))
    scattered = generator.random(count) < 0.3
    chosen[scattered] = generator.uniform(0, 300, (scattered.sum(), 2))
    sizes = generator.uniform(8, 60, (count, 2))
    boxes = np.concatenate([chosen - sizes / 2, chosen + sizes / 2], axis=1)
    scores = generator.random(count)
    scores[generator.random(count) < 0.1] *= 1e-3
    return boxes, scores


@pytest.mark.parametrize("method", ["gaussian", "linear"])
@pytest.mark.parametrize("seed", range(6))
def test_soft_nms_matches_classic_loop(method, seed):
    generator = np.random.default_rng(seed)
    boxes, scores = _clustered_boxes(generator, count=60, clusters=4)
    # Linear decay rarely drops a box at the default threshold; a higher one exercises removal.
    score_threshold = 0.001 if method == "gaussian" else 0.05
    keep, new_scores = soft_nms(
        torch.from_numpy(boxes),
        torch.from_numpy(scores),
        method=method,
        score_threshold=score_threshold,
    )
    expected_keep, expected_scores = _reference_soft_nms(
        boxes.tolist(), scores.tolist(), method, 0.5, 0.5, score_threshold
    )
    assert keep.tolist() == expected_keep
    np.testing.assert_allclose(new_scores.numpy(), expected_scores, rtol=1e-12, atol=0)
    assert 0 < len(expected_keep) < len(boxes), "the case should drop some boxes"
    assert (new_scores[:-1] >= new_scores[1:]).all(), "taken in decreasing score order"


def test_soft_nms_edge_cases():
    keep, new_scores = soft_nms(torch.zeros(0, 4), torch.zeros(0))
    assert keep.shape == (0,) and new_scores.shape == (0,)
    keep, new_scores = soft_nms(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.7]))
    assert keep.tolist() == [0] and new_scores.tolist() == pytest.approx([0.7])
    # Two identical boxes: IoU 1, so the second is multiplied by exp(-1 / 0.5).
    keep, new_scores = soft_nms(torch.tensor([[0.0, 0, 10, 10]] * 2), torch.tensor([0.5, 0.9]))
    assert keep.tolist() == [1, 0]
    assert new_scores.tolist() == pytest.approx([0.9, 0.5 * math.exp(-2.0)])
    with pytest.raises(ValueError, match="method must be one of"):
        soft_nms(torch.zeros(1, 4), torch.ones(1), method="hard")
    with pytest.raises(ValueError, match=r"scores must be \(N,\) = \(2,\)"):
        soft_nms(torch.zeros(2, 4), torch.ones(3))


@pytest.mark.gpu
def test_soft_nms_same_on_cuda():
    boxes, scores = _clustered_boxes(np.random.default_rng(0), count=80, clusters=5)
    boxes, scores = torch.from_numpy(boxes), torch.from_numpy(scores)
    keep, new_scores = soft_nms(boxes, scores)
    cuda_keep, cuda_scores = soft_nms(boxes.cuda(), scores.cuda())
    assert cuda_keep.device.type == "cuda"
    assert cuda_keep.cpu().tolist() == keep.tolist()
    torch.testing.assert_close(cuda_scores.cpu(), new_scores)


def _outputs(batch=2, classes=3, height=5, width=7):
    return {
        "heatmap": torch.randn(batch, classes, height, width),
        "wh": torch.rand(batch, 2, height, width) * 10,
        "offset": torch.rand(batch, 2, height, width),
    }


def test_flip_merge_of_a_symmetric_input_is_the_unflipped_pass():
    # A mirror-symmetric image gives mirrored heads; merging returns the plain pass.
    outputs = _outputs()
    mirrored = {key: torch.flip(value, dims=[3]) for key, value in outputs.items()}
    mirrored["offset"] = torch.rand_like(outputs["offset"])  # must be ignored
    merged = flip_merge(outputs, mirrored)
    torch.testing.assert_close(merged["heatmap"], outputs["heatmap"].sigmoid())
    torch.testing.assert_close(merged["wh"], outputs["wh"])
    assert merged["offset"] is outputs["offset"]


def test_flip_merge_formula():
    outputs, flipped = _outputs(), _outputs()
    merged = flip_merge(outputs, flipped)
    # Cell (y, x) of the mirrored pass sits at (y, W - 1 - x).
    width = outputs["heatmap"].shape[3]
    for x in range(width):
        expected = (
            outputs["heatmap"][..., x].sigmoid() + flipped["heatmap"][..., width - 1 - x].sigmoid()
        ) / 2
        torch.testing.assert_close(merged["heatmap"][..., x], expected)
        expected_wh = (outputs["wh"][..., x] + flipped["wh"][..., width - 1 - x]) / 2
        torch.testing.assert_close(merged["wh"][..., x], expected_wh)
    without_offset = flip_merge({"heatmap": outputs["heatmap"], "wh": outputs["wh"]}, flipped)
    assert without_offset["offset"] is None


def test_flip_merge_names_bad_inputs():
    with pytest.raises(TypeError, match=r"pass outputs\[-1\]"):
        flip_merge([_outputs()], _outputs())
    with pytest.raises(KeyError, match="flipped_outputs has no 'wh' head"):
        flip_merge(_outputs(), {"heatmap": torch.zeros(2, 3, 5, 7)})
    with pytest.raises(ValueError, match="same shapes"):
        flip_merge(_outputs(), _outputs(width=8))


def _objects(generator, count, num_classes):
    """Disjoint boxes on a grid (image pixels), scores in [0.5, 1), random classes."""
    cells = generator.permutation(400)[:count]
    corners = np.stack([cells % 20 * 50.0, cells // 20 * 50.0], axis=1)
    boxes = np.concatenate([corners, corners + 30.0], axis=1)
    scores = generator.uniform(0.5, 1.0, count)
    labels = generator.integers(0, num_classes, count)
    return np.c_[boxes, scores, labels].astype(np.float32)


def test_merge_multiscale_keeps_one_of_each_duplicate_and_at_most_100():
    generator = np.random.default_rng(0)
    objects = _objects(generator, 150, num_classes=4)
    # The second scale sees the same objects, boxes a little off and scores a little lower.
    second = objects.copy()
    second[:, :4] += generator.normal(0, 1.0, (150, 4))
    second[:, 4] -= 0.01
    merged = merge_multiscale([objects, second], num_classes=4)
    assert merged.shape == (100, 6)
    assert (np.diff(merged[:, 4]) <= 0).all()
    # Each duplicate fell to about exp(-IoU² / 0.5) <= 0.2 of its score, below every original
    # (>= 0.5), so the kept 100 are the 100 best objects, each once, at their original score.
    best = objects[np.argsort(-objects[:, 4], kind="stable")[:100]]
    np.testing.assert_allclose(merged, best, rtol=1e-6)


def test_merge_multiscale_single_scale_without_soft_nms_is_top_k():
    objects = _objects(np.random.default_rng(1), 120, num_classes=3)
    duplicate = objects[:1].copy()
    merged = merge_multiscale([np.concatenate([objects, duplicate])], 3, method=None)
    assert merged.shape == (100, 6)
    expected = np.concatenate([objects, duplicate])
    expected = expected[np.argsort(-expected[:, 4], kind="stable")[:100]]
    np.testing.assert_array_equal(merged, expected)
    # max_detections caps the output; empty inputs give an empty (0, 6) array.
    assert merge_multiscale([objects], 3, max_detections=7).shape == (7, 6)
    assert merge_multiscale([np.zeros((0, 6)), []], 3).shape == (0, 6)


def test_merge_multiscale_names_bad_inputs():
    with pytest.raises(ValueError, match=r"detections_per_scale\[1\] must be \(K, 6\)"):
        merge_multiscale([np.zeros((2, 6)), np.zeros((2, 5))], 2)
    with pytest.raises(ValueError, match=r"detections_per_scale\[0\] class column.*0\.\.1"):
        merge_multiscale([np.array([[0, 0, 1, 1, 0.5, 2]])], 2)
    with pytest.raises(ValueError, match="method must be one of"):
        merge_multiscale([], 2, method="hard")
