"""COCO-format detection json -> `DetectionSource`.

The json is read and checked here rather than through `pycocotools.coco.COCO`: a malformed
file must get an error naming the file and the offending entry (pycocotools indexes without
checking and fails later with a bare KeyError), and grouping the boxes with numpy instead of
pycocotools' per-image lists keeps loading COCO train2017 quick.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .records import (
    DataError,
    DetectionSource,
    ImageRecord,
    add_counts,
    clip_boxes_to_image,
    log_skipped,
)

COCO_REQUIRED_KEYS = ("images", "annotations", "categories")
CROWD_MODES = ("train", "ignore")


def read_coco_json(annotation_file: str | Path) -> dict:
    """Read a COCO detection json and check its top level.

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: the file is not json, or lacks the "images", "annotations" or
            "categories" lists.
    """
    annotation_file = Path(annotation_file)
    if not annotation_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
    try:
        with open(annotation_file, encoding="utf-8") as file:
            dataset = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{annotation_file}: not a valid json file ({error})") from None
    if not isinstance(dataset, dict):
        raise DataError(
            f"{annotation_file}: not a COCO annotation file: expected a json object with keys "
            f"{list(COCO_REQUIRED_KEYS)}, got a {type(dataset).__name__}"
        )
    missing = [key for key in COCO_REQUIRED_KEYS if key not in dataset]
    if missing:
        raise DataError(
            f"{annotation_file}: not a COCO annotation file: missing key(s) {missing} "
            f"(expected {list(COCO_REQUIRED_KEYS)})"
        )
    for key in COCO_REQUIRED_KEYS:
        if not isinstance(dataset[key], list):
            raise DataError(
                f"{annotation_file}: '{key}' must be a list, got {type(dataset[key]).__name__}"
            )
    return dataset


def _require_int(value: object, what: str, annotation_file: Path) -> int:
    # bool is an int subclass, but `"id": true` is a broken file, not id 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{annotation_file}: {what} must be an integer, got {value!r}")
    return value


def _check_categories(dataset: dict, annotation_file: Path) -> list[dict]:
    """The categories sorted by id, after checking each has a unique integer id and a name."""
    seen = set()
    for position, category in enumerate(dataset["categories"]):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise DataError(
                f"{annotation_file}: categories[{position}] needs an 'id' and a 'name', "
                f"got {category!r}"
            )
        category_id = _require_int(category["id"], f"categories[{position}].id", annotation_file)
        if category_id in seen:
            raise DataError(f"{annotation_file}: category id {category_id} appears twice")
        seen.add(category_id)
    id_of_name: dict[str, int] = {}
    for category in dataset["categories"]:
        name = category["name"]
        if not isinstance(name, str) or not name.strip():
            raise DataError(
                f"{annotation_file}: category {category['id']}: 'name' must be a non-empty "
                f"string, got {name!r}"
            )
        # Two ids of one name would train as two classes that evaluation and users cannot
        # tell apart.
        if name in id_of_name:
            raise DataError(
                f"{annotation_file}: categories {id_of_name[name]} and {category['id']} are both "
                f"named {name!r}; give each category its own name (or merge their annotations "
                "into one id)"
            )
        id_of_name[name] = category["id"]
    return sorted(dataset["categories"], key=lambda category: category["id"])


def _check_images(dataset: dict, annotation_file: Path) -> None:
    """Check each image has a unique integer id, a file name and a positive size."""
    seen = set()
    for position, image in enumerate(dataset["images"]):
        if not isinstance(image, dict) or "id" not in image:
            raise DataError(f"{annotation_file}: images[{position}] has no 'id'")
        image_id = _require_int(image["id"], f"images[{position}].id", annotation_file)
        if image_id in seen:
            raise DataError(f"{annotation_file}: image id {image_id} appears twice")
        seen.add(image_id)
        if not isinstance(image.get("file_name"), str):
            raise DataError(f"{annotation_file}: image {image_id} has no 'file_name' string")
        for key in ("width", "height"):
            size = image.get(key)
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise DataError(
                    f"{annotation_file}: image {image_id}: '{key}' must be a positive integer, "
                    f"got {size!r}"
                )


def _is_bbox(bbox: object) -> bool:
    return (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in bbox
        )
    )


def _annotation_arrays(
    annotations: list,
    position_of_image: dict[int, int],
    label_of_category: dict[int, int],
    annotation_file: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Check the annotations and gather them as arrays, in file order.

    Returns:
        image_position (N,) int64 index into the images list, labels (N,) int64,
        crowd (N,) bool and xywh (N, 4) float64 COCO boxes.
    """
    image_position, labels, crowd = [], [], []
    for position, annotation in enumerate(annotations):
        if not isinstance(annotation, dict) or "id" not in annotation:
            raise DataError(f"{annotation_file}: annotations[{position}] has no 'id'")
        try:
            image_position.append(position_of_image[annotation.get("image_id")])
        except (KeyError, TypeError):
            raise DataError(
                f"{annotation_file}: annotation {annotation['id']} refers to image id "
                f"{annotation.get('image_id')!r}, which is not in 'images'"
            ) from None
        try:
            labels.append(label_of_category[annotation.get("category_id")])
        except (KeyError, TypeError):
            raise DataError(
                f"{annotation_file}: annotation {annotation['id']} has category_id "
                f"{annotation.get('category_id')!r}, which is not in 'categories' "
                f"(known ids: {sorted(label_of_category)})"
            ) from None
        crowd.append(bool(annotation.get("iscrowd", 0)))
    # One numpy conversion checks every bbox at once; only when it fails is the first bad
    # one looked for, so that the error can name it.
    try:
        xywh = np.array([annotation.get("bbox") for annotation in annotations], dtype=np.float64)
        valid = xywh.shape == (len(annotations), 4) and bool(np.isfinite(xywh).all())
    except (TypeError, ValueError):
        valid = False
    if not valid:
        for annotation in annotations:
            if not _is_bbox(annotation.get("bbox")):
                raise DataError(
                    f"{annotation_file}: annotation {annotation['id']}: 'bbox' must be 4 finite "
                    f"numbers [x, y, width, height], got {annotation.get('bbox')!r}"
                )
    return (
        np.array(image_position, dtype=np.int64),
        np.array(labels, dtype=np.int64),
        np.array(crowd, dtype=bool),
        xywh.reshape(-1, 4),
    )


def load_coco(
    annotation_file: str | Path,
    image_dir: str | Path,
    crowd: str = "train",
    *,
    check_images: bool = True,
) -> DetectionSource:
    """Load a COCO-format detection json.

    Category ids, sorted ascending, map to contiguous class indices 0..C-1 (COCO's 80 classes
    use ids 1..90 with gaps); `DetectionSource.category_ids` maps them back for results files.
    Images without annotations are kept as records with zero boxes (they train the heatmap's
    negatives). Boxes with zero or negative size, or entirely outside the image, are skipped
    and counted in `skipped` (logged once); boxes partly outside are clipped to the image.

    Args:
        annotation_file: the json ("images", "annotations", "categories").
        image_dir: folder that the images' "file_name" entries are relative to.
        crowd: what to do with `iscrowd=1` boxes.
            - "train" (default, the original CenterNet's behaviour): crowd boxes are ordinary
              positives, drawn on the heatmap like any other object.
            - "ignore": crowd boxes are dropped from the records (counted as "crowd_ignored").
              They are then neither positives nor anything else: CenterNet has no ignore
              regions, so the pixels they cover are plain negatives.
            With "train", the records' `crowd` flags say which boxes were crowd regions.
        check_images: check that every image file exists (one stat per image).

    Raises:
        FileNotFoundError: the json or the image folder is missing, or (with `check_images`)
            image files are missing.
        DataError: the file is not a COCO json, or an entry is malformed (the message names
            the annotation id, image id or category id).
    """
    annotation_file = Path(annotation_file).expanduser().resolve()
    image_dir = Path(image_dir).expanduser().resolve()
    if crowd not in CROWD_MODES:
        raise ValueError(f"crowd: expected 'train' or 'ignore', got {crowd!r}")
    dataset = read_coco_json(annotation_file)
    categories = _check_categories(dataset, annotation_file)
    _check_images(dataset, annotation_file)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir} (for {annotation_file})")

    images = dataset["images"]
    category_ids = [category["id"] for category in categories]
    class_names = [str(category["name"]) for category in categories]
    label_of_category = {category_id: label for label, category_id in enumerate(category_ids)}
    position_of_image = {image["id"]: position for position, image in enumerate(images)}
    image_position, labels, crowd_flags, xywh = _annotation_arrays(
        dataset["annotations"], position_of_image, label_of_category, annotation_file
    )

    skipped: dict[str, int] = {}
    if crowd == "ignore":
        add_counts(skipped, {"crowd_ignored": int(crowd_flags.sum())})
        kept = ~crowd_flags
        image_position, labels, xywh = image_position[kept], labels[kept], xywh[kept]
        crowd_flags = crowd_flags[kept]
    # COCO's [x, y, w, h] is in continuous pixel coordinates (see records.py), so the
    # corners are x + w and y + h with no "+1"/"-1" (the original CenterNet does the same).
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    # Deliberate difference: the original clips boxes only after the training affine
    # transform (to the output map), not to the image; clipping here first only changes
    # boxes that stick out of the image into the padding of a shifted crop.
    widths = np.array([image["width"] for image in images], dtype=np.float64)
    heights = np.array([image["height"] for image in images], dtype=np.float64)
    boxes, keep, counts = clip_boxes_to_image(
        boxes, widths[image_position], heights[image_position]
    )
    add_counts(skipped, counts)

    # Group the kept boxes by image; the stable sort keeps each image's boxes in file order.
    order = np.argsort(image_position[keep], kind="stable")
    boxes, labels, crowd_flags = boxes[keep][order], labels[keep][order], crowd_flags[keep][order]
    boxes_per_image = np.bincount(image_position[keep], minlength=len(images))
    ends = np.cumsum(boxes_per_image)
    starts = ends - boxes_per_image

    records = []
    missing_files = []
    for image, start, end in zip(images, starts, ends, strict=True):
        path = image_dir / image["file_name"]
        if check_images and not path.is_file():
            missing_files.append(image["file_name"])
        records.append(
            ImageRecord(
                image_id=image["id"],
                path=path,
                width=image["width"],
                height=image["height"],
                boxes=boxes[start:end],
                labels=labels[start:end],
                crowd=crowd_flags[start:end],
            )
        )
    if missing_files:
        examples = ", ".join(missing_files[:3])
        raise FileNotFoundError(
            f"{len(missing_files)} of {len(records)} images listed in {annotation_file} are "
            f"missing from {image_dir}, e.g. {examples}"
        )
    log_skipped(annotation_file, skipped)
    return DetectionSource(
        records=records,
        class_names=class_names,
        category_ids=category_ids,
        annotation_file=annotation_file,
        skipped=skipped,
    )
