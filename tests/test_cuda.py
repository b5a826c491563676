"""The CUDA paths that CPU-only CI cannot reach: the whole chain on the device with float16
AMP, channels-last and distillation; one training step, pruning, prediction and benchmarking
against the CPU (nccl DDP: tests/test_distributed.py). Every test here needs a GPU."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_pruning_invariants import IMAGES, randomised
from tiny import (
    TinyDetectionData,
    tiny_config,
    tiny_model,
)
from torch.utils.data import default_collate

from ctprune.bench import bench_models
from ctprune.pruning import prune
from ctprune.recipe import load_recipe, prepare_data
from ctprune.run import run_recipe
from detector import load_model
from detector.data.shapes import generate_shapes
from detector.data.sources import load_source
from detector.evaluate.config import EvaluateConfig
from detector.evaluate.run import evaluate_model
from detector.inference.predictor import Predictor
from detector.losses import centernet_loss

pytestmark = pytest.mark.gpu
TESTS = Path(__file__).parent
SMOKE = TESTS.parent / "recipes" / "smoke.yaml"


@pytest.fixture
def exact_float32():
    """TF32 convolutions and matmuls would differ from the CPU by ~1e-3: compare in float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_smoke_chain_on_cuda_with_amp_channels_last_and_distillation(tmp_path):
    raw = yaml.safe_load(SMOKE.read_text())
    for stage in ("train", "finetune"):
        raw[stage].update(precision="amp", channels_last=True)
    raw["finetune"]["distill"] = {"with_labels": True}  # the run's baseline as teacher
    (tmp_path / "recipes").mkdir()
    recipe_path = tmp_path / "recipes" / "smoke.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    recipe = prepare_data(load_recipe(recipe_path))
    run = tmp_path / "run"
    report = run_recipe(recipe, run, device="cuda")

    rows = {row["name"]: row for row in report["rows"]}
    assert {"baseline", "l1_r0.5/finetune", "control_unpruned/finetune"} <= set(rows)
    for row in rows.values():
        assert 0.0 <= row["ap50"] <= 1.0 and row["gmacs"] > 0
    # Model checkpoints written on the GPU load on a machine without one: CPU tensors only.
    # (resume.pt keeps the optimiser state where it was; fit maps it to the resuming device.)
    checkpoints = [path for path in run.rglob("*.pt") if path.name != "resume.pt"]
    assert checkpoints
    for path in checkpoints:
        tensors = list(_tensors_of(torch.load(path, weights_only=True)))
        assert tensors and all(tensor.device.type == "cpu" for tensor in tensors), path
    resume_path = run / "l1_r0.5" / "finetune" / "resume.pt"
    resume = torch.load(resume_path, weights_only=True, map_location="cpu")
    assert resume["scaler"]["scale"] > 0  # float16 AMP kept its loss scale for a resume

    # The CUDA evaluation agrees with a CPU evaluation of the same checkpoint.
    model, checkpoint = load_model(run / "l1_r0.5" / "finetune" / "checkpoint.pt")
    source = load_source(recipe.data, "val")
    on_cpu = evaluate_model(model, source, checkpoint.model_config,
                            EvaluateConfig(batch_size=16, workers=0), "cpu", write_reports=False)
    assert on_cpu["ap50"] == pytest.approx(rows["l1_r0.5/finetune"]["ap50"], abs=0.02)


def _tensors_of(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_of(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_of(item)


def test_one_training_step_on_cuda_matches_cpu(exact_float32):
    torch.manual_seed(0)
    model = tiny_model().train()
    batch = default_collate([TinyDetectionData(4)[i] for i in range(4)])
    results = {}
    for device in ("cpu", "cuda"):
        replica = copy.deepcopy(model).to(device)
        on_device = {key: value.to(device) for key, value in batch.items()}
        loss, parts = centernet_loss(replica(on_device["image"]), on_device)
        loss.backward()
        gradients = {name: p.grad.cpu() for name, p in replica.named_parameters()}
        results[device] = loss.item(), {k: float(v) for k, v in parts.items()}, gradients
    (cpu_loss, cpu_parts, cpu_grads), (cuda_loss, cuda_parts, cuda_grads) = results.values()
    assert cuda_loss == pytest.approx(cpu_loss, rel=1e-4)
    assert cuda_parts == pytest.approx(cpu_parts, rel=1e-4)
    # Per tensor, relative to its norm: summation order differs between the devices, and a
    # gradient summed over many positions (the deconvolutions') has elements near zero.
    for name, gradient in cpu_grads.items():
        error = (cuda_grads[name] - gradient).norm() / gradient.norm().clamp_min(1e-12)
        assert error < 1e-4, (name, error.item())


def test_amp_training_on_cuda_resumes(tmp_path):
    from detector.checkpoint import build_from_config
    from detector.engine.config import TrainConfig
    from detector.engine.fit import fit
    from detector.engine.train import train_loader

    def train(epochs, resume):
        config = TrainConfig(epochs=epochs, batch_size=4, lr=2e-3, workers=0, lr_steps=[100.0],
                             precision="amp", channels_last=True, seed=1)
        model_config = tiny_config()
        loader = train_loader(TinyDetectionData(8), config, collate_fn=default_collate)
        return fit(build_from_config(model_config), model_config, config, loader, tmp_path,
                   device="cuda", resume=resume)

    train(1, resume=False)
    state = torch.load(tmp_path / "resume.pt", weights_only=True, map_location="cpu")
    scale = state["scaler"]["scale"]
    result = train(2, resume=True)
    assert result.epochs == 2 and len(result.history) == 2
    assert scale > 0


@pytest.mark.parametrize("criterion", ["l1", "bn_gamma", "kmeans"])
def test_pruning_on_cuda_matches_cpu(criterion, exact_float32):
    model = randomised("res18")
    on_cpu = prune(model, 0.5, criterion, round_to=None).model
    on_cuda = prune(copy.deepcopy(model).cuda(), 0.5, criterion, round_to=None).model
    assert next(on_cuda.parameters()).is_cuda
    assert [p.shape for p in on_cuda.parameters()] == [p.shape for p in on_cpu.parameters()]
    with torch.no_grad():
        expected = on_cpu.eval()(IMAGES)[0]
        actual = on_cuda.eval()(IMAGES.cuda())[0]
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].cpu(), value, rtol=1e-4, atol=1e-4, msg=name)


def test_predictor_on_cuda_matches_cpu(exact_float32):
    config = tiny_config()
    model = randomised("res18")
    image = np.random.default_rng(0).integers(0, 255, size=(48, 80, 3), dtype=np.uint8)
    expected = Predictor(copy.deepcopy(model), config, device="cpu").predict_one(image)
    actual = Predictor(model, config, device="cuda").predict_one(image)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-3)


def test_bench_on_cuda_times_and_measures_memory():
    spec = tiny_config().input
    model = tiny_model().eval()
    pruned = prune(model, 0.5, "l1", round_to=None).model.eval()
    rows = bench_models({"base": (model, spec), "pruned": (pruned, spec)}, pairs={"pruned": "base"},
                        eager=("base",), input_size=64, rounds=3, device="cuda", throughput_batch=2)
    assert [row.device for row in rows] == ["cuda"] * 3
    for row in rows:
        assert row.latency_ms > 0 and row.throughput > 0 and row.peak_mib > 0
    assert rows[1].speedup > 0 and rows[1].ideal_speedup > 1


def test_cli_eval_and_detect_on_cuda(tmp_path, capsys):
    from ctprune.cli import main
    from detector import save_checkpoint

    generate_shapes(tmp_path / "shapes", num_train=4, num_val=4, image_size=64, seed=3)
    config = tiny_config(num_classes=6)
    checkpoint = save_checkpoint(tmp_path / "model.pt", tiny_model(num_classes=6), config)
    assert main(["eval", str(checkpoint), "--data", str(tmp_path / "shapes" / "data.yaml"),
                 "--device", "cuda", "--out", str(tmp_path / "eval"),
                 "--set", "evaluate.workers=0"]) == 0
    assert "ap50" in capsys.readouterr().out
    image = sorted((tmp_path / "shapes" / "images" / "val").iterdir())[0]
    assert main(["detect", str(checkpoint), str(image), "--device", "cuda",
                 "--out", str(tmp_path / "det"),
                 "--threshold", "0.0", "--show-heatmap"]) == 0
    assert len(list((tmp_path / "det").glob("*.png"))) == 2
