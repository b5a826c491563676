"""Batched `Predictor.predict` and `ctprune detect` on folders, globs and videos."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tiny import tiny_config, tiny_model

from ctprune.cli import main
from ctprune.detect import detect_inputs, output_paths
from detector import save_checkpoint
from detector.inference.predictor import Predictor


def _distinct_scores_model():
    """A tiny model with random (not prior-initialised) weights, so scores differ enough that
    the top-k order does not depend on rounding."""
    torch.manual_seed(0)
    model = tiny_model(num_classes=3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    config = tiny_config(num_classes=3)
    config.class_names = ["circle", "square", "triangle"]
    return save_checkpoint(path, _distinct_scores_model(), config)


def _images():
    generator = np.random.default_rng(0)
    sizes = [(24, 32), (40, 48), (24, 32), (64, 64)]
    return [generator.integers(0, 256, size=(*size, 3), dtype=np.uint8) for size in sizes]


@pytest.mark.parametrize("keep_resolution", [False, True])
def test_batched_predict_equals_one_by_one_in_input_order(saved, keep_resolution):
    predictor = Predictor.from_checkpoint(saved, device="cpu", keep_resolution=keep_resolution)
    forwards = []
    predictor.model.register_forward_hook(lambda module, inputs, output: forwards.append(
        inputs[0].shape[0]))
    images = _images()
    batched = predictor.predict(images)
    # fixed input size: one forward for all; keep_resolution: one per prepared size (3 sizes)
    assert forwards == ([4] if not keep_resolution else [2, 1, 1])
    for image, result in zip(images, batched, strict=True):
        [alone] = predictor.predict([image])
        np.testing.assert_allclose(result.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(result.scores, alone.scores, atol=1e-5)
        assert result.labels.tolist() == alone.labels.tolist()
    # a different image answered in a slot would break this (the images differ)
    assert not np.allclose(batched[0].scores, batched[2].scores)


def test_outputs_mirror_the_input_tree(tmp_path):
    files = [tmp_path / "a" / "img.jpg", tmp_path / "b" / "img.jpg", tmp_path / "b" / "x.png",
             tmp_path / "b" / "X.jpg", tmp_path / "b" / "clip.avi"]
    out = tmp_path / "out"
    assert output_paths(files, out) == [
        out / "a" / "img_detections.png", out / "b" / "img_detections.png",
        out / "b" / "x_detections.png", out / "b" / "X_detections_2.png",
        out / "b" / "clip_detections.mp4",
    ]
    assert output_paths([tmp_path / "one.jpg"], out) == [out / "one_detections.png"]


def test_inputs_are_files_folders_and_globs_once_each(tmp_path):
    for name in ("a/img.jpg", "a/deep/img.png", "b/img.jpg", "b/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = detect_inputs([tmp_path / "a", str(tmp_path / "*" / "img.jpg")])
    assert found == [tmp_path / "a" / "deep" / "img.png", tmp_path / "a" / "img.jpg",
                     tmp_path / "b" / "img.jpg"]
    # an output folder inside the inputs is not read back as input
    assert detect_inputs([tmp_path], exclude=tmp_path / "b") == found[:2]
    with pytest.raises(FileNotFoundError, match=r"nothing\*.jpg: no such file or folder"):
        detect_inputs([str(tmp_path / "nothing*.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: holds no images or videos"):
        detect_inputs([tmp_path / "empty"])


def test_detect_on_a_nested_folder_and_a_video(saved, tmp_path, capsys):
    inputs = tmp_path / "in"
    images = _images()
    for folder, image in zip(("a", "b/c"), images, strict=False):
        (inputs / folder).mkdir(parents=True)
        cv2.imwrite(str(inputs / folder / "img.jpg"), image)
    video = inputs / "b" / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 64))
    for index in range(5):
        writer.write(np.full((64, 64, 3), index * 40, np.uint8))
    writer.release()

    out = tmp_path / "out"
    assert main(["detect", str(saved), str(inputs), "--out", str(out), "--threshold", "0",
                 "--batch-size", "2"]) == 0
    written = sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file())
    assert written == ["a/img_detections.png", "b/c/img_detections.png", "b/clip_detections.mp4"]
    capture = cv2.VideoCapture(str(out / "b" / "clip_detections.mp4"))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == 5
    assert (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (
        64, 64)
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
    capture.release()
    assert "wrote 3 files" in capsys.readouterr().out
