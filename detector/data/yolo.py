"""YOLO-format (Ultralytics) detection data -> `DetectionSource`.

A split is a folder of images (searched recursively) or a text file listing image paths, one a
line (relative lines are taken relative to the text file's folder, as Ultralytics does for its
``./images/...`` lists). Each image's labels are in a text file found by Ultralytics' rule:
the last ``/images/`` of the image path becomes ``/labels/`` and the suffix ``.txt``
(``data/images/train/a.jpg`` -> ``data/labels/train/a.txt``). Each line is
``class cx cy w h``: a 0-based class index and the box centre and size divided by the image
width and height. An image without a label file, or with an empty one, has no boxes.
"""

from __future__ import annotations

import logging
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

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# How far outside [0, 1] a normalised value may be and still be taken as rounding of an
# exporter (1.0000001, -0.0004); the box is clipped to the image afterwards. Anything further
# out is a wrong label (pixels instead of fractions, a swapped width and height), not noise.
COORDINATE_TOLERANCE = 1e-3

VALUES_PER_LINE = 5  # class cx cy w h

logger = logging.getLogger(__name__)


def class_names_from_yolo(names: object, where: str) -> list[str]:
    """The class list of an Ultralytics ``names`` entry: a list of names, or a mapping
    ``{0: person, 1: car}`` whose keys are the indices 0..C-1.

    Raises:
        DataError: not a list or mapping, empty, keys that are not 0..C-1, or a name that is
            not a non-empty string (the message starts with ``where``).
    """
    if isinstance(names, dict):
        keys = list(names)
        if any(isinstance(key, bool) or not isinstance(key, int) for key in keys) or sorted(
            keys
        ) != list(range(len(keys))):
            raise DataError(
                f"{where}: the keys of a names mapping must be the class indices "
                f"0..{len(keys) - 1}, got {keys}"
            )
        names = [names[index] for index in range(len(keys))]
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(
            f"{where}: expected a list of class names or a mapping {{index: name}}, got {names!r}"
        )
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: expected class names (strings), got {name!r}")
    return list(names)


def label_path(image_path: str | Path) -> Path:
    """The label file of an image, by Ultralytics' rule: the last ``/images/`` of the path
    becomes ``/labels/`` and the suffix ``.txt`` (no ``/images/``: beside the image)."""
    text = Path(image_path).as_posix()
    head, found, tail = text.rpartition("/images/")
    if found:
        text = f"{head}/labels/{tail}"
    return Path(text).with_suffix(".txt")


def yolo_image_files(split: str | Path) -> list[Path]:
    """The images of a split: a folder (every image below it, sorted by path) or a text file
    of image paths (in the file's order).

    Raises:
        FileNotFoundError: the folder, the text file or listed images are missing.
    """
    split = Path(split).expanduser().resolve()
    if split.is_dir():
        return sorted(
            path for path in split.rglob("*")
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        )
    if not split.is_file():
        raise FileNotFoundError(f"YOLO image folder or image list not found: {split}")
    images = []
    for line in split.read_text(encoding="utf-8").splitlines():
        if line.strip():
            path = Path(line.strip()).expanduser()
            images.append((path if path.is_absolute() else split.parent / path).resolve())
    missing = [str(path) for path in images if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(images)} images listed in {split} do not exist, e.g. "
            f"{', '.join(missing[:3])}"
        )
    return images


def read_yolo_labels(
    label_file: Path, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,) int64, boxes (N, 4) float64 normalised cx, cy, w, h) of one label file.

    Raises:
        DataError: naming the file and line: a line that is not 5 values (more: a polygon or
            segment label, which detection cannot use), a value that is not a finite number,
            a class that is not a whole number in 0..num_classes-1, or a coordinate outside
            [0, 1] by more than `COORDINATE_TOLERANCE`.
    """
    labels, boxes = [], []
    try:
        text = label_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{label_file}: not a UTF-8 text file of labels ({error})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        values = line.split()
        if not values:
            continue
        where = f"{label_file}:{number}"
        if len(values) > VALUES_PER_LINE:
            raise DataError(
                f"{where}: {len(values)} values: a polygon or segment label; detection needs "
                f"one box per line, 'class cx cy w h' (convert segments to boxes first)"
            )
        if len(values) < VALUES_PER_LINE:
            raise DataError(f"{where}: expected 5 values 'class cx cy w h', got {line.strip()!r}")
        try:
            numbers = [float(value) for value in values]
        except ValueError:
            raise DataError(
                f"{where}: expected numbers 'class cx cy w h', got {line.strip()!r}"
            ) from None
        if not all(math.isfinite(value) for value in numbers):
            raise DataError(f"{where}: expected finite numbers, got {line.strip()!r}")
        label = numbers[0]
        if not label.is_integer() or not 0 <= label < num_classes:
            raise DataError(
                f"{where}: class {values[0]} is not a class index 0..{num_classes - 1} "
                f"(data names {num_classes} classes)"
            )
        for name, text, value in zip(("cx", "cy", "w", "h"), values[1:], numbers[1:],
                                     strict=True):
            if not -COORDINATE_TOLERANCE <= value <= 1 + COORDINATE_TOLERANCE:
                raise DataError(
                    f"{where}: {name} = {text} is outside [0, 1]; YOLO labels are fractions "
                    "of the image width and height"
                )
        labels.append(int(label))
        boxes.append(numbers[1:])
    return np.array(labels, dtype=np.int64), np.array(boxes, dtype=np.float64).reshape(-1, 4)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image  # reads the header only

    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:
        raise DataError(f"{path}: not a readable image ({error})") from None


def load_yolo(split: str | Path, class_names: list[str]) -> DetectionSource:
    """Load one YOLO split (see the module docstring for the layout).

    Records get `image_id` = their running index (0, 1, ...), category ids 1..C (for COCO
    results files) and boxes in image pixels: x1 = (cx - w / 2) * width, and so on. Boxes of
    zero size are skipped and counted; boxes that stick out of the image by the tolerated
    rounding are clipped.

    Raises:
        FileNotFoundError: the split's folder, list or listed images are missing.
        DataError: a malformed label line (see `read_yolo_labels`) or an unreadable image.
    """
    split = Path(split).expanduser().resolve()
    class_names = list(class_names)
    records = []
    skipped: dict[str, int] = {}
    images = yolo_image_files(split)
    if images and not any(label_path(image).is_file() for image in images):
        # Each image alone may be background, but a whole split without one label file is
        # almost always labels that are not where Ultralytics' rule looks for them.
        logger.warning(
            "%s: none of its %d images has a label file (the first would be %s); every image "
            "is read as background", split, len(images), label_path(images[0])
        )
    for image_id, image in enumerate(images):
        width, height = _image_size(image)
        labels_file = label_path(image)
        if labels_file.is_file():
            labels, normalised = read_yolo_labels(labels_file, len(class_names))
        else:
            labels, normalised = np.zeros(0, np.int64), np.zeros((0, 4))
        scale = np.array([width, height, width, height], dtype=np.float64)
        centre, size = normalised[:, :2], normalised[:, 2:]
        corners = np.concatenate([centre - size / 2, centre + size / 2], axis=1) * scale
        boxes, keep, counts = clip_boxes_to_image(corners, width, height)
        add_counts(skipped, counts)
        records.append(
            ImageRecord(
                image_id=image_id,
                path=image,
                width=width,
                height=height,
                boxes=boxes[keep],
                labels=labels[keep],
                crowd=np.zeros(int(keep.sum()), dtype=bool),
            )
        )
    log_skipped(split, skipped)
    return DetectionSource(
        records=records,
        class_names=class_names,
        category_ids=list(range(1, len(class_names) + 1)),
        annotation_file=split,
        skipped=skipped,
    )
