"""Turn head outputs into boxes: peaks of the heatmap, their size and offset, then (optionally)
back to image pixels.

`ctdet_decode` is the one decoder: eager PyTorch (predictor, evaluation) and the exported graph
(`detector.export`) both run it. It works on whole batches on any device, gives boxes in
**output-map coordinates**, and uses only operators every runtime has (max-pool peak
suppression and TopK, K clamped to the map size symbolically: no NonZero, no OneHot, which
TensorRT rejects), so torch.export and ONNX trace it with dynamic batch and image sizes.

`decode_centernet` is the CenterNet head type's adapter from one stack's raw outputs (heatmap
logits, optionally with the mirrored pass of the flip test) to it; `detections_to_image` maps
one image's boxes to **image pixels** through the inverse of the affine that made the input.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .tta import flip_merge

# A peak is a cell that equals the maximum of its 3x3 neighbourhood.
PEAK_WINDOW = 3


def _check_map(name: str, tensor: Tensor, batch: int, height: int, width: int) -> None:
    if (
        tensor.dim() != 4
        or tensor.shape[0] != batch
        or tensor.shape[1] != 2
        or tuple(tensor.shape[2:]) != (height, width)
    ):
        raise ValueError(
            f"ctdet_decode: {name} must be (B, 2, H, W) = {(batch, 2, height, width)}, "
            f"got {tuple(tensor.shape)}"
        )


def gather_pixels(dense: Tensor, pixels: Tensor) -> Tensor:
    """dense (B, D, H, W), pixels (B, K) flat cells -> (B, D, K) values at those cells."""
    batch, channels = dense.shape[:2]
    flat = dense.reshape(batch, channels, -1)
    return flat.gather(2, pixels.unsqueeze(1).expand(batch, channels, pixels.shape[1]))


def peak_topk(heatmap: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The K highest peaks of each image's class heatmaps: the peak suppression and top-K of
    `ctdet_decode`, shared by the head types' decoders.

    heatmap: (B, C, H, W) class probabilities. K: a positive integer, clamped to C * H * W
    (symbolically when traced).

    A cell survives peak suppression if it equals the maximum of its 3x3 neighbourhood, so
    plateaus (equal neighbouring maxima) all survive, as in the original. The top K is taken
    over all classes and cells at once.

    Returns (scores, labels, pixels, xs, ys), each (B, K), sorted by score, highest first:
    float32 scores, int64 0-based classes and flat cells ``y * W + x``, float32 integer cell
    columns and rows.
    """
    batch, classes, height, width = heatmap.shape
    cells = height * width
    # sym_min stays symbolic under torch.export (a Min of the runtime shape in the graph); on
    # plain ints it is min.
    K = torch.sym_min(int(K), classes * cells)

    heatmap = heatmap.float()
    neighbourhood_max = F.max_pool2d(heatmap, PEAK_WINDOW, stride=1, padding=PEAK_WINDOW // 2)
    peaks = heatmap * (neighbourhood_max == heatmap).to(heatmap.dtype)

    scores, flat_index = peaks.reshape(batch, -1).topk(K, dim=1)
    labels = torch.div(flat_index, cells, rounding_mode="floor")
    pixels = flat_index - labels * cells
    rows = torch.div(pixels, width, rounding_mode="floor")
    xs = (pixels - rows * width).float()
    ys = rows.float()
    return scores, labels, pixels, xs, ys


def ctdet_decode(heatmap: Tensor, wh: Tensor, offset: Tensor | None = None, K: int = 100) -> Tensor:
    """The top-K detections of each image, as the original's ``ctdet_decode``.

    heatmap: (B, C, H, W) class probabilities (already sigmoided).
    wh: (B, 2, H, W) box (width, height) in output-map cells.
    offset: (B, 2, H, W) sub-cell centre offset (x, y), or None, which places centres at
        cell + 0.5.
    K: detections per image, clamped to C * H * W (symbolically when traced).

    Peaks and top K as `peak_topk`; the original takes a per-class top K first, then a top K
    of those, which selects the same detections unless scores tie. No score threshold.

    Returns (B, K, 6) float32: x1, y1, x2, y2 in output-map coordinates, score, and the
    0-based class as a float; sorted by score, highest first. Only MaxPool, Equal, Mul, TopK,
    GatherElements, Div, Concat and shape arithmetic when exported.
    """
    if heatmap.dim() != 4:
        raise ValueError(f"ctdet_decode: heatmap must be (B, C, H, W), got {tuple(heatmap.shape)}")
    batch, classes, height, width = heatmap.shape
    _check_map("wh", wh, batch, height, width)
    if offset is not None:
        _check_map("offset", offset, batch, height, width)
    if int(K) != K or K < 1:
        raise ValueError(f"ctdet_decode: K must be a positive integer, got {K!r}")
    scores, labels, pixels, xs, ys = peak_topk(heatmap, K)
    if offset is None:
        xs = xs + 0.5
        ys = ys + 0.5
    else:
        centre_offset = gather_pixels(offset.float(), pixels)
        xs = xs + centre_offset[:, 0]
        ys = ys + centre_offset[:, 1]
    sizes = gather_pixels(wh.float(), pixels)
    half_width, half_height = sizes[:, 0] / 2, sizes[:, 1] / 2
    boxes = torch.stack(
        [xs - half_width, ys - half_height, xs + half_width, ys + half_height], dim=2
    )
    return torch.cat([boxes, scores.unsqueeze(2), labels.float().unsqueeze(2)], dim=2)


def decode_centernet(
    outputs: dict[str, Tensor],
    flipped_outputs: dict[str, Tensor] | None = None,
    max_detections: int = 100,
) -> Tensor:
    """(B, K, 6) detections in output-map coordinates (as `ctdet_decode`) from one stack's raw
    CenterNet heads: "heatmap" (B, C, H, W) logits, "wh" and optionally "offset" (B, 2, H, W).
    With the heads of the mirrored images, merged as the original's flip test does
    (`flip_merge`)."""
    if flipped_outputs is not None:
        heads = flip_merge(outputs, flipped_outputs)
    else:
        heads = {
            "heatmap": outputs["heatmap"].float().sigmoid(),
            "wh": outputs["wh"],
            "offset": outputs.get("offset"),
        }
    return ctdet_decode(heads["heatmap"], heads["wh"], heads["offset"], K=max_detections)


def detections_to_image(detections: np.ndarray | Tensor, inverse_affine: np.ndarray) -> np.ndarray:
    """Map one image's detections from output-map coordinates to image pixels.

    detections: (K, 6) x1, y1, x2, y2 (output map), score, class, e.g. ``ctdet_decode(...)[i]``.
    inverse_affine: 2x3 output-map -> image matrix,
        ``get_affine_transform(center, scale, (out_w, out_h), inverse=True)``.

    Both corners go through the affine (exact for the unrotated maps CenterNet uses); score and
    class are kept. Returns (K, 6) float64.
    """
    if isinstance(detections, Tensor):
        detections = detections.detach().cpu().numpy()
    detections = np.asarray(detections, dtype=np.float64)
    if detections.ndim != 2 or detections.shape[1] != 6:
        raise ValueError(
            f"detections_to_image: detections must be (K, 6) for one image, got {detections.shape}"
        )
    inverse_affine = np.asarray(inverse_affine, dtype=np.float64)
    if inverse_affine.shape != (2, 3):
        raise ValueError(
            f"detections_to_image: inverse_affine must be a 2x3 matrix, got {inverse_affine.shape}"
        )
    corners = detections[:, :4].reshape(-1, 2, 2)  # (K, corner, xy)
    mapped = corners @ inverse_affine[:, :2].T + inverse_affine[:, 2]
    result = detections.copy()
    result[:, :4] = mapped.reshape(-1, 4)
    return result
