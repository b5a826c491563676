"""Damaged or mismatched inputs are refused by name: checkpoints, images, class lists, run-folder
records, a full disk; `prune` says when it removes far less than asked."""

from __future__ import annotations

import errno
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tiny import tiny_config, tiny_model

from ctprune.cli import main
from ctprune.pruning.api import PruneShortfallWarning, prune
from ctprune.report.artifacts import read_run
from detector import load_model, save_checkpoint
from detector.checkpoint import (
    CheckpointError,
    check_checkpoint_matches,
    model_from_checkpoint,
    read_checkpoint,
)
from detector.data.coco import load_coco
from detector.data.dataset import read_image
from detector.data.images import ImageError, check_image_files, read_image_file
from detector.data.records import DataError, DetectionSource, ImageRecord
from detector.data.sources import DataWarning, check_split_classes
from detector.data.voc import load_voc
from detector.files import DiskFullError, atomic_replace, atomic_write_text
from detector.inference.predictor import read_bgr

# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny 3-class checkpoint, saved once."""
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    config = tiny_config(num_classes=3)
    config.class_names = ["circle", "square", "triangle"]
    return save_checkpoint(path, tiny_model(num_classes=3), config)


def damaged(saved: Path, tmp_path: Path, change) -> Path:
    """A copy of ``saved`` with ``change(data)`` applied to its raw dict."""
    data = torch.load(saved, weights_only=True)
    change(data)
    path = tmp_path / "damaged.pt"
    torch.save(data, path)
    return path


@pytest.mark.parametrize("version", [-5, "1", 99, 1.0, True, None])
def test_unknown_format_version_is_refused(saved, tmp_path, version):
    path = damaged(saved, tmp_path, lambda data: data.update(format=version))
    with pytest.raises(CheckpointError, match=r"format: .* not a checkpoint format") as error:
        read_checkpoint(path)
    assert str(path) in str(error.value) and "supported: [1]" in str(error.value)


def _set_config(key, value):
    return lambda data: data["model_config"].update({key: value})


def _set_input(key, value):
    return lambda data: data["model_config"]["input"].update({key: value})


def _first_weight(data):
    data["state_dict"]["backbone.conv1.weight"] = "not a tensor"


@pytest.mark.parametrize(
    "change, named",
    [
        (_first_weight, r"state_dict\['backbone.conv1.weight'\]: expected a tensor, got str"),
        (lambda data: data.update(state_dict=[1, 2]), r"state_dict: expected a mapping"),
        (lambda data: data.update(channel_plan="half"), r"channel_plan: expected null or a map"),
        (lambda data: data.update(channel_plan={"neck.0": [8, -1]}),
         r"channel_plan\['neck.0'\]: expected a list of positive integer widths, got \[8, -1\]"),
        (lambda data: data.update(channel_plan={"neck.0": "8"}), r"channel_plan\['neck.0'\]"),
        (lambda data: data.update(model_config="res18"), r"model_config: expected a mapping"),
        (_set_config("colour", "RGB"), r"invalid model_config: .*colour"),
        (_set_config("num_classes", 0), r"num_classes: expected an integer >= 1, got 0"),
        (_set_config("num_classes", None), r"num_classes: expected a positive integer, got None"),
        (_set_config("class_names", ["circle"]),
         r"class_names: expected num_classes = 3 names, got 1"),
        (_set_config("class_names", ["a", "b", "c", "d"]),
         r"class_names: expected num_classes = 3 names, got 4"),
        (_set_input("std", [0.2, 0.0, 0.2]), r"invalid model_config: .*std"),
        (_set_input("color_order", "GRB"), r"invalid model_config: .*color_order"),
        (_set_input("input_size", [6, 6]), r"invalid model_config: .*input_size"),
        (lambda data: data.pop("state_dict"), r"lacks \['state_dict'\]"),
        (lambda data: data.pop("model_config"), r"lacks \['model_config'\]"),
        (lambda data: data.update(optimizer={}), r"unknown checkpoint keys \['optimizer'\]"),
        (lambda data: data.update(meta=[1]), r"meta: expected a mapping, got list"),
    ],
)
def test_malformed_fields_are_named_with_the_file(saved, tmp_path, change, named):
    path = damaged(saved, tmp_path, change)
    with pytest.raises(CheckpointError, match=named) as error:
        load_model(path)
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize(
    "plan, named",
    [
        ({"neck.99": [16, 16]}, r"'neck.99', which is not a layer of this model"),
        ({"backbone.conv1": [3, 8, 8]}, r"expected 2 positive widths, got \[3, 8, 8\]"),
    ],
)
def test_impossible_channel_plans_are_named_with_the_file(saved, tmp_path, plan, named):
    path = damaged(saved, tmp_path, lambda data: data.update(channel_plan=plan))
    with pytest.raises(CheckpointError, match=named) as error:
        load_model(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(saved, tmp_path, value):
    def poison(data):
        data["state_dict"]["neck.0.weight"][0, 0, 0, 0] = value
        data["state_dict"]["backbone.bn1.running_var"][1] = value

    path = damaged(saved, tmp_path, poison)
    with pytest.raises(CheckpointError, match=r"2 tensors hold NaN or infinite values") as error:
        load_model(path)
    assert str(path) in str(error.value)
    assert "neck.0.weight" in str(error.value) and "backbone.bn1.running_var" in str(error.value)


def test_a_trained_model_has_only_finite_tensors(saved):
    """No layer stores non-finite values legitimately, so the check refuses nothing real."""
    model_from_checkpoint(read_checkpoint(saved), str(saved))


def test_truncated_checkpoint_is_named(saved, tmp_path):
    path = tmp_path / "half.pt"
    data = saved.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"damaged or truncated PyTorch checkpoint") as error:
        load_model(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "content, named",
    [
        (b"\x08\x08\x12\x07pytorch\x1a\x052.5.0:\x90\x01", r"looks like an ONNX model"),
        (b"model: res18\nepochs: 3\n", r"it is a text file"),
        (b"", r"the file is empty"),
        (b"\x00\x01\x02\xff\xfe", r"not a zip archive"),
    ],
)
def test_files_that_are_not_checkpoints_are_named(tmp_path, content, named):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=named) as error:
        read_checkpoint(path)
    assert str(error.value).startswith(f"{path}: not a PyTorch checkpoint file")


def test_pickled_module_is_still_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match=r"holds pickled Python objects") as error:
        read_checkpoint(path)
    assert str(path) in str(error.value)


def test_checkpoint_for_other_classes_names_both_class_lists(saved):
    names = ["a", "b", "c", "d", "e", "f"]
    with pytest.raises(CheckpointError, match=r"for 3 classes \(circle, square, triangle\), but "
                       r"the data has 6 classes \(a, b, c, d, e, f\)") as error:
        check_checkpoint_matches(saved, 6, names)
    assert str(saved) in str(error.value)
    with pytest.raises(CheckpointError, match=r"3 classes \(circle, square, triangle\).*"
                       r"\(circle, triangle, square\)"):
        check_checkpoint_matches(saved, 3, ["circle", "triangle", "square"])
    with pytest.raises(CheckpointError, match=r"arch 'res18', expected 'res50'"):
        check_checkpoint_matches(saved, 3, arch="res50")
    assert check_checkpoint_matches(saved, 3, ["circle", "square", "triangle"], "res18")


# ---------------------------------------------------------------- full disk


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, code):
    path = atomic_write_text(tmp_path / "best.pt", "old")

    def write(file):
        file.write(b"x" * 4096)
        raise OSError(code, "No space left on device")

    with pytest.raises(DiskFullError, match=r"cannot write the file: the disk .* MiB free") as e:
        atomic_replace(path, write)
    assert str(e.value).startswith(str(path)) and e.value.errno == code
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_other_write_errors_pass_unchanged(tmp_path):
    def write(file):
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError, match="I/O error") as error:
        atomic_replace(tmp_path / "x", write)
    assert not isinstance(error.value, DiskFullError)


# ---------------------------------------------------------------- images


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)


def _record(path: Path, image_id: int = 7) -> ImageRecord:
    return ImageRecord(image_id, path, 32, 24, np.zeros((0, 4)), np.zeros(0), np.zeros(0))


def test_truncated_jpeg_is_refused_with_its_record(tmp_path, pixels):
    whole = tmp_path / "whole.jpg"
    cv2.imwrite(str(whole), pixels)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert read_image(_record(whole)).shape == (24, 32, 3)
    with pytest.raises(ImageError, match=r"^image 7: .*cut.jpg: a truncated JPEG"):
        read_image(_record(cut))
    with pytest.raises(ImageError, match=r"cut.jpg: a truncated JPEG"):
        read_bgr(cut)


def test_damaged_images_are_found_before_work_starts(tmp_path, pixels):
    whole, cut, empty = tmp_path / "whole.jpg", tmp_path / "cut.jpg", tmp_path / "empty.png"
    cv2.imwrite(str(whole), pixels)
    cut.write_bytes(whole.read_bytes()[:200])
    empty.write_bytes(b"")
    check_image_files([_record(whole)])
    with pytest.raises(ImageError, match=r"2 image files are damaged: image 2 \(.*cut.jpg: "
                       r"truncated JPEG\), image 3 \(.*empty.png: empty\)"):
        check_image_files([_record(whole, 1), _record(cut, 2), _record(empty, 3)])
    with pytest.raises(FileNotFoundError, match=r"1 image files do not exist: image 4 .*no.jpg"):
        check_image_files([_record(cut, 2), _record(tmp_path / "no.jpg", 4)])


def test_bytes_after_the_jpeg_end_are_allowed(tmp_path, pixels):
    path = tmp_path / "trailer.jpg"
    cv2.imwrite(str(path), pixels)
    path.write_bytes(path.read_bytes() + b"camera trailer")
    assert read_image_file(path).shape == (24, 32, 3)


def test_16_bit_png_is_scaled_not_black(tmp_path, pixels):
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), pixels.astype(np.uint16) * 257)
    np.testing.assert_array_equal(read_image_file(path), pixels)


def test_16_bit_png_holding_8_bit_values_is_refused(tmp_path, pixels):
    path = tmp_path / "dark.png"
    cv2.imwrite(str(path), pixels.astype(np.uint16))
    with pytest.raises(ImageError, match=r"dark.png: a 16-bit image .* would read as black"):
        read_bgr(path)


def test_grey_and_alpha_images_become_3_channel_bgr(tmp_path, pixels):
    grey, alpha = tmp_path / "grey.png", tmp_path / "alpha.png"
    cv2.imwrite(str(grey), pixels[:, :, 0])
    cv2.imwrite(str(alpha), np.dstack([pixels, pixels[:, :, :1]]))
    np.testing.assert_array_equal(read_image_file(grey), np.repeat(pixels[:, :, :1], 3, axis=2))
    np.testing.assert_array_equal(read_image_file(alpha), pixels)


def test_float_images_are_refused_by_name(tmp_path, pixels):
    path = tmp_path / "float.tiff"
    assert cv2.imwrite(str(path), pixels.astype(np.float32) / 255)
    with pytest.raises(ImageError, match=r"float.tiff: pixels of type float32; expected 8- or "):
        read_image_file(path)


def test_unreadable_and_missing_images_are_named_with_their_record(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageError, match=r"^image 7: .*notes.jpg: cannot be read as an image"):
        read_image(_record(text))
    with pytest.raises(FileNotFoundError, match=r"^image 7: file .*gone.jpg does not exist"):
        read_image(_record(tmp_path / "gone.jpg"))


# ---------------------------------------------------------------- class lists


def _write_coco(tmp_path: Path, categories: list[dict]) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    return path


def test_two_coco_categories_of_one_name_are_refused(tmp_path):
    path = _write_coco(tmp_path, [{"id": 1, "name": "cat"}, {"id": 4, "name": "dog"},
                                  {"id": 9, "name": "cat"}])
    with pytest.raises(DataError, match=r"categories 1 and 9 are both named 'cat'") as error:
        load_coco(path, tmp_path / "images")
    assert str(path) in str(error.value)


@pytest.mark.parametrize("name", ["", "  ", 7, None])
def test_coco_category_without_a_usable_name_is_refused(tmp_path, name):
    path = _write_coco(tmp_path, [{"id": 1, "name": "cat"}, {"id": 2, "name": name}])
    with pytest.raises(DataError, match=r"category 2: 'name' must be a non-empty string") as error:
        load_coco(path, tmp_path / "images")
    assert str(path) in str(error.value)


def _write_voc(folder: Path, names: list[str]) -> None:
    folder.mkdir(exist_ok=True)
    for index, name in enumerate(names):
        (folder / f"{index:03d}.xml").write_text(
            f"<annotation><filename>{index:03d}.jpg</filename><size><width>20</width>"
            f"<height>20</height></size><object><name>{name}</name><bndbox><xmin>2</xmin>"
            "<ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>"
        )


def test_voc_class_name_typo_is_refused(tmp_path):
    _write_voc(tmp_path / "voc", ["person", "dog", "persn"])
    with pytest.raises(DataError, match=r"002.xml: object 0 is a 'persn', not one of the VOC "
                       r"classes \(did you mean 'person'\?\)\. Known classes: \['aeroplane'"):
        load_voc(tmp_path / "voc", check_images=False)


def test_voc_typo_against_an_explicit_class_list_is_refused(tmp_path):
    _write_voc(tmp_path / "voc", ["person", "persn"])
    with pytest.raises(DataError, match=r"001.xml: object 0 is a 'persn', which is not in "
                       r"class_names \['person', 'dog'\]"):
        load_voc(tmp_path / "voc", class_names=["person", "dog"], check_images=False)


def test_custom_voc_classes_are_not_taken_for_typos(tmp_path):
    _write_voc(tmp_path / "voc", ["widget", "gadget", "gizmo"])
    source = load_voc(tmp_path / "voc", check_images=False)
    assert source.class_names == ["gadget", "gizmo", "widget"]


def _source(labels_per_image: list[list[int]], names=("a", "b", "c"), file="x.json"):
    records = [
        ImageRecord(i, Path(f"{i}.jpg"), 10, 10, np.ones((len(labels), 4)) * [1, 1, 5, 5],
                    labels, np.zeros(len(labels)))
        for i, labels in enumerate(labels_per_image)
    ]
    return DetectionSource(records, list(names), [1, 2, 3], Path(file), {})


def test_classes_in_one_split_only_are_named():
    train = _source([[0, 1], [1]], file="train.json")
    val = _source([[0], [2]], file="val.json")
    with pytest.warns(DataWarning) as caught:
        check_split_classes(train, val)
    messages = [str(w.message) for w in caught]
    assert any("val split (val.json) but none in the train split" in m and "['c']" in m
               and "AP is 0" in m for m in messages)
    assert any("train split (train.json) but none in the val split" in m and "['b']" in m
               for m in messages)


def test_splits_with_the_same_classes_everywhere_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_split_classes(_source([[0, 1, 2]]), _source([[2, 1, 0]]))


def test_splits_with_different_class_lists_are_refused():
    with pytest.raises(DataError, match=r"train split \(t.json\) and the val split \(v.json\) "
                       r"have different classes"):
        check_split_classes(_source([[0]], file="t.json"),
                            _source([[0]], names=("a", "c", "b"), file="v.json"))


# ---------------------------------------------------------------- run-folder records


@pytest.mark.parametrize("damage", [lambda text: text[: len(text) // 2], lambda text: "\udcff"])
@pytest.mark.parametrize("which", ["manifest.json", "stage/stage.json"])
def test_truncated_run_records_are_named(tmp_path, which, damage):
    (tmp_path / "stage").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"recipe": "r.yaml", "stages": []}))
    (tmp_path / "stage" / "stage.json").write_text(
        json.dumps({"name": "baseline", "stage": "baseline", "order": 0, "complete": True})
    )
    path = tmp_path / which
    path.write_bytes(damage(path.read_text()).encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=r"is not (valid JSON|a UTF-8 text)") as error:
        read_run(tmp_path)
    assert str(error.value).startswith(str(path))


# ---------------------------------------------------------------- ctprune detect


def test_detect_writes_one_output_per_image(saved, tmp_path, pixels, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "img.jpg"), pixels)
    main(["detect", str(saved), str(tmp_path / "a" / "img.jpg"), str(tmp_path / "b" / "img.jpg"),
          "--out", str(tmp_path / "out")])
    written = sorted(path.relative_to(tmp_path / "out").as_posix()
                     for path in (tmp_path / "out").rglob("*.png"))
    assert written == ["a/img_detections.png", "b/img_detections.png"]


# ---------------------------------------------------------------- prune shortfall


def test_prune_warns_when_round_to_keeps_a_narrow_model_whole():
    with pytest.warns(PruneShortfallWarning, match=r"prune removed \d+ of the \d+ channels asked "
                      r"for .* groups kept whole: .*at or under round_to=16.*Lower round_to"):
        prune(tiny_model(), 0.5, "l1", round_to=16)


def test_prune_warns_when_max_layer_ratio_keeps_groups_whole():
    named = r"max_layer_ratio=0.05 allows removing none of 16"
    with pytest.warns(PruneShortfallWarning, match=named):
        prune(tiny_model(), 0.05, "l1", round_to=None, max_layer_ratio=0.05)


def test_a_normal_prune_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruneShortfallWarning)
        prune(tiny_model(), 0.5, "l1", round_to=None)
        prune(tiny_model(), 0.0, "l1", round_to=16)
