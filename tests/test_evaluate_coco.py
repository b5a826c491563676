"""COCO box AP: results conversion, in-memory ground truth, and the two backends agreeing."""

import copy
import json
import math

import numpy as np
import pytest

import detector.evaluate.coco as coco_module
from detector.evaluate import (
    coco_evaluate,
    detections_to_coco_results,
    false_discovery_rates,
    ground_truth_to_coco,
)

CLASS_NAMES = ["person", "bicycle", "car", "dog"]
CATEGORY_IDS = [1, 2, 3, 18]  # gaps, as COCO's ids have


def _random_case(seed, num_images=36, num_classes=4):
    """Ground truth (sizes from small to large, a few crowd boxes) and detections: jittered
    copies of the ground truth, some duplicated, plus false positives, random scores."""
    generator = np.random.default_rng(seed)
    ground_truth, detections = {}, {}
    for image_id in range(1, num_images + 1):
        count = int(generator.integers(0, 7))
        corners = generator.uniform(0, 500, (count, 2))
        sizes = np.exp(generator.uniform(np.log(6), np.log(250), (count, 2)))
        boxes = np.concatenate([corners, corners + sizes], axis=1)
        labels = generator.integers(0, num_classes, count)
        ground_truth[image_id] = {
            "boxes": boxes,
            "labels": labels,
            "crowd": generator.random(count) < 0.05,
            "width": 800,
            "height": 800,
        }
        copies = generator.integers(0, 3, count)
        jittered = np.repeat(boxes, copies, axis=0)
        jittered = jittered + generator.normal(0, 0.08, jittered.shape) * np.repeat(
            np.tile(sizes, 2), copies, axis=0
        )
        false_count = int(generator.integers(0, 6))
        false_corners = generator.uniform(0, 500, (false_count, 2))
        false_boxes = np.concatenate(
            [false_corners, false_corners + generator.uniform(5, 150, (false_count, 2))], axis=1
        )
        detections[image_id] = np.concatenate(
            [
                np.c_[jittered, generator.random(len(jittered)), np.repeat(labels, copies)],
                np.c_[
                    false_boxes,
                    generator.random(false_count),
                    generator.integers(0, num_classes, false_count),
                ],
            ]
        ).astype(np.float32)
    return detections, ground_truth


def _assert_same_metrics(first, second, tolerance=0.0):
    def close(a, b):
        return abs(a - b) <= tolerance or (math.isnan(a) and math.isnan(b))

    for key in ("ap", "ap50", "ap75", "aps", "apm", "apl"):
        assert close(first[key], second[key]), key
    assert first["per_class_ap"].keys() == second["per_class_ap"].keys()
    for name, value in first["per_class_ap"].items():
        assert close(value, second["per_class_ap"][name]), name


@pytest.mark.parametrize("seed", [0, 1])
def test_backends_agree_exactly(seed):
    pytest.importorskip("faster_coco_eval")
    pytest.importorskip("pycocotools")
    detections, ground_truth = _random_case(seed)
    gt = ground_truth_to_coco(ground_truth, CLASS_NAMES, CATEGORY_IDS)
    results = detections_to_coco_results(detections, CATEGORY_IDS)
    faster = coco_evaluate(gt, results, backend="faster")
    reference = coco_evaluate(gt, results, backend="pycocotools")
    # pycocotools computes precision as tp / (tp + fp + 2.2e-16); faster-coco-eval gives exactly
    # 1.0 where that is 0.9999999999999998, so values agree to the last bit or two, not always
    # exactly.
    _assert_same_metrics(faster, reference, tolerance=1e-12)
    # Non-trivial: every metric strictly between 0 and 1, and classes differ.
    for key in ("ap", "ap50", "ap75", "aps", "apm", "apl"):
        assert 0.0 < faster[key] < 1.0, key
    assert len(set(faster["per_class_ap"].values())) == len(CLASS_NAMES)
    # COCO's AP is the mean over classes of the per-class AP (all classes have ground truth).
    assert np.mean(list(faster["per_class_ap"].values())) == pytest.approx(faster["ap"], abs=1e-12)
    assert faster["ap50"] > faster["ap75"] > 0


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_perfect_and_empty_results(backend):
    pytest.importorskip("faster_coco_eval" if backend == "faster" else "pycocotools")
    ground_truth = {
        1: {"boxes": np.array([[10.0, 10, 60, 60], [100, 100, 300, 300]]), "labels": [0, 2]},
        2: {"boxes": np.zeros((0, 4)), "labels": []},
    }
    gt = ground_truth_to_coco(ground_truth, CLASS_NAMES, CATEGORY_IDS)
    perfect = detections_to_coco_results(
        {1: np.array([[10, 10, 60, 60, 0.9, 0], [100, 100, 300, 300, 0.8, 2]])}, CATEGORY_IDS
    )
    metrics = coco_evaluate(gt, perfect, backend=backend)
    assert metrics["ap"] == pytest.approx(1.0) and metrics["ap50"] == pytest.approx(1.0)
    # No small objects (50x50 is medium, 200x200 large): AP small is undefined.
    assert math.isnan(metrics["aps"])
    assert metrics["per_class_ap"]["person"] == pytest.approx(1.0)
    assert math.isnan(metrics["per_class_ap"]["bicycle"])

    empty = coco_evaluate(gt, [], backend=backend)
    assert empty["ap"] == empty["ap50"] == empty["ap75"] == 0.0
    assert empty["apm"] == empty["apl"] == 0.0
    assert empty["per_class_ap"]["person"] == empty["per_class_ap"]["car"] == 0.0
    assert math.isnan(empty["aps"]) and math.isnan(empty["per_class_ap"]["dog"])


def test_inputs_are_not_modified_and_paths_work(tmp_path):
    detections, ground_truth = _random_case(3, num_images=8)
    gt = ground_truth_to_coco(ground_truth, CLASS_NAMES, CATEGORY_IDS)
    results = detections_to_coco_results(detections, CATEGORY_IDS)
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    in_memory = coco_evaluate(gt, results)
    assert gt == gt_before and results == results_before
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    from_files = coco_evaluate(tmp_path / "gt.json", str(tmp_path / "results.json"))
    _assert_same_metrics(in_memory, from_files)


def test_detections_to_coco_results_converts_boxes_and_ids():
    detections = {
        7: np.array([[10.0, 20.0, 40.5, 60.25, 0.123456, 3], [0, 0, 1, 1, 0.004, 0]]),
        9: np.zeros((0, 6)),
    }
    results = detections_to_coco_results(detections, CATEGORY_IDS)
    assert results == [
        {"image_id": 7, "category_id": 18, "bbox": [10.0, 20.0, 30.5, 40.25], "score": 0.123456},
        {"image_id": 7, "category_id": 1, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.004},
    ]
    rounded = detections_to_coco_results(detections, CATEGORY_IDS, round_like_original=True)
    assert rounded[0]["score"] == 0.12 and rounded[1]["score"] == 0.0
    assert rounded[0]["bbox"] == [10.0, 20.0, 30.5, 40.25]
    with pytest.raises(ValueError, match=r"detections\[7\].*0\.\.1"):
        detections_to_coco_results(detections, CATEGORY_IDS[:2])
    with pytest.raises(ValueError, match="COCO image ids must be integers, got 'a'"):
        detections_to_coco_results({"a": np.zeros((1, 6))}, CATEGORY_IDS)


def test_ground_truth_to_coco_from_records():
    from detector.data.records import ImageRecord

    records = [
        ImageRecord(
            image_id=4,
            path="a.jpg",
            width=640,
            height=480,
            boxes=np.array([[10, 20, 50, 100], [0, 0, 5, 5]]),
            labels=np.array([1, 3]),
            crowd=np.array([False, True]),
        ),
        ImageRecord(
            image_id=6,
            path="b.jpg",
            width=320,
            height=240,
            boxes=np.zeros((0, 4)),
            labels=np.zeros(0),
            crowd=np.zeros(0),
        ),
    ]
    gt = ground_truth_to_coco(records, CLASS_NAMES, CATEGORY_IDS)
    assert gt["images"] == [
        {"id": 4, "width": 640, "height": 480},
        {"id": 6, "width": 320, "height": 240},
    ]
    assert gt["annotations"] == [
        {
            "id": 1,
            "image_id": 4,
            "category_id": 2,
            "bbox": [10.0, 20.0, 40.0, 80.0],
            "area": 3200.0,
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 4,
            "category_id": 18,
            "bbox": [0.0, 0.0, 5.0, 5.0],
            "area": 25.0,
            "iscrowd": 1,
        },
    ]
    assert gt["categories"][3] == {"id": 18, "name": "dog"}
    default_ids = ground_truth_to_coco(records, CLASS_NAMES)
    assert [category["id"] for category in default_ids["categories"]] == [1, 2, 3, 4]


def test_bad_inputs_are_named(monkeypatch):
    gt = ground_truth_to_coco(
        {1: {"boxes": [[0, 0, 10, 10]], "labels": [0]}}, CLASS_NAMES, CATEGORY_IDS
    )
    result = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5}
    with pytest.raises(ValueError, match="image_id 99, which is not an image"):
        coco_evaluate(gt, [dict(result, image_id=99)])
    with pytest.raises(
        ValueError, match=r"category_id 5; the ground truth's ids are \[1, 2, 3, 18\]"
    ):
        coco_evaluate(gt, [dict(result, category_id=5)])
    with pytest.raises(ValueError, match="backend must be one of"):
        coco_evaluate(gt, [result], backend="fast")
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        coco_evaluate("missing.json", [result])
    with pytest.raises(ValueError, match="needs a 'annotations' list"):
        coco_evaluate({"images": [], "categories": []}, [])
    monkeypatch.setattr(coco_module, "faster_coco_eval_available", lambda: False)
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        coco_evaluate(gt, [result], backend="faster")
    # "auto" falls back to pycocotools.
    assert coco_evaluate(gt, [result], backend="auto")["ap"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_false_discovery_rates(backend):
    """Duan et al.'s FD = 1 - AP at IoU 0.05:0.05:0.5: 0 for perfect boxes; a box shifted to
    IoU 1/3 with its object is wrong at IoU 0.5 and 0.35..0.5, right up to 0.3."""
    pytest.importorskip("faster_coco_eval" if backend == "faster" else "pycocotools")
    ground_truth = {1: {"boxes": np.array([[0.0, 0, 100, 100]]), "labels": [0]}}
    gt = ground_truth_to_coco(ground_truth, CLASS_NAMES, CATEGORY_IDS)
    perfect = detections_to_coco_results({1: np.array([[0, 0, 100, 100, 0.9, 0]])}, CATEGORY_IDS)
    rates = false_discovery_rates(gt, perfect, backend=backend)
    assert rates == pytest.approx({"fd": 0.0, "fd5": 0.0, "fd25": 0.0, "fd50": 0.0})
    # Shifted by 50 px: intersection 50 x 100, union 150 x 100, IoU exactly 1/3.
    shifted = detections_to_coco_results({1: np.array([[50, 0, 150, 100, 0.9, 0]])}, CATEGORY_IDS)
    rates = false_discovery_rates(gt, shifted, backend=backend)
    assert rates["fd5"] == pytest.approx(0.0) and rates["fd25"] == pytest.approx(0.0)
    assert rates["fd50"] == pytest.approx(1.0)
    # Right at IoU 0.05 ... 0.30 (6 of 10 thresholds), wrong at 0.35 ... 0.50.
    assert rates["fd"] == pytest.approx(0.4)
