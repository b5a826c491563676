"""Dataset sources: COCO json, Pascal VOC xml, the data YAML and the COCO split tool."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from detector.data.coco import load_coco
from detector.data.records import DataError, ImageRecord, clip_boxes_to_image
from detector.data.sources import DataConfig, load_data_yaml, load_source, to_category_id
from detector.data.split import split_coco
from detector.data.voc import VOC_CLASS_NAMES, load_voc, parse_voc_xml

# ---------------------------------------------------------------- helpers


def write_coco(path: Path, images, annotations, categories, image_dir: Path | None = None) -> Path:
    """Write a COCO json and, when image_dir is given, an empty file per image (loading
    records checks that the files exist but never reads pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    if image_dir is not None:
        image_dir.mkdir(parents=True, exist_ok=True)
        for image in images:
            (image_dir / image["file_name"]).write_bytes(b"")
    return path


def coco_image(image_id: int, width: int = 100, height: int = 80) -> dict:
    return {"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": width, "height": height}


def coco_annotation(annotation_id, image_id, category_id, bbox, iscrowd=0) -> dict:
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "iscrowd": iscrowd,
    }


def voc_xml(filename, width, height, objects) -> str:
    """objects: (name, (xmin, ymin, xmax, ymax), difficult) in VOC's 1-based pixel indices."""
    parts = [
        "<annotation>",
        f"<filename>{filename}</filename>",
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
    ]
    for name, (xmin, ymin, xmax, ymax), difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
            f"<xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax>"
            f"</bndbox></object>"
        )
    parts.append("</annotation>")
    return "\n".join(parts)


def write_voc_devkit(root: Path, splits: dict[str, dict[str, list]], size=(500, 375)) -> Path:
    """A VOCdevkit-style folder: Annotations/<id>.xml, JPEGImages/<id>.jpg (empty files) and
    ImageSets/Main/<split>.txt. splits: split -> image id -> objects."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for split, images in splits.items():
        for image_id, objects in images.items():
            xml = voc_xml(f"{image_id}.jpg", size[0], size[1], objects)
            (root / "Annotations" / f"{image_id}.xml").write_text(xml)
            (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"")
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return root


# ---------------------------------------------------------------- records


def clip_reference(box, width, height):
    """Per-box reference: (reason or None, clipped box)."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return "zero_size_box", None
    clipped = [min(max(x1, 0), width), min(max(y1, 0), height),
               min(max(x2, 0), width), min(max(y2, 0), height)]  # fmt: skip
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return "box_outside_image", None
    return None, clipped


def test_clip_boxes_matches_per_box_reference():
    random = np.random.default_rng(0)
    width, height = 64, 48
    corners = random.uniform(-40, 110, size=(500, 2, 2))
    boxes = np.concatenate([corners.min(1), corners.max(1)], axis=1)
    boxes[:50, 2] = boxes[:50, 0]  # zero width
    boxes[50:60, 3] = boxes[50:60, 1] - 1  # negative height
    clipped, keep, counts = clip_boxes_to_image(boxes, width, height)
    expected_counts = {"zero_size_box": 0, "box_outside_image": 0}
    for row, box in enumerate(boxes):
        reason, expected = clip_reference(box.tolist(), width, height)
        assert keep[row] == (reason is None)
        if reason is None:
            np.testing.assert_allclose(clipped[row], expected, rtol=0, atol=1e-4)
        else:
            expected_counts[reason] += 1
    assert counts == expected_counts
    assert expected_counts["zero_size_box"] >= 60 and expected_counts["box_outside_image"] > 0


def test_image_record_normalises_dtypes_and_checks_lengths():
    record = ImageRecord(1, "a.jpg", 10, 10, [[0, 0, 1, 1]], [0], [False])
    assert record.boxes.dtype == np.float32 and record.boxes.shape == (1, 4)
    assert record.labels.dtype == np.int64 and record.crowd.dtype == bool
    assert isinstance(record.path, Path)
    empty = ImageRecord(2, "b.jpg", 10, 10, np.zeros((0, 4)), [], [])
    assert empty.boxes.shape == (0, 4)
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        ImageRecord(3, "c.jpg", 10, 10, np.zeros((2, 4)), [0], [False, False])


# ---------------------------------------------------------------- COCO


@pytest.fixture
def coco_files(tmp_path):
    """Category ids 90, 3 and 18 (gaps, unsorted); image 2 has no boxes; image 3 has a crowd box."""
    categories = [
        {"id": 90, "name": "toothbrush"},
        {"id": 3, "name": "car"},
        {"id": 18, "name": "dog"},
    ]
    images = [coco_image(1), coco_image(2), coco_image(3)]
    annotations = [  # the images' annotations interleaved, as files may have them
        coco_annotation(10, 1, 3, [10, 20, 30, 40]),
        coco_annotation(12, 3, 18, [50, 10, 20, 20]),
        coco_annotation(11, 1, 90, [0, 0, 5, 5]),
        coco_annotation(13, 3, 3, [5, 5, 40, 40], iscrowd=1),
    ]
    image_dir = tmp_path / "images"
    annotation_file = write_coco(
        tmp_path / "instances.json", images, annotations, categories, image_dir
    )
    return annotation_file, image_dir, annotations


def test_coco_category_gaps_map_to_contiguous_indices_and_back(coco_files):
    annotation_file, image_dir, annotations = coco_files
    source = load_coco(annotation_file, image_dir)
    assert source.category_ids == [3, 18, 90]
    assert source.class_names == ["car", "dog", "toothbrush"]
    assert source.annotation_file == annotation_file.resolve()
    loaded_category_ids = [
        to_category_id(source, label) for record in source.records for label in record.labels
    ]
    # Records list each image's boxes in file order: annotations 10, 11 (image 1), 12, 13.
    by_image = sorted(annotations, key=lambda annotation: annotation["image_id"])
    assert loaded_category_ids == [annotation["category_id"] for annotation in by_image]
    with pytest.raises(ValueError, match="label 3 is out of range for 3 classes"):
        to_category_id(source, 3)


def test_coco_boxes_become_corners_and_records_keep_file_order(coco_files):
    annotation_file, image_dir, _ = coco_files
    source = load_coco(annotation_file, image_dir)
    assert [record.image_id for record in source.records] == [1, 2, 3]
    first = source.records[0]
    assert first.path == (image_dir / "000001.jpg").resolve() and first.path.is_absolute()
    assert (first.width, first.height) == (100, 80)
    # [x, y, w, h] = [10, 20, 30, 40] -> x1, y1, x2, y2 = 10, 20, 40, 60
    np.testing.assert_array_equal(first.boxes, [[10, 20, 40, 60], [0, 0, 5, 5]])
    assert first.boxes.dtype == np.float32 and first.labels.dtype == np.int64
    np.testing.assert_array_equal(first.labels, [0, 2])


def test_coco_images_without_boxes_are_kept(coco_files):
    annotation_file, image_dir, _ = coco_files
    empty = load_coco(annotation_file, image_dir).records[1]
    assert empty.image_id == 2
    assert empty.boxes.shape == (0, 4) and empty.boxes.dtype == np.float32
    assert empty.labels.shape == (0,) and empty.crowd.shape == (0,)


def test_coco_crowd_trained_by_default_and_dropped_with_ignore(coco_files):
    annotation_file, image_dir, _ = coco_files
    trained = load_coco(annotation_file, image_dir).records[2]
    np.testing.assert_array_equal(trained.crowd, [False, True])
    np.testing.assert_array_equal(trained.boxes[1], [5, 5, 45, 45])

    ignored_source = load_coco(annotation_file, image_dir, crowd="ignore")
    ignored = ignored_source.records[2]
    np.testing.assert_array_equal(ignored.crowd, [False])
    np.testing.assert_array_equal(ignored.labels, [1])
    assert ignored_source.skipped == {"crowd_ignored": 1}
    with pytest.raises(ValueError, match="crowd: expected 'train' or 'ignore', got 'skip'"):
        load_coco(annotation_file, image_dir, crowd="skip")


def test_coco_bad_boxes_skipped_counted_logged_once_and_partial_boxes_clipped(tmp_path, caplog):
    images = [coco_image(1, width=100, height=80), coco_image(2, width=50, height=40)]
    annotations = [
        coco_annotation(6, 2, 1, [40, 30, 20, 20]),  # clipped to its own image's size
        coco_annotation(1, 1, 1, [10, 10, 0, 5]),  # zero width
        coco_annotation(2, 1, 1, [10, 10, 5, -3]),  # negative height
        coco_annotation(3, 1, 1, [100, 10, 5, 5]),  # starts at the right edge: nothing inside
        coco_annotation(4, 1, 1, [-20, -10, 200, 25]),  # partly outside: clipped
        coco_annotation(5, 1, 1, [90, 70, 20, 20]),  # partly outside: clipped
    ]
    categories = [{"id": 1, "name": "thing"}]
    annotation_file = write_coco(
        tmp_path / "a.json", images, annotations, categories, tmp_path / "images"
    )
    with caplog.at_level(logging.INFO, logger="detector.data"):
        source = load_coco(annotation_file, tmp_path / "images")
    assert source.skipped == {"zero_size_box": 2, "box_outside_image": 1}
    np.testing.assert_array_equal(source.records[0].boxes, [[0, 0, 100, 15], [90, 70, 100, 80]])
    np.testing.assert_array_equal(source.records[1].boxes, [[40, 30, 50, 40]])
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "zero_size_box" in warnings[0].getMessage() and "a.json" in warnings[0].getMessage()


def test_coco_unknown_category_names_annotation_and_category(tmp_path):
    annotation_file = write_coco(
        tmp_path / "a.json",
        [coco_image(1)],
        [coco_annotation(77, 1, 5, [0, 0, 1, 1])],
        [{"id": 1, "name": "thing"}],
        tmp_path / "images",
    )
    with pytest.raises(DataError, match="annotation 77 has category_id 5") as error:
        load_coco(annotation_file, tmp_path / "images")
    assert "a.json" in str(error.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"images": [], "categories": []}, r"missing key\(s\) \['annotations'\]"),
        ([1, 2], "expected a json object"),
        ({"images": {}, "annotations": [], "categories": []}, "'images' must be a list"),
    ],
)
def test_coco_not_coco_json_names_the_file(tmp_path, content, message):
    annotation_file = tmp_path / "labels.json"
    annotation_file.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message) as error:
        load_coco(annotation_file, tmp_path)
    assert "labels.json" in str(error.value)


def test_coco_unreadable_or_missing_files_raise_clear_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="broken.json: not a valid json file"):
        load_coco(broken, tmp_path)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        load_coco(tmp_path / "absent.json", tmp_path)
    annotation_file = write_coco(tmp_path / "a.json", [coco_image(1), coco_image(2)], [], [])
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_coco(annotation_file, tmp_path / "no_images")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "000001.jpg").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="1 of 2 images .* e.g. 000002.jpg"):
        load_coco(annotation_file, tmp_path / "images")
    assert len(load_coco(annotation_file, tmp_path / "images", check_images=False).records) == 2


@pytest.mark.parametrize(
    "image, annotation, message",
    [
        (coco_image(1, width=0), None, "image 1: 'width' must be a positive integer"),
        (coco_image(1), coco_annotation(5, 1, 1, [0, 0, 1]), "annotation 5: 'bbox' must be"),
        (coco_image(1), coco_annotation(6, 9, 1, [0, 0, 1, 1]), "annotation 6 refers to image"),
    ],
)
def test_coco_malformed_entries_are_named(tmp_path, image, annotation, message):
    annotation_file = write_coco(
        tmp_path / "a.json", [image], [annotation] if annotation else [],
        [{"id": 1, "name": "thing"}], tmp_path / "images",
    )  # fmt: skip
    with pytest.raises(DataError, match=message):
        load_coco(annotation_file, tmp_path / "images")


def test_coco_loading_prints_nothing(coco_files, capsys):
    annotation_file, image_dir, _ = coco_files
    load_coco(annotation_file, image_dir)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- VOC


def test_voc_one_based_inclusive_indices_become_continuous_zero_based(tmp_path):
    xml_file = tmp_path / "000001.xml"
    objects = [("dog", (1, 1, 500, 375), 0), ("cat", (48, 240, 195, 371), 0)]
    xml_file.write_text(voc_xml("000001.jpg", 500, 375, objects))
    annotation = parse_voc_xml(xml_file)
    # A box from pixel 1 to pixel W (inclusive) covers the whole image: [0, W] continuous.
    assert annotation.objects[0].box == (0, 0, 500, 375)
    assert annotation.objects[1].box == (47, 239, 195, 371)
    assert (annotation.width, annotation.height, annotation.filename) == (500, 375, "000001.jpg")


def test_voc_image_set_file_with_devkit_layout(tmp_path):
    root = write_voc_devkit(
        tmp_path / "VOC2007",
        {"train": {
            "000005": [("chair", (263, 211, 324, 339), 0), ("chair", (165, 264, 253, 372), 1)],
            "000007": [("car", (141, 50, 500, 330), 0)],
            "000009": [],
        }},
    )  # fmt: skip
    source = load_voc(root / "ImageSets" / "Main" / "train.txt")
    assert source.class_names == list(VOC_CLASS_NAMES)
    assert source.category_ids == list(range(1, 21))
    assert [record.image_id for record in source.records] == [0, 1, 2]
    assert source.records[0].path == (root / "JPEGImages" / "000005.jpg").resolve()
    # difficult objects are dropped by default and counted
    np.testing.assert_array_equal(source.records[0].boxes, [[262, 210, 324, 339]])
    np.testing.assert_array_equal(source.records[0].labels, [VOC_CLASS_NAMES.index("chair")])
    assert source.skipped == {"difficult": 1}
    assert source.records[2].boxes.shape == (0, 4)  # no objects: still a record
    assert not source.records[1].crowd.any()

    with_difficult = load_voc(root / "ImageSets" / "Main" / "train.txt", use_difficult=True)
    assert len(with_difficult.records[0].boxes) == 2 and with_difficult.skipped == {}


def test_voc_folder_of_xml_files_and_class_names_read_from_files(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "b.xml").write_text(voc_xml("b.png", 64, 48, [("Zebra", (1, 1, 10, 10), 0)]))
    (folder / "a.xml").write_text(voc_xml("a.png", 64, 48, [("ant", (2, 2, 20, 20), 1)]))
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(b"")
    source = load_voc(folder, use_difficult=False)  # images next to the xml files
    # Not all VOC names: the sorted names found, difficult objects' names included.
    assert source.class_names == ["Zebra", "ant"]
    assert [record.path.name for record in source.records] == ["a.png", "b.png"]
    np.testing.assert_array_equal(source.records[1].labels, [0])
    assert source.records[0].boxes.shape == (0, 4)

    with pytest.raises(DataError, match=r"object 0 is a 'Zebra', which is not in class_names"):
        load_voc(folder, class_names=["ant"])


def test_voc_missing_size_is_read_from_the_image(tmp_path):
    cv2.imwrite(str(tmp_path / "photo.png"), np.zeros((30, 40, 3), dtype=np.uint8))
    xml = voc_xml("photo.png", 0, 0, [("person", (1, 1, 100, 100), 0)])
    (tmp_path / "photo.xml").write_text(xml)
    record = load_voc(tmp_path).records[0]
    assert (record.width, record.height) == (40, 30)
    np.testing.assert_array_equal(record.boxes, [[0, 0, 40, 30]])  # clipped to the image


@pytest.mark.parametrize(
    "text, message",
    [
        ("<annotation><object>", "bad.xml: not a valid xml file"),
        ("<labels></labels>", "bad.xml: not a Pascal VOC annotation"),
        (
            "<annotation><object><name>dog</name><bndbox><xmin>1</xmin></bndbox></object>"
            "</annotation>",
            r"bad.xml: object 0 \(dog\) <bndbox><ymin> must be a number",
        ),
    ],
)
def test_voc_bad_xml_names_the_file(tmp_path, text, message):
    (tmp_path / "bad.xml").write_text(text)
    with pytest.raises(DataError, match=message):
        load_voc(tmp_path, check_images=False)


def test_voc_image_set_ids_without_xml_are_reported(tmp_path):
    root = write_voc_devkit(tmp_path / "VOC", {"train": {"000001": []}})
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n")
    with pytest.raises(FileNotFoundError, match="1 of 2 ids .* e.g. 000002.xml"):
        load_voc(root / "ImageSets" / "Main" / "train.txt")


# ---------------------------------------------------------------- data YAML


def write_synthetic_layout(root: Path) -> Path:
    """The layout and data.yaml that the synthetic generator writes."""
    categories = [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}]
    for split, image_ids in (("train", [1, 2, 3]), ("val", [4])):
        images = [coco_image(image_id, 32, 32) for image_id in image_ids]
        annotations = [
            coco_annotation(image_id, image_id, 1 + image_id % 2, [4, 4, 8, 8])
            for image_id in image_ids
        ]
        write_coco(
            root / "annotations" / f"{split}.json", images, annotations, categories,
            root / "images" / split,
        )  # fmt: skip
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        "format: coco\n"
        "train: annotations/train.json\n"
        "val: annotations/val.json\n"
        "train_images: images/train\n"
        "val_images: images/val\n"
    )
    return data_yaml


def test_synthetic_generator_data_yaml_loads_from_any_working_directory(tmp_path, monkeypatch):
    data_yaml = write_synthetic_layout(tmp_path / "synthetic")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_data_yaml(data_yaml)
    assert config.root == str((tmp_path / "synthetic").resolve())
    train = load_source(config, "train")
    val = load_source(config, "val")
    assert [record.image_id for record in train.records] == [1, 2, 3]
    assert [record.image_id for record in val.records] == [4]
    assert train.class_names == val.class_names == ["square", "circle"]
    assert val.records[0].path == (tmp_path / "synthetic" / "images" / "val" / "000004.jpg")
    assert yaml.safe_load(yaml.safe_dump(config.to_dict())) == config.to_dict()


def test_common_images_folder_and_crowd_option(tmp_path):
    categories = [{"id": 1, "name": "thing"}]
    images = [coco_image(1)]
    annotations = [coco_annotation(1, 1, 1, [0, 0, 4, 4], iscrowd=1)]
    write_coco(tmp_path / "train.json", images, annotations, categories, tmp_path / "all")
    config = DataConfig(train="train.json", images="all", crowd="ignore", root=str(tmp_path))
    source = load_source(config, "train")
    assert source.records[0].boxes.shape == (0, 4) and source.skipped == {"crowd_ignored": 1}


@pytest.mark.parametrize(
    "text, message",
    [
        ("format: yaml\n", r"data.format: expected one of \['coco', 'voc', 'yolo'\], got 'yaml'"),
        ("format: coco\ntrian: a.json\n", r"data.trian: unknown key"),
        ("train: 3\n", r"data.train: expected a path \(a string\), got 3"),
        ("crowd: maybe\n", r"data.crowd: expected 'train' or 'ignore', got 'maybe'"),
        ("class_names: [a, b]\n", r"data.class_names: only used with formats 'voc' and 'yolo'"),
        ("format: voc\nclass_names: [a, a]\n", r"data.class_names: names listed more than once"),
        ("- format\n", r"expected a mapping"),
        ("format: [coco\n", r"not a valid YAML file"),
    ],
)
def test_data_yaml_is_strict(tmp_path, text, message):
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(text)
    with pytest.raises(DataError, match=message) as error:
        load_data_yaml(data_yaml)
    assert "data.yaml" in str(error.value)


def test_missing_paths_and_undeclared_keys_are_named(tmp_path):
    data_yaml = write_synthetic_layout(tmp_path)
    config = load_data_yaml(data_yaml)
    config.val = "annotations/missing.json"
    with pytest.raises(FileNotFoundError, match=r"data.val: .*missing.json does not exist"):
        load_source(config, "val")
    config.train_images = "images/nowhere"
    with pytest.raises(FileNotFoundError, match=r"data.train_images: .*nowhere does not exist"):
        load_source(config, "train")
    config = DataConfig(train=str(tmp_path / "annotations" / "train.json"))
    with pytest.raises(DataError, match=r"data.train_images: not set \(nor data.images\)"):
        load_source(config, "train")
    with pytest.raises(DataError, match=r"data.val: not set"):
        load_source(config, "val")
    with pytest.raises(ValueError, match="split: expected 'train' or 'val', got 'test'"):
        load_source(config, "test")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_data_yaml(tmp_path / "nope.yaml")


def test_empty_dataset_is_an_error(tmp_path):
    write_coco(tmp_path / "empty.json", [], [], [{"id": 1, "name": "thing"}], tmp_path / "img")
    config = DataConfig(train="empty.json", images="img", root=str(tmp_path))
    with pytest.raises(DataError, match=r"data.train: .*empty.json holds no images"):
        load_source(config, "train")


def test_voc_yaml_reads_class_names_from_both_splits(tmp_path):
    write_voc_devkit(
        tmp_path / "VOC",
        {"train": {"1": [("kiwi", (1, 1, 5, 5), 0)]}, "val": {"2": [("apple", (1, 1, 5, 5), 0)]}},
    )
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(
        "format: voc\ntrain: VOC/ImageSets/Main/train.txt\nval: VOC/ImageSets/Main/val.txt\n"
    )
    config = load_data_yaml(data_yaml)
    train, val = load_source(config, "train"), load_source(config, "val")
    assert train.class_names == val.class_names == ["apple", "kiwi"]
    np.testing.assert_array_equal(train.records[0].labels, [1])

    config.class_names = ["kiwi", "apple"]
    np.testing.assert_array_equal(load_source(config, "train").records[0].labels, [0])


# ---------------------------------------------------------------- split tool


def test_split_coco_is_complete_deterministic_and_keeps_categories(tmp_path):
    categories = [{"id": 4, "name": "a"}, {"id": 9, "name": "b"}]
    images = [coco_image(image_id) for image_id in range(1, 31)]
    annotations = [
        coco_annotation(100 + index, 1 + index % 30, 4 if index % 3 else 9, [1, 1, 5, 5])
        for index in range(75)
    ]
    source_file = write_coco(tmp_path / "all.json", images, annotations, categories)
    source_bytes = source_file.read_bytes()

    train_path, val_path = split_coco(source_file, tmp_path / "split", val_fraction=0.2, seed=0)
    assert (train_path.name, val_path.name) == ("train.json", "val.json")
    train, val = json.loads(train_path.read_text()), json.loads(val_path.read_text())
    train_ids = [image["id"] for image in train["images"]]
    val_ids = [image["id"] for image in val["images"]]
    assert len(val_ids) == round(0.2 * 30)
    assert sorted(train_ids + val_ids) == list(range(1, 31))  # each image exactly once
    assert train_ids == sorted(train_ids)  # file order kept
    assert train["categories"] == val["categories"] == categories
    for part, ids in ((train, set(train_ids)), (val, set(val_ids))):
        assert all(annotation["image_id"] in ids for annotation in part["annotations"])
    assert sorted(a["id"] for a in train["annotations"] + val["annotations"]) == [
        a["id"] for a in annotations
    ]
    assert source_file.read_bytes() == source_bytes
    assert not [path for path in (tmp_path / "split").iterdir() if path.name.startswith(".")]

    # Same input and seed -> identical files, whatever the image order in the input.
    shuffled = write_coco(tmp_path / "shuffled.json", images[::-1], annotations, categories)
    again_train, again_val = split_coco(shuffled, tmp_path / "again", val_fraction=0.2, seed=0)
    assert {image["id"] for image in json.loads(again_val.read_text())["images"]} == set(val_ids)
    _, other_val = split_coco(source_file, tmp_path / "other", val_fraction=0.2, seed=1)
    assert {image["id"] for image in json.loads(other_val.read_text())["images"]} != set(val_ids)
    first_bytes = train_path.read_bytes()
    split_coco(source_file, tmp_path / "split", val_fraction=0.2, seed=0)
    assert train_path.read_bytes() == first_bytes

    # The outputs are loadable COCO files.
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for image in images:
        (image_dir / image["file_name"]).write_bytes(b"")
    assert len(load_coco(val_path, image_dir).records) == len(val_ids)


def test_split_coco_rejects_bad_requests(tmp_path):
    source_file = write_coco(tmp_path / "train.json", [coco_image(1), coco_image(2)], [], [])
    with pytest.raises(DataError, match="would be overwritten"):
        split_coco(source_file, tmp_path)
    with pytest.raises(ValueError, match=r"val_fraction: expected a number in \(0, 1\)"):
        split_coco(source_file, tmp_path / "out", val_fraction=1.5)
    single = write_coco(tmp_path / "one.json", [coco_image(1)], [], [])
    with pytest.raises(DataError, match="needs at least 2 images"):
        split_coco(single, tmp_path / "out")
    train_path, val_path = split_coco(source_file, tmp_path / "out", val_fraction=0.01)
    assert len(json.loads(val_path.read_text())["images"]) == 1
    reference = tmp_path / "reference.txt"
    reference.write_text("")
    assert os.stat(train_path).st_mode == os.stat(reference).st_mode  # not a private temp file
