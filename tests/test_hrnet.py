"""HRNet-W18 / -W32 CenterNets: sizes, branches, local weights (tiny widths, 64 px). Pruning:
test_pruning_invariants.py."""

import pytest
import torch
from tiny import TINY_WIDTHS, tiny_model
from torch import nn

from detector import build_model, count_parameters
from detector.models.hrnet import HighResolutionModule, HRNetTrunk

pytestmark = pytest.mark.timeout(60)

# Pinned sizes for 80 classes. The trunks are HRNetV2-W18 / -W32 without the classification
# modules: 9,562,260 and 29,305,536 parameters (HRNetV2-W18's published 9.6 M).
PARAMETERS = {
    "hrnet_w18": (10_107_912, 9_562_260),
    "hrnet_w32": (30_371_988, 29_305_536),
}


@pytest.mark.parametrize("arch", sorted(PARAMETERS))
def test_full_size_parameter_counts(arch):
    with torch.device("meta"):
        model = build_model(arch, 80)
    total, trunk = PARAMETERS[arch]
    assert count_parameters(model.backbone) == trunk
    assert count_parameters(model) == total
    channels = int(arch.removeprefix("hrnet_w"))
    concatenated = channels * (1 + 2 + 4 + 8)
    # neck: a 1x1 conv as wide as the concatenation + BN; heads: 3x3 conv 64 + 1x1 per output
    assert count_parameters(model.neck) == concatenated * concatenated + 2 * concatenated
    heads = sum(concatenated * 64 * 9 + 64 + 64 * out + out for out in (80, 2, 2))
    assert count_parameters(model.heads) == heads


def test_trunk_keys_are_the_hrnet_releases():
    """Spot checks of the release's names (and so of its layout): a new branch's transition
    from the lowest branch, a 1x1 fusion from a lower resolution, the three stride-2 steps from
    stride 4 to stride 32 and the last module of stage 4."""
    with torch.device("meta"):
        keys = build_model("hrnet_w18", 80).backbone.state_dict()
    shapes = {
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "transition1.0.0.weight": (18, 256, 3, 3),
        "transition1.1.0.0.weight": (36, 256, 3, 3),
        "transition3.3.0.0.weight": (144, 72, 3, 3),
        "stage2.0.fuse_layers.0.1.0.weight": (18, 36, 1, 1),
        "stage3.3.branches.2.3.conv2.weight": (72, 72, 3, 3),
        "stage4.2.fuse_layers.3.0.0.0.weight": (18, 18, 3, 3),
        "stage4.2.fuse_layers.3.0.2.0.weight": (144, 18, 3, 3),
    }
    assert {name: tuple(keys[name].shape) for name in shapes} == shapes
    assert "stage4.3.branches.0.0.conv1.weight" not in keys  # stage 4 has 3 modules


def test_trunk_branches_are_at_strides_4_to_32():
    widths = TINY_WIDTHS["hrnet_w"]
    trunk = HRNetTrunk(8, 4, tuple(widths["branches"]), (1, 1, 1), 1)
    branches = trunk(torch.randn(2, 3, 64, 96))
    assert [tuple(b.shape) for b in branches] == [
        (2, width, 64 // stride, 96 // stride)
        for width, stride in zip(widths["branches"], (4, 8, 16, 32), strict=True)
    ]


def test_fusion_sums_every_branch_resampled_then_applies_relu():
    """The fusion of a 3-branch module, written out for branch 1 (stride 8): branch 0 through
    a stride-2 3x3 conv + BN, itself, branch 2 through a 1x1 conv + BN and x2 nearest
    upsampling; summed, then ReLU."""
    torch.manual_seed(0)
    module = HighResolutionModule([4, 8, 8], blocks=1).eval()
    inputs = [torch.randn(1, 4, 16, 16), torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)]
    with torch.no_grad():
        outputs = module([x.clone() for x in inputs])
        branch = [module.branches[i](x) for i, x in enumerate(inputs)]
        down = module.fuse_layers[1][0][0]  # Sequential(conv 3x3 stride 2, BN)
        up = module.fuse_layers[1][2]  # Sequential(conv 1x1, BN, Upsample)
        from_high = down[1](down[0](branch[0]))
        from_low = up[1](up[0](branch[2])).repeat_interleave(2, -1).repeat_interleave(2, -2)
        expected = torch.relu(from_high + branch[1] + from_low)
    assert down[0].stride == (2, 2) and down[0].kernel_size == (3, 3)
    torch.testing.assert_close(outputs[1], expected)
    assert [tuple(o.shape) for o in outputs] == [tuple(x.shape) for x in inputs]


def _release_like_state_dict(trunk: HRNetTrunk) -> dict:
    """A trunk's state dict as the HRNet classification release stores it: DataParallel's
    `module.` prefix and the classification-only modules."""
    state_dict = {f"module.{k}": v.clone() for k, v in trunk.state_dict().items()}
    state_dict["module.incre_modules.0.0.conv1.weight"] = torch.zeros(32, 4, 1, 1)
    state_dict["module.final_layer.0.weight"] = torch.zeros(2048, 1024, 1, 1)
    state_dict["module.classifier.weight"] = torch.zeros(1000, 2048)
    return state_dict


def test_pretrained_loads_from_a_local_file(tmp_path):
    widths = TINY_WIDTHS["hrnet_w"]
    source = HRNetTrunk(8, 4, tuple(widths["branches"]), (1, 1, 1), 1)
    for module in source.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "hrnetv2_w18_imagenet_pretrained.pth"
    torch.save(_release_like_state_dict(source), path)
    model = tiny_model("hrnet_w18", pretrained=path)
    for name, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], value)


def test_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tiny_model("hrnet_w18", pretrained=tmp_path / "missing.pth")
    wrong = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, wrong)
    with pytest.raises(ValueError, match="resnet18.pth do not fit.*HRNet ImageNet weights"):
        tiny_model("hrnet_w18", pretrained=wrong)
    garbage = tmp_path / "notes.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth: not a readable state dict"):
        tiny_model("hrnet_w18", pretrained=garbage)


@pytest.mark.parametrize(
    "widths, message",
    [
        ({"width": 18}, "unknown keys"),
        ({"branches": [8, 16, 32]}, "widths.branches: expected 4 positive integers"),
        ({"blocks": 0}, "widths.blocks: expected a positive integer"),
    ],
)
def test_bad_widths_are_named(widths, message):
    with pytest.raises(ValueError, match=message):
        build_model("hrnet_w18", 3, widths=widths)
