"""The keypoint-triplet head (``model.head: triplet``) through the whole product, on a tiny
resunet18 trunk at 64 px: the dataset's targets and `fit` (fp32, bf16, resume), distillation
named as missing from a recipe, evaluation and inference (flip test: the decoder gets the
mirrored outputs; several scales: the original's merge), the CLI, pruning with every criterion
in both scopes and the channel-plan round trip, and ONNX / torch.export with onnxruntime parity.
The models, targets, loss and decoder themselves: tests/test_triplet_{models,targets,loss,
decode}.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny import (
    TINY_HEAD_CONV,
    TINY_WIDTHS,
    TinyDetectionData,
    calibration_batch,
    child_environment,
    tiny_config,
    tiny_model,
)
from torch import nn
from torch.utils.data import default_collate

from ctprune.cli import main
from ctprune.pruning import prune
from ctprune.pruning.criteria import CRITERIA, DATA_CRITERIA
from ctprune.pruning.options import SCOPES
from ctprune.recipe import load_recipe
from detector import load_model, output_layers, save_checkpoint
from detector.checkpoint import build_from_config
from detector.config import ConfigError, ModelConfig
from detector.data import transforms
from detector.data.dataset import CenterNetDataset, collate
from detector.data.shapes import generate_shapes
from detector.data.sources import load_data_yaml, load_source
from detector.data.transforms import AugmentConfig
from detector.engine.config import TrainConfig
from detector.engine.fit import fit
from detector.engine.train import train_loader
from detector.evaluate.config import EvaluateConfig
from detector.evaluate.run import evaluate_model, predict_source
from detector.export import DeployModel, export_onnx, export_pt2, onnx_session
from detector.heads import HEADS
from detector.inference.predictor import Predictor, detect
from detector.triplet.decode import (
    decode_triplet,
    merge_triplet_multiscale,
    merge_triplet_scales,
    triplet_candidates,
)
from detector.triplet.heads import PoolFusion, TripletHeads
from detector.triplet.loss import triplet_loss

pytestmark = pytest.mark.timeout(60)

ARCH = "resunet18"
OUTPUTS = tuple(HEADS["triplet"].outputs)
IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
SLOW = pytest.mark.skipif(
    not os.environ.get("CTPRUNE_SLOW_TESTS"),
    reason="the exporter's fixed cost (20-45 s); set CTPRUNE_SLOW_TESTS=1",
)


def triplet_config(num_classes: int = 3) -> ModelConfig:
    return dataclasses.replace(tiny_config(ARCH, num_classes), head="triplet")


def triplet_model(num_classes: int = 3) -> nn.Module:
    return tiny_model(ARCH, num_classes, head="triplet")


def distinct(model: nn.Module, seed: int = 1) -> nn.Module:
    """``model`` with trained-looking BatchNorms and weights of variance 1 / fan-in, so that
    scores differ (a fresh model's heatmaps are flat: ties make the top-K order arbitrary) and
    a mixed-up channel shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                width = module.num_features
                module.weight.copy_(torch.rand(width, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(width, generator=generator) - 0.5)
                module.running_mean.copy_(torch.randn(width, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(width, generator=generator) + 0.5)
            elif isinstance(getattr(module, "weight", None), nn.Parameter):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator) / math.sqrt(fan_in)
                )
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Training


def _train_config(**overrides) -> TrainConfig:
    settings = dict(epochs=4, batch_size=4, lr=2e-3, workers=0, eval_interval=1,
                    lr_steps=[100.0], log_interval=1, seed=1)
    return TrainConfig(**{**settings, **overrides})


def _fit(out_dir: Path, config: TrainConfig, **kwargs):
    torch.manual_seed(0)
    model_config = triplet_config()
    loader = train_loader(TinyDetectionData(8, head="triplet"), config, collate_fn=default_collate)
    return fit(build_from_config(model_config), model_config, config, loader, out_dir, **kwargs)


def test_the_dataset_encodes_triplet_targets(shapes) -> None:
    source = load_source(load_data_yaml(shapes), "train")
    config = triplet_config(len(source.class_names))
    dataset = CenterNetDataset(source.records, config.num_classes, config.input, train=True,
                               head="triplet", augment=AugmentConfig())
    batch = collate([dataset[0], dataset[1]])
    keys = {f"{k}_{part}" for k in ("tl", "br", "ct") for part in ("heatmap", "index", "offset")}
    assert set(batch) == keys | {"image", "mask", "meta"}
    assert batch["tl_heatmap"].shape == (2, config.num_classes, 16, 16)
    assert batch["mask"].sum() >= 2
    for keypoint in ("tl", "br", "ct"):  # every object's keypoint peaks at 1 in its cell
        heatmap = batch[f"{keypoint}_heatmap"].flatten(2).amax(1)  # (B, H W)
        index = batch[f"{keypoint}_index"].long()
        peaks = heatmap.gather(1, index)[batch["mask"] > 0]
        assert torch.equal(peaks, torch.ones_like(peaks))
    total, parts = triplet_loss(triplet_model(config.num_classes)(batch["image"]), batch)
    assert math.isfinite(total.item()) and set(parts) == {"heatmap", "pull", "push", "offset",
                                                          "total"}


def test_fit_trains_a_triplet_model(tmp_path) -> None:
    result = _fit(tmp_path, _train_config())
    losses = [record["train_loss"] for record in result.history]
    assert all(math.isfinite(value) for value in losses) and losses[-1] < losses[0]
    loaded, checkpoint = load_model(tmp_path / "last.pt")
    assert checkpoint.model_config.head == "triplet"
    assert isinstance(loaded.heads, TripletHeads)


def test_bf16_autocast_on_cpu(tmp_path) -> None:
    result = _fit(tmp_path, _train_config(epochs=2, precision="bf16"))
    losses = [record["train_loss"] for record in result.history]
    assert all(math.isfinite(value) for value in losses) and losses[-1] < losses[0]
    loaded, _ = load_model(tmp_path / "last.pt")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    _fit(tmp_path / "straight", _train_config(epochs=3))
    _fit(tmp_path / "split", _train_config(epochs=2))
    _fit(tmp_path / "split", _train_config(epochs=3), resume=True)
    straight, _ = load_model(tmp_path / "straight" / "last.pt")
    resumed, _ = load_model(tmp_path / "split" / "last.pt")
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(
    not os.environ.get("CTPRUNE_SLOW_TESTS"),
    reason="a torchrun job of two processes (about 10 s on 2 cores); set CTPRUNE_SLOW_TESTS=1",
)
def test_ddp_under_torchrun_trains_one_triplet_model(tmp_path) -> None:
    """Two gloo processes (tests/ddp_train.py, as tests/test_distributed.py runs it) train
    one triplet model: the ranks end with the same parameters and the loss falls."""
    generate_shapes(tmp_path / "shapes", num_train=16, num_val=4, image_size=64, seed=5)
    recipe = {
        "name": "ddp_triplet",
        "model": {"arch": ARCH, "head": "triplet", "head_conv": TINY_HEAD_CONV,
                  "widths": TINY_WIDTHS["resunet"], "input": {"input_size": [64, 64]}},
        "data": str(tmp_path / "shapes" / "data.yaml"),
        "train": {"epochs": 2, "batch_size": 8, "optimizer": "sgd", "lr": 0.02, "workers": 0,
                  "eval_interval": 0, "lr_steps": [], "log_interval": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    script = Path(__file__).parent / "ddp_train.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", "--max_restarts", "0",
               str(script), str(path), str(tmp_path / "run"), "-1", "0", "fresh", "cpu"]
    job = subprocess.run(command, env=child_environment(OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=280)
    assert job.returncode == 0, job.stderr[-3000:]
    checksums = re.findall(r"FINAL epochs=2 checksum=(-?\d+\.\d{6})", job.stdout)
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # the ranks hold one model
    _, checkpoint = load_model(tmp_path / "run" / "last.pt")
    assert checkpoint.model_config.head == "triplet"
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss_total"] for record in records if record["kind"] == "train"]
    assert len(losses) >= 2 and losses[-1] < losses[0]


SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"


def test_distilling_a_triplet_student_is_named_when_the_recipe_loads(tmp_path) -> None:
    path = Path(shutil.copy(SMOKE, tmp_path / "smoke.yaml"))
    assert load_recipe(path, ["model.head=triplet"], check_files=False).model.head == "triplet"
    with pytest.raises(ConfigError, match="finetune.distill: .*no triplet distillation loss yet"):
        load_recipe(path, ["model.head=triplet", "finetune.distill={}"], check_files=False)


# ---------------------------------------------------------------------------------------------
# Evaluation and inference


def test_detect_decodes_the_last_stack_and_the_flip_test_its_mirror() -> None:
    model = distinct(triplet_model())
    with torch.no_grad():
        plain = detect(model, IMAGES, max_detections=7, head="triplet")
        assert torch.equal(plain, decode_triplet(model(IMAGES)[-1], None, 7))
        flipped = detect(model, IMAGES, flip=True, max_detections=7, head="triplet")
        expected = decode_triplet(model(IMAGES)[-1], model(IMAGES.flip(-1))[-1], 7)
    torch.testing.assert_close(flipped, expected)
    assert not torch.equal(flipped, plain)


def _reference_multiscale(model, config, image, scales, max_detections):
    """The original's multi-scale test written out: each scale's candidates (flip test off)
    and centres mapped to image pixels, the candidates pooled, scale 1's centres."""
    per_scale, centres = [], None
    for scale in scales:
        network_input, meta = transforms.test_transform(image, config.input, scale, None)
        with torch.no_grad():
            outputs = model(torch.from_numpy(network_input)[None])[-1]
        candidates, points = (value[0].numpy().astype(np.float64)
                              for value in triplet_candidates(outputs))
        affine = meta["inverse_affine"]
        for array, columns in ((candidates, [0, 2]), (points, [0])):
            for x in columns:
                xy = array[:, x : x + 2].copy()
                array[:, x] = affine[0, 0] * xy[:, 0] + affine[0, 1] * xy[:, 1] + affine[0, 2]
                array[:, x + 1] = affine[1, 0] * xy[:, 0] + affine[1, 1] * xy[:, 1] + affine[1, 2]
        per_scale.append(candidates.astype(np.float32))
        if scale == 1.0:
            centres = points.astype(np.float32)
    return merge_triplet_multiscale(per_scale, centres, config.num_classes, max_detections)


def test_the_head_table_merges_triplet_scales_its_own_way() -> None:
    merge = HEADS["triplet"].merge_scales
    assert merge is not None and merge.merge is merge_triplet_scales
    assert HEADS["centernet"].merge_scales is None  # decoded scales, per-class soft-NMS
    arrays = {"candidates": np.array([[1, 2, 3, 4, 0.5, 0.4, 0.6, 1]], np.float32),
              "centres": np.array([[2, 3, 1, 0.7]], np.float32)}
    # output map -> image: x 4 + 1, y 2 + 3 (corners and centres alike; scores, classes kept)
    affine = np.array([[4.0, 0, 1], [0, 2.0, 3]])
    mapped = merge.to_image(arrays, affine)
    np.testing.assert_allclose(mapped["candidates"], [[5, 7, 13, 11, 0.5, 0.4, 0.6, 1]])
    np.testing.assert_allclose(mapped["centres"], [[9, 9, 1, 0.7]])
    with pytest.raises(ValueError, match="expected one array dict per scale"):
        merge_triplet_scales([mapped], (0.5, 1.0), 3, 10)


def test_predictor_single_flip_and_multiscale_use_the_triplet_decoding() -> None:
    model, config = distinct(triplet_model()), triplet_config()
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    [single] = Predictor(model, config, device="cpu").predict([image])
    assert single.boxes.shape == (100, 4) and single.scores[0] > 0
    scales = (0.75, 1.0)
    merged = Predictor(model, config, device="cpu", scales=scales, max_detections=20)
    actual = merged.predict_one(image)
    expected = _reference_multiscale(model, config, image, scales, 20)
    assert len(expected) > 0
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="evaluate.soft_nms: the triplet head"):
        Predictor(model, config, device="cpu", scales=scales, soft_nms="linear").predict_one(image)


def test_evaluation_plain_flip_and_multiscale(shapes) -> None:
    source = load_source(load_data_yaml(shapes), "val")
    config = triplet_config(len(source.class_names))
    model = distinct(triplet_model(config.num_classes))
    plain = EvaluateConfig(batch_size=2, workers=0, pr_curves=False)
    detections, loss = predict_source(model, source, config, plain, "cpu")
    assert loss is not None and math.isfinite(loss)
    assert {rows.shape[1] for rows in detections.values()} == {6}
    for options in ({}, {"flip": True}, {"scales": [0.75, 1.0]}):
        evaluation = dataclasses.replace(plain, **options)
        metrics = evaluate_model(model, source, config, evaluation, "cpu", write_reports=False)
        assert 0 <= metrics["ap50"] <= 1 and "ap75" in metrics


def test_cli_info_detect_and_eval(shapes, tmp_path, capsys) -> None:
    source = load_source(load_data_yaml(shapes), "val")
    config = dataclasses.replace(triplet_config(len(source.class_names)),
                                 class_names=list(source.class_names))
    checkpoint = save_checkpoint(tmp_path / "triplet.pt",
                                 distinct(triplet_model(config.num_classes)), config)
    assert main(["info", str(checkpoint)]) == 0
    assert "arch         resunet18  (head triplet," in capsys.readouterr().out
    image = source.records[0].path
    out = tmp_path / "drawn"
    assert main(["detect", str(checkpoint), str(image), "--out", str(out), "--flip",
                 "--show-heatmap", "--threshold", "0"]) == 0
    assert len(list(out.rglob("*.png")) + list(out.rglob("*.jpg"))) == 2
    assert main(["eval", str(checkpoint), "--data", str(shapes), "--out", str(tmp_path / "ev"),
                 "--set", "evaluate.workers=0", "--set", "evaluate.pr_curves=false"]) == 0
    assert "ap50" in capsys.readouterr().out.lower()


# ---------------------------------------------------------------------------------------------
# Pruning


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_every_criterion_and_scope_keeps_outputs_and_round_trips(criterion, scope, tmp_path):
    model = distinct(triplet_model())
    with torch.no_grad():
        before = model(IMAGES)[-1]
    data = [calibration_batch("triplet")] if criterion in DATA_CRITERIA else None
    result = prune(model, 0.3, criterion, scope=scope, round_to=None, example_inputs=IMAGES[:1],
                   data=data)
    pruned = result.model.eval()
    assert result.stats.params_after < result.stats.params_before
    assert [conv.out_channels for conv in output_layers(pruned)] == [
        conv.out_channels for conv in output_layers(model)
    ]
    with torch.no_grad():
        expected = pruned(IMAGES)[-1]
    assert {k: v.shape for k, v in expected.items()} == {k: v.shape for k, v in before.items()}
    save_checkpoint(tmp_path / "pruned.pt", pruned, triplet_config())
    loaded, checkpoint = load_model(tmp_path / "pruned.pt")
    assert checkpoint.model_config.head == "triplet" and checkpoint.channel_plan
    with torch.no_grad():
        actual = loaded.eval()(IMAGES)[-1]
    for name in OUTPUTS:
        assert torch.equal(actual[name], expected[name]), name


# ---------------------------------------------------------------------------------------------
# Export


def test_onnx_raw_heads_parity(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxslim")
    model, spec = distinct(triplet_model()), triplet_config().input
    path = export_onnx(tmp_path / "triplet.onnx", model, spec, head="triplet", batch=2)
    operators = {node.op_type for node in onnx.load(str(path)).graph.node}
    # The corner pooling's log-step form: max of shifted copies, no cummax / Loop / Scan.
    assert "Max" in operators and not operators & {"Loop", "Scan", "NonZero"}
    session = onnx_session(path, threads=1)
    assert [output.name for output in session.get_outputs()] == list(OUTPUTS)
    actual = session.run(None, {"images": IMAGES.numpy()})
    with torch.no_grad():
        expected = model(IMAGES)[-1]
    for value, name in zip(actual, OUTPUTS, strict=True):
        np.testing.assert_allclose(value, expected[name].numpy(), atol=1e-4, err_msg=name)


def decodable(num_classes: int = 6) -> nn.Module:
    """A `distinct` model whose decoded detections a runtime cannot order differently: random
    weights behind a corner pooling (a running max) leave plateaus of equal heatmap scores, and
    a tiny map may hold fewer peaks than the K = 70 keypoints decoding takes (the rest score
    0); ORT's TopK and torch's break such ties differently (the original's as arbitrarily).
    So the pooled branches are switched off (``p_conv1`` zero: the heatmaps come from the
    shortcut, plateau-free; the raw-heads parity test covers the pooling), there are 6 classes
    (enough peaks at 64 px) and the embeddings are near 0, so that corners pair and some pairs
    find a centre."""
    model = distinct(triplet_model(num_classes))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, PoolFusion):
                module.p_conv1.weight.zero_()
        for name in ("tl_embedding", "br_embedding"):
            model.heads.heads[name][-1].weight.mul_(0.01)
    return model


def _decoded_reference(model: nn.Module, images: torch.Tensor, k: int) -> np.ndarray:
    with torch.no_grad():
        detections = decode_triplet(model(images)[-1], None, k)
    detections[..., :4] *= 4  # the deployed graph gives input pixels
    return detections.numpy()


def _assert_same_detections(actual: np.ndarray, expected: np.ndarray) -> None:
    live = expected[..., 4] > 0
    assert live.sum() >= 5  # a comparison of many detections, not of an empty list
    np.testing.assert_allclose(actual[..., 4], expected[..., 4], atol=1e-4)
    np.testing.assert_array_equal(actual[..., 5][live], expected[..., 5][live])
    np.testing.assert_allclose(actual[..., :4][live], expected[..., :4][live], atol=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(300)
@SLOW
def test_onnx_decoded_parity_without_nonzero(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxslim")
    model, spec = decodable(), triplet_config(6).input
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eager = DeployModel(model, spec, head="triplet", decode=True, max_detections=20)(images)
    expected = _decoded_reference(model, images, 20)
    _assert_same_detections(eager.numpy(), expected)
    path = export_onnx(tmp_path / "decoded.onnx", model, spec, head="triplet", decode=True,
                       batch=2, max_detections=20)
    operators = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "TopK" in operators and not operators & {"NonZero", "Loop", "Scan"}
    [actual] = onnx_session(path, threads=1).run(None, {"images": images.numpy()})
    assert actual.shape == (2, 20, 6)
    _assert_same_detections(actual, expected)


@pytest.mark.slow
@pytest.mark.timeout(300)
@SLOW
def test_pt2_decoded_dynamic_round_trip(tmp_path) -> None:
    model, spec = decodable(), triplet_config(6).input
    path = export_pt2(tmp_path / "triplet.pt2", model, spec, head="triplet", decode=True,
                      dynamic=True, max_detections=20)
    loaded = torch.export.load(path).module()
    for shape in [(1, 3, 64, 64), (2, 3, 96, 64)]:
        images = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            actual = loaded(images)
        _assert_same_detections(actual.numpy(), _decoded_reference(model, images, 20))


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A tiny synthetic benchmark: its data.yaml."""
    root = tmp_path_factory.mktemp("triplet_shapes")
    generate_shapes(root / "shapes", num_train=4, num_val=4, image_size=64, seed=3)
    return root / "shapes" / "data.yaml"
