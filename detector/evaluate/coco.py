"""COCO box AP (AP@[.50:.95], AP50, AP75, AP small/medium/large, per-class AP).

`coco_evaluate` runs the official COCO protocol through ``faster_coco_eval`` (a C++
re-implementation, several times faster, same numbers) when it is installed, else through
``pycocotools``. Both print progress to stdout; that is silenced here.

Coordinate frame: detections and ground truth are x1, y1, x2, y2 in image pixels; the COCO
json format stores boxes as x, y, width, height in the same pixels.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .voc import check_detections, read_ground_truth

BACKENDS = ("auto", "faster", "pycocotools")
# The summary metrics, in the order of COCOeval.stats[:6].
SUMMARY_KEYS = ("ap", "ap50", "ap75", "aps", "apm", "apl")
# The per-class table uses area range "all" and the last (largest) maxDets, 100.
AREA_ALL = 0
LARGEST_MAX_DETECTIONS = -1


def _is_integer_id(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def detections_to_coco_results(
    detections: Mapping[int, np.ndarray],
    category_ids: Sequence[int],
    round_like_original: bool = False,
) -> list[dict[str, Any]]:
    """Detections as COCO results-json entries.

    Args:
        detections: image id (the COCO image id, an int) -> (K, 6) array of x1, y1, x2, y2 in
            image pixels, score, and the 0-based contiguous class index.
        category_ids: the dataset category id of each contiguous class index (COCO's ids have
            gaps: 80 classes use ids 1..90).
        round_like_original: round bbox and score to 2 decimals as the original CenterNet's
            ``_to_float`` does. Off by default: rounding scores merges distinct scores into ties
            (ranked by input order instead of confidence) and turns scores below 0.005 into
            0, which shifts AP by a small, data-dependent amount. Turn it on only to reproduce
            the original's reported numbers exactly.

    Returns:
        One dict per detection: {"image_id": int, "category_id": int, "bbox": [x, y, width,
        height] in image pixels, "score": float}, images in mapping order, rows in array order.
    """
    category_ids = list(category_ids)
    for index, category_id in enumerate(category_ids):
        if not _is_integer_id(category_id):
            raise ValueError(
                f"category_ids[{index}]: expected an integer dataset category id, got "
                f"{category_id!r}"
            )
    checked = check_detections(detections, num_classes=len(category_ids))
    results = []
    for image_id, rows in checked.items():
        if not _is_integer_id(image_id):
            raise ValueError(
                f"detections: COCO image ids must be integers, got {image_id!r} "
                f"({type(image_id).__name__})"
            )
        for x1, y1, x2, y2, score, class_index in rows.tolist():
            bbox = [x1, y1, x2 - x1, y2 - y1]
            if round_like_original:
                bbox = [float(f"{value:.2f}") for value in bbox]
                score = float(f"{score:.2f}")
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(category_ids[int(class_index)]),
                    "bbox": bbox,
                    "score": score,
                }
            )
    return results


def ground_truth_to_coco(
    ground_truth: Mapping[Hashable, Any] | Sequence[Any],
    class_names: Sequence[str],
    category_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """An in-memory COCO ground-truth dict, for data that has no COCO json (VOC, synthetic).

    Args:
        ground_truth: see `detector.evaluate.voc.read_ground_truth`: image id (int) -> entry
            (or records carrying ``image_id``) with ``boxes`` (N, 4) x1, y1, x2, y2 in image
            pixels, ``labels`` (N,) 0-based, optional ``crowd`` (N,) flags (COCO ``iscrowd``:
            such boxes may absorb any number of detections without counting them as false
            positives, and are not objects to find), optional ``width`` / ``height``.
            COCO has no "difficult": VOC difficult flags are ignored here, so difficult objects
            count as ordinary ones; drop them beforehand to leave them out.
        class_names: name of each contiguous class.
        category_ids: dataset category id of each class; default 1..C.

    Returns:
        {"images": [{"id", "width"?, "height"?}], "annotations": [{"id", "image_id",
        "category_id", "bbox": [x, y, w, h], "area": w * h, "iscrowd"}], "categories":
        [{"id", "name"}]}. The area is the box area, which decides small / medium / large
        (COCO's own json uses the segmentation area instead).
    """
    class_names = list(class_names)
    if category_ids is None:
        category_ids = list(range(1, len(class_names) + 1))
    category_ids = list(category_ids)
    if len(category_ids) != len(class_names):
        raise ValueError(
            f"ground_truth_to_coco: {len(class_names)} class names but {len(category_ids)} "
            "category ids"
        )
    if len(set(category_ids)) != len(category_ids):
        raise ValueError(f"ground_truth_to_coco: category ids repeat: {category_ids}")
    read = read_ground_truth(ground_truth, num_classes=len(class_names))

    images, annotations = [], []
    for image_id, entry in read.items():
        if not _is_integer_id(image_id):
            raise ValueError(
                f"ground_truth_to_coco: COCO image ids must be integers, got {image_id!r}"
            )
        image = {"id": int(image_id)}
        if entry["width"] is not None and entry["height"] is not None:
            image.update(width=entry["width"], height=entry["height"])
        images.append(image)
        for (x1, y1, x2, y2), label, crowd in zip(
            entry["boxes"].tolist(), entry["labels"].tolist(), entry["crowd"].tolist(), strict=True
        ):
            width, height = x2 - x1, y2 - y1
            annotations.append(
                {
                    # COCOeval marks unmatched ground truth with id 0, so ids start at 1.
                    "id": len(annotations) + 1,
                    "image_id": int(image_id),
                    "category_id": int(category_ids[label]),
                    "bbox": [x1, y1, width, height],
                    "area": width * height,
                    "iscrowd": int(crowd),
                }
            )
    categories = [
        {"id": int(category_id), "name": str(name)}
        for category_id, name in zip(category_ids, class_names, strict=True)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def _load_json(source: Any, what: str) -> Any:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"coco_evaluate: {what} file {path} does not exist")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"coco_evaluate: {what} file {path} is not valid json: {error}"
            ) from None
    return source


def _check_inputs(ground_truth: Any, results: Any) -> None:
    if not isinstance(ground_truth, dict):
        raise TypeError(
            "coco_evaluate: ground truth must be a COCO dict or a path to a COCO json, got "
            f"{type(ground_truth).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(ground_truth.get(key), list):
            raise ValueError(f"coco_evaluate: ground truth needs a '{key}' list")
    if not isinstance(results, list):
        raise TypeError(
            "coco_evaluate: results must be a list of COCO result dicts or a path to a json "
            f"list, got {type(results).__name__}"
        )
    image_ids = {image["id"] for image in ground_truth["images"]}
    category_ids = {category["id"] for category in ground_truth["categories"]}
    for index, result in enumerate(results):
        if not isinstance(result, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(
            result
        ):
            raise ValueError(
                f"coco_evaluate: results[{index}] must be a dict with image_id, category_id, "
                f"bbox, score; got {result!r}"
            )
        if result["image_id"] not in image_ids:
            raise ValueError(
                f"coco_evaluate: results[{index}] has image_id {result['image_id']!r}, which is "
                "not an image of the ground truth"
            )
        if result["category_id"] not in category_ids:
            raise ValueError(
                f"coco_evaluate: results[{index}] has category_id {result['category_id']!r}; "
                f"the ground truth's ids are {sorted(category_ids)}"
            )
        if len(result["bbox"]) != 4:
            raise ValueError(
                f"coco_evaluate: results[{index}] bbox must be [x, y, width, height], got "
                f"{result['bbox']!r}"
            )


def faster_coco_eval_available() -> bool:
    """Whether the ``faster_coco_eval`` package is importable."""
    return importlib.util.find_spec("faster_coco_eval") is not None


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"coco_evaluate: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "faster" if faster_coco_eval_available() else "pycocotools"
    if backend == "faster" and not faster_coco_eval_available():
        raise ImportError(
            "coco_evaluate: backend 'faster' needs the faster-coco-eval package "
            "(pip install faster-coco-eval), or use backend='pycocotools'"
        )
    return backend


def _run_faster(
    ground_truth: dict, results: list, iou_thresholds: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    from faster_coco_eval import COCO, COCOeval_faster

    def quiet(*args: Any, **kwargs: Any) -> None:
        return None

    coco_ground_truth = COCO(ground_truth, print_function=quiet)
    coco_results = coco_ground_truth.loadRes(results)
    evaluator = COCOeval_faster(coco_ground_truth, coco_results, "bbox", print_function=quiet)
    if iou_thresholds is not None:
        evaluator.params.iouThrs = iou_thresholds
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return (
        np.asarray(evaluator.stats, dtype=np.float64),
        np.asarray(evaluator.eval["precision"]),
        list(evaluator.params.catIds),
    )


def _run_pycocotools(
    ground_truth: dict, results: list, iou_thresholds: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_ground_truth = COCO()
    coco_ground_truth.dataset = ground_truth
    coco_ground_truth.createIndex()
    if results:
        coco_results = coco_ground_truth.loadRes(results)
    else:
        # pycocotools' loadRes reads results[0] and fails on an empty list; an empty results
        # set evaluates fine (AP 0 wherever there is ground truth).
        coco_results = COCO()
        coco_results.dataset = {
            "images": list(ground_truth["images"]),
            "categories": copy.deepcopy(ground_truth["categories"]),
            "annotations": [],
        }
        coco_results.createIndex()
    evaluator = COCOeval(coco_ground_truth, coco_results, "bbox")
    if iou_thresholds is not None:
        evaluator.params.iouThrs = iou_thresholds
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return (
        np.asarray(evaluator.stats, dtype=np.float64),
        np.asarray(evaluator.eval["precision"]),
        list(evaluator.params.catIds),
    )


def _undefined_to_nan(value: float) -> float:
    # COCOeval writes -1 where a metric is undefined (no ground truth in that class or area
    # range); NaN cannot be averaged into a number by mistake.
    return math.nan if value < 0 else float(value)


def _prepared(ground_truth: Any, results: Any, backend: str) -> tuple[dict, list, Any]:
    backend = _resolve_backend(backend)
    ground_truth = _load_json(ground_truth, "ground truth")
    results = _load_json(results, "results")
    _check_inputs(ground_truth, results)
    # Both libraries write into the dicts they are given (gt "ignore", result "area", "id",
    # "segmentation"), so they get copies; result bbox lists are only read.
    ground_truth = copy.deepcopy(ground_truth)
    results = [dict(result) for result in results]
    return ground_truth, results, _run_faster if backend == "faster" else _run_pycocotools


# The keypoint-triplet paper's false discovery thresholds: IoU 0.05, 0.10, ..., 0.50.
FALSE_DISCOVERY_IOUS = np.round(np.arange(0.05, 0.501, 0.05), 2)


def false_discovery_rates(
    ground_truth: dict | str | Path,
    results: list[dict] | str | Path,
    backend: str = "auto",
) -> dict[str, float]:
    """The false discovery rates of Duan et al. ("CenterNet: Keypoint Triplets", section 4.3):
    ``FD_i = 1 - AP_i`` with AP_i the COCO AP (maxDets 100, all areas) at IoU i / 100, i.e.
    the share of wrong boxes among the top 100 that a low IoU threshold still rejects.

    Returns {"fd": 1 - mean AP over IoU 0.05:0.05:0.5, "fd5", "fd25", "fd50"}; the inputs are
    `coco_evaluate`'s.
    """
    ground_truth, results, run = _prepared(ground_truth, results, backend)
    with contextlib.redirect_stdout(io.StringIO()):
        _, precision, _ = run(ground_truth, results, FALSE_DISCOVERY_IOUS)
    # precision: (IoU thresholds, recall thresholds, classes, area ranges, maxDets).
    per_threshold = []
    for index in range(len(FALSE_DISCOVERY_IOUS)):
        values = precision[index, :, :, AREA_ALL, LARGEST_MAX_DETECTIONS]
        values = values[values > -1]
        per_threshold.append(float(values.mean()) if values.size else math.nan)
    rates = {"fd": 1.0 - float(np.mean(per_threshold))}
    for iou in (0.05, 0.25, 0.5):
        index = int(np.argmin(np.abs(FALSE_DISCOVERY_IOUS - iou)))
        rates[f"fd{round(iou * 100)}"] = 1.0 - per_threshold[index]
    return rates


def coco_evaluate(
    ground_truth: dict | str | Path,
    results: list[dict] | str | Path,
    backend: str = "auto",
) -> dict[str, Any]:
    """COCO box AP of `results` against `ground_truth`.

    Args:
        ground_truth: a COCO ground-truth dict (e.g. from `ground_truth_to_coco`) or the path
            of a COCO json. Not modified.
        results: COCO results entries (e.g. from `detections_to_coco_results`; bbox x, y,
            width, height in image pixels) or the path of a results json. Not modified. An
            empty list is fine: AP is 0 wherever there is ground truth.
        backend: "faster" (faster-coco-eval), "pycocotools", or "auto" (faster when installed).
            Both give the same numbers.

    Returns:
        {"ap": AP@[.50:.95], "ap50", "ap75", "aps", "apm", "apl" (small / medium / large),
        all for maxDets 100, and "per_class_ap": {category name: AP@[.50:.95], area all,
        maxDets 100}}. A metric with no ground truth to measure (e.g. "aps" when there are no
        small objects, or a class without boxes) is NaN, where pycocotools prints -1.
    """
    ground_truth, results, run = _prepared(ground_truth, results, backend)
    with contextlib.redirect_stdout(io.StringIO()):
        stats, precision, evaluated_category_ids = run(ground_truth, results)

    names = {
        category["id"]: str(category.get("name", category["id"]))
        for category in ground_truth["categories"]
    }
    repeated = {name for name in names.values() if list(names.values()).count(name) > 1}
    per_class_ap = {}
    for column, category_id in enumerate(evaluated_category_ids):
        # precision: (IoU thresholds, recall thresholds, classes, area ranges, maxDets).
        values = precision[:, :, column, AREA_ALL, LARGEST_MAX_DETECTIONS]
        values = values[values > -1]
        name = names[category_id]
        if name in repeated:
            name = f"{name} (id {category_id})"
        per_class_ap[name] = float(values.mean()) if values.size else math.nan

    metrics: dict[str, Any] = {
        key: _undefined_to_nan(value)
        for key, value in zip(SUMMARY_KEYS, stats[: len(SUMMARY_KEYS)], strict=True)
    }
    metrics["per_class_ap"] = per_class_ap
    return metrics
