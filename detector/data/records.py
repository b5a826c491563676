"""What every dataset loader produces: one `ImageRecord` per image, gathered in a `DetectionSource`.

Loaders (`load_coco`, `load_voc`) read annotation files into these records; transforms and the
torch `Dataset` consume them and never look at a json or xml file again.

Boxes are in continuous image-pixel coordinates: (0, 0) is the top-left corner of the top-left
pixel and (width, height) the bottom-right corner of the bottom-right pixel, so a box covering
the whole image is (0, 0, width, height). COCO's [x, y, w, h] is already in this frame; VOC's
1-based inclusive indices are converted on loading (see `detector/data/voc.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# Reasons for dropping a box that mean the annotation itself is bad. Other counted drops
# ("crowd_ignored", "difficult") are the user's choice and are only logged at INFO level.
BAD_BOX_REASONS = ("zero_size_box", "box_outside_image")


class DataError(ValueError):
    """An annotation file or data declaration that cannot be used; the message names the file,
    key or value at fault and what was expected."""


@dataclass
class ImageRecord:
    """One image and its ground-truth boxes."""

    image_id: int
    """The dataset's own id: the COCO image id, or the running index (from 0) for VOC."""
    path: Path
    """Absolute path of the image file."""
    width: int
    """Image width in pixels."""
    height: int
    """Image height in pixels."""
    boxes: np.ndarray
    """(N, 4) float32 x1, y1, x2, y2 in continuous image-pixel coordinates, inside
    [0, width] x [0, height], with x2 > x1 and y2 > y1."""
    labels: np.ndarray
    """(N,) int64 contiguous 0-based class index (see `DetectionSource.class_names`)."""
    crowd: np.ndarray
    """(N,) bool, COCO's `iscrowd` flag (always False for VOC)."""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.crowd = np.asarray(self.crowd, dtype=bool).reshape(-1)
        count = len(self.boxes)
        if len(self.labels) != count or len(self.crowd) != count:
            raise ValueError(
                f"image {self.image_id}: {count} boxes but {len(self.labels)} labels and "
                f"{len(self.crowd)} crowd flags"
            )


@dataclass
class DetectionSource:
    """A loaded dataset split: its images, its classes and how to map them back to the files."""

    records: list[ImageRecord]
    """One record per image, in the annotation file's order; images without boxes included."""
    class_names: list[str]
    """Class name of each contiguous index."""
    category_ids: list[int]
    """The dataset's category id of each contiguous index, for writing results files
    (COCO ids have gaps, e.g. 1..90 for 80 classes; VOC uses 1..C)."""
    annotation_file: Path | None
    """The COCO json or VOC image-set file / xml folder the records came from."""
    skipped: dict[str, int]
    """How many boxes were dropped, by reason: "zero_size_box", "box_outside_image",
    "crowd_ignored" (COCO with crowd="ignore"), "difficult" (VOC without use_difficult)."""

    @property
    def num_classes(self) -> int:
        """Number of classes, i.e. heatmap channels."""
        return len(self.class_names)


def clip_boxes_to_image(
    boxes: np.ndarray, width: float | np.ndarray, height: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Clip boxes to the image and drop the ones that cannot be trained on.

    Args:
        boxes: (N, 4) x1, y1, x2, y2 in continuous image-pixel coordinates.
        width, height: image size in pixels: scalars, or (N,) arrays giving each box the size
            of its own image.

    Returns:
        (clipped, keep, counts): `clipped` is (N, 4) float32 clipped to [0, width] x [0, height]
        (dropped rows included, so callers index it with `keep`); `keep` is (N,) bool; `counts`
        maps "zero_size_box" (x2 <= x1 or y2 <= y1 before clipping) and "box_outside_image"
        (no area left inside the image after clipping) to how many boxes each dropped.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    zero_size = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    width = np.broadcast_to(np.asarray(width, dtype=np.float64), (len(boxes),))[:, None]
    height = np.broadcast_to(np.asarray(height, dtype=np.float64), (len(boxes),))[:, None]
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    no_area_inside = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    outside = no_area_inside & ~zero_size
    keep = ~(zero_size | outside)
    counts = {"zero_size_box": int(zero_size.sum()), "box_outside_image": int(outside.sum())}
    return clipped.astype(np.float32), keep, counts


def add_counts(total: dict[str, int], counts: dict[str, int]) -> None:
    """Add `counts` into `total` in place, leaving out zero counts."""
    for reason, count in counts.items():
        if count:
            total[reason] = total.get(reason, 0) + count


def log_skipped(source_name: str | Path, skipped: dict[str, int]) -> None:
    """Log, once per loaded file, how many boxes were dropped and why."""
    bad = {reason: count for reason, count in skipped.items() if reason in BAD_BOX_REASONS}
    chosen = {reason: count for reason, count in skipped.items() if reason not in BAD_BOX_REASONS}
    if bad:
        logger.warning("%s: skipped boxes that cannot be trained on: %s", source_name, bad)
    if chosen:
        logger.info("%s: dropped boxes as configured: %s", source_name, chosen)
