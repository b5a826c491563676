"""MobileNetV3-Large CenterNet: sizes, torchvision weights from a local file. Pruning:
test_pruning_invariants.py."""

import pytest
import torch
import torchvision
from tiny import TINY_WIDTHS, tiny_model
from torch import nn

from detector import build_model, count_parameters

pytestmark = pytest.mark.timeout(60)

ARCH = "mobilenet_v3_large"
# Pinned size for 80 classes: torchvision's trunk (2,971,952), the neck and the heads below.
PARAMETERS = 4_305_220


def test_full_size_parameter_count_and_torchvision_keys():
    with torch.device("meta"):
        model = build_model(ARCH, 80)
        reference = torchvision.models.mobilenet_v3_large(weights=None)
    expected = {k: v.shape for k, v in reference.state_dict().items() if k.startswith("features.")}
    assert {k: v.shape for k, v in model.backbone.state_dict().items()} == expected
    assert count_parameters(model.backbone) == 2_971_952
    # neck: 3x3 convs 960 -> 128 -> 64 -> 64 (no bias) + BN; heads: 3x3 conv 64 + 1x1
    neck = sum(a * b * 9 + 2 * b for a, b in ((960, 128), (128, 64), (64, 64)))
    assert count_parameters(model.neck) == neck
    heads = sum(64 * 64 * 9 + 64 + 64 * out + out for out in (80, 2, 2))
    assert count_parameters(model) == 2_971_952 + neck + heads == PARAMETERS


def _torchvision_weights(tmp_path, width_mult: float):
    """A torchvision mobilenet_v3_large state dict (classifier included) saved to tmp_path,
    with non-default BatchNorm statistics so that loading them shows."""
    torch.manual_seed(0)
    source = torchvision.models.mobilenet_v3_large(weights=None, width_mult=width_mult)
    for module in source.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "mobilenet_v3_large-8738ca79.pth"
    torch.save(source.state_dict(), path)
    return source, path


def test_pretrained_loads_torchvision_weights_from_a_local_file(tmp_path):
    source, path = _torchvision_weights(tmp_path, TINY_WIDTHS[ARCH]["width_mult"])
    model = tiny_model(ARCH, pretrained=path).eval()
    state = model.backbone.state_dict()
    for name, value in source.state_dict().items():
        if name.startswith("features."):
            assert torch.equal(state[name], value)
    # The trunk computes torchvision's features.
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(images), source.eval().features(images))


def test_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tiny_model(ARCH, pretrained=tmp_path / "missing.pth")
    _, path = _torchvision_weights(tmp_path, 0.5)  # another width
    with pytest.raises(ValueError, match="8738ca79.pth do not fit.*wrong shapes.*width_mult"):
        tiny_model(ARCH, pretrained=path)
    resnet = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, resnet)
    with pytest.raises(ValueError, match="resnet18.pth do not fit.*missing"):
        tiny_model(ARCH, pretrained=resnet)
    garbage = tmp_path / "notes.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth: not a readable state dict"):
        tiny_model(ARCH, pretrained=garbage)


@pytest.mark.parametrize(
    "widths, message",
    [
        ({"width": 1.0}, "unknown keys"),
        ({"neck": [64, 64]}, "widths.neck: expected 3 positive integers"),
        ({"width_mult": 0}, "positive number"),
    ],
)
def test_bad_widths_are_named(widths, message):
    with pytest.raises(ValueError, match=message):
        build_model(ARCH, 3, widths=widths)
