"""The TTFNet head type: heads as the original builds them, targets, GIoU loss and decoding
equal to the original's (checked against slow loop references written from its code), the flip
test, and the head on the models, pruning, checkpoints and export."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detector.ttfnet.heads import (
    HEATMAP_PRIOR,
    LTRB_CHANNELS,
    WH_OFFSET_BASE,
    TTFNetHeads,
    build_ttfnet_heads,
)

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
