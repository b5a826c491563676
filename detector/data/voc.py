"""Pascal VOC xml annotations -> `DetectionSource`.

A split is either an image-set file (VOC's `ImageSets/Main/train.txt`: one image id per line,
each naming `<annotation_dir>/<id>.xml`) or a folder of xml files (what labelImg and most
annotation tools write). Each xml holds `<filename>`, `<size>` and `<object>` entries with a
`<name>`, an optional `<difficult>` flag and a `<bndbox>`.
"""

from __future__ import annotations

import difflib
import math
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable
from dataclasses import dataclass
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

VOC_CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# How close (difflib ratio) a name must be to a VOC class to be taken for a typo of it:
# "persn" vs "person" is 0.91, "Person" 0.83, "cat" vs "car" 0.67 (two real classes).
TYPO_CUTOFF = 0.8

# Tried in this order when an xml's <filename> is missing or names no existing file.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass
class VocObject:
    """One `<object>` of a VOC xml file."""

    name: str
    box: tuple[float, float, float, float]
    """x1, y1, x2, y2 in continuous 0-based image-pixel coordinates (already converted)."""
    difficult: bool


@dataclass
class VocAnnotation:
    """The parts of one VOC xml file that detection needs."""

    xml_file: Path
    filename: str | None
    """The `<filename>` entry, or None when the file has none."""
    width: int | None
    """`<size><width>`, or None when missing or zero (some tools write 0)."""
    height: int | None
    """`<size><height>`, or None when missing or zero."""
    objects: list[VocObject]


def _text(element: ElementTree.Element, tag: str) -> str | None:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return None
    return child.text.strip()


def _number(text: str | None, what: str, xml_file: Path) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DataError(f"{xml_file}: {what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{xml_file}: {what} must be a finite number, got {text!r}")
    return value


def parse_voc_xml(xml_file: str | Path) -> VocAnnotation:
    """Read one VOC xml file.

    VOC coordinates are 1-based pixel indices, inclusive at both ends: a box with xmin=1 and
    xmax=W covers the whole width of the image. In the continuous 0-based frame of the records
    (see records.py) that box is [0, W], so x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax.
    This is the conversion Detectron2's `load_voc_instances` uses.

    Raises:
        DataError: the file is not xml, its root is not `<annotation>`, or an object lacks a
            name or a complete numeric `<bndbox>` (the message names the file and object).
    """
    xml_file = Path(xml_file)
    try:
        root = ElementTree.parse(xml_file).getroot()
    except ElementTree.ParseError as error:
        raise DataError(f"{xml_file}: not a valid xml file ({error})") from None
    if root.tag != "annotation":
        raise DataError(
            f"{xml_file}: not a Pascal VOC annotation: root element is <{root.tag}>, "
            f"expected <annotation>"
        )
    size = root.find("size")
    sizes = {}
    for key in ("width", "height"):
        text = _text(size, key) if size is not None else None
        value = _number(text, f"<size><{key}>", xml_file) if text is not None else 0
        sizes[key] = int(value) if value > 0 else None

    objects = []
    for position, element in enumerate(root.findall("object")):
        name = _text(element, "name")
        if name is None:
            raise DataError(f"{xml_file}: object {position} has no <name>")
        where = f"object {position} ({name})"
        difficult_text = _text(element, "difficult")
        difficult = (
            difficult_text is not None
            and _number(difficult_text, f"{where} <difficult>", xml_file) != 0
        )
        bndbox = element.find("bndbox")
        if bndbox is None:
            raise DataError(f"{xml_file}: {where} has no <bndbox>")
        xmin, ymin, xmax, ymax = (
            _number(_text(bndbox, key), f"{where} <bndbox><{key}>", xml_file)
            for key in ("xmin", "ymin", "xmax", "ymax")
        )
        objects.append(VocObject(name, (xmin - 1, ymin - 1, xmax, ymax), difficult))
    return VocAnnotation(
        xml_file=xml_file,
        filename=_text(root, "filename"),
        width=sizes["width"],
        height=sizes["height"],
        objects=objects,
    )


def _voc_layout_root(image_set_file: Path) -> Path | None:
    """`<root>` when the file sits in VOC's `<root>/ImageSets/<task>/` layout, else None."""
    if image_set_file.parent.parent.name == "ImageSets":
        return image_set_file.parent.parent.parent
    return None


def voc_xml_files(root_or_list: str | Path, annotation_dir: str | Path | None = None) -> list[Path]:
    """The xml files of one split.

    Args:
        root_or_list: a folder of xml files (all `*.xml` in it, sorted by name), or an
            image-set text file with one image id per line (extra columns, as in VOC's
            per-class files, are ignored).
        annotation_dir: folder of `<id>.xml` files for an image-set file. When None and the
            file is in VOC's `<root>/ImageSets/Main/` layout, `<root>/Annotations` is used.

    Raises:
        FileNotFoundError: the folder, the image-set file or listed xml files are missing.
        DataError: an image-set file without an annotation folder that can be found.
    """
    root_or_list = Path(root_or_list).expanduser().resolve()
    if root_or_list.is_dir():
        return sorted(root_or_list.glob("*.xml"))
    if not root_or_list.is_file():
        raise FileNotFoundError(f"VOC image-set file or xml folder not found: {root_or_list}")
    if annotation_dir is None:
        layout_root = _voc_layout_root(root_or_list)
        if layout_root is None:
            raise DataError(
                f"{root_or_list}: an image-set file needs the folder of its xml files "
                f"(annotation_dir / data.annotations)"
            )
        annotation_dir = layout_root / "Annotations"
    annotation_dir = Path(annotation_dir).expanduser().resolve()
    if not annotation_dir.is_dir():
        raise FileNotFoundError(f"VOC annotation folder not found: {annotation_dir}")
    image_ids = []
    for line in root_or_list.read_text(encoding="utf-8").splitlines():
        if line.strip():
            image_ids.append(line.split()[0])
    xml_files = [annotation_dir / f"{image_id}.xml" for image_id in image_ids]
    missing = [path.name for path in xml_files if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(xml_files)} ids listed in {root_or_list} have no xml file "
            f"in {annotation_dir}, e.g. {', '.join(missing[:3])}"
        )
    return xml_files


def default_class_names(names_found: Iterable[str]) -> list[str]:
    """The 20 VOC classes in their usual order when every name found is one of them (so a
    subset of VOC still gets VOC's indices), else the sorted set of names found."""
    names_found = set(names_found)
    if names_found <= set(VOC_CLASS_NAMES):
        return list(VOC_CLASS_NAMES)
    return sorted(names_found)


def class_names_found(annotations: Iterable[VocAnnotation]) -> list[str]:
    """`default_class_names` of the objects in ``annotations``, difficult ones included (so
    `use_difficult` never changes the class list), after refusing likely typos.

    Raises:
        DataError: a name that is not a VOC class but close to one (e.g. "persn", "Person")
            among files that otherwise use VOC's names: it would silently become a class of
            its own. The message names the xml file, the object and the known classes.
    """
    first_seen: dict[str, tuple[Path, int]] = {}
    for annotation in annotations:
        for position, voc_object in enumerate(annotation.objects):
            first_seen.setdefault(voc_object.name, (annotation.xml_file, position))
    others = [name for name in first_seen if name not in VOC_CLASS_NAMES]
    if others and len(others) < len(first_seen):
        for name in others:
            close = difflib.get_close_matches(name, VOC_CLASS_NAMES, n=1, cutoff=TYPO_CUTOFF)
            if close:
                xml_file, position = first_seen[name]
                raise DataError(
                    f"{xml_file}: object {position} is a {name!r}, not one of the VOC classes "
                    f"(did you mean {close[0]!r}?). Known classes: {list(VOC_CLASS_NAMES)}. If "
                    f"{name!r} is a class of its own, list every class in data.class_names"
                )
    return default_class_names(first_seen)


def read_voc_class_names(xml_files: Iterable[str | Path]) -> list[str]:
    """Class names of a set of xml files (`class_names_found`). Give it the files of every
    split, so train and val get the same indices."""
    return class_names_found(parse_voc_xml(xml_file) for xml_file in xml_files)


def _image_path(annotation: VocAnnotation, image_dir: Path) -> tuple[Path, bool]:
    """(path, exists): the xml's <filename> in image_dir, else `<xml stem>.<extension>`."""
    candidates = []
    if annotation.filename is not None:
        candidates.append(image_dir / annotation.filename)
    candidates += [image_dir / f"{annotation.xml_file.stem}{ext}" for ext in IMAGE_EXTENSIONS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate, True
    return candidates[0], False


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image file's header, for xml files without a usable <size>."""
    from PIL import Image  # only needed for such files

    with Image.open(path) as image:
        return image.size


def load_voc(
    root_or_list: str | Path,
    image_dir: str | Path | None = None,
    annotation_dir: str | Path | None = None,
    class_names: list[str] | None = None,
    use_difficult: bool = False,
    *,
    check_images: bool = True,
) -> DetectionSource:
    """Load a Pascal VOC split.

    Args:
        root_or_list: an image-set text file of ids or a folder of xml files (see
            `voc_xml_files`).
        image_dir: folder of the image files. When None: `<root>/JPEGImages` for an
            image-set file in VOC's `<root>/ImageSets/Main/` layout, else the xml folder
            itself (labelImg keeps images and xml side by side).
        annotation_dir: folder of `<id>.xml` files, used only with an image-set file (see
            `voc_xml_files` for its default).
        class_names: class index -> name. When None, the names are read from the files
            (`default_class_names`); pass the same list to every split, e.g. from
            `read_voc_class_names` over all of them, so train and val share indices.
        use_difficult: keep objects marked `<difficult>1</difficult>`; by default they are
            dropped (counted as "difficult"), as in VOC training practice.
        check_images: check that every image file exists.

    Records get `image_id` = their running index (0, 1, ...) in the split and category ids
    1..C. Boxes are converted from VOC's 1-based inclusive indices (see `parse_voc_xml`); boxes
    with zero or negative size, or entirely outside the image, are skipped and counted;
    boxes partly outside are clipped to the image.

    Raises:
        FileNotFoundError: missing folders, image-set file, xml or image files.
        DataError: unparseable xml (naming the file), or an object whose name is not in an
            explicit `class_names`.
    """
    xml_files = voc_xml_files(root_or_list, annotation_dir)
    root_or_list = Path(root_or_list).expanduser().resolve()
    if image_dir is None:
        layout_root = None if root_or_list.is_dir() else _voc_layout_root(root_or_list)
        image_dir = layout_root / "JPEGImages" if layout_root is not None else root_or_list
    image_dir = Path(image_dir).expanduser().resolve()
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir} (for {root_or_list})")

    annotations = [parse_voc_xml(xml_file) for xml_file in xml_files]
    if class_names is None:
        class_names = class_names_found(annotations)
    class_names = list(class_names)
    label_of_name = {name: label for label, name in enumerate(class_names)}

    records = []
    skipped: dict[str, int] = {}
    missing_files = []
    for image_id, annotation in enumerate(annotations):
        path, exists = _image_path(annotation, image_dir)
        if not exists and check_images:
            missing_files.append(path.name)
            continue
        width, height = annotation.width, annotation.height
        if width is None or height is None:
            if not exists:
                raise DataError(
                    f"{annotation.xml_file}: no usable <size> and no image file to read it from"
                )
            width, height = _image_size(path)
        objects = annotation.objects
        for position, voc_object in enumerate(objects):
            if voc_object.name not in label_of_name:
                raise DataError(
                    f"{annotation.xml_file}: object {position} is a {voc_object.name!r}, "
                    f"which is not in class_names {class_names}"
                )
        if not use_difficult:
            add_counts(skipped, {"difficult": sum(obj.difficult for obj in objects)})
            objects = [obj for obj in objects if not obj.difficult]
        boxes, keep, counts = clip_boxes_to_image(
            np.array([obj.box for obj in objects], dtype=np.float64), width, height
        )
        add_counts(skipped, counts)
        labels = np.array([label_of_name[obj.name] for obj in objects], dtype=np.int64)
        records.append(
            ImageRecord(
                image_id=image_id,
                path=path,
                width=width,
                height=height,
                boxes=boxes[keep],
                labels=labels[keep],
                crowd=np.zeros(int(keep.sum()), dtype=bool),
            )
        )
    if missing_files:
        raise FileNotFoundError(
            f"{len(missing_files)} of {len(annotations)} images of {root_or_list} are missing "
            f"from {image_dir}, e.g. {', '.join(missing_files[:3])}"
        )
    log_skipped(root_or_list, skipped)
    return DetectionSource(
        records=records,
        class_names=class_names,
        category_ids=list(range(1, len(class_names) + 1)),
        annotation_file=root_or_list,
        skipped=skipped,
    )
