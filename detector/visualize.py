"""Pictures a person would rather look at than read: detections, heatmaps, ground truth."""

from __future__ import annotations

import colorsys
from pathlib import Path

import cv2
import numpy as np
import torch

from .data.dataset import CenterNetDataset, read_image
from .data.sources import load_data_yaml, load_source
from .inference.predictor import Detections, Predictor, read_bgr
from .models.centernet import is_class_heatmap


def class_color(index: int) -> tuple[int, int, int]:
    """A distinct, stable BGR colour per class (golden-ratio hue steps)."""
    red, green, blue = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.85, 1.0)
    return int(blue * 255), int(green * 255), int(red * 255)


def draw_boxes(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, captions: list[str]
) -> np.ndarray:
    """A copy of a BGR image with boxes (x1, y1, x2, y2 in its pixels) and captions."""
    canvas = image.copy()
    scale = max(0.3, min(canvas.shape[:2]) / 800)
    for box, label, caption in zip(boxes, labels, captions, strict=True):
        color = class_color(int(label))
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 1 if scale < 0.5 else 2)
        (width, height), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = max(y1 - height - 2, 0)
        cv2.rectangle(canvas, (x1, top), (x1 + width, top + height + 2), color, -1)
        cv2.putText(
            canvas,
            caption,
            (x1, top + height),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    return canvas


def draw_detections(image: np.ndarray | str | Path, detections: Detections) -> np.ndarray:
    captions = [
        f"{name} {score:.2f}"
        for name, score in zip(detections.names, detections.scores, strict=True)
    ]
    return draw_boxes(read_bgr(image), detections.boxes, detections.labels, captions)


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Blend a [0, 1] heatmap (any size) over a BGR image as a colour map."""
    resized = cv2.resize(heatmap.astype(np.float32), (image.shape[1], image.shape[0]))
    colored = cv2.applyColorMap(np.uint8(np.clip(resized, 0, 1) * 255), cv2.COLORMAP_JET)
    return cv2.addWeighted(image, 0.5, colored, 0.5, 0)


@torch.no_grad()
def heatmap_overlay(predictor: Predictor, image: np.ndarray | str | Path) -> np.ndarray:
    """The model's class-max heatmap (over all its class heatmaps) over the image it was
    computed from (the network input warped back is what the map covers; for keep-resolution
    inputs that is the image itself)."""
    from .data.transforms import test_transform

    bgr = read_bgr(image)
    network_input, meta = test_transform(
        bgr, predictor.config.input, 1.0, predictor.keep_resolution
    )
    outputs = predictor.model(torch.from_numpy(network_input)[None].to(predictor.device))[-1]
    # Every class heatmap of the head type (the triplet's corners and centres too), max over
    # classes and heatmaps.
    heatmaps = [value for name, value in outputs.items() if is_class_heatmap(name)]
    heatmap = torch.cat(heatmaps, dim=1).sigmoid()[0].max(0).values.cpu().numpy()
    height, width = meta["original_size"]
    to_image = cv2.warpAffine(heatmap, meta["inverse_affine"].astype(np.float32), (width, height))
    return overlay(bgr, to_image)


def show_data(data_yaml: str | Path, split: str, out_dir: str | Path, count: int = 8) -> list[Path]:
    """For the first ``count`` images of a split: the ground-truth boxes with class names, and
    the target heatmap the loss will see (class max), side by side. The quickest check that a
    new data set is read the way you think."""
    source = load_source(load_data_yaml(data_yaml), split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_dataset = CenterNetDataset(
        source.records[:count],
        len(source.class_names),
        _display_spec(),
        train=False,
        keep_resolution=True,
    )
    written = []
    for index, record in enumerate(source.records[:count]):
        image = read_image(record)
        captions = [source.class_names[label] for label in record.labels]
        boxes = draw_boxes(image, record.boxes, record.labels, captions)
        item = spec_dataset[index]
        heatmap = (
            item["heatmap"].max(0).values.numpy() if len(source.class_names) else np.zeros((1, 1))
        )
        to_image = cv2.warpAffine(heatmap, item["meta"]["inverse_affine"].astype(np.float32),
                                  (record.width, record.height))
        path = out_dir / f"{record.image_id}_ground_truth.png"
        cv2.imwrite(str(path), np.concatenate([boxes, overlay(image, to_image)], axis=1))
        written.append(path)
    return written


def _display_spec():
    from .config import InputSpec

    # Targets at the image's own resolution, so the heatmap lines up with the picture.
    return InputSpec(input_size=(512, 512), keep_resolution=True)
