"""Budgets: the greedy allocator against brute force, width costs against counted MACs and
parameters, and `prune(allocation="sensitivity")` meeting each kind of budget (MACs, parameters,
latency) on a toy model whose optimum is known: one group holds dead channels (nothing reads
them), so removing them loses nothing, and the budget is exactly what removing them saves."""

import copy
import itertools
import random

import latency_clock
import pytest
import torch
from test_pruning_invariants import EXAMPLE, groups_of, randomised
from torch import nn

from ctprune.pruning import prune, widths_after_pruning
from ctprune.pruning.budget import WidthCost, allocate_budget, candidate_keeps, widen_for_free
from ctprune.pruning.graph import (
    build_graph,
    collect_groups,
    prune_channels,
    resolve_ignored_layers,
)
from ctprune.pruning.sensitivity import channels_unread, curves_at
from detector import count_macs, count_parameters, layer_widths
from detector.channel_plan import apply_channel_plan

pytestmark = pytest.mark.timeout(60)


class Toy(nn.Module):
    """conv-BN-ReLU x 3 and an output conv, returning the detector's list of dicts. Group
    ``body.0`` is 64 wide, and only its first ``live`` channels are read by the next conv (the
    others are also the lightest, so that L1 picks them)."""

    def __init__(self, live: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.head = nn.Conv2d(32, 4, 1)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    fan_in = module.weight[0].numel()
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                        / fan_in**0.5)
                if isinstance(module, nn.BatchNorm2d):
                    module.bias.copy_(torch.rand(module.num_features, generator=generator))
            self.body[0].weight[live:] *= 0.1  # light, so L1 ranks them last ...
            self.body[3].weight[:, live:] = 0  # ... and nothing reads them

    def forward(self, images):
        return [{"heatmap": self.head(self.body(images))}]


IMAGES = [{"image": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i))}
          for i in range(2)]
SIZE = torch.zeros(1, 3, 32, 32)


def test_greedy_allocation_finds_the_brute_force_optimum():
    # Three groups with additive costs and convex losses, where greedy is optimal.
    rng = random.Random(0)
    candidates = [[8, 16, 24, 32]] * 3
    weights = [1.0, 2.0, 3.0]
    losses = [
        {k: weight * (32 - k) ** 2 / 100 + rng.random() * 1e-3 * (32 - k) for k in options}
        for weight, options in zip(weights, candidates, strict=True)
    ]
    prices = [3.0, 2.0, 1.0]

    def cost(keeps):
        return sum(price * keep for price, keep in zip(prices, keeps, strict=True))

    for budget in [150, 110, 90, 60]:
        keeps = allocate_budget([None] * 3, candidates, losses, cost, budget)
        feasible = [c for c in itertools.product(*candidates) if cost(c) <= budget]
        best = min(feasible, key=lambda c: sum(loss[k] for loss, k in zip(losses, c,
                                                                             strict=True)))
        assert cost(keeps) <= budget
        assert tuple(keeps) == best, budget
    with pytest.raises(ValueError, match="budget is out of reach"):
        allocate_budget([None] * 3, candidates, losses, cost, 10)


@pytest.mark.parametrize("arch", ["res18", "resdcn18", "dla34", "mobilenet_v3_large"])
def test_width_costs_match_counted_macs_and_parameters(arch):
    model = randomised(arch)
    groups = groups_of(model)
    before = layer_widths(model)
    macs = WidthCost("macs", model, before, (64, 64))
    params = WidthCost("params", model, before, (64, 64))
    assert macs.parent == count_macs(model, (64, 64))
    assert params.parent == count_parameters(model)
    rng = random.Random(1)
    for _ in range(3):
        keeps = [rng.choice(candidate_keeps(g.width, 4, 0.8)) for g in groups]
        after = widths_after_pruning(before, groups, keeps)
        plan = {name: value for name, value in after.items() if value != before[name]}
        resized = apply_channel_plan(randomised(arch), plan)
        assert macs(after) == pytest.approx(count_macs(resized, (64, 64)), rel=1e-9)
        assert params(after) == pytest.approx(count_parameters(resized), rel=1e-9)


@pytest.mark.parametrize("arch", ["res18", "resdcn18", "dla34", "mobilenet_v3_large",
                                  "hourglass104"])
def test_unread_channels_are_pruned_channels(arch):
    # Sensitivity narrows a group by zeroing what its consumers read: the outputs must be the
    # pruned model's (residual streams, deformable convs' offset convs, DLA's roots and
    # depthwise upsampling, MobileNet's depthwise convs, two hourglass stacks).
    model = randomised(arch).eval()
    groups = groups_of(model)
    rng = random.Random(0)
    for group in rng.sample([g for g in groups if g.width > 2], 3):
        removed = sorted(rng.sample(range(group.width), 2))
        with torch.no_grad():
            original = model(EXAMPLE + 1)
            with channels_unread(group, removed):
                masked = model(EXAMPLE + 1)
            restored = model(EXAMPLE + 1)
        pruned = copy.deepcopy(model)
        graph = build_graph(pruned, EXAMPLE)
        pruned_group = next(g for g in collect_groups(graph, pruned, resolve_ignored_layers(
            pruned, None, pruned)) if g.name == group.name)
        prune_channels(graph, pruned_group, removed)
        with torch.no_grad():
            expected = pruned(EXAMPLE + 1)
        for stack, (ours, theirs) in enumerate(zip(masked, expected, strict=True)):
            for key, value in theirs.items():
                assert torch.allclose(ours[key], value, atol=1e-5), (group.name, stack, key)
                assert torch.equal(restored[stack][key], original[stack][key])


@pytest.mark.parametrize("kind", ["macs", "params", "latency"])
def test_sensitivity_allocation_meets_each_budget_at_the_known_optimum(kind, tmp_path, monkeypatch):
    model = Toy().eval()
    before = layer_widths(model)
    # The optimum: body.0 keeps its 16 live channels, nothing else changes. The budget lies
    # halfway to keeping 24 (a margin for the latency model's timing noise).

    def body_0_keeps(width: int) -> dict:
        return {**before, "body.0": [3, width], "body.1": [width], "body.3": [width, 32]}

    if kind == "latency":
        from ctprune.pruning.latency import LatencyModel, LatencyTable

        latency_clock.install(monkeypatch)  # the arithmetic, not this machine's timing noise
        table = LatencyTable("torch", 1, (32, 32), cache_dir=tmp_path)
        latency = LatencyModel.calibrate(model, table)
        cost = WidthCost("latency", model, before, (32, 32), (latency, table))
    else:
        cost = WidthCost(kind, model, before, (32, 32))
    budget = (cost(body_0_keeps(16)) + cost(body_0_keeps(24))) / 2 / cost.parent
    # The latency budget is predicted with the same calibrated model the budget was set with
    # (calibrating again would move the prediction by the machine's timing noise).
    result = prune(model, None, "l1", example_inputs=SIZE, round_to=8, data=IMAGES,
                   allocation="sensitivity", **{f"target_{kind}": budget},
                   latency_model=cost.latency)
    kept = {entry["name"]: entry["kept"] for entry in result.stats.groups}
    assert kept == {"body.0": 16, "body.3": 32, "body.6": 32}, kept
    curves = {e["name"]: e["sensitivity"] for e in result.stats.groups}
    assert curves["body.0"]["16"] == 0.0  # dead channels cost nothing ...
    assert curves["body.3"]["24"] > 0  # ... live ones do
    if kind == "macs":
        assert result.stats.macs_after <= budget * result.stats.macs_before
    if kind == "params":
        assert result.stats.params_after <= budget * result.stats.params_before
    if kind == "latency":
        latency = result.stats.latency
        assert latency["after_ms"] <= latency["before_ms"]
        assert latency["predicted"] <= budget
        assert "realised" in result.stats.summary()
    # Uniform pruning to the same budget loses live channels of every group.
    uniform = prune(model, None, "l1", example_inputs=SIZE, round_to=8,
                    latency_model=cost.latency, **{f"target_{kind}": budget})
    assert {e["name"]: e["kept"] for e in uniform.stats.groups} != kept


def test_budget_arguments_are_checked():
    model = Toy()
    with pytest.raises(ValueError, match="allocation: expected a budget with 'sensitivity'"):
        prune(model, 0.3, "l1", example_inputs=SIZE, data=IMAGES, allocation="sensitivity")
    with pytest.raises(ValueError, match="target_macs: expected one budget, got target_macs and "):
        prune(model, None, "l1", example_inputs=SIZE, target_macs=0.5, target_params=0.5)
    with pytest.raises(ValueError, match="target_latency: expected the fraction"):
        prune(model, None, "l1", example_inputs=SIZE, target_latency=1.5)
    with pytest.raises(ValueError, match="allocation: expected one of"):
        prune(model, None, "l1", example_inputs=SIZE, target_macs=0.5, allocation="best")
    with pytest.raises(ValueError, match="data: allocation='sensitivity' needs calibration"):
        prune(model, None, "l1", example_inputs=SIZE, target_macs=0.5, allocation="sensitivity")


def test_stored_curves_are_interpolated_and_allocated_from():
    groups = groups_of(Toy())
    by_name = {group.name: group for group in groups}
    stored = {"body.0": {48: 0.0, 16: 0.0, 8: 0.5}, "body.3": {24: 0.2, 16: 0.6},
              "body.6": {16: 0.3}}
    order = [by_name[name] for name in ("body.0", "body.3", "body.6")]
    curves = curves_at(stored, order, [[16, 32, 64], [8, 16, 24, 32], [8, 16, 24, 32]])
    assert curves[0] == {64: 0.0, 32: 0.0, 16: 0.0}
    # body.3: 0 at 32, 0.2 at 24, 0.6 at 16, extended below: 0.6 + (0.6 - 0.2) = 1.0 at 8
    assert curves[1] == pytest.approx({32: 0.0, 24: 0.2, 16: 0.6, 8: 1.0})
    # body.6: linear from 0 at 32 to 0.3 at 16
    assert curves[2] == pytest.approx({32: 0.0, 24: 0.15, 16: 0.3, 8: 0.45})
    with pytest.raises(ValueError, match="no curve for group body.3"):
        curves_at({"body.0": {}}, order, [[64]] * 3)
    # Allocated from: no data needed; body.0 is free to narrow, so it goes first.
    result = prune(Toy(), None, "l1", example_inputs=SIZE, round_to=8, allocation="sensitivity",
                   target_macs=0.5, sensitivity=stored)
    kept = {entry["name"]: entry["kept"] for entry in result.stats.groups}
    # body.0 at 16 keeps 0.487 of the MACs, at 24 0.57: the lossless optimum
    assert kept == {"body.0": 16, "body.3": 32, "body.6": 32}, kept
    assert result.stats.macs_after <= 0.5 * result.stats.macs_before
    with pytest.raises(ValueError, match="sensitivity: expected allocation 'sensitivity'"):
        prune(Toy(), None, "l1", example_inputs=SIZE, target_macs=0.7, sensitivity=stored)


def test_widths_no_faster_than_wider_ones_are_widened():
    # A runtime padding to 16: 40 costs what 48 does, 24 what 32 does.
    def padded(width):
        return -(-width // 16)

    def cost(keeps):
        return sum(padded(keep) for keep in keeps)

    candidates = [[8, 16, 24, 32, 40, 48, 56, 64]] * 2
    assert widen_for_free(candidates, [40, 24], cost) == [48, 32]
    assert widen_for_free(candidates, [48, 16], cost) == [48, 16]  # already on the stairs
    assert cost(widen_for_free(candidates, [40, 24], cost)) == cost([40, 24])


@pytest.mark.parametrize("inplace", [False, True])
def test_a_latency_budget_is_corrected_by_the_measured_latency(inplace, tmp_path, monkeypatch):
    """Whole narrow models run faster than their layers timed alone predict (the runtime fuses
    and caches): the allocation re-targets until the measured fraction meets the budget. In
    place (a recipe's prune stage) the parent it is timed against is still the unpruned model."""
    import ctprune.pruning.latency as latency_module

    latency_clock.install(monkeypatch)

    def fused(model, runtime="torch", threads=1, input_size=(512, 512), rounds=None,
              others=None):
        parent = latency_clock.model_cost_ms(model, tuple(input_size))
        return {"model": parent, **{name: 0.7 * latency_clock.model_cost_ms(each, tuple(input_size))
                                    for name, each in (others or {}).items()}}

    monkeypatch.setattr(latency_module, "measure_model_ms", fused)
    monkeypatch.setenv("CTPRUNE_CACHE", str(tmp_path))
    result = prune(Toy(), None, "l1", example_inputs=SIZE, round_to=None, target_latency=0.5,
                   inplace=inplace)
    rounds = result.stats.latency["corrections"]
    assert len(rounds) > 1, rounds
    assert rounds[0]["measured"] < 0.9 * rounds[0]["predicted"]  # the layer model over-predicts
    assert rounds[-1]["measured"] == pytest.approx(0.5, rel=0.04), rounds
    assert result.stats.latency["realised"] == pytest.approx(0.5, rel=0.04)


def test_the_latency_target_moves_by_secant_once_the_budget_is_bracketed():
    from ctprune.pruning.latency import next_target

    # One side known: the miss scales the target.
    assert next_target([(0.4, 0.25)], 0.4) == pytest.approx(0.64)
    # Both sides: the secant between the nearest targets on either side.
    points = [(0.4, 0.25), (0.64, 0.5), (0.5, 0.32)]
    assert next_target(points, 0.4) == pytest.approx(0.5 + 0.08 * 0.14 / 0.18)
