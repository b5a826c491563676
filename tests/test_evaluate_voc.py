"""VOC-style AP50 (Detectron voc_eval semantics), its inputs, and the P-R curve plots."""

import math

import numpy as np
import pytest

from detector.evaluate import average_precision, box_iou, plot_pr_curves, voc_ap50


def _detections(*rows):
    return np.array(rows, dtype=np.float64).reshape(-1, 6)


def _truth(boxes, labels, difficult=None):
    entry = {"boxes": np.array(boxes, dtype=np.float64).reshape(-1, 4), "labels": np.array(labels)}
    if difficult is not None:
        entry["difficult"] = np.array(difficult, dtype=bool)
    return entry


def test_hand_computed_three_objects_five_detections():
    # One class, 3 ground-truth boxes: g1, g2 in image "a", g3 in image "b"; image "c" has none.
    #   d1 0.9 = g1 exactly                          -> TP (g1)
    #   d2 0.8 far from everything in "a"            -> FP
    #   d3 0.7 IoU 0.82 with g1 (taken), 0.54 with g2 -> FP: Detectron looks only at the
    #        best-overlapping box, g1, and does not fall back to the unmatched g2
    #   d4 0.6 IoU 0.92 with g3                      -> TP (g3)
    #   d5 0.5 in image "c" without ground truth     -> FP
    # cumulative TP 1 1 1 2 2, FP 0 1 2 2 3: recall 1/3 1/3 1/3 2/3 2/3,
    # precision 1 1/2 1/3 1/2 2/5. Envelope (running max from the right): 1 1/2 1/2 1/2 2/5.
    # AP = (1/3 - 0)·1 + (2/3 - 1/3)·1/2 + (1 - 2/3)·0 = 1/3 + 1/6 = 0.5.
    ground_truth = {
        "a": _truth([[0, 0, 100, 100], [40, 0, 140, 100]], [0, 0]),
        "b": _truth([[10, 10, 60, 60]], [0]),
        "c": _truth([], []),
    }
    detections = {
        "a": _detections(
            [0, 0, 100, 100, 0.9, 0], [300, 300, 350, 350, 0.8, 0], [10, 0, 110, 100, 0.7, 0]
        ),
        "b": _detections([12, 10, 62, 60, 0.6, 0]),
        "c": _detections([0, 0, 50, 50, 0.5, 0]),
    }
    for plus_one in (True, False):
        result = voc_ap50(detections, ground_truth, num_classes=1, plus_one=plus_one)
        assert result["per_class_ap"][0] == pytest.approx(0.5, abs=1e-12)
        assert result["map"] == pytest.approx(0.5, abs=1e-12)
        curve = result["precision_recall"][0]
        np.testing.assert_allclose(curve["precision"], [1, 1 / 2, 1 / 3, 1 / 2, 2 / 5])
        np.testing.assert_allclose(curve["recall"], [1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
        np.testing.assert_array_equal(curve["scores"], [0.9, 0.8, 0.7, 0.6, 0.5])
        assert curve["num_ground_truth"] == 3


def test_difficult_boxes_are_neither_true_nor_false_positives():
    # d1 0.9 on the difficult box (ignored), d2 0.8 nowhere (FP), d3 0.7 on the normal box (TP).
    # With the flag: counted rows FP, TP over 1 object -> precision 0, 1/2; recall 0, 1;
    # AP = (1 - 0)·1/2 = 0.5.
    # Without it: TP, FP, TP over 2 objects -> precision 1, 1/2, 2/3; recall 1/2, 1/2, 1;
    # AP = 1/2·1 + 1/2·2/3 = 5/6.
    boxes = [[0, 0, 50, 50], [100, 100, 150, 150]]
    detections = {
        0: _detections(
            [0, 0, 50, 50, 0.9, 0], [300, 0, 320, 20, 0.8, 0], [100, 100, 150, 150, 0.7, 0]
        )
    }
    flagged = voc_ap50(detections, {0: _truth(boxes, [0, 0], [True, False])}, num_classes=1)
    assert flagged["per_class_ap"][0] == pytest.approx(0.5, abs=1e-12)
    assert flagged["precision_recall"][0]["num_ground_truth"] == 1
    plain = voc_ap50(detections, {0: _truth(boxes, [0, 0])}, num_classes=1)
    assert plain["per_class_ap"][0] == pytest.approx(5 / 6, abs=1e-12)


def test_box_iou_plus_one_convention_by_hand():
    # Boxes (0,0,2,2) and (1,0,3,2). Continuous: widths 2, overlap 1 x 2 = 2, union 4+4-2 = 6.
    # Inclusive pixels: widths 3, overlap 2 x 3 = 6, union 9+9-6 = 12.
    box = np.array([[0.0, 0.0, 2.0, 2.0]])
    other = np.array([[1.0, 0.0, 3.0, 2.0], [10.0, 10.0, 12.0, 12.0]])
    np.testing.assert_allclose(box_iou(box, other, plus_one=False), [[2 / 6, 0.0]])
    np.testing.assert_allclose(box_iou(box, other, plus_one=True), [[6 / 12, 0.0]])


def test_average_precision_by_hand():
    assert average_precision(np.array([]), np.array([])) == 0.0
    # A perfect ranking reaches recall 1 at precision 1.
    assert average_precision(np.array([0.5, 1.0]), np.array([1.0, 1.0])) == 1.0
    # Precision dips then recovers: the envelope lifts the dip to the later 2/3.
    # recall .5 .5 1, precision 1 .5 2/3 -> .5·1 + .5·2/3.
    assert average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == (
        pytest.approx(0.5 + 1 / 3)
    )


def test_empty_cases():
    ground_truth = {0: _truth([[0, 0, 10, 10]], [1]), 1: _truth([], [])}
    # No detections at all: AP 0 for the class with ground truth, NaN for those without.
    result = voc_ap50({}, ground_truth, num_classes=3)
    assert result["per_class_ap"][1] == 0.0
    assert math.isnan(result["per_class_ap"][0]) and math.isnan(result["per_class_ap"][2])
    assert result["map"] == 0.0
    assert len(result["precision_recall"][1]["precision"]) == 0
    # Empty arrays behave as no detections.
    empty = voc_ap50({0: np.zeros((0, 6)), 1: []}, ground_truth, num_classes=3)
    assert empty["map"] == 0.0
    # No ground truth anywhere: mAP is undefined, detections are still counted.
    nothing = voc_ap50({1: _detections([0, 0, 5, 5, 0.3, 0])}, {1: _truth([], [])}, 2)
    assert math.isnan(nothing["map"])
    assert nothing["precision_recall"][0]["precision"].tolist() == [0.0]


def test_score_threshold_drops_low_detections():
    ground_truth = {0: _truth([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])}
    detections = {0: _detections([0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.005, 0])}
    assert voc_ap50(detections, ground_truth, 1)["map"] == pytest.approx(1.0)
    assert voc_ap50(detections, ground_truth, 1, score_threshold=0.01)["map"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "detections, message",
    [
        ({0: np.zeros((3, 5))}, r"detections\[0\].*\(K, 6\)"),
        ({0: _detections([0, 0, 1, 1, 0.5, 4])}, r"detections\[0\].*0\.\.1"),
        ({0: _detections([0, 0, 1, 1, 0.5, 0.5])}, r"detections\[0\].*whole numbers"),
        ({0: _detections([0, 0, np.nan, 1, 0.5, 0])}, r"detections\[0\].*NaN"),
        ({7: _detections([0, 0, 1, 1, 0.5, 0])}, r"image ids \[7\].*no ground-truth entry"),
    ],
)
def test_bad_detections_are_named(detections, message):
    with pytest.raises(ValueError, match=message):
        voc_ap50(detections, {0: _truth([[0, 0, 1, 1]], [0])}, num_classes=2)


def test_bad_ground_truth_is_named():
    with pytest.raises(ValueError, match=r"ground_truth\[0\].*2 boxes but 1 labels"):
        voc_ap50({}, {0: _truth([[0, 0, 1, 1], [0, 0, 2, 2]], [0])}, num_classes=1)
    with pytest.raises(ValueError, match=r"ground_truth\[0\].*labels must lie in 0\.\.0"):
        voc_ap50({}, {0: _truth([[0, 0, 1, 1]], [3])}, num_classes=1)


def _reference_voc_ap(detections, ground_truth, num_classes, threshold, plus_one):
    """Slow, literal Detectron voc_eval: one Python loop step per detection."""
    pixel = 1.0 if plus_one else 0.0

    def iou(a, b):
        width = max(min(a[2], b[2]) - max(a[0], b[0]) + pixel, 0.0)
        height = max(min(a[3], b[3]) - max(a[1], b[1]) + pixel, 0.0)
        inter = width * height
        union = (
            (a[2] - a[0] + pixel) * (a[3] - a[1] + pixel)
            + (b[2] - b[0] + pixel) * (b[3] - b[1] + pixel)
            - inter
        )
        return inter / union

    aps = []
    for class_index in range(num_classes):
        records, positives = {}, 0
        for image_id, entry in ground_truth.items():
            chosen = [i for i, label in enumerate(entry["labels"]) if label == class_index]
            difficult = [bool(entry["difficult"][i]) for i in chosen]
            records[image_id] = {
                "boxes": [list(entry["boxes"][i]) for i in chosen],
                "difficult": difficult,
                "taken": [False] * len(chosen),
            }
            positives += sum(not flag for flag in difficult)
        ranked = [
            (row[4], image_id, list(row[:4]))
            for image_id, rows in detections.items()
            for row in rows
            if row[5] == class_index
        ]
        ranked.sort(key=lambda item: -item[0])
        tp, fp = [], []
        for _, image_id, box in ranked:
            record = records[image_id]
            best, best_index = -math.inf, None
            for index, truth_box in enumerate(record["boxes"]):
                overlap = iou(box, truth_box)
                if overlap > best:
                    best, best_index = overlap, index
            if best > threshold:
                if record["difficult"][best_index]:
                    tp.append(0), fp.append(0)
                elif not record["taken"][best_index]:
                    record["taken"][best_index] = True
                    tp.append(1), fp.append(0)
                else:
                    tp.append(0), fp.append(1)
            else:
                tp.append(0), fp.append(1)
        if positives == 0:
            aps.append(math.nan)
            continue
        recall, precision, true_sum, false_sum = [], [], 0, 0
        for t, f in zip(tp, fp, strict=True):
            true_sum, false_sum = true_sum + t, false_sum + f
            recall.append(true_sum / positives)
            precision.append(true_sum / max(true_sum + false_sum, 1e-300))
        recall = [0.0] + recall + [1.0]
        precision = [0.0] + precision + [0.0]
        for i in range(len(precision) - 2, -1, -1):
            precision[i] = max(precision[i], precision[i + 1])
        aps.append(
            sum(
                (recall[i + 1] - recall[i]) * precision[i + 1]
                for i in range(len(recall) - 1)
                if recall[i + 1] != recall[i]
            )
        )
    return aps


def _random_case(seed, num_images=12, num_classes=3):
    rng = np.random.default_rng(seed)
    ground_truth, detections = {}, {}
    for image_id in range(num_images):
        count = int(rng.integers(0, 6))
        corners = rng.uniform(0, 200, (count, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(4, 80, (count, 2))], axis=1)
        labels = rng.integers(0, num_classes, count)
        ground_truth[image_id] = {
            "boxes": boxes,
            "labels": labels,
            "difficult": rng.random(count) < 0.15,
        }
        # Jittered copies (some duplicated) plus false positives, all with distinct scores.
        copies = rng.integers(0, 3, count)
        jittered = np.repeat(boxes, copies, axis=0) + rng.normal(0, 4, (copies.sum(), 4))
        false_count = int(rng.integers(0, 4))
        false_corners = rng.uniform(0, 200, (false_count, 2))
        false_boxes = np.concatenate([false_corners, false_corners + 20], axis=1)
        rows = np.concatenate(
            [
                np.c_[jittered, rng.random(len(jittered)), np.repeat(labels, copies)],
                np.c_[
                    false_boxes, rng.random(false_count), rng.integers(0, num_classes, false_count)
                ],
            ]
        )
        detections[image_id] = rows
    return detections, ground_truth


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("plus_one", [True, False])
def test_matches_slow_reference_on_random_cases(seed, plus_one):
    detections, ground_truth = _random_case(seed)
    result = voc_ap50(detections, ground_truth, num_classes=3, plus_one=plus_one)
    expected = _reference_voc_ap(detections, ground_truth, 3, 0.5, plus_one)
    np.testing.assert_allclose(result["per_class_ap"], expected, rtol=0, atol=1e-12)
    assert any(0 < ap < 1 for ap in expected), "the case should be non-trivial"


def test_accepts_records_with_image_id():
    from detector.data.records import ImageRecord

    record = ImageRecord(
        image_id=5,
        path="x.jpg",
        width=100,
        height=100,
        boxes=np.array([[0, 0, 10, 10]]),
        labels=np.array([0]),
        crowd=np.array([False]),
    )
    result = voc_ap50({5: _detections([0, 0, 10, 10, 0.9, 0])}, [record], num_classes=1)
    assert result["map"] == 1.0


# The CJK name renders as boxes where no CJK font is installed; matplotlib warns about it.
@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")
def test_plot_pr_curves_writes_one_safe_png_per_class(tmp_path):
    detections, ground_truth = _random_case(0)
    result = voc_ap50(detections, ground_truth, num_classes=3)
    # A fourth class with no ground truth still gets a figure.
    curves = result["precision_recall"] + [{"precision": [], "recall": [], "ap": math.nan}]
    names = ["power tower", "crane/arm", "烟火", "empty"]
    paths = plot_pr_curves(curves, names, tmp_path / "curves")
    assert [path.name for path in paths] == [
        "000_power_tower_pr.png",
        "001_crane_arm_pr.png",
        "002_class_pr.png",
        "003_empty_pr.png",
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="3 curves but 2 class names"):
        plot_pr_curves(result["precision_recall"], names[:2], tmp_path)
