"""The pruning engine's API on tiny ResNet-18/50 CenterNets: rounding, global allocation and its
cap, overrides, MAC targets, width prediction, training a pruned model, modes, determinism,
statistics, bn_gamma's rules and argument errors. The invariants every architecture must keep
(shapes, parameter band, dead channels, save -> load) are in test_pruning_invariants.py."""

import math

import pytest
import torch
from test_pruning_invariants import EXAMPLE, IMAGES, groups_of, outputs_of, randomised
from tiny import TinyDetectionData, tiny_model
from torch import nn

from ctprune.pruning import prune, rounded_keep, widths_after_pruning
from detector import count_macs, layer_widths
from detector.losses import centernet_loss

# Graph building traces one forward pass; a hang there (as torch-pruning does on unregistered
# deformable convs) must fail the test instead of blocking the suite.
pytestmark = pytest.mark.timeout(60)

ARCHS = ["res18", "res50", "resunet18"]


def test_rounding_by_hand():
    # Examples of the rounding documented in ctprune/pruning/allocate.py.
    assert rounded_keep(0.8 * 64, 64, 16, 0.8) == 48  # 51.2 -> 48
    assert rounded_keep(0.5 * 256, 256, 16, 0.8) == 128
    assert rounded_keep(0.8 * 40, 40, 16, 0.8) == 32
    assert rounded_keep(0.8 * 8, 8, 16, 0.8) == 8  # narrower than round_to: whole
    assert rounded_keep(36, 36, 16, 0.8) == 36  # ratio 0 never prunes
    assert rounded_keep(0.5 * 24, 24, 8, 0.8) == 16  # 1.5 steps: halves keep more
    assert rounded_keep((1 - 0.3) * 5, 5, None, 0.8) == 4  # 3.5 -> 4 despite float error
    assert rounded_keep(0.1 * 64, 64, 16, 0.8) == 16  # at least round_to
    assert rounded_keep(0.1 * 64, 64, None, 0.5) == 32  # never more than max_layer_ratio
    assert rounded_keep(0.1 * 64, 64, 24, 0.5) == 48  # ... rounded up to a multiple


@pytest.mark.parametrize(
    "round_to, expected",
    [
        # ratio 0.3 on tiny res18: widths 8 (stem, heads), 16 (neck), 32 (layer4)
        (None, {8: 6, 16: 11, 32: 22}),  # 5.6, 11.2, 22.4 to the nearest channel
        (4, {8: 4, 16: 12, 32: 24}),  # 1.4, 2.8, 5.6 steps of 4
        (16, {8: 8, 16: 16, 32: 16}),  # 0.35 -> whole, 0.7 -> 1 step, 1.4 -> 1 step
    ],
)
def test_layer_widths_follow_the_documented_rounding(round_to, expected):
    model = tiny_model("res18")
    widths = prune(model, 0.3, "l1", example_inputs=EXAMPLE, round_to=round_to).stats.widths_after
    assert widths["backbone.conv1"][1] == expected[8]
    assert widths["heads.wh.0"][1] == expected[8]
    assert widths["neck.0"][1] == expected[16]
    assert widths["backbone.layer4.0.conv1"][1] == expected[32]
    assert widths["backbone.layer4.0.conv2"][1] == expected[32]  # residual stream


# The msra neck's first deconv is the hand-made weak layer here; resunet's neck has no such layer.
@pytest.mark.parametrize("arch", [arch for arch in ARCHS if not arch.startswith("resunet")])
def test_global_pruning_never_exceeds_max_layer_ratio(arch):
    model = randomised(arch)
    # Unnormalised, neck.0's 14 near-zero channels would all go; the cap must stop at 0.6.
    with torch.no_grad():
        model.neck[0].weight[:, :14] *= 1e-4
    result = prune(
        model, 0.5, "l1", scope="global", example_inputs=EXAMPLE, round_to=None, max_layer_ratio=0.6
    )
    groups = result.stats.groups
    for group in groups:
        assert (group["width"] - group["kept"]) / group["width"] <= 0.6
    neck = next(g for g in groups if g["name"] == "neck.0")
    assert neck["kept"] == 16 - math.floor(0.6 * 16)  # the cap binds
    total = sum(g["width"] for g in groups)
    assert sum(g["width"] - g["kept"] for g in groups) == round(0.5 * total)
    assert len({g["kept"] / g["width"] for g in groups}) > 1  # not a uniform allocation


def test_ratio_overrides_apply_and_the_last_match_wins():
    model = tiny_model("res18")
    overrides = {"neck.*": 0.5, "neck.3": 0.25, "heads.wh.*": 0.0}
    result = prune(
        model, 0.25, "l1", example_inputs=EXAMPLE, round_to=None, ratio_overrides=overrides
    )
    widths = result.stats.widths_after
    assert widths["neck.0"][1] == 8 and widths["neck.6"][1] == 8
    assert widths["neck.3"][1] == 12
    assert widths["heads.wh.0"][1] == 8
    assert widths["heads.heatmap.0"][1] == 6
    assert widths["backbone.layer4.0.conv1"][1] == 24


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_target_macs_is_reached(arch, scope):
    model = randomised(arch)
    result = prune(
        model, None, "l1", scope=scope, example_inputs=EXAMPLE, round_to=None, target_macs=0.5
    )
    stats = result.stats
    assert stats.macs_after == count_macs(result.model, (64, 64))
    fraction = stats.macs_after / stats.macs_before
    assert 0.45 <= fraction <= 0.5
    assert 0 < stats.ratio <= 0.8


@pytest.mark.parametrize("arch", [*ARCHS, "resdcn18"])  # DLA: in test_dla.py
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_predicted_widths_match_the_pruned_model(arch, scope):
    model = randomised(arch)
    result = prune(model, 0.4, "l1", scope=scope, example_inputs=EXAMPLE, round_to=None)
    groups = groups_of(model)
    kept = {group["name"]: group["kept"] for group in result.stats.groups}
    predicted = widths_after_pruning(
        layer_widths(model), groups, [kept[group.name] for group in groups]
    )
    assert predicted == result.stats.widths_after == layer_widths(result.model)


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_trains_and_runs_in_eval(arch):
    torch.manual_seed(0)
    data = TinyDetectionData(4)
    batch = {key: torch.stack([item[key] for item in data]) for key in data[0]}
    pruned = prune(tiny_model(arch), 0.4, "l1", example_inputs=EXAMPLE, round_to=None).model
    pruned.train()
    optimizer = torch.optim.Adam(pruned.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss, _ = centernet_loss(pruned(batch["image"]), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    pruned.eval()
    with torch.no_grad():
        assert torch.isfinite(pruned(batch["image"])[0]["heatmap"]).all()


def _mixed_mode_model() -> nn.Module:
    model = randomised("res18").train()
    model.backbone.bn1.eval()  # a frozen BatchNorm inside a training model
    model.backbone.conv1.weight.requires_grad_(False)
    return model


def test_the_callers_model_is_untouched():
    model = _mixed_mode_model()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modes = {name: module.training for name, module in model.named_modules()}
    with torch.no_grad():  # graph building needs autograd: prune switches it on itself
        result = prune(model, 0.4, "kmeans", example_inputs=EXAMPLE, round_to=None)
    assert result.model is not model
    assert all(torch.equal(model.state_dict()[name], value) for name, value in state.items())
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert {name: module.training for name, module in result.model.named_modules()} == modes
    assert not result.model.backbone.conv1.weight.requires_grad
    assert result.model.backbone.layer1[0].conv1.weight.requires_grad


def test_inplace_prunes_the_model_itself_and_keeps_its_modes():
    model = _mixed_mode_model()
    modes = {name: module.training for name, module in model.named_modules()}
    with torch.inference_mode():
        result = prune(model, 0.4, "l1", example_inputs=EXAMPLE, round_to=None, inplace=True)
    assert result.model is model
    assert layer_widths(model) == result.stats.widths_after
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert not model.backbone.conv1.weight.requires_grad
    model.train()
    outputs_of(model)  # the pruned parameters are ordinary tensors, not inference tensors
    sum(value.sum() for value in model(IMAGES)[0].values()).backward()


def test_pruning_is_deterministic():
    model = randomised("res50")
    for criterion in ("random", "kmeans"):
        first = prune(model, 0.4, criterion, scope="global", example_inputs=EXAMPLE, round_to=None)
        second = prune(model, 0.4, criterion, scope="global", example_inputs=EXAMPLE, round_to=None)
        for name, value in first.model.state_dict().items():
            assert torch.equal(second.model.state_dict()[name], value)


def test_ignored_layers_keep_their_channels():
    model = tiny_model("res18")
    result = prune(
        model,
        0.5,
        "l1",
        example_inputs=EXAMPLE,
        round_to=None,
        ignored_layers=["backbone.layer4", model.neck[3]],
    )
    widths = result.stats.widths_after
    assert widths["backbone.layer4.0.conv1"][1] == 32 and widths["backbone.layer4.1.conv2"][1] == 32
    assert widths["neck.3"] == [8, 16]  # its input channels (neck.0's) are pruned, not its outputs
    assert widths["backbone.layer3.0.conv1"][1] == 8


def test_stats_describe_the_result():
    model = tiny_model("res18")
    stats = prune(model, 0.5, "l1", example_inputs=EXAMPLE, round_to=None).stats
    assert stats.input_size == (64, 64)
    assert stats.macs_before == count_macs(model, (64, 64))
    assert stats.widths_before == layer_widths(model)
    assert stats.params_after < stats.params_before and stats.mib_after < stats.mib_before
    assert set(stats.timings) >= {"graph", "select", "prune"} and stats.seconds > 0
    assert "GMACs at 64x64" in stats.summary()
    assert isinstance(stats.as_dict()["groups"], list)


def _bn_gamma_model() -> nn.Module:
    model = tiny_model("res18")
    generator = torch.Generator().manual_seed(4)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data = torch.rand(module.num_features, generator=generator) - 0.5
    return model


def test_bn_gamma_keeps_the_largest_gammas_and_ranks_heads_by_l1():
    model = _bn_gamma_model()
    pruned = prune(model, 0.5, "bn_gamma", example_inputs=EXAMPLE, round_to=None).model
    gamma = model.backbone.layer2[0].bn1.weight.detach()
    kept = torch.sort(torch.topk(gamma.abs(), 8).indices).values
    assert torch.equal(pruned.backbone.layer2[0].bn1.weight, gamma[kept])
    filters = model.heads.wh[0].weight.detach()  # no BatchNorm: ranked by filter L1
    kept = torch.sort(torch.topk(filters.abs().sum(dim=(1, 2, 3)), 4).indices).values
    assert torch.equal(pruned.heads.wh[0].bias, model.heads.wh[0].bias.detach()[kept])


def test_bn_gamma_refuses_untrained_gammas():
    with pytest.raises(
        ValueError,
        match=r"bn_gamma: all BatchNorm gammas in 15 groups are equal .* train with sparsity first",
    ):
        prune(tiny_model("res18"), 0.3, "bn_gamma", example_inputs=EXAMPLE)


def test_bn_gamma_warns_about_some_tiedgroups_of():
    model = _bn_gamma_model()
    nn.init.ones_(model.neck[1].weight)  # a fresh neck BatchNorm on a trained backbone
    with pytest.warns(UserWarning, match=r"gammas in 1 groups are equal \(neck.0\)"):
        prune(model, 0.3, "bn_gamma", example_inputs=EXAMPLE)


def _without_batchnorm(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name, nn.Identity())
            elif isinstance(child, nn.ReLU):
                setattr(module, child_name, nn.ReLU())  # out of place: see the next test
    return model


def test_bn_gamma_needs_batchnorm():
    with pytest.raises(ValueError, match="bn_gamma: no prunable group has a BatchNorm"):
        prune(_without_batchnorm(tiny_model("res18")), 0.3, "bn_gamma", example_inputs=EXAMPLE)


def test_a_model_torch_pruning_mistraces_gets_a_clear_error():
    # Without BatchNorm, torchvision's `out += identity` lands on a conv's raw output, which
    # torch-pruning 1.6.1 mis-traces; the result must be a named error, not a broken model.
    with pytest.raises(
        ValueError, match="torch-pruning mis-traced this model .*in-place operations"
    ):
        prune(_without_batchnorm(tiny_model("res18")), 0.3, "l1", example_inputs=EXAMPLE)


def test_models_without_declared_output_layers_keep_theiroutputs_of():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    result = prune(model, 0.5, "l1", example_inputs=torch.zeros(1, 3, 16, 16), round_to=None)
    assert result.plan == {"0": [3, 4], "1": [4], "3": [4, 4]}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": -0.1}, r"ratio: expected a number in \[0, 1\), got -0.1"),
        ({"ratio": 1.0}, r"ratio: expected a number in \[0, 1\), got 1.0"),
        ({"ratio": "0.5"}, r"ratio: expected a number"),
        ({"ratio": True}, r"ratio: expected a number"),
        ({"ratio": 0.9}, r"ratio: 0.9 exceeds max_layer_ratio 0.8"),
        (
            {"criterion": "fpgm"},
            r"unknown criterion 'fpgm'; known criteria: l1, l2, bn_gamma, kmeans, random, "
            r"taylor, hessian",
        ),
        ({"scope": "local"}, r"scope: expected one of \('layer', 'global'\)"),
        ({"max_layer_ratio": 0}, r"max_layer_ratio: expected a number in \(0, 1\)"),
        ({"max_layer_ratio": 1.0}, r"max_layer_ratio: expected a number in \(0, 1\)"),
        (
            {"ratio": None, "target_macs": 0},
            r"target_macs: expected the fraction of MACs to keep, in \(0, 1\]",
        ),
        ({"ratio": None, "target_macs": 1.5}, r"target_macs: expected"),
        ({"target_macs": 0.5}, r"either ratio or target_macs, not both"),
        ({"ratio": None}, r"ratio: expected a number"),
        ({"ratio": None, "target_macs": 0.001}, r"target_macs 0.001 is out of reach"),
        ({"round_to": 0}, r"round_to: expected None or a positive integer"),
        ({"ratio_overrides": {"neck.*": 0.95}}, r"ratio_overrides: expected a ratio in .*neck"),
        ({"ratio_overrides": {"nek.*": 0.5}}, r"pattern 'nek.\*' matches no prunable layer"),
        ({"ratio_overrides": {"heads.heatmap.2": 0.5}}, r"matches no prunable layer"),
        (
            {"ignored_layers": ["backbone.layer9"]},
            r"ignored_layers\[0\]: 'backbone.layer9' is not a module of the model; did you mean",
        ),
        (
            {"ignored_layers": [nn.Conv2d(3, 3, 1)]},
            r"ignored_layers\[0\]: a Conv2d that is not a module of the model",
        ),
        ({"ignored_layers": [nn.Conv2d]}, r"ignored_layers\[0\]: got the class Conv2d"),
        ({"ignored_layers": ["backbone", "neck", "heads"]}, r"nothing to prune"),
        ({"example_inputs": torch.zeros(3, 64, 64)}, r"example_inputs: expected an image batch"),
        ({"data": [1]}, r"data: the l1 criterion reads no data"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    arguments = {"ratio": 0.3, "criterion": "l1", "example_inputs": EXAMPLE, **kwargs}
    with pytest.raises(ValueError, match=message):
        prune(tiny_model("res18"), **arguments)


def test_a_model_without_parameters_is_refused():
    with pytest.raises(ValueError, match="nothing to prune: the model has no parameters"):
        prune(nn.ReLU(), 0.3)


def test_prune_the_recipe_and_the_cli_share_one_set_of_defaults():
    import dataclasses
    import inspect

    from ctprune.cli import build_parser, prune_options
    from ctprune.pruning import PruneOptions
    from ctprune.recipe import PruneConfig

    defaults = PruneOptions()
    signature = inspect.signature(prune).parameters
    for name in ("criterion", "scope", "max_layer_ratio", "round_to", "target_macs"):
        assert signature[name].default == getattr(defaults, name), name
    assert signature["ratio_overrides"].default is None and defaults.ratio_overrides == {}
    assert "data" in signature and signature["data"].default is None
    recipe_section = PruneConfig()
    for field in dataclasses.fields(PruneOptions):
        assert getattr(recipe_section, field.name) == getattr(defaults, field.name), field.name
    args = build_parser().parse_args(["prune", "model.pt", "--out", "pruned.pt"])
    assert prune_options(args) == defaults
    args = build_parser().parse_args(["prune", "m.pt", "--out", "p.pt", "--target-macs", "0.5",
                                      "--round-to", "0"])
    assert prune_options(args) == dataclasses.replace(defaults, ratio=None, target_macs=0.5,
                                                      round_to=None)
