"""The resnet_dcn family (resdcn18, resdcn101): structure, original initialisation and sizes,
original-checkpoint import parity, and what pruning does to the deformable convs (the shared
pruning invariants are in test_pruning_invariants.py)."""

import math

import pytest
import torch
import torchvision
from test_pruning_invariants import EXAMPLE, IMAGES, groups_of
from test_pruning_invariants import randomised as randomised_model
from tiny import TINY_WIDTHS, tiny_model
from torch import nn

from ctprune.pruning import prune
from ctprune.pruning.dcn import ModulatedDeformConvPruner
from cuda_ops import ModulatedDeformConv2d, modulated_deform_conv2d_reference
from detector import build_model, count_macs, layer_widths, load_model, output_layers
from detector.channel_plan import apply_channel_plan
from detector.models.centernet import HEATMAP_BIAS_INIT
from detector.original import import_original_checkpoint

# A hang in graph building (torch-pruning on a naively registered DCN) must fail, not block.
pytestmark = pytest.mark.timeout(60)

ARCHS = ["resdcn18", "resdcn101"]


def deformable_convs(model: nn.Module) -> list[ModulatedDeformConv2d]:
    return [m for m in model.modules() if isinstance(m, ModulatedDeformConv2d)]


def randomised(arch: str = "resdcn18") -> nn.Module:
    """test_pruning_invariants' randomised model with learnt-looking offsets (about a pixel), so
    sampling is really deformed."""
    model = randomised_model(arch)
    with torch.no_grad():
        for module in deformable_convs(model):
            module.conv_offset_mask.weight.mul_(3)
    return model


# Structure and initialisation.


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_forward_backward_and_stride(arch):
    model = tiny_model(arch)
    shapes = {}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        outputs = model(torch.randn(2, 3, 64, 96), return_features=True)
        assert isinstance(outputs, list) and len(outputs) == 1
        shapes[mode] = {k: tuple(v.shape) for k, v in outputs[0].items()}
    assert shapes["train"] == shapes["eval"] == {
        "heatmap": (2, 3, 16, 24),
        "wh": (2, 2, 16, 24),
        "offset": (2, 2, 16, 24),
        "features": (2, TINY_WIDTHS["resdcn"]["neck"][-1], 16, 24),
    }
    model.train()
    sum(v.mean() for v in model(torch.randn(2, 3, 64, 64))[0].values()).backward()
    assert all(p.grad is not None for p in model.parameters())


# The reference's figures for 80 classes at 512 x 512 (section 7): GMACs to two decimals.
ORIGINAL_GMACS = {"resdcn18": 13.31, "resdcn101": 45.58}


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_macs_on_the_meta_device(arch):
    with torch.device("meta"):
        model = build_model(arch, 80)
    assert round(count_macs(model, (512, 512)) / 1e9, 2) == ORIGINAL_GMACS[arch]


def test_full_size_layout_and_original_initialisation():
    model = build_model("resdcn18", 80)
    deforms = deformable_convs(model.neck)
    deconvs = [m for m in model.neck if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in deforms] == [(512, 256), (256, 128), (128, 64)]
    assert [m.weight.shape[:2] for m in deconvs] == [(256, 256), (128, 128), (64, 64)]
    assert [type(m).__name__ for m in model.neck[:6]] == [
        "ModulatedDeformConv2d", "BatchNorm2d", "ReLU", "ConvTranspose2d", "BatchNorm2d", "ReLU",
    ]
    for deform in deforms:
        assert deform.conv_offset_mask.out_channels == 27
        assert torch.all(deform.conv_offset_mask.weight == 0)
        assert torch.all(deform.bias == 0)
        assert deform.weight.abs().max() <= 1 / math.sqrt(deform.in_channels * 9)
    # fill_up_weights: the bilinear kernel outer([1/4, 3/4, 3/4, 1/4]) in weight[:, 0] only.
    bilinear = torch.outer(*[torch.tensor([0.25, 0.75, 0.75, 0.25])] * 2)
    for deconv in deconvs:
        assert deconv.bias is None and deconv.stride == (2, 2) and deconv.padding == (1, 1)
        assert torch.equal(deconv.weight[:, 0], bilinear.expand_as(deconv.weight[:, 0]))
        assert not torch.equal(deconv.weight[:, 1], bilinear.expand_as(deconv.weight[:, 1]))
    heads = model.heads
    assert heads["heatmap"][0].in_channels == 64 and heads["heatmap"][0].out_channels == 64
    assert torch.all(heads["heatmap"][-1].bias == HEATMAP_BIAS_INIT)
    assert heads["heatmap"][0].weight.std() > 0.01  # default init
    for name in ("wh", "offset"):  # every conv of these heads: N(0, 0.001), bias 0
        for conv in (heads[name][0], heads[name][-1]):
            assert torch.all(conv.bias == 0) and 0.0005 < conv.weight.std() < 0.002


def test_fresh_neck_stage_is_half_a_plain_conv():
    """At initialisation every DCN computes 0.5 x conv(x) + bias (mask sigmoid(0))."""
    model = tiny_model("resdcn18").eval()
    deform = model.neck[0]
    features = torch.randn(1, deform.in_channels, 4, 4)
    expected = 0.5 * nn.functional.conv2d(features, deform.weight, deform.bias, padding=1)
    torch.testing.assert_close(deform(features), expected, rtol=1e-5, atol=1e-6)


def test_output_layers_include_the_offset_convs():
    model = tiny_model("resdcn18")
    layers = output_layers(model)
    assert layers[:3] == [model.heads[name][-1] for name in ("heatmap", "wh", "offset")]
    assert layers[3:] == [m.conv_offset_mask for m in deformable_convs(model)]


# Importing original checkpoints.


class OriginalDCN(nn.Module):
    """The original DCNv2 `DCN` module: its parameter names and its forward, step by step,
    on the slow reference op."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3) * 0.05)
        self.bias = nn.Parameter(torch.randn(out_channels) * 0.1)
        self.conv_offset_mask = nn.Conv2d(in_channels, 27, 3, padding=1)
        nn.init.normal_(self.conv_offset_mask.weight, std=0.05)

    def forward(self, x):
        o1, o2, mask = torch.chunk(self.conv_offset_mask(x), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return modulated_deform_conv2d_reference(
            x, offset, torch.sigmoid(mask), self.weight, self.bias, 1, 1, 1
        )


class OriginalResDCN18(nn.Module):
    """The original resnet_dcn `resdcn_18`'s module names and structure: a torchvision trunk at
    the top level, `deconv_layers` of DCN + BN + ReLU + deconv + BN + ReLU per stage, heads
    `hm`, `wh`, `reg`."""

    def __init__(self, num_classes: int, head_conv: int = 64):
        super().__init__()
        trunk = torchvision.models.resnet18(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(trunk, name))
        layers, in_channels = [], 512
        for planes in (256, 128, 64):
            layers += [
                OriginalDCN(in_channels, planes),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(planes, planes, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
            ]
            in_channels = planes
        self.deconv_layers = nn.Sequential(*layers)
        for head, channels in sorted({"hm": num_classes, "wh": 2, "reg": 2}.items()):
            self.add_module(
                head,
                nn.Sequential(
                    nn.Conv2d(64, head_conv, 3, padding=1, bias=True),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(head_conv, channels, 1),
                ),
            )

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.deconv_layers(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        return [{head: getattr(self, head)(x) for head in ("hm", "wh", "reg")}]


def test_imported_original_checkpoint_gives_the_original_outputs(tmp_path):
    original = OriginalResDCN18(num_classes=4)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in original.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
            if isinstance(module, nn.ConvTranspose2d):
                nn.init.normal_(module.weight, std=0.05, generator=generator)
    original.eval()
    state_dict = {f"module.{k}": v for k, v in original.state_dict().items()}
    path = tmp_path / "ctdet_coco_resdcn18.pth"
    torch.save({"epoch": 140, "state_dict": state_dict}, path)

    out = import_original_checkpoint(path, "resdcn18", tmp_path / "imported.pt")
    model, checkpoint = load_model(out)
    model.eval()
    assert (checkpoint.model_config.arch, checkpoint.model_config.num_classes) == ("resdcn18", 4)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = original(images)[0]
        actual = model(images)[0]
        offsets, _ = model.neck[0].offset_and_mask(model.backbone(images))
    assert offsets.abs().max() > 0.5  # the parity covers real deformation, not a plain conv
    for ours, theirs in (("heatmap", "hm"), ("wh", "wh"), ("offset", "reg")):
        torch.testing.assert_close(actual[ours], expected[theirs], rtol=1e-4, atol=1e-4)


# Pruning.


def test_groups_prune_deformable_convs_with_their_offset_convs():
    model = randomised()
    groups = groups_of(model)
    producers = {layer.name for group in groups for layer in group.producers}
    consumers = {layer.name for group in groups for layer in group.consumers}
    for index in (0, 6, 12):  # the three DCNs: their outputs and their inputs are prunable
        assert f"neck.{index}" in producers
        assert {f"neck.{index}", f"neck.{index}.conv_offset_mask"} <= consumers
    assert not any(name.endswith("conv_offset_mask") for name in producers)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruned_deformable_convs_keep_their_offset_convs_in_step(scope):
    """The shared invariants (outputs, dead channels, save -> load) are in
    test_pruning_invariants.py; here the deformable convs' own weights after pruning."""
    model = randomised()
    result = prune(model, 0.4, "kmeans", scope=scope, example_inputs=EXAMPLE, round_to=None)
    pruned = result.model
    deforms = deformable_convs(pruned)
    widths_before = sum(m.out_channels for m in deformable_convs(model))
    assert sum(m.out_channels for m in deforms) < widths_before
    for deform in deforms:
        assert deform.weight.shape[:2] == (deform.out_channels, deform.in_channels)
        assert deform.conv_offset_mask.weight.shape[:2] == (27, deform.in_channels)
    for index in (0, 6, 12):
        assert result.plan[f"neck.{index}.conv_offset_mask"][0] == result.plan[f"neck.{index}"][0]
    assert result.stats.widths_after == layer_widths(pruned)
    pruned.train()
    sum(value.sum() for value in pruned(IMAGES)[0].values()).backward()


def test_target_macs_counts_the_deformable_convs():
    model = randomised()
    result = prune(model, None, "l1", example_inputs=EXAMPLE, round_to=None, target_macs=0.5)
    assert result.stats.macs_after == count_macs(result.model, (64, 64))
    assert 0.45 <= result.stats.macs_after / result.stats.macs_before <= 0.5


def test_pruner_cuts_the_offset_conv_inputs_with_the_layer_inputs():
    """Pruning input channels equals zeroing them: the offsets (and the sampled values) no
    longer see them. Output channels are cut from weight and bias."""
    layer = ModulatedDeformConv2d(6, 5, 3, padding=1)
    with torch.no_grad():
        layer.conv_offset_mask.weight.normal_(std=0.3)
        layer.bias.normal_()
    x = torch.randn(1, 6, 7, 7)
    removed_inputs, removed_outputs = [1, 4], [0, 3]
    zeroed = x.clone()
    zeroed[:, removed_inputs] = 0
    with torch.no_grad():
        expected = layer(zeroed)
    pruner = ModulatedDeformConvPruner()
    pruner.prune_in_channels(layer, removed_inputs)
    pruner.prune_out_channels(layer, removed_outputs)
    assert (layer.in_channels, layer.out_channels) == (4, 3)
    assert layer.conv_offset_mask.weight.shape == (27, 4, 3, 3)
    kept_inputs = [c for c in range(6) if c not in removed_inputs]
    kept_outputs = [c for c in range(5) if c not in removed_outputs]
    with torch.no_grad():
        actual = layer(x[:, kept_inputs])
    torch.testing.assert_close(actual, expected[:, kept_outputs], rtol=1e-5, atol=1e-6)


def test_channel_plan_resizes_the_offset_conv_with_its_layer():
    model = tiny_model("resdcn18")
    apply_channel_plan(model, {"neck.6": [10, 12]})
    layer = model.neck[6]
    assert layer.weight.shape == (12, 10, 3, 3) and layer.bias.shape == (12,)
    assert layer.conv_offset_mask.weight.shape == (27, 10, 3, 3)
    assert layer_widths(model)["neck.6.conv_offset_mask"] == [10, 27]
    with pytest.raises(ValueError, match="neck.6.*expected 2 positive widths"):
        apply_channel_plan(model, {"neck.6": [10]})
