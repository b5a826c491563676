import os

import pytest
import torch
import torch_pruning as tp
from tiny import tiny_config
from torch import nn

from detector import (
    CheckpointError,
    ModelConfig,
    apply_channel_plan,
    input_preset,
    layer_widths,
    load_model,
    output_layers,
    read_checkpoint,
    save_checkpoint,
)
from detector.checkpoint import FORMAT_VERSION, atomic_save, build_from_config
from detector.config import to_dict

IMAGES = torch.randn(2, 3, 64, 64)


def _outputs(model):
    model.eval()
    with torch.no_grad():
        return model(IMAGES)[0]


def _assert_same_outputs(a, b):
    for key, value in _outputs(a).items():
        torch.testing.assert_close(_outputs(b)[key], value, rtol=0, atol=0)


def _randomise_bn(model):
    """Non-trivial BN statistics, so a wrong mapping of channels would show in the outputs."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)


def test_unpruned_round_trip(tmp_path):
    config = tiny_config()
    model = build_from_config(config)
    _randomise_bn(model)
    path = save_checkpoint(tmp_path / "model.pt", model, config, meta={"epoch": 3, "ap50": 0.5})
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "model_config", "channel_plan", "state_dict", "meta"}
    assert raw["format"] == FORMAT_VERSION and raw["channel_plan"] is None
    loaded, checkpoint = load_model(path)
    assert checkpoint.model_config == config
    assert checkpoint.meta == {"epoch": 3, "ap50": 0.5}
    _assert_same_outputs(model, loaded)


def test_input_spec_survives_the_round_trip(tmp_path):
    config = tiny_config()
    config.input = input_preset("centernet", (64, 64))
    path = save_checkpoint(tmp_path / "model.pt", build_from_config(config), config)
    spec = read_checkpoint(path).model_config.input
    assert spec.color_order == "BGR" and spec.keep_resolution and spec.pad == 31
    assert spec.mean == pytest.approx((0.40789654, 0.44719302, 0.47026115))


def test_hand_written_plan_round_trip(tmp_path):
    """Generic resizing: narrow a residual block's inside, the neck and a head by hand."""
    config = tiny_config()
    plan = {
        "backbone.layer1.0.conv1": [8, 5],
        "backbone.layer1.0.bn1": [5],
        "backbone.layer1.0.conv2": [5, 8],
        "neck.3": [16, 12],
        "neck.4": [12],
        "neck.6": [12, 16],
        "heads.wh.0": [16, 3],
        "heads.wh.2": [3, 2],
    }
    model = apply_channel_plan(build_from_config(config), plan)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, std=0.1)
    _randomise_bn(model)
    path = save_checkpoint(tmp_path / "pruned.pt", model, config)
    assert read_checkpoint(path).channel_plan == plan
    loaded, _ = load_model(path)
    _assert_same_outputs(model, loaded)


def test_torch_pruning_result_round_trip(tmp_path):
    config = tiny_config()
    model = build_from_config(config)
    _randomise_bn(model)
    pruner = tp.pruner.BasePruner(
        model,
        torch.randn(1, 3, 64, 64),
        tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.4,
        ignored_layers=output_layers(model),
    )
    pruner.step()
    path = save_checkpoint(tmp_path / "pruned.pt", model, config)
    checkpoint = read_checkpoint(path)
    assert checkpoint.channel_plan and len(checkpoint.channel_plan) > 10
    loaded, _ = load_model(path)
    assert layer_widths(loaded) == layer_widths(model)
    _assert_same_outputs(model, loaded)


def test_wrapped_models_save_without_prefixes(tmp_path):
    config = tiny_config()
    model = build_from_config(config)
    path = save_checkpoint(tmp_path / "model.pt", nn.DataParallel(model), config)
    assert all(not key.startswith("module.") for key in read_checkpoint(path).state_dict)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_save({"value": torch.ones(3)}, path)

    def broken_save(obj, file):
        file.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"value": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.ones(3))
    assert os.listdir(tmp_path) == ["model.pt"]


def test_meta_must_be_plain(tmp_path):
    config = tiny_config()
    with pytest.raises(TypeError, match="meta.optimizer"):
        save_checkpoint(
            tmp_path / "m.pt", build_from_config(config), config, meta={"optimizer": object()}
        )


def _save_raw(tmp_path, data, name="raw.pt"):
    path = tmp_path / name
    torch.save(data, path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: no such"):
        read_checkpoint(tmp_path / "nope.pt")


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt: not a PyTorch checkpoint"):
        read_checkpoint(path)


def test_pickled_module_is_refused(tmp_path):
    path = _save_raw(tmp_path, build_from_config(tiny_config()))
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        read_checkpoint(path)


def test_plain_state_dict_is_not_a_checkpoint(tmp_path):
    path = _save_raw(tmp_path, build_from_config(tiny_config()).state_dict())
    with pytest.raises(CheckpointError, match="not a ctprune checkpoint"):
        read_checkpoint(path)


def test_original_centernet_checkpoint_gets_a_hint(tmp_path):
    path = _save_raw(tmp_path, {"epoch": 1, "state_dict": {"module.hm.2.bias": torch.zeros(80)}})
    with pytest.raises(CheckpointError, match="import-original"):
        read_checkpoint(path)


def test_newer_format_is_refused(tmp_path):
    path = _save_raw(tmp_path, {"format": FORMAT_VERSION + 1, "model_config": {}, "state_dict": {}})
    with pytest.raises(CheckpointError, match="newer"):
        read_checkpoint(path)


def test_architecture_and_class_count_mismatch(tmp_path):
    config = tiny_config()
    path = save_checkpoint(tmp_path / "m.pt", build_from_config(config), config)
    with pytest.raises(CheckpointError, match="arch 'res18', expected 'res50'"):
        load_model(path, arch="res50")
    with pytest.raises(CheckpointError, match="3 classes, expected 80"):
        load_model(path, num_classes=80)


def test_weights_that_do_not_fit_are_named(tmp_path):
    config = tiny_config()
    model = build_from_config(config)
    wrong = ModelConfig(**{**config.__dict__, "num_classes": 5})
    data = {
        "format": FORMAT_VERSION,
        "model_config": to_dict(wrong),
        "channel_plan": None,
        "state_dict": model.state_dict(),
        "meta": {},
    }
    with pytest.raises(
        CheckpointError, match=r"heads.heatmap.2.weight \(3, 8, 1, 1\) vs \(5, 8, 1, 1\)"
    ):
        load_model(_save_raw(tmp_path, data))


@pytest.mark.parametrize(
    "plan, message",
    [
        ({"backbone.layer9.conv": [3, 4]}, "not a layer"),
        ({"backbone.relu": [3]}, "has no widths"),
        ({"backbone.bn1": [3, 4]}, "expected 1 positive widths"),
        ({"backbone.conv1": [3, 0]}, "expected 2 positive widths"),
    ],
)
def test_plans_that_do_not_fit_the_architecture(plan, message):
    with pytest.raises(ValueError, match=message):
        apply_channel_plan(build_from_config(tiny_config()), plan)


def test_unknown_model_config_keys_are_named(tmp_path):
    data = {
        "format": FORMAT_VERSION,
        "model_config": {**to_dict(tiny_config()), "depth": 18},
        "state_dict": {},
    }
    with pytest.raises(CheckpointError, match="unknown keys \\['depth'\\]"):
        read_checkpoint(_save_raw(tmp_path, data))
