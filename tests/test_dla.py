"""DLA-34 CenterNets (`dla34`: pose_dla_dcn, `dlav0_34`): structure, sizes, the original's
checkpoints, and the widths pruning gives Tree/Root concatenations, IDA aggregation and the
depthwise upsampling (the shared pruning invariants are in test_pruning_invariants.py)."""


import pytest
import torch
import torch.nn.functional as F
from test_pruning_invariants import EXAMPLE, groups_of, outputs_of, randomised
from tiny import TINY_WIDTHS, tiny_config, tiny_model
from torch import nn

from ctprune.pruning import prune, widths_after_pruning
from ctprune.pruning.graph import meta_copy
from cuda_ops import ModulatedDeformConv2d
from detector import (
    apply_channel_plan,
    build_model,
    count_macs,
    count_parameters,
    layer_widths,
    load_model,
)
from detector.models.dla import bilinear_kernel, bilinear_upsampling
from detector.original import convert_original_state_dict, import_original_checkpoint

pytestmark = pytest.mark.timeout(60)

ARCHS = ["dla34", "dlav0_34"]
# The original keeps DLA-34's 1000-class ImageNet classifier, Conv2d(512, 1000, 1), in base.fc.
FC_PARAMETERS = 512 * 1000 + 1000
# The original's parameter counts for 80 classes, base.fc included (measured on its code).
ORIGINAL_WITH_FC = {"dla34": 20_188_892, "dlav0_34": 18_474_476}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# Our module prefix -> the original's; heads hm / wh / reg.
TO_ORIGINAL = {
    "backbone.": "base.",
    "neck.": "",
    "heads.heatmap.": "hm.",
    "heads.wh.": "wh.",
    "heads.offset.": "reg.",
}


def original_key(key: str) -> str:
    for ours, theirs in TO_ORIGINAL.items():
        if key.startswith(ours):
            return theirs + key.removeprefix(ours)
    raise AssertionError(key)


# --- structure --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_parameter_counts_match_the_original(arch):
    with torch.device("meta"):
        model = build_model(arch, 80)
    assert count_parameters(model) == ORIGINAL_WITH_FC[arch] - FC_PARAMETERS
    # The original's breakdown: heads (64 -> 256 -> 80 / 2 / 2) and, for dla34, its 16 DCNs.
    assert count_parameters(model.heads) == 464_724
    deformable = [m for m in model.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert len(deformable) == (16 if arch == "dla34" else 0)
    if arch == "dla34":
        assert sum(count_parameters(m) for m in deformable) == 3_920_624
        assert sum(count_parameters(m.conv_offset_mask) for m in deformable) == 638_064


def test_default_head_conv_is_256_and_widths_are_checked():
    with torch.device("meta"):
        assert build_model("dlav0_34", 80).heads.heatmap[0].out_channels == 256
    with pytest.raises(ValueError, match="model.widths.channels: expected 6 positive"):
        build_model("dla34", 3, widths={"channels": [4, 8, 8]})
    with pytest.raises(ValueError, match="unknown keys \\['levels'\\]"):
        build_model("dla34", 3, widths={"levels": [1, 1, 1, 2, 2, 1]})


def test_imagenet_weights_load_without_the_classifier(tmp_path):
    widths = tiny_config("dla34").widths
    source = tiny_model("dla34").backbone
    weights = {**source.state_dict(), "fc.weight": torch.zeros(1000, 24, 1, 1)}
    torch.save(weights, tmp_path / "dla34-imagenet.pth")
    model = build_model("dla34", 3, widths=widths, pretrained=tmp_path / "dla34-imagenet.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    with pytest.raises(ValueError, match="do not fit this trunk"), torch.device("meta"):
        build_model("dla34", 3, pretrained=tmp_path / "dla34-imagenet.pth")  # full width


def test_bilinear_kernel_by_hand():
    assert bilinear_kernel(4)[0].tolist() == [0.0625, 0.1875, 0.1875, 0.0625]  # 0.25 * tent
    torch.testing.assert_close(
        bilinear_kernel(8)[3], 0.875 * torch.tensor([1, 3, 5, 7, 7, 5, 3, 1]) / 8
    )


@pytest.mark.parametrize("factor", [2, 4])
def test_upsampling_is_bilinear_interpolation_away_from_the_border(factor):
    up = bilinear_upsampling(3, factor)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ours = up(x)
    reference = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert ours.shape == reference.shape
    inner = slice(factor, -factor)  # the transposed conv pads with zeros, interpolate clamps
    torch.testing.assert_close(ours[..., inner, inner], reference[..., inner, inner])


# --- the original's checkpoints -----------------------------------------------------------------

# Shapes in the original's state dicts, worked out from its model code.
ORIGINAL_SHAPES = {
    "dla34": {
        "base.base_layer.0.weight": (16, 3, 7, 7),
        "base.level2.root.conv.weight": (64, 128, 1, 1),  # cat(x2, x1)
        "base.level3.tree2.root.conv.weight": (128, 448, 1, 1),  # cat(x2, x1, bottom, tree1)
        "base.level3.project.0.weight": (128, 64, 1, 1),  # computed, never used
        "base.level5.root.conv.weight": (512, 1280, 1, 1),  # cat(x2, x1, bottom)
        "base.fc.weight": (1000, 512, 1, 1),
        "dla_up.ida_0.proj_1.conv.weight": (256, 512, 3, 3),
        "dla_up.ida_0.proj_1.conv.conv_offset_mask.weight": (27, 512, 3, 3),
        "dla_up.ida_0.up_1.weight": (256, 1, 4, 4),
        "dla_up.ida_1.proj_2.conv.weight": (128, 256, 3, 3),
        "dla_up.ida_2.node_3.actf.0.running_var": (64,),
        "ida_up.proj_2.conv.weight": (64, 256, 3, 3),
        "ida_up.up_2.weight": (64, 1, 8, 8),
        "hm.0.weight": (256, 64, 3, 3),
        "reg.2.weight": (2, 256, 1, 1),
    },
    "dlav0_34": {
        "base.level4.tree2.root.conv.weight": (256, 896, 1, 1),
        "base.fc.bias": (1000,),
        "dla_up.ida_0.proj_1.0.weight": (256, 512, 1, 1),
        "dla_up.ida_0.up_1.weight": (256, 1, 4, 4),
        "dla_up.ida_0.node_1.0.weight": (256, 512, 3, 3),
        "dla_up.ida_2.proj_3.0.weight": (64, 128, 1, 1),
        "dla_up.ida_2.node_3.1.running_mean": (64,),
        "wh.0.bias": (256,),
    },
}


def _original_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict under the original's key names, with the classifier it keeps."""
    state_dict = {original_key(k): v for k, v in model.state_dict().items()}
    final_width = model.backbone.level5.root.conv.out_channels
    device = next(model.parameters()).device
    state_dict["base.fc.weight"] = torch.randn(1000, final_width, 1, 1, device=device)
    state_dict["base.fc.bias"] = torch.randn(1000, device=device)
    return state_dict


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_keys_convert_to_and_from_the_originals(arch):
    with torch.device("meta"):
        model = build_model(arch, 80)
    original = _original_state_dict(model)
    assert len(original) == len(model.state_dict()) + 2
    parameters = [v for k, v in original.items() if not k.endswith(BUFFERS)]
    assert sum(v.numel() for v in parameters) == ORIGINAL_WITH_FC[arch]
    for key, shape in ORIGINAL_SHAPES[arch].items():
        assert tuple(original[key].shape) == shape, key
    converted = convert_original_state_dict({f"module.{k}": v for k, v in original.items()}, arch)
    assert {k: v.shape for k, v in converted.items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_imported_original_checkpoint_gives_the_same_outputs(tmp_path, arch):
    model = randomised(arch)
    path = tmp_path / "model_last.pth"
    torch.save({"epoch": 140, "state_dict": _original_state_dict(model)}, path)
    out = import_original_checkpoint(
        path, arch, tmp_path / "imported.pt", input_size=(64, 64), widths=tiny_config(arch).widths
    )
    imported, checkpoint = load_model(out)
    assert checkpoint.model_config.head_conv == 8 and checkpoint.meta["original_epoch"] == 140
    assert not any(".fc." in key for key in imported.state_dict())
    for name, value in outputs_of(model).items():
        torch.testing.assert_close(outputs_of(imported)[name], value, rtol=0, atol=0)


# --- pruning --------------------------------------------------------------------------------------


def test_root_concatenation_lists_coupled_channels_once_per_place():
    """In a Tree of one level the second block adds its input (the first block's output), so
    both are one group, and the Root reads it twice: cat(x2, x1) -> input channels [0, w) and
    [w, 2w). Each place is a consumer slice of its own."""
    model = tiny_model("dlav0_34")
    width = TINY_WIDTHS["dlav0_"]["channels"][2]
    block = "backbone.level2.tree1.conv2"
    group = next(g for g in groups_of(model) if block in g.output_layer_names)
    root = "backbone.level2.root.conv"
    places = [layer.channels for layer in group.consumers if layer.name == root]
    assert len(places) == 2
    assert sorted(places[0].tolist()) == list(range(width))
    assert sorted(places[1].tolist()) == list(range(width, 2 * width))
    assert torch.equal(places[1] - places[0], torch.full((width,), width))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_predicted_widths_and_macs_follow_the_roots(arch, scope):
    """A Root concatenation reads a channel twice and loses it twice: the widths predicted from
    the groups equal the pruned model's, and target_macs' count on a resized meta copy agrees.
    (The shared pruning invariants are in test_pruning_invariants.py.)"""
    model = randomised(arch)
    groups = groups_of(model)
    result = prune(model, 0.4, "l1", scope=scope, example_inputs=EXAMPLE, round_to=None)
    kept = {group["name"]: group["kept"] for group in result.stats.groups}
    predicted = widths_after_pruning(
        layer_widths(model), groups, [kept[group.name] for group in groups]
    )
    assert predicted == layer_widths(result.model)
    before = layer_widths(model)
    plan = {name: value for name, value in predicted.items() if value != before[name]}
    assert plan  # upsampling, IDA and Tree layers were resized
    resized = apply_channel_plan(meta_copy(model), plan)
    assert count_macs(resized, tuple(EXAMPLE.shape[-2:])) == result.stats.macs_after
