"""Export: the in-graph decoding is `ctdet_decode`, BatchNorm folding, ONNX and
torch.export round trips (pruned and unpruned, raw heads and decoded) with onnxruntime parity,
no NonZero in the decoded graph, and deformable convolution as ONNX DeformConv."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tiny import tiny_config, tiny_model
from torch import nn

from ctprune.cli import main
from ctprune.pruning import prune
from detector import ARCHITECTURES, output_layers, save_checkpoint
from detector.config import InputSpec
from detector.export import (
    DEFORM_CONV_MIN_ORT,
    DeployModel,
    ExportError,
    _deform_conv_translation,
    check_runtime_supports,
    export_onnx,
    export_pt2,
    fold_batchnorm,
    onnx_session,
)
from detector.inference.decode import ctdet_decode
from detector.models import REQUIRED_HEAD

HEAD_TOLERANCE = 1e-4  # the parity bar for raw heads
BOX_TOLERANCE = 1e-3  # and for decoded boxes (input pixels) of scores above SCORE_FLOOR
SCORE_FLOOR = 0.01


def distinct_model(arch: str = "res18") -> nn.Module:
    """A tiny model with trained-looking statistics: random BN statistics, and neck and head
    weights large enough that heatmap scores differ (a fresh model's heatmap is nearly flat,
    and ties make the top-K order arbitrary)."""
    model = tiny_model(arch)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and module.affine:
            width = module.num_features
            module.running_mean.copy_(torch.randn(width, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(width, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(width, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(width, generator=generator) * 0.1)
        if isinstance(module, nn.ConvTranspose2d):  # initialised N(0, 0.001): a flat heatmap
            module.weight.data.normal_(0, 0.1, generator=generator)
        if isinstance(getattr(module, "conv_offset_mask", None), nn.Conv2d):
            # DCN offsets start at zero: make them sample off the grid
            module.conv_offset_mask.weight.data.normal_(0, 0.3, generator=generator)
    for layer in output_layers(model):  # the heads' last convs, in every stack
        layer.weight.data.normal_(0, 2.0, generator=generator)
    return model.eval()


def reference_detections(model: nn.Module, images: torch.Tensor, k: int = 100) -> torch.Tensor:
    """ctdet_decode of the eager model, boxes scaled to input pixels (down ratio 4)."""
    with torch.no_grad():
        heads = model(images)[-1]
    detections = ctdet_decode(heads["heatmap"].sigmoid(), heads["wh"], heads["offset"], K=k)
    detections[..., :4] *= 4
    return detections


def assert_same_detections(actual: np.ndarray, expected: torch.Tensor) -> None:
    """Scores within HEAD_TOLERANCE rank by rank; every detection scoring above SCORE_FLOOR has
    a partner of the same class with boxes within BOX_TOLERANCE, and as many score above it.
    Partners rather than equal ranks: two peaks whose scores differ by float rounding may swap
    places between runtimes."""
    expected = expected.numpy()
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual[..., 4], expected[..., 4], atol=HEAD_TOLERANCE)
    assert (expected[..., 4] > SCORE_FLOOR).sum() > 10  # the comparison covers real detections
    for mine, theirs in zip(actual, expected, strict=True):
        mine, theirs = mine[mine[:, 4] > SCORE_FLOOR], theirs[theirs[:, 4] > SCORE_FLOOR]
        assert len(mine) == len(theirs)
        box_error = np.abs(mine[:, None, :4] - theirs[None, :, :4]).max(axis=2)
        same = (mine[:, None, 5] == theirs[None, :, 5]) & (box_error <= BOX_TOLERANCE)
        assert same.any(axis=0).all(), f"unmatched detections: {theirs[~same.any(axis=0)]}"


# --- pure torch: fast --------------------------------------------------------------------------


class FixedHeads(nn.Module):
    """A stand-in model: one stack whose heads are the given tensors, whatever the images."""

    def __init__(self, heads: dict[str, torch.Tensor]):
        super().__init__()
        self.fixed = heads

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [self.fixed]


def deployed_detections(heads: dict, max_detections: int, down_ratio: int = 4) -> torch.Tensor:
    deploy = DeployModel(
        FixedHeads(heads), InputSpec(down_ratio=down_ratio), decode=True,
        max_detections=max_detections,
    )
    return deploy(torch.zeros(1, 3, 8, 8))


def test_deployed_decoding_is_ctdet_decode_in_input_pixels() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 10, generator=generator)
    wh = torch.rand(2, 2, 8, 10, generator=generator) * 5
    offset = torch.rand(2, 2, 8, 10, generator=generator)
    for k in (7, 1000):  # 1000 > C * H * W = 240: clamped
        expected = ctdet_decode(logits.sigmoid(), wh, offset, K=k)
        expected[..., :4] *= 4
        actual = deployed_detections({"heatmap": logits, "wh": wh, "offset": offset}, k)
        assert actual.shape == (2, min(k, 240), 6)
        assert torch.equal(actual, expected)  # the same decoder: bit-identical
    expected = ctdet_decode(logits.sigmoid(), wh, None, K=5)
    assert torch.equal(deployed_detections({"heatmap": logits, "wh": wh}, 5, 1), expected)


def test_hand_placed_peak_in_input_pixels() -> None:
    logits = torch.full((1, 2, 4, 4), -10.0)
    logits[0, 1, 2, 3] = 10.0  # class 1 at x = 3, y = 2
    wh = torch.zeros(1, 2, 4, 4)
    wh[0, :, 2, 3] = torch.tensor([2.0, 1.0])
    offset = torch.zeros(1, 2, 4, 4)
    offset[0, :, 2, 3] = torch.tensor([0.5, 0.25])
    heads = {"heatmap": logits, "wh": wh, "offset": offset}
    [[first, *_]] = deployed_detections(heads, 3).tolist()
    # centre (3.5, 2.25) cells, size 2 x 1 cells -> x 4 pixels
    assert first[:4] == pytest.approx([10.0, 7.0, 18.0, 11.0])
    assert first[4] == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item())
    assert first[5] == 1.0


@pytest.mark.parametrize("arch", ["res18", "res50"])
def test_fold_batchnorm_keeps_outputs(arch) -> None:
    model = distinct_model(arch)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is intact
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for name, value in model(images)[-1].items():
            torch.testing.assert_close(folded(images)[-1][name], value, atol=1e-4, rtol=1e-4)


def test_raw_pixels_equal_normalised_input() -> None:
    model = distinct_model()
    spec = tiny_config().input
    pixels = torch.randint(0, 256, (1, 3, 64, 64)).float()
    mean = torch.tensor(spec.mean).reshape(1, 3, 1, 1)
    std = torch.tensor(spec.std).reshape(1, 3, 1, 1)
    normalised = (pixels / 255 - mean) / std
    with torch.no_grad():
        raw = DeployModel(model, spec, raw_pixels=True)(pixels)
        plain = DeployModel(model, spec)(normalised)
    for a, b in zip(raw, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_max_detections() -> None:
    with pytest.raises(ExportError, match="max_detections"):
        DeployModel(tiny_model(), tiny_config().input, decode=True, max_detections=0)


# --- export round trips: each ONNX export costs ~9 s of fixed exporter overhead -----------------


def test_pt2_decoded_dynamic_round_trip(tmp_path) -> None:
    model = distinct_model()
    path = export_pt2(tmp_path / "model.pt2", model, tiny_config().input, decode=True, dynamic=True)
    loaded = torch.export.load(path).module()
    for shape in [(1, 3, 64, 64), (3, 3, 96, 64)]:
        images = torch.randn(*shape)
        with torch.no_grad():
            actual = loaded(images)
        assert_same_detections(actual.numpy(), reference_detections(model, images))


def test_onnx_pruned_heads_through_the_cli(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxslim")
    config = tiny_config("res18")
    pruned = prune(distinct_model("res18"), 0.3, "l1", round_to=None).model.eval()
    checkpoint = save_checkpoint(tmp_path / "pruned.pt", pruned, config)
    out = tmp_path / "pruned.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    session = onnx_session(out, threads=1)
    assert [o.name for o in session.get_outputs()] == ["heatmap", "wh", "offset"]
    images = torch.randn(1, 3, 64, 64)
    actual = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = pruned(images)[-1]
    for value, name in zip(actual, ("heatmap", "wh", "offset"), strict=True):
        np.testing.assert_allclose(value, expected[name].numpy(), atol=HEAD_TOLERANCE)


def test_onnx_decoded_dynamic_raw_pixels(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxslim")
    model = distinct_model("res50")
    spec = tiny_config("res50").input
    # K = 200: a 64 x 64 input has a 16 x 16 map of 3 classes (768 cells), a 32 x 32 one only
    # 8 x 8 x 3 = 192, where the graph must clamp K to the map.
    path = export_onnx(
        tmp_path / "decoded.onnx", model, spec, decode=True, dynamic=True, raw_pixels=True,
        max_detections=200,
    )
    operators = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "TopK" in operators and not operators & {"NonZero", "OneHot"}
    session = onnx_session(path, threads=1)
    mean = torch.tensor(spec.mean).reshape(1, 3, 1, 1)
    std = torch.tensor(spec.std).reshape(1, 3, 1, 1)
    for shape, k in [((1, 3, 64, 64), 200), ((2, 3, 96, 128), 200), ((1, 3, 32, 32), 192)]:
        pixels = torch.randint(0, 256, shape).float()
        [actual] = session.run(None, {"images": pixels.numpy()})
        expected = reference_detections(model, (pixels / 255 - mean) / std, k=200)
        assert actual.shape == (shape[0], k, 6)
        assert_same_detections(actual, expected)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("CTPRUNE_SLOW_TESTS"),
    reason="10-25 s per backbone (the exporter's fixed cost); set CTPRUNE_SLOW_TESTS=1",
)
# the centernet head's architectures (the triplet-only ones are not exported here)
@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - set(REQUIRED_HEAD)))
def test_every_backbone_pruned_decoded_dynamic(tmp_path, arch) -> None:
    """Every backbone, pruned, exports with decoding and dynamic shapes and matches PyTorch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxslim")
    pruned = prune(distinct_model(arch), 0.3, "l1", round_to=None).model.eval()
    spec = tiny_config(arch).input
    path = export_onnx(tmp_path / "m.onnx", pruned, spec, decode=True, dynamic=True)
    session = onnx_session(path, threads=1)
    for shape in [(1, 3, 64, 64), (2, 3, 128, 64)]:
        images = torch.randn(*shape)
        [actual] = session.run(None, {"images": images.numpy()})
        assert_same_detections(actual, reference_detections(pruned, images))


def test_resdcn_exports_with_onnx_deform_conv(tmp_path) -> None:
    """resdcn18's modulated deformable convs (torchvision's deform_conv2d) become ONNX
    DeformConv; onnxruntime >= DEFORM_CONV_MIN_ORT runs them to the heads' tolerance, an older
    one is refused with the version named."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxslim")
    model = distinct_model("resdcn18")
    path = export_onnx(tmp_path / "dcn.onnx", model, tiny_config("resdcn18").input)
    onnx_model = onnx.load(str(path))
    assert any(node.op_type == "DeformConv" for node in onnx_model.graph.node)
    installed = tuple(int(v) for v in onnxruntime.__version__.split(".")[:2])
    if installed < tuple(int(v) for v in DEFORM_CONV_MIN_ORT.split(".")[:2]):
        with pytest.raises(ExportError, match=f"onnxruntime>={DEFORM_CONV_MIN_ORT}"):
            check_runtime_supports(onnx_model)
        return
    images = torch.randn(1, 3, 64, 64)
    actual = onnx_session(path, threads=1).run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = model(images)[-1]
    for value, name in zip(actual, ("heatmap", "wh", "offset"), strict=True):
        np.testing.assert_allclose(value, expected[name].numpy(), atol=HEAD_TOLERANCE)


def test_old_runtime_is_named(monkeypatch) -> None:
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    node = onnx.helper.make_node("DeformConv", ["x", "w", "o"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [], [])
    monkeypatch.setattr(onnxruntime, "__version__", "1.19.2")
    expected = f"onnxruntime 1.19.2 .*onnxruntime>={DEFORM_CONV_MIN_ORT}"
    with pytest.raises(ExportError, match=expected):
        check_runtime_supports(onnx.helper.make_model(graph))


def test_deform_conv_translation_signature_matches_torchvision() -> None:
    pytest.importorskip("onnxscript")
    import inspect

    schema = torch.ops.torchvision.deform_conv2d.default._schema
    names = [argument.name for argument in schema.arguments]
    assert list(inspect.signature(_deform_conv_translation()).parameters) == names
