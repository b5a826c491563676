"""Time ctprune's target encoding per image, optionally against the original CenterNet's.

    python experiments/bench/targets/run.py                      # ctprune only
    python experiments/bench/targets/run.py --original ../centernet_orig

The workload is the original's COCO setting: 80 classes, a 128x128 output map, 10 objects per
image (synthetic boxes in a 640x480 image, some crossing its border), each starting from
image-pixel boxes and the output affine. With ``--original PATH`` (a checkout of
github.com/xingyizhou/CenterNet), its ``gaussian_radius`` and ``draw_umich_gaussian`` are
loaded from ``PATH/src/lib/utils/image.py`` and driven by the per-object loop of its
``datasets/sample/ctdet.py`` (re-stated below, default options, no flip), in the same process,
interleaved with ctprune's, and the two outputs are checked to be identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from detector.geometry import get_affine_transform, transform_boxes
from detector.targets import encode_targets

RECORDED_ORIGINAL_MS = 1.35  # the original's ms per image in this setting, recorded earlier
NUM_CLASSES = 80
OUTPUT_SIZE = (128, 128)  # (height, width): a 512x512 input at down ratio 4
MAX_OBJECTS = 128
IMAGE_SIZE = (480, 640)  # (height, width) in pixels


def make_images(count: int, objects: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes (objects, 4) float32 image pixels x1 y1 x2 y2, labels (objects,) int64) per image.
    Sizes are log-uniform from 8 to 320 pixels; centres anywhere in the image, so some boxes
    cross its border and get clipped."""
    rng = np.random.default_rng(seed)
    height, width = IMAGE_SIZE
    images = []
    for _ in range(count):
        sizes = np.exp(rng.uniform(math.log(8), math.log(320), size=(objects, 2)))
        centres = rng.uniform([0, 0], [width, height], size=(objects, 2))
        boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
        labels = rng.integers(0, NUM_CLASSES, size=objects)
        images.append((boxes.astype(np.float32), labels))
    return images


def output_affine() -> np.ndarray:
    """The fixed-resolution training map, image pixels -> output map (no augmentation)."""
    height, width = IMAGE_SIZE
    center = np.array([width / 2, height / 2], dtype=np.float32)
    return get_affine_transform(center, max(height, width), (OUTPUT_SIZE[1], OUTPUT_SIZE[0]))


def ctprune_targets(boxes: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> dict:
    return encode_targets(
        transform_boxes(boxes, affine), labels, NUM_CLASSES, OUTPUT_SIZE, MAX_OBJECTS
    )


def load_original(checkout: Path) -> ModuleType:
    path = checkout / "src" / "lib" / "utils" / "image.py"
    if not path.is_file():
        raise SystemExit(f"--original: {path} not found; expected a CenterNet checkout")
    spec = importlib.util.spec_from_file_location("centernet_original_image", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def original_targets(
    image_utils: ModuleType, boxes: np.ndarray, labels: np.ndarray, affine: np.ndarray
) -> dict:
    """The work ctdet.py's __getitem__ does for targets, with default options and no flip: the
    same arrays allocated, then per object: map both corners, clip, size, radius, Gaussian,
    regression rows (including its always-filled cat_spec rows and gt_det list)."""
    output_height, output_width = OUTPUT_SIZE
    heatmap = np.zeros((NUM_CLASSES, output_height, output_width), dtype=np.float32)
    wh = np.zeros((MAX_OBJECTS, 2), dtype=np.float32)
    np.zeros((2, output_height, output_width), dtype=np.float32)  # dense_wh, unused by default
    offset = np.zeros((MAX_OBJECTS, 2), dtype=np.float32)
    index = np.zeros(MAX_OBJECTS, dtype=np.int64)
    mask = np.zeros(MAX_OBJECTS, dtype=np.uint8)
    class_wh = np.zeros((MAX_OBJECTS, NUM_CLASSES * 2), dtype=np.float32)
    class_mask = np.zeros((MAX_OBJECTS, NUM_CLASSES * 2), dtype=np.uint8)
    ground_truth = []
    for slot in range(min(len(boxes), MAX_OBJECTS)):
        box = np.array(boxes[slot], dtype=np.float32)
        label = int(labels[slot])
        box[:2] = image_utils.affine_transform(box[:2], affine)
        box[2:] = image_utils.affine_transform(box[2:], affine)
        box[[0, 2]] = np.clip(box[[0, 2]], 0, output_width - 1)
        box[[1, 3]] = np.clip(box[[1, 3]], 0, output_height - 1)
        height, width = box[3] - box[1], box[2] - box[0]
        if height > 0 and width > 0:
            radius = image_utils.gaussian_radius((math.ceil(height), math.ceil(width)))
            radius = max(0, int(radius))
            center = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], dtype=np.float32)
            cell = center.astype(np.int32)
            image_utils.draw_umich_gaussian(heatmap[label], cell, radius)
            wh[slot] = 1.0 * width, 1.0 * height
            index[slot] = cell[1] * output_width + cell[0]
            offset[slot] = center - cell
            mask[slot] = 1
            class_wh[slot, label * 2 : label * 2 + 2] = wh[slot]
            class_mask[slot, label * 2 : label * 2 + 2] = 1
            ground_truth.append(
                [
                    center[0] - width / 2,
                    center[1] - height / 2,
                    center[0] + width / 2,
                    center[1] + height / 2,
                    1,
                    label,
                ]
            )
    return {"heatmap": heatmap, "wh": wh, "offset": offset, "index": index, "mask": mask}


def time_per_image(encode, images, affine) -> float:
    """Milliseconds per image for one pass over all images."""
    start = time.perf_counter()
    for boxes, labels in images:
        encode(boxes, labels, affine)
    return (time.perf_counter() - start) * 1e3 / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", type=Path, help="checkout of github xingyizhou/CenterNet")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--objects", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images = make_images(args.images, args.objects, args.seed)
    affine = output_affine()
    contenders = {"ctprune": ctprune_targets}
    if args.original is not None:
        image_utils = load_original(args.original)

        def original(boxes: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> dict:
            return original_targets(image_utils, boxes, labels, affine)

        contenders["original"] = original
        mismatches = 0
        for boxes, labels in images:
            ours, theirs = ctprune_targets(boxes, labels, affine), original(boxes, labels, affine)
            mismatches += any(
                not np.array_equal(ours[key], theirs[key].astype(ours[key].dtype)) for key in ours
            )
        print(
            f"outputs identical to the original's on "
            f"{len(images) - mismatches}/{len(images)} images"
        )

    for encode in contenders.values():  # warm-up: kernel caches, imports
        time_per_image(encode, images[:20], affine)
    timings: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):  # interleaved, so machine load hits both alike
        for name, encode in contenders.items():
            timings[name].append(time_per_image(encode, images, affine))

    print(
        f"{args.images} images x {args.objects} objects, {NUM_CLASSES} classes, "
        f"{OUTPUT_SIZE[0]}x{OUTPUT_SIZE[1]} map; median (min) ms/image over {args.rounds} rounds"
    )
    for name, values in timings.items():
        print(f"  {name:9s} {statistics.median(values):.4f} ({min(values):.4f})")
    ours = statistics.median(timings["ctprune"])
    if "original" in timings:
        ratio = statistics.median(timings["original"]) / ours
        print(f"  original / ctprune = {ratio:.1f}x")
    else:
        print(f"  original  {RECORDED_ORIGINAL_MS:.2f} (recorded, not measured here)")
        print(f"  recorded original / ctprune = {RECORDED_ORIGINAL_MS / ours:.1f}x")


if __name__ == "__main__":
    main()
