import pytest
import torch
import torchvision
from tiny import TINY_WIDTHS, tiny_model

from detector import ARCHITECTURES, build_model, count_parameters, output_layers
from detector.heads import head_factory
from detector.models import REQUIRED_HEAD
from detector.models.centernet import HEATMAP_BIAS_INIT
from detector.models.resnet import ResNetTrunk, build_resnet
from detector.models.widths import merge_widths

# The original's parameter counts for 80 classes (measured on its own model code); res34 and
# res50 follow from the same construction (torchvision trunk + 256-wide deconvs + 64-wide heads).
ORIGINAL_PARAMETERS = {
    "res18": 15_820_372,
    "res34": 25_928_532,
    "res50": 34_443_348,
    "res101": 53_435_476,
    "resdcn18": 14_437_349,  # resnet_dcn: DCN + deconv neck 256/128/64, 64-wide heads
    "resdcn101": 49_673_189,
    "hourglass104": 191_284_008,  # the original's large_hourglass, two stacks
    # pose_dla_dcn and dlav0 without the unused 1000-class `base.fc` the original keeps
    # (20,188,892 and 18,474,476 with it; see tests/test_dla.py)
    "dla34": 19_675_892,
    "dlav0_34": 17_961_476,
}

# The centernet head's architectures (the triplet-only ones are tested in test_triplet_models).
CENTERNET_ARCHS = sorted(set(ARCHITECTURES) - set(REQUIRED_HEAD))


@pytest.mark.parametrize("arch", sorted(ORIGINAL_PARAMETERS))
def test_full_size_parameter_count(arch):
    with torch.device("meta"):
        model = build_model(arch, 80)
    assert count_parameters(model) == ORIGINAL_PARAMETERS[arch]


@pytest.mark.parametrize("depth", [18, 50])
def test_trunk_matches_torchvision_keys_and_shapes(depth):
    with torch.device("meta"):
        reference = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        model = build_resnet(depth, head_factory("centernet", 80))
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    actual = {k: v.shape for k, v in model.backbone.state_dict().items()}
    assert actual == expected


@pytest.mark.parametrize("arch", CENTERNET_ARCHS)
def test_outputs_and_stride_in_train_and_eval(arch):
    model = tiny_model(arch)
    images = torch.randn(2, 3, 64, 96)
    shapes = {}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        outputs = model(images)
        stacks = 2 if arch.startswith("hourglass") else 1  # hourglass: intermediate supervision
        assert isinstance(outputs, list) and len(outputs) == stacks
        assert all(output.keys() == outputs[-1].keys() for output in outputs)
        shapes[mode] = [{k: tuple(v.shape) for k, v in output.items()} for output in outputs]
    expected = {"heatmap": (2, 3, 16, 24), "wh": (2, 2, 16, 24), "offset": (2, 2, 16, 24)}
    assert shapes["train"] == shapes["eval"] == [expected] * len(shapes["eval"])


def test_return_features_gives_the_neck_output():
    model = tiny_model().eval()
    outputs = model(torch.randn(1, 3, 64, 64), return_features=True)[0]
    assert outputs["features"].shape == (1, TINY_WIDTHS["res"]["neck"][-1], 16, 16)
    assert torch.equal(outputs["heatmap"], model.heads["heatmap"](outputs["features"]))


@pytest.mark.parametrize("arch", CENTERNET_ARCHS)
def test_backward_reaches_every_parameter(arch):
    model = tiny_model(arch).train()
    outputs = model(torch.randn(2, 3, 64, 64))
    sum(value.float().mean() for output in outputs for value in output.values()).backward()
    unused = {name for name, p in model.named_parameters() if p.grad is None}
    # Only DLA's projections that the original computes and throws away (trees of two levels).
    dead = {f"backbone.level{level}.project.{index}.{kind}" for level in (3, 4)
            for index, kind in ((0, "weight"), (1, "weight"), (1, "bias"))}
    assert unused == (dead if arch.startswith("dla") else set())


def test_original_initialisation():
    model = build_model("res18", 80)
    heads = model.heads
    assert torch.all(heads["heatmap"][-1].bias == HEATMAP_BIAS_INIT)
    assert abs(torch.sigmoid(torch.tensor(HEATMAP_BIAS_INIT)).item() - 0.1) < 1e-3
    for name in ("wh", "offset"):
        assert torch.all(heads[name][-1].bias == 0)
        assert heads[name][-1].weight.std() < 0.01
    deconvs = [m for m in model.neck if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(deconvs) == 3 and all(m.bias is None for m in deconvs)
    assert all(0.0005 < m.weight.std() < 0.002 for m in deconvs)
    assert [m.out_channels for m in deconvs] == [256, 256, 256]
    assert heads["heatmap"][0].out_channels == 64  # head_conv default for ResNets


def test_head_conv_zero_gives_single_conv_heads():
    model = build_model("res18", 3, head_conv=0, widths=TINY_WIDTHS["res"])
    assert all(len(head) == 1 for head in model.heads.values())
    assert model(torch.randn(2, 3, 64, 64))[0]["heatmap"].shape == (2, 3, 16, 16)


def test_output_layers_are_the_final_head_convs():
    model = tiny_model()
    layers = output_layers(model)
    assert layers == [model.heads[name][-1] for name in ("heatmap", "wh", "offset")]
    assert [layer.out_channels for layer in layers] == [3, 2, 2]


def test_unknown_arch_lists_known_ones():
    with pytest.raises(ValueError, match="res18.*res101"):
        build_model("resnet18")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"head_conv": -1}, "head_conv"),
        ({"widths": {"neck_width": [8]}}, "unknown keys"),
        # A 2-entry neck would build with output stride 8, a 3-entry trunk with 16.
        ({"widths": {"neck": [8, 8]}}, "widths.neck: expected 3 positive integers"),
        ({"widths": {"stages": [8, 8, 8]}}, "widths.stages: expected 4 positive integers"),
        ({"widths": {"stem": 0}}, "widths.stem: expected a positive integer"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model("res18", **{"num_classes": 3, **kwargs})


WIDTH_DEFAULTS = {"stem": 64, "neck": [256, 256, 256], "scale": 1.0, "fused": None}


@pytest.mark.parametrize(
    "widths, message",
    [
        ([8], "a mapping"),
        ({"stem": True}, "stem: expected a positive integer"),
        ({"stem": 8.0}, "stem: expected a positive integer"),
        ({"neck": (8, 8, 0)}, "neck: expected 3 positive integers"),
        ({"neck": 8}, "neck: expected 3 positive integers"),
        ({"scale": "1"}, "scale: expected a positive number"),
        ({"stem": None}, "stem: expected a positive integer .*got None"),
    ],
)
def test_merge_widths_names_the_bad_key(widths, message):
    with pytest.raises(ValueError, match=message):
        merge_widths(WIDTH_DEFAULTS, widths)


def test_merge_widths_keeps_defaults_and_takes_what_is_allowed():
    merged = merge_widths(WIDTH_DEFAULTS, {"neck": [8, 8], "scale": 2, "stem": None},
                          free_lengths=("neck",), nullable=("stem",))
    assert merged == {"stem": None, "neck": [8, 8], "scale": 2, "fused": None}
    assert merge_widths(WIDTH_DEFAULTS, None) == WIDTH_DEFAULTS


def test_pretrained_loads_from_a_local_file(tmp_path):
    source = ResNetTrunk(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], 8, (8, 16, 16, 32))
    state_dict = {f"module.{k}": v for k, v in source.state_dict().items()}
    state_dict["fc.weight"] = torch.zeros(10, 32)  # a classifier is dropped
    path = tmp_path / "resnet18.pth"
    torch.save(state_dict, path)
    model = tiny_model(pretrained=path)
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def test_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tiny_model(pretrained=tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth.*do not fit"):
        tiny_model(pretrained=wrong)


def test_resunet_neck_follows_the_trunk_at_sizes_not_divisible_by_32():
    # 72 x 88 gives stage maps of 18x22, 9x11, 5x6 and 3x3; up-sampling by exactly 2 would
    # give 6x6 and 10x12 and fail the shortcut additions.
    model = tiny_model("resunet18").eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 72, 88))[0]
    assert outputs["heatmap"].shape[-2:] == (18, 22)


def test_resunet_trunk_keeps_torchvision_keys():
    from detector.models.resunet import build_resunet

    with torch.device("meta"):
        reference = torchvision.models.resnet18(weights=None)
        model = build_resunet(18, head_factory("centernet", 80))
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in model.backbone.state_dict().items()} == expected
