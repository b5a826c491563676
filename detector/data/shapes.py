"""The frozen synthetic detection benchmark: shapes on textured, noisy backgrounds.

Every mAP figure in ctprune that is not on a real data set is measured on the val split this
module writes, so its difficulty is fixed here, as module constants, and `generate_shapes` takes
only counts, image size and seed. Changing a difficulty constant changes the benchmark: it must
bump `BENCHMARK_VERSION` and invalidates every figure measured before (see
docs/synthetic_benchmark.md).

What an image holds (all sizes below are at the 128 px reference size and scale with the image):

- a background of smooth random colour blobs, a linear colour gradient, stripes in half of the
  images, up to 2 clutter strokes, and gaussian noise over everything, objects included;
- 10 % of the images have no object; the others draw 1 to 8, each of a class that differs from
  the others by shape only (colour, fill or outline, size and aspect are random and independent
  of the class);
- boxes from 12 px up to half the image side, sizes log-uniform so small objects are common;
- about a quarter of the objects are placed on top of an earlier object, hiding at least 10 %
  of it; no object is ever less than half visible.

Coordinate frame: pixel-edge image coordinates, x to the right, y down, origin at the top-left
corner of the image; pixel (row r, column c) covers [c, c + 1) x [r, r + 1). Images are 8-bit
BGR (cv2's order). A box is the tight extent of the pixels its shape covers at least half,
measured before any later object occluded it (amodal, like a box a labeller draws around a
partly hidden object), so boxes are whole pixels: [x, y, width, height] integers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..files import atomic_write_text
from .images import read_image_file

# --- Frozen difficulty constants ---------------------------------------------------------------
# Changing any of these changes the benchmark. Bump BENCHMARK_VERSION with it: the version is
# recorded in every generated data set, so an old folder is never mistaken for the new benchmark.

BENCHMARK_VERSION = 2

# Classes differ by outline only. Square and diamond are the same polygon at different tilts, so
# their tilt ranges must never meet (see SQUARE_MAX_TILT_DEGREES); an outlined circle is a ring,
# which is why "ring" is not a class.
CLASS_NAMES = ("circle", "square", "triangle", "diamond", "cross", "star")

# Sizes are defined at this image side and scale linearly with the image side.
REFERENCE_IMAGE_SIZE = 128
# The smallest box side: 12 px is 3 output cells at CenterNet's stride 4. Version 1's 6 px (1.5
# cells) left shapes hard to tell apart even by eye and made the benchmark too slow to learn.
MIN_BOX_SIDE_AT_REFERENCE = 12
# The largest box side, as a share of the image side: big objects that still leave room for others.
MAX_BOX_SIDE_FRACTION = 1 / 2
# Width/height of an object's box lies in [1 / MAX_ASPECT_RATIO, MAX_ASPECT_RATIO], so the size
# head must regress two sides and not one.
MAX_ASPECT_RATIO = 1.25

# Objects per image in a non-empty image, drawn uniformly; fewer remain when an image is too
# crowded to place all of them (see PLACEMENT_ATTEMPTS).
MIN_OBJECTS_PER_IMAGE = 1
MAX_OBJECTS_PER_IMAGE = 8
# Images without any object: the detector must learn to say "nothing here" (false positives).
EMPTY_IMAGE_PROBABILITY = 0.10

# Each object after the first is, with this probability, an occluder: placed on top of an earlier
# object. The others keep their box at least FREE_OBJECT_GAP px away from every earlier box.
# The first object of an image never occludes, so 0.3 makes about a quarter of all objects
# occluders (measured in docs/synthetic_benchmark.md).
OCCLUDER_PROBABILITY = 0.3
# An occluder hides at least this share of its target's pixels, so the overlap is real ...
MIN_OCCLUDED_FRACTION = 0.10
# ... and no object ever loses more than half of its pixels to later objects: a box whose object
# is mostly hidden cannot be found from the image and would only add label noise.
MIN_VISIBLE_FRACTION = 0.50
FREE_OBJECT_GAP = 2

# Half the objects are filled, half drawn as an outline, independently of the class.
FILLED_PROBABILITY = 0.5
# An outline's stroke width, as a share of the shorter box side (at least 1 px); thicker
# strokes fill a star's arms and round every corner, and the outline stops looking like its class.
OUTLINE_THICKNESS_FRACTION = (0.05, 0.12)
# Square tilt in [-10, 10] degrees, diamond tilt in 45 + [-10, 10] degrees: 25 degrees apart.
SQUARE_MAX_TILT_DEGREES = 10.0
# A cross's arm width and a star's inner radius, as shares of the shape's half side: random so
# no class has one exact silhouette.
CROSS_ARM_HALF_WIDTH = (0.28, 0.40)
STAR_INNER_RADIUS = (0.40, 0.55)
# Circles are drawn as regular polygons with this many vertices (smooth at 64 px).
CIRCLE_VERTICES = 64

# Object colours are uniform over all 8-bit colours (so colour says nothing about the class), but
# the mean RGB distance between the colour and the pixels it covers must reach this, or the
# object could vanish into the background. Among COLOUR_ATTEMPTS candidates the first that passes
# is used, else the most distinct one.
MIN_COLOUR_CONTRAST = 60.0
COLOUR_ATTEMPTS = 10
COLOUR_SAMPLE_PIXELS = 256

# Background: base colour + smooth blobs + gradient + stripes, then noise over the whole image.
BACKGROUND_BASE_RANGE = (30.0, 225.0)
# Blobs: a random grid of BLOB_GRID_CELLS x BLOB_GRID_CELLS colour offsets, upsampled bicubically.
BLOB_GRID_CELLS = (2, 6)
BLOB_AMPLITUDE = 60.0
# A linear ramp in a random direction whose colour changes by up to this much across the image.
GRADIENT_AMPLITUDE = 60.0
# Sine stripes with periods at object scale: hard negatives with straight edges and corners.
STRIPE_PROBABILITY = 0.5
STRIPE_AMPLITUDE = (10.0, 40.0)
STRIPE_PERIOD_FRACTION = (6 / 128, 24 / 128)
# Clutter that is no object: a line or a "V" (DISTRACTOR_SEGMENTS straight segments; never
# three, which can close into a triangle) in random colours, drawn into the background (objects
# cover them), so "any coloured edge" is not an object and empty images are not blank.
# Count per image, segments per stroke, stroke width in px at 128 px.
DISTRACTOR_COUNT = (0, 2)
DISTRACTOR_SEGMENTS = (1, 2)
DISTRACTOR_THICKNESS = (1, 3)
# Per-pixel, per-channel gaussian noise, its sigma drawn per image.
NOISE_SIGMA = (2.0, 8.0)

# Tries before an object that does not fit (free or occluding) is dropped from a crowded image,
# and tries to draw a shape whose measured box lies within the size limits.
PLACEMENT_ATTEMPTS = 30
SHAPE_ATTEMPTS = 10

# --- File format -------------------------------------------------------------------------------

SPLITS = ("train", "val")
# zlib level for cv2.imwrite, fixed so the same arguments give byte-identical files. 0 stores the
# pixels uncompressed: the per-pixel noise leaves zlib little to gain (level 3 saves 23 % of the
# bytes) while it triples the time to write an image.
PNG_COMPRESSION = 0
# Smallest image side accepted: below it the smallest objects would be under 2 px.
MIN_IMAGE_SIZE = 32
IMAGE_NAME_PATTERN = re.compile(r"^\d{6,}\.png$")
# Shapes are rasterised with this many fractional bits (cv2's `shift`): 1/16 px vertex precision.
SUBPIXEL_BITS = 4
# Empty border around a shape's own canvas so anti-aliased edges are never cut.
CANVAS_MARGIN = 2


@dataclass(frozen=True)
class ShapeObject:
    """One object drawn into an image.

    category_index: index into `CLASS_NAMES`; the COCO category id is category_index + 1.
    box: (x, y, width, height) in whole pixels, image coordinates (module docstring): the tight
        extent of the pixels the shape covers at least half, before any occlusion.
    colour: (blue, green, red), 0..255.
    filled: True for a filled shape, False for an outline.
    occluder: True when it was placed on top of an earlier object.
    pixel_count: pixels the shape covers at least half.
    visible_fraction: share of those pixels that no later object covers.
    """

    category_index: int
    box: tuple[int, int, int, int]
    colour: tuple[int, int, int]
    filled: bool
    occluder: bool
    pixel_count: int
    visible_fraction: float


def box_side_limits(image_size: int) -> tuple[float, float]:
    """(smallest, largest) allowed box side in pixels for a square image of this side."""
    scale = image_size / REFERENCE_IMAGE_SIZE
    return MIN_BOX_SIDE_AT_REFERENCE * scale, MAX_BOX_SIDE_FRACTION * image_size


def image_seed(seed: int, split: str, image_index: int) -> np.random.SeedSequence:
    """The seed of one image: a child of `seed` keyed by (split index, image index).

    Train and val use different keys, so they never share a random stream, and image i of a
    split is the same whatever the number of images asked for.
    """
    return np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split), image_index))


def draw_background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """A textured background: float32 array of shape (image_size, image_size, 3), BGR, 0..255
    before clipping (blobs and stripes may overshoot; the final image is clipped)."""
    size = image_size
    base = rng.uniform(*BACKGROUND_BASE_RANGE, size=3)

    cells = int(rng.integers(BLOB_GRID_CELLS[0], BLOB_GRID_CELLS[1] + 1))
    grid = rng.uniform(-BLOB_AMPLITUDE, BLOB_AMPLITUDE, size=(cells, cells, 3)).astype(np.float32)
    blobs = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)

    # Coordinates of pixel centres, as a share of the image side, centred on the image.
    coordinates = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    gradient_angle = rng.uniform(0, 2 * math.pi)
    ramp = (
        coordinates[None, :] * math.cos(gradient_angle)
        + coordinates[:, None] * math.sin(gradient_angle)
    )  # in [-0.71, 0.71]: a change of up to GRADIENT_AMPLITUDE across the image
    gradient_colour = rng.uniform(-GRADIENT_AMPLITUDE, GRADIENT_AMPLITUDE, size=3)
    background = base + blobs + ramp[:, :, None] * gradient_colour.astype(np.float32)

    if rng.random() < STRIPE_PROBABILITY:
        period = rng.uniform(*STRIPE_PERIOD_FRACTION)  # share of the image side
        stripe_angle = rng.uniform(0, math.pi)
        phase = rng.uniform(0, 2 * math.pi)
        amplitude = rng.uniform(*STRIPE_AMPLITUDE)
        direction = rng.normal(size=3)
        stripe_colour = amplitude * direction / max(float(np.linalg.norm(direction)), 1e-6)
        position = (
            coordinates[None, :] * math.cos(stripe_angle)
            + coordinates[:, None] * math.sin(stripe_angle)
        )
        wave = np.sin(position * (2 * math.pi / period) + phase)
        background = background + wave[:, :, None] * stripe_colour.astype(np.float32)
    background = np.ascontiguousarray(background, dtype=np.float32)

    # Each segment is up to the largest box side long, so the clutter is at object scale.
    _, max_side = box_side_limits(image_size)
    scale = image_size / REFERENCE_IMAGE_SIZE
    for _ in range(int(rng.integers(DISTRACTOR_COUNT[0], DISTRACTOR_COUNT[1] + 1))):
        segments = int(rng.integers(DISTRACTOR_SEGMENTS[0], DISTRACTOR_SEGMENTS[1] + 1))
        steps = rng.uniform(-max_side, max_side, size=(segments, 2))
        points = rng.uniform(0, image_size, size=2) + np.cumsum(np.vstack([[0, 0], steps]), 0)
        thickness = max(1, round(rng.uniform(*DISTRACTOR_THICKNESS) * scale))
        colour = tuple(float(value) for value in rng.integers(0, 256, size=3))
        fixed_point = np.round(points * (1 << SUBPIXEL_BITS)).astype(np.int32)
        cv2.polylines(background, [fixed_point], False, colour, thickness, cv2.LINE_AA,
                      SUBPIXEL_BITS)
    return background


def _unit_outline(rng: np.random.Generator, category_index: int) -> np.ndarray:
    """The shape's polygon around the origin, (N, 2) float64 (x, y), y down, any scale."""
    name = CLASS_NAMES[category_index]
    if name == "circle":
        angles = np.linspace(0, 2 * math.pi, CIRCLE_VERTICES, endpoint=False)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if name in ("square", "diamond"):
        tilt = rng.uniform(-SQUARE_MAX_TILT_DEGREES, SQUARE_MAX_TILT_DEGREES)
        rotation = tilt + (45.0 if name == "diamond" else 0.0)
        points = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    elif name == "triangle":
        # Equilateral; any rotation, since no other class is a triangle.
        rotation = rng.uniform(0, 360)
        angles = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
        points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif name == "cross":
        # A plus sign; its symmetry repeats every 90 degrees, and at 45 it is an "x".
        rotation = rng.uniform(0, 90)
        arm = rng.uniform(*CROSS_ARM_HALF_WIDTH)
        # Three vertices per quarter turn: up one arm's side, its inner corner, the next arm.
        quarter = np.array([[arm, -1.0], [arm, -arm], [1.0, -arm]])
        points = np.concatenate([_rotate_points(quarter, 90.0 * turn) for turn in range(4)])
    elif name == "star":
        # Five points, alternating outer radius 1 and a random inner radius.
        rotation = rng.uniform(0, 72)
        inner = rng.uniform(*STAR_INNER_RADIUS)
        angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    else:
        raise AssertionError(f"no outline for class {name!r}")
    return _rotate_points(points, rotation)


def _rotate_points(points: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate (N, 2) points about the origin; positive is clockwise on screen (y down)."""
    radians = math.radians(degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    return points @ np.array([[cos, sin], [-sin, cos]])


def draw_shape(
    rng: np.random.Generator, category_index: int, filled: bool, image_size: int
) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """Rasterise one shape of random size and aspect on its own canvas.

    Returns (coverage, box): coverage is a uint8 (height, width) canvas, 255 where the shape
    covers a pixel fully, anti-aliased at the edges; box is (x, y, width, height) of the pixels
    covered at least half, in canvas coordinates, with both sides inside `box_side_limits`.
    None when SHAPE_ATTEMPTS draws all missed the limits (rare: only at the limits).
    """
    min_side, max_side = box_side_limits(image_size)
    for _ in range(SHAPE_ATTEMPTS):
        # Log-uniform side: as many objects between 6 and 12 px as between 32 and 64 px.
        side = math.exp(rng.uniform(math.log(min_side), math.log(max_side)))
        aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT_RATIO), math.log(MAX_ASPECT_RATIO)))
        width = min(max(side * math.sqrt(aspect), min_side), max_side)
        height = min(max(side / math.sqrt(aspect), min_side), max_side)
        thickness = 0
        if not filled:
            fraction = rng.uniform(*OUTLINE_THICKNESS_FRACTION)
            thickness = max(1, round(fraction * min(width, height)))

        # Stretch the rotated polygon onto the target extent. An outline's stroke is centred on
        # the polygon, so the polygon is inset by half the stroke on each side.
        points = _unit_outline(rng, category_index)
        points = points - points.min(axis=0)
        points = points / points.max(axis=0)
        points = points * np.array([width - thickness, height - thickness])
        points = points + CANVAS_MARGIN + thickness / 2

        canvas_shape = (
            math.ceil(height) + 2 * CANVAS_MARGIN,
            math.ceil(width) + 2 * CANVAS_MARGIN,
        )
        coverage = np.zeros(canvas_shape, dtype=np.uint8)
        fixed_point = np.round(points * (1 << SUBPIXEL_BITS)).astype(np.int32)
        if filled:
            cv2.fillPoly(coverage, [fixed_point], 255, cv2.LINE_AA, SUBPIXEL_BITS)
        else:
            cv2.polylines(coverage, [fixed_point], True, 255, thickness, cv2.LINE_AA,
                          SUBPIXEL_BITS)

        mask = coverage >= 128
        rows = np.flatnonzero(mask.any(axis=1))
        columns = np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            continue
        box = (
            int(columns[0]),
            int(rows[0]),
            int(columns[-1] - columns[0] + 1),
            int(rows[-1] - rows[0] + 1),
        )
        if all(min_side <= value <= max_side for value in box[2:]):
            return coverage, box
    return None


def _boxes_apart(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    """True when `box` stays FREE_OBJECT_GAP px clear of every box in `others` (x, y, w, h)."""
    x, y, width, height = box
    for other_x, other_y, other_width, other_height in others:
        if (
            x < other_x + other_width + FREE_OBJECT_GAP
            and other_x < x + width + FREE_OBJECT_GAP
            and y < other_y + other_height + FREE_OBJECT_GAP
            and other_y < y + height + FREE_OBJECT_GAP
        ):
            return False
    return True


def _pick_colour(rng: np.random.Generator, pixels_below: np.ndarray) -> np.ndarray:
    """A uniform random colour (3,) float32 BGR that stands out from `pixels_below` (N, 3).

    Always draws COLOUR_ATTEMPTS candidates, so the random stream does not depend on which
    one is taken.
    """
    candidates = rng.integers(0, 256, size=(COLOUR_ATTEMPTS, 3)).astype(np.float32)
    # A regular subsample of at most COLOUR_SAMPLE_PIXELS pixels estimates the mean distance well.
    pixels_below = pixels_below[:: max(1, len(pixels_below) // COLOUR_SAMPLE_PIXELS)]
    distances = np.linalg.norm(pixels_below[None, :, :] - candidates[:, None, :], axis=2)
    contrast = distances.mean(axis=1)
    passing = np.flatnonzero(contrast >= MIN_COLOUR_CONTRAST)
    return candidates[passing[0] if passing.size else int(np.argmax(contrast))]


def render_image(
    seed_sequence: np.random.SeedSequence, image_size: int
) -> tuple[np.ndarray, list[ShapeObject]]:
    """Draw one benchmark image and its objects.

    Returns (image, objects): image is uint8 (image_size, image_size, 3) BGR; objects are in
    drawing order (later ones on top), boxes in image coordinates (module docstring).
    """
    rng = np.random.default_rng(seed_sequence)
    image = draw_background(rng, image_size)
    if rng.random() < EMPTY_IMAGE_PROBABILITY:
        count = 0
    else:
        count = int(rng.integers(MIN_OBJECTS_PER_IMAGE, MAX_OBJECTS_PER_IMAGE + 1))

    # Index of the object on top at each pixel (-1: background), to cap occlusion.
    owner = np.full((image_size, image_size), -1, dtype=np.int32)
    boxes: list[tuple[int, int, int, int]] = []
    pixel_counts: list[int] = []
    visible_counts: list[int] = []
    properties: list[dict] = []

    for _ in range(count):
        occluder = bool(boxes) and rng.random() < OCCLUDER_PROBABILITY
        category_index = int(rng.integers(len(CLASS_NAMES)))
        filled = bool(rng.random() < FILLED_PROBABILITY)
        shape = draw_shape(rng, category_index, filled, image_size)
        if shape is None:
            continue
        coverage, (local_x, local_y, width, height) = shape
        # Pixels covered at least half all lie inside the box, so the box alone decides overlap.
        box_mask = coverage[local_y : local_y + height, local_x : local_x + width] >= 128

        box = None
        for _ in range(PLACEMENT_ATTEMPTS):
            if occluder:
                # Centre the occluder's box on a random point of a random earlier object's box.
                target = int(rng.integers(len(boxes)))
                target_x, target_y, target_width, target_height = boxes[target]
                x = round(target_x + rng.uniform(0, target_width) - width / 2)
                y = round(target_y + rng.uniform(0, target_height) - height / 2)
                candidate = (
                    min(max(x, 0), image_size - width),
                    min(max(y, 0), image_size - height),
                    width,
                    height,
                )
                below = owner[candidate[1] : candidate[1] + height,
                              candidate[0] : candidate[0] + width][box_mask]
                hidden = np.bincount(below[below >= 0], minlength=len(boxes))
                visible_after = np.array(visible_counts) - hidden
                if hidden[target] >= MIN_OCCLUDED_FRACTION * pixel_counts[target] and np.all(
                    visible_after >= MIN_VISIBLE_FRACTION * np.array(pixel_counts)
                ):
                    box = candidate
                    visible_counts = [int(value) for value in visible_after]
                    break
            else:
                candidate = (
                    int(rng.integers(0, image_size - width + 1)),
                    int(rng.integers(0, image_size - height + 1)),
                    width,
                    height,
                )
                if _boxes_apart(candidate, boxes):
                    box = candidate
                    break
        if box is None:
            continue  # too crowded: the image keeps fewer objects

        # Blend the anti-aliased coverage, clipped to the image, with a random colour.
        offset_x, offset_y = box[0] - local_x, box[1] - local_y
        top, left = max(offset_y, 0), max(offset_x, 0)
        bottom = min(offset_y + coverage.shape[0], image_size)
        right = min(offset_x + coverage.shape[1], image_size)
        local_coverage = coverage[top - offset_y : bottom - offset_y,
                                  left - offset_x : right - offset_x]
        region = image[top:bottom, left:right]  # a view: blending writes into the image
        colour = _pick_colour(rng, region[local_coverage >= 128])
        alpha = local_coverage.astype(np.float32)[:, :, None] / 255
        region += (colour - region) * alpha

        owner[box[1] : box[1] + height, box[0] : box[0] + width][box_mask] = len(boxes)
        boxes.append(box)
        pixel_counts.append(int(box_mask.sum()))
        visible_counts.append(int(box_mask.sum()))
        properties.append(
            dict(category_index=category_index, colour=tuple(int(v) for v in colour),
                 filled=filled, occluder=occluder)
        )

    sigma = rng.uniform(*NOISE_SIGMA)
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    objects = [
        ShapeObject(box=box, pixel_count=pixels, visible_fraction=visible / pixels, **extra)
        for box, pixels, visible, extra in zip(
            boxes, pixel_counts, visible_counts, properties, strict=True
        )
    ]
    return image, objects


# --- Writing the data set ----------------------------------------------------------------------


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"generate_shapes: {name} must be an integer >= 0, got {value!r}")
    return int(value)


def _coco_dataset(split: str, seed: int, image_size: int, images: list[list[ShapeObject]]) -> dict:
    """The COCO dict of one split; image and annotation ids start at 1 (pycocotools' COCOeval
    reads a matched ground-truth id of 0 as "unmatched")."""
    annotations = []
    for image_index, objects in enumerate(images):
        for shape in objects:
            x, y, width, height = shape.box
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_index + 1,
                "category_id": shape.category_index + 1,
                "bbox": [x, y, width, height],
                # Box area, not the shape's pixel count: COCO's small/medium/large ranges then
                # split the benchmark by box size.
                "area": width * height,
                "iscrowd": 0,
            })
    return {
        "info": {
            "description": "ctprune synthetic shapes benchmark",
            "version": BENCHMARK_VERSION,
            "split": split,
            "seed": seed,
        },
        "licenses": [],
        "images": [
            {"id": index + 1, "file_name": f"{index:06d}.png", "width": image_size,
             "height": image_size}
            for index in range(len(images))
        ],
        "annotations": annotations,
        "categories": [
            {"id": index + 1, "name": name, "supercategory": "shape"}
            for index, name in enumerate(CLASS_NAMES)
        ],
    }


def _split_summary(images: list[list[ShapeObject]], annotation_bytes: bytes) -> dict:
    objects = [shape for image in images for shape in image]
    sides = [side for shape in objects for side in shape.box[2:]]
    return {
        "images": len(images),
        "empty_images": sum(1 for image in images if not image),
        "objects": len(objects),
        "occluders": sum(1 for shape in objects if shape.occluder),
        "objects_per_class": {
            name: sum(1 for shape in objects if shape.category_index == index)
            for index, name in enumerate(CLASS_NAMES)
        },
        "min_box_side": min(sides) if sides else None,
        "max_box_side": max(sides) if sides else None,
        # Names the exact labels, so a reported AP can say which benchmark it was measured on.
        "annotations_sha256": hashlib.sha256(annotation_bytes).hexdigest(),
    }


def _json_text(value: dict) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":")) + "\n"


DATA_YAML = """format: coco
train: annotations/train.json
val: annotations/val.json
train_images: images/train
val_images: images/val
"""


def _read_record(path: Path) -> dict | None:
    """The shapes.json record of an earlier generation, or None if missing or unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _encode_png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise OSError("generate_shapes: OpenCV could not encode a PNG")
    return encoded.tobytes()


def _is_complete(out_dir: Path, parameters: dict) -> bool:
    """True when every file a generation with `parameters` writes is there and the first image
    of each split is what this code draws today (a folder left by an older generator, or by
    other numpy/OpenCV versions that draw differently, is not taken as current)."""
    for split in SPLITS:
        if not (out_dir / "annotations" / f"{split}.json").is_file():
            return False
        folder = out_dir / "images" / split
        names = os.listdir(folder) if folder.is_dir() else []
        if sum(1 for name in names if IMAGE_NAME_PATTERN.match(name)) != parameters[f"num_{split}"]:
            return False
        if parameters[f"num_{split}"]:
            image, _ = render_image(
                image_seed(parameters["seed"], split, 0), parameters["image_size"]
            )
            if (folder / "000000.png").read_bytes() != _encode_png(image):
                return False
    return True


def _remove_outputs(out_dir: Path) -> None:
    """Delete what generate_shapes writes (data.yaml first, so the folder reads as incomplete
    from then on); files it did not write are left alone."""
    for relative in ("data.yaml", "shapes.json", "annotations/train.json", "annotations/val.json"):
        (out_dir / relative).unlink(missing_ok=True)
    for split in SPLITS:
        folder = out_dir / "images" / split
        if folder.is_dir():
            for name in os.listdir(folder):
                if IMAGE_NAME_PATTERN.match(name):
                    (folder / name).unlink()


def generate_shapes(
    out_dir: str | Path,
    num_train: int = 2000,
    num_val: int = 500,
    image_size: int = 128,
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict:
    """Write the synthetic benchmark in COCO format and return its summary.

    Layout under `out_dir`: images/{train,val}/000000.png ... (BGR PNGs, image_size x
    image_size), annotations/{train,val}.json (COCO, ids from 1, bbox [x, y, w, h] in pixels),
    shapes.json (the parameters and the summary) and data.yaml, written last: a folder without
    data.yaml is an interrupted generation and is generated again.

    A folder already holding a complete generation with the same arguments is returned as is;
    one with different arguments raises ValueError unless `overwrite` is True. The same
    arguments always give byte-identical files. Difficulty is fixed by the module constants.

    Args:
        out_dir: destination folder, created if missing.
        num_train, num_val: images per split (>= 0).
        image_size: image side in pixels (>= MIN_IMAGE_SIZE); object sizes scale with it.
        seed: integer >= 0; train and val draw from different child streams of it.
        overwrite: replace a generation with other arguments.
        progress: show a tqdm progress bar; None shows one on a terminal only.

    Returns:
        {"parameters": {...}, "train": split summary, "val": split summary}; a split summary
        holds images, empty_images, objects, occluders, objects_per_class, min_box_side,
        max_box_side (None without objects) and annotations_sha256.
    """
    parameters = {
        "benchmark_version": BENCHMARK_VERSION,
        "num_train": _check_count("num_train", num_train),
        "num_val": _check_count("num_val", num_val),
        "image_size": _check_count("image_size", image_size),
        "seed": _check_count("seed", seed),
    }
    if parameters["image_size"] < MIN_IMAGE_SIZE:
        raise ValueError(
            f"generate_shapes: image_size must be at least {MIN_IMAGE_SIZE}, got {image_size!r}"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"generate_shapes: out_dir {out_dir} exists and is not a folder")

    if (out_dir / "data.yaml").exists():
        record = _read_record(out_dir / "shapes.json")
        recorded = record.get("parameters") if record else None
        if recorded == parameters and _is_complete(out_dir, parameters):
            return record["summary"]
        if not overwrite and recorded != parameters:
            if recorded is None:
                problem = "has a data.yaml that generate_shapes did not write (no shapes.json)"
            else:
                changed = ", ".join(
                    f"{key}: {recorded.get(key)!r} there, {value!r} asked"
                    for key, value in parameters.items()
                    if recorded.get(key) != value
                )
                problem = f"holds a shapes benchmark with other parameters ({changed})"
            raise ValueError(
                f"generate_shapes: {out_dir} {problem}; use another folder or pass overwrite=True"
            )
    _remove_outputs(out_dir)

    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    total = parameters["num_train"] + parameters["num_val"]
    bar = None
    if progress or progress is None:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="shapes", unit="image", disable=None if progress is None
                   else False)
    summary = {"parameters": parameters}
    for split in SPLITS:
        image_folder = out_dir / "images" / split
        image_folder.mkdir(parents=True, exist_ok=True)
        images = []
        for index in range(parameters[f"num_{split}"]):
            image, objects = render_image(image_seed(seed, split, index), image_size)
            (image_folder / f"{index:06d}.png").write_bytes(_encode_png(image))
            images.append(objects)
            if bar is not None:
                bar.update()
        text = _json_text(_coco_dataset(split, seed, image_size, images))
        atomic_write_text(out_dir / "annotations" / f"{split}.json", text)
        summary[split] = _split_summary(images, text.encode("utf-8"))
    if bar is not None:
        bar.close()

    atomic_write_text(
        out_dir / "shapes.json", _json_text({"parameters": parameters, "summary": summary})
    )
    atomic_write_text(out_dir / "data.yaml", DATA_YAML)
    return summary


# --- Looking at it -----------------------------------------------------------------------------

# Box colours of the montage, RGB, one per class in CLASS_NAMES order, then the legend's
# background and text colours.
MONTAGE_BOX_COLOURS = (
    (255, 255, 255), (0, 0, 0), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 0, 0)
)
MONTAGE_LEGEND_COLOURS = ((128, 128, 128), (0, 0, 0))


def draw_montage(
    dataset_dir: str | Path,
    out_path: str | Path,
    split: str = "val",
    count: int = 16,
    columns: int = 4,
    scale: int = 2,
    palette_colours: int = 128,
) -> Path:
    """Tile the first `count` images of a split with their boxes into one palette PNG.

    Each image is enlarged `scale` times (nearest neighbour, so pixels stay visible); boxes are
    drawn in their class's colour from MONTAGE_BOX_COLOURS along the box's outermost pixels, and
    a legend row names the classes. The images are reduced to `palette_colours` colours minus
    those reserved for boxes and legend, which keeps a montage of noisy images small enough for
    the docs while the box colours stay exact.
    """
    from PIL import Image

    if split not in SPLITS:
        raise ValueError(f"draw_montage: split must be one of {SPLITS}, got {split!r}")
    dataset_dir = Path(dataset_dir)
    annotation_path = dataset_dir / "annotations" / f"{split}.json"
    try:
        dataset = json.loads(annotation_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise FileNotFoundError(
            f"draw_montage: cannot read {annotation_path}; run generate_shapes first"
        ) from error
    entries = dataset["images"][:count]
    if not entries:
        raise ValueError(f"draw_montage: split {split!r} of {dataset_dir} has no images")

    # Tile position (row, column) of each image; 1 px black border around every tile.
    side = entries[0]["width"] * scale + 2
    rows = math.ceil(len(entries) / columns)
    montage = np.zeros((rows * side, columns * side, 3), dtype=np.uint8)
    for position, entry in enumerate(entries):
        image_path = dataset_dir / "images" / split / entry["file_name"]
        image = read_image_file(image_path)
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        top, left = (position // columns) * side + 1, (position % columns) * side + 1
        montage[top : top + image.shape[0], left : left + image.shape[1]] = image[:, :, ::-1]

    reserved = MONTAGE_BOX_COLOURS + MONTAGE_LEGEND_COLOURS
    quantized = Image.fromarray(montage).quantize(
        colors=palette_colours - len(reserved), dither=Image.Dither.NONE
    )
    first_reserved = palette_colours - len(reserved)
    palette = quantized.getpalette()[: 3 * first_reserved]
    palette += [0, 0, 0] * (first_reserved - len(palette) // 3)
    palette += [channel for colour in reserved for channel in colour]
    indices = np.array(quantized, dtype=np.uint8)

    image_ids = {entry["id"]: position for position, entry in enumerate(entries)}
    for annotation in dataset["annotations"]:
        position = image_ids.get(annotation["image_id"])
        if position is None:
            continue
        top, left = (position // columns) * side + 1, (position % columns) * side + 1
        x, y, width, height = (value * scale for value in annotation["bbox"])
        cv2.rectangle(
            indices,
            (left + round(x), top + round(y)),
            (left + round(x + width) - 1, top + round(y + height) - 1),
            first_reserved + annotation["category_id"] - 1,
            1,
        )

    legend_background = first_reserved + len(MONTAGE_BOX_COLOURS)
    legend = np.full((24, indices.shape[1]), legend_background, dtype=np.uint8)
    slot = indices.shape[1] // len(CLASS_NAMES)
    for index, name in enumerate(CLASS_NAMES):
        left = index * slot + 4
        cv2.rectangle(legend, (left, 6), (left + 11, 17), first_reserved + index, 2)
        cv2.putText(legend, name, (left + 16, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    legend_background + 1, 1, cv2.LINE_8)
    indices = np.concatenate([indices, legend], axis=0)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = Image.fromarray(indices, mode="P")
    result.putpalette(palette)
    result.save(out_path, optimize=True)
    return out_path
