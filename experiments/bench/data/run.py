"""Per-item speed of the training data pipeline at 512 px, stage by stage, against the
original CenterNet's (github xingyizhou/CenterNet, ``src/lib/datasets/sample/ctdet.py`` and
``src/lib/utils/image.py``).

    python experiments/bench/data/run.py                       # ctprune only, vs recorded figures
    python experiments/bench/data/run.py --original ../centernet_orig   # both, interleaved

The images are synthetic 640x480 JPEGs (smooth random texture plus noise, written to a
temporary folder) with 8 random boxes each, about COCO's average. Stages, per item:

- decode: cv2.imread (the same call in both pipelines)
- geometry: crop draw, flip, affine matrix, cv2.warpAffine to 512x512
- colour + normalise: the original's ``astype/255``, ``color_aug``, ``(x - mean) / std`` and
  transpose; ctprune's single fused 3x4 pixel map (`pixel_affine`)
- targets: box mapping, radius and Gaussian drawing into 80 heatmaps
- total: one whole ``__getitem__`` (ctprune's `CenterNetDataset`, the original's
  ``CTDetDataset`` driven by a stand-in for its COCO api), timed separately from the stages.

Everything runs in one process, one thread (``--threads``), as in one DataLoader worker. The
two pipelines alternate in blocks of ``--block`` items (each block: the staged runs, then the
same items as whole ``__getitem__`` calls back to back), so load from other processes hits both
alike. Blocks rather than single items because alternating item by item slows both pipelines
(a pair of whole items then cost 23-26 ms here instead of 16-19 ms run separately, presumably
the allocator handing each one's large temporaries back and forth), which is not how a
DataLoader worker runs. The
original is loaded from ``--original`` (a checkout; nothing of it is copied here).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.util
import os
import platform
import random
import sys
import tempfile
import time
import types
from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np
import torch

from detector.config import input_preset
from detector.data import transforms
from detector.data.dataset import CenterNetDataset
from detector.data.records import ImageRecord
from detector.geometry import get_affine_transform, transform_boxes
from detector.targets import encode_targets

NUM_CLASSES = 80
BOXES_PER_IMAGE = 8
INPUT_SIZE = (512, 512)
STAGES = ("decode", "geometry", "colour", "normalise", "targets")

# The figures recorded for the original at 512 px, one process (ms per item; 71 items/s).
RECORDED_ORIGINAL_MS = {
    "decode": 2.0,
    "geometry": 1.8,
    "colour": 4.0,
    "normalise": 3.7,
    "targets": 1.35,
    "total": 1000 / 71,
}


# glibc mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def steady_allocator() -> bool:
    """Make glibc keep freed memory instead of returning it to the system.

    Both pipelines allocate several arrays of 1-5 MB per item. With glibc's defaults, whether
    such an array gets warm pages or fresh ones (a page fault per 4 kB, about 0.3 ms per 3 MB)
    depends on the order of earlier allocations and frees, so the same call can cost 1.8 ms in
    one sequence and 3 ms in another (seen here for cv2.imread of the same file). Keeping
    blocks below 32 MB on the heap and never trimming it makes every stage measure its work.
    Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    )


# ---- data -----------------------------------------------------------------------------------


def make_images(folder: Path, count: int, seed: int) -> list[ImageRecord]:
    """640x480 JPEGs of a smooth random texture plus pixel noise, with random boxes."""
    rng = np.random.default_rng(seed)
    height, width = 480, 640
    records = []
    for image_id in range(count):
        coarse = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
        smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        noise = rng.normal(0, 12, size=smooth.shape)
        image = np.clip(smooth + noise, 0, 255).astype(np.uint8)
        path = folder / f"synthetic_{image_id}.jpg"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        corner = rng.uniform([0, 0], [width - 40, height - 40], size=(BOXES_PER_IMAGE, 2))
        size = rng.uniform(16, 300, size=(BOXES_PER_IMAGE, 2))
        far = np.minimum(corner + size, [width, height])
        boxes = np.concatenate([corner, far], axis=1).astype(np.float32)
        labels = rng.integers(0, NUM_CLASSES, size=BOXES_PER_IMAGE)
        records.append(
            ImageRecord(
                image_id, path, width, height, boxes, labels, np.zeros(BOXES_PER_IMAGE, bool)
            )
        )
    return records


# ---- ctprune, stage by stage ------------------------------------------------------------------


def ctprune_stages(record, spec, augment, rng, times):
    """`train_transform` + `encode_targets` split into timed stages (the same calls)."""
    start = time.perf_counter()
    image = cv2.imread(str(record.path))
    after_decode = time.perf_counter()

    height, width = image.shape[:2]
    boxes = record.boxes
    center, scale = transforms.sample_crop(height, width, augment, rng)
    if rng.random() < augment.flip:
        image = cv2.flip(image, 1)
        center[0] = width - center[0] - 1
        boxes = transforms.flip_boxes(boxes, width)
    input_affine = get_affine_transform(center, scale, (INPUT_SIZE[1], INPUT_SIZE[0]))
    warped = transforms.warp(image, input_affine, INPUT_SIZE)
    after_geometry = time.perf_counter()

    order, alphas, lighting_noise = transforms.sample_color_jitter(rng)
    grey_mean = float(transforms.GREY_WEIGHTS_BGR @ (np.array(cv2.mean(warped)[:3]) / 255))
    gain, offset = transforms.color_jitter_affine(order, alphas, lighting_noise, grey_mean)
    network_input = transforms.apply_pixel_affine(
        warped, transforms.pixel_affine(spec, gain, offset)
    )
    after_colour = time.perf_counter()

    output_size = (INPUT_SIZE[0] // spec.down_ratio, INPUT_SIZE[1] // spec.down_ratio)
    output_affine = get_affine_transform(center, scale, (output_size[1], output_size[0]))
    output_boxes = transform_boxes(boxes, output_affine).astype(np.float32)
    targets = encode_targets(output_boxes, record.labels, NUM_CLASSES, output_size)
    end = time.perf_counter()

    times["decode"].append(after_decode - start)
    times["geometry"].append(after_geometry - after_decode)
    times["colour"].append(after_colour - after_geometry)
    times["targets"].append(end - after_colour)
    return network_input, targets


# ---- the original, loaded from a checkout ---------------------------------------------------


def load_original(checkout: Path):
    """The original's ``utils.image`` and ``datasets.sample.ctdet`` modules, imported from
    their files; ``utils.image`` is registered in sys.modules only while ctdet.py imports it."""
    library = checkout / "src" / "lib"
    image_file = library / "utils" / "image.py"
    ctdet_file = library / "datasets" / "sample" / "ctdet.py"
    for file in (image_file, ctdet_file):
        if not file.is_file():
            sys.exit(
                f"--original {checkout}: {file} not found; expected a checkout of "
                f"github xingyizhou/CenterNet"
            )

    def load(name, file):
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    image_module = load("centernet_original_image", image_file)
    saved = {name: sys.modules.get(name) for name in ("utils", "utils.image")}
    utils_package = types.ModuleType("utils")
    utils_package.image = image_module
    sys.modules.update({"utils": utils_package, "utils.image": image_module})
    try:
        ctdet_module = load("centernet_original_ctdet", ctdet_file)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return image_module, ctdet_module


class FakeCoco:
    """The three pycocotools calls CTDetDataset.__getitem__ makes, over our records."""

    def __init__(self, records):
        self.records = {record.image_id: record for record in records}

    def loadImgs(self, ids):  # noqa: N802 (pycocotools' names)
        return [{"file_name": self.records[ids[0]].path.name}]

    def getAnnIds(self, imgIds):  # noqa: N802, N803
        record = self.records[imgIds[0]]
        return [(record.image_id, k) for k in range(len(record.boxes))]

    def loadAnns(self, ids):  # noqa: N802
        annotations = []
        for image_id, k in ids:
            x1, y1, x2, y2 = self.records[image_id].boxes[k].tolist()
            label = int(self.records[image_id].labels[k])
            annotations.append({"bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": label + 1})
        return annotations


def original_dataset(ctdet_module, image_module, records, folder):
    """A CTDetDataset with the attributes its __getitem__ reads (those COCO.__init__ and the
    option parser set), at the original's defaults for ctdet on COCO at 512 px."""
    dataset = ctdet_module.CTDetDataset.__new__(ctdet_module.CTDetDataset)
    dataset.images = [record.image_id for record in records]
    dataset.coco = FakeCoco(records)
    dataset.img_dir = str(folder)
    dataset.max_objs = 128
    dataset.num_classes = NUM_CLASSES
    dataset.cat_ids = {label + 1: label for label in range(NUM_CLASSES)}
    dataset.split = "train"
    spec = input_preset("centernet")
    dataset.mean = np.array(spec.mean, dtype=np.float32).reshape(1, 1, 3)
    dataset.std = np.array(spec.std, dtype=np.float32).reshape(1, 1, 3)
    dataset._data_rng = np.random.RandomState(123)
    dataset._eig_val = transforms.EIGENVALUES.astype(np.float32)
    dataset._eig_vec = transforms.EIGENVECTORS.astype(np.float32)
    dataset.opt = Namespace(
        keep_res=False,
        pad=31,
        input_h=INPUT_SIZE[0],
        input_w=INPUT_SIZE[1],
        not_rand_crop=False,
        scale=0.4,
        shift=0.1,
        flip=0.5,
        no_color_aug=False,
        down_ratio=4,
        mse_loss=False,
        dense_wh=False,
        cat_spec_wh=False,
        reg_offset=True,
        debug=0,
    )
    return dataset


def original_stages(image_module, dataset, record, times):
    """The original's per-item steps, calling its own functions in its order (ctdet.py), split
    into timed stages."""
    start = time.perf_counter()
    image = cv2.imread(str(record.path))
    after_decode = time.perf_counter()

    height, width = image.shape[:2]
    center = np.array([width / 2.0, height / 2.0], dtype=np.float32)
    scale = max(height, width) * 1.0
    scale = scale * np.random.choice(np.arange(0.6, 1.4, 0.1))
    border_x = dataset._get_border(128, width)
    border_y = dataset._get_border(128, height)
    center[0] = np.random.randint(low=border_x, high=width - border_x)
    center[1] = np.random.randint(low=border_y, high=height - border_y)
    flipped = np.random.random() < dataset.opt.flip
    if flipped:
        image = image[:, ::-1, :]
        center[0] = width - center[0] - 1
    input_affine = image_module.get_affine_transform(
        center, scale, 0, [INPUT_SIZE[1], INPUT_SIZE[0]]
    )
    warped = cv2.warpAffine(
        image, input_affine, (INPUT_SIZE[1], INPUT_SIZE[0]), flags=cv2.INTER_LINEAR
    )
    after_geometry = time.perf_counter()

    pixels = warped.astype(np.float32) / 255.0
    after_to_float = time.perf_counter()
    image_module.color_aug(dataset._data_rng, pixels, dataset._eig_val, dataset._eig_vec)
    after_colour = time.perf_counter()
    network_input = ((pixels - dataset.mean) / dataset.std).transpose(2, 0, 1)
    after_normalise = time.perf_counter()

    output_h, output_w = INPUT_SIZE[0] // 4, INPUT_SIZE[1] // 4
    output_affine = image_module.get_affine_transform(center, scale, 0, [output_w, output_h])
    heatmap = np.zeros((NUM_CLASSES, output_h, output_w), dtype=np.float32)
    wh = np.zeros((dataset.max_objs, 2), dtype=np.float32)
    offset = np.zeros((dataset.max_objs, 2), dtype=np.float32)
    index = np.zeros(dataset.max_objs, dtype=np.int64)
    mask = np.zeros(dataset.max_objs, dtype=np.uint8)
    for k, annotation in enumerate(
        dataset.coco.loadAnns(dataset.coco.getAnnIds([record.image_id]))
    ):
        box = dataset._coco_box_to_bbox(annotation["bbox"])
        label = dataset.cat_ids[annotation["category_id"]]
        if flipped:
            box[[0, 2]] = width - box[[2, 0]] - 1
        box[:2] = image_module.affine_transform(box[:2], output_affine)
        box[2:] = image_module.affine_transform(box[2:], output_affine)
        box[[0, 2]] = np.clip(box[[0, 2]], 0, output_w - 1)
        box[[1, 3]] = np.clip(box[[1, 3]], 0, output_h - 1)
        box_h, box_w = box[3] - box[1], box[2] - box[0]
        if box_h > 0 and box_w > 0:
            radius = max(0, int(image_module.gaussian_radius((np.ceil(box_h), np.ceil(box_w)))))
            centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], dtype=np.float32)
            cell = centre.astype(np.int32)
            image_module.draw_umich_gaussian(heatmap[label], cell, radius)
            wh[k] = box_w, box_h
            index[k] = cell[1] * output_w + cell[0]
            offset[k] = centre - cell
            mask[k] = 1
    end = time.perf_counter()

    times["decode"].append(after_decode - start)
    times["geometry"].append(after_geometry - after_decode)
    times["colour"].append(after_colour - after_to_float)
    # The original's "normalise + transpose" includes the conversion to float / 255.
    times["normalise"].append((after_to_float - after_geometry) + (after_normalise - after_colour))
    times["targets"].append(end - after_normalise)
    return network_input, heatmap


# ---- driver ---------------------------------------------------------------------------------


def check_stages_match_train_transform(record, spec, augment):
    """The staged copy above must be the pipeline the dataset runs."""
    staged, _ = ctprune_stages(
        record, spec, augment, np.random.default_rng(0), {stage: [] for stage in STAGES}
    )
    image = cv2.imread(str(record.path))
    whole, *_ = transforms.train_transform(
        image, record.boxes, record.labels, spec, augment, np.random.default_rng(0)
    )
    if not np.array_equal(staged, whole):
        sys.exit("bench_data: the staged pipeline no longer matches train_transform; update it")


def summarise(times: dict[str, list[float]]) -> dict[str, float]:
    """Median milliseconds per stage."""
    return {stage: 1e3 * float(np.median(values)) for stage, values in times.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", type=Path, help="checkout of github xingyizhou/CenterNet")
    parser.add_argument("--items", type=int, default=300, help="timed items per pipeline")
    parser.add_argument("--images", type=int, default=4, help="synthetic images to cycle through")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default allocator settings (see steady_allocator)",
    )
    parser.add_argument("--threads", type=int, default=1, help="cv2 / torch threads")
    parser.add_argument(
        "--block", type=int, default=20, help="items one pipeline runs before the other takes over"
    )
    args = parser.parse_args()

    steady = False if args.system_malloc else steady_allocator()
    cv2.setNumThreads(args.threads)
    torch.set_num_threads(args.threads)
    spec = input_preset("imagenet", INPUT_SIZE)
    augment = transforms.AugmentConfig()
    original = load_original(args.original) if args.original else None

    with tempfile.TemporaryDirectory() as folder:
        records = make_images(Path(folder), args.images, seed=0)
        sizes_kb = [record.path.stat().st_size / 1e3 for record in records]
        check_stages_match_train_transform(records[0], spec, augment)
        dataset = CenterNetDataset(records, NUM_CLASSES, spec, train=True, seed=0)
        if original:
            image_module, ctdet_module = original
            np.random.seed(317)
            random.seed(317)
            original_data = original_dataset(ctdet_module, image_module, records, folder)

        ours = {stage: [] for stage in STAGES + ("total",)}
        theirs = {stage: [] for stage in STAGES + ("total",)}
        rng = np.random.default_rng(1)

        def staged_ctprune(position, sink):
            ctprune_stages(records[position], spec, augment, rng, sink)

        def staged_original(position, sink):
            original_stages(image_module, original_data, records[position], sink)

        pipelines = [(staged_ctprune, dataset, ours)]
        if original:
            pipelines.append((staged_original, original_data, theirs))
        blocks = -(-args.items // args.block)
        for block in range(-1, blocks):  # block -1 is the untimed warm-up
            # Alternate which pipeline goes first, so slow phases of the machine hit both.
            for staged, whole, sink in pipelines[:: 1 if block % 2 == 0 else -1]:
                target = sink if block >= 0 else {stage: [] for stage in sink}
                positions = [
                    (block * args.block + step) % len(records) for step in range(args.block)
                ]
                for position in positions:
                    staged(position, target)
                # Whole items back to back, as a DataLoader worker runs them.
                for position in positions:
                    start = time.perf_counter()
                    whole[position]
                    target["total"].append(time.perf_counter() - start)

    theirs_ms = summarise(theirs) if original else RECORDED_ORIGINAL_MS
    source = (
        f"measured now, interleaved in blocks of {args.block} items"
        if original
        else "recorded figures, not measured now"
    )
    print(
        f"date {datetime.date.today()}  python {platform.python_version()}  numpy "
        f"{np.__version__}  cv2 {cv2.__version__}  torch {torch.__version__}"
    )
    print(
        f"cpu {platform.machine()}, {os.cpu_count()} cores  threads {args.threads}  "
        f"items {len(ours['total'])} per pipeline  allocator "
        f"{'glibc, no trim (steady_allocator)' if steady else 'system default'}"
    )
    print(
        f"images {args.images} x 640x480 JPEG ({min(sizes_kb):.0f}-{max(sizes_kb):.0f} kB), "
        f"{BOXES_PER_IMAGE} boxes, {NUM_CLASSES} classes, input {INPUT_SIZE[1]}x{INPUT_SIZE[0]}"
    )
    print(f"original: {source}")
    print_table(summarise(ours), theirs_ms)


def print_table(ours_ms: dict[str, float], theirs_ms: dict[str, float]) -> None:
    """Median ms per stage side by side; ctprune's colour augmentation and normalisation are
    one fused step, compared with the sum of the original's two."""

    def row(label, mine, theirs):
        mine_text = f"{mine:>10.2f}" if mine is not None else " " * 10
        ratio = f"{theirs / mine:>9.1f}x" if mine is not None else ""
        print(f"{label:<26}{mine_text}{theirs:>10.2f}{ratio}")

    print(f"{'stage (median ms/item)':<26}{'ctprune':>10}{'original':>10}{'speed-up':>10}")
    row("decode", ours_ms["decode"], theirs_ms["decode"])
    row("geometry", ours_ms["geometry"], theirs_ms["geometry"])
    row("  colour aug", None, theirs_ms["colour"])
    row("  normalise + transpose", None, theirs_ms["normalise"])
    row("colour + normalise", ours_ms["colour"], theirs_ms["colour"] + theirs_ms["normalise"])
    row("targets", ours_ms["targets"], theirs_ms["targets"])
    row("total (__getitem__)", ours_ms["total"], theirs_ms["total"])
    print(
        f"{'items/s (1000 / total)':<26}{1000 / ours_ms['total']:>10.1f}"
        f"{1000 / theirs_ms['total']:>10.1f}"
    )


if __name__ == "__main__":
    main()
