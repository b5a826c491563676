"""Hourglass-104: sizes, the two stacks, original checkpoints (tiny widths, 64 px). Pruning:
test_pruning_invariants.py."""

import pytest
import torch
from test_pruning_invariants import IMAGES
from tiny import TINY_HEAD_CONV, TINY_WIDTHS, TinyDetectionData, tiny_config, tiny_model
from torch import nn

from detector import count_macs, count_parameters, load_model, output_layers
from detector.inference.decode import decode_centernet
from detector.inference.predictor import detect
from detector.losses import centernet_loss
from detector.models import build_model
from detector.original import convert_original_state_dict, import_original_checkpoint

pytestmark = pytest.mark.timeout(60)

ARCH = "hourglass104"


def all_outputs(model: nn.Module, images: torch.Tensor = IMAGES) -> list[dict]:
    model.eval()
    with torch.no_grad():
        return model(images)


def test_full_size_matches_the_original():
    with torch.device("meta"):
        model = build_model(ARCH, 80)
    assert count_parameters(model) == 191_284_008  # the original's large_hourglass
    # the original's per-stack head sizes: 3x3 conv 256 -> 256 (bias) + 1x1 conv, two stacks
    heads = sum(p.numel() for p in model.heads.parameters())
    assert heads == 2 * sum(256 * 256 * 9 + 256 + 256 * out + out for out in (80, 2, 2))
    assert heads == 3_583_656
    assert len(output_layers(model)) == 6


def test_last_stack_only_when_asked_skips_stack_zero_heads():
    model = tiny_model(ARCH).eval()
    both = all_outputs(model)
    last = model(IMAGES, head_stacks="last")
    assert len(last) == 1
    for name, value in both[-1].items():
        assert torch.equal(last[0][name], value)
    # Stack 0's three heads at 16 x 16 cost, by hand: a 3x3 conv 8 -> 8 each, then 1x1 convs to
    # 3 + 2 + 2 channels.
    cells = 16 * 16
    head_macs = 3 * 9 * 8 * TINY_HEAD_CONV * cells + TINY_HEAD_CONV * (3 + 2 + 2) * cells
    macs_all = count_macs(model, (64, 64))
    model.head_stacks = "last"
    assert count_macs(model, (64, 64)) == macs_all - head_macs
    with pytest.raises(ValueError, match="head_stacks: expected one of"):
        model(IMAGES, head_stacks="first")


def test_detection_decodes_the_last_stack():
    model = tiny_model(ARCH).eval()
    with torch.no_grad():
        last_only = decode_centernet(model(IMAGES, head_stacks="last")[0], max_detections=10)
    assert torch.equal(detect(model, IMAGES, max_detections=10), last_only)


def test_the_predictor_computes_only_the_last_stacks_heads():
    from detector.inference.predictor import Predictor

    model = tiny_model(ARCH)
    predictor = Predictor(model, tiny_config(ARCH), device="cpu")
    assert predictor.model.head_stacks == "last"
    with torch.no_grad():
        assert len(predictor.model(IMAGES)) == 1


def test_features_are_each_stacks_head_input():
    model = tiny_model(ARCH).eval()
    outputs = model(IMAGES, return_features=True)
    for stack, output in enumerate(outputs):
        assert torch.equal(output["heatmap"], model.heads[stack]["heatmap"](output["features"]))


def test_loss_is_averaged_over_the_stacks():
    torch.manual_seed(0)
    data = TinyDetectionData(2)
    batch = {key: torch.stack([item[key] for item in data]) for key in data[0]}
    outputs = tiny_model(ARCH).train()(batch["image"])
    total, terms = centernet_loss(outputs, batch)
    per_stack = [centernet_loss([output], batch) for output in outputs]
    assert torch.allclose(total, (per_stack[0][0] + per_stack[1][0]) / 2)
    assert not torch.allclose(per_stack[0][0], per_stack[1][0])  # the average is not trivial


@pytest.mark.parametrize(
    "widths, message",
    [
        ({"levels": 3}, "unknown keys"),
        ({"dims": [8]}, "dims .* at least 2"),
        ({"dims": [8, 8, 16], "modules": [1, 1]}, "one per entry"),
        ({"dims": [8, 8], "modules": [1, 0]}, "widths.modules: expected a list of positive"),
    ],
)
def test_bad_widths_are_named(widths, message):
    with pytest.raises(ValueError, match=message):
        build_model(ARCH, 3, widths=widths)


def test_pretrained_is_refused_with_the_way_to_start():
    with pytest.raises(ValueError, match="no ImageNet trunk weights.*import-original"):
        build_model(ARCH, 3, pretrained="x.pth")


# --- the original's large_hourglass, written from its description, with its module names ----


class OriginalConvolution(nn.Module):
    def __init__(self, k, inp, out, stride=1, with_bn=True):
        super().__init__()
        self.conv = nn.Conv2d(inp, out, k, stride=stride, padding=(k - 1) // 2, bias=not with_bn)
        self.bn = nn.BatchNorm2d(out) if with_bn else nn.Sequential()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class OriginalResidual(nn.Module):
    def __init__(self, inp, out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        shortcut = stride != 1 or inp != out
        self.skip = (
            nn.Sequential(nn.Conv2d(inp, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            if shortcut
            else nn.Sequential()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.skip(x))


class OriginalKpModule(nn.Module):
    def __init__(self, n, dims, modules):
        super().__init__()
        curr, nxt = dims[0], dims[1]
        self.up1 = nn.Sequential(*[OriginalResidual(curr, curr) for _ in range(modules[0])])
        self.max1 = nn.Sequential()
        self.low1 = nn.Sequential(
            OriginalResidual(curr, nxt, stride=2),
            *[OriginalResidual(nxt, nxt) for _ in range(modules[0] - 1)],
        )
        if n > 1:
            self.low2 = OriginalKpModule(n - 1, dims[1:], modules[1:])
        else:
            self.low2 = nn.Sequential(*[OriginalResidual(nxt, nxt) for _ in range(modules[1])])
        self.low3 = nn.Sequential(
            *[OriginalResidual(nxt, nxt) for _ in range(modules[0] - 1)],
            OriginalResidual(nxt, curr),
        )
        self.up2 = nn.Upsample(scale_factor=2)

    def forward(self, x):
        return self.up1(x) + self.up2(self.low3(self.low2(self.low1(self.max1(x)))))


class OriginalHourglass(nn.Module):
    """exkp with heads {hm, wh, reg}, returning one dict per stack."""

    def __init__(self, num_classes, stem, dims, modules, cnv, stacks=2):
        super().__init__()
        curr = dims[0]
        self.pre = nn.Sequential(
            OriginalConvolution(7, 3, stem, stride=2), OriginalResidual(stem, curr, stride=2)
        )
        self.kps = nn.ModuleList(
            [OriginalKpModule(len(dims) - 1, dims, modules) for _ in range(stacks)]
        )
        self.cnvs = nn.ModuleList([OriginalConvolution(3, curr, cnv) for _ in range(stacks)])
        self.inters = nn.ModuleList([OriginalResidual(curr, curr) for _ in range(stacks - 1)])
        self.inters_ = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(curr, curr, 1, bias=False), nn.BatchNorm2d(curr))
                for _ in range(stacks - 1)
            ]
        )
        self.cnvs_ = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(cnv, curr, 1, bias=False), nn.BatchNorm2d(curr))
                for _ in range(stacks - 1)
            ]
        )
        self.heads = {"hm": num_classes, "wh": 2, "reg": 2}
        for head, channels in self.heads.items():
            layers = nn.ModuleList(
                [
                    nn.Sequential(
                        OriginalConvolution(3, cnv, curr, with_bn=False),
                        nn.Conv2d(curr, channels, 1),
                    )
                    for _ in range(stacks)
                ]
            )
            self.__setattr__(head, layers)
        self.relu = nn.ReLU(inplace=True)
        self.stacks = stacks

    def forward(self, image):
        inter = self.pre(image)
        outs = []
        for ind in range(self.stacks):
            cnv = self.cnvs[ind](self.kps[ind](inter))
            outs.append({head: getattr(self, head)[ind](cnv) for head in self.heads})
            if ind < self.stacks - 1:
                inter = self.relu(self.inters_[ind](inter) + self.cnvs_[ind](cnv))
                inter = self.inters[ind](inter)
        return outs


def test_original_keys_and_sizes_match_at_full_size():
    with torch.device("meta"):
        original = OriginalHourglass(
            80, 128, [256, 256, 384, 384, 384, 512], [2, 2, 2, 2, 2, 4], 256
        )
        ours = build_model(ARCH, 80)
    assert count_parameters(original) == 191_284_008
    converted = convert_original_state_dict(
        {f"module.{k}": v for k, v in original.state_dict().items()}, ARCH
    )
    assert {k: v.shape for k, v in converted.items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }


def test_imported_original_checkpoint_gives_the_original_outputs(tmp_path):
    widths = TINY_WIDTHS["hourglass"]
    torch.manual_seed(0)
    original = OriginalHourglass(
        4, widths["stem"], widths["dims"], widths["modules"], widths["cnv"]
    )
    for module in original.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    state_dict = {f"module.{k}": v for k, v in original.state_dict().items()}
    path = tmp_path / "ctdet_coco_hg.pth"
    torch.save({"epoch": 50, "state_dict": state_dict}, path)
    out = import_original_checkpoint(path, ARCH, tmp_path / "imported.pt", widths=widths)
    model, checkpoint = load_model(out)
    images = torch.randn(1, 3, 64, 128)
    expected, actual = all_outputs(original, images), all_outputs(model, images)
    assert len(actual) == len(expected) == 2
    for ours, theirs in zip(actual, expected, strict=True):
        for name, original_name in (("heatmap", "hm"), ("wh", "wh"), ("offset", "reg")):
            torch.testing.assert_close(ours[name], theirs[original_name], rtol=0, atol=0)
    config = checkpoint.model_config
    assert (config.arch, config.num_classes, config.head_conv) == (ARCH, 4, widths["dims"][0])
    assert config.input.color_order == "BGR" and config.input.pad == 127
