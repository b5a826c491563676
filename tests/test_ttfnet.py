"""The TTFNet head type: heads as the original builds them, targets, GIoU loss and decoding
equal to the original's (checked against slow loop references written from its code), the flip
test, and the head on the models, pruning, checkpoints and export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from detector.config import OUTPUT_STRIDE
from detector.ttfnet.heads import (
    HEATMAP_PRIOR,
    LTRB_CHANNELS,
    WH_OFFSET_BASE,
    TTFNetHeads,
    build_ttfnet_heads,
)
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
    # the weight ignores the box's clipping to nothing: input box (2, 4)-(50, 12), area 49 * 9
    assert targets["box_weight"].sum() == pytest.approx(np.log(49 * 9), rel=1e-6)


def test_smaller_boxes_overwrite_larger_ones() -> None:
    large = [1, 1, 15, 15]  # listed first and last: the order of drawing is by area
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
        # heatmaps merge by maximum: both peaks are there
        assert targets["heatmap"][0, 8, 8] == 1.0


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
