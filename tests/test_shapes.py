"""The frozen synthetic benchmark: determinism, COCO validity, and the difficulty it promises."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from detector.data import shapes
from detector.data.shapes import (
    CLASS_NAMES,
    draw_montage,
    generate_shapes,
    image_seed,
    render_image,
)

SAMPLE_IMAGES = 200


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def sample() -> list[tuple[np.ndarray, list[shapes.ShapeObject]]]:
    """SAMPLE_IMAGES val images at the default size, drawn once for the difficulty tests."""
    return [render_image(image_seed(0, "val", index), 128) for index in range(SAMPLE_IMAGES)]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("shapes")
    return folder, generate_shapes(folder, num_train=6, num_val=4, seed=3, progress=False)


def test_same_arguments_give_identical_bytes(small_dataset, tmp_path):
    folder, summary = small_dataset
    again = generate_shapes(tmp_path, num_train=6, num_val=4, seed=3, progress=False)
    assert again == summary
    assert file_hashes(tmp_path) == file_hashes(folder)


def test_train_val_and_seeds_differ(small_dataset, tmp_path):
    folder, _ = small_dataset
    hashes = file_hashes(folder)
    train = {value for name, value in hashes.items() if name.startswith("images/train/")}
    val = {value for name, value in hashes.items() if name.startswith("images/val/")}
    assert len(train) == 6 and len(val) == 4 and not train & val

    generate_shapes(tmp_path, num_train=6, num_val=4, seed=4, progress=False)
    other = {value for name, value in file_hashes(tmp_path).items() if name.startswith("images/")}
    assert not other & (train | val)


def test_image_does_not_depend_on_split_size():
    # Image i is keyed by (seed, split, i) only, so a smaller data set is a prefix of a larger one.
    first, _ = render_image(image_seed(0, "train", 5), 128)
    second, _ = render_image(image_seed(0, "train", 5), 128)
    val, _ = render_image(image_seed(0, "val", 5), 128)
    assert np.array_equal(first, second) and not np.array_equal(first, val)


def test_layout_and_data_yaml(small_dataset):
    folder, _ = small_dataset
    assert (folder / "data.yaml").read_text() == (
        "format: coco\n"
        "train: annotations/train.json\n"
        "val: annotations/val.json\n"
        "train_images: images/train\n"
        "val_images: images/val\n"
    )
    assert sorted(p.name for p in (folder / "images" / "train").iterdir()) == [
        f"{index:06d}.png" for index in range(6)
    ]
    record = json.loads((folder / "shapes.json").read_text())
    assert record["parameters"] == {
        "benchmark_version": shapes.BENCHMARK_VERSION,
        "num_train": 6, "num_val": 4, "image_size": 128, "seed": 3,
    }


@pytest.mark.parametrize("split", ["train", "val"])
def test_annotations_are_valid_coco(small_dataset, split):
    folder, summary = small_dataset
    coco = COCO(str(folder / "annotations" / f"{split}.json"))
    assert [coco.cats[i]["name"] for i in sorted(coco.cats)] == list(CLASS_NAMES)
    assert sorted(coco.cats) == list(range(1, len(CLASS_NAMES) + 1))
    assert sorted(coco.imgs) == list(range(1, summary[split]["images"] + 1))
    assert min(coco.anns) == 1 and len(coco.anns) == summary[split]["objects"]
    for annotation in coco.anns.values():
        image = coco.imgs[annotation["image_id"]]
        x, y, width, height = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + width <= image["width"] and y + height <= image["height"]
        assert annotation["area"] == width * height and annotation["iscrowd"] == 0
        png = folder / "images" / split / image["file_name"]
        assert png.is_file()


def test_difficulty_constants_hold_on_a_sample(sample):
    objects = [shape for _, image_objects in sample for shape in image_objects]
    counts = [len(image_objects) for _, image_objects in sample]
    assert all(0 <= count <= shapes.MAX_OBJECTS_PER_IMAGE for count in counts)
    # 10 % empty images: with 200 draws a binomial lies in [3 %, 18 %] far beyond 3 sigma.
    assert 0.03 <= counts.count(0) / len(sample) <= 0.18
    assert np.mean([count for count in counts if count]) > 3.5  # crowding drops only a few

    sides = np.array([shape.box[2:] for shape in objects])
    assert sides.min() >= shapes.MIN_BOX_SIDE_AT_REFERENCE and sides.max() <= 64
    assert (sides.max(axis=1) < 20).mean() > 0.15, "small objects must be common"
    assert (sides.max(axis=1) > 40).mean() > 0.05, "and large ones present"
    assert set(shape.category_index for shape in objects) == set(range(len(CLASS_NAMES)))
    for _, image_objects in sample:
        for shape in image_objects:
            x, y, width, height = shape.box
            assert x >= 0 and y >= 0 and x + width <= 128 and y + height <= 128

    occluder_share = np.mean([shape.occluder for shape in objects])
    assert 0.18 <= occluder_share <= 0.32
    visible = np.array([shape.visible_fraction for shape in objects])
    assert visible.min() >= shapes.MIN_VISIBLE_FRACTION
    assert (visible < 1).mean() > 0.15, "occlusion must actually hide pixels"
    filled_share = np.mean([shape.filled for shape in objects])
    assert 0.4 <= filled_share <= 0.6


def test_box_sizes_scale_with_the_image():
    objects = [
        shape
        for index in range(40)
        for shape in render_image(image_seed(0, "val", index), 256)[1]
    ]
    sides = np.array([shape.box[2:] for shape in objects])
    assert sides.min() >= 12 and sides.max() <= 128


def test_colour_does_not_determine_class(sample):
    objects = [shape for _, image_objects in sample for shape in image_objects]
    colours = np.array([shape.colour for shape in objects], dtype=np.float64)
    features = np.column_stack([colours, 255.0 * np.array([s.filled for s in objects])])
    labels = np.array([shape.category_index for shape in objects])

    # Mean colour per class within a few standard errors of the overall mean (about 74 / sqrt(150)
    # per channel for uniform colours).
    overall = colours.mean(axis=0)
    for category_index in range(len(CLASS_NAMES)):
        assert np.abs(colours[labels == category_index].mean(axis=0) - overall).max() < 25

    # A colour-and-fill-only classifier (nearest class mean, fitted on half) is at chance.
    half = len(objects) // 2
    means = np.stack([features[:half][labels[:half] == c].mean(axis=0)
                      for c in range(len(CLASS_NAMES))])
    predicted = np.argmin(
        np.linalg.norm(features[half:, None, :] - means[None], axis=2), axis=1
    )
    assert (predicted == labels[half:]).mean() < 1 / len(CLASS_NAMES) + 0.08


def test_filled_objects_show_their_colour_at_the_centre(sample):
    # The pixels at the centre of a filled, unoccluded object carry the colour recorded for it
    # (only noise differs), so annotations and pixels agree and boxes are where the shapes are.
    checked = 0
    for image, image_objects in sample:
        for shape in image_objects:
            x, y, width, height = shape.box
            if shape.filled and shape.visible_fraction == 1 and min(width, height) >= 12:
                centre = image[y + height // 2 - 1 : y + height // 2 + 2,
                               x + width // 2 - 1 : x + width // 2 + 2]
                median = np.median(centre.reshape(-1, 3), axis=0)
                assert np.linalg.norm(median - shape.colour) < 40  # noise sigma <= 12
                checked += 1
    assert checked > 100


def test_rerun_on_a_complete_folder_is_a_no_op(tmp_path):
    summary = generate_shapes(tmp_path, num_train=3, num_val=2, progress=False)
    times = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()}
    assert generate_shapes(tmp_path, num_train=3, num_val=2, progress=False) == summary
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == times


def test_interrupted_generation_is_redone(tmp_path):
    summary = generate_shapes(tmp_path, num_train=3, num_val=2, progress=False)
    expected = file_hashes(tmp_path)
    (tmp_path / "data.yaml").unlink()  # as if killed before the last step
    (tmp_path / "images" / "val" / "000001.png").write_bytes(b"truncated")
    assert generate_shapes(tmp_path, num_train=3, num_val=2, progress=False) == summary
    assert file_hashes(tmp_path) == expected


def test_folder_from_another_generator_is_redone(tmp_path):
    # Same parameters, but image 0 is not what this code draws (an older generator's output).
    summary = generate_shapes(tmp_path, num_train=2, num_val=2, progress=False)
    expected = file_hashes(tmp_path)
    stale = tmp_path / "images" / "train" / "000000.png"
    stale.write_bytes(stale.read_bytes()[:-20] + bytes(20))
    assert generate_shapes(tmp_path, num_train=2, num_val=2, progress=False) == summary
    assert file_hashes(tmp_path) == expected


def test_mismatched_parameters_raise_unless_overwrite(tmp_path):
    generate_shapes(tmp_path, num_train=3, num_val=2, progress=False)
    with pytest.raises(ValueError, match=r"seed: 0 there, 1 asked.*overwrite=True"):
        generate_shapes(tmp_path, num_train=3, num_val=2, seed=1, progress=False)
    summary = generate_shapes(tmp_path, num_train=2, num_val=2, seed=1, overwrite=True,
                              progress=False)
    assert summary["parameters"]["seed"] == 1
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == [
        "000000.png", "000001.png"
    ]


def test_foreign_data_yaml_is_not_overwritten(tmp_path):
    (tmp_path / "data.yaml").write_text("format: coco\n")
    with pytest.raises(ValueError, match="did not write"):
        generate_shapes(tmp_path, num_train=1, num_val=1, progress=False)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"num_train": -1}, "num_train must be an integer >= 0, got -1"),
        ({"num_val": 2.5}, "num_val must be an integer >= 0, got 2.5"),
        ({"seed": True}, "seed must be an integer >= 0, got True"),
        ({"image_size": 16}, "image_size must be at least 32, got 16"),
    ],
)
def test_bad_arguments_are_named(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        generate_shapes(tmp_path, **{"num_train": 1, "num_val": 1, **arguments})


def test_difficulty_constants_are_frozen():
    # Changing one of these changes the benchmark: bump BENCHMARK_VERSION, update this test and
    # docs/synthetic_benchmark.md, and measure every reported AP again.
    assert shapes.BENCHMARK_VERSION == 2
    assert CLASS_NAMES == ("circle", "square", "triangle", "diamond", "cross", "star")
    assert (shapes.MIN_BOX_SIDE_AT_REFERENCE, shapes.REFERENCE_IMAGE_SIZE) == (12, 128)
    assert shapes.MAX_BOX_SIDE_FRACTION == 0.5 and shapes.MAX_ASPECT_RATIO == 1.25
    assert (shapes.MIN_OBJECTS_PER_IMAGE, shapes.MAX_OBJECTS_PER_IMAGE) == (1, 8)
    assert shapes.EMPTY_IMAGE_PROBABILITY == 0.10
    assert (shapes.OCCLUDER_PROBABILITY, shapes.MIN_OCCLUDED_FRACTION,
            shapes.MIN_VISIBLE_FRACTION, shapes.FREE_OBJECT_GAP) == (0.3, 0.10, 0.50, 2)
    assert (shapes.FILLED_PROBABILITY, shapes.OUTLINE_THICKNESS_FRACTION) == (0.5, (0.05, 0.12))
    assert shapes.SQUARE_MAX_TILT_DEGREES == 10
    assert (shapes.CROSS_ARM_HALF_WIDTH, shapes.STAR_INNER_RADIUS) == ((0.28, 0.40), (0.40, 0.55))
    assert (shapes.MIN_COLOUR_CONTRAST, shapes.COLOUR_ATTEMPTS) == (60, 10)
    assert (shapes.BACKGROUND_BASE_RANGE, shapes.BLOB_GRID_CELLS, shapes.BLOB_AMPLITUDE,
            shapes.GRADIENT_AMPLITUDE) == ((30, 225), (2, 6), 60, 60)
    assert (shapes.STRIPE_PROBABILITY, shapes.STRIPE_AMPLITUDE,
            shapes.STRIPE_PERIOD_FRACTION) == (0.5, (10, 40), (6 / 128, 24 / 128))
    assert (shapes.DISTRACTOR_COUNT, shapes.DISTRACTOR_SEGMENTS,
            shapes.DISTRACTOR_THICKNESS) == ((0, 2), (1, 2), (1, 3))
    assert shapes.NOISE_SIGMA == (2, 8)


def test_labels_match_the_frozen_fingerprint(tmp_path):
    # The exact labels of a small val split. A failure after a numpy or OpenCV upgrade means the
    # benchmark itself changed under the same constants: measured APs are no longer comparable.
    summary = generate_shapes(tmp_path, num_train=0, num_val=30, progress=False)
    assert summary["val"]["annotations_sha256"] == FROZEN_VAL30_SHA256


FROZEN_VAL30_SHA256 = "fab27464ac27486d4429f5304d3a7b9e13b4484ee54bcf2636ddb34b926af85e"


def test_montage_is_drawn(small_dataset, tmp_path):
    folder, _ = small_dataset
    path = draw_montage(folder, tmp_path / "montage.png", count=4, columns=2, scale=1)
    from PIL import Image

    with Image.open(path) as montage:
        assert montage.size == (2 * 130, 2 * 130 + 24)
