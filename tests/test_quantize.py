"""INT8 post-training quantization and ONNX files as models: deterministic calibration, where
the QDQ nodes are (and are not), the onnxruntime-backed predictor against the fp32 torch model
(fp32 file: to float rounding; INT8: the same top-10 detections of a briefly trained model,
boxes within 2 px at 128 px), the reduce-range decision (detected and forced), clear errors for
unusable files and options, the fp16 export and INT8 beside fp32 in `ctprune bench`."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics

import numpy as np
import onnx
import pytest
import torch
from tiny import tiny_config, tiny_model
from torch import nn

from ctprune.bench import bench_checkpoints
from ctprune.cli import main
from ctprune.quantize import (
    FP32_FILE,
    INT8_FILE,
    QuantizeConfig,
    calibration_images,
    quantize_checkpoint,
    quantize_onnx,
    reduce_range_decision,
)
from detector import load_model, output_layers, save_checkpoint
from detector.config import from_dict, input_preset
from detector.data.shapes import generate_shapes
from detector.data.sources import load_data_yaml, load_source
from detector.export import (
    ExportError,
    SubpixelConvTranspose,
    export_onnx,
    float_nodes,
    subpixel_deconvs,
)
from detector.inference.onnx_model import load_onnx_model, read_onnx_metadata
from detector.inference.predictor import Predictor

pytestmark = pytest.mark.timeout(60)

SIZE = 128  # the resolution for the box tolerance
BOX_TOLERANCE_PX = 2.0
TOP = 10


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=48, num_val=8, image_size=SIZE, seed=5)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes):
    """A tiny res18 checkpoint at 128 px with the benchmark's classes and trained-looking
    statistics (seeded): random BatchNorm statistics, a neck and heads' last convs whose weights
    are large enough that heatmap peaks differ. A tiny model trained for the seconds a test
    may take stays at its prior (scores 0.08-0.12, measured: 10-20 epochs on 48 images), which
    tests no more than this does."""
    source = load_source(load_data_yaml(shapes / "data.yaml"), "train")
    config = dataclasses.replace(tiny_config("res18", source.num_classes),
                                 input=input_preset("imagenet", (SIZE, SIZE)),
                                 class_names=source.class_names)
    model = tiny_model("res18", source.num_classes)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                width = module.num_features
                module.running_mean.copy_(torch.randn(width, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(width, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(width, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(width, generator=generator) * 0.1)
            if isinstance(module, nn.ConvTranspose2d):  # initialised N(0, 0.001): flat maps
                module.weight.normal_(0, 0.1, generator=generator)
        for layer in output_layers(model):
            layer.weight.normal_(0, 2.0, generator=generator)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, model, config)
    return path


@pytest.fixture(scope="module")
def quantized(trained, shapes, tmp_path_factory):
    source = load_source(load_data_yaml(shapes / "data.yaml"), "train")
    out = tmp_path_factory.mktemp("int8")
    return quantize_checkpoint(trained, source, QuantizeConfig(images=16), out)


def val_images(shapes) -> list[np.ndarray]:
    source = load_source(load_data_yaml(shapes / "data.yaml"), "val")
    from detector.data.dataset import read_image

    return [read_image(record) for record in source.records]


def test_the_metadata_makes_an_exported_file_a_model(tmp_path):
    config = from_dict(type(tiny_config()), {**_plain(tiny_config()),
                                             "class_names": ["a", "b", "c"]}, "model")
    model = tiny_model().eval()
    path = export_onnx(tmp_path / "m.onnx", model, config.input, model_config=config,
                       dynamic=True)
    info = read_onnx_metadata(path)
    assert info.model_config == config
    assert info.precision == "fp32" and info.params == sum(p.numel() for p in model.parameters())
    paths = {id(m): n for n, m in model.named_modules()}
    assert info.graph["output_layer_weights"] == [
        f"model.{paths[id(layer)]}.weight" for layer in output_layers(model)]
    onnx_model, _ = load_onnx_model(path)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)[-1]
    actual = onnx_model(images)
    assert len(actual) == 1 and list(actual[0]) == ["heatmap", "wh", "offset"]
    for name, value in actual[0].items():
        torch.testing.assert_close(value, expected[name], atol=1e-4, rtol=1e-4)


def _plain(config) -> dict:
    from detector.config import to_dict

    return to_dict(config)


def test_files_without_metadata_or_with_decoding_are_refused(tmp_path):
    model, config = tiny_model().eval(), tiny_config()
    bare = export_onnx(tmp_path / "bare.onnx", model, config.input)
    with pytest.raises(ExportError, match="no ctprune metadata"):
        load_onnx_model(bare)
    decoded = export_onnx(tmp_path / "decoded.onnx", model, config.input, model_config=config,
                          decode=True)
    with pytest.raises(ExportError, match="without --decode"):
        load_onnx_model(decoded)
    with pytest.raises(ExportError, match="no ctprune metadata"):
        quantize_onnx(bare, tmp_path / "q.onnx", np.zeros((1, 3, 64, 64), np.float32),
                      QuantizeConfig())


def test_calibration_is_deterministic_and_uses_training_images(trained, shapes, tmp_path,
                                                               monkeypatch):
    # The entropy search is pure Python: 2048 bins take 10-20 s on a tiny model; 256 bins (65
    # candidate ranges) test the same code.
    monkeypatch.setattr("ctprune.quantize.ENTROPY_BINS", 256)
    source = load_source(load_data_yaml(shapes / "data.yaml"), "train")
    model, checkpoint = load_model(trained)
    spec = checkpoint.model_config.input
    images = calibration_images(source, spec, 5)
    assert images.shape == (5, 3, SIZE, SIZE)
    np.testing.assert_array_equal(images, calibration_images(source, spec, 5))
    fp32 = export_onnx(tmp_path / FP32_FILE, model, spec, model_config=checkpoint.model_config,
                       dynamic=True)
    first = {}
    for calibration in ("minmax", "entropy", "percentile"):
        config = QuantizeConfig(calibration=calibration, images=5)
        scales = []
        for attempt in range(2):
            path = quantize_onnx(fp32, tmp_path / f"{calibration}{attempt}.onnx", images, config)
            scales.append(_scales(tmp_path / f"{calibration}{attempt}.onnx"))
            assert path["images"] == 5
        assert scales[0].keys() == scales[1].keys() and len(scales[0]) > 10
        for name, value in scales[0].items():
            np.testing.assert_array_equal(value, scales[1][name], err_msg=name)
        first[calibration] = scales[0]
    # each method its own ranges (onnxruntime's entropy defaults alone would give min-max's)
    for method in ("entropy", "percentile"):
        activations = [name for name in first["minmax"] if "weight" not in name]
        assert any(not np.array_equal(first[method][name], first["minmax"][name])
                   for name in activations), method


def _scales(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer
            if init.name.endswith("_scale")}


def _producers(model) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output}


def test_qdq_nodes_where_expected_and_none_in_the_float_layers(quantized):
    model = onnx.load(str(quantized.int8_path))
    producers = _producers(model)
    weights = json.loads({p.key: p.value for p in model.metadata_props}["ctprune.graph"])[
        "output_layer_weights"]
    convs = [node for node in model.graph.node if node.op_type in ("Conv", "ConvTranspose")]
    head_convs = [node for node in convs if node.input[1] in weights]
    assert len(head_convs) == 3
    for node in head_convs:  # float weights straight from an initializer, float outputs
        assert node.input[1] not in producers
        assert not any(n.op_type == "QuantizeLinear" and n.input[0] in node.output
                       for n in model.graph.node)
        assert node.output[0] in {output.name for output in model.graph.output}
    others = [node for node in convs if node not in head_convs]
    assert len(others) > 10
    # the neck's deconvs went in as sub-pixel convs: onnxruntime has no integer ConvTranspose
    assert not any(node.op_type == "ConvTranspose" for node in model.graph.node)
    for node in others:  # every other conv reads a dequantized input and dequantized weights
        for tensor in node.input[:2]:
            assert producers[tensor].op_type == "DequantizeLinear", (node.name, tensor)
    # symmetric per-channel int8 weights: one scale per output channel, zero points 0
    initializers = {init.name: onnx.numpy_helper.to_array(init)
                    for init in model.graph.initializer}
    weight_dq = producers[others[0].input[1]]
    scale, zero_point = initializers[weight_dq.input[1]], initializers[weight_dq.input[2]]
    assert scale.ndim == 1 and scale.size > 1 and zero_point.dtype == np.int8
    assert not zero_point.any()
    assert quantized.summary["reduce_range"] in (True, False)
    assert sorted(quantized.summary["float_nodes"]) == sorted(n.name for n in head_convs)


def test_the_decoding_in_the_graph_stays_float(trained, shapes, tmp_path):
    model, checkpoint = load_model(trained)
    path = export_onnx(tmp_path / "decoded.onnx", model, checkpoint.model_config.input,
                       model_config=checkpoint.model_config, decode=True)
    source = load_source(load_data_yaml(shapes / "data.yaml"), "train")
    images = calibration_images(source, checkpoint.model_config.input, 4)
    quantize_onnx(path, tmp_path / "decoded.int8.onnx", images, QuantizeConfig(images=4))
    quantized = onnx.load(str(tmp_path / "decoded.int8.onnx"))
    kept = set(float_nodes(quantized, read_onnx_metadata(path).graph["output_layer_weights"]))
    kinds = {node.op_type for node in quantized.graph.node if node.name in kept}
    assert {"Sigmoid", "MaxPool", "TopK", "GatherElements"} <= kinds
    producers = _producers(quantized)
    for node in quantized.graph.node:
        if node.name in kept:
            assert node.op_type not in ("QuantizeLinear", "DequantizeLinear")
            assert not any(producers.get(t) is not None and producers[t].op_type
                           == "DequantizeLinear" and producers[t].name not in kept
                           and t.startswith("model.heads") for t in node.input)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            source_node = producers.get(node.input[0])
            assert source_node is None or source_node.name not in kept, node.name
    session_outputs = load_decoded(tmp_path / "decoded.int8.onnx", images[:1])
    assert session_outputs.shape == (1, 100, 6)


def load_decoded(path, images):
    from detector.export import onnx_session

    return onnx_session(path, threads=1).run(None, {"images": images})[0]


def _top(rows: np.ndarray) -> np.ndarray:
    return rows[np.argsort(-rows[:, 4], kind="stable")][:TOP]


def assert_same_top_detections(actual: np.ndarray, expected: np.ndarray, box_px: float,
                               score_tolerance: float) -> int:
    """The same top-10 detections up to ties: each of the reference's top 10 has a partner of
    the same class with every box side within ``box_px`` and its score within
    ``score_tolerance`` among ``actual``'s detections scoring at least its 10th score minus
    ``score_tolerance`` (partners, not ranks: two detections whose scores differ by less than
    the tolerance may swap places, at the 10th rank too). Returns how many partners were
    exact ranks (the caller checks the comparison is not all ties)."""
    mine, theirs = _top(actual), _top(expected)
    assert len(mine) == len(theirs) == TOP
    pool = actual[actual[:, 4] >= mine[-1, 4] - score_tolerance]
    used, same_rank = set(), 0
    for rank, row in enumerate(theirs):
        candidates = [
            index for index, other in enumerate(pool)
            if index not in used and other[5] == row[5]
            and np.abs(other[:4] - row[:4]).max() <= box_px
            and abs(other[4] - row[4]) <= score_tolerance
        ]
        assert candidates, f"no partner for {row} among {pool}"
        used.add(candidates[0])
        same_rank += bool(np.array_equal(pool[candidates[0]], mine[rank]))
    return same_rank


def test_fp32_onnx_predictor_agrees_with_the_torch_model(trained, quantized, shapes):
    reference = Predictor.from_checkpoint(trained, device="cpu")
    exported = Predictor.from_checkpoint(quantized.fp32_path, device="cpu")
    images = val_images(shapes)
    for expected, actual in zip(reference.predict_rows(images), exported.predict_rows(images),
                                strict=True):
        assert_same_top_detections(actual, expected, box_px=1e-3, score_tolerance=1e-4)


def test_int8_predictor_keeps_the_top_detections(trained, quantized, shapes):
    """INT8 at 128 px: the same top-10 detections with boxes within 2 px (the issue's bar).
    Scores within 0.01: INT8 moved this model's top scores (0.14) by at most 0.0044, measured;
    scores that close may swap ranks, which the partner rule allows."""
    reference = Predictor.from_checkpoint(trained, device="cpu")
    int8 = Predictor.from_checkpoint(quantized.int8_path, device="cpu")
    images = val_images(shapes)
    same_rank = 0
    for expected, actual in zip(reference.predict_rows(images), int8.predict_rows(images),
                                strict=True):
        same_rank += assert_same_top_detections(actual, expected, box_px=BOX_TOLERANCE_PX,
                                                score_tolerance=0.01)
    assert same_rank >= len(images) * TOP // 2  # mostly the very same ranks, not only ties


def test_reduce_range_is_detected_stated_and_forceable(trained, shapes, tmp_path):
    assert reduce_range_decision("auto", {"avx2", "avx512_vnni"})[0] is False
    on, reason = reduce_range_decision("auto", {"avx2", "avx512bw"})
    assert on and "no VNNI" in reason
    assert reduce_range_decision("auto", None, detect=False)[0] is False
    assert reduce_range_decision("on", {"avx512_vnni"}) == (True, "reduce_range on: forced")
    assert reduce_range_decision("off", set())[0] is False
    # the forced path: 7-bit weights, |q| <= 63, and the predictor still works
    model, checkpoint = load_model(trained)
    fp32 = export_onnx(tmp_path / FP32_FILE, model, checkpoint.model_config.input,
                       model_config=checkpoint.model_config, dynamic=True)
    source = load_source(load_data_yaml(shapes / "data.yaml"), "train")
    images = calibration_images(source, checkpoint.model_config.input, 4)
    summaries = {}
    for setting in ("on", "off"):
        summaries[setting] = quantize_onnx(fp32, tmp_path / f"{setting}.onnx", images,
                                           QuantizeConfig(images=4, reduce_range=setting))
    assert summaries["on"]["reduce_range"] and not summaries["off"]["reduce_range"]
    widest = {setting: _largest_weight_code(tmp_path / f"{setting}.onnx")
              for setting in summaries}
    assert widest["on"] <= 64 < widest["off"]
    rows = Predictor.from_checkpoint(tmp_path / "on.onnx", device="cpu").predict_rows(
        val_images(shapes)[:2])
    assert all(len(r) == 100 for r in rows)


def _largest_weight_code(path) -> int:
    model = onnx.load(str(path))
    codes = [np.abs(onnx.numpy_helper.to_array(init).astype(np.int32)).max()
             for init in model.graph.initializer
             if init.data_type == onnx.TensorProto.INT8 and init.name.endswith("_quantized")]
    assert codes
    return int(max(codes))


@pytest.mark.parametrize("bias", [False, True])
def test_subpixel_conv_transpose_equals_the_transposed_conv(bias):
    deconv = nn.ConvTranspose2d(6, 5, 4, stride=2, padding=1, bias=bias).eval()
    features = torch.randn(2, 6, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(SubpixelConvTranspose(deconv)(features), deconv(features),
                                   atol=1e-5, rtol=1e-5)


def test_subpixel_deconvs_rewrites_only_the_convertible_deconvs():
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 4, 2, 1, bias=False),
                          nn.ConvTranspose2d(4, 4, 4, 2, 1, groups=4, bias=False),
                          nn.ConvTranspose2d(4, 4, 3, 2, 1, output_padding=1)).eval()
    rewritten = subpixel_deconvs(model)
    assert isinstance(rewritten[0], SubpixelConvTranspose) and rewritten is not model
    assert isinstance(model[0], nn.ConvTranspose2d)  # the input is not changed
    assert [type(layer) for layer in rewritten[1:]] == [nn.ConvTranspose2d] * 2
    features = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(features), model(features), atol=1e-5, rtol=1e-5)
    plain = nn.Sequential(nn.Conv2d(3, 3, 3))
    assert subpixel_deconvs(plain) is plain


def test_config_and_torch_runtime_errors():
    with pytest.raises(ValueError, match="images: expected an integer from 1 to 128"):
        QuantizeConfig(images=129)
    with pytest.raises(ValueError, match="calibration: expected one of"):
        QuantizeConfig(calibration="mse")
    with pytest.raises(ValueError, match="runtime: expected onnxruntime; torch .* needs torchao"):
        QuantizeConfig(runtime="torch")
    with pytest.raises(ValueError, match="percentile: expected"):
        QuantizeConfig(calibration="percentile", percentile=50.0)
    with pytest.raises(ValueError, match="reduce_range: expected one of"):
        QuantizeConfig(reduce_range="maybe")


def test_deformable_convs_stay_float(tmp_path):
    model, config = tiny_model("resdcn18").eval(), tiny_config("resdcn18")
    path = export_onnx(tmp_path / "dcn.onnx", model, config.input, model_config=config,
                       dynamic=True)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    summary = quantize_onnx(path, tmp_path / "dcn.int8.onnx", images, QuantizeConfig(images=2))
    quantized = onnx.load(str(tmp_path / "dcn.int8.onnx"))
    producers = _producers(quantized)
    deform = [node for node in quantized.graph.node if node.op_type == "DeformConv"]
    assert deform and all(node.name in summary["float_nodes"] for node in deform)
    for node in deform:  # float weights; the offsets come from a float conv
        assert node.input[1] not in producers
        assert producers[node.input[2]].op_type != "DequantizeLinear"
    model_onnx, _ = load_onnx_model(tmp_path / "dcn.int8.onnx")
    assert model_onnx(torch.from_numpy(images))[0]["heatmap"].shape == (2, 3, 16, 16)


def test_cli_quantize_eval_info_detect_and_bench(trained, shapes, tmp_path, capsys,
                                                monkeypatch):
    out = tmp_path / "q"
    data = str(shapes / "data.yaml")
    import detector.data.sources as sources

    splits, load = [], sources.load_source
    monkeypatch.setattr(sources, "load_source",
                        lambda config, split: splits.append(split) or load(config, split))
    assert main(["quantize", str(trained), "--data", data, "--images", "4", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reduce_range auto:" in printed and "4 training images" in printed
    assert splits == ["train"]  # calibration never reads the val split
    assert main(["quantize", str(trained), "--data", data, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["info", str(out / INT8_FILE)]) == 0
    printed = capsys.readouterr().out
    assert "precision    int8" in printed and "QuantizeLinear" in printed
    assert main(["eval", str(out / INT8_FILE), "--data", data, "--out", str(tmp_path / "ev"),
                 "--set", "evaluate.workers=0"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert 0 <= metrics["ap50"] <= 1
    assert main(["detect", str(out / INT8_FILE), str(shapes / "images" / "val"), "--out",
                 str(tmp_path / "det")]) == 0
    assert any((tmp_path / "det").rglob("*.jpg")) or any((tmp_path / "det").rglob("*.png"))
    rows = bench_checkpoints([out / INT8_FILE], input_size=64, threads=1,
                             runtime="onnxruntime", rounds=2, throughput_batch=None)
    by_name = {row.name: row for row in rows}
    int8 = by_name[str(out / INT8_FILE)]
    assert int8.precision == "int8" and int8.pair == f"{out / INT8_FILE} (fp32)"
    assert int8.speedup is not None and by_name[int8.pair].precision == "fp32"
    assert int8.macs == by_name[int8.pair].macs > 0


def test_fp16_export_keeps_the_float_layers_and_agrees(tmp_path, trained, capsys):
    out = tmp_path / "m16.onnx"
    assert main(["export", str(trained), "--format", "onnx", "--precision", "fp16", "--out",
                 str(out)]) == 0
    info = read_onnx_metadata(out)
    assert info.precision == "fp16"
    model = onnx.load(str(out))
    initializers = {init.name: init.data_type for init in model.graph.initializer}
    for name in info.graph["output_layer_weights"]:
        assert initializers[name] == onnx.TensorProto.FLOAT
    assert any(t == onnx.TensorProto.FLOAT16 for t in initializers.values())
    torch_model = load_model(trained)[0].eval()
    onnx_model, _ = load_onnx_model(out)
    images = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = torch_model(images)[-1]["heatmap"]
    torch.testing.assert_close(onnx_model(images)[0]["heatmap"], expected, atol=0.05, rtol=0.02)
    assert main(["export", str(trained), "--format", "pt2", "--precision", "fp16", "--out",
                 str(tmp_path / "m.pt2")]) == 2


def test_a_checkpoint_with_other_classes_is_refused(tmp_path, shapes):
    config = from_dict(type(tiny_config()), {**_plain(tiny_config()),
                                             "class_names": ["x", "y", "z"]}, "model")
    save_checkpoint(tmp_path / "c.pt", tiny_model(), config)
    source = load_source(load_data_yaml(shapes / "data.yaml"), "train")
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        quantize_checkpoint(tmp_path / "c.pt", source, QuantizeConfig(images=2), tmp_path / "q")


RUN_RECIPE = """\
name: int8
synthetic: {out_dir: shapes, num_train: 16, num_val: 4, image_size: 64, seed: 1}
model:
  arch: res18
  head_conv: 8
  widths: {stem: 8, stages: [8, 16, 16, 32], neck: [16, 16, 16]}
  input: {input_size: [64, 64]}
data: shapes/data.yaml
train: {epochs: 1, batch_size: 8, lr: 2.0e-3, lr_steps: [], workers: 0, eval_interval: 1}
prune: {criterion: l1, ratio: 0.5, round_to: null, recalibrate_batches: 1}
finetune: {epochs: 1}
quantize: {images: 4}
evaluate: {batch_size: 8, workers: 0}
report: {latency: true, latency_repeats: 1, threads: 1}
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("CTPRUNE_SLOW_TESTS"),
    reason="the whole chain with two quantizations, 30-40 s; set CTPRUNE_SLOW_TESTS=1",
)
@pytest.mark.timeout(180)
def test_a_recipe_quantizes_every_final_model_after_fine_tuning(tmp_path):
    from ctprune.recipe import load_recipe
    from ctprune.run import run_recipe

    (tmp_path / "recipe.yaml").write_text(RUN_RECIPE)
    recipe = load_recipe(tmp_path / "recipe.yaml")
    log = []
    report = run_recipe(recipe, tmp_path / "run", log=log.append)
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["baseline", "l1_r0.5/prune", "l1_r0.5/finetune", "baseline_int8",
                          "l1_r0.5/int8"]
    for name, twin in (("baseline_int8", "baseline"), ("l1_r0.5/int8", "l1_r0.5/finetune")):
        row, folder = rows[name], tmp_path / "run" / name
        assert row["stage"] == "quantize" and row["precision"] == "int8"
        assert row["params"] == rows[twin]["params"]  # the fp32 twin's
        assert row["gmacs"] == pytest.approx(rows[twin]["gmacs"])
        assert row["size_mib"] == pytest.approx((folder / INT8_FILE).stat().st_size / 2**20)
        assert row["latency_ms"] > 0 and 0 <= row["ap50"] <= 1
        stage = json.loads((folder / "stage.json").read_text())
        assert stage["complete"] and stage["model_file"] == INT8_FILE
        assert stage["figures"]["runtime"] == "onnxruntime"
        assert stage["figures"]["twin_latency_ms"] > 0
        assert stage["quantize"]["calibration"] == "minmax" and stage["quantize"]["images"] == 4
    # the baseline row keeps its eager latency: the onnxruntime pairs do not enter it
    eager = [pair["baseline_ms"] for pair in report["latency_pairs"]
             if pair["runtime"] == "torch"]
    assert len(eager) == 2 and rows["baseline"]["latency_ms"] == statistics.median(eager)
    speedups = {entry["name"] for entry in report["speedups"]}
    assert {"baseline_int8", "l1_r0.5/int8"} <= speedups
    assert "timed in onnxruntime" in (tmp_path / "run" / "report.md").read_text()
    # `ctprune report --measure` times the ONNX stages again, the same way
    from ctprune.report import build_report

    measured = build_report([tmp_path / "run"], tmp_path / "measured", measure=True,
                            latency_repeats=1, threads=1)
    again = {row["name"]: row for row in measured["rows"]}
    assert again["l1_r0.5/int8"]["latency_ms"] > 0 and again["l1_r0.5/int8"]["precision"] == "int8"
    assert again["baseline_int8"]["params"] == rows["baseline"]["params"]
    log.clear()
    run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run", log=log.append)
    assert "[skip] l1_r0.5/int8: done, unchanged" in log
    log.clear()
    run_recipe(load_recipe(tmp_path / "recipe.yaml", ["quantize.calibration=percentile"]),
               tmp_path / "run", log=log.append)
    assert "[run] baseline_int8" in log and "[skip] l1_r0.5/finetune: done, unchanged" in log


def test_a_static_raw_pixel_graph_runs_batches_of_normalised_images(tmp_path):
    """A graph exported for batch 1 (the default) runs larger batches in slices, and one that
    normalises raw pixels itself gets them back from the prepared images."""
    config = tiny_config()
    model = tiny_model().eval()
    path = export_onnx(tmp_path / "static.onnx", model, config.input, model_config=config,
                       raw_pixels=True)
    onnx_model, info = load_onnx_model(path)
    assert onnx_model.fixed_batch == 1 and info.graph["raw_pixels"] is True
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)[-1]
    for name, value in onnx_model(images)[0].items():
        torch.testing.assert_close(value, expected[name], atol=1e-4, rtol=1e-4)


def test_bench_refuses_an_onnx_file_on_the_torch_path(quantized):
    with pytest.raises(ValueError, match="timed in onnxruntime: pass --runtime onnxruntime"):
        bench_checkpoints([quantized.int8_path], input_size=64, runtime="torch", rounds=1)
