import cv2
import numpy as np
import pytest

from detector.geometry import (
    affine_transform,
    get_affine_transform,
    keep_resolution_size,
    transform_boxes,
)


def _three_point_reference(
    center, scale, output_size, rotation=0.0, shift=(0.0, 0.0), inverse=False
):
    """The original's construction, through cv2.getAffineTransform on float32 points."""
    scale = np.broadcast_to(np.float32(scale), (2,))
    width, height = output_size
    radians = np.pi * rotation / 180
    direction = np.float32([0.5 * scale[0] * np.sin(radians), -0.5 * scale[0] * np.cos(radians)])
    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0] = np.float32(center) + scale * np.float32(shift)
    src[1] = src[0] + direction
    dst[0] = [0.5 * width, 0.5 * height]
    dst[1] = dst[0] + np.float32([0, -0.5 * width])
    for points in (src, dst):
        d = points[0] - points[1]
        points[2] = points[1] + np.float32([-d[1], d[0]])
    return cv2.getAffineTransform(dst, src) if inverse else cv2.getAffineTransform(src, dst)


@pytest.mark.parametrize(
    "center, scale, output_size, rotation, shift, inverse",
    [
        ((320, 240), 640, (512, 512), 0, (0, 0), False),
        ((320, 240), 640, (128, 128), 0, (0, 0), True),
        ((271.5, 180.0), [544, 384], (136, 96), 0, (0, 0), False),
        ((100, 80), 300, (128, 96), 0, (0.1, -0.05), False),
        ((100, 80), 300, (128, 96), 20, (0, 0), False),
    ],
)
def test_matches_the_original_construction(center, scale, output_size, rotation, shift, inverse):
    ours = get_affine_transform(center, scale, output_size, rotation, shift, inverse)
    reference = _three_point_reference(center, scale, output_size, rotation, shift, inverse)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4 * max(1, np.abs(reference).max()))


def test_closed_form_and_inverse():
    center, scale, (width, height) = np.array([300.0, 200.0]), 600.0, (128, 96)
    matrix = get_affine_transform(center, scale, (width, height))
    points = np.array([[0.0, 0.0], [300.0, 200.0], [599.0, 399.0]])
    expected = np.stack(
        [
            (points[:, 0] - 300) * width / scale + width / 2,
            (points[:, 1] - 200) * width / scale + height / 2,
        ],
        axis=1,
    )
    np.testing.assert_allclose(affine_transform(points, matrix), expected, atol=1e-9)
    inverse = get_affine_transform(center, scale, (width, height), inverse=True)
    np.testing.assert_allclose(affine_transform(expected, inverse), points, atol=1e-9)


def test_transform_boxes_maps_both_corners():
    matrix = get_affine_transform((64, 64), 128, (32, 32))
    np.testing.assert_allclose(
        transform_boxes(np.array([[0, 0, 128, 64]]), matrix), [[0, 0, 32, 16]]
    )


@pytest.mark.parametrize("size, expected", [(480, 512), (512, 544), (1, 32), (31, 32), (32, 64)])
def test_keep_resolution_size(size, expected):
    assert keep_resolution_size(size, size) == (expected, expected)
    assert keep_resolution_size(size, size, pad=127)[0] == (size | 127) + 1
