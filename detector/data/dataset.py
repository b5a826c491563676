"""The torch `Dataset` of CenterNet training and validation items, and its collate function.

An item is one image read from disk, transformed (`detector.data.transforms`) and encoded by
its head type's target encoder (`detector.heads.HEADS`; CenterNet's is
`detector.targets.encode_targets`): the network input, the targets the loss consumes and the
meta data needed to map detections back to image pixels and to evaluate them.

Randomness: item i of epoch e draws its augmentation from a generator seeded with
``(seed, e, i)``, so it does not depend on the worker that loads it or on the order of loading,
and changes from epoch to epoch once `set_epoch` is called. DataLoader workers receive a copy of
the dataset when an epoch's iterator starts, so call `set_epoch` before iterating and do not
use ``persistent_workers=True`` (the workers would keep the epoch they started with).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from detector.config import InputSpec
from detector.data.images import ImageError, read_image_file
from detector.data.transforms import AugmentConfig, test_transform, train_transform
from detector.geometry import transform_boxes
from detector.heads import head_type

if TYPE_CHECKING:
    from detector.data.records import ImageRecord


def read_image(record: ImageRecord) -> np.ndarray:
    """The record's image as (H, W, 3) uint8 BGR (`read_image_file`); errors name the image
    id and the file: missing, truncated, unreadable, or not the size the record says."""
    try:
        image = read_image_file(record.path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"image {record.image_id}: file {record.path} does not exist"
        ) from None
    except ImageError as error:
        raise ImageError(f"image {record.image_id}: {error}") from None
    if image.shape[:2] != (record.height, record.width):
        raise ValueError(
            f"image {record.image_id}: file {record.path} is {image.shape[1]}x{image.shape[0]} "
            f"(width x height) but its record says {record.width}x{record.height}; the boxes "
            f"would not match the pixels"
        )
    return image


class CenterNetDataset(Dataset):
    """CenterNet items from image records.

    Each item is a dict:
        image: (3, H, W) float32 tensor, normalised, in ``spec.color_order``.
        the head type's targets, as tensors; for centernet heatmap: (C, H/r, W/r) float32;
            wh, offset: (M, 2) float32; index: (M,) int64; mask: (M,) float32 -- see
            `encode_targets`; M = max_objects, r = spec.down_ratio.
        meta: dict with ``image_id``, ``center``, ``scale``, ``inverse_affine`` (output map ->
            image pixels), ``original_size`` (h, w), ``input_size``, ``output_size``,
            ``flipped`` and the ground truth in image pixels: ``boxes`` (N, 4) float32,
            ``labels`` (N,) int64, ``crowd`` (N,) bool.

    Training items are augmented (`train_transform`). Validation items (``train=False``) use
    the test pre-processing at the fixed input size, with targets too, so a validation loss
    can be computed on batches, as the original's val split does. ``keep_resolution=True``
    gives validation items at each image's own padded resolution instead (the original's
    official test setting); their sizes differ, so load them one per batch. ``head`` names the
    head type whose targets are encoded: pass the model config's ``head``.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        num_classes: int,
        spec: InputSpec,
        train: bool,
        augment: AugmentConfig | None = None,
        max_objects: int = 128,
        seed: int = 0,
        min_overlap: float = 0.7,
        radius_variant: str = "original",
        keep_resolution: bool = False,
        head: str = "centernet",
    ) -> None:
        if train and keep_resolution:
            raise ValueError("CenterNetDataset: keep_resolution applies to validation items only")
        self.records = list(records)
        self.num_classes = int(num_classes)
        self.spec = spec
        self.train = bool(train)
        self.augment = augment if augment is not None else AugmentConfig()
        self.max_objects = int(max_objects)
        self.seed = int(seed)
        self.min_overlap = min_overlap
        self.radius_variant = radius_variant
        self.keep_resolution = bool(keep_resolution)
        self.encode_targets = head_type(head).encode_targets
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s augmentations from now on."""
        self.epoch = int(epoch)

    def item_generator(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = read_image(record)
        if self.train:
            network_input, boxes, labels, meta = train_transform(
                image,
                record.boxes,
                record.labels,
                self.spec,
                self.augment,
                self.item_generator(index),
            )
        else:
            network_input, meta = test_transform(
                image, self.spec, keep_resolution=self.keep_resolution
            )
            boxes = transform_boxes(record.boxes, meta["output_affine"]).astype(np.float32)
            labels = record.labels
            meta["flipped"] = False
        try:
            targets = self.encode_targets(
                boxes,
                labels,
                self.num_classes,
                meta["output_size"],
                self.max_objects,
                self.min_overlap,
                self.radius_variant,
            )
        except ValueError as error:
            raise ValueError(f"image {record.image_id} ({record.path}): {error}") from error
        item = {"image": torch.from_numpy(network_input)}
        item.update({key: torch.from_numpy(value) for key, value in targets.items()})
        item["meta"] = {
            "image_id": record.image_id,
            "center": meta["center"],
            "scale": meta["scale"],
            "inverse_affine": meta["inverse_affine"],
            "original_size": meta["original_size"],
            "input_size": meta["input_size"],
            "output_size": meta["output_size"],
            "flipped": meta["flipped"],
            "boxes": record.boxes,
            "labels": record.labels,
            "crowd": record.crowd,
        }
        return item


def collate(batch: list[dict]) -> dict:
    """Stack the items' tensors (the image and the targets) along a new batch dimension;
    ``meta`` becomes a list of the items' meta dicts."""
    if not batch:
        raise ValueError("collate: empty batch")
    sizes = {tuple(item["image"].shape) for item in batch}
    if len(sizes) > 1:
        raise ValueError(
            f"collate: items have different input sizes {sorted(sizes)} (keep-resolution "
            f"items?); use batch_size=1 for them"
        )
    stacked = {
        key: torch.stack([item[key] for item in batch]) for key in batch[0] if key != "meta"
    }
    stacked["meta"] = [item["meta"] for item in batch]
    return stacked


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``; it deliberately does nothing.

    Augmentation needs no per-worker seeding (it is seeded per item), and torch already seeds
    python's, numpy's and its own global generators in each worker. It also does not call
    ``cv2.setNumThreads``: in a forked worker that call deadlocks (opencv 5.0) once the parent
    process has used cv2's thread pool; to limit cv2's threads, call it in the main process
    before the DataLoader starts its workers.
    """
