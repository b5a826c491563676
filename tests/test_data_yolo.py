"""YOLO (Ultralytics) data sets and `ctprune make-data convert` between YOLO and COCO."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from ctprune.cli import main
from detector.data.records import DataError
from detector.data.sources import DataConfig, load_data_yaml, load_source
from detector.data.yolo import label_path


def write_image(path: Path, width: int = 40, height: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.zeros((height, width, 3), np.uint8))
    return path


def write_yolo(root: Path, labels: dict[str, str], names="[cat, dog]", extra: str = "") -> Path:
    """A YOLO data set under ``root``: one 40x20 image per key of ``labels`` (a path below
    images/) and its label file's text (None: no label file)."""
    for name, text in labels.items():
        image = write_image(root / "images" / name)
        if text is not None:
            label_file = label_path(image)
            label_file.parent.mkdir(parents=True, exist_ok=True)
            label_file.write_text(text)
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        f"format: yolo\npath: .\ntrain: images/train\nval: images/val\nnames: {names}\n{extra}"
    )
    return data_yaml


def test_label_path_follows_ultralytics_rule():
    assert label_path("/d/images/train/images/a.jpg") == Path("/d/images/train/labels/a.txt")
    assert label_path("/d/pics/a.png") == Path("/d/pics/a.txt")


def test_yolo_boxes_in_pixels_names_mapping_and_images_without_labels(tmp_path):
    data_yaml = write_yolo(
        tmp_path,
        {"train/a.jpg": "1 0.5 0.5 0.5 0.5\n\n0 0.25 0.5 0.5 1.0\n", "train/sub/b.jpg": None,
         "val/c.jpg": ""},
        names="{0: cat, 1: dog}",
        extra="nc: 2\ntest: images/test\n",
    )
    config = load_data_yaml(data_yaml)
    assert config.format == "yolo" and config.class_names == ["cat", "dog"]
    train = load_source(config, "train")
    assert [record.path.name for record in train.records] == ["a.jpg", "b.jpg"]
    first = train.records[0]
    assert (first.width, first.height) == (40, 20)
    np.testing.assert_allclose(first.boxes, [[10, 5, 30, 15], [0, 0, 20, 20]])
    assert first.labels.tolist() == [1, 0]
    assert train.records[1].boxes.shape == (0, 4)
    assert load_source(config, "val").records[0].boxes.shape == (0, 4)
    assert train.category_ids == [1, 2]


def test_a_split_without_any_label_file_is_warned_once(tmp_path, caplog):
    data_yaml = write_yolo(tmp_path, {"train/a.jpg": None, "train/b.jpg": None})
    with caplog.at_level(logging.WARNING, logger="detector.data.yolo"):
        train = load_source(load_data_yaml(data_yaml), "train")
    assert len(train.records) == 2
    [warning] = caplog.records
    assert str(tmp_path / "labels" / "train" / "a.txt") in warning.getMessage()
    assert "none of its 2 images has a label file" in warning.getMessage()


def test_recipe_mapping_form_uses_root_and_class_names(tmp_path):
    write_yolo(tmp_path, {"train/a.jpg": "1 0.5 0.5 0.5 0.5\n"})
    config = DataConfig(format="yolo", root=str(tmp_path), train="images/train",
                        class_names=["cat", "dog"])
    assert load_source(config, "train").records[0].labels.tolist() == [1]
    with pytest.raises(DataError, match=r"data.class_names: not set; a YOLO data set needs"):
        load_source(DataConfig(format="yolo", root=str(tmp_path), train="images/train"), "train")


def test_yolo_split_as_a_list_of_image_paths(tmp_path):
    data_yaml = write_yolo(tmp_path, {"train/a.jpg": "0 0.5 0.5 0.2 0.2\n", "val/c.jpg": ""})
    (tmp_path / "train.txt").write_text("./images/train/a.jpg\n")
    data_yaml.write_text(data_yaml.read_text().replace("images/train", "train.txt"))
    train = load_source(load_data_yaml(data_yaml), "train")
    assert [record.path.name for record in train.records] == ["a.jpg"]
    assert train.records[0].labels.tolist() == [0]


@pytest.mark.parametrize(
    "line, message",
    [
        ("0 0.5 0.5 1.2 0.1", r"a.txt:2: w = 1.2 is outside \[0, 1\]"),
        ("0 -0.2 0.5 0.1 0.1", r"a.txt:2: cx = -0.2 is outside \[0, 1\]"),
        ("2 0.5 0.5 0.1 0.1", r"a.txt:2: class 2 is not a class index 0..1"),
        ("0.5 0.5 0.5 0.1 0.1", r"a.txt:2: class 0.5 is not a class index"),
        ("0 0.1 0.1 0.2 0.1 0.2 0.2 0.1 0.2", r"a.txt:2: 9 values: a polygon or segment label"),
        ("0 0.5 0.5 0.1", r"a.txt:2: expected 5 values"),
        ("0 0.5 half 0.1 0.1", r"a.txt:2: expected numbers 'class cx cy w h', got '0 0.5 half"),
        ("0 0.5 nan 0.1 0.1", r"a.txt:2: expected finite numbers"),
    ],
)
def test_bad_yolo_label_lines_name_file_and_line(tmp_path, line, message):
    data_yaml = write_yolo(tmp_path, {"train/a.jpg": f"0 0.5 0.5 0.1 0.1\n{line}\n"})
    with pytest.raises(DataError, match=message) as error:
        load_source(load_data_yaml(data_yaml), "train")
    assert str(tmp_path / "labels" / "train" / "a.txt") in str(error.value)


def test_binary_label_file_is_named(tmp_path):
    data_yaml = write_yolo(tmp_path, {"train/a.jpg": ""})
    (tmp_path / "labels" / "train" / "a.txt").write_bytes(b"\xff\xfe0 0.5")
    with pytest.raises(DataError, match=r"a.txt: not a UTF-8 text file of labels") as error:
        load_source(load_data_yaml(data_yaml), "train")
    assert str(tmp_path / "labels" / "train" / "a.txt") in str(error.value)


def test_rounding_just_outside_the_image_is_clipped(tmp_path):
    data_yaml = write_yolo(tmp_path, {"train/a.jpg": "0 0.5 0.5 1.0005 1.0\n"})
    [record] = load_source(load_data_yaml(data_yaml), "train").records
    np.testing.assert_allclose(record.boxes, [[0, 0, 40, 20]])


@pytest.mark.parametrize(
    "names, extra, message",
    [
        ("{0: cat, 2: dog}", "", r"names: the keys of a names mapping must be the class indices"),
        ("[]", "", r"names: expected a list of class names"),
        ("[cat, dog]", "nc: 3\n", r"nc is 3 but names lists 2 classes"),
    ],
)
def test_bad_ultralytics_yaml_is_named(tmp_path, names, extra, message):
    data_yaml = write_yolo(tmp_path, {"train/a.jpg": ""}, names=names, extra=extra)
    with pytest.raises(DataError, match=message) as error:
        load_data_yaml(data_yaml)
    assert str(data_yaml) in str(error.value)


def test_ultralytics_yaml_without_format_is_named(tmp_path):
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text("path: .\ntrain: images/train\nnames: [cat]\n")
    with pytest.raises(DataError, match=r"data.yaml: 'names' is a key of an Ultralytics.*"
                                        r"add `format: yolo`"):
        load_data_yaml(data_yaml)


def test_coco_to_yolo_to_coco_keeps_boxes_and_names(tmp_path, capsys):
    images = tmp_path / "coco" / "images"
    for name in ("x/a.jpg", "y/a.jpg", "b.jpg"):
        write_image(images / name, 64, 48)
    categories = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    coco_images = [{"id": i + 1, "file_name": name, "width": 64, "height": 48}
                   for i, name in enumerate(("x/a.jpg", "y/a.jpg", "b.jpg"))]
    boxes = [(1, 3, [1.5, 2.25, 30.0, 20.5]), (1, 7, [0, 0, 64, 48]), (2, 7, [10, 11, 5, 6])]
    annotations = [{"id": i + 1, "image_id": image, "category_id": category, "bbox": bbox,
                    "area": bbox[2] * bbox[3], "iscrowd": 0}
                   for i, (image, category, bbox) in enumerate(boxes)]
    (tmp_path / "coco" / "train.json").write_text(json.dumps(
        {"images": coco_images, "annotations": annotations, "categories": categories}))
    (tmp_path / "coco" / "data.yaml").write_text(
        "format: coco\ntrain: train.json\nimages: images\n")

    assert main(["make-data", "convert", str(tmp_path / "coco" / "data.yaml"),
                 str(tmp_path / "yolo"), "--to", "yolo"]) == 0
    assert (tmp_path / "yolo" / "labels" / "train" / "x" / "a.txt").is_file()
    assert (tmp_path / "yolo" / "labels" / "train" / "b.txt").read_text() == ""
    assert main(["make-data", "convert", str(tmp_path / "yolo" / "data.yaml"),
                 str(tmp_path / "back"), "--to", "coco"]) == 0

    original = load_source(load_data_yaml(tmp_path / "coco" / "data.yaml"), "train")
    back = load_source(load_data_yaml(tmp_path / "back" / "data.yaml"), "train")
    assert back.class_names == original.class_names == ["cat", "dog"]
    relative = [record.path.relative_to(images).as_posix() for record in original.records]
    back_relative = [record.path.relative_to(tmp_path / "back" / "images" / "train").as_posix()
                     for record in back.records]
    assert sorted(back_relative) == sorted(relative)
    by_name = {name: record for name, record in zip(back_relative, back.records, strict=True)}
    for name, record in zip(relative, original.records, strict=True):
        np.testing.assert_allclose(by_name[name].boxes, record.boxes, atol=1e-4)
        assert by_name[name].labels.tolist() == record.labels.tolist()
    assert "data.yaml" in capsys.readouterr().out


def test_convert_refuses_a_non_empty_out_and_the_same_format(tmp_path, capsys):
    data_yaml = write_yolo(tmp_path / "src", {"train/a.jpg": ""})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert main(["make-data", "convert", str(data_yaml), str(tmp_path / "out"),
                 "--to", "coco"]) == 2
    assert f"{tmp_path / 'out'}: exists and is not an empty folder" in capsys.readouterr().err
    assert main(["make-data", "convert", str(data_yaml), str(tmp_path / "new"),
                 "--to", "yolo"]) == 2
    assert "is already format 'yolo'" in capsys.readouterr().err
