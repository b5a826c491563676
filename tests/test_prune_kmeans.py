"""K-means channel merging: duplicated channels merge without changing the function."""

import pytest
import torch
from test_pruning_invariants import EXAMPLE, groups_of, outputs_of, randomised
from torch import nn

import ctprune.pruning.api as api
import ctprune.pruning.merge as merge
from ctprune.pruning import prune
from ctprune.pruning.graph import ChannelGroup, LayerSlice
from ctprune.pruning.merge import kmeans_selection, merge_distance

pytestmark = pytest.mark.timeout(60)

# One group of each kind: a transposed conv read by a transposed conv (weight dim 0), a
# residual stream (many producers and BatchNorms, read by convs and by the neck's first
# transposed conv), a head's 3x3 conv (bias, no BatchNorm, read by the output conv).
# The layer names below are msra_resnet's (test_pruning_invariants.py runs k-means on others).
ARCHS = ["res18", "res50"]
PATTERNS = ["neck.3", "backbone.layer4.0.downsample.0", "heads.wh.0"]


def _group(model: nn.Module, pattern: str) -> ChannelGroup:
    return next(group for group in groups_of(model) if pattern in group.output_layer_names)


@torch.no_grad()
def _copy_channel(group: ChannelGroup, source: int, target: int) -> None:
    """Make channel ``target`` an exact duplicate of ``source`` in every layer writing it."""
    for layer in group.producers:
        weight = layer.module.weight
        into, of = layer.channels[target], layer.channels[source]
        if isinstance(layer.module, nn.ConvTranspose2d):
            weight[:, into] = weight[:, of]
        else:
            weight[into] = weight[of]
        if layer.module.bias is not None:
            layer.module.bias[into] = layer.module.bias[of]
    for layer in group.norms:
        into, of = layer.channels[target], layer.channels[source]
        for tensor in (
            layer.module.weight,
            layer.module.bias,
            layer.module.running_mean,
            layer.module.running_var,
        ):
            tensor[into] = tensor[of]


def _assert_same_outputs(a: nn.Module, b: nn.Module) -> None:
    for name, value in outputs_of(a).items():
        torch.testing.assert_close(outputs_of(b)[name], value, rtol=0, atol=1e-5)


def _differs(a: nn.Module, b: nn.Module) -> bool:
    return not torch.allclose(
        outputs_of(a)["heatmap"], outputs_of(b)["heatmap"], atol=1e-3
    ) or not (torch.allclose(outputs_of(a)["wh"], outputs_of(b)["wh"], atol=1e-3))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_merging_a_duplicated_channel_keeps_the_outputs(arch, pattern, monkeypatch):
    model = randomised(arch)
    group = _group(model, pattern)
    _copy_channel(group, source=1, target=5)
    arguments = dict(
        ratio_overrides={pattern: 1 / group.width}, example_inputs=EXAMPLE, round_to=None
    )
    merged = prune(model, 0.0, "kmeans", **arguments)
    assert sum(g["width"] - g["kept"] for g in merged.stats.groups) == 1
    _assert_same_outputs(model, merged.model)
    # The same channel removed without folding it into its twin changes the outputs.
    monkeypatch.setattr(api, "fold_into_kept", lambda group, merged: None)
    removed = prune(model, 0.0, "kmeans", **arguments)
    assert removed.stats.widths_after == merged.stats.widths_after
    assert _differs(model, removed.model)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_group_of_identical_channels_merges_to_any_width(arch):
    model = randomised(arch)
    group = _group(model, "neck.3")
    for channel in range(1, group.width):
        _copy_channel(group, source=0, target=channel)
    # One distinct channel, eight clusters asked for: seven channels are kept on their own.
    result = prune(
        model, 0.0, "kmeans", ratio_overrides={"neck.3": 0.5}, example_inputs=EXAMPLE, round_to=None
    )
    assert result.stats.widths_after["neck.3"] == [16, 8]
    _assert_same_outputs(model, result.model)


def test_the_channel_nearest_the_centroid_is_kept():
    conv = nn.Conv2d(1, 6, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, 0.01, 0.02, 5.0, 10.0, -5.0]).view(6, 1, 1, 1))
    group = ChannelGroup("conv", conv, 6, producers=[LayerSlice("conv", conv, torch.arange(6))])
    # {0, 0.01, 0.02} is one cluster, centroid 0.01: channel 1 stays, 0 and 2 fold into it.
    assert kmeans_selection(group, 4) == ([1, 3, 4, 5], {1: [0, 2]})


def test_fold_adds_removed_input_slices_to_the_kept_channel():
    producer = nn.Conv2d(2, 4, 1)
    consumer = nn.ConvTranspose2d(4, 3, 2)  # input channels on weight dim 0
    original = consumer.weight.detach().clone()
    slices = dict(channels=torch.arange(4))
    group = ChannelGroup(
        "producer",
        producer,
        4,
        producers=[LayerSlice("producer", producer, **slices)],
        consumers=[LayerSlice("consumer", consumer, **slices)],
    )
    merge.fold_into_kept(group, {2: [0, 3]})
    torch.testing.assert_close(consumer.weight[2], original[2] + original[0] + original[3])
    torch.testing.assert_close(consumer.weight[[0, 1, 3]], original[[0, 1, 3]])


def test_wide_groups_use_minibatch_kmeans(monkeypatch):
    monkeypatch.setattr(merge, "MINIBATCH_ABOVE_WIDTH", 4)
    monkeypatch.setattr(merge, "MAX_FEATURES", 8)  # the projection too
    model = randomised("res18")
    group = _group(model, "neck.3")
    _copy_channel(group, source=1, target=5)
    kept, merged = kmeans_selection(group, 12)
    assert len(kept) == 12 and sorted(kept + sum(merged.values(), [])) == list(range(16))
    assert not ({1, 5} <= set(kept))  # the twins are in one cluster


def test_kmeans_in_global_scope_merges_near_duplicates_first():
    model = randomised("res18")
    group = _group(model, "neck.0")
    for target in range(8, 16):  # half of neck.0's channels duplicate the other half
        _copy_channel(group, source=target - 8, target=target)
    result = prune(model, 0.1, "kmeans", scope="global", example_inputs=EXAMPLE, round_to=None)
    neck = next(g for g in result.stats.groups if g["name"] == "neck.0")
    assert neck["kept"] == 8  # one twin of each pair scores 0 and goes first; the other stays


def test_merge_distance_leaves_one_channel_of_each_cluster():
    conv = nn.Conv2d(1, 5, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 1.0, 1.0, 4.0, 4.0]).view(5, 1, 1, 1))
    group = ChannelGroup("conv", conv, 5, producers=[LayerSlice("conv", conv, torch.arange(5))])
    scores = merge_distance(group)
    assert sorted(scores.tolist()).count(0.0) == 3  # 2 of the three 1s, 1 of the two 4s
    assert (scores[:3] > 0).sum() == 1 and (scores[3:] > 0).sum() == 1
