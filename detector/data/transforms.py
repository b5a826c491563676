"""Image -> network input and boxes -> output-map frame, as the original CenterNet's ctdet
pipeline does it, with the same geometry and augmentations but fewer passes over the pixels.

Frames: images arrive as cv2 reads them (H x W x 3 uint8, **BGR**); boxes are x1, y1, x2, y2 in
image pixels. A crop is a centre ``(cx, cy)`` and a scale ``s`` (the source width it covers,
image pixels); `detector.geometry.get_affine_transform` maps it onto the input
(``spec.input_size``) and, with the same centre and scale, onto the output map (input / down
ratio). The network input is (3, H, W) float32 in ``spec.color_order``, normalised with
``spec.mean`` / ``spec.std``.

Speed: the original converts the warped image to float, runs its colour augmentation and
normalisation as about a dozen float passes with temporaries (about 7.7 ms per 512 px item).
Every one of those steps is affine in the pixel values, and the grey image they use is computed
once, before the three jitter steps, so the whole chain (/255, brightness, contrast, saturation,
PCA lighting, channel order, mean/std) folds into one 3x4 matrix per image: `pixel_affine`
builds it and `apply_pixel_affine` applies it to the warped uint8 image in one cv2 pass, then
transposes to CHW (under a millisecond). The warp itself is the original's: cv2.warpAffine,
INTER_LINEAR, zero border, on uint8.

Randomness: every draw comes from the ``np.random.Generator`` passed in, in a fixed order
(crop, flip, colour), so an item is reproducible from its generator alone. The original draws
the crop and flip from numpy's global RNG, the jitter order from python's ``random`` and the
jitter amounts from one ``RandomState(123)`` shared by the dataset, so its augmentations depend
on worker scheduling; the distributions are the same, the streams are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from detector.config import InputSpec, require_number
from detector.geometry import get_affine_transform, keep_resolution_size, transform_boxes

# The original's random-crop scale factors, written as it writes them: np.arange gives the 8
# values 0.6, 0.7, ..., 1.3 (1.4 excluded), with arange's own rounding.
CROP_SCALE_FACTORS = np.arange(0.6, 1.4, 0.1)
# Largest margin (image pixels) kept between a random crop centre and the image edge.
CROP_BORDER = 128

# Colour jitter (CornerNet's): each step draws alpha = 1 + U(-COLOR_JITTER, COLOR_JITTER).
COLOR_JITTER = 0.4
COLOR_STEPS = ("brightness", "contrast", "saturation")
# Standard deviation of the PCA-lighting noise (AlexNet's "fancy PCA" amount).
LIGHTING_STD = 0.1
# PCA of pixel colours (CornerNet's constants, reused by CenterNet): eigenvalues, and
# eigenvectors as columns. Rows are indexed by **BGR** channel, since the original adds
# ``EIGENVECTORS @ (EIGENVALUES * noise)`` to BGR images.
EIGENVALUES = np.array([0.2141788, 0.01817699, 0.00341571])
EIGENVECTORS = np.array(
    [
        [-0.58752847, -0.69563484, 0.41340352],
        [-0.5832747, 0.00994535, -0.81221408],
        [-0.56089297, 0.71832671, 0.41158938],
    ]
)
# ITU-R BT.601 luma weights in BGR order: what cv2.COLOR_BGR2GRAY computes on float images,
# i.e. the original's grey image.
GREY_WEIGHTS_BGR = np.array([0.114, 0.587, 0.299])

# Row j of the output takes BGR channel CHANNEL_SOURCES[order][j].
CHANNEL_SOURCES = {"BGR": (0, 1, 2), "RGB": (2, 1, 0)}
PIXEL_MAX = 255.0


@dataclass
class AugmentConfig:
    """Training augmentation; the defaults are the original's ctdet defaults."""

    random_crop: bool = True
    """CornerNet random crop: scale the crop by one of 0.6, 0.7, ..., 1.3 and put its centre
    uniformly in the image, at least `crop_border` pixels from the edges. False uses the
    shift/scale jitter below instead (the original's ``--not_rand_crop``)."""
    shift: float = 0.1
    """Without random_crop: the centre moves by ``s * clip(N(0, 1) * shift, -2 shift, 2 shift)``
    along each axis (shift >= 0)."""
    scale: float = 0.4
    """In [0, 1). Without random_crop: ``s *= clip(N(0, 1) * scale + 1, 1 - scale, 1 + scale)``."""
    flip: float = 0.5
    """Probability of a horizontal mirror, in [0, 1]."""
    color: bool = True
    """CornerNet colour augmentation: brightness, contrast and saturation jitter in random
    order, then PCA lighting noise."""

    def __post_init__(self) -> None:
        flip = self.flip
        if isinstance(flip, bool) or not isinstance(flip, (int, float)) or not 0 <= flip <= 1:
            raise ValueError(f"augment.flip: expected a probability in [0, 1], got {self.flip!r}")
        require_number(self.shift, "augment.shift", at_least=0)
        require_number(self.scale, "augment.scale", at_least=0, below=1)


def crop_border(border: int, size: int) -> int:
    """The margin for random crop centres along a side of ``size`` pixels: ``border`` halved
    (integer division) until it is less than half the side, so that
    ``[margin, size - margin)`` is never empty (128 for sides >= 257, 64 for 200..256)."""
    divisor = 1
    while size - border // divisor <= border // divisor:
        divisor *= 2
    return border // divisor


def sample_crop(
    height: int, width: int, augment: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Draw a training crop of an image: (centre (2,) float64 x, y in image pixels, scale).

    The unaugmented crop is the whole image: centre (W/2, H/2), scale max(H, W). Draws, in
    order: random crop -> scale factor, centre x, centre y (integers); otherwise -> shift x,
    shift y, scale factor (standard normals).
    """
    center = np.array([width / 2.0, height / 2.0])
    scale = float(max(height, width))
    if augment.random_crop:
        scale *= float(rng.choice(CROP_SCALE_FACTORS))
        border_x = crop_border(CROP_BORDER, width)
        border_y = crop_border(CROP_BORDER, height)
        center[0] = rng.integers(border_x, width - border_x)
        center[1] = rng.integers(border_y, height - border_y)
    else:
        shift_limit = 2 * augment.shift
        center += scale * np.clip(rng.standard_normal(2) * augment.shift, -shift_limit, shift_limit)
        scale *= float(
            np.clip(rng.standard_normal() * augment.scale + 1, 1 - augment.scale, 1 + augment.scale)
        )
    return center, scale


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror (N, 4) x1, y1, x2, y2 boxes of an image ``width`` pixels wide, the original's
    way: x1' = W - x2 - 1, x2' = W - x1 - 1 (pixel-index mirroring, y unchanged)."""
    flipped = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    flipped[:, [0, 2]] = width - flipped[:, [2, 0]] - 1
    return flipped


def mirror_affine(width: int) -> np.ndarray:
    """2x3 map of pixel x -> W - 1 - x (cv2.flip's mirror), y unchanged."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0]])


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """2x3 matrix of ``outer(inner(p))``."""
    return outer[:, :2] @ inner + np.concatenate([np.zeros((2, 2)), outer[:, 2:]], axis=1)


def sample_color_jitter(rng: np.random.Generator) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Draw a colour augmentation: (step order, the steps' alphas (3,), lighting noise (3,)).

    Draws, in order: a permutation of the three steps, one U(-0.4, 0.4) per step in that order
    (alpha = 1 + draw), and three N(0, LIGHTING_STD) for PCA lighting, as the original's
    ``color_aug`` draws them.
    """
    order = tuple(COLOR_STEPS[i] for i in rng.permutation(len(COLOR_STEPS)))
    alphas = 1.0 + rng.uniform(-COLOR_JITTER, COLOR_JITTER, size=len(order))
    lighting_noise = rng.normal(0.0, LIGHTING_STD, size=3)
    return order, alphas, lighting_noise


def color_jitter_affine(
    order: tuple[str, ...], alphas: np.ndarray, lighting_noise: np.ndarray, grey_mean: float
) -> tuple[np.ndarray, np.ndarray]:
    """The original's colour augmentation as one affine map on BGR pixels in [0, 1].

    With x0 the pixel and g = GREY_WEIGHTS_BGR . x0 its grey value (computed once, before the
    steps, as the original does), each step maps the running value x:

    - brightness: x <- a x
    - contrast:   x <- a x + (1 - a) grey_mean   (grey_mean: mean of g over the whole image)
    - saturation: x <- a x + (1 - a) g

    so after all three x = k x0 + m g + c for scalars k, m, c; lighting then adds
    ``EIGENVECTORS @ (EIGENVALUES * noise)`` per channel.

    Returns (gain (3, 3), offset (3,)) float64 with ``x = gain @ x0 + offset``, BGR -> BGR.
    """
    identity_weight, grey_weight, constant = 1.0, 0.0, 0.0
    for step, alpha in zip(order, alphas, strict=True):
        identity_weight *= alpha
        grey_weight *= alpha
        constant *= alpha
        if step == "contrast":
            constant += (1.0 - alpha) * grey_mean
        elif step == "saturation":
            grey_weight += 1.0 - alpha
        elif step != "brightness":
            raise ValueError(f"unknown colour step {step!r}; known steps: {list(COLOR_STEPS)}")
    gain = identity_weight * np.eye(3) + grey_weight * np.outer(np.ones(3), GREY_WEIGHTS_BGR)
    offset = constant + EIGENVECTORS @ (EIGENVALUES * np.asarray(lighting_noise, dtype=np.float64))
    return gain, offset


def pixel_affine(
    spec: InputSpec, gain: np.ndarray | None = None, offset: np.ndarray | None = None
) -> np.ndarray:
    """3x4 float32 matrix from BGR uint8 pixels to normalised network input in
    ``spec.color_order``: row j gives ``(x[src_j] - mean_j) / std_j`` with
    ``x = gain @ (pixel / 255) + offset`` (BGR) and src_j the BGR channel shown in output
    channel j. No gain/offset means no colour augmentation.

    The colour augmentation always acts on BGR values, as in the original (its grey weights and
    PCA eigenvectors are BGR), so an RGB model sees the same perturbed picture as a BGR one;
    only the channel order and statistics of its input differ.
    """
    gain = np.eye(3) if gain is None else np.asarray(gain, dtype=np.float64)
    offset = np.zeros(3) if offset is None else np.asarray(offset, dtype=np.float64)
    sources = list(CHANNEL_SOURCES[spec.color_order])
    mean = np.asarray(spec.mean, dtype=np.float64)
    std = np.asarray(spec.std, dtype=np.float64)
    matrix = np.empty((3, 4))
    matrix[:, :3] = gain[sources] / PIXEL_MAX / std[:, None]
    matrix[:, 3] = (offset[sources] - mean) / std
    return matrix.astype(np.float32)


def apply_pixel_affine(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image and a 3x4 pixel matrix -> (3, H, W) float32 ``matrix @ [p, 1]``
    per pixel, in one cv2 pass plus one transpose copy."""
    pixels = image.astype(np.float32)
    cv2.transform(pixels, matrix, dst=pixels)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def warp(image: np.ndarray, affine: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.warpAffine to ``size = (height, width)``, bilinear, zero (black) border."""
    height, width = size
    return cv2.warpAffine(
        image, affine, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )


def _check_image(image: np.ndarray, name: str) -> None:
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or (image.shape[2] != 3)
    ):
        described = (
            f"{image.dtype} array of shape {image.shape}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(f"{name}: expected an (H, W, 3) uint8 BGR image, got {described}")


def _output_size(input_size: tuple[int, int], down_ratio: int) -> tuple[int, int]:
    return input_size[0] // down_ratio, input_size[1] // down_ratio


def train_transform(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    spec: InputSpec,
    augment: AugmentConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One augmented training sample, the original's ctdet way (fixed input size).

    image: (H, W, 3) uint8 BGR, as cv2.imread gives it.
    boxes: (N, 4) x1, y1, x2, y2 in image pixels; labels: (N,).

    Steps: crop (`sample_crop`), mirror with probability ``augment.flip`` (image, centre
    ``c_x = W - c_x - 1`` and boxes as `flip_boxes`), warp to ``spec.input_size``, colour
    augmentation and normalisation (`pixel_affine`).

    Returns:
        input: (3, H_in, W_in) float32, normalised, in ``spec.color_order``.
        boxes: (N, 4) float32 in output-map coordinates (input / down_ratio), **not clipped**
            and in the given order (``encode_targets`` clips them and keeps slot k for box k).
            float32 as the original stores them, so its rounding is reproduced.
        labels: (N,) as given.
        meta: ``center`` (2,) and ``scale`` (source width) of the crop in the (mirrored, if
            flipped) image, ``flipped``, ``input_size`` and ``output_size`` (h, w),
            ``original_size`` (h, w), ``output_affine`` (image -> output map, in the frame the
            boxes were mapped from) and ``inverse_affine`` (2x3 float64, output map ->
            **unmirrored** image pixels; for a flipped item it reverses x, so decoded x1 > x2).
    """
    _check_image(image, "train_transform")
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    input_size = spec.input_size
    output_size = _output_size(input_size, spec.down_ratio)

    center, scale = sample_crop(height, width, augment, rng)
    flipped = bool(rng.random() < augment.flip)
    if flipped:
        image = cv2.flip(image, 1)
        center[0] = width - center[0] - 1
        boxes = flip_boxes(boxes, width)

    input_affine = get_affine_transform(center, scale, (input_size[1], input_size[0]))
    warped = warp(image, input_affine, input_size)
    if augment.color:
        order, alphas, lighting_noise = sample_color_jitter(rng)
        channel_means = np.array(cv2.mean(warped)[:3]) / PIXEL_MAX
        grey_mean = float(GREY_WEIGHTS_BGR @ channel_means)
        gain, offset = color_jitter_affine(order, alphas, lighting_noise, grey_mean)
        matrix = pixel_affine(spec, gain, offset)
    else:
        matrix = pixel_affine(spec)
    network_input = apply_pixel_affine(warped, matrix)

    output_affine = get_affine_transform(center, scale, (output_size[1], output_size[0]))
    output_boxes = transform_boxes(boxes, output_affine).astype(np.float32)
    inverse_affine = get_affine_transform(
        center, scale, (output_size[1], output_size[0]), inverse=True
    )
    if flipped:
        inverse_affine = compose_affine(mirror_affine(width), inverse_affine)
    meta = {
        "center": center,
        "scale": scale,
        "flipped": flipped,
        "input_size": input_size,
        "output_size": output_size,
        "original_size": (height, width),
        "output_affine": output_affine,
        "inverse_affine": inverse_affine,
    }
    return network_input, output_boxes, np.asarray(labels), meta


def test_transform(
    image: np.ndarray,
    spec: InputSpec,
    scale: float = 1.0,
    keep_resolution: bool | None = None,
) -> tuple[np.ndarray, dict]:
    """The original's test-time pre-processing (``BaseDetector.pre_process``) of one image.

    image: (H, W, 3) uint8 BGR. The image is first resized to ``int(H * scale) x int(W * scale)``.

    - fixed resolution: input ``spec.input_size``, centre ``(new_w / 2, new_h / 2)`` and scale
      ``max(H, W)`` of the **original** image, even when scale != 1 (the original's quirk:
      a scale above 1 crops the centre of the enlarged image instead of showing all of it).
    - keep resolution (``keep_resolution``, default ``spec.keep_resolution``): input
      ``((new_h | pad) + 1, (new_w | pad) + 1)``, centre ``(new_w // 2, new_h // 2)`` and scale
      ``inp_w``, a pure translation that centres the image on the padded canvas.

    Returns (input (3, H_in, W_in) float32 normalised in ``spec.color_order``, meta) with meta
    ``center``, ``scale`` (source width in resized-image pixels), ``test_scale``,
    ``input_size``, ``output_size``, ``original_size`` (all (h, w)), ``output_affine``
    (resized image -> output map) and ``inverse_affine``: 2x3 float64 from the output map to
    **original** image pixels; unlike the original, which divides by the scale after mapping,
    it already includes the 1 / scale.
    """
    _check_image(image, "test_transform")
    if not scale > 0:
        raise ValueError(f"test_transform: scale must be positive, got {scale!r}")
    if keep_resolution is None:
        keep_resolution = spec.keep_resolution
    height, width = image.shape[:2]
    new_height, new_width = int(height * scale), int(width * scale)
    if keep_resolution:
        input_size = keep_resolution_size(new_height, new_width, spec.pad)
        center = np.array([new_width // 2, new_height // 2], dtype=np.float64)
        # The original passes s = [inp_w, inp_h]; only the first entry sets the zoom.
        source_width = float(input_size[1])
    else:
        input_size = spec.input_size
        center = np.array([new_width / 2.0, new_height / 2.0])
        source_width = float(max(height, width))
    output_size = _output_size(input_size, spec.down_ratio)

    if (new_height, new_width) != (height, width):
        image = cv2.resize(image, (new_width, new_height))
    input_affine = get_affine_transform(center, source_width, (input_size[1], input_size[0]))
    network_input = apply_pixel_affine(warp(image, input_affine, input_size), pixel_affine(spec))

    out_wh = (output_size[1], output_size[0])
    inverse_affine = get_affine_transform(center, source_width, out_wh, inverse=True) / scale
    meta = {
        "center": center,
        "scale": source_width,
        "test_scale": float(scale),
        "input_size": tuple(input_size),
        "output_size": output_size,
        "original_size": (height, width),
        "output_affine": get_affine_transform(center, source_width, out_wh),
        "inverse_affine": inverse_affine,
    }
    return network_input, meta
