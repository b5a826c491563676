"""The training and test transforms against slow references of the original CenterNet's
formulas (crop draws, closed-form affine, box flip, sequential colour augmentation)."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from detector.config import InputSpec, input_preset
from detector.data import transforms

# An input spec whose normalisation is the identity on [0, 1] BGR values, so the network input
# times 255 is the warped image itself.
RAW_BGR = InputSpec(color_order="BGR", mean=(0, 0, 0), std=(1, 1, 1), input_size=(64, 64))
NO_AUGMENT = transforms.AugmentConfig(
    random_crop=False, shift=0.0, scale=0.0, flip=0.0, color=False
)


def textured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random BGR texture (interpolation differences stay small on it)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


# ---- slow references of the original's formulas -------------------------------------------


def reference_border(size: int, border: int = 128) -> int:
    while not size - border > border:
        border //= 2
    return border


def reference_affine(center, scale, out_width, out_height):
    """The unrotated map in closed form: x' = (x - cx) k + out_w / 2, y' = (y - cy) k + out_h / 2,
    k = out_w / s."""
    zoom = out_width / scale
    return np.array(
        [
            [zoom, 0.0, out_width / 2 - zoom * center[0]],
            [0.0, zoom, out_height / 2 - zoom * center[1]],
        ]
    )


def reference_train_geometry(image, boxes, augment, spec, seed):
    """The original ctdet.py crop / flip / box logic, one scalar at a time, drawing from the
    same generator in the same order as `train_transform`."""
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    cx, cy = width / 2.0, height / 2.0
    s = float(max(height, width))
    if augment.random_crop:
        s = s * rng.choice(np.arange(0.6, 1.4, 0.1))
        bx, by = reference_border(width), reference_border(height)
        cx = float(rng.integers(bx, width - bx))
        cy = float(rng.integers(by, height - by))
    else:
        dx, dy = rng.standard_normal(2)
        cx += s * min(max(dx * augment.shift, -2 * augment.shift), 2 * augment.shift)
        cy += s * min(max(dy * augment.shift, -2 * augment.shift), 2 * augment.shift)
        s = s * min(
            max(rng.standard_normal() * augment.scale + 1, 1 - augment.scale), 1 + augment.scale
        )
    boxes = np.array(boxes, dtype=np.float32)
    flipped = rng.random() < augment.flip
    if flipped:
        image = image[:, ::-1].copy()
        cx = width - cx - 1
        for box in boxes:
            x1, x2 = box[0], box[2]
            box[0], box[2] = width - x2 - 1, width - x1 - 1
    in_h, in_w = spec.input_size
    out_h, out_w = in_h // spec.down_ratio, in_w // spec.down_ratio
    warped = cv2.warpAffine(
        image, reference_affine((cx, cy), s, in_w, in_h), (in_w, in_h), flags=cv2.INTER_LINEAR
    )
    output_affine = reference_affine((cx, cy), s, out_w, out_h)
    out_boxes = np.zeros_like(boxes)
    for k, box in enumerate(boxes):
        for corner in (0, 2):
            x, y = box[corner], box[corner + 1]
            out_boxes[k, corner] = output_affine[0, 0] * x + output_affine[0, 2]
            out_boxes[k, corner + 1] = output_affine[1, 1] * y + output_affine[1, 2]
    return (cx, cy), s, flipped, warped, output_affine, out_boxes


def reference_color_aug(image_bgr, order, alphas, lighting_noise):
    """The original's color_aug, step by step on a float BGR image in [0, 1]."""
    image = image_bgr.astype(np.float32) / 255.0
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    grey_mean = grey.mean()
    for step, alpha in zip(order, alphas, strict=True):
        if step == "brightness":
            image *= alpha
        elif step == "contrast":
            image = image * alpha + (1 - alpha) * grey_mean
        else:
            image = image * alpha + (1 - alpha) * grey[:, :, None]
    eigenvalues = np.array([0.2141788, 0.01817699, 0.00341571])
    eigenvectors = np.array(
        [
            [-0.58752847, -0.69563484, 0.41340352],
            [-0.5832747, 0.00994535, -0.81221408],
            [-0.56089297, 0.71832671, 0.41158938],
        ]
    )
    image += eigenvectors @ (eigenvalues * lighting_noise)
    return image


def normalise(image_bgr01, spec):
    """(x - mean) / std in spec.color_order, CHW."""
    image = image_bgr01[:, :, ::-1] if spec.color_order == "RGB" else image_bgr01
    return ((image - np.array(spec.mean)) / np.array(spec.std)).transpose(2, 0, 1)


# ---- geometry ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, border", [(96, 32), (100, 32), (200, 64), (256, 64), (257, 128), (640, 128), (1, 0)]
)
def test_crop_border_hand_values(size, border):
    assert transforms.crop_border(128, size) == border == reference_border(size)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("random_crop", [True, False])
@pytest.mark.parametrize("flip", [0.0, 1.0, 0.5])
def test_train_geometry_matches_original(seed, random_crop, flip):
    image = textured_image(96, 128, seed)
    boxes = np.array([[10.0, 12.0, 50.0, 60.0], [70.5, 3.25, 127.0, 95.0]], dtype=np.float32)
    augment = transforms.AugmentConfig(random_crop=random_crop, flip=flip, color=False)
    network_input, out_boxes, labels, meta = transforms.train_transform(
        image, boxes, np.array([0, 1]), RAW_BGR, augment, np.random.default_rng(seed)
    )
    center, scale, flipped, warped, output_affine, expected_boxes = reference_train_geometry(
        image, boxes, augment, RAW_BGR, seed
    )
    np.testing.assert_allclose(meta["center"], center, rtol=0, atol=1e-9)
    assert meta["scale"] == pytest.approx(scale, rel=1e-12)
    assert meta["flipped"] == flipped
    np.testing.assert_allclose(meta["output_affine"], output_affine, atol=1e-9)
    np.testing.assert_allclose(out_boxes, expected_boxes, atol=1e-4)
    assert out_boxes.dtype == np.float32
    np.testing.assert_array_equal(labels, [0, 1])
    # The warp: identity normalisation, so input * 255 is the warped uint8 image.
    assert network_input.shape == (3, 64, 64) and network_input.dtype == np.float32
    restored = np.rint(network_input.transpose(1, 2, 0) * 255).astype(np.int16)
    np.testing.assert_array_equal(restored, warped)


def test_flip_boxes_hand_values_and_involution():
    boxes = np.array([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 128.0, 96.0]])
    flipped = transforms.flip_boxes(boxes, 128)
    np.testing.assert_array_equal(flipped, [[77, 20, 117, 60], [-1, 0, 127, 96]])
    np.testing.assert_array_equal(transforms.flip_boxes(flipped, 128), boxes)


def test_flip_mirrors_pixels_and_boxes_together():
    """A box drawn on the image lands where the flipped box says."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[10:20, 5:15] = 255  # pixels x 5..14, y 10..19
    box = np.array([[5.0, 10.0, 14.0, 19.0]])  # pixel-index box, the convention the -1 suits
    spec = InputSpec(
        color_order="BGR", mean=(0, 0, 0), std=(1, 1, 1), input_size=(64, 64), down_ratio=1
    )
    augment = transforms.AugmentConfig(random_crop=False, shift=0, scale=0, flip=1.0, color=False)
    network_input, out_boxes, _, meta = transforms.train_transform(
        image, box, np.array([0]), spec, augment, np.random.default_rng(0)
    )
    assert meta["flipped"]
    ys, xs = np.nonzero(network_input[0] > 0.5)
    np.testing.assert_allclose(out_boxes[0], [xs.min(), ys.min(), xs.max(), ys.max()])


def test_train_inverse_affine_maps_back_to_unflipped_image():
    augment = transforms.AugmentConfig(flip=1.0, color=False)
    image = textured_image(96, 128)
    boxes = np.array([[30.0, 20.0, 70.0, 60.0]])
    _, out_boxes, _, meta = transforms.train_transform(
        image, boxes, np.array([0]), RAW_BGR, augment, np.random.default_rng(3)
    )
    corners = out_boxes.reshape(2, 2).astype(np.float64)
    back = corners @ meta["inverse_affine"][:, :2].T + meta["inverse_affine"][:, 2]
    # Mirroring reverses x, so the corners come back swapped in x; the flip's -1 cancels.
    np.testing.assert_allclose(back, [[70, 20], [30, 60]], atol=1e-4)


def test_sample_crop_ranges():
    rng = np.random.default_rng(0)
    augment = transforms.AugmentConfig()
    factors = set()
    for _ in range(200):
        center, scale = transforms.sample_crop(300, 200, augment, rng)
        assert 64 <= center[0] < 200 - 64 and 128 <= center[1] < 300 - 128
        assert center[0] == int(center[0]) and center[1] == int(center[1])
        factors.add(round(scale / 300, 6))
    assert factors == {0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3}


def test_shift_scale_jitter_is_clipped():
    rng = np.random.default_rng(0)
    augment = transforms.AugmentConfig(random_crop=False)
    for _ in range(500):
        center, scale = transforms.sample_crop(100, 100, augment, rng)
        assert np.all(np.abs(center - 50) <= 100 * 0.2 + 1e-9)
        assert 60 - 1e-9 <= scale <= 140 + 1e-9


# ---- test-time pre-processing ---------------------------------------------------------------


def test_keep_resolution_sizes_centre_scale():
    image = np.zeros((480, 640, 3), np.uint8)
    spec = input_preset("centernet")
    network_input, meta = transforms.test_transform(image, spec)
    assert network_input.shape == (3, 512, 672)
    assert meta["input_size"] == (512, 672) and meta["output_size"] == (128, 168)
    np.testing.assert_array_equal(meta["center"], [320, 240])
    assert meta["scale"] == 672
    # A pure translation: image pixel (0, 0) lands at (672/2 - 320, 512/2 - 240) = (16, 16).
    np.testing.assert_allclose(meta["output_affine"] * 4, [[1, 0, 16], [0, 1, 16]], atol=1e-9)


@pytest.mark.parametrize(
    "keep_resolution, scale, input_size, center, source_width",
    [
        (False, 1.0, (64, 64), (64, 48), 128),
        (False, 0.5, (64, 64), (32, 24), 128),  # s stays max(H, W) of the original image
        (False, 0.75, (64, 64), (48, 36), 128),
        (True, 1.0, (128, 160), (64, 48), 160),
        (True, 0.5, (64, 96), (32, 24), 96),
        (True, 0.75, (96, 128), (48, 36), 128),  # 72 -> 96, 96 -> 128
    ],
)
def test_test_transform_sizes(keep_resolution, scale, input_size, center, source_width):
    image = textured_image(96, 128)
    spec = input_preset("imagenet", (64, 64))
    network_input, meta = transforms.test_transform(image, spec, scale, keep_resolution)
    assert network_input.shape == (3, *input_size) and network_input.dtype == np.float32
    assert meta["input_size"] == input_size
    assert meta["output_size"] == (input_size[0] // 4, input_size[1] // 4)
    assert meta["original_size"] == (96, 128)
    np.testing.assert_array_equal(meta["center"], center)
    assert meta["scale"] == source_width
    expected_output = reference_affine(center, source_width, input_size[1] // 4, input_size[0] // 4)
    np.testing.assert_allclose(meta["output_affine"], expected_output, atol=1e-9)
    # inverse_affine undoes output_affine and the resize: original pixels -> map -> original.
    points = np.array([[0.0, 0.0], [128.0, 96.0], [31.5, 70.25]])
    on_map = points * scale @ meta["output_affine"][:, :2].T + meta["output_affine"][:, 2]
    back = on_map @ meta["inverse_affine"][:, :2].T + meta["inverse_affine"][:, 2]
    np.testing.assert_allclose(back, points, atol=1e-9)


def test_test_transform_pixels_are_normalised_warp():
    image = textured_image(96, 128)
    spec = input_preset("imagenet", (64, 64))
    network_input, meta = transforms.test_transform(image, spec)
    affine = reference_affine(meta["center"], meta["scale"], 64, 64)
    warped = cv2.warpAffine(image, affine, (64, 64), flags=cv2.INTER_LINEAR)
    expected = normalise(warped / 255.0, spec)
    np.testing.assert_allclose(network_input, expected, atol=1e-5)


# ---- colour ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["imagenet", "centernet"])
def test_identity_geometry_without_colour_is_plain_normalisation(preset):
    image = textured_image(64, 64)
    spec = input_preset(preset, (64, 64))
    network_input, _, _, meta = transforms.train_transform(
        image, np.zeros((0, 4)), np.zeros(0), spec, NO_AUGMENT, np.random.default_rng(0)
    )
    np.testing.assert_allclose(meta["output_affine"], [[0.25, 0, 0], [0, 0.25, 0]], atol=1e-12)
    expected = normalise(image / 255.0, spec)
    np.testing.assert_allclose(network_input, expected, rtol=0, atol=1e-5)
    # Channel order matters far beyond that tolerance.
    assert np.abs(network_input - expected[::-1]).max() > 0.1


@pytest.mark.parametrize("order", list(itertools.permutations(transforms.COLOR_STEPS)))
def test_fused_colour_matches_sequential_original(order):
    image = textured_image(48, 40)
    alphas = np.array([0.7, 1.3, 1.15])
    noise = np.array([0.12, -0.05, 0.2])
    spec = input_preset("centernet", (48, 40))
    channel_means = np.array(cv2.mean(image)[:3]) / 255
    grey_mean = float(transforms.GREY_WEIGHTS_BGR @ channel_means)
    gain, offset = transforms.color_jitter_affine(order, alphas, noise, grey_mean)
    fused = transforms.apply_pixel_affine(image, transforms.pixel_affine(spec, gain, offset))
    expected = normalise(reference_color_aug(image, order, alphas, noise), spec)
    np.testing.assert_allclose(fused, expected, rtol=0, atol=1e-4)


def test_colour_changes_statistics_not_geometry():
    image = textured_image(64, 64, seed=1)
    spec = input_preset("imagenet", (64, 64))
    colour = transforms.AugmentConfig(random_crop=False, shift=0, scale=0, flip=0, color=True)
    plain, boxes_plain, _, _ = transforms.train_transform(
        image, [[4, 4, 40, 40]], [0], spec, NO_AUGMENT, np.random.default_rng(5)
    )
    jittered, boxes_jittered, _, _ = transforms.train_transform(
        image, [[4, 4, 40, 40]], [0], spec, colour, np.random.default_rng(5)
    )
    np.testing.assert_array_equal(boxes_plain, boxes_jittered)
    assert np.abs(jittered.mean(axis=(1, 2)) - plain.mean(axis=(1, 2))).max() > 0.01
    # Every output pixel is the same affine function of the same input pixel: a least-squares
    # fit jittered = G @ plain + o leaves no residual, so no pixel moved.
    design = np.concatenate([plain.reshape(3, -1), np.ones((1, 64 * 64))]).T
    solution, *_ = np.linalg.lstsq(design, jittered.reshape(3, -1).T, rcond=None)
    assert np.abs(design @ solution - jittered.reshape(3, -1).T).max() < 1e-4


def test_train_colour_uses_the_documented_draw_order():
    image = textured_image(64, 64, seed=2)
    spec = input_preset("centernet", (64, 64))
    colour = transforms.AugmentConfig(random_crop=False, shift=0, scale=0, flip=0, color=True)
    network_input, _, _, _ = transforms.train_transform(
        image, np.zeros((0, 4)), np.zeros(0), spec, colour, np.random.default_rng(11)
    )
    replay = np.random.default_rng(11)
    replay.standard_normal(2), replay.standard_normal(), replay.random()  # crop, flip
    order, alphas, noise = transforms.sample_color_jitter(replay)
    expected = normalise(reference_color_aug(image, order, alphas, noise), spec)
    np.testing.assert_allclose(network_input, expected, rtol=0, atol=1e-4)


def test_rgb_and_bgr_models_see_the_same_augmented_picture():
    image = textured_image(96, 128, seed=4)
    bgr = input_preset("centernet", (64, 64))
    rgb = InputSpec(color_order="RGB", mean=bgr.mean[::-1], std=bgr.std[::-1], input_size=(64, 64))
    augment = transforms.AugmentConfig()
    from_bgr, *_ = transforms.train_transform(image, [], [], bgr, augment, np.random.default_rng(9))
    from_rgb, *_ = transforms.train_transform(image, [], [], rgb, augment, np.random.default_rng(9))
    np.testing.assert_allclose(from_rgb, from_bgr[::-1], atol=1e-5)


def test_pca_constants():
    # Eigenvectors of a covariance matrix: orthonormal columns, eigenvalues descending.
    np.testing.assert_allclose(
        transforms.EIGENVECTORS.T @ transforms.EIGENVECTORS, np.eye(3), atol=1e-6
    )
    assert np.all(np.diff(transforms.EIGENVALUES) < 0)
    # The main component is brightness: all three channels move together.
    assert np.all(transforms.EIGENVECTORS[:, 0] < -0.5)
    # The grey weights are cv2's BGR2GRAY on float images.
    pixels = np.random.default_rng(0).random((4, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(
        cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY), pixels @ transforms.GREY_WEIGHTS_BGR, atol=1e-6
    )


# ---- errors ------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    spec = input_preset("imagenet", (64, 64))
    with pytest.raises(ValueError, match=r"uint8 BGR image, got float32"):
        transforms.test_transform(np.zeros((8, 8, 3), np.float32), spec)
    with pytest.raises(ValueError, match=r"shape \(8, 8\)"):
        transforms.train_transform(
            np.zeros((8, 8), np.uint8),
            [],
            [],
            spec,
            transforms.AugmentConfig(),
            np.random.default_rng(0),
        )
    with pytest.raises(ValueError, match="augment.flip"):
        transforms.AugmentConfig(flip=1.5)
    with pytest.raises(ValueError, match="augment.scale"):
        transforms.AugmentConfig(scale=1.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        transforms.test_transform(np.zeros((8, 8, 3), np.uint8), spec, scale=0)
