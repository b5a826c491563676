"""Importing checkpoints of the original CenterNet code."""

import pytest
import torch
import torchvision
from torch import nn

from detector import CheckpointError, load_model
from detector.original import import_original_checkpoint


class OriginalMsraResNet(nn.Module):
    """The original msra_resnet's module names and structure (`res_18`): a torchvision trunk
    at the top level, `deconv_layers`, and heads `hm`, `wh`, `reg` returning raw outputs."""

    def __init__(self, num_classes: int, head_conv: int = 64):
        super().__init__()
        trunk = torchvision.models.resnet18(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(trunk, name))
        layers, in_channels = [], 512
        for _ in range(3):
            layers += [
                nn.ConvTranspose2d(in_channels, 256, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(256),
                nn.ReLU(inplace=True),
            ]
            in_channels = 256
        self.deconv_layers = nn.Sequential(*layers)
        for head, channels in sorted({"hm": num_classes, "wh": 2, "reg": 2}.items()):
            if head_conv > 0:
                module = nn.Sequential(
                    nn.Conv2d(256, head_conv, 3, padding=1, bias=True),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(head_conv, channels, 1),
                )
            else:
                module = nn.Conv2d(256, channels, 1)
            self.add_module(head, module)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.deconv_layers(x)
        return [{head: getattr(self, head)(x) for head in ("hm", "wh", "reg")}]


def _original_checkpoint(tmp_path, num_classes=4, head_conv=64, data_parallel=True):
    original = OriginalMsraResNet(num_classes, head_conv)
    for module in original.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
        if isinstance(module, nn.ConvTranspose2d):
            nn.init.normal_(module.weight, std=0.05)
    prefix = "module." if data_parallel else ""
    state_dict = {prefix + k: v for k, v in original.state_dict().items()}
    path = tmp_path / "model_last.pth"
    torch.save({"epoch": 70, "state_dict": state_dict, "optimizer": {"lr": 1.25e-4}}, path)
    return original.eval(), path


@pytest.mark.parametrize("head_conv, data_parallel", [(64, True), (0, False)])
def test_imported_model_gives_the_original_outputs(tmp_path, head_conv, data_parallel):
    original, path = _original_checkpoint(
        tmp_path, head_conv=head_conv, data_parallel=data_parallel
    )
    out = import_original_checkpoint(path, "res18", tmp_path / "imported.pt")
    model, checkpoint = load_model(out)
    model.eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = original(images)[0]
        actual = model(images)[0]
    for ours, theirs in (("heatmap", "hm"), ("wh", "wh"), ("offset", "reg")):
        torch.testing.assert_close(actual[ours], expected[theirs], rtol=0, atol=0)
    config = checkpoint.model_config
    assert (config.arch, config.num_classes, config.head_conv) == ("res18", 4, head_conv)
    assert config.input.color_order == "BGR" and config.input.keep_resolution
    assert checkpoint.meta["original_epoch"] == 70


def test_wrong_architecture_is_named(tmp_path):
    _, path = _original_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="model_last.pth \\(as an original 'res50'\\)"):
        import_original_checkpoint(path, "res50", tmp_path / "x.pt")


def test_unsupported_family_and_non_ctdet_files(tmp_path):
    _, path = _original_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="not supported yet"):
        import_original_checkpoint(path, "vgg16", tmp_path / "x.pt")
    other = tmp_path / "other.pth"
    torch.save({"epoch": 1, "state_dict": {"conv1.weight": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError, match="other.pth: no heatmap head"):
        import_original_checkpoint(other, "res18", tmp_path / "x.pt")
