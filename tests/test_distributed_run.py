"""`ctprune run` under torchrun on CPU (gloo, 2 processes): the whole smoke chain with one
writer and one channel plan, trained like one process, and a killed run that resumes."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import child_environment

from ctprune import run as run_module
from ctprune.recipe import load_recipe, prepare_data
from ctprune.run import RunError, Stage, run_recipe
from detector import load_model
from detector.checkpoint import build_from_config
from detector.data.dataset import CenterNetDataset, collate
from detector.data.sources import load_source
from detector.losses import centernet_loss

TESTS = Path(__file__).parent
SMOKE = TESTS.parent / "recipes" / "smoke.yaml"
KILLING_RUN = TESTS / "ddp_run.py"
# The smoke chain shrunk to one branch; as in test_distributed.py, no augmentation (both runs
# see the same pixels) and SGD (Adam's sign-like steps turn tiny differences into full steps).
SETTINGS = [
    "train.epochs=3", "train.optimizer=sgd", "train.lr=0.02", "train.eval_interval=0",
    "train.augment.random_crop=false", "train.augment.shift=0", "train.augment.scale=0",
    "train.augment.flip=0", "train.augment.color=false",
    "finetune.epochs=2", "finetune.eval_interval=0",
    "report.controls=false", "report.latency=false",
]
BASELINE_EPOCHS = 3
FINETUNE = "l1_r0.5/finetune"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), "--max_restarts", "0", *arguments]
    return subprocess.run(command, env=child_environment(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A 2-process run whose rank 1 is killed at the end of the first fine-tune epoch (after
    the baseline and the prune), then the same `ctprune run` again, which completes it."""
    root = tmp_path_factory.mktemp("ddp_run")
    (root / "recipes").mkdir()
    recipe = Path(shutil.copy(SMOKE, root / "recipes" / "smoke.yaml"))
    out = root / "run"
    killed = _torchrun(str(KILLING_RUN), str(recipe), str(out), "1", str(BASELINE_EPOCHS + 1),
                       *SETTINGS)
    state_after_kill = {
        "baseline": json.loads((out / "baseline" / "stage.json").read_text()),
        "finetune_epochs": _epochs(out / FINETUNE / "metrics.jsonl"),
        "report": (out / "report.json").exists(),
    }
    sets = [part for setting in SETTINGS for part in ("--set", setting)]
    resumed = _torchrun("-m", "ctprune", "run", str(recipe), "--out", str(out), "--device", "cpu",
                        *sets)
    return root, recipe, out, killed, state_after_kill, resumed


def _epochs(metrics_file: Path) -> list[int]:
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return [line["epoch"] for line in lines if line.get("kind") == "epoch"]


def test_a_killed_worker_stops_the_run_after_the_finished_stages(killed_and_resumed):
    _, _, _, killed, state, _ = killed_and_resumed
    assert killed.returncode != 0
    assert state["baseline"]["complete"] is True
    assert state["finetune_epochs"] == [1]
    assert state["report"] is False


def test_the_rerun_skips_finished_stages_and_completes(killed_and_resumed):
    _, _, out, _, _, resumed = killed_and_resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Rank 0 alone logs: each stage line once.
    for line in ("[skip] baseline: done, unchanged", "[skip] l1_r0.5/prune: done, unchanged",
                 f"[resume] {FINETUNE}"):
        assert resumed.stdout.count(line) == 1, resumed.stdout[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["baseline", "l1_r0.5/prune", FINETUNE]
    assert (out / "manifest.json").is_file() and not (out / ".lock").exists()


def test_no_epoch_is_written_twice(killed_and_resumed):
    _, _, out, _, _, _ = killed_and_resumed
    assert _epochs(out / "baseline" / "metrics.jsonl") == [1, 2, 3]
    assert _epochs(out / FINETUNE / "metrics.jsonl") == [1, 2]


def test_every_rank_holds_rank_0s_channel_plan(killed_and_resumed):
    _, _, out, _, _, _ = killed_and_resumed
    stage = json.loads((out / "l1_r0.5" / "prune" / "stage.json").read_text())
    digests = stage["plan_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    _, checkpoint = load_model(out / FINETUNE / "checkpoint.pt")
    assert checkpoint.channel_plan and run_module.plan_digest(checkpoint.channel_plan) == digests[0]


def _loss_on_training_set(model, recipe) -> float:
    """Train-mode loss over the whole (unaugmented) training set in one batch."""
    source = load_source(recipe.data, "train")
    dataset = CenterNetDataset(source.records, len(source.class_names), recipe.model.input,
                               train=True, augment=recipe.train.augment)
    batch = collate([dataset[i] for i in range(len(dataset))])
    model.train()
    with torch.no_grad():
        return centernet_loss(model(batch["image"]), batch)[0].item()


def test_two_processes_train_the_baseline_like_one(killed_and_resumed, tmp_path):
    _, recipe_path, out, _, _, _ = killed_and_resumed
    recipe = load_recipe(recipe_path, SETTINGS)
    run_recipe(recipe, tmp_path / "single", device="cpu", only="baseline", log=lambda _: None)
    one, _ = load_model(tmp_path / "single" / "baseline" / "checkpoint.pt")
    two, checkpoint = load_model(out / "baseline" / "checkpoint.pt")
    torch.manual_seed(recipe.train.seed)  # what prepare_run seeds to build the model
    start = build_from_config(checkpoint.model_config)
    data = prepare_data(recipe)
    before, after_one, after_two = (_loss_on_training_set(m, data) for m in (start, one, two))
    assert after_one < before and after_two < before
    assert abs(after_two - after_one) < 0.3 * (before - after_one), (before, after_one, after_two)


def test_ranks_with_different_plans_are_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(run_module.distributed, "gather_to_all", lambda value: [value, "other"])
    stage = Stage(tmp_path / "l1_r0.5" / "prune", "l1_r0.5/prune", "prune", "fingerprint")
    with pytest.raises(RunError, match=r"prune/checkpoint\.pt: ranks \[1\] loaded another "
                                       r"channel plan.*shared file system"):
        run_module._same_plan_on_every_rank(stage, {"layer": [4, 8]})
