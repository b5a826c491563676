"""The TTFNet head type: heads as the original builds them, targets, GIoU loss and decoding
equal to the original's (checked against slow loop references written from its code), the flip
test, and the head on the models, pruning, checkpoints and export."""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import pytest
import torch
from tiny import TinyDetectionData, calibration_batch, tiny_config, tiny_model
from torch import nn
from torch.utils.data import default_collate

from ctprune.pruning import prune
from ctprune.pruning.criteria import CRITERIA, DATA_CRITERIA
from detector import ARCHITECTURES, load_model, output_layers, save_checkpoint
from detector.checkpoint import build_from_config
from detector.config import OUTPUT_STRIDE, ModelConfig, from_dict
from detector.data.dataset import CenterNetDataset, collate
from detector.data.records import DetectionSource, ImageRecord
from detector.data.transforms import AugmentConfig
from detector.engine.config import TrainConfig
from detector.engine.fit import fit
from detector.engine.train import train_loader
from detector.evaluate.config import EvaluateConfig
from detector.evaluate.run import predict_source
from detector.export import DeployModel, export_onnx, fuse_heads, onnx_session
from detector.heads import HEADS
from detector.inference.predictor import Predictor, detect
from detector.losses import clamped_sigmoid, focal_loss
from detector.models import REQUIRED_HEAD
from detector.ttfnet.decode import decode_ttfnet, flip_merge_ttfnet
from detector.ttfnet.heads import (
    HEATMAP_PRIOR,
    LTRB_CHANNELS,
    WH_OFFSET_BASE,
    TTFNetHeads,
    build_ttfnet_heads,
)
from detector.ttfnet.loss import GIOU_WEIGHT, base_locations, giou_loss, ttfnet_loss
from detector.ttfnet.targets import DOWN_RATIO, encode_ttfnet_targets

pytestmark = pytest.mark.timeout(60)

TTFNET_OUTPUTS = {"heatmap": 80, "ltrb": LTRB_CHANNELS}


# ---------------------------------------------------------------------------------------------
# Heads


@pytest.mark.parametrize(("ltrb_convs", "expected"), [(1, 268_948), (2, 305_876)])
def test_original_head_parameter_counts(ltrb_convs: int, expected: int) -> None:
    # TTFNet-18 (wh_head_conv_num=1) and TTFNet-34 (2): head_conv 128, wh_conv 64 on the
    # 64-channel neck, 80 classes. Counted by hand from the original's build_head:
    # hm: 3x3 64->128, 3x3 128->128, 1x1 128->80; wh: (3x3 64->64, 3x3 64->64), 1x1 64->4.
    by_hand = (
        (64 * 9 * 128 + 128) + (128 * 9 * 128 + 128) + (128 * 80 + 80)
        + ltrb_convs * (64 * 9 * 64 + 64)
        + (64 * 4 + 4)
    )
    assert by_hand == expected
    with torch.device("meta"):
        heads = build_ttfnet_heads(64, 128, TTFNET_OUTPUTS, ltrb_convs=ltrb_convs, ltrb_width=64)
    assert sum(p.numel() for p in heads.parameters()) == expected


def test_head_structure_and_initialisation() -> None:
    heads = build_ttfnet_heads(16, 8, {"heatmap": 3, "ltrb": 4})
    assert isinstance(heads, TTFNetHeads)
    heatmap_convs = [m for m in heads["heatmap"] if isinstance(m, nn.Conv2d)]
    ltrb_convs = [m for m in heads["ltrb"] if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in heatmap_convs] == [
        (16, 8, (3, 3)), (8, 8, (3, 3)), (8, 3, (1, 1))
    ]
    # the box branch is half as wide by default (the original's wh_conv 64 at head_conv 128)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in ltrb_convs] == [
        (16, 4, (3, 3)), (4, 4, (1, 1))
    ]
    assert heads.output_convs() == [heatmap_convs[-1], ltrb_convs[-1]]
    prior_logit = -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR)
    assert torch.allclose(heatmap_convs[-1].bias, torch.full((3,), prior_logit))
    assert all(c.bias.abs().max() == 0 for c in heatmap_convs[:-1] + ltrb_convs)
    # normal init widths: large layers give a stable estimate of the standard deviation
    big = build_ttfnet_heads(64, 128, TTFNET_OUTPUTS, ltrb_width=64)
    assert big["heatmap"][2].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert big["ltrb"][0].weight.std().item() == pytest.approx(0.001, rel=0.05)


def test_head_outputs_are_scaled_non_negative_distances() -> None:
    heads = build_ttfnet_heads(6, 8, {"heatmap": 3, "ltrb": 4}, heatmap_convs=1, ltrb_convs=0)
    for conv in heads.output_convs():
        nn.init.normal_(conv.weight)
    features = torch.randn(2, 6, 5, 7)
    outputs = heads(features)
    assert set(outputs) == {"heatmap", "ltrb"}
    assert outputs["heatmap"].shape == (2, 3, 5, 7)
    raw = heads["ltrb"](features)
    assert torch.equal(outputs["ltrb"], raw.clamp(min=0) * WH_OFFSET_BASE)
    assert (raw < 0).any()


def test_head_conv_zero_builds_lone_1x1s() -> None:
    heads = build_ttfnet_heads(6, 0, {"heatmap": 3, "ltrb": 4})
    assert [type(m) for m in heads["heatmap"]] == [nn.Conv2d]
    assert [type(m) for m in heads["ltrb"]] == [nn.Conv2d]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"outputs": {"heatmap": 3, "wh": 2}}, "outputs must name exactly"),
        ({"outputs": {"heatmap": 3, "ltrb": 2}}, r"outputs\['ltrb'\] must be 4"),
        ({"outputs": {"heatmap": 0, "ltrb": 4}}, r"outputs\['heatmap'\] must be >= 1"),
        ({"head_conv": -1}, "head_conv must be an integer >= 0"),
        ({"heatmap_convs": 1.5}, "heatmap_convs must be an integer"),
        ({"ltrb_width": 0}, "ltrb_width must be >= 1"),
    ],
)
def test_head_bad_arguments(kwargs: dict, message: str) -> None:
    arguments = {"in_channels": 6, "head_conv": 8, "outputs": {"heatmap": 3, "ltrb": 4}} | kwargs
    with pytest.raises(ValueError, match=message):
        build_ttfnet_heads(**arguments)


# ---------------------------------------------------------------------------------------------
# Targets


def _reference_targets(boxes, labels, num_classes, output_size):
    """The original's target_single_image (ttf_head.py, wh_agnostic, wh_gaussian, 'log'), as it
    reads, in torch: one full-map fake heatmap per object. Preceded by what mmdetection's
    pipeline does before it (boxes in input pixels clipped to the image; 1-based labels) and by
    our conversion from output-map boxes; boxes the clipping empties are dropped."""
    down_ratio, alpha, beta = 4, 0.54, 0.54
    output_h, output_w = output_size
    gt_boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * down_ratio
    gt_boxes[:, 0::2] = gt_boxes[:, 0::2].clamp(0, output_w * down_ratio - 1)
    gt_boxes[:, 1::2] = gt_boxes[:, 1::2].clamp(0, output_h * down_ratio - 1)
    keep = (gt_boxes[:, 2] > gt_boxes[:, 0]) & (gt_boxes[:, 3] > gt_boxes[:, 1])
    gt_boxes = gt_boxes[keep]
    gt_labels = torch.as_tensor(labels, dtype=torch.int64)[keep] + 1

    heatmap = gt_boxes.new_zeros((num_classes, output_h, output_w))
    fake_heatmap = gt_boxes.new_zeros((output_h, output_w))
    box_target = gt_boxes.new_ones((4, output_h, output_w)) * -1
    reg_weight = gt_boxes.new_zeros((1, output_h, output_w))
    areas = (gt_boxes[:, 3] - gt_boxes[:, 1] + 1) * (gt_boxes[:, 2] - gt_boxes[:, 0] + 1)
    boxes_areas_log = areas.log()
    boxes_area_topk_log, boxes_ind = torch.topk(boxes_areas_log, boxes_areas_log.size(0))
    gt_boxes = gt_boxes[boxes_ind]
    gt_labels = gt_labels[boxes_ind]
    feat_gt_boxes = gt_boxes / down_ratio
    feat_gt_boxes[:, [0, 2]] = torch.clamp(feat_gt_boxes[:, [0, 2]], min=0, max=output_w - 1)
    feat_gt_boxes[:, [1, 3]] = torch.clamp(feat_gt_boxes[:, [1, 3]], min=0, max=output_h - 1)
    feat_hs = feat_gt_boxes[:, 3] - feat_gt_boxes[:, 1]
    feat_ws = feat_gt_boxes[:, 2] - feat_gt_boxes[:, 0]
    ct_ints = (
        torch.stack(
            [(gt_boxes[:, 0] + gt_boxes[:, 2]) / 2, (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2], dim=1
        )
        / down_ratio
    ).to(torch.int)
    h_radiuses_alpha = (feat_hs / 2.0 * alpha).int()
    w_radiuses_alpha = (feat_ws / 2.0 * alpha).int()

    def gaussian_2d(shape, sigma_x, sigma_y):
        m, n = [(ss - 1.0) / 2.0 for ss in shape]
        y, x = np.ogrid[-m : m + 1, -n : n + 1]
        h = np.exp(-(x * x / (2 * sigma_x * sigma_x) + y * y / (2 * sigma_y * sigma_y)))
        h[h < np.finfo(h.dtype).eps * h.max()] = 0
        return h

    def draw_truncate_gaussian(heatmap, center, h_radius, w_radius):
        h, w = 2 * h_radius + 1, 2 * w_radius + 1
        gaussian = heatmap.new_tensor(gaussian_2d((h, w), sigma_x=w / 6, sigma_y=h / 6))
        x, y = int(center[0]), int(center[1])
        height, width = heatmap.shape[0:2]
        left, right = min(x, w_radius), min(width - x, w_radius + 1)
        top, bottom = min(y, h_radius), min(height - y, h_radius + 1)
        masked_heatmap = heatmap[y - top : y + bottom, x - left : x + right]
        masked_gaussian = gaussian[
            h_radius - top : h_radius + bottom, w_radius - left : w_radius + right
        ]
        if min(masked_gaussian.shape) > 0 and min(masked_heatmap.shape) > 0:
            torch.max(masked_heatmap, masked_gaussian, out=masked_heatmap)

    assert alpha == beta  # so the beta area is the alpha Gaussian's, as in the original
    for k in range(boxes_ind.shape[0]):
        cls_id = gt_labels[k] - 1
        fake_heatmap = fake_heatmap.zero_()
        draw_truncate_gaussian(
            fake_heatmap, ct_ints[k], h_radiuses_alpha[k].item(), w_radiuses_alpha[k].item()
        )
        heatmap[cls_id] = torch.max(heatmap[cls_id], fake_heatmap)
        box_target_inds = fake_heatmap > 0
        box_target[:, box_target_inds] = gt_boxes[k][:, None]
        local_heatmap = fake_heatmap[box_target_inds]
        ct_div = local_heatmap.sum()
        local_heatmap *= boxes_area_topk_log[k]
        reg_weight[0, box_target_inds] = local_heatmap / ct_div
    return {
        "heatmap": heatmap.numpy(),
        "box_target": box_target.numpy(),
        "box_weight": reg_weight[0].numpy(),
    }


def _assert_targets_equal(ours: dict, reference: dict) -> None:
    assert set(ours) == {"heatmap", "box_target", "box_weight"}
    for key, value in reference.items():
        assert ours[key].dtype == np.float32 and ours[key].shape == value.shape, key
    np.testing.assert_array_equal(ours["heatmap"], reference["heatmap"])
    np.testing.assert_array_equal(ours["box_target"], reference["box_target"])
    np.testing.assert_allclose(ours["box_weight"], reference["box_weight"], rtol=1e-6, atol=0)


def test_one_box_by_hand() -> None:
    # Output map 16 x 20 (input 64 x 80). Box in output-map coordinates (2, 3)-(9, 8): input
    # pixels (8, 12)-(36, 32); +1 area 29 * 21 = 609. Map height 5, width 7: radii
    # int(5 / 2 * 0.54) = 1 and int(7 / 2 * 0.54) = int(1.89) = 1; centre (22 / 4, 22 / 4) ->
    # cell (5, 5).
    targets = encode_ttfnet_targets(np.array([[2, 3, 9, 8]]), np.array([1]), 3, (16, 20))
    heatmap, box_target, weight = targets["heatmap"], targets["box_target"], targets["box_weight"]
    assert heatmap[1, 5, 5] == 1.0 and heatmap[[0, 2]].max() == 0
    # Gaussian: sigma_x = sigma_y = 3 / 6, so exp(-2) beside the peak and exp(-4) diagonally
    expected = np.exp(-np.array([[4.0, 2.0, 4.0], [2.0, 0.0, 2.0], [4.0, 2.0, 4.0]]))
    np.testing.assert_allclose(heatmap[1, 4:7, 4:7], expected, rtol=1e-6)
    assert np.count_nonzero(heatmap) == 9
    region = weight > 0
    assert region[4:7, 4:7].all() and region.sum() == 9
    np.testing.assert_array_equal(box_target[:, region].T, np.tile([8, 12, 36, 32], (9, 1)))
    assert (box_target[:, ~region] == -1).all()
    np.testing.assert_allclose(weight[4:7, 4:7], expected / expected.sum() * np.log(609), rtol=1e-6)
    assert weight.sum() == pytest.approx(np.log(609), rel=1e-6)


def test_elongated_box_radii_and_truncated_centre() -> None:
    # Map box (0.5, 1)-(12.5, 3) in a 8 x 16 map: h 2, w 12 -> radii int(0.54) = 0 and
    # int(3.24) = 3: a 1 x 7 region. Centre input (26, 8) / 4 = (6.5, 2) -> cell (6, 2).
    targets = encode_ttfnet_targets(np.array([[0.5, 1, 12.5, 3]]), np.array([0]), 1, (8, 16))
    rows, columns = np.nonzero(targets["box_weight"])
    assert set(rows.tolist()) == {2} and columns.tolist() == list(range(3, 10))
    assert targets["heatmap"][0, 2, 6] == 1.0
    # one object's weights sum to log(+1 area): input box (2, 4)-(50, 12), area 49 * 9
    assert targets["box_weight"].sum() == pytest.approx(np.log(49 * 9), rel=1e-6)


def test_smaller_boxes_overwrite_larger_ones() -> None:
    large = [1, 1, 13, 15]  # listed first and last: the order of drawing is by area
    small = [6, 6, 10, 10]
    for boxes in ([large, small], [small, large]):
        targets = encode_ttfnet_targets(np.array(boxes, float), np.array([0, 0]), 1, (16, 16))
        # the small box's centre cell holds the small box's target and its weights
        np.testing.assert_array_equal(targets["box_target"][:, 8, 8], np.array(small) * 4)
        small_only = encode_ttfnet_targets(np.array([small], float), np.array([0]), 1, (16, 16))
        small_region = small_only["box_weight"] > 0
        np.testing.assert_array_equal(
            targets["box_weight"][small_region], small_only["box_weight"][small_region]
        )
        # the large box keeps its target only outside the small box's region
        outside = (targets["box_weight"] > 0) & ~small_region
        assert outside.any()
        assert (targets["box_target"][:, outside].T == np.array(large) * 4).all()
        # heatmaps merge by maximum: both peaks are there (centre cells (7, 8) and (8, 8))
        assert targets["heatmap"][0, 8, 7] == 1.0 and targets["heatmap"][0, 8, 8] == 1.0


def test_targets_match_the_original_on_random_boxes() -> None:
    rng = np.random.default_rng(0)
    for trial in range(30):
        height, width = rng.integers(4, 24, size=2).tolist()
        count = int(rng.integers(0, 9))
        corners = rng.uniform(-3, [width + 3, height + 3], size=(count, 2, 2))
        sizes = rng.uniform(0, [width / 1.5, height / 1.5], size=(count, 2))
        boxes = np.concatenate([corners[:, 0], corners[:, 0] + sizes], 1)
        if trial % 5 == 0 and count:  # integer boxes, as annotations often are
            boxes = np.round(boxes * 4) / 4
        labels = rng.integers(0, 3, size=count)
        ours = encode_ttfnet_targets(boxes, labels, 3, (height, width))
        _assert_targets_equal(ours, _reference_targets(boxes, labels, 3, (height, width)))


def test_targets_edge_cases() -> None:
    empty = encode_ttfnet_targets(np.zeros((0, 4)), np.zeros(0, int), 2, (4, 6))
    assert empty["heatmap"].shape == (2, 4, 6) and not empty["heatmap"].any()
    assert (empty["box_target"] == -1).all() and not empty["box_weight"].any()
    # a box wholly outside the view is dropped, one across the border is clipped
    outside = encode_ttfnet_targets(np.array([[-5, -5, -1, -1.0]]), np.array([0]), 1, (8, 8))
    assert not outside["heatmap"].any()
    border = encode_ttfnet_targets(np.array([[-4, -4, 3, 3.0]]), np.array([0]), 1, (8, 8))
    # input (-16, -16)-(12, 12) clipped to (0, 0)-(12, 12); centre cell (1, 1), radii 0
    np.testing.assert_array_equal(border["box_target"][:, 1, 1], [0, 0, 12, 12])
    assert np.count_nonzero(border["box_weight"]) == 1
    assert border["heatmap"].max() == 1.0
    # min_overlap, radius_variant and max_objects do not apply
    boxes, labels = np.array([[1, 1, 5, 6.0], [2, 0, 3, 2]]), np.array([0, 1])
    base = encode_ttfnet_targets(boxes, labels, 2, (8, 8))
    other = encode_ttfnet_targets(boxes, labels, 2, (8, 8), 1, 0.3, "corrected")
    for key in base:
        np.testing.assert_array_equal(base[key], other[key])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((np.zeros((1, 3)), np.zeros(1, int), 2, (4, 4)), r"boxes must have shape \(N, 4\)"),
        ((np.zeros((1, 4)), np.zeros(2, int), 2, (4, 4)), r"labels must have shape \(1,\)"),
        ((np.array([[0, 0, np.nan, 1]]), np.zeros(1, int), 2, (4, 4)), "non-finite"),
        ((np.zeros((1, 4)), np.array([2]), 2, (4, 4)), r"label 2 is outside \[0, 2\)"),
        ((np.zeros((1, 4)), np.array([0.5]), 2, (4, 4)), "integer class indices"),
        ((np.zeros((1, 4)), np.zeros(1, int), 0, (4, 4)), "num_classes"),
        ((np.zeros((1, 4)), np.zeros(1, int), 2, (4, 0)), "output_size"),
    ],
)
def test_targets_bad_input(arguments: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_ttfnet_targets(*arguments)


def test_down_ratio_is_the_model_stride() -> None:
    assert DOWN_RATIO == OUTPUT_STRIDE


# ---------------------------------------------------------------------------------------------
# Loss


def _reference_giou_loop(pred_boxes, target_boxes, weight, avg_factor) -> float:
    """mmdetection v1's giou_loss, one positive location at a time, in Python floats."""
    total = 0.0
    for index in zip(*torch.nonzero(weight > 0, as_tuple=True), strict=True):
        px1, py1, px2, py2 = pred_boxes[index].tolist()
        tx1, ty1, tx2, ty2 = target_boxes[index].tolist()
        overlap = max(min(px2, tx2) - max(px1, tx1) + 1, 0) * max(
            min(py2, ty2) - max(py1, ty1) + 1, 0
        )
        pred_area = (px2 - px1 + 1) * (py2 - py1 + 1)
        target_area = (tx2 - tx1 + 1) * (ty2 - ty1 + 1)
        union = pred_area + target_area - overlap
        enclose = max(max(px2, tx2) - min(px1, tx1) + 1, 0) * max(
            max(py2, ty2) - min(py1, ty1) + 1, 0
        )
        giou = overlap / union - (enclose - union) / enclose
        total += (1 - giou) * weight[index].item()
    return total / avg_factor


def _reference_loss_calc(pred_hm, pred_wh, heatmap, box_target, wh_weight):
    """The original's TTFHead.loss_calc (hm_weight 1, wh_weight 5) with ct_focal_loss, as it
    reads, but the GIoU term computed by the loop above."""
    height, width = pred_hm.shape[2:]
    pred_hm = torch.clamp(pred_hm.sigmoid(), min=1e-4, max=1 - 1e-4)
    pos_inds, neg_inds = heatmap.eq(1).float(), heatmap.lt(1).float()
    neg_weights = torch.pow(1 - heatmap, 4)
    pos_loss = (-torch.log(pred_hm) * torch.pow(1 - pred_hm, 2) * pos_inds).sum()
    neg_loss = (-torch.log(1 - pred_hm) * torch.pow(pred_hm, 2) * neg_weights * neg_inds).sum()
    num_pos = pos_inds.sum()
    hm_loss = neg_loss if num_pos == 0 else (pos_loss + neg_loss) / num_pos
    mask = wh_weight.view(-1, height, width)
    avg_factor = mask.sum().item() + 1e-4
    shifts_x = torch.arange(0, (width - 1) * 4 + 1, 4, dtype=torch.float32)
    shifts_y = torch.arange(0, (height - 1) * 4 + 1, 4, dtype=torch.float32)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    base_loc = torch.stack((shift_x, shift_y), dim=0)
    pred_boxes = torch.cat(
        (base_loc - pred_wh[:, [0, 1]], base_loc + pred_wh[:, [2, 3]]), dim=1
    ).permute(0, 2, 3, 1)
    boxes = box_target.permute(0, 2, 3, 1)
    return hm_loss.item(), _reference_giou_loop(pred_boxes, boxes, mask, avg_factor) * 5


def _random_batch(generator: np.random.Generator, batch: int, classes: int, size: tuple) -> dict:
    items = []
    for _ in range(batch):
        count = int(generator.integers(0, 5))
        corners = generator.uniform(0, [size[1] - 2, size[0] - 2], size=(count, 2))
        sides = generator.uniform(1, [size[1] / 2, size[0] / 2], size=(count, 2))
        boxes = np.concatenate([corners, corners + sides], 1)
        labels = generator.integers(0, classes, size=count)
        items.append(encode_ttfnet_targets(boxes, labels, classes, size))
    return {key: torch.from_numpy(np.stack([item[key] for item in items])) for key in items[0]}


def test_giou_by_hand() -> None:
    # pred (0, 0)-(3, 3) and target (2, 2)-(5, 5), +1 pixels: areas 16 and 16, overlap 2 x 2,
    # union 28, enclosing 6 x 6 = 36: GIoU = 4 / 28 - 8 / 36.
    pred = torch.tensor([[0.0, 0, 3, 3], [1, 1, 4, 6]])
    target = torch.tensor([[2.0, 2, 5, 5], [1, 1, 4, 6]])
    weight = torch.tensor([2.0, 3.0])
    expected = 2 * (1 - (4 / 28 - 8 / 36)) / 10  # the identical pair contributes 0
    assert giou_loss(pred, target, weight, torch.tensor(10.0)).item() == pytest.approx(expected)


def test_loss_matches_the_original_on_random_outputs() -> None:
    generator = np.random.default_rng(1)
    for _ in range(4):
        batch = _random_batch(generator, 3, 4, (10, 12))
        logits = torch.randn(3, 4, 10, 12) * 2
        ltrb = torch.rand(3, 4, 10, 12) * 30
        outputs = [{"heatmap": logits, "ltrb": ltrb}]
        total, parts = ttfnet_loss(outputs, batch)
        heatmap_expected, giou_expected = _reference_loss_calc(
            logits, ltrb, batch["heatmap"], batch["box_target"], batch["box_weight"]
        )
        assert parts["heatmap"].item() == pytest.approx(heatmap_expected, rel=1e-5)
        assert GIOU_WEIGHT * parts["ltrb"].item() == pytest.approx(giou_expected, rel=1e-5)
        assert total.item() == pytest.approx(heatmap_expected + giou_expected, rel=1e-5)
        assert set(parts) == {"heatmap", "ltrb", "total"}
        # the heatmap term is the house focal loss, exactly
        assert torch.equal(parts["heatmap"], focal_loss(clamped_sigmoid(logits), batch["heatmap"]))


def test_loss_averages_stacks_and_survives_empty_batches() -> None:
    batch = _random_batch(np.random.default_rng(2), 2, 3, (8, 8))
    first = {"heatmap": torch.randn(2, 3, 8, 8), "ltrb": torch.rand(2, 4, 8, 8) * 20}
    second = {"heatmap": torch.randn(2, 3, 8, 8), "ltrb": torch.rand(2, 4, 8, 8) * 20}
    _, one = ttfnet_loss([first], batch)
    _, two = ttfnet_loss([second], batch)
    _, both = ttfnet_loss([first, second], batch)
    for key in ("heatmap", "ltrb", "total"):
        assert both[key].item() == pytest.approx((one[key] + two[key]).item() / 2, rel=1e-6)
    empty = {
        "heatmap": torch.zeros(2, 3, 8, 8),
        "box_target": -torch.ones(2, 4, 8, 8),
        "box_weight": torch.zeros(2, 8, 8),
    }
    ltrb = torch.zeros(2, 4, 8, 8, requires_grad=True)
    total, parts = ttfnet_loss([{"heatmap": first["heatmap"], "ltrb": ltrb}], empty)
    total.backward()
    assert parts["ltrb"].item() == 0 and torch.isfinite(total)
    assert torch.equal(ltrb.grad, torch.zeros_like(ltrb))


def test_loss_hooks_and_bad_input() -> None:
    batch = _random_batch(np.random.default_rng(3), 2, 3, (8, 8))
    outputs = [{"heatmap": torch.randn(2, 3, 8, 8), "ltrb": torch.rand(2, 4, 8, 8) * 20}]
    _, parts = ttfnet_loss(outputs, batch, heatmap_loss=lambda p, g: (p - g).pow(2).sum())
    expected = (clamped_sigmoid(outputs[0]["heatmap"]) - batch["heatmap"]).pow(2).sum()
    assert parts["heatmap"].item() == pytest.approx(expected.item())
    total, parts = ttfnet_loss(outputs, batch, balance={"ltrb": 1.0, "heatmap": 2.0})
    assert total.item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="batch has no 'box_weight'"):
        ttfnet_loss(outputs, {k: v for k, v in batch.items() if k != "box_weight"})
    with pytest.raises(ValueError, match=r"outputs\[0\] has no 'ltrb'"):
        ttfnet_loss([{"heatmap": outputs[0]["heatmap"]}], batch)
    with pytest.raises(ValueError, match=r"outputs\[0\]\['ltrb'\] must be \(B, 4, H, W\)"):
        ttfnet_loss([{"heatmap": outputs[0]["heatmap"], "ltrb": torch.rand(2, 4, 4, 4)}], batch)
    with pytest.raises(ValueError, match="outputs is empty"):
        ttfnet_loss([], batch)


# ---------------------------------------------------------------------------------------------
# Decoding


def _perfect_outputs(targets: dict) -> dict[str, torch.Tensor]:
    """Outputs that reproduce the targets: logits of the target heatmap, and at every cell
    with a box target the distances from its base location to that box."""
    heatmap = torch.from_numpy(targets["heatmap"])[None]
    logits = torch.logit(heatmap.clamp(1e-4, 1 - 1e-4))
    boxes = torch.from_numpy(targets["box_target"])[None]
    locations = base_locations(*heatmap.shape[2:])
    ltrb = torch.cat([locations - boxes[:, :2], boxes[:, 2:] - locations], dim=1)
    ltrb = ltrb * torch.from_numpy(targets["box_weight"] > 0)[None, None]
    return {"heatmap": logits, "ltrb": ltrb}


# Separate boxes (no box target region of one covers another's centre) in output-map
# coordinates of a 16 x 20 map, integer input pixels.
ROUND_TRIP_BOXES = np.array(
    [[1, 1, 6.25, 5.5], [9, 2, 18.5, 7], [2, 9, 5, 15], [11.75, 10, 17, 13.5]], dtype=np.float32
)
ROUND_TRIP_LABELS = np.array([0, 2, 1, 0])


def _match(detections: torch.Tensor, boxes: np.ndarray, labels: np.ndarray) -> None:
    top = detections[0, : len(boxes)].numpy()
    assert (top[:, 4] > 0.99).all() and (detections[0, len(boxes) :, 4] < 0.99).all()
    order = np.lexsort((top[:, 1], top[:, 0]))
    expected_order = np.lexsort((boxes[:, 1], boxes[:, 0]))
    np.testing.assert_allclose(top[order, :4], boxes[expected_order], atol=1e-5)
    np.testing.assert_array_equal(top[order, 5], labels[expected_order])


def test_decode_round_trip() -> None:
    targets = encode_ttfnet_targets(ROUND_TRIP_BOXES, ROUND_TRIP_LABELS, 3, (16, 20))
    detections = decode_ttfnet(_perfect_outputs(targets), None, 10)
    assert detections.shape == (1, 10, 6) and detections.dtype == torch.float32
    _match(detections, ROUND_TRIP_BOXES, ROUND_TRIP_LABELS)


def test_flip_test_swaps_left_and_right() -> None:
    width = 20
    targets = encode_ttfnet_targets(ROUND_TRIP_BOXES, ROUND_TRIP_LABELS, 3, (16, width))
    # The mirrored image's boxes: input pixel p -> 4 W - 1 - p, as mmdetection flips them.
    input_boxes = ROUND_TRIP_BOXES * 4
    mirrored = np.stack(
        [4 * width - 1 - input_boxes[:, 2], input_boxes[:, 1],
         4 * width - 1 - input_boxes[:, 0], input_boxes[:, 3]], 1
    ) / 4
    mirrored_targets = encode_ttfnet_targets(mirrored, ROUND_TRIP_LABELS, 3, (16, width))
    outputs = _perfect_outputs(targets)
    flipped = _perfect_outputs(mirrored_targets)
    # The mirror's peaks fall on the mirrored cells, so the merged heatmap keeps them at 1.
    merged_heatmap, merged_ltrb = flip_merge_ttfnet(outputs, flipped)
    peaks = torch.from_numpy(targets["heatmap"] == 1)[None]
    assert torch.allclose(merged_heatmap[peaks], torch.full((4,), 1 - 1e-4))
    detections = decode_ttfnet(outputs, flipped, 10)
    _match(detections, ROUND_TRIP_BOXES, ROUND_TRIP_LABELS)
    # (Base locations sit at a cell's corner, so l != r at the peaks: a merge that did not swap
    # l and r, or did not move them by 3 pixels, would miss these boxes.)
    assert not torch.allclose(merged_ltrb[:, 0][peaks[:, 0]], merged_ltrb[:, 2][peaks[:, 0]])
    # The merge is an average: equal halves give the single prediction back. The mirror of a
    # prediction: r and l swapped, moved by 3 pixels to the mirrored base location, mirrored.
    shift = torch.tensor([-3.0, 0, 3, 0])[:, None, None]
    mirror_of_outputs = {
        "heatmap": outputs["heatmap"].flip(3),
        "ltrb": (outputs["ltrb"][:, [2, 1, 0, 3]] + shift).flip(3),
    }
    _, same_ltrb = flip_merge_ttfnet(outputs, mirror_of_outputs)
    assert torch.allclose(same_ltrb, outputs["ltrb"], atol=1e-5)
    assert merged_ltrb.shape == outputs["ltrb"].shape


def _reference_get_bboxes(pred_heatmap, pred_wh, topk):
    """The original's get_bboxes (with _topk: per-class top K, then top K of those), before its
    score threshold and clipping: boxes in input pixels."""
    batch, cat, height, width = pred_heatmap.size()
    heat = pred_heatmap.sigmoid()
    hmax = torch.nn.functional.max_pool2d(heat, 3, stride=1, padding=1)
    heat = heat * (hmax == heat).float()
    topk_scores, topk_inds = torch.topk(heat.view(batch, cat, -1), topk)
    topk_inds = topk_inds % (height * width)
    topk_ys = (topk_inds / width).int().float()
    topk_xs = (topk_inds % width).int().float()
    topk_score, topk_ind = torch.topk(topk_scores.view(batch, -1), topk)
    clses = (topk_ind / topk).int()
    topk_ind = topk_ind.unsqueeze(2)
    inds = topk_inds.view(batch, -1, 1).gather(1, topk_ind).view(batch, topk)
    ys = topk_ys.view(batch, -1, 1).gather(1, topk_ind).view(batch, topk, 1) * 4
    xs = topk_xs.view(batch, -1, 1).gather(1, topk_ind).view(batch, topk, 1) * 4
    wh = pred_wh.permute(0, 2, 3, 1).contiguous().view(batch, -1, 4)
    wh = wh.gather(1, inds.unsqueeze(2).expand(batch, topk, 4))
    bboxes = torch.cat(
        [xs - wh[..., [0]], ys - wh[..., [1]], xs + wh[..., [2]], ys + wh[..., [3]]], dim=2
    )
    return bboxes, topk_score, clses.float()


def test_decode_matches_the_original_get_bboxes() -> None:
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 9, 11, generator=generator) * 3
    ltrb = torch.rand(2, 4, 9, 11, generator=generator) * 40
    detections = decode_ttfnet({"heatmap": logits, "ltrb": ltrb}, None, 20)
    boxes, scores, classes = _reference_get_bboxes(logits, ltrb, 20)
    torch.testing.assert_close(detections[..., :4] * DOWN_RATIO, boxes)
    torch.testing.assert_close(detections[..., 4], scores)
    torch.testing.assert_close(detections[..., 5], classes)


def test_decode_bad_input() -> None:
    outputs = {"heatmap": torch.randn(1, 3, 4, 4), "ltrb": torch.rand(1, 4, 4, 4)}
    with pytest.raises(ValueError, match="has no 'ltrb'"):
        decode_ttfnet({"heatmap": outputs["heatmap"]}, None, 5)
    with pytest.raises(ValueError, match=r"\['ltrb'\] must be \(B, 4, H, W\)"):
        decode_ttfnet({"heatmap": outputs["heatmap"], "ltrb": torch.rand(1, 2, 4, 4)}, None, 5)
    with pytest.raises(ValueError, match="max_detections must be a positive integer"):
        decode_ttfnet(outputs, None, 0)
    with pytest.raises(ValueError, match="same shapes"):
        decode_ttfnet(outputs, {"heatmap": torch.randn(1, 3, 4, 2), "ltrb": torch.rand(1, 4, 4, 2)})
    # K is clamped to the map
    assert decode_ttfnet(outputs, None, 100).shape == (1, 48, 6)


# ---------------------------------------------------------------------------------------------
# The head on every backbone, training, evaluation, pruning, checkpoints and export

IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def ttfnet_model(arch: str = "res18") -> nn.Module:
    return tiny_model(arch, head="ttfnet")


def ttfnet_config(arch: str = "res18") -> ModelConfig:
    return dataclasses.replace(tiny_config(arch), head="ttfnet")


def test_head_table_entry() -> None:
    ttfnet = HEADS["ttfnet"]
    assert ttfnet.output_channels(5) == {"heatmap": 5, "ltrb": 4}
    assert ttfnet.encode_targets is encode_ttfnet_targets
    assert ttfnet.loss is ttfnet_loss
    assert ttfnet.decode is decode_ttfnet
    assert ttfnet.build_heads is build_ttfnet_heads
    assert from_dict(ModelConfig, {"head": "ttfnet"}, "model").head == "ttfnet"


# every backbone but the triplet-only ones (`REQUIRED_HEAD`)
@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - set(REQUIRED_HEAD)))
def test_every_backbone_builds_the_ttfnet_head(arch: str) -> None:
    model = ttfnet_model(arch).eval()
    with torch.no_grad():
        outputs = model(IMAGES)
    heads = [module for module in model.modules() if isinstance(module, TTFNetHeads)]
    assert len(heads) == len(outputs) >= 1  # one head per stack (hourglass: two)
    for output in outputs:
        assert {name: tuple(value.shape) for name, value in output.items()} == {
            "heatmap": (2, 3, 16, 16), "ltrb": (2, 4, 16, 16)
        }
        assert (output["ltrb"] >= 0).all()
    prior_logit = -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR)
    declared = {id(layer) for layer in output_layers(model)}
    for head in heads:  # the families leave the head's own initialisation alone
        assert torch.allclose(head["heatmap"][-1].bias, torch.tensor(prior_logit))
        assert all(id(conv) in declared for conv in head.output_convs())


def test_train_step_dataset_and_evaluation(source) -> None:
    config = ttfnet_config()
    dataset = CenterNetDataset(
        source.records, 3, config.input, train=True, head="ttfnet", augment=AugmentConfig()
    )
    batch = collate([dataset[0], dataset[1]])
    assert set(batch) == {"image", "heatmap", "box_target", "box_weight", "meta"}
    assert batch["box_target"].shape == (2, 4, 16, 16) and batch["box_weight"].sum() > 0
    model = ttfnet_model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        total, parts = ttfnet_loss(model(batch["image"]), batch)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(parts["total"].item())
    assert all(math.isfinite(value) for value in losses) and losses[-1] < losses[0]
    evaluation = EvaluateConfig(batch_size=2, workers=0, pr_curves=False)
    detections, loss = predict_source(model.eval(), source, config, evaluation, "cpu")
    assert loss is not None and math.isfinite(loss)
    assert sorted(detections) == [1, 2] and detections[1].shape[1] == 6


def test_detect_flip_and_predictor() -> None:
    model = ttfnet_model().eval()
    with torch.no_grad():
        plain = detect(model, IMAGES, max_detections=7, head="ttfnet")
        assert torch.equal(plain, decode_ttfnet(model(IMAGES)[-1], None, 7))
        flipped = detect(model, IMAGES, flip=True, max_detections=7, head="ttfnet")
        expected = decode_ttfnet(model(IMAGES)[-1], model(IMAGES.flip(-1))[-1], 7)
    torch.testing.assert_close(flipped, expected)
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    [result] = Predictor(model, ttfnet_config(), device="cpu").predict([image])
    assert result.boxes.shape[1] == 4


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_prune_save_load_round_trip(criterion: str, tmp_path) -> None:
    model = ttfnet_model().eval()
    generator = torch.Generator().manual_seed(2)
    for layer in model.modules():  # trained-looking gammas, which bn_gamma needs
        if isinstance(layer, nn.BatchNorm2d):
            layer.weight.data.uniform_(0.5, 1.5, generator=generator)
    data = [calibration_batch("ttfnet")] if criterion in DATA_CRITERIA else None
    result = prune(model, 0.3, criterion, round_to=None, example_inputs=IMAGES[:1], data=data)
    pruned = result.model.eval()
    assert result.stats.params_after < result.stats.params_before
    head = pruned.heads
    assert [conv.out_channels for conv in head.output_convs()] == [3, 4]
    with torch.no_grad():
        expected = pruned(IMAGES)[-1]
    save_checkpoint(tmp_path / "pruned.pt", pruned, ttfnet_config())
    loaded, checkpoint = load_model(tmp_path / "pruned.pt")
    assert checkpoint.model_config.head == "ttfnet" and checkpoint.channel_plan
    with torch.no_grad():
        actual = loaded.eval()(IMAGES)[-1]
    for name in ("heatmap", "ltrb"):
        assert torch.equal(actual[name], expected[name])


def test_deployed_model_and_onnx_parity(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxslim")
    model = ttfnet_model().eval()
    generator = torch.Generator().manual_seed(1)
    for layer in model.modules():  # distinct scores (fresh heads are flat), boxes of many sizes
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_in = layer.weight[0].numel() if isinstance(layer, nn.Conv2d) else layer.in_channels
            layer.weight.data.normal_(0, 1 / math.sqrt(fan_in), generator=generator)
    assert fuse_heads(model) is model  # the box branch's scale is not a FusedHeads' output
    spec = ttfnet_config().input
    with torch.no_grad():
        raw = DeployModel(model, spec, head="ttfnet")(IMAGES)
        expected = decode_ttfnet(model(IMAGES)[-1], None, 50)
    assert [tuple(tensor.shape) for tensor in raw] == [(2, 3, 16, 16), (2, 4, 16, 16)]
    expected[..., :4] *= DOWN_RATIO  # the deployed graph gives input pixels
    # A static graph (batch 2, 64 x 64) keeps the test short: the dynamic-shape parts of the
    # decoder (K clamped to the map, symbolic sizes) are `peak_topk`'s, which
    # tests/test_export.py exports with dynamic shapes through ctdet_decode.
    path = export_onnx(
        tmp_path / "ttfnet.onnx", model, spec, head="ttfnet", decode=True, batch=2,
        max_detections=50,
    )
    operators = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "TopK" in operators and not operators & {"NonZero", "OneHot"}
    [actual] = onnx_session(path, threads=1).run(None, {"images": IMAGES.numpy()})
    assert actual.shape == (2, 50, 6)
    assert len(np.unique(expected[..., 4].numpy())) == 100  # no ties: ranks are comparable
    np.testing.assert_allclose(actual[..., 4], expected[..., 4].numpy(), atol=1e-4)
    np.testing.assert_array_equal(actual[..., 5], expected[..., 5].numpy())
    np.testing.assert_allclose(actual[..., :4], expected[..., :4].numpy(), atol=1e-3)


@pytest.fixture
def source(tmp_path) -> DetectionSource:
    records = []
    boxes = np.array([[8.0, 10.0, 40.0, 50.0], [60.0, 20.0, 120.0, 80.0]])
    labels = np.array([0, 2])
    for image_id in (1, 2):
        path = tmp_path / f"{image_id}.png"
        pixels = np.random.default_rng(image_id).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        cv2.imwrite(str(path), pixels)
        records.append(ImageRecord(image_id, path, 128, 96, boxes, labels, np.zeros(2, bool)))
    return DetectionSource(records, ["a", "b", "c"], [1, 2, 3], None, {})


def test_fit_trains_a_ttfnet_model(tmp_path) -> None:
    model_config = ttfnet_config()
    config = TrainConfig(epochs=4, batch_size=4, lr=2e-3, workers=0, eval_interval=1,
                         lr_steps=[100.0], log_interval=1, seed=1)
    loader = train_loader(TinyDetectionData(8, head="ttfnet"), config, collate_fn=default_collate)
    result = fit(build_from_config(model_config), model_config, config, loader, tmp_path)
    losses = [record["train_loss"] for record in result.history]
    assert all(math.isfinite(value) for value in losses) and losses[-1] < losses[0]
    loaded, checkpoint = load_model(tmp_path / "last.pt")
    assert checkpoint.model_config.head == "ttfnet"
    assert isinstance(loaded.heads, TTFNetHeads)
