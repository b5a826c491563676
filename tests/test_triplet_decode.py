"""Keypoint-triplet decoding: a hand-placed object, parity of the batched decoder with a slow
loop re-derivation of the original's test pipeline on random outputs, the merge, and export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detector.triplet.decode import (
    batched_soft_nms,
    decode_triplet,
    match_centers,
    merge_triplet_multiscale,
    soft_nms_merge,
    triplet_candidates,
)
from detector.triplet.targets import encode_triplet_targets

pytestmark = pytest.mark.timeout(120)

DOWN_RATIO = 4  # image pixels per output cell in the reference, as the original at scale 1


# --- slow reference, written from reading the original ------------------------------------------
# github:Duankaiwen/CenterNet: models/py_utils/kp_utils.py (_nms, _topk, _decode), test/coco.py
# (kp_detection: flip, _rescale_dets, the centre-matching loop left there in comments, the
# per-class soft_nms and max_per_image) and external/nms.pyx (soft_nms, soft_nms_merge). Plain
# python loops over one image, in image pixels (output cells x 4).


def sigmoid(value):
    return 1 / (1 + math.exp(-value))


def reference_keypoints(heat_logits, offsets, k):
    """_nms (3x3, kernel padding -inf) + _topk + the offset: [(score, class, x, y, pixel)]."""
    classes, height, width = heat_logits.shape
    heat = 1 / (1 + np.exp(-heat_logits.astype(np.float64)))
    found = []
    for c in range(classes):
        for y in range(height):
            for x in range(width):
                window = heat[c, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
                score = heat[c, y, x] if heat[c, y, x] == window.max() else 0.0
                found.append((score, c, y, x))
    found.sort(key=lambda item: -item[0])
    points = []
    for score, c, y, x in found[:k]:
        points.append(
            (score, c, x + float(offsets[0, y, x]), y + float(offsets[1, y, x]), y * width + x)
        )
    return points


def reference_decode_one(outputs, k, num_pairs, ae_threshold):
    """_decode for one image: (detections [x1, y1, x2, y2, score, tl, br, class], centres)."""
    tl = reference_keypoints(outputs["tl_heatmap"], outputs["tl_offset"], k)
    br = reference_keypoints(outputs["br_heatmap"], outputs["br_offset"], k)
    ct = reference_keypoints(outputs["ct_heatmap"], outputs["ct_offset"], k)
    tl_tag, br_tag = outputs["tl_embedding"].reshape(-1), outputs["br_embedding"].reshape(-1)
    pairs = []
    for tl_score, tl_class, tl_x, tl_y, tl_pixel in tl:
        for br_score, br_class, br_x, br_y, br_pixel in br:
            score = (tl_score + br_score) / 2
            if (
                tl_class != br_class
                or abs(tl_tag[tl_pixel] - br_tag[br_pixel]) > ae_threshold
                or br_x < tl_x
                or br_y < tl_y
            ):
                score = -1
            pairs.append([tl_x, tl_y, br_x, br_y, score, tl_score, br_score, tl_class])
    pairs.sort(key=lambda row: -row[4])
    centres = [[x, y, c, score] for score, c, x, y, _ in ct]
    return pairs[:num_pairs], centres


def reference_soft_nms(rows, sigma=0.5, threshold=0.001):
    """external/nms.pyx soft_nms, method 2, on rows [x1, y1, x2, y2, score]; returns the first
    N rows after the loop (the survivors; the original's caller reads stale rows too)."""
    boxes = [list(row) for row in rows]
    count = len(boxes)
    i = 0
    while i < count:
        maxpos = max(range(i, count), key=lambda p: (boxes[p][4], -p))
        boxes[i], boxes[maxpos] = boxes[maxpos], boxes[i]
        tx1, ty1, tx2, ty2, _ = boxes[i]
        pos = i + 1
        while pos < count:
            x1, y1, x2, y2, _ = boxes[pos]
            area = (x2 - x1 + 1) * (y2 - y1 + 1)
            iw = min(tx2, x2) - max(tx1, x1) + 1
            if iw > 0:
                ih = min(ty2, y2) - max(ty1, y1) + 1
                if ih > 0:
                    ua = (tx2 - tx1 + 1) * (ty2 - ty1 + 1) + area - iw * ih
                    ov = iw * ih / ua
                    boxes[pos][4] *= math.exp(-(ov * ov) / sigma)
                    if boxes[pos][4] < threshold:
                        boxes[pos] = boxes[count - 1]
                        count -= 1
                        pos -= 1
            pos += 1
        i += 1
    return boxes[:count]


def reference_pipeline(outputs, flipped, k, num_pairs, max_per_image, ae_threshold=0.5):
    """kp_detection for one image at scale 1, the map being the image (no border)."""
    height, width = outputs["tl_heatmap"].shape[1:]
    detections, centres = reference_decode_one(outputs, k, num_pairs, ae_threshold)
    if flipped is not None:
        flipped_detections, flipped_centres = reference_decode_one(
            flipped, k, num_pairs, ae_threshold
        )
        for row in flipped_detections:
            row[0], row[2] = width - row[2], width - row[0]
        for centre in flipped_centres:
            centre[0] = width - centre[0]
        detections += flipped_detections
        centres += flipped_centres
    image_width, image_height = width * DOWN_RATIO, height * DOWN_RATIO
    for row in detections:  # _rescale_dets
        row[:4] = [value * DOWN_RATIO for value in row[:4]]
        if row[0] <= -5 or row[2] >= image_width + 5 or row[1] <= -5 or row[3] >= image_height + 5:
            row[4] = -1
        row[0], row[2] = (min(max(v, 0), image_width) for v in (row[0], row[2]))
        row[1], row[3] = (min(max(v, 0), image_height) for v in (row[1], row[3]))
    for centre in centres:
        centre[0] = min(max(centre[0] * DOWN_RATIO, 0), image_width)
        centre[1] = min(max(centre[1] * DOWN_RATIO, 0), image_height)
    for row in detections:  # the loop in test/coco.py's comments
        if row[4] == -1:
            continue
        box_width, box_height = row[2] - row[0], row[3] - row[1]
        n = 3 if box_width * box_height <= 22500 else 5
        left = ((n + 1) // 2 * row[0] + (n - 1) // 2 * row[2]) / n
        right = ((n - 1) // 2 * row[0] + (n + 1) // 2 * row[2]) / n
        top = ((n + 1) // 2 * row[1] + (n - 1) // 2 * row[3]) / n
        bottom = ((n - 1) // 2 * row[1] + (n + 1) // 2 * row[3]) / n
        temp_score, row[4] = row[4], -1
        for centre in centres:
            if (
                row[7] == centre[2]
                and left < centre[0] < right
                and top < centre[1] < bottom
            ):
                row[4] = (temp_score * 2 + centre[3]) / 3
                break
    kept = [row for row in detections if row[4] > -1]
    results = []
    for class_index in sorted({row[7] for row in kept}):
        survivors = reference_soft_nms([row[:5] for row in kept if row[7] == class_index])
        results += [row + [class_index] for row in survivors]
    if len(results) > max_per_image:
        scores = np.array([row[4] for row in results])
        kth = len(scores) - max_per_image
        threshold = np.partition(scores, kth)[kth]
        results = [row for row in results if row[4] >= threshold]
    results.sort(key=lambda row: -row[4])
    return [[v / DOWN_RATIO for v in row[:4]] + row[4:] for row in results]


# --- helpers ------------------------------------------------------------------------------------


def random_outputs(generator, batch, classes, height, width):
    """Random heads whose embeddings often agree and whose offsets stay in [0, 1)."""
    outputs = {}
    for kind in ("tl", "br", "ct"):
        outputs[f"{kind}_heatmap"] = torch.randn(batch, classes, height, width, generator=generator)
        outputs[f"{kind}_offset"] = torch.rand(batch, 2, height, width, generator=generator)
    for kind in ("tl", "br"):
        outputs[f"{kind}_embedding"] = torch.rand(batch, 1, height, width, generator=generator)
    # Bottom-right corners mostly right of and below top-left ones, so that pairs survive.
    ramp = torch.linspace(-2, 2, width)
    outputs["tl_heatmap"] = outputs["tl_heatmap"] - ramp - ramp[:height, None]
    outputs["br_heatmap"] = outputs["br_heatmap"] + ramp + ramp[:height, None]
    return outputs


def numpy_image(outputs, index):
    return {key: value[index].numpy().astype(np.float64) for key, value in outputs.items()}


# --- hand-placed object -------------------------------------------------------------------------


OBJECT_EMBEDDING = 1000.0


def one_object(height=12, width=16, box=(2, 3, 11, 9), classes=2, label=1):
    """Logits with one object: corner and centre peaks of class ``label``, equal embeddings."""
    outputs = {
        f"{kind}_heatmap": torch.full((1, classes, height, width), -8.0)
        for kind in ("tl", "br", "ct")
    }
    for kind in ("tl", "br", "ct"):
        outputs[f"{kind}_offset"] = torch.zeros(1, 2, height, width)
    # The flat background is a plateau of peaks: distinct embeddings per cell keep its corners
    # from pairing (a cell paired with itself is an empty box, which no centre lies inside).
    cells = torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width)
    outputs.update({f"{kind}_embedding": cells.clone() for kind in ("tl", "br")})
    x1, y1, x2, y2 = box
    outputs["tl_embedding"][0, 0, y1, x1] = OBJECT_EMBEDDING
    outputs["br_embedding"][0, 0, y2, x2] = OBJECT_EMBEDDING
    outputs["tl_heatmap"][0, label, y1, x1] = 2.0
    outputs["br_heatmap"][0, label, y2, x2] = 1.0
    outputs["ct_heatmap"][0, label, (y1 + y2) // 2, (x1 + x2) // 2] = 0.0
    outputs["tl_offset"][0, :, y1, x1] = torch.tensor([0.25, 0.5])
    outputs["br_offset"][0, :, y2, x2] = torch.tensor([0.75, 0.0])
    return outputs


def test_one_object_by_hand() -> None:
    outputs = one_object()
    detections = decode_triplet(outputs, None, 5, K=4, num_pairs=16)
    assert detections.shape == (1, 5, 6)
    expected_score = (sigmoid(2.0) + sigmoid(1.0) + sigmoid(0.0)) / 3
    np.testing.assert_allclose(
        detections[0, 0].numpy(), [2.25, 3.5, 11.75, 9.0, expected_score, 1.0], rtol=1e-6
    )
    assert not detections[0, 1:].any()  # nothing else: zero rows


def test_pair_without_a_centre_or_with_far_embeddings_is_dropped() -> None:
    outputs = one_object()
    outputs["ct_heatmap"][0, 1] = -8.0
    outputs["ct_heatmap"][0, 1, 3, 3] = 0.0  # a centre keypoint outside the central third
    assert not decode_triplet(outputs, None, 3, K=4).any()
    outputs = one_object()
    # 0.6 from the top-left corner's embedding: more than ae_threshold 0.5.
    outputs["br_embedding"][0, 0, 9, 11] = OBJECT_EMBEDDING + 0.6
    assert not decode_triplet(outputs, None, 3, K=4).any()
    # The original rejects only a distance > 0.5.
    outputs["br_embedding"][0, 0, 9, 11] = OBJECT_EMBEDDING + 0.5
    assert decode_triplet(outputs, None, 3, K=4)[0, 0, 4] > 0


def test_flip_pools_mirrored_boxes_before_soft_nms() -> None:
    height, width, box = 12, 16, (2, 3, 11, 9)
    outputs = one_object(height, width, box)
    # The mirrored image's top-left corner is the mirror of the box's top-right corner: at
    # x = W - x2 (cell W - x2 - 1 with offset 1 - 0.75 here), and its bottom-right one at W - x1.
    flipped = one_object(height, width, (width - 12, 3, width - 3, 9))
    flipped["tl_offset"][0, :, 3, width - 12] = torch.tensor([0.25, 0.5])
    flipped["br_offset"][0, :, 9, width - 3] = torch.tensor([0.75, 0.0])
    detections = decode_triplet(outputs, flipped, 3, K=4)[0]
    score = (sigmoid(2.0) + sigmoid(1.0) + sigmoid(0.0)) / 3
    np.testing.assert_allclose(detections[0].numpy(), [2.25, 3.5, 11.75, 9.0, score, 1], rtol=1e-6)
    # The mirrored pass gives x1 = 16 - 13.75 = 2.25, x2 = 16 - 4.25 = 11.75: the same box, which
    # Gaussian soft-NMS decays by exp(-IoU^2 / 0.5) = exp(-2) instead of removing.
    np.testing.assert_allclose(
        detections[1].numpy(), [2.25, 3.5, 11.75, 9.0, score * math.exp(-2), 1], rtol=1e-5
    )
    assert not detections[2].any()


def test_boxes_far_outside_are_rejected() -> None:
    outputs = one_object()
    outputs["tl_offset"][0, :, 3, 2] = torch.tensor([-3.5, 0.0])  # x1 = -1.5 cells = -6 pixels
    assert not decode_triplet(outputs, None, 3, K=4).any()
    outputs["tl_offset"][0, :, 3, 2] = torch.tensor([-3.0, 0.0])  # -4 pixels: kept, clipped
    row = decode_triplet(outputs, None, 3, K=4)[0, 0]
    assert row[0] == 0 and row[4] > 0


def test_small_and_large_boxes_use_thirds_and_fifths() -> None:
    # Box 0..30 cells = 120 pixels wide: small (14400 <= 22500 pixels^2 for a 120 x 120 box).
    candidates = torch.tensor(
        [[[0.0, 0.0, 30.0, 30.0, 0.6, 0.6, 0.6, 0.0], [0.0, 0.0, 45.0, 45.0, 0.6, 0.6, 0.6, 0.0]]]
    )
    # Centre at 11 cells: inside the small box's middle third (10..20); for the large box
    # (180 pixels, 32400 > 22500) the middle fifth is 18..27 cells.
    centres = torch.tensor([[[11.0, 11.0, 0.0, 0.3], [19.0, 19.0, 0.0, 0.9]]])
    scores = match_centers(candidates, centres, 22500 / 16)[0]
    assert scores[0].item() == pytest.approx((2 * 0.6 + 0.3) / 3)  # the first matching centre
    assert scores[1].item() == pytest.approx((2 * 0.6 + 0.9) / 3)
    other_class = centres.clone()
    other_class[..., 2] = 1
    assert (match_centers(candidates, other_class, 22500 / 16) == -1).all()


def outputs_from_targets(boxes, labels, classes, height, width):
    """Heads that say exactly what `encode_triplet_targets` asks for: heatmap probabilities
    0.001 + 0.98 x target, the target offsets at the keypoint cells, one embedding per object
    (distinct per cell elsewhere, so that the background does not pair)."""
    targets = encode_triplet_targets(boxes, labels, classes, (height, width), 8)
    outputs = {}
    for kind in ("tl", "br", "ct"):
        probability = torch.from_numpy(0.001 + 0.98 * targets[f"{kind}_heatmap"])[None]
        outputs[f"{kind}_heatmap"] = torch.log(probability / (1 - probability))
        offset = torch.zeros(2, height * width)
        for slot in np.flatnonzero(targets["mask"]):
            offset[:, targets[f"{kind}_index"][slot]] = torch.from_numpy(
                targets[f"{kind}_offset"][slot]
            )
        outputs[f"{kind}_offset"] = offset.reshape(1, 2, height, width)
    for kind in ("tl", "br"):
        embedding = torch.arange(height * width, dtype=torch.float32) * 10
        for slot in np.flatnonzero(targets["mask"]):
            embedding[targets[f"{kind}_index"][slot]] = -100.0 * (slot + 1)
        outputs[f"{kind}_embedding"] = embedding.reshape(1, 1, height, width)
    return outputs


ROUND_TRIP_BOXES = np.array(
    [[2.5, 3.25, 12.75, 10.5], [16.25, 4.5, 29.5, 27.75], [3.5, 15.25, 9.75, 29.5]], np.float32
)


def test_targets_round_trip_through_decoding() -> None:
    labels = np.array([0, 1, 0])
    outputs = outputs_from_targets(ROUND_TRIP_BOXES, labels, 2, 32, 32)
    detections = decode_triplet(outputs, None, 10)[0]
    found = detections[detections[:, 4] > 0.5]
    assert len(found) == 3
    order = np.argsort(found[:, 0].numpy())
    expected = ROUND_TRIP_BOXES[np.argsort(ROUND_TRIP_BOXES[:, 0])]
    np.testing.assert_allclose(found[order, :4].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(found[order, 4].numpy(), 0.981, atol=1e-6)
    assert found[order, 5].tolist() == labels[np.argsort(ROUND_TRIP_BOXES[:, 0])].tolist()


def test_flip_round_trip_finds_each_box_twice() -> None:
    labels = np.array([0, 1, 0])
    outputs = outputs_from_targets(ROUND_TRIP_BOXES, labels, 2, 32, 32)
    mirrored = ROUND_TRIP_BOXES.copy()
    mirrored[:, [0, 2]] = 32 - ROUND_TRIP_BOXES[:, [2, 0]]
    flipped = outputs_from_targets(mirrored, labels, 2, 32, 32)
    detections = decode_triplet(outputs, flipped, 10)[0]
    best = detections[detections[:, 4] > 0.5]
    duplicates = detections[(detections[:, 4] > 0.1) & (detections[:, 4] < 0.5)]
    assert len(best) == 3 and len(duplicates) == 3
    for rows in (best, duplicates):
        order = np.argsort(rows[:, 0].numpy())
        expected = ROUND_TRIP_BOXES[np.argsort(ROUND_TRIP_BOXES[:, 0])]
        np.testing.assert_allclose(rows[order, :4].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(duplicates[:, 4].numpy(), 0.981 * math.exp(-2), rtol=1e-5)


# --- parity with the slow reference on random outputs ------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
def test_matches_the_original_pipeline_on_random_outputs(flip) -> None:
    generator = torch.Generator().manual_seed(11 + flip)
    batch, classes, height, width, k, num_pairs, max_detections = 3, 2, 14, 18, 12, 60, 25
    outputs = random_outputs(generator, batch, classes, height, width)
    flipped = random_outputs(generator, batch, classes, height, width) if flip else None
    detections = decode_triplet(
        outputs, flipped, max_detections, K=k, num_pairs=num_pairs
    ).numpy()
    total = 0
    for image in range(batch):
        expected = reference_pipeline(
            numpy_image(outputs, image),
            numpy_image(flipped, image) if flip else None,
            k,
            num_pairs,
            max_detections,
        )
        got = detections[image][detections[image][:, 4] > 0]
        assert len(got) == len(expected), image
        if expected:
            np.testing.assert_allclose(got, np.array(expected), rtol=1e-4, atol=1e-4)
        total += len(expected)
    assert total >= 10  # the case exercises pairing, matching and soft-NMS


def test_batched_soft_nms_equals_house_soft_nms_per_class() -> None:
    from detector.inference.tta import soft_nms

    generator = torch.Generator().manual_seed(3)
    corners = torch.rand(1, 40, 2, generator=generator) * 20
    boxes = torch.cat([corners, corners + 2 + torch.rand(1, 40, 2, generator=generator) * 8], -1)
    scores = torch.rand(1, 40, generator=generator)
    classes = torch.randint(0, 3, (1, 40), generator=generator).float()
    got = batched_soft_nms(boxes, scores, classes, 40)[0]
    expected = []
    for class_index in range(3):
        chosen = classes[0] == class_index
        keep, new_scores = soft_nms(boxes[0][chosen], scores[0][chosen])
        for index, score in zip(keep.tolist(), new_scores.tolist(), strict=True):
            expected.append([*boxes[0][chosen][index].tolist(), score, class_index])
    expected.sort(key=lambda row: -row[4])
    got = got[got[:, 4] > 0]
    np.testing.assert_allclose(got.numpy(), np.array(expected), rtol=1e-5, atol=1e-6)


def test_without_soft_nms_the_best_matched_boxes() -> None:
    generator = torch.Generator().manual_seed(4)
    outputs = random_outputs(generator, 2, 2, 14, 18)
    plain = decode_triplet(outputs, None, 30, K=12, num_pairs=60, soft_nms=False)
    candidates, centres = triplet_candidates(outputs, K=12, num_pairs=60)
    scores = match_centers(candidates, centres, 22500 / 16)
    for image in range(2):
        best = torch.sort(scores[image][scores[image] > -1], descending=True).values[:30]
        np.testing.assert_allclose(plain[image, : len(best), 4].numpy(), best.numpy())


# --- multi-scale merge --------------------------------------------------------------------------


def reference_soft_nms_merge(rows, sigma=0.5, threshold=0.001, weight_exp=10):
    """external/nms.pyx soft_nms_merge, method 2, with whole rows swapped (each row keeps its
    corner scores), returning the N survivors' x1, y1, x2, y2, score."""
    boxes = [list(row) for row in rows]
    count = len(boxes)
    i = 0
    while i < count:
        maxpos = max(range(i, count), key=lambda p: (boxes[p][4], -p))
        boxes[i], boxes[maxpos] = boxes[maxpos], boxes[i]
        tx1, ty1, tx2, ty2, _, tls, brs = boxes[i]
        mx1, my1, mx2, my2, mts, mbs = tx1 * tls, ty1 * tls, tx2 * brs, ty2 * brs, tls, brs
        pos = i + 1
        while pos < count:
            x1, y1, x2, y2, _, ptl, pbr = boxes[pos]
            area = (x2 - x1 + 1) * (y2 - y1 + 1)
            iw = min(tx2, x2) - max(tx1, x1) + 1
            if iw > 0:
                ih = min(ty2, y2) - max(ty1, y1) + 1
                if ih > 0:
                    ua = (tx2 - tx1 + 1) * (ty2 - ty1 + 1) + area - iw * ih
                    ov = iw * ih / ua
                    weight = math.exp(-(ov * ov) / sigma)
                    mw = (1 - weight) ** weight_exp
                    mx1, my1 = mx1 + x1 * ptl * mw, my1 + y1 * ptl * mw
                    mx2, my2 = mx2 + x2 * pbr * mw, my2 + y2 * pbr * mw
                    mts, mbs = mts + ptl * mw, mbs + pbr * mw
                    boxes[pos][4] *= weight
                    if boxes[pos][4] < threshold:
                        boxes[pos] = boxes[count - 1]
                        count -= 1
                        pos -= 1
            pos += 1
        boxes[i][:4] = [mx1 / mts, my1 / mts, mx2 / mbs, my2 / mbs]
        i += 1
    return [row[:5] for row in boxes[:count]]


def test_soft_nms_merge_matches_the_original_loop() -> None:
    rng = np.random.default_rng(8)
    corners = rng.uniform(0, 200, (30, 2))
    rows = np.concatenate(
        [corners, corners + rng.uniform(20, 120, (30, 2)), rng.uniform(0.01, 1, (30, 3))], axis=1
    ).astype(np.float32)
    rows[5] = rows[4] + np.array([1, 1, 1, 1, 0.1, 0, 0], np.float32)  # near-duplicates merge
    got = soft_nms_merge(rows)
    expected = reference_soft_nms_merge(rows.astype(np.float64).tolist())
    np.testing.assert_allclose(got, np.array(expected, np.float32), rtol=1e-5, atol=1e-3)
    # A duplicate moves the box towards itself: two equal boxes merge into the same box.
    pair = np.array([[0, 0, 10, 10, 0.9, 0.5, 0.5], [2, 2, 12, 12, 0.8, 0.5, 0.5]], np.float32)
    merged = soft_nms_merge(pair, weight_exp=1)
    assert 0 < merged[0, 0] < 2 and 10 < merged[0, 2] < 12


def test_multiscale_merge_pools_matches_and_merges() -> None:
    # Scale 1 and a second scale find the same 100 x 100 pixel box, class 1; one centre.
    box = [10.0, 20.0, 110.0, 120.0]
    scale_one = np.array([[*box, 0.8, 0.8, 0.8, 1], [*box, 0.7, 0.7, 0.7, 0]], np.float32)
    scale_two = np.array([[11, 21, 111, 121, 0.6, 0.6, 0.6, 1], [0, 0, 5, 5, -1, 0, 0, 1]])
    centres = np.array([[60, 70, 1, 0.5], [60, 70, 0, 0.0]], np.float32)
    merged = merge_triplet_multiscale([scale_one, scale_two], centres, 2, max_detections=10)
    # Class 1: two boxes merged into one near box, the second decayed; class 0 keeps its own.
    classes = merged[:, 5].tolist()
    assert sorted(classes) == [0, 1, 1]
    assert merged[0, 4] == pytest.approx((2 * 0.8 + 0.5) / 3, rel=1e-6)
    assert box[0] < merged[0, 0] < 11
    plain = merge_triplet_multiscale([scale_one, scale_two], centres, 2, merge=False)
    np.testing.assert_allclose(plain[0, :4], box)
    assert len(merge_triplet_multiscale([scale_one], centres, 2, max_detections=1)) == 1


# --- export -------------------------------------------------------------------------------------


class DecodeWrapper(torch.nn.Module):
    """The decoding an exported graph runs, on a flat tuple of the eight raw heads."""

    names = (
        "tl_heatmap", "br_heatmap", "ct_heatmap", "tl_embedding", "br_embedding",
        "tl_offset", "br_offset", "ct_offset",
    )

    def forward(
        self, tl_heatmap, br_heatmap, ct_heatmap, tl_embedding, br_embedding, tl_offset,
        br_offset, ct_offset,
    ):
        heads = (
            tl_heatmap, br_heatmap, ct_heatmap, tl_embedding, br_embedding, tl_offset,
            br_offset, ct_offset,
        )
        outputs = dict(zip(self.names, heads, strict=True))
        return decode_triplet(outputs, None, 4, K=10, num_pairs=40)


def _export_inputs(seed=9, batch=2, height=14, width=18):
    outputs = random_outputs(torch.Generator().manual_seed(seed), batch, 2, height, width)
    return tuple(outputs[name] for name in DecodeWrapper.names)


def test_torch_export_matches_eager() -> None:
    inputs = _export_inputs()
    batch, height, width = (torch.export.Dim(name, min=2, max=64) for name in "BHW")
    dims = {0: batch, 2: height, 3: width}
    program = torch.export.export(DecodeWrapper(), inputs, dynamic_shapes=(dims,) * len(inputs))
    operators = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("nonzero" in name for name in operators)
    expected = DecodeWrapper()(*inputs)
    assert expected[:, :, 4].gt(0).sum() >= 3
    torch.testing.assert_close(program.module()(*inputs), expected)
    # Another batch and map size through the same graph (dynamic B, H, W).
    other_inputs = _export_inputs(seed=10, batch=3, height=12, width=20)
    torch.testing.assert_close(program.module()(*other_inputs), DecodeWrapper()(*other_inputs))


def test_onnx_runtime_matches_eager(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    inputs = _export_inputs()
    program = torch.onnx.export(
        DecodeWrapper().eval(), inputs, input_names=list(DecodeWrapper.names),
        output_names=["detections"], opset_version=19, dynamo=True, verbose=False,
    )
    path = tmp_path / "decode.onnx"
    program.save(str(path))
    model = onnx.load(str(path))
    assert "NonZero" not in {node.op_type for node in model.graph.node}
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {name: value.numpy() for name, value in zip(DecodeWrapper.names, inputs, strict=True)}
    [got] = session.run(None, feeds)
    np.testing.assert_allclose(got, DecodeWrapper()(*inputs).numpy(), rtol=1e-5, atol=1e-5)


def test_bad_outputs_are_named() -> None:
    outputs = one_object()
    with pytest.raises(TypeError, match=r"outputs\[-1\]"):
        decode_triplet([outputs])
    with pytest.raises(KeyError, match="'ct_offset'"):
        decode_triplet({k: v for k, v in outputs.items() if k != "ct_offset"})
    bad = dict(outputs, tl_embedding=torch.zeros(1, 2, 12, 16))
    with pytest.raises(ValueError, match="tl_embedding"):
        decode_triplet(bad)
    with pytest.raises(ValueError, match="max_detections"):
        decode_triplet(outputs, None, 0)
    with pytest.raises(ValueError, match="K must"):
        decode_triplet(outputs, None, 5, K=0)
