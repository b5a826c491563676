"""Inference: from images to boxes in image pixels, with class names.

`detect` runs a model on a batch of prepared inputs and decodes its last stack (with the
original's flip test when asked); `Predictor` adds what a user needs around it: the input spec
from the checkpoint, image reading, test scales merged with soft-NMS, and class names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_model
from ..config import ModelConfig
from ..data.images import read_image_file
from ..data.transforms import test_transform
from ..heads import head_type
from .decode import detections_to_image
from .tta import merge_multiscale


@torch.no_grad()
def detect(
    model: nn.Module,
    images: torch.Tensor,
    *,
    flip: bool = False,
    max_detections: int = 100,
    head: str = "centernet",
) -> torch.Tensor:
    """(B, K, 6) detections in output-map coordinates for a batch of prepared inputs
    (B, 3, H, W), decoded by the decoder of head type ``head`` (the model config's ``head``).
    With ``flip`` the mirrored batch runs in the same forward pass."""
    return head_type(head).decode(*_last_stack(model, images, flip), max_detections)


def _last_stack(
    model: nn.Module, images: torch.Tensor, flip: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The last stack's raw outputs of ``images`` and, with ``flip``, of their mirror images
    (None without), from one forward pass."""
    if not flip:
        return model(images)[-1], None
    batch = len(images)
    outputs = model(torch.cat([images, images.flip(-1)]))[-1]
    plain = {key: value[:batch] for key, value in outputs.items()}
    mirrored = {key: value[batch:] for key, value in outputs.items()}
    return plain, mirrored


@dataclass
class Detections:
    """One image's detections, highest score first."""

    boxes: np.ndarray
    """(N, 4) float32 x1, y1, x2, y2 in image pixels."""
    scores: np.ndarray
    """(N,) float32."""
    labels: np.ndarray
    """(N,) int64 class indices."""
    names: list[str]
    """Class name of each detection."""

    def as_array(self) -> np.ndarray:
        """(N, 6) x1, y1, x2, y2, score, class: the layout evaluation takes."""
        return np.concatenate(
            [self.boxes, self.scores[:, None], self.labels[:, None]], axis=1
        ).astype(np.float32)


def read_bgr(image: np.ndarray | str | Path) -> np.ndarray:
    """An (H, W, 3) uint8 BGR array from a path or an array (arrays are taken as BGR, as cv2
    reads them; convert RGB arrays first). Files are read by `read_image_file`: a truncated
    or unreadable file raises naming it; 16-bit, grey and 4-channel images are converted."""
    if isinstance(image, (str, Path)):
        return read_image_file(image)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {array.dtype} {array.shape}")
    return array


class Predictor:
    """Detections in image pixels for a trained model.

    >>> predictor = Predictor.from_checkpoint("best.pt")
    >>> [result] = predictor.predict(["street.jpg"])
    >>> result.boxes, result.scores, result.names
    """

    def __init__(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        *,
        device: str | torch.device | None = None,
        flip: bool = False,
        scales: tuple[float, ...] = (1.0,),
        max_detections: int = 100,
        keep_resolution: bool | None = None,
        soft_nms: str = "gaussian",
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        if hasattr(self.model, "head_stacks"):
            # Decoding reads the last stack only: a multi-stack model (hourglass) need not
            # compute the earlier stacks' heads (29 of hourglass104's 293 GMACs at 512 px).
            self.model.head_stacks = "last"
        self.config = model_config
        self.flip, self.scales, self.max_detections = flip, tuple(scales), max_detections
        self.keep_resolution, self.soft_nms = keep_resolution, soft_nms
        names = model_config.class_names
        self.class_names = (
            list(names) if names else [str(i) for i in range(model_config.num_classes)]
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path, **options) -> Predictor:
        """A checkpoint, or an exported ``.onnx`` file with its metadata (run in onnxruntime
        through `detector.inference.onnx_model.OnnxModel`, with the same pre-processing and
        decoding)."""
        from .onnx_model import is_onnx_file, load_onnx_model

        if is_onnx_file(path):
            model, info = load_onnx_model(path)
            return cls(model, info.model_config, **options)
        model, checkpoint = load_model(path)
        return cls(model, checkpoint.model_config, **options)

    def predict_one(self, image: np.ndarray | str | Path) -> np.ndarray:
        """(N, 6) x1, y1, x2, y2, score, class in image pixels for one image."""
        return self.predict_rows([image])[0]

    def predict_rows(self, images: list) -> list[np.ndarray]:
        """(N, 6) x1, y1, x2, y2, score, class in image pixels for each image (paths or BGR
        arrays), in input order. Per test scale, the images whose prepared inputs have the same
        size (all of them at a fixed input size; those of one size with keep_resolution) run
        through the model in one forward pass. Several scales are merged by the head type's
        ``merge_scales`` when it has one (`detector.heads.ScaleMerge`: the keypoint triplet
        pools its corner pairs before centre matching), else with per-class soft-NMS
        (`merge_multiscale`)."""
        images = [read_bgr(image) for image in images]
        head = head_type(self.config.head)
        # A single scale is decoded by the head's decoder; several are merged by the head
        # type's own merge when it has one (the keypoint triplet's), else per-class soft-NMS.
        merge = head.merge_scales if len(self.scales) > 1 else None
        per_image: list[list[np.ndarray]] = [[] for _ in images]
        for scale in self.scales:
            prepared = [
                test_transform(image, self.config.input, scale, self.keep_resolution)
                for image in images
            ]
            groups: dict[tuple[int, ...], list[int]] = {}
            for position, (network_input, _) in enumerate(prepared):
                groups.setdefault(network_input.shape, []).append(position)
            for positions in groups.values():
                batch = torch.from_numpy(
                    np.stack([prepared[position][0] for position in positions])
                ).to(self.device)
                with torch.no_grad():
                    outputs = _last_stack(self.model, batch, self.flip)
                    if merge is None:
                        decoded = {"detections": head.decode(*outputs, self.max_detections)}
                    else:
                        decoded = merge.decode(*outputs, self.max_detections)
                decoded = {name: value.cpu().numpy() for name, value in decoded.items()}
                for index, position in enumerate(positions):
                    inverse_affine = prepared[position][1]["inverse_affine"]
                    arrays = {name: value[index] for name, value in decoded.items()}
                    per_image[position].append(
                        detections_to_image(arrays["detections"], inverse_affine)
                        if merge is None
                        else merge.to_image(arrays, inverse_affine)
                    )
        if merge is not None:
            return [
                merge.merge(per_scale, self.scales, self.config.num_classes,
                            self.max_detections, self.soft_nms)
                for per_scale in per_image
            ]
        if len(self.scales) == 1:
            return [per_scale[0].astype(np.float32) for per_scale in per_image]
        return [
            merge_multiscale(per_scale, self.config.num_classes, self.max_detections,
                             self.soft_nms)
            for per_scale in per_image
        ]

    def predict(self, images: list, score_threshold: float = 0.0) -> list[Detections]:
        """Detections for each image (paths or BGR arrays), keeping scores >= threshold, in
        input order; images of one prepared size share one forward pass (`predict_rows`)."""
        results = []
        for rows in self.predict_rows(images):
            rows = rows[rows[:, 4] >= score_threshold]
            labels = rows[:, 5].astype(np.int64)
            results.append(
                Detections(
                    boxes=rows[:, :4].astype(np.float32),
                    scores=rows[:, 4].astype(np.float32),
                    labels=labels,
                    names=[self.class_names[i] for i in labels],
                )
            )
        return results
