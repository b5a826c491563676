"""CenterNetDataset items: keys, shapes, targets that decode back to the boxes, reproducibility
and clear errors for bad files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from detector.config import input_preset
from detector.data.dataset import CenterNetDataset, collate, worker_init_fn
from detector.data.images import ImageError
from detector.data.records import ImageRecord
from detector.data.transforms import AugmentConfig
from detector.inference.decode import ctdet_decode, detections_to_image

NUM_CLASSES = 3
SPEC = input_preset("imagenet", (64, 64))
# Boxes well inside the 96x128 images, apart from each other, so none is clipped on the map.
BOXES = np.array([[8.0, 10.0, 40.0, 50.0], [60.0, 20.0, 120.0, 80.0], [20.0, 60.0, 44.0, 90.0]])
LABELS = np.array([0, 2, 1])


def write_image(path, seed, height=96, width=128):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    cv2.imwrite(str(path), cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC))


@pytest.fixture
def records(tmp_path):
    result = []
    for image_id, suffix in ((7, ".png"), (8, ".jpg")):
        path = tmp_path / f"image{image_id}{suffix}"
        write_image(path, image_id)
        result.append(
            ImageRecord(image_id, path, 128, 96, BOXES, LABELS, np.zeros(len(BOXES), bool))
        )
    return result


def test_item_keys_shapes_dtypes(records):
    for train in (True, False):
        dataset = CenterNetDataset(records, NUM_CLASSES, SPEC, train=train, max_objects=16)
        item = dataset[0]
        expected = {
            "image": ((3, 64, 64), torch.float32),
            "heatmap": ((NUM_CLASSES, 16, 16), torch.float32),
            "wh": ((16, 2), torch.float32),
            "offset": ((16, 2), torch.float32),
            "index": ((16,), torch.int64),
            "mask": ((16,), torch.float32),
        }
        assert set(item) == set(expected) | {"meta"}
        for key, (shape, dtype) in expected.items():
            assert tuple(item[key].shape) == shape and item[key].dtype == dtype, key
        meta = item["meta"]
        assert meta["image_id"] == 7 and meta["original_size"] == (96, 128)
        assert meta["inverse_affine"].shape == (2, 3)
        np.testing.assert_array_equal(meta["boxes"], BOXES)
        np.testing.assert_array_equal(meta["labels"], LABELS)

    batch = collate([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["heatmap"].shape == (2, 3, 16, 16)
    assert [meta["image_id"] for meta in batch["meta"]] == [7, 8]


def dense_maps(item):
    """Scatter the per-object wh / offset targets back onto (1, 2, H, W) maps for decoding."""
    _, height, width = item["heatmap"].shape
    wh = torch.zeros(2, height * width)
    offset = torch.zeros(2, height * width)
    used = item["mask"] > 0
    wh[:, item["index"][used]] = item["wh"][used].T
    offset[:, item["index"][used]] = item["offset"][used].T
    return wh.reshape(1, 2, height, width), offset.reshape(1, 2, height, width)


@pytest.mark.parametrize("keep_resolution", [False, True])
def test_validation_targets_decode_back_to_the_boxes(records, keep_resolution):
    dataset = CenterNetDataset(
        records, NUM_CLASSES, SPEC, train=False, keep_resolution=keep_resolution
    )
    item = dataset[0]
    assert item["mask"].sum() == len(BOXES)
    wh, offset = dense_maps(item)
    detections = ctdet_decode(item["heatmap"][None], wh, offset, K=len(BOXES))[0]
    assert torch.all(detections[:, 4] == 1.0)  # the peaks are exactly 1
    in_image = detections_to_image(detections, item["meta"]["inverse_affine"])
    order = np.argsort(in_image[:, 0])
    np.testing.assert_allclose(in_image[order, :4], BOXES[np.argsort(BOXES[:, 0])], atol=1e-3)
    np.testing.assert_array_equal(in_image[order, 5], LABELS[np.argsort(BOXES[:, 0])])


def test_flipped_training_item_decodes_back_to_the_unflipped_boxes(records):
    augment = AugmentConfig(random_crop=False, shift=0, scale=0, flip=1.0, color=True)
    item = CenterNetDataset(records, NUM_CLASSES, SPEC, train=True, augment=augment)[0]
    assert item["meta"]["flipped"]
    wh, offset = dense_maps(item)
    detections = ctdet_decode(item["heatmap"][None], wh, offset, K=len(BOXES))[0]
    in_image = detections_to_image(detections, item["meta"]["inverse_affine"])
    boxes = np.concatenate(
        [
            np.minimum(in_image[:, [0]], in_image[:, [2]]),
            in_image[:, [1]],
            np.maximum(in_image[:, [0]], in_image[:, [2]]),
            in_image[:, [3]],
        ],
        axis=1,
    )
    order = np.argsort(boxes[:, 0])
    np.testing.assert_allclose(boxes[order], BOXES[np.argsort(BOXES[:, 0])], atol=1e-3)


def test_reproducible_per_seed_epoch_index(records):
    first = CenterNetDataset(records, NUM_CLASSES, SPEC, train=True, seed=1)
    second = CenterNetDataset(records, NUM_CLASSES, SPEC, train=True, seed=1)
    _ = second[1]  # loading order does not matter
    a, b = first[0], second[0]
    for key in ("image", "heatmap", "wh", "offset", "index", "mask"):
        assert torch.equal(a[key], b[key]), key
    first.set_epoch(1)
    assert not torch.equal(first[0]["image"], a["image"])
    other_seed = CenterNetDataset(records, NUM_CLASSES, SPEC, train=True, seed=2)
    assert not torch.equal(other_seed[0]["image"], a["image"])
    assert not torch.equal(second[1]["image"], a["image"])


def test_dataloader_workers_give_the_same_items(records):
    dataset = CenterNetDataset(records, NUM_CLASSES, SPEC, train=True, seed=3)
    dataset.set_epoch(2)
    in_process = collate([dataset[0], dataset[1]])
    loader = DataLoader(
        dataset, batch_size=2, num_workers=2, collate_fn=collate, worker_init_fn=worker_init_fn
    )
    (from_workers,) = list(loader)
    assert torch.equal(from_workers["image"], in_process["image"])
    assert torch.equal(from_workers["heatmap"], in_process["heatmap"])


def test_missing_unreadable_and_mismatched_images_raise_clear_errors(records, tmp_path):
    missing = ImageRecord(42, tmp_path / "nope.jpg", 128, 96, BOXES, LABELS, np.zeros(3, bool))
    with pytest.raises(FileNotFoundError, match=r"image 42: file .*nope\.jpg does not exist"):
        CenterNetDataset([missing], NUM_CLASSES, SPEC, train=True)[0]
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not a jpeg")
    unreadable = ImageRecord(43, garbage, 128, 96, BOXES, LABELS, np.zeros(3, bool))
    with pytest.raises(ImageError, match=r"image 43: .*garbage\.jpg: cannot be read as an image"):
        CenterNetDataset([unreadable], NUM_CLASSES, SPEC, train=False)[0]
    wrong_size = ImageRecord(44, records[0].path, 100, 96, BOXES, LABELS, np.zeros(3, bool))
    with pytest.raises(ValueError, match=r"image 44: .* is 128x96 .* record says 100x96"):
        CenterNetDataset([wrong_size], NUM_CLASSES, SPEC, train=False)[0]
    bad_label = ImageRecord(45, records[0].path, 128, 96, BOXES, [0, 1, 5], np.zeros(3, bool))
    with pytest.raises(ValueError, match=r"image 45 .*label 5 is outside \[0, 3\)"):
        CenterNetDataset([bad_label], NUM_CLASSES, SPEC, train=True)[0]


def test_collate_refuses_mixed_sizes(records):
    dataset = CenterNetDataset(records, NUM_CLASSES, SPEC, train=False, keep_resolution=True)
    small = CenterNetDataset(records, NUM_CLASSES, SPEC, train=False)
    with pytest.raises(ValueError, match="batch_size=1"):
        collate([dataset[0], small[0]])
