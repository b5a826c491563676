"""Affine maps between image pixels, network input and output map, as the original defines them.

A crop is described by a centre ``(cx, cy)`` and a scale ``s`` (the source width it covers, in
image pixels). `get_affine_transform` maps that source window onto an output of
``(width, height)``: ``x' = (x - cx) * width / s + width / 2`` and
``y' = (y - cy) * width / s + height / 2`` when unrotated; the same factor serves both axes so
the aspect ratio is kept.
"""

from __future__ import annotations

import math

import numpy as np


def _rotate(point: np.ndarray, radians: float) -> np.ndarray:
    sin, cos = math.sin(radians), math.cos(radians)
    return np.array([point[0] * cos - point[1] * sin, point[0] * sin + point[1] * cos])


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The point that makes a right angle at b, turning (a - b) by 90 degrees."""
    direction = a - b
    return b + np.array([-direction[1], direction[0]])


def _solve_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix mapping three source points onto three destination points."""
    design = np.concatenate([src, np.ones((3, 1))], axis=1)  # 3 x 3
    return np.linalg.solve(design, dst).T  # 2 x 3


def get_affine_transform(
    center: tuple[float, float] | np.ndarray,
    scale: float | tuple[float, float] | np.ndarray,
    output_size: tuple[int, int],
    rotation: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
    inverse: bool = False,
) -> np.ndarray:
    """2x3 float64 matrix from image pixels to an output of ``output_size = (width, height)``.

    Built, as the original, from three point pairs: the centre, the centre plus the rotated
    half-width "up" vector, and the third point of the right angle. Only ``scale[0]`` (the
    source width) sets the zoom; ``shift`` moves the source centre by ``scale * shift``.
    ``inverse=True`` gives the map from output back to image pixels.
    """
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (2,))
    center = np.asarray(center, dtype=np.float64)
    out_width, out_height = output_size
    source_center = center + scale * np.asarray(shift, dtype=np.float64)
    src = np.zeros((3, 2))
    dst = np.zeros((3, 2))
    src[0] = source_center
    src[1] = source_center + _rotate(np.array([0.0, -0.5 * scale[0]]), math.radians(rotation))
    dst[0] = [0.5 * out_width, 0.5 * out_height]
    dst[1] = dst[0] + np.array([0.0, -0.5 * out_width])
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    return _solve_affine(dst, src) if inverse else _solve_affine(src, dst)


def affine_transform(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine to points of shape (..., 2)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Map (N, 4) x1, y1, x2, y2 boxes by their two corners, as the original does (exact for
    the unrotated maps CenterNet uses)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    corners = affine_transform(boxes.reshape(-1, 2, 2), matrix)
    return corners.reshape(-1, 4)


def keep_resolution_size(height: int, width: int, pad: int = 31) -> tuple[int, int]:
    """Input (height, width) for keep-resolution testing: each side x becomes (x | pad) + 1,
    the next multiple of pad + 1 strictly above x - 1 (so 480 -> 512 but 512 -> 544)."""
    return (height | pad) + 1, (width | pad) + 1
