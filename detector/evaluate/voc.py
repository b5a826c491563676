"""PASCAL VOC-style AP at one IoU threshold (AP50 by default), as the pruning seed computes it.

The seed (panchengl/centernet_prune) selects its best checkpoint by a port of Detectron's
``voc_eval`` with ``use_07_metric=False``: per class, detections of all images are ranked by
score, matched greedily to ground truth, and AP is the area under the *interpolated*
precision-recall curve (the VOC2010+ method, not the 11-point VOC2007 one).

Also here: the input checks the COCO evaluation shares (`check_detections`, `read_ground_truth`).

Coordinate frame: boxes are x1, y1, x2, y2 in image pixels, detections and ground truth alike.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

# Detection rows are x1, y1, x2, y2, score, class.
DETECTION_COLUMNS = 6
SCORE_COLUMN = 4
CLASS_COLUMN = 5


def check_detections(
    detections: Mapping[Hashable, Any], num_classes: int | None = None
) -> dict[Hashable, np.ndarray]:
    """Validate per-image detections and return them as float64 arrays.

    Args:
        detections: image id -> (K, 6) array of x1, y1, x2, y2 (image pixels), score, and the
            0-based contiguous class index (stored as a float). K may be 0.
        num_classes: if given, every class index must lie in [0, num_classes).

    Returns:
        image id -> (K, 6) float64 array (a copy).

    Raises:
        ValueError naming the image id and what is wrong (shape, non-finite value, class index).
    """
    if not isinstance(detections, Mapping):
        raise TypeError(
            f"detections: expected a mapping image id -> (K, 6) array, got "
            f"{type(detections).__name__}"
        )
    checked = {}
    for image_id, rows in detections.items():
        try:
            array = np.asarray(rows, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"detections[{image_id!r}]: expected a (K, 6) numeric array, got {error}"
            ) from None
        if array.size == 0:
            array = array.reshape(0, DETECTION_COLUMNS)
        if array.ndim != 2 or array.shape[1] != DETECTION_COLUMNS:
            raise ValueError(
                f"detections[{image_id!r}]: expected shape (K, 6) = x1, y1, x2, y2, score, "
                f"class, got {array.shape}"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"detections[{image_id!r}]: contains NaN or infinite values")
        classes = array[:, CLASS_COLUMN]
        if (classes != np.round(classes)).any():
            raise ValueError(
                f"detections[{image_id!r}]: the class column (index 5) must hold whole numbers "
                f"(0-based class indices), got {classes[classes != np.round(classes)][:3]}"
            )
        if (
            num_classes is not None
            and len(classes)
            and (classes.min() < 0 or classes.max() >= num_classes)
        ):
            raise ValueError(
                f"detections[{image_id!r}]: class indices must lie in 0..{num_classes - 1}, "
                f"got {int(classes.min())}..{int(classes.max())}"
            )
        checked[image_id] = array
    return checked


def _field(entry: Any, name: str) -> Any:
    """`entry[name]` for a mapping, `entry.name` for an object (e.g. an ImageRecord), or None."""
    if isinstance(entry, Mapping):
        return entry.get(name)
    return getattr(entry, name, None)


def _flags(entry: Any, name: str, count: int, image_id: Hashable) -> np.ndarray:
    value = _field(entry, name)
    if value is None:
        return np.zeros(count, dtype=bool)
    flags = np.asarray(value).reshape(-1)
    if len(flags) != count:
        raise ValueError(
            f"ground_truth[{image_id!r}]: {count} boxes but {len(flags)} '{name}' flags"
        )
    return flags.astype(bool)


def read_ground_truth(
    ground_truth: Mapping[Hashable, Any] | Sequence[Any], num_classes: int | None = None
) -> dict[Hashable, dict[str, Any]]:
    """Validate per-image ground truth and return it as plain arrays.

    Args:
        ground_truth: either image id -> entry, or a sequence of entries that carry their own
            ``image_id`` (such as `detector.data.records.ImageRecord`). An entry is a mapping or
            an object with ``boxes`` (N, 4) x1, y1, x2, y2 in image pixels, ``labels`` (N,)
            0-based class indices, and optionally ``crowd`` (N,) and ``difficult`` (N,) flags and
            ``width`` / ``height`` in pixels. Images without objects have N = 0.
        num_classes: if given, every label must lie in [0, num_classes).

    Returns:
        image id -> {"boxes": (N, 4) float64, "labels": (N,) int64, "crowd": (N,) bool,
        "difficult": (N,) bool, "width": int | None, "height": int | None}.
    """
    if isinstance(ground_truth, Mapping):
        items = list(ground_truth.items())
    elif isinstance(ground_truth, Sequence) and not isinstance(ground_truth, (str, bytes)):
        items = []
        for position, entry in enumerate(ground_truth):
            image_id = _field(entry, "image_id")
            if image_id is None:
                raise ValueError(
                    f"ground_truth[{position}]: entries of a sequence need an 'image_id'; "
                    "pass a mapping image id -> entry otherwise"
                )
            items.append((image_id, entry))
    else:
        raise TypeError(
            "ground_truth: expected a mapping image id -> {boxes, labels, ...} or a sequence "
            f"of records with image_id, got {type(ground_truth).__name__}"
        )

    read = {}
    for image_id, entry in items:
        if image_id in read:
            raise ValueError(f"ground_truth: image id {image_id!r} appears more than once")
        boxes, labels = _field(entry, "boxes"), _field(entry, "labels")
        if boxes is None or labels is None:
            raise ValueError(f"ground_truth[{image_id!r}]: needs 'boxes' and 'labels'")
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"ground_truth[{image_id!r}]: boxes must be (N, 4) x1, y1, x2, y2, "
                f"got {boxes.shape}"
            )
        if not np.isfinite(boxes).all():
            raise ValueError(f"ground_truth[{image_id!r}]: boxes contain NaN or infinite values")
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(boxes):
            raise ValueError(
                f"ground_truth[{image_id!r}]: {len(boxes)} boxes but {len(labels)} labels"
            )
        if len(labels) and not np.issubdtype(labels.dtype, np.integer):
            if (labels != np.round(labels)).any():
                raise ValueError(
                    f"ground_truth[{image_id!r}]: labels must be whole 0-based class indices"
                )
        labels = labels.astype(np.int64)
        if (
            num_classes is not None
            and len(labels)
            and (labels.min() < 0 or labels.max() >= num_classes)
        ):
            raise ValueError(
                f"ground_truth[{image_id!r}]: labels must lie in 0..{num_classes - 1}, "
                f"got {labels.min()}..{labels.max()}"
            )
        width, height = _field(entry, "width"), _field(entry, "height")
        read[image_id] = {
            "boxes": boxes,
            "labels": labels,
            "crowd": _flags(entry, "crowd", len(boxes), image_id),
            "difficult": _flags(entry, "difficult", len(boxes), image_id),
            "width": None if width is None else int(width),
            "height": None if height is None else int(height),
        }
    return read


def box_iou(boxes: np.ndarray, others: np.ndarray, plus_one: bool = True) -> np.ndarray:
    """IoU of every box in `boxes` (N, 4) with every box in `others` (M, 4) -> (N, M).

    Boxes are x1, y1, x2, y2 in image pixels. With ``plus_one`` the coordinates are read as
    inclusive pixel indices, so a box spans x2 - x1 + 1 pixels (the VOC devkit / Detectron
    convention); without it, as continuous coordinates (width x2 - x1).
    """
    pixel = 1.0 if plus_one else 0.0
    left = np.maximum(boxes[:, None, 0], others[None, :, 0])
    top = np.maximum(boxes[:, None, 1], others[None, :, 1])
    right = np.minimum(boxes[:, None, 2], others[None, :, 2])
    bottom = np.minimum(boxes[:, None, 3], others[None, :, 3])
    intersection = np.maximum(right - left + pixel, 0.0) * np.maximum(bottom - top + pixel, 0.0)
    area = (boxes[:, 2] - boxes[:, 0] + pixel) * (boxes[:, 3] - boxes[:, 1] + pixel)
    other_area = (others[:, 2] - others[:, 0] + pixel) * (others[:, 3] - others[:, 1] + pixel)
    union = area[:, None] + other_area[None, :] - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        # Degenerate boxes (zero union) overlap nothing.
        return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the interpolated precision-recall curve (VOC2010+, ``use_07_metric=False``).

    Args:
        recall, precision: (D,) values after each of the D ranked detections (recall
            non-decreasing).

    The curve is closed with recall 0 at the start and (recall 1, precision 0) at the end;
    precision is replaced by its running maximum from the right (the "envelope"), and the area
    is the sum of recall steps times the envelope at the step's right end. Returns 0 for D = 0.
    """
    recall = np.concatenate(([0.0], np.asarray(recall, dtype=np.float64), [1.0]))
    precision = np.concatenate(([0.0], np.asarray(precision, dtype=np.float64), [0.0]))
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def _match_image(
    boxes: np.ndarray,
    ground_truth_boxes: np.ndarray,
    difficult: np.ndarray,
    iou_threshold: float,
    plus_one: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """TP / FP flags of one image's detections of one class, given in descending score order.

    Each detection looks at the ground-truth box it overlaps most (all of the class's boxes in
    the image, already matched ones included). Above the threshold: a difficult box makes it
    neither TP nor FP, an unmatched box makes it a TP (and the box matched), a matched box makes
    it a FP. This is Detectron's ``voc_eval``: a duplicate is a FP even if a second, unmatched
    box also overlaps it by more than the threshold.
    """
    count = len(boxes)
    true_positive = np.zeros(count, dtype=bool)
    false_positive = np.zeros(count, dtype=bool)
    if len(ground_truth_boxes) == 0:
        false_positive[:] = True
        return true_positive, false_positive
    overlaps = box_iou(boxes, ground_truth_boxes, plus_one)
    best = overlaps.argmax(axis=1)
    best_overlap = overlaps[np.arange(count), best]
    matched = np.zeros(len(ground_truth_boxes), dtype=bool)
    for row, (index, overlap) in enumerate(zip(best.tolist(), best_overlap.tolist(), strict=True)):
        if overlap > iou_threshold:
            if difficult[index]:
                continue
            if matched[index]:
                false_positive[row] = True
            else:
                true_positive[row] = True
                matched[index] = True
        else:
            false_positive[row] = True
    return true_positive, false_positive


def voc_ap50(
    detections: Mapping[Hashable, Any],
    ground_truth: Mapping[Hashable, Any] | Sequence[Any],
    num_classes: int,
    iou_threshold: float = 0.5,
    plus_one: bool = True,
    score_threshold: float = 0.0,
) -> dict[str, Any]:
    """VOC-style per-class AP and mAP at one IoU threshold (Detectron ``voc_eval`` semantics).

    Args:
        detections: image id -> (K, 6) x1, y1, x2, y2 (image pixels), score, 0-based class.
            Every image id must appear in `ground_truth`.
        ground_truth: see `read_ground_truth`: per image ``boxes`` (N, 4) x1, y1, x2, y2 in image
            pixels, ``labels`` (N,), optional ``difficult`` (N,) flags (crowd flags are ignored,
            as in VOC). Images without objects still count: their detections are false
            positives.
        num_classes: number of contiguous classes.
        iou_threshold: a detection matches when IoU > threshold (strictly, as Detectron).
        plus_one: read boxes as inclusive pixel indices when computing IoU (width = x2 - x1 + 1),
            as the Detectron port the pruning seed uses; keep True for parity with the seed's
            numbers. ctprune's records are continuous pixel coordinates, for which False is the
            geometrically exact IoU; the difference matters only for small boxes.
        score_threshold: drop detections scoring below this first (the seed uses 0.01; the
            default 0 keeps all, as COCO evaluation does). Dropping low-scoring detections can
            only lower AP.

    Returns:
        {"map": mean AP over classes with at least one non-difficult ground-truth box (NaN if
        none has one), "per_class_ap": list of C floats (NaN for classes without ground
        truth), "precision_recall": list of C dicts {"precision": (D,), "recall": (D,),
        "scores": (D,) the class's detection scores, descending, "ap": float,
        "num_ground_truth": int}} where D counts the class's detections that are TP or FP
        (difficult matches are left out, as Detectron's zero rows add no step to the curve).

    Detections are ranked by score with a stable sort, so ties keep the order of `detections`
    (images in mapping order, rows in array order); Detectron's unstable ``argsort`` may break
    ties differently.
    """
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or (num_classes < 1)
    ):
        raise ValueError(f"voc_ap50: num_classes must be a positive integer, got {num_classes!r}")
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"voc_ap50: iou_threshold must lie in [0, 1), got {iou_threshold!r}")
    detections = check_detections(detections, num_classes)
    ground_truth = read_ground_truth(ground_truth, num_classes)
    unknown = [image_id for image_id in detections if image_id not in ground_truth]
    if unknown:
        raise ValueError(
            f"voc_ap50: detections for image ids {unknown[:5]} that have no ground-truth entry; "
            "give images without objects an entry with empty boxes and labels"
        )

    image_ids = list(detections)
    arrays = [detections[image_id] for image_id in image_ids]
    all_rows = np.concatenate([np.zeros((0, DETECTION_COLUMNS))] + arrays)
    owner = np.repeat(np.arange(len(arrays)), [len(array) for array in arrays])
    keep = all_rows[:, SCORE_COLUMN] >= score_threshold
    # One stable sort for all classes: restricted to a class it is that class's stable order.
    order = np.argsort(-all_rows[keep, SCORE_COLUMN], kind="stable")
    all_rows, owner = all_rows[keep][order], owner[keep][order]
    all_classes = all_rows[:, CLASS_COLUMN].astype(np.int64)

    # Difficult boxes are not objects to find: they do not count in recall.
    counted_labels = [entry["labels"][~entry["difficult"]] for entry in ground_truth.values()]
    ground_truth_counts = np.bincount(
        np.concatenate([np.zeros(0, dtype=np.int64)] + counted_labels), minlength=num_classes
    )

    per_class_ap = []
    precision_recall = []
    for class_index in range(num_classes):
        in_class = all_classes == class_index
        rows, row_owner = all_rows[in_class], owner[in_class]
        num_ground_truth = int(ground_truth_counts[class_index])
        true_positive = np.zeros(len(rows), dtype=bool)
        false_positive = np.zeros(len(rows), dtype=bool)
        # Matching is per image, in the class's score order restricted to that image: a stable
        # sort by image keeps the score order inside each image's group.
        by_image = np.argsort(row_owner, kind="stable")
        group_starts = np.flatnonzero(np.diff(row_owner[by_image], prepend=-1))
        for where in np.split(by_image, group_starts[1:]):
            if len(where) == 0:
                continue
            entry = ground_truth[image_ids[row_owner[where[0]]]]
            of_class = entry["labels"] == class_index
            tp, fp = _match_image(
                rows[where, :4],
                entry["boxes"][of_class],
                entry["difficult"][of_class],
                iou_threshold,
                plus_one,
            )
            true_positive[where], false_positive[where] = tp, fp

        # Detections matched to a difficult box are neither TP nor FP; Detectron keeps them as
        # rows that repeat the previous (recall, precision) point, which changes no area.
        counted = true_positive | false_positive
        true_positives = np.cumsum(true_positive[counted])
        precision = true_positives / np.arange(1, len(true_positives) + 1)
        if num_ground_truth > 0:
            recall = true_positives / num_ground_truth
            ap = average_precision(recall, precision)
        else:
            recall = np.full(len(precision), math.nan)
            ap = math.nan
        per_class_ap.append(ap)
        precision_recall.append(
            {
                "precision": precision,
                "recall": recall,
                "scores": rows[counted, SCORE_COLUMN],
                "ap": ap,
                "num_ground_truth": num_ground_truth,
            }
        )

    defined = [ap for ap in per_class_ap if not math.isnan(ap)]
    mean_ap = float(np.mean(defined)) if defined else math.nan
    return {"map": mean_ap, "per_class_ap": per_class_ap, "precision_recall": precision_recall}
