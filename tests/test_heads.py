"""The head table: one entry selects a model's outputs, targets, loss and decoder, and every
stage (build_model, checkpoints, dataset, evaluation, predictor, export) looks it up there."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tiny import TINY_HEAD_CONV, TINY_WIDTHS, tiny_config, tiny_model

from detector import build_model, output_layers, read_checkpoint, save_checkpoint
from detector.config import ConfigError, ModelConfig, from_dict
from detector.data.dataset import CenterNetDataset, collate
from detector.data.records import DetectionSource, ImageRecord
from detector.evaluate.config import EvaluateConfig
from detector.evaluate.run import predict_source
from detector.export import DeployModel
from detector.heads import HEADS, NUM_CLASSES, HeadType
from detector.inference.decode import ctdet_decode, decode_centernet
from detector.inference.predictor import Predictor, detect
from detector.losses import centernet_loss
from detector.models.centernet import HEATMAP_BIAS_INIT
from detector.targets import encode_targets

ROOT = Path(__file__).resolve().parents[1]
IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_centernet_entry() -> None:
    centernet = HEADS["centernet"]
    assert centernet.outputs == {"heatmap": NUM_CLASSES, "wh": 2, "offset": 2}
    assert centernet.output_channels(5) == {"heatmap": 5, "wh": 2, "offset": 2}
    assert centernet.encode_targets is encode_targets
    assert centernet.loss is centernet_loss
    assert centernet.decode is decode_centernet
    with pytest.raises(dataclasses.FrozenInstanceError):
        centernet.loss = None


def test_model_config_head_defaults_to_centernet() -> None:
    assert ModelConfig().head == "centernet"
    assert from_dict(ModelConfig, {"arch": "res18"}, "model").head == "centernet"


def test_unknown_head_is_a_config_error_naming_the_key_and_the_known_heads() -> None:
    with pytest.raises(ConfigError, match=r"^model\.head: unknown head type 'yolo'.*centernet"):
        from_dict(ModelConfig, {"head": "yolo"}, "model")
    with pytest.raises(ValueError, match="unknown head type 'yolo'; known head types: centernet"):
        build_model("res18", 3, head="yolo")
    with pytest.raises(ValueError, match="known head types: centernet, ttfnet"):
        DeployModel(tiny_model(), tiny_config().input, head="yolo")
    with pytest.raises(ValueError, match="known head types: centernet"):
        CenterNetDataset([], 3, tiny_config().input, train=False, head="yolo")


@pytest.fixture
def probe_head(monkeypatch):
    """A head type "probe": CenterNet's functions, counted, plus a 4-channel ``ltrb`` output,
    the shape of a TTFNet entry."""
    calls: list[str] = []

    def counted(name, function):
        def call(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)

        return call

    def loss(outputs, targets):
        return centernet_loss([{k: v for k, v in o.items() if k != "ltrb"} for o in outputs],
                              targets)

    probe = HeadType(
        outputs={"heatmap": NUM_CLASSES, "wh": 2, "offset": 2, "ltrb": 4},
        encode_targets=counted("encode_targets", encode_targets),
        loss=counted("loss", loss),
        decode=counted("decode", decode_centernet),
    )
    monkeypatch.setitem(HEADS, "probe", probe)
    return calls


def probe_model():
    return build_model(
        "res18", 3, head="probe", head_conv=TINY_HEAD_CONV, widths=TINY_WIDTHS["res"]
    ).eval()


def probe_config() -> ModelConfig:
    return dataclasses.replace(tiny_config(), head="probe")


def test_build_model_builds_the_heads_of_the_table(probe_head) -> None:
    model = probe_model()
    [outputs] = model(IMAGES)
    shapes = {name: tuple(tensor.shape) for name, tensor in outputs.items()}
    assert shapes == {"heatmap": (2, 3, 16, 16), "wh": (2, 2, 16, 16),
                      "offset": (2, 2, 16, 16), "ltrb": (2, 4, 16, 16)}
    assert torch.all(model.heads["heatmap"][-1].bias == HEATMAP_BIAS_INIT)
    assert torch.all(model.heads["ltrb"][-1].bias == 0)  # a regression head: msra init
    assert {id(layer) for layer in output_layers(model)} >= {
        id(head[-1]) for head in model.heads.values()
    }


def test_centernet_heads_keep_their_order_and_widths() -> None:
    model = build_model("res18", 3, head_conv=8, widths=TINY_WIDTHS["res"])
    widths = {name: head[-1].out_channels for name, head in model.heads.items()}
    assert widths == {"heatmap": 3, "wh": 2, "offset": 2}  # build order: state dict order


def test_checkpoint_keeps_the_head_and_old_checkpoints_are_centernet(probe_head, tmp_path):
    save_checkpoint(tmp_path / "probe.pt", probe_model(), probe_config())
    checkpoint = read_checkpoint(tmp_path / "probe.pt")
    assert checkpoint.model_config.head == "probe"
    assert "heads.ltrb.0.weight" in checkpoint.state_dict

    save_checkpoint(tmp_path / "old.pt", tiny_model(), tiny_config())
    data = torch.load(tmp_path / "old.pt", weights_only=True)
    del data["model_config"]["head"]  # written before model.head existed
    torch.save(data, tmp_path / "old.pt")
    assert read_checkpoint(tmp_path / "old.pt").model_config.head == "centernet"


def test_detect_and_the_predictor_decode_with_the_heads_decoder(probe_head) -> None:
    model = probe_model()
    detections = detect(model, IMAGES, max_detections=5, head="probe")
    with torch.no_grad():
        outputs = model(IMAGES)[-1]
    expected = ctdet_decode(outputs["heatmap"].sigmoid(), outputs["wh"], outputs["offset"], K=5)
    assert torch.equal(detections, expected)
    detect(model, IMAGES, flip=True, max_detections=5, head="probe")
    assert probe_head == ["decode", "decode"]

    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    Predictor(model, probe_config(), device="cpu").predict([image])
    assert probe_head == ["decode"] * 3


def test_deployed_model_returns_the_heads_outputs(probe_head) -> None:
    with torch.no_grad():
        raw = DeployModel(probe_model(), tiny_config().input, head="probe")(IMAGES)
    assert [tuple(tensor.shape)[1] for tensor in raw] == [3, 2, 2, 4]
    assert probe_head == []
    DeployModel(probe_model(), tiny_config().input, head="probe", decode=True)(IMAGES)
    assert probe_head == ["decode"]


@pytest.fixture
def source(tmp_path) -> DetectionSource:
    records = []
    boxes = np.array([[8.0, 10.0, 40.0, 50.0], [60.0, 20.0, 120.0, 80.0]])
    labels = np.array([0, 2])
    for image_id in (1, 2):
        path = tmp_path / f"{image_id}.png"
        pixels = np.random.default_rng(image_id).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        cv2.imwrite(str(path), pixels)
        records.append(ImageRecord(image_id, path, 128, 96, boxes, labels, np.zeros(2, bool)))
    return DetectionSource(records, ["a", "b", "c"], [1, 2, 3], None, {})


def test_dataset_encodes_the_heads_targets(probe_head, source) -> None:
    dataset = CenterNetDataset(source.records, 3, tiny_config().input, train=False, head="probe")
    batch = collate([dataset[0], dataset[1]])
    assert probe_head == ["encode_targets", "encode_targets"]
    assert set(batch) == {"image", "heatmap", "wh", "offset", "index", "mask", "meta"}


def test_evaluation_uses_the_heads_targets_loss_and_decoder(probe_head, source) -> None:
    config = EvaluateConfig(batch_size=2, workers=0, pr_curves=False)
    detections, loss = predict_source(probe_model(), source, probe_config(), config, "cpu")
    assert loss is not None and sorted(detections) == [1, 2]
    assert probe_head == ["encode_targets", "encode_targets", "loss", "decode"]


def test_one_decoder() -> None:
    """Every decoding function in detector/ is `ctdet_decode` or a head type's adapter to it."""
    defined = {
        name
        for path in (ROOT / "detector").rglob("*.py")
        for name in re.findall(r"^def (\w*decode\w*)\(", path.read_text(), re.MULTILINE)
    }
    assert defined == {"ctdet_decode"} | {head.decode.__name__ for head in HEADS.values()}


def test_a_built_model_names_its_head_type() -> None:
    """`head_type_of` reads the head type from the built heads (pruning's loss for the
    data-driven criteria needs it); a module without heads is named in the error."""
    from tiny import tiny_model

    from detector.heads import head_type_of

    for head in HEADS:
        assert head_type_of(tiny_model("resunet18", head=head)) == head
    with pytest.raises(ValueError, match="Conv2d has no head module"):
        head_type_of(torch.nn.Conv2d(1, 1, 1))
