"""torchrun DDP on CPU (gloo): two processes train like one, and a killed worker stops the
job cleanly so that it can resume; on CUDA (nccl, marked gpu): SyncBatchNorm and AMP."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import TINY_HEAD_CONV, TINY_WIDTHS, child_environment

from detector import load_model
from detector.checkpoint import build_from_config
from detector.data.shapes import generate_shapes

TESTS = Path(__file__).parent
SCRIPT = TESTS / "ddp_train.py"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    generate_shapes(root / "shapes", num_train=16, num_val=4, image_size=64, seed=5)
    recipe = {
        "name": "ddp",
        "model": {
            "arch": "res18",
            "head_conv": TINY_HEAD_CONV,
            "widths": TINY_WIDTHS["res"],
            "input": {"input_size": [64, 64]},
        },
        "data": str(root / "shapes" / "data.yaml"),
        # No augmentation: both runs must see the same pixels; no eval: it is not compared.
        # SGD, not Adam: Adam's sign-like steps turn tiny gradient differences into full steps.
        "train": {
            "epochs": 3,
            "batch_size": 8,
            "optimizer": "sgd",
            "lr": 0.02,
            "workers": 0,
            "eval_interval": 0,
            "lr_steps": [],
            "augment": {
                "random_crop": False,
                "shift": 0.0,
                "scale": 0.0,
                "flip": 0.0,
                "color": False,
            },
        },
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _environment():
    return child_environment(OMP_NUM_THREADS="1")


def _single(recipe, out_dir):
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(recipe), str(out_dir), "-1", "0", "fresh"],
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _torchrun(recipe, out_dir, kill_rank=-1, kill_epoch=0, mode="fresh", processes=2, device="cpu"):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--standalone", "--max_restarts", "0",
               str(SCRIPT), str(recipe), str(out_dir), str(kill_rank), str(kill_epoch), mode,
               device]
    return subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=300)


def _loss_on_training_set(model, recipe_path):
    """Train-mode loss over the whole (unaugmented) training set in one batch."""
    from detector.data.dataset import CenterNetDataset, collate
    from detector.data.sources import load_source
    from detector.engine.config import load_train_recipe
    from detector.losses import centernet_loss

    recipe = load_train_recipe(recipe_path)
    source = load_source(recipe.data, "train")
    dataset = CenterNetDataset(
        source.records, 6, recipe.model.input, train=True, augment=recipe.train.augment
    )
    batch = collate([dataset[i] for i in range(len(dataset))])
    model.train()
    with torch.no_grad():
        return centernet_loss(model(batch["image"]), batch)[0].item()


def test_two_processes_match_one_within_noise(recipe, tmp_path):
    single = _single(recipe, tmp_path / "single")
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = _torchrun(recipe, tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # Both ranks print to one pipe, so their lines may interleave: find the figures, not lines.
    checksums = re.findall(r"FINAL epochs=\d+ checksum=(-?\d+\.\d{6})", ddp.stdout)
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # the ranks hold one model
    one, _ = load_model(tmp_path / "single" / "last.pt")
    two, checkpoint = load_model(tmp_path / "ddp" / "last.pt")
    torch.manual_seed(317)  # the recipe's seed, which prepare_run seeds to build the model
    start = build_from_config(checkpoint.model_config)
    before, after_one, after_two = (_loss_on_training_set(m, recipe) for m in (start, one, two))
    # Same data, global batch and lr: the runs differ only by per-process BatchNorm statistics
    # and loss normalisation, so both learn about as much.
    assert after_one < before and after_two < before
    assert abs(after_two - after_one) < 0.3 * (before - after_one), (before, after_one, after_two)


def test_a_killed_worker_stops_the_job_and_it_resumes(recipe, tmp_path):
    out = tmp_path / "run"
    killed = _torchrun(recipe, out, kill_rank=1, kill_epoch=1)
    assert killed.returncode != 0
    assert "FINAL" not in killed.stdout
    assert load_model(out / "last.pt")[1].meta["epoch"] == 1
    resumed = _torchrun(recipe, out, mode="resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epochs=3" in resumed.stdout
    assert load_model(out / "last.pt")[1].meta["epoch"] == 3


@pytest.mark.gpu
def test_nccl_with_sync_batchnorm_and_amp(recipe, tmp_path):
    """One process per GPU (one will do): nccl, SyncBatchNorm, float16 AMP and the distributed
    evaluation; the checkpoint holds plain BatchNorms again."""
    raw = yaml.safe_load(recipe.read_text())
    raw["train"].update(precision="amp", sync_batchnorm=True, eval_interval=1, workers=1)
    cuda_recipe = tmp_path / "recipe.yaml"
    cuda_recipe.write_text(yaml.safe_dump(raw))
    finished = _torchrun(cuda_recipe, tmp_path / "run", processes=torch.cuda.device_count(),
                         device="cuda")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "FINAL epochs=3" in finished.stdout
    model, checkpoint = load_model(tmp_path / "run" / "last.pt")
    assert not any(isinstance(module, torch.nn.SyncBatchNorm) for module in model.modules())
    assert checkpoint.meta["epoch"] == 3



AVERAGE_GRADIENTS = """
import sys
import torch
import torch.distributed as dist
from detector.distributed import average_gradients, run_on_main

dist.init_process_group("gloo")
rank = dist.get_rank()
with_gradient = torch.nn.Parameter(torch.zeros(3))
with_gradient.grad = torch.full((3,), float(rank + 1))  # 1 on rank 0, 2 on rank 1
only_on_rank_1 = torch.nn.Parameter(torch.zeros(2))
if rank == 1:
    only_on_rank_1.grad = torch.full((2,), 4.0)
average_gradients([with_gradient, only_on_rank_1])
print(f"RANK{rank} {with_gradient.grad.tolist()} {only_on_rank_1.grad.tolist()}")
print(f"RANK{rank} got {run_on_main(lambda: f'rank {rank} was here')!r}")


def refuse():
    raise ValueError("manifest.json: recipe_name 'other', expected 'smoke'")


try:
    run_on_main(refuse)
except ValueError as error:
    print(f"RANK{rank} raised {error}")
dist.destroy_process_group()
"""


def test_extra_parameters_get_the_average_gradient_on_every_process(tmp_path):
    """Also `run_on_main`: rank 0's result, and rank 0's error, on every rank."""
    script = tmp_path / "average.py"
    script.write_text(AVERAGE_GRADIENTS)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", "--max_restarts", "0", str(script)]
    finished = subprocess.run(command, env=_environment(), capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]
    for rank in (0, 1):
        assert f"RANK{rank} [1.5, 1.5, 1.5] [2.0, 2.0]" in finished.stdout
        assert f"RANK{rank} got 'rank 0 was here'" in finished.stdout
        assert (f"RANK{rank} raised manifest.json: recipe_name 'other', expected 'smoke'"
                in finished.stdout)
