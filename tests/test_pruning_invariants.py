"""Pruning invariants, on every architecture in `detector.models.ARCHITECTURES` at tiny widths.

For each backbone: pruning keeps every stack's output shapes and the heads' output channels, the
parameter count lands in the band the ratio implies, removing exactly-dead channels leaves the
outputs equal (so every coupled layer was cut at the same channels), and a pruned model saved
and loaded (base config + channel plan + state dict, ``weights_only``) gives identical outputs.
Family-specific pruning checks (deformable convs' offset convs, DLA's roots, k-means merging)
live beside their families; the helpers here are shared with them.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import pytest
import torch
from tiny import calibration_batch, tiny_config, tiny_model
from torch import nn

from ctprune.pruning import CRITERIA, PruneResult, prune, rounded_keep
from ctprune.pruning.criteria import DATA_CRITERIA
from ctprune.pruning.graph import build_graph, collect_groups, resolve_ignored_layers
from detector import (
    ARCHITECTURES,
    count_parameters,
    load_model,
    output_layers,
    read_checkpoint,
    save_checkpoint,
)
from detector.checkpoint import build_from_config
from detector.models import REQUIRED_HEAD

# The centernet head's architectures (the triplet-only ones are tested in test_triplet_models).
CENTERNET_ARCHS = sorted(set(ARCHITECTURES) - set(REQUIRED_HEAD))

# Graph building traces one forward pass; a hang there (as torch-pruning does on unregistered
# deformable convs) must fail the test instead of blocking the suite.
pytestmark = pytest.mark.timeout(60)

ARCHS = CENTERNET_ARCHS
EXAMPLE = torch.zeros(1, 3, 64, 64)
IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
RATIO = 0.4
# A conv between two pruned layers keeps (1 - ratio)^2 of its weights, one beside an unpruned
# edge (the image, the heads' outputs) 1 - ratio; global scope moves the cut between layers.
# Measured at ratio 0.4 on the tiny models: 0.37-0.46 of the parameters.
PARAMETER_BAND = (0.8 * (1 - RATIO) ** 2, 1 - RATIO)


def randomised(arch: str, head: str = "centernet") -> nn.Module:
    """A tiny model with non-trivial BatchNorms (distinct gammas, statistics) and biases, so
    that removing or mixing up a live channel shows in the outputs. Every weighted layer's
    filters (convs, transposed convs, deformable convs and their offset/mask convs) are drawn
    with variance 1 / fan-in, so activations keep their scale through the network."""
    model = tiny_model(arch, head=head)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
                module.running_mean.copy_(
                    torch.rand(module.num_features, generator=generator) - 0.5
                )
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            elif isinstance(getattr(module, "weight", None), nn.Parameter):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator) / math.sqrt(fan_in)
                )
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model.eval()


def outputs_of(model: nn.Module) -> dict:
    """The last stack's outputs in eval mode."""
    return all_outputs(model)[-1]


def all_outputs(model: nn.Module) -> list[dict]:
    """Every stack's outputs in eval mode (one dict for single-stack models)."""
    model.eval()
    with torch.no_grad():
        return model(IMAGES)


def assert_same_outputs(actual: nn.Module, expected: nn.Module, atol: float) -> None:
    for ours, theirs in zip(all_outputs(actual), all_outputs(expected), strict=True):
        assert ours.keys() == theirs.keys()
        for name, value in theirs.items():
            torch.testing.assert_close(ours[name], value, rtol=0, atol=atol)


def groups_of(model: nn.Module):
    graph = build_graph(model, EXAMPLE)
    return collect_groups(graph, model, resolve_ignored_layers(model, None, model))


def zero_output_channels(module: nn.Module, index: torch.Tensor) -> None:
    """Zero the filters (and biases) computing output channels ``index``. A transposed conv's
    weight is in x out/groups x k x k: output channel c of group g is column c % (out/groups)
    of the rows of group g (for DLA's depthwise upsampling: row c)."""
    weight = module.weight
    if isinstance(module, nn.ConvTranspose2d):
        per_group_in = module.in_channels // module.groups
        per_group_out = module.out_channels // module.groups
        for channel in index.tolist():
            group = channel // per_group_out
            weight[group * per_group_in : (group + 1) * per_group_in, channel % per_group_out] = 0
    else:
        weight[index] = 0  # convs and deformable convs: out x in x k x k
    if module.bias is not None:
        module.bias[index] = 0


def kill_channels(group, channels: list[int]) -> None:
    """Make ``channels`` of the group exactly dead: zero filters and biases in every producer,
    zero gamma and beta in every BatchNorm, so they are 0 after any ReLU."""
    with torch.no_grad():
        for layer in group.producers:
            zero_output_channels(layer.module, layer.channels[channels])
        for layer in group.norms:
            layer.module.weight[layer.channels[channels]] = 0
            layer.module.bias[layer.channels[channels]] = 0


def kill_some_channels(groups, scope: str) -> tuple[float, int]:
    """Make random channels of every group exactly dead: in "layer" scope as many as the layer
    rule removes at ratio 0.25, in "global" scope 1-3 per group (global ranking must find them
    wherever they are). Returns the ratio that removes exactly them, and their count."""
    generator = torch.Generator().manual_seed(3)
    dead_total = 0
    for number, group in enumerate(groups):
        if scope == "layer":
            dead = group.width - rounded_keep(0.75 * group.width, group.width, None, 0.8)
        else:
            dead = min(number % 3 + 1, group.width // 2)
        kill_channels(group, torch.randperm(group.width, generator=generator)[:dead].tolist())
        dead_total += dead
    ratio = 0.25 if scope == "layer" else dead_total / sum(group.width for group in groups)
    return ratio, dead_total


# l1 is checked, outputs and all, by the dead-channel test. Pruning costs a graph trace and two
# MAC counts, so each architecture runs one of the other criteria, in turn, and the scope
# alternates every four architectures: every criterion runs on three or four families, in
# both scopes.
OTHER_CRITERIA = [name for name in CRITERIA if name != "l1"]
SHAPE_CASES = [
    (
        arch,
        OTHER_CRITERIA[number % len(OTHER_CRITERIA)],
        ("layer", "global")[number // len(OTHER_CRITERIA) % 2],
    )
    for number, arch in enumerate(ARCHS)
]
# The random-pruning control of the dead-channel test shows that the check can fail; a few
# topologies (residual stream, DLA's roots, the hourglass's two stacks, HRNet's fusions) do.
CONTROL_ARCHS = {"res18", "dla34", "hourglass104", "hrnet_w18"}


@pytest.mark.parametrize(("arch", "criterion", "scope"), SHAPE_CASES)
def test_pruning_keeps_outputs_and_lands_in_the_parameter_band(arch, criterion, scope):
    model = randomised(arch)
    # Data-driven criteria (taylor) calibrate on a batch of the tiny detection data.
    data = [calibration_batch()] if criterion in DATA_CRITERIA else None
    result = prune(model, RATIO, criterion, scope=scope, example_inputs=EXAMPLE, round_to=None,
                   data=data)
    pruned, stats = result.model, result.stats
    assert stats.params_before == count_parameters(model)
    assert stats.params_after == count_parameters(pruned)
    low, high = PARAMETER_BAND
    assert low <= stats.params_after / stats.params_before <= high
    assert stats.macs_after < stats.macs_before
    before, after = all_outputs(model), all_outputs(pruned)
    assert [{k: v.shape for k, v in o.items()} for o in after] == [
        {k: v.shape for k, v in o.items()} for o in before
    ]
    for original, kept in zip(output_layers(model), output_layers(pruned), strict=True):
        assert kept.out_channels == original.out_channels
    # Backward works in train mode.
    pruned.train()
    sum(v.sum() for output in pruned(IMAGES) for v in output.values()).backward()


class DeadChannels(NamedTuple):
    model: nn.Module
    groups: list
    result: PruneResult
    ratio: float
    dead: int


@functools.cache
def pruned_dead_channels(arch: str, scope: str) -> DeadChannels:
    """A randomised tiny model built from its config, some channels of every group made
    exactly dead, and the L1 pruning that removes exactly them. Cached: the save -> load test
    reloads the global-scope result (nothing here trains it)."""
    model = build_from_config(tiny_config(arch))
    model.load_state_dict(randomised(arch).state_dict())
    groups = groups_of(model.eval())
    ratio, dead = kill_some_channels(groups, scope)
    result = prune(model, ratio, "l1", scope=scope, example_inputs=EXAMPLE, round_to=None)
    return DeadChannels(model, groups, result, ratio, dead)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("arch", ARCHS)
def test_removing_exactly_dead_channels_leaves_outputs_equal(arch, scope):
    model, groups, result, ratio, dead = pruned_dead_channels(arch, scope)
    # Additions (residuals, skips, merges, fusions) couple their producers into one group.
    assert any(len(group.producers) > 2 for group in groups)
    assert sum(g["width"] - g["kept"] for g in result.stats.groups) == dead
    assert result.plan
    for original, kept in zip(output_layers(model), output_layers(result.model), strict=True):
        assert kept.out_channels == original.out_channels
    assert_same_outputs(result.model, model, atol=1e-5)
    if scope == "layer" and arch in CONTROL_ARCHS:
        # The same widths with other channels removed do change the outputs.
        control = prune(model, ratio, "random", example_inputs=EXAMPLE, round_to=None)
        assert not torch.allclose(
            outputs_of(control.model)["heatmap"], outputs_of(model)["heatmap"], atol=1e-3
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_of_a_pruned_model_give_identical_outputs(tmp_path, arch):
    result = pruned_dead_channels(arch, "global").result
    path = save_checkpoint(tmp_path / "pruned.pt", result.model, tiny_config(arch))
    assert torch.load(path, weights_only=True)["channel_plan"] == result.plan
    assert read_checkpoint(path).channel_plan == result.plan
    loaded, checkpoint = load_model(path)
    assert checkpoint.channel_plan == result.plan
    assert count_parameters(loaded) == count_parameters(result.model)
    assert_same_outputs(loaded, result.model, atol=0)


# The keypoint-triplet head (`model.head: triplet`) on one backbone: its pooling branches add
# four convs' outputs (the look and plain branches, the two pooled branches, the shortcut), so
# removing exactly dead channels leaves the outputs equal only if each sum's producers are cut
# at the same channels. Every criterion and scope: tests/test_triplet_chain.py.
TRIPLET_ARCH = "resunet18"


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_triplet_head_removing_exactly_dead_channels_leaves_outputs_equal(scope):
    config = dataclasses.replace(tiny_config(TRIPLET_ARCH), head="triplet")
    model = build_from_config(config)
    model.load_state_dict(randomised(TRIPLET_ARCH, head="triplet").state_dict())
    groups = groups_of(model.eval())
    for pool in (model.heads.tl_pool, model.heads.br_pool, model.heads.ct_pool):
        # the pooled branch and the shortcut it is added to: one group
        assert any(
            {id(pool.p_conv1), id(pool.conv1)} <= {id(layer.module) for layer in group.producers}
            for group in groups
        )
    ratio, dead = kill_some_channels(groups, scope)
    result = prune(model, ratio, "l1", scope=scope, example_inputs=EXAMPLE, round_to=None)
    assert sum(g["width"] - g["kept"] for g in result.stats.groups) == dead
    for original, kept in zip(output_layers(model), output_layers(result.model), strict=True):
        assert kept.out_channels == original.out_channels
    assert_same_outputs(result.model, model, atol=1e-5)
    if scope == "layer":
        # The same widths with other channels removed do change the outputs.
        control = prune(model, ratio, "random", example_inputs=EXAMPLE, round_to=None)
        assert not torch.allclose(
            outputs_of(control.model)["tl_heatmap"], outputs_of(model)["tl_heatmap"], atol=1e-3
        )
