"""The data declaration: a few lines of YAML that say where a dataset lives.

A COCO-format dataset (what `ctprune make-data` writes, and what most tools export)::

    format: coco
    train: annotations/train.json
    val: annotations/val.json
    train_images: images/train
    val_images: images/val

A Pascal VOC devkit (image and annotation folders follow from VOC's layout)::

    format: voc
    train: VOCdevkit/VOC2007/ImageSets/Main/trainval.txt
    val: VOCdevkit/VOC2007/ImageSets/Main/test.txt

An Ultralytics (YOLO) data.yaml with one line added, ``format: yolo``; ``path`` is the data
root (relative to the YAML file's folder), ``train``/``val`` image folders or text lists of
image paths below it, ``names`` a list or an ``{index: name}`` mapping; labels are found by
Ultralytics' ``/images/`` -> ``/labels/`` rule (see `detector/data/yolo.py`)::

    format: yolo
    path: ../datasets/coco8
    train: images/train
    val: images/val
    names: {0: person, 1: bicycle}

Relative paths are resolved against the YAML file's folder. `load_data_yaml` reads such a file
into a `DataConfig`; `load_source(config, "train")` turns it into a `DetectionSource`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import read_yaml_text
from .coco import CROWD_MODES, load_coco
from .records import DataError, DetectionSource
from .voc import load_voc, read_voc_class_names, voc_xml_files
from .yolo import class_names_from_yolo, load_yolo

FORMATS = ("coco", "voc", "yolo")
ULTRALYTICS_KEYS = ("path", "names", "nc", "test", "download")
"""Keys of an Ultralytics data.yaml that `load_data_yaml` takes with ``format: yolo``: ``path``
becomes `DataConfig.root`, ``names`` `DataConfig.class_names`; ``nc`` is checked against the
names; ``test`` and ``download`` are not used."""
SPLITS = ("train", "val")
PATH_FIELDS = ("train", "val", "train_images", "val_images", "images", "annotations", "root")


@dataclass
class DataConfig:
    """Where a dataset lives: the `data` section of a recipe, or a `data.yaml` file."""

    format: str = "coco"
    """Annotation format: "coco" (one json per split), "voc" (Pascal VOC xml files) or "yolo"
    (Ultralytics txt labels beside an images folder)."""
    train: str | None = None
    """Training split: a COCO json; for VOC an image-set file of ids (`ImageSets/Main/
    train.txt`) or a folder of xml files; for YOLO a folder of images or a text file listing
    image paths."""
    val: str | None = None
    """Validation split, in the same form as `train`."""
    train_images: str | None = None
    """Folder of the training images; falls back to `images` when not given."""
    val_images: str | None = None
    """Folder of the validation images; falls back to `images` when not given."""
    images: str | None = None
    """Image folder shared by both splits, used when the per-split folder is not given. For VOC
    it may be left out: `<root>/JPEGImages` in VOC's layout, else the xml folder itself."""
    annotations: str | None = None
    """VOC only: folder of the `<id>.xml` files named by an image-set file; may be left out in
    VOC's layout (`<root>/Annotations`)."""
    class_names: list[str] | None = None
    """VOC and YOLO: class index -> name. Required for YOLO (an Ultralytics data.yaml's
    ``names``). For VOC, when not given, the names are read from the xml files of both splits:
    the 20 VOC classes if every name is one of them, else the sorted names found. (COCO's names
    always come from the json's categories.)"""
    crowd: str = "train"
    """COCO `iscrowd` boxes: "train" them as ordinary objects (the original CenterNet), or
    "ignore" them (dropped; CenterNet has no ignore regions, so they become background)."""
    root: str | None = None
    """Folder that relative paths are resolved against. `load_data_yaml` sets it to the YAML
    file's folder (a relative `root` in the file is taken relative to that folder); None means
    the current working directory."""

    def __post_init__(self) -> None:
        if not isinstance(self.format, str) or self.format not in FORMATS:
            raise DataError(
                f"data.format: expected one of {list(FORMATS)}, got {self.format!r}"
            )
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise DataError(f"data.{name}: expected a path (a string), got {value!r}")
            setattr(self, name, value)
        if self.class_names is not None:
            if not isinstance(self.class_names, (list, tuple)) or not self.class_names:
                raise DataError(
                    f"data.class_names: expected a non-empty list of names, got "
                    f"{self.class_names!r}"
                )
            for name in self.class_names:
                if not isinstance(name, str) or not name.strip():
                    raise DataError(f"data.class_names: expected names (strings), got {name!r}")
            duplicates = sorted(
                {name for name in self.class_names if self.class_names.count(name) > 1}
            )
            if duplicates:
                raise DataError(f"data.class_names: names listed more than once: {duplicates}")
            if self.format == "coco":
                raise DataError(
                    "data.class_names: only used with formats 'voc' and 'yolo'; COCO class "
                    "names come from the json's categories"
                )
            self.class_names = list(self.class_names)
        if not isinstance(self.crowd, str) or self.crowd not in CROWD_MODES:
            raise DataError(f"data.crowd: expected 'train' or 'ignore', got {self.crowd!r}")

    @classmethod
    def from_dict(cls, values: dict) -> DataConfig:
        """Build from a parsed YAML mapping; unknown keys raise with their name."""
        if not isinstance(values, dict):
            raise DataError(f"data: expected a mapping of keys to values, got {values!r}")
        known = [field.name for field in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                raise DataError(f"data.{key}: unknown key; known keys: {known}")
        return cls(**values)

    def to_dict(self) -> dict:
        """Plain types, for writing the resolved recipe into a run folder."""
        return dataclasses.asdict(self)


def load_data_yaml(path: str | Path) -> DataConfig:
    """Read a `data.yaml` (a flat mapping of `DataConfig` keys), strictly.

    `root` is set to the file's folder, so the paths in the file are relative to it.

    Raises:
        FileNotFoundError: the file is missing.
        DataError: not YAML, not a mapping, an unknown key or a wrong value (naming the key).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        values = yaml.safe_load(read_yaml_text(path))  # a binary or non-UTF-8 file is named
    except yaml.YAMLError as error:
        raise DataError(f"{path}: not a valid YAML file ({error})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise DataError(f"{path}: expected a mapping of data keys, got {type(values).__name__}")
    values = dict(values)
    if values.get("format") == "yolo":
        values = _from_ultralytics(values, path)
    elif "names" in values:
        raise DataError(
            f"{path}: 'names' is a key of an Ultralytics (YOLO) data.yaml; add `format: yolo` "
            f"to read it as one (format is {values.get('format', 'coco')!r})"
        )
    root = values.get("root")
    if root is None:
        values["root"] = str(path.parent)
    elif isinstance(root, str):
        values["root"] = str((path.parent / Path(root).expanduser()).resolve())
    try:
        return DataConfig.from_dict(values)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None


def _from_ultralytics(values: dict, path: Path) -> dict:
    """An Ultralytics data.yaml's keys as `DataConfig` keys (see `ULTRALYTICS_KEYS`)."""
    values = dict(values)
    if "path" in values:
        if "root" in values:
            raise DataError(f"{path}: give 'path' (Ultralytics) or 'root', not both")
        values["root"] = values.pop("path")
    if "names" in values:
        if "class_names" in values:
            raise DataError(f"{path}: give 'names' (Ultralytics) or 'class_names', not both")
        values["class_names"] = class_names_from_yolo(values.pop("names"), f"{path}: names")
    count = values.pop("nc", None)
    if count is not None and count != len(values.get("class_names") or []):
        raise DataError(
            f"{path}: nc is {count!r} but names lists {len(values.get('class_names') or [])} "
            "classes"
        )
    values.pop("test", None)
    values.pop("download", None)
    return values


def resolve_path(config: DataConfig, key: str) -> Path | None:
    """The absolute path that `config.<key>` names (None when the key is not set); relative
    paths are taken relative to `config.root`, else to the current working directory."""
    value = getattr(config, key)
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (Path(config.root).expanduser() if config.root else Path.cwd()) / path
    return path.resolve()


def _existing_path(config: DataConfig, key: str) -> Path | None:
    path = resolve_path(config, key)
    if path is not None and not path.exists():
        raise FileNotFoundError(f"data.{key}: {path} does not exist")
    return path


def load_source(config: DataConfig, split: str) -> DetectionSource:
    """Load the "train" or "val" split that `config` declares.

    Raises:
        FileNotFoundError: a declared path does not exist (naming the key and the path).
        DataError: the split or its image folder is not declared, the split holds no images,
            or the annotation files are malformed (naming the file).
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    annotation_path = _existing_path(config, split)
    if annotation_path is None:
        raise DataError(f"data.{split}: not set; it should name the {split} annotations")
    image_key = f"{split}_images" if getattr(config, f"{split}_images") is not None else "images"
    image_dir = _existing_path(config, image_key)

    if config.format == "coco":
        if image_dir is None:
            raise DataError(
                f"data.{split}_images: not set (nor data.images); it should name the folder "
                f"of the {split} images"
            )
        source = load_coco(annotation_path, image_dir, crowd=config.crowd)
    elif config.format == "yolo":
        if config.class_names is None:
            raise DataError(
                "data.class_names: not set; a YOLO data set needs its class names (an "
                "Ultralytics data.yaml's 'names')"
            )
        source = load_yolo(annotation_path, config.class_names)
    else:
        annotation_dir = _existing_path(config, "annotations")
        class_names = config.class_names
        if class_names is None:
            # Read the names from every declared split, so train and val share indices.
            xml_files = []
            for name in SPLITS:
                split_path = _existing_path(config, name)
                if split_path is not None:
                    xml_files += voc_xml_files(split_path, annotation_dir)
            class_names = read_voc_class_names(xml_files)
        source = load_voc(annotation_path, image_dir, annotation_dir, class_names=class_names)

    if not source.records:
        raise DataError(f"data.{split}: {annotation_path} holds no images")
    return source


class DataWarning(UserWarning):
    """Data that can be used but probably not as meant (e.g. a class with boxes in one split
    only); the message names the classes and the files."""


def boxes_per_class(source: DetectionSource) -> list[int]:
    """How many boxes each class has in ``source``, by class index."""
    counts = [0] * source.num_classes
    for record in source.records:
        for label in record.labels:
            counts[int(label)] += 1
    return counts


def check_split_classes(train: DetectionSource, val: DetectionSource) -> None:
    """Check the splits share one class list, and warn about classes with boxes in one split.

    Classes with training boxes but none in val: their AP is not measured (`DataWarning`).
    Classes with val boxes but no training boxes: the model never learns them, so their AP is
    0 and pulls the mean down (`DataWarning`, worded as such). A warning rather than an error:
    a small or freshly split dataset can lack a class in one split on purpose (a smoke test, a
    held-out class), and the run is still meaningful; the warning says which.

    Raises:
        DataError: the splits' class names or category ids differ (class indices would mean
            different classes in training and evaluation).
    """
    if train.class_names != val.class_names or train.category_ids != val.category_ids:
        raise DataError(
            f"the train split ({train.annotation_file}) and the val split "
            f"({val.annotation_file}) have different classes: {_id_names(train)} vs "
            f"{_id_names(val)} (category id, name); both splits "
            "need the same categories in the same order"
        )
    train_counts, val_counts = boxes_per_class(train), boxes_per_class(val)
    names = train.class_names
    pairs = list(zip(names, train_counts, val_counts, strict=True))
    train_only = [name for name, in_train, in_val in pairs if in_train and not in_val]
    val_only = [name for name, in_train, in_val in pairs if in_val and not in_train]
    if val_only:
        warnings.warn(
            f"classes with boxes in the val split ({val.annotation_file}) but none in the train "
            f"split ({train.annotation_file}): {val_only}; the model cannot learn them, so "
            "their AP is 0 and lowers the mean AP",
            DataWarning,
            stacklevel=2,
        )
    if train_only:
        warnings.warn(
            f"classes with boxes in the train split ({train.annotation_file}) but none in the "
            f"val split ({val.annotation_file}): {train_only}; their AP is not measured",
            DataWarning,
            stacklevel=2,
        )


def _id_names(source: DetectionSource) -> list[tuple[int, str]]:
    return list(zip(source.category_ids, source.class_names, strict=True))


def load_splits(config: DataConfig) -> tuple[DetectionSource, DetectionSource | None]:
    """The train split and the val split (None when ``config.val`` is not set), loaded with
    `load_source` and checked together by `check_split_classes`."""
    train = load_source(config, "train")
    if config.val is None:
        return train, None
    val = load_source(config, "val")
    check_split_classes(train, val)
    return train, val


def to_category_id(source: DetectionSource, label: int) -> int:
    """The dataset's category id of contiguous class index `label`, for results files
    (e.g. COCO label 0 -> category id 1, label 79 -> 90)."""
    label = int(label)
    if not 0 <= label < len(source.category_ids):
        raise ValueError(
            f"label {label} is out of range for {len(source.category_ids)} classes "
            f"(expected 0..{len(source.category_ids) - 1})"
        )
    return source.category_ids[label]
