"""Split one COCO annotation file into train and val files, for users who have only one."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..files import atomic_write_text
from .coco import read_coco_json
from .records import DataError

logger = logging.getLogger(__name__)


def _split_rank(seed: int, image_id: object) -> str:
    # A hash of (seed, image id) orders the images: the split depends only on the ids, not on
    # their order in the file or on any library's random-number stream, and adding images to
    # the file moves few of the existing ones across the split.
    return hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()


def split_coco(
    annotation_file: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Split a COCO json by image into `<out_dir>/train.json` and `<out_dir>/val.json`.

    Every image goes to exactly one of the two files; each annotation follows its image; both
    files keep all categories (so class indices agree) and any other top-level keys such as
    "info" and "licenses". The split is deterministic: the same file, fraction and seed always
    give the same split, whatever the order of the images in the file. The number of val
    images is round(val_fraction * number of images), at least 1 and leaving at least 1 for
    training. Images keep their order from the input file within each output file.

    Args:
        annotation_file: the COCO json to split (it is not modified).
        out_dir: folder for train.json and val.json (created if missing; existing files of
            those names are replaced, each written atomically).
        val_fraction: fraction of the images that go to val, in (0, 1).
        seed: changes which images go to val.

    Returns:
        (train_json, val_json) paths.

    Raises:
        FileNotFoundError: the input file is missing.
        DataError: the input is not a COCO json, has fewer than 2 images, has annotations of
            unknown images, or would be overwritten by an output.
        ValueError: val_fraction outside (0, 1).
    """
    annotation_file = Path(annotation_file).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    train_path, val_path = out_dir / "train.json", out_dir / "val.json"
    if annotation_file in (train_path, val_path):
        raise DataError(
            f"{annotation_file}: would be overwritten by the split; choose another out_dir"
        )
    dataset = read_coco_json(annotation_file)
    images = dataset["images"]
    if len(images) < 2:
        raise DataError(f"{annotation_file}: needs at least 2 images to split, has {len(images)}")
    image_ids = [image.get("id") if isinstance(image, dict) else None for image in images]
    if len(set(image_ids)) != len(image_ids) or None in image_ids:
        raise DataError(f"{annotation_file}: every image needs a unique 'id'")

    val_count = min(max(round(val_fraction * len(images)), 1), len(images) - 1)
    ranked = sorted(image_ids, key=lambda image_id: _split_rank(seed, image_id))
    val_ids = set(ranked[:val_count])

    known_ids = set(image_ids)
    for annotation in dataset["annotations"]:
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if image_id not in known_ids:
            annotation_id = annotation.get("id") if isinstance(annotation, dict) else None
            raise DataError(
                f"{annotation_file}: annotation {annotation_id} refers to image id "
                f"{image_id!r}, which is not in 'images'"
            )

    def subset(keep_val: bool) -> dict:
        part = {
            key: value for key, value in dataset.items() if key not in ("images", "annotations")
        }
        part["images"] = [image for image in images if (image["id"] in val_ids) == keep_val]
        part["annotations"] = [
            annotation
            for annotation in dataset["annotations"]
            if (annotation["image_id"] in val_ids) == keep_val
        ]
        return part

    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = subset(keep_val=False), subset(keep_val=True)
    atomic_write_text(train_path, json.dumps(train, separators=(",", ":")))
    atomic_write_text(val_path, json.dumps(val, separators=(",", ":")))
    logger.info(
        "split %s: %d train images (%d boxes), %d val images (%d boxes)",
        annotation_file,
        len(train["images"]),
        len(train["annotations"]),
        len(val["images"]),
        len(val["annotations"]),
    )
    return train_path, val_path
