"""The original TTFNet-18 and TTFNet-34 (ZJULearning/ttfnet, mmdet v1): sizes, structure,
outputs, pruning, and importing the original's checkpoints (the TTFNet head itself is tested in
test_ttfnet.py)."""

import pytest
import torch
import torchvision
from test_pruning_invariants import EXAMPLE, IMAGES
from test_pruning_invariants import randomised as randomised_model
from test_resdcn import OriginalDCN
from tiny import TINY_HEAD_CONV, TINY_WIDTHS
from torch import nn

from ctprune.pruning import prune
from cuda_ops import ModulatedDeformConv2d
from detector import (
    CheckpointError,
    build_model,
    count_parameters,
    load_model,
    output_layers,
    save_checkpoint,
)
from detector.config import ModelConfig, input_preset
from detector.heads import HEADS, head_factory
from detector.models.ttfnet import original_key
from detector.original import convert_original_state_dict, import_original_checkpoint
from detector.ttfnet.heads import build_ttfnet_heads

# Graph building for pruning traces the deformable convs; a hang must fail, not block.
pytestmark = pytest.mark.timeout(60)

ARCHS = ["ttfnet18", "ttfnet34"]

# The original's parameter counts for 80 foreground classes (its configs say num_classes=81,
# with background; TTFHead builds num_classes - 1 heatmap channels). Measured on the original's
# own module code (mmdet/models/backbones/resnet.py, anchor_heads/ttf_head.py, mmdet's
# ConvModule and ModulatedDeformConvPack with the compiled op swapped for torchvision's), built
# with the configs ttfnet_r18_2x.py and ttfnet_r34_2x.py: total, then per part.
ORIGINAL_PARAMETERS = {"ttfnet18": 14_208_933, "ttfnet34": 24_354_021}
ORIGINAL_PARTS = {
    # backbone, bbox_head.deconv_layers, bbox_head.shortcut_layers, bbox_head.hm, bbox_head.wh
    "ttfnet18": (11_176_512, 1_767_441, 996_032, 231_760, 37_188),
    "ttfnet34": (21_284_672, 1_767_441, 996_032, 231_760, 74_116),
}


def test_the_family_passes_its_box_branch_depth_to_the_ttfnet_head_only():
    """TTFNet-34's two box convs reach `build_ttfnet_heads` through the head options; the same
    options leave another head type's builder alone."""
    assert HEADS["ttfnet"].build_heads is build_ttfnet_heads
    assert HEADS["ttfnet"].output_channels(80) == {"heatmap": 80, "ltrb": 4}
    options = {"ttfnet": {"ltrb_convs": 2}}
    ttfnet = head_factory("ttfnet", 3)(16, 8, options=options)
    assert sum(isinstance(m, nn.Conv2d) for m in ttfnet["ltrb"].modules()) == 3
    centernet = head_factory("centernet", 3)(16, 8, options=options)
    assert set(centernet.keys()) == {"heatmap", "wh", "offset"}


def tiny_ttfnet(arch: str = "ttfnet18", num_classes: int = 3) -> nn.Module:
    return build_model(
        arch, num_classes, head="ttfnet", head_conv=TINY_HEAD_CONV, widths=TINY_WIDTHS["ttfnet"]
    )


# Sizes and structure.


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_parameter_count_on_the_meta_device(arch):
    with torch.device("meta"):
        model = build_model(arch, 80, head="ttfnet")
    assert count_parameters(model) == ORIGINAL_PARAMETERS[arch]
    neck = model.neck
    parts = (
        count_parameters(model.backbone),
        count_parameters(neck.upsample),
        count_parameters(neck.shortcuts),
        count_parameters(model.heads["heatmap"]),
        count_parameters(model.heads["ltrb"]),
    )
    assert parts == ORIGINAL_PARTS[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_layout(arch):
    with torch.device("meta"):
        model = build_model(arch, 80, head="ttfnet")
    deforms = [level[0] for level in model.neck.upsample]
    assert all(isinstance(m, ModulatedDeformConv2d) for m in deforms)
    assert [(m.in_channels, m.out_channels) for m in deforms] == [(512, 256), (256, 128), (128, 64)]
    assert [type(m).__name__ for m in model.neck.upsample[0]] == [
        "ModulatedDeformConv2d", "BatchNorm2d", "ReLU",
    ]
    # shortcut_cfg (1, 2, 3) from the stride-16, -8 and -4 stages; no ReLU after the last conv.
    shortcuts = [
        [(m.in_channels, m.out_channels) for m in level if isinstance(m, nn.Conv2d)]
        for level in model.neck.shortcuts
    ]
    assert shortcuts == [[(256, 256)], [(128, 128)] * 2, [(64, 64)] * 3]
    assert all(isinstance(level[-1], nn.Conv2d) for level in model.neck.shortcuts)
    convs = {
        name: [(m.in_channels, m.out_channels, m.kernel_size[0]) for m in branch
               if isinstance(m, nn.Conv2d)]
        for name, branch in model.heads.items()
    }
    ltrb_convs = {"ttfnet18": 1, "ttfnet34": 2}[arch]
    assert convs == {
        "heatmap": [(64, 128, 3), (128, 128, 3), (128, 80, 1)],
        "ltrb": [(64, 64, 3)] + [(64, 64, 3)] * (ltrb_convs - 1) + [(64, 4, 1)],
    }


def test_fresh_neck_is_initialised_as_the_original():
    model = build_model("ttfnet18", 80)  # the neck does not depend on the head type
    for level in model.neck.upsample:
        assert torch.all(level[0].conv_offset_mask.weight == 0)
        assert torch.all(level[0].bias == 0)
    for conv in (m for m in model.neck.shortcuts.modules() if isinstance(m, nn.Conv2d)):
        # mmcv's kaiming_init: normal, fan_out, gain sqrt(2); bias 0
        fan_out = conv.out_channels * 9
        assert torch.all(conv.bias == 0)
        assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)


# Outputs.


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_forward_outputs_in_train_and_eval(arch):
    model = tiny_ttfnet(arch)
    images = torch.randn(2, 3, 64, 96)
    shapes = {}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        outputs = model(images, return_features=True)
        assert isinstance(outputs, list) and len(outputs) == 1
        shapes[mode] = {k: tuple(v.shape) for k, v in outputs[0].items()}
        assert torch.all(outputs[0]["ltrb"] >= 0)
    assert shapes["train"] == shapes["eval"] == {
        "heatmap": (2, 3, 16, 24),
        "ltrb": (2, 4, 16, 24),
        "features": (2, TINY_WIDTHS["ttfnet"]["neck"][-1], 16, 24),
    }


def test_neck_sizes_follow_the_trunk_stages_for_inputs_not_multiple_of_32():
    """The original pads to 32; ours up-samples to each stage's own size instead of x2."""
    model = tiny_ttfnet().eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 72, 100))[0]
    assert outputs["heatmap"].shape[-2:] == outputs["ltrb"].shape[-2:] == (18, 25)


def test_other_head_types_read_the_same_neck():
    model = build_model("ttfnet34", 3, head_conv=8, widths=TINY_WIDTHS["ttfnet"])
    assert set(model.heads) == {"heatmap", "wh", "offset"}
    assert model.heads["heatmap"][0].in_channels == TINY_WIDTHS["ttfnet"]["neck"][-1]


def test_bad_widths_are_named():
    with pytest.raises(ValueError, match=r"model\.widths\.shortcut_convs: expected 3 positive"):
        build_model("ttfnet18", 3, widths={"shortcut_convs": [1, 0, 3]})


# Pruning.


def test_output_layers_are_the_head_outputs_and_the_offset_convs():
    model = tiny_ttfnet()
    layers = output_layers(model)
    assert layers[:2] == [model.heads["heatmap"][-1], model.heads["ltrb"][-1]]
    assert layers[2:] == [level[0].conv_offset_mask for level in model.neck.upsample]


@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_keeps_output_shapes_and_offset_convs(monkeypatch, tmp_path, arch):
    """The shared invariants run on these archs with the CenterNet heads
    (test_pruning_invariants.py); here with the TTFNet head, and a pruned save -> load."""
    monkeypatch.setattr("test_pruning_invariants.tiny_model",
                        lambda arch, head="centernet": tiny_ttfnet(arch))
    model = randomised_model(arch)
    with torch.no_grad():
        before = model(IMAGES)[0]
    result = prune(model, 0.3, "l1", example_inputs=EXAMPLE, round_to=None)
    pruned = result.model.eval()
    assert count_parameters(pruned) < count_parameters(model)
    for kept, level in zip(pruned.neck.upsample, model.neck.upsample, strict=True):
        assert kept[0].out_channels < level[0].out_channels
    for level, shortcut in zip(pruned.neck.upsample, pruned.neck.shortcuts, strict=True):
        assert level[0].conv_offset_mask.out_channels == 27
        assert level[0].conv_offset_mask.in_channels == level[0].in_channels
        # the shortcut's output is added to the level's: cut at the same channels
        assert shortcut[-1].out_channels == level[0].out_channels == level[1].num_features
    with torch.no_grad():
        after = pruned(IMAGES)[0]
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    config = ModelConfig(arch=arch, head="ttfnet", num_classes=3, head_conv=TINY_HEAD_CONV,
                         widths=TINY_WIDTHS["ttfnet"])
    loaded, checkpoint = load_model(save_checkpoint(tmp_path / "pruned.pt", pruned, config))
    assert checkpoint.channel_plan
    with torch.no_grad():
        again = loaded.eval()(IMAGES)[0]
    for name in after:
        torch.testing.assert_close(again[name], after[name], rtol=0, atol=0)


# Importing the original's checkpoints.


class OriginalConvModule(nn.Module):
    """mmdet's ConvModule without a norm: the conv under ``conv`` (with bias), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activate(self.conv(x))


class OriginalShortcut(nn.Module):
    """TTFNet's ShortcutConv2d: convs 3x3 under ``layers`` with a ReLU between them."""

    def __init__(self, in_channels: int, out_channels: int, count: int):
        super().__init__()
        layers = []
        for index in range(count):
            layers.append(nn.Conv2d(in_channels if index == 0 else out_channels,
                                    out_channels, 3, padding=1))
            if index < count - 1:
                layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class OriginalTTFHead(nn.Module):
    """TTFHead's module names and forward: ``deconv_layers`` (mdcn, BN, ReLU, bilinear x2 with
    aligned corners), ``shortcut_layers``, ``hm`` and ``wh``; ``wh`` is relu(x) * 16."""

    def __init__(self, inplanes, planes, head_conv, wh_conv, hm_convs, wh_convs, num_fg):
        super().__init__()
        inputs = [inplanes[-1], *planes[:-1]]
        self.deconv_layers = nn.ModuleList(
            nn.Sequential(OriginalDCN(i, o), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                          nn.UpsamplingBilinear2d(scale_factor=2))
            for i, o in zip(inputs, planes, strict=True)
        )
        self.shortcut_layers = nn.ModuleList(
            OriginalShortcut(i, o, n)
            for i, o, n in zip(inplanes[:-1][::-1], planes, (1, 2, 3), strict=True)
        )
        self.wh = self.branch(planes[-1], wh_conv, wh_convs, 4)
        self.hm = self.branch(planes[-1], head_conv, hm_convs, num_fg)

    @staticmethod
    def branch(in_channels, width, count, out_channels):
        convs = [OriginalConvModule(in_channels if i == 0 else width, width) for i in range(count)]
        return nn.Sequential(*convs, nn.Conv2d(width, out_channels, 1))

    def forward(self, feats):
        x = feats[-1]
        for i, upsample in enumerate(self.deconv_layers):
            x = upsample(x) + self.shortcut_layers[i](feats[-i - 2])
        return self.hm(x), torch.relu(self.wh(x)) * 16


class OriginalTTFNet(nn.Module):
    """mmdet v1's TTFNet: ``backbone`` (mmdet's ResNet: torchvision's names, four outputs) and
    ``bbox_head``; ``planes`` and the head widths may be scaled down."""

    def __init__(self, depth, num_fg=80, planes=(256, 128, 64), head_conv=128, wh_conv=64):
        super().__init__()
        self.backbone = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        del self.backbone.fc, self.backbone.avgpool
        wh_convs = {18: 1, 34: 2}[depth]
        self.bbox_head = OriginalTTFHead(
            (64, 128, 256, 512), planes, head_conv, wh_conv, 2, wh_convs, num_fg
        )

    def forward(self, x):
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        feats = []
        for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
            x = layer(x)
            feats.append(x)
        return self.bbox_head(feats)


def test_original_key_mapping_examples():
    assert original_key("backbone.layer3.1.bn2.running_var") == "backbone.layer3.1.bn2.running_var"
    assert original_key("bbox_head.deconv_layers.2.0.conv_offset_mask.weight") == (
        "neck.upsample.2.0.conv_offset_mask.weight"
    )
    assert original_key("bbox_head.deconv_layers.0.1.num_batches_tracked") == (
        "neck.upsample.0.1.num_batches_tracked"
    )
    assert original_key("bbox_head.shortcut_layers.2.layers.4.bias") == "neck.shortcuts.2.4.bias"
    assert original_key("bbox_head.hm.1.conv.weight") == "heads.heatmap.2.weight"
    assert original_key("bbox_head.hm.2.bias") == "heads.heatmap.4.bias"
    assert original_key("bbox_head.wh.1.weight") == "heads.ltrb.2.weight"


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_original_keys_and_shapes_convert_to_ours(arch):
    with torch.device("meta"):
        original = OriginalTTFNet(int(arch[-2:]))
        model = build_model(arch, 80, head="ttfnet")
    assert count_parameters(original) == ORIGINAL_PARAMETERS[arch]  # the reference is faithful
    converted = convert_original_state_dict(original.state_dict(), arch)
    ours = model.state_dict()
    assert converted.keys() == ours.keys()
    assert all(converted[key].shape == ours[key].shape for key in ours)


def _original_checkpoint(tmp_path, depth, **widths):
    original = OriginalTTFNet(depth, num_fg=4, **widths)
    generator = torch.Generator().manual_seed(depth)
    with torch.no_grad():
        for module in original.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
        for conv in (original.bbox_head.hm[-1], original.bbox_head.wh[-1]):
            nn.init.normal_(conv.weight, std=0.3, generator=generator)
            nn.init.normal_(conv.bias, std=0.5, generator=generator)
    classes = ("cat", "dog", "car", "bus")
    path = tmp_path / f"ttfnet{depth}_2x.pth"
    torch.save({"meta": {"epoch": 24, "iter": 87_960, "CLASSES": classes},
                "state_dict": original.state_dict(), "optimizer": {}}, path)
    return original.eval(), path


@pytest.mark.parametrize("arch", ARCHS)
def test_imported_original_checkpoint_gives_the_original_outputs(tmp_path, arch):
    # The original's trunk at full width (its keys load unchanged), the neck and heads scaled
    # down so the slow deformable-conv reference stays fast.
    widths = {"planes": (32, 16, 8), "head_conv": 16, "wh_conv": 8}
    original, path = _original_checkpoint(tmp_path, int(arch[-2:]), **widths)
    out = import_original_checkpoint(
        path, arch, tmp_path / "imported.pt", widths={"neck": [32, 16, 8]}
    )
    model, checkpoint = load_model(out)
    model.eval()
    config = checkpoint.model_config
    assert (config.arch, config.head, config.num_classes, config.head_conv) == (
        arch, "ttfnet", 4, 16
    )
    assert config.class_names == ["cat", "dog", "car", "bus"]
    assert config.input == input_preset("imagenet", (512, 512))  # the configs' RGB mean/std
    assert checkpoint.meta["original_epoch"] == 24
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        heatmap, ltrb = original(images)
        outputs = model(images)[0]
        offsets, _ = model.neck.upsample[0][0].offset_and_mask(model.backbone(images)[-1])
    assert offsets.abs().max() > 0.5  # the parity covers real deformation
    assert ltrb.gt(0).float().mean() > 0.2  # and the box branch's ReLU passes something
    torch.testing.assert_close(outputs["heatmap"], heatmap, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["ltrb"], ltrb, rtol=1e-4, atol=1e-4)


def test_a_ttfnet34_checkpoint_is_not_a_ttfnet18(tmp_path):
    widths = {"planes": (32, 16, 8), "head_conv": 16, "wh_conv": 8}
    _, path = _original_checkpoint(tmp_path, 34, **widths)
    with pytest.raises(CheckpointError, match=r"ttfnet34_2x.pth \(as an original 'ttfnet18'\)"):
        import_original_checkpoint(
            path, "ttfnet18", tmp_path / "x.pt", widths={"neck": [32, 16, 8]}
        )


def test_import_original_command_at_full_size(tmp_path):
    from ctprune.cli import main

    original, path = _original_checkpoint(tmp_path, 18)
    out = tmp_path / "imported.pt"
    assert main(["import-original", str(path), "--arch", "ttfnet18", "--out", str(out)]) == 0
    model, checkpoint = load_model(out)
    config = checkpoint.model_config
    assert (config.head, config.head_conv, config.input.color_order) == ("ttfnet", 128, "RGB")
    assert count_parameters(model) == count_parameters(original)


def test_a_centernet_checkpoint_is_not_a_ttfnet(tmp_path):
    from test_original import _original_checkpoint as centernet_checkpoint

    _, path = centernet_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"model_last.pth: no heatmap head \('bbox_head.hm"):
        import_original_checkpoint(path, "ttfnet18", tmp_path / "x.pt")
