"""Convert a data set between COCO and YOLO (Ultralytics) layouts: `convert_data`.

The source is any data.yaml `load_source` reads (COCO, VOC or YOLO); the output is a
self-contained folder with a data.yaml of the target format::

    coco: OUT/data.yaml, OUT/annotations/<split>.json, OUT/images/<split>/...
    yolo: OUT/data.yaml, OUT/images/<split>/..., OUT/labels/<split>/....txt

Images are hard-linked into OUT when the file system allows it (no copy, no extra space),
else copied. Their paths below the split's common image folder are kept, so two images of
the same name in different subfolders stay two images.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import yaml

from ..files import atomic_write_text
from .records import DataError, DetectionSource, ImageRecord
from .sources import SPLITS, load_data_yaml, load_source

TARGETS = ("coco", "yolo")


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def _relative_names(records: list[ImageRecord]) -> list[Path]:
    """Each image's path below the split's common image folder."""
    paths = [record.path.resolve() for record in records]
    common = Path(os.path.commonpath([path.parent for path in paths]))
    return [path.relative_to(common) for path in paths]


def coco_dict(source: DetectionSource, file_names: list[Path]) -> dict:
    """A COCO detection json of ``source``, with these image file names."""
    images, annotations = [], []
    for record, file_name in zip(source.records, file_names, strict=True):
        images.append({"id": record.image_id, "file_name": file_name.as_posix(),
                       "width": record.width, "height": record.height})
        for box, label, crowd in zip(record.boxes, record.labels, record.crowd, strict=True):
            x1, y1, x2, y2 = (float(value) for value in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": record.image_id,
                "category_id": source.category_ids[int(label)],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                "iscrowd": int(crowd),
            })
    categories = [{"id": category_id, "name": name}
                  for category_id, name in zip(source.category_ids, source.class_names,
                                               strict=True)]
    return {"images": images, "annotations": annotations, "categories": categories}


def yolo_lines(record: ImageRecord) -> str:
    """The YOLO label file of one record: ``class cx cy w h`` per box, normalised."""
    scale = np.array([record.width, record.height], dtype=np.float64)
    lines = []
    for box, label in zip(record.boxes.astype(np.float64), record.labels, strict=True):
        centre = (box[:2] + box[2:]) / 2 / scale
        size = (box[2:] - box[:2]) / scale
        lines.append(f"{int(label)} {centre[0]:.8f} {centre[1]:.8f} {size[0]:.8f} {size[1]:.8f}")
    return "".join(line + "\n" for line in lines)


def convert_data(data_yaml: str | Path, out_dir: str | Path, to: str) -> Path:
    """Write the data set of ``data_yaml`` into ``out_dir`` in format ``to`` ("coco" or
    "yolo"); returns the new data.yaml. Both splits are converted when declared (train is
    required). COCO category ids become YOLO class indices 0..C-1 in id order; YOLO classes
    become category ids 1..C. COCO crowd flags are not kept in YOLO (it has none).

    Raises:
        ValueError: an unknown target, or ``out_dir`` exists and is not empty.
        DataError, FileNotFoundError: the source data cannot be read (see `load_source`).
    """
    if to not in TARGETS:
        raise ValueError(f"--to: expected one of {list(TARGETS)}, got {to!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir}: exists and is not an empty folder; choose another OUT")
    config = load_data_yaml(data_yaml)
    if config.format == to:
        raise ValueError(f"{data_yaml}: is already format {to!r}; nothing to convert")
    sources = {split: load_source(config, split) for split in SPLITS
               if getattr(config, split) is not None or split == "train"}
    class_names = sources["train"].class_names
    for split, source in sources.items():
        if source.class_names != class_names:
            raise DataError(f"{data_yaml}: the {split} split's classes {source.class_names} "
                            f"differ from the train split's {class_names}")

    described: dict = {"format": to}
    for split, source in sources.items():
        names = _relative_names(source.records)
        image_dir = out_dir / "images" / split
        for record, name in zip(source.records, names, strict=True):
            _link_or_copy(record.path, image_dir / name)
        if to == "coco":
            annotation_file = out_dir / "annotations" / f"{split}.json"
            annotation_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(annotation_file, json.dumps(coco_dict(source, names)))
            described[split] = f"annotations/{split}.json"
            described[f"{split}_images"] = f"images/{split}"
        else:
            for record, name in zip(source.records, names, strict=True):
                label_file = (out_dir / "labels" / split / name).with_suffix(".txt")
                label_file.parent.mkdir(parents=True, exist_ok=True)
                label_file.write_text(yolo_lines(record), encoding="utf-8")
            described[split] = f"images/{split}"
    if to == "yolo":
        described = {"format": "yolo", "path": ".", **{k: v for k, v in described.items()
                                                       if k != "format"},
                     "names": dict(enumerate(class_names))}
    data_file = out_dir / "data.yaml"
    atomic_write_text(data_file, yaml.safe_dump(described, sort_keys=False))
    return data_file
