"""The keypoint-triplet models: CenterNet-52/104 sizes against the originals, raw outputs in
train and eval mode, the triplet head on another backbone, pruning through the poolings, and
importing the originals' checkpoints (Duan et al.'s names and the simple CenterNet-47's)."""

import pytest
import torch
from test_hourglass import OriginalConvolution, OriginalKpModule, OriginalResidual
from tiny import TINY_WIDTHS
from torch import nn

from ctprune.pruning import prune
from cuda_ops import corner_pool as reference_pools
from detector import ARCHITECTURES, build_model, count_parameters, output_layers
from detector.channel_plan import apply_channel_plan
from detector.heads import HEADS, head_factory
from detector.models.centernet import HEATMAP_BIAS_INIT
from detector.original import convert_original_state_dict, import_original_checkpoint
from detector.triplet.heads import (
    CascadeCornerPool,
    CenterPoolBlock,
    TripletHeads,
    build_triplet_heads,
)

pytestmark = pytest.mark.timeout(60)

# Measured on the originals' own model classes for 80 classes, with parameter-free stand-ins
# for their compiled corner pooling: Duankaiwen/CenterNet models/CenterNet-52.py and
# CenterNet-104.py; zzzxxxttt/pytorch_simple_CenterNet_47 nets/hourglass.py
# (small_hourglass, large_hourglass) has the same counts under other module names.
ORIGINAL_PARAMETERS = {"centernet52": 104_844_152, "centernet104": 210_062_960}
# One stack's poolings + eight output heads in the originals (tl_cnvs ... ct_regrs).
ORIGINAL_HEAD_PARAMETERS = 11_181_304
FULL_DIMS, FULL_MODULES = [256, 256, 384, 384, 384, 512], [2, 2, 2, 2, 2, 4]
OUTPUT_NAMES = [
    "tl_heatmap", "br_heatmap", "ct_heatmap", "tl_embedding", "br_embedding",
    "tl_offset", "br_offset", "ct_offset",
]
TINY_HEAD_CONV = 8


def triplet_model(arch: str, num_classes: int = 3, head_conv: int | None = TINY_HEAD_CONV,
                  widths: dict | None = None) -> nn.Module:
    """An `ARCHITECTURES` model with triplet heads (through `build_model` once the head table
    has its ``triplet`` entry)."""
    if widths is None and head_conv is not None:
        widths = TINY_WIDTHS[arch.rstrip("0123456789")]
    if "triplet" in HEADS:
        return build_model(arch, num_classes, head="triplet", head_conv=head_conv, widths=widths)
    return ARCHITECTURES[arch](head_factory("triplet", num_classes), head_conv, widths, None)


@pytest.mark.parametrize("arch", sorted(ORIGINAL_PARAMETERS))
def test_full_size_parameter_count(arch):
    with torch.device("meta"):
        model = triplet_model(arch, 80, head_conv=None)
        heads = build_triplet_heads(256, 256, HEADS["triplet"].output_channels(80))
    assert count_parameters(model) == ORIGINAL_PARAMETERS[arch]
    assert count_parameters(heads) == ORIGINAL_HEAD_PARAMETERS
    assert len(model.heads) == (1 if arch == "centernet52" else 2)


def test_the_centernet_head_is_refused():
    with pytest.raises(ValueError, match="model.head: arch 'centernet52'.*'triplet'.*'centernet'"):
        build_model("centernet52", 3)


def test_bad_head_arguments_are_named():
    with pytest.raises(ValueError, match="in_channels must be at least 2.*got 1"):
        build_triplet_heads(1, 8, HEADS["triplet"].output_channels(3))
    with pytest.raises(ValueError, match="unknown outputs \\['heatmap'\\]"):
        build_triplet_heads(8, 8, {"heatmap": 3})


@pytest.mark.parametrize("arch", ["centernet52", "centernet104", "resunet18"])
def test_raw_outputs_in_train_and_eval(arch):
    model = triplet_model(arch)
    images = torch.randn(2, 3, 64, 128)
    stacks = 2 if arch == "centernet104" else 1
    channels = HEADS["triplet"].output_channels(3)
    expected = [{name: (2, channels[name], 16, 32) for name in OUTPUT_NAMES}] * stacks
    for mode in ("train", "eval"):
        getattr(model, mode)()
        outputs = model(images)
        assert [list(output) for output in outputs] == [OUTPUT_NAMES] * stacks
        assert [{k: tuple(v.shape) for k, v in output.items()} for output in outputs] == expected


def test_heatmaps_start_at_the_prior_and_outputs_are_declared():
    model = triplet_model("centernet104")
    for heads in model.heads:
        for name in ("tl_heatmap", "br_heatmap", "ct_heatmap"):
            assert torch.all(heads.heads[name][-1].bias == HEATMAP_BIAS_INIT)
    last_convs = {id(heads.heads[name][-1]) for heads in model.heads for name in OUTPUT_NAMES}
    assert {id(layer) for layer in output_layers(model)} == last_convs


def test_backward_reaches_every_parameter():
    model = triplet_model("resunet18").train()
    outputs = model(torch.randn(2, 3, 64, 64))
    sum(value.mean() for output in outputs for value in output.values()).backward()
    assert {name for name, p in model.named_parameters() if p.grad is None} == set()


def test_pruning_keeps_the_pooling_branches_coupled():
    """Channels added together are pruned together: the look and plain branches before each
    look conv, the two pooled branches, the fused branch and the shortcut."""
    torch.manual_seed(0)
    widths = {**TINY_WIDTHS["resunet"], "neck": [16, 16, 16]}  # 8-wide pooling branches
    model = triplet_model("resunet18", head_conv=16, widths=widths)
    with torch.no_grad():  # distinct filter norms, so l1 has something to rank
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.mul_(torch.rand(module.out_channels, 1, 1, 1) + 0.1)
    images = torch.randn(1, 3, 64, 64)
    before = {name: tuple(v.shape) for name, v in model.eval()(images)[0].items()}
    pruned = prune(
        model, 0.3, "l1", scope="layer", round_to=None, example_inputs=torch.zeros(1, 3, 64, 64)
    ).model.eval()
    assert {name: tuple(v.shape) for name, v in pruned(images)[0].items()} == before
    heads = pruned.heads
    assert isinstance(heads, TripletHeads)
    for pool in (heads.tl_pool, heads.br_pool, heads.ct_pool):
        assert pool.p_conv1.out_channels == pool.conv1.out_channels == pool.p_bn1.num_features
        assert pool.conv2.conv.in_channels == pool.p_conv1.out_channels
        assert pool.p1_conv1.conv.in_channels == pool.conv1.in_channels
    for pool in (heads.tl_pool, heads.br_pool):
        assert isinstance(pool, CascadeCornerPool)
        width = pool.P1_look_conv.out_channels
        assert width == pool.P2_look_conv.out_channels == pool.p_conv1.in_channels
        assert width < 8  # pruned
        assert pool.look_conv1.conv.out_channels == pool.p1_conv1.conv.out_channels
        assert pool.P1_look_conv.in_channels == pool.p1_conv1.conv.out_channels
        assert pool.look_conv2.conv.out_channels == pool.p2_conv1.conv.out_channels
        assert pool.P2_look_conv.in_channels == pool.p2_conv1.conv.out_channels
    center = heads.ct_pool
    assert isinstance(center, CenterPoolBlock)
    width = center.p1_conv1.conv.out_channels
    assert width == center.p2_conv1.conv.out_channels == center.p_conv1.in_channels < 8


@pytest.mark.parametrize("arch", ["centernet52", "hrcenternet_dla34"])
def test_a_pruned_model_is_rebuilt_from_its_channel_plan(arch):
    result = prune(triplet_model(arch).eval(), 0.3, "l1", round_to=None,
                   example_inputs=torch.zeros(1, 3, 64, 64))
    rebuilt = apply_channel_plan(triplet_model(arch), result.plan)
    rebuilt.load_state_dict(result.model.state_dict())
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        [expected], [actual] = result.model.eval()(images), rebuilt.eval()(images)
    for name in OUTPUT_NAMES:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)


# --- the originals, written from their descriptions, with their module names ----------------
# Duan et al.'s models/CenterNet-52.py (`pool`, `pool_cross`) on models/py_utils/kp.py (`kp`),
# and the simple CenterNet-47's nets/hourglass.py (`exkp`). Their pooling branches are a fixed
# 128 wide; here `pool_width`. Their pools are compiled ops; here the slow references.

POOL_REFERENCES = {
    "top": reference_pools.top_pool_reference,
    "bottom": reference_pools.bottom_pool_reference,
    "left": reference_pools.left_pool_reference,
    "right": reference_pools.right_pool_reference,
}


class OriginalCornerPool(nn.Module):
    def __init__(self, dim, pool_width, pool1, pool2, simple):
        super().__init__()
        self.p1_conv1 = OriginalConvolution(3, dim, pool_width)
        self.p2_conv1 = OriginalConvolution(3, dim, pool_width)
        self.p_conv1 = nn.Conv2d(pool_width, dim, 3, padding=1, bias=False)
        self.p_bn1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = OriginalConvolution(3, dim, dim)
        self.pool1, self.pool2 = POOL_REFERENCES[pool1], POOL_REFERENCES[pool2]
        self.look_conv1 = OriginalConvolution(3, dim, pool_width)
        self.look_conv2 = OriginalConvolution(3, dim, pool_width)
        look = ("p1_look_conv", "p2_look_conv") if simple else ("P1_look_conv", "P2_look_conv")
        for name in look:
            setattr(self, name, nn.Conv2d(pool_width, pool_width, 3, padding=1, bias=False))
        self.look = look

    def forward(self, x):
        look1, look2 = getattr(self, self.look[0]), getattr(self, self.look[1])
        pool1 = self.pool1(look1(self.p1_conv1(x) + self.pool2(self.look_conv1(x))))
        pool2 = self.pool2(look2(self.p2_conv1(x) + self.pool1(self.look_conv2(x))))
        p_bn1 = self.p_bn1(self.p_conv1(pool1 + pool2))
        return self.conv2(torch.relu(p_bn1 + self.bn1(self.conv1(x))))


class OriginalCenterPool(nn.Module):
    def __init__(self, dim, pool_width):
        super().__init__()
        self.p1_conv1 = OriginalConvolution(3, dim, pool_width)
        self.p2_conv1 = OriginalConvolution(3, dim, pool_width)
        self.p_conv1 = nn.Conv2d(pool_width, dim, 3, padding=1, bias=False)
        self.p_bn1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = OriginalConvolution(3, dim, dim)

    def forward(self, x):
        r = POOL_REFERENCES
        pool1 = r["bottom"](r["top"](self.p1_conv1(x)))
        pool2 = r["right"](r["left"](self.p2_conv1(x)))
        p_bn1 = self.p_bn1(self.p_conv1(pool1 + pool2))
        return self.conv2(torch.relu(p_bn1 + self.bn1(self.conv1(x))))


class SimpleKpModule(OriginalKpModule):
    """The simple CenterNet-47's kp_module: ``top`` / ``down`` / ``up`` for up1 / max1 / up2."""

    def __init__(self, n, dims, modules):
        super().__init__(n, dims, modules)
        self.top, self.down, self.up = self.up1, self.max1, self.up2
        del self.up1, self.max1, self.up2
        if n > 1:
            self.low2 = SimpleKpModule(n - 1, dims[1:], modules[1:])

    def forward(self, x):
        return self.top(x) + self.up(self.low3(self.low2(self.low1(self.down(x)))))


# (our output, Duan et al.'s module list, the simple CenterNet-47's, which pooling it reads)
ORIGINAL_HEADS = [
    ("tl_heatmap", "tl_heats", "hmap_tl", "tl"), ("br_heatmap", "br_heats", "hmap_br", "br"),
    ("ct_heatmap", "ct_heats", "hmap_ct", "ct"), ("tl_embedding", "tl_tags", "embd_tl", "tl"),
    ("br_embedding", "br_tags", "embd_br", "br"), ("tl_offset", "tl_regrs", "regs_tl", "tl"),
    ("br_offset", "br_regrs", "regs_br", "br"), ("ct_offset", "ct_regrs", "regs_ct", "ct"),
]


class OriginalTripletHourglass(nn.Module):
    """``kp`` (Duan et al.) or ``exkp`` (simple): the hourglass, per stack tl/br/ct poolings
    and eight ``make_kp_layer`` heads; returns one dict of our output names per stack."""

    def __init__(self, num_classes, stem, dims, modules, cnv, pool_width, stacks, simple):
        super().__init__()
        curr = dims[0]
        kp_module = SimpleKpModule if simple else OriginalKpModule
        self.pre = nn.Sequential(
            OriginalConvolution(7, 3, stem, stride=2), OriginalResidual(stem, curr, stride=2)
        )
        self.kps = nn.ModuleList([kp_module(len(dims) - 1, dims, modules) for _ in range(stacks)])
        self.cnvs = nn.ModuleList([OriginalConvolution(3, curr, cnv) for _ in range(stacks)])
        self.inters = nn.ModuleList([OriginalResidual(curr, curr) for _ in range(stacks - 1)])
        self.inters_ = nn.ModuleList([
            nn.Sequential(nn.Conv2d(curr, curr, 1, bias=False), nn.BatchNorm2d(curr))
            for _ in range(stacks - 1)
        ])
        self.cnvs_ = nn.ModuleList([
            nn.Sequential(nn.Conv2d(cnv, curr, 1, bias=False), nn.BatchNorm2d(curr))
            for _ in range(stacks - 1)
        ])
        self.pool_names = (
            {"tl": "cnvs_tl", "br": "cnvs_br", "ct": "cnvs_ct"}
            if simple
            else {"tl": "tl_cnvs", "br": "br_cnvs", "ct": "ct_cnvs"}
        )
        pools = {
            "tl": lambda: OriginalCornerPool(cnv, pool_width, "top", "left", simple),
            "br": lambda: OriginalCornerPool(cnv, pool_width, "bottom", "right", simple),
            "ct": lambda: OriginalCenterPool(cnv, pool_width),
        }
        for kind, name in self.pool_names.items():
            setattr(self, name, nn.ModuleList([pools[kind]() for _ in range(stacks)]))
        channels = HEADS["triplet"].output_channels(num_classes)
        self.head_names = []
        for ours, duan, simple_name, kind in ORIGINAL_HEADS:
            name = simple_name if simple else duan
            setattr(self, name, nn.ModuleList([
                nn.Sequential(
                    OriginalConvolution(3, cnv, curr, with_bn=False),
                    nn.Conv2d(curr, channels[ours], 1),
                )
                for _ in range(stacks)
            ]))
            self.head_names.append((ours, name, kind))
        self.relu = nn.ReLU(inplace=True)
        self.stacks = stacks

    def forward(self, image):
        inter = self.pre(image)
        outs = []
        for ind in range(self.stacks):
            cnv = self.cnvs[ind](self.kps[ind](inter))
            pooled = {kind: getattr(self, name)[ind](cnv) for kind, name in self.pool_names.items()}
            outs.append({
                ours: getattr(self, name)[ind](pooled[kind]) for ours, name, kind in self.head_names
            })
            if ind < self.stacks - 1:
                inter = self.inters[ind](self.relu(self.inters_[ind](inter) + self.cnvs_[ind](cnv)))
        return outs


def randomised_original(stacks: int, simple: bool, num_classes: int = 4) -> nn.Module:
    widths = TINY_WIDTHS["centernet"]
    torch.manual_seed(0)
    original = OriginalTripletHourglass(
        num_classes, widths["stem"], widths["dims"], widths["modules"], widths["cnv"],
        TINY_HEAD_CONV // 2, stacks, simple,
    )
    for module in original.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return original.eval()


@pytest.mark.parametrize("simple", [False, True], ids=["duan", "simple"])
@pytest.mark.parametrize("arch", sorted(ORIGINAL_PARAMETERS))
def test_original_keys_and_sizes_match_at_full_size(arch, simple):
    stacks = 1 if arch == "centernet52" else 2
    with torch.device("meta"):
        original = OriginalTripletHourglass(80, 128, FULL_DIMS, FULL_MODULES, 256, 128, stacks,
                                            simple)
        ours = triplet_model(arch, 80, head_conv=None)
    assert count_parameters(original) == ORIGINAL_PARAMETERS[arch]
    state_dict = {f"module.{k}": v for k, v in original.state_dict().items()}
    converted = convert_original_state_dict(state_dict, arch)
    assert {k: v.shape for k, v in converted.items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }


@pytest.mark.parametrize("simple", [False, True], ids=["duan", "simple"])
@pytest.mark.parametrize("arch", sorted(ORIGINAL_PARAMETERS))
def test_imported_weights_give_the_originals_outputs(arch, simple):
    stacks = 1 if arch == "centernet52" else 2
    original = randomised_original(stacks, simple)
    model = triplet_model(arch, 4)
    model.load_state_dict(convert_original_state_dict(original.state_dict(), arch))
    images = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        expected, actual = original(images), model.eval()(images)
    assert len(actual) == len(expected) == stacks
    for ours, theirs in zip(actual, expected, strict=True):
        for name in OUTPUT_NAMES:
            torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)


@pytest.mark.skipif("triplet" not in HEADS, reason="the head table's triplet entry is wired later")
def test_import_original_checkpoint_of_duan_et_al(tmp_path):
    from detector import load_model

    original = randomised_original(2, simple=False)
    path = tmp_path / "CenterNet-104_480000.pkl"
    torch.save({f"module.{k}": v for k, v in original.state_dict().items()}, path)
    widths = TINY_WIDTHS["centernet"]
    out = import_original_checkpoint(path, "centernet104", tmp_path / "imported.pt", widths=widths)
    model, checkpoint = load_model(out)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, actual = original(images), model.eval()(images)
    for ours, theirs in zip(actual, expected, strict=True):
        for name in OUTPUT_NAMES:
            torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)
    config = checkpoint.model_config
    assert (config.arch, config.head, config.num_classes) == ("centernet104", "triplet", 4)
    assert config.head_conv == TINY_HEAD_CONV and config.input.pad == 127


# --- HrCenterNet (lizhe960118/HrCenterNet models/HRNet.py, models/DLANet.py) -----------------

# Measured on its own model classes for 80 classes (HRNet.py hard-codes 4 classes: 21,566,000
# as committed), with stand-ins for its compiled corner pooling and DCNv2; DLANet.py without
# the unused ImageNet classifier `base.fc` (27,465,344 with it).
HRCENTERNET_PARAMETERS = {"hrcenternet_w18": 21_627_788, "hrcenternet_dla34": 26_952_344}


class OriginalHrCenterNetHead(nn.Module):
    """HrCenterNet's single-stack head modules: ``cnvs`` (3x3 conv + BN + ReLU), the three
    poolings and the eight ``make_kp_layer`` heads, without a stack index."""

    def __init__(self, in_channels, cnv, curr, num_classes):
        super().__init__()
        self.cnvs = OriginalConvolution(3, in_channels, cnv)
        self.tl_cnvs = OriginalCornerPool(cnv, cnv // 2, "top", "left", simple=False)
        self.br_cnvs = OriginalCornerPool(cnv, cnv // 2, "bottom", "right", simple=False)
        self.ct_cnvs = OriginalCenterPool(cnv, cnv // 2)
        channels = HEADS["triplet"].output_channels(num_classes)
        self.names = [(ours, duan, kind) for ours, duan, _, kind in ORIGINAL_HEADS]
        for ours, duan, _ in self.names:
            setattr(self, duan, nn.Sequential(
                OriginalConvolution(3, cnv, curr, with_bn=False), nn.Conv2d(curr, channels[ours], 1)
            ))

    def heads(self, features):
        cnv = self.cnvs(features)
        pooled = {"tl": self.tl_cnvs(cnv), "br": self.br_cnvs(cnv), "ct": self.ct_cnvs(cnv)}
        return {ours: getattr(self, duan)(pooled[kind]) for ours, duan, kind in self.names}


class OriginalHrNet(OriginalHrCenterNetHead):
    """HRNet.py's ``hr``: ``pre`` (conv, BN, conv, BN, ReLU: no ReLU between the convs), the
    HRNet stages at the top level (their blocks taken from our trunk, whose release names they
    share), the bilinear concatenation, then the head. Its forward is HRNet.py's ``_train``."""

    def __init__(self, widths, num_classes):
        from detector.models.hrnet import HRNetTrunk

        branches = widths["branches"]
        super().__init__(sum(branches), widths["neck"], sum(branches), num_classes)
        stem = widths["stem"]
        self.pre = nn.Sequential(
            nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem),
            nn.Conv2d(stem, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),
        )
        trunk = HRNetTrunk(stem, widths["stage1"], tuple(branches), tuple(widths["modules"]),
                           widths["blocks"])
        for name in ("layer1", "transition1", "transition2", "transition3", "stage2", "stage3",
                     "stage4"):
            setattr(self, name, getattr(trunk, name))

    def forward(self, image):
        branches = [self.layer1(self.pre(image))]
        for stage in (2, 3, 4):
            transition = getattr(self, f"transition{stage - 1}")
            # HRNet.py: a branch with a transition reads the last branch, one without keeps its own
            branches = [
                branches[i] if isinstance(t, nn.Identity) else t(branches[-1])
                for i, t in enumerate(transition)
            ]
            branches = getattr(self, f"stage{stage}")(branches)
        size = branches[0].shape[2:]
        upsampled = [torch.nn.functional.interpolate(x, size=size, mode="bilinear")
                     for x in branches[1:]]
        return [self.heads(torch.cat([branches[0], *upsampled], 1))]


class OriginalDlaNet(OriginalHrCenterNetHead):
    """DLANet.py's ``DLASeg``: ``base``, ``dla_up``, ``ida_up`` (pose_dla_dcn's, taken from our
    DLA-34 whose names they share), then the head on the neck's stride-4 map."""

    def __init__(self, widths, num_classes):
        from detector.models import dla

        channels = widths["channels"]
        super().__init__(channels[2], widths["cnv"], channels[2], num_classes)
        self.base = dla.DLATrunk(channels)
        neck = dla.DLANeck(channels)
        self.dla_up, self.ida_up = neck.dla_up, neck.ida_up
        self.neck = [neck]  # its forward, without registering its modules twice

    def forward(self, image):
        return [self.heads(self.neck[0](self.base(image)))]


HRCENTERNET_ORIGINALS = {"hrcenternet_w18": OriginalHrNet, "hrcenternet_dla34": OriginalDlaNet}


@pytest.mark.parametrize("arch", sorted(HRCENTERNET_PARAMETERS))
def test_hrcenternet_full_size_parameter_count(arch):
    with torch.device("meta"):
        model = triplet_model(arch, 80, head_conv=None)
    assert count_parameters(model) == HRCENTERNET_PARAMETERS[arch]
    with pytest.raises(ValueError, match=f"model.head: arch '{arch}'"):
        build_model(arch, 80)


@pytest.mark.parametrize("arch", sorted(HRCENTERNET_PARAMETERS))
def test_hrcenternet_raw_outputs_in_train_and_eval(arch):
    model = triplet_model(arch)
    channels = HEADS["triplet"].output_channels(3)
    expected = [{name: (2, channels[name], 16, 24) for name in OUTPUT_NAMES}]
    for mode in ("train", "eval"):
        outputs = getattr(model, mode)()(torch.randn(2, 3, 64, 96))
        assert [{k: tuple(v.shape) for k, v in output.items()} for output in outputs] == expected
        assert list(outputs[0]) == OUTPUT_NAMES


@pytest.mark.parametrize("arch", sorted(HRCENTERNET_PARAMETERS))
def test_hrcenternet_imported_weights_give_the_originals_outputs(arch):
    widths = TINY_WIDTHS[arch.rstrip("0123456789")]
    torch.manual_seed(0)
    original = HRCENTERNET_ORIGINALS[arch](widths, 4)
    for module in original.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    state_dict = {f"module.{k}": v for k, v in original.state_dict().items()}
    if arch == "hrcenternet_dla34":  # kept by DLANet.py's ImageNet start, dropped on import
        state_dict["module.base.fc.weight"] = torch.zeros(10, widths["channels"][-1], 1, 1)
        state_dict["module.base.fc.bias"] = torch.zeros(10)
    model = triplet_model(arch, 4, head_conv=None, widths=widths)
    model.load_state_dict(convert_original_state_dict(state_dict, arch))
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        [expected], [actual] = original.eval()(images), model.eval()(images)
    for name in OUTPUT_NAMES:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)
