"""Runs and their files: nothing finished is replaced without --overwrite, a rerun checks new
settings before it removes anything, one writer per run folder, Ctrl-C exits 130 with the
resume command, a diverging loss names a checkpoint that exists, and `ctprune check` runs the
checks that come before any work."""

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny import TinyDetectionData, tiny_config, tiny_model
from torch.utils.data import default_collate

from ctprune import cli
from ctprune.lock import LOCK_FILE, RunLocked, acquire, run_lock
from ctprune.preflight import (
    PreflightError,
    check_device,
    default_notes,
    preflight,
)
from ctprune.recipe import load_recipe, prepare_data
from ctprune.run import Runner, Stage, _aside_folder
from detector import save_checkpoint
from detector.config import ConfigError
from detector.engine.config import TrainConfig
from detector.engine.fit import TrainingDiverged, fit, load_resume_state
from detector.engine.train import train_loader

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"
FAST = ["--set", "train.epochs=1", "--set", "report.latency=false"]


def _smoke(tmp_path: Path, text: str | None = None) -> Path:
    """The smoke recipe (or ``text``) in tmp_path/recipes/, its data under tmp_path/data/."""
    (tmp_path / "recipes").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipes" / "smoke.yaml"
    path.write_text(text if text is not None else SMOKE.read_text())
    return path


@pytest.fixture
def smoke(tmp_path, monkeypatch):
    """The smoke recipe with its data generated, the working directory tmp_path."""
    monkeypatch.chdir(tmp_path)
    path = _smoke(tmp_path)
    prepare_data(load_recipe(path))
    return path


def _main(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- case 1: train into a folder holding a run ---------------------------------------------------
def test_train_into_a_training_run_is_refused_unless_resume_or_overwrite(smoke, tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "best.pt").write_text("an earlier run")
    (out / "last_ema.pt").write_text("an earlier run's weight average (train.ema_decay)")
    (out / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 7}\n')
    code, _, err = _main(capsys, "train", smoke, "--out", out, *FAST)
    assert code == 2
    assert f"{out}: holds a training run (last_ema.pt, best.pt, metrics.jsonl)" in err
    assert "--resume" in err and "--overwrite" in err
    assert (out / "best.pt").read_text() == "an earlier run"
    code, out_text, err = _main(capsys, "train", smoke, "--out", out, "--overwrite", *FAST)
    assert code == 0, err
    assert "removed the previous run's files" in out_text
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs == [1]  # the old run's epoch 7 is gone, not mixed in
    assert not (out / "last_ema.pt").exists()  # this run keeps no average: nothing stale stays
    assert not (out / LOCK_FILE).exists()
    code, _, err = _main(capsys, "train", smoke, "--out", out, "--resume", "--overwrite")
    assert code == 2 and "--resume and --overwrite" in err


def test_train_into_a_ctprune_run_folder_is_refused(smoke, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text('{"recipe_name": "smoke"}')
    (out / "recipe.yaml").write_text("the run's recipe")
    for extra in ([], ["--overwrite"]):
        code, _, err = _main(capsys, "train", smoke, "--out", out, *extra)
        assert code == 2 and f"{out}: holds a `ctprune run` (manifest.json)" in err
    assert (out / "recipe.yaml").read_text() == "the run's recipe"


def test_prepare_run_never_replaces_a_run_folders_recipe(smoke, tmp_path):
    from ctprune.layout import MANIFEST_FILE
    from detector.engine.train import prepare_run

    out = tmp_path / "run"
    out.mkdir()
    (out / MANIFEST_FILE).write_text("{}")
    (out / "recipe.yaml").write_text("the run's recipe")
    recipe = prepare_data(load_recipe(smoke))
    with pytest.raises(ConfigError, match="holds a ctprune run"):
        prepare_run(recipe.train_recipe(), out, device="cpu")
    assert (out / "recipe.yaml").read_text() == "the run's recipe"


# --- case 2: outputs never replace inputs --------------------------------------------------------
@pytest.mark.parametrize("command", [["prune", "--ratio", "0.5"], ["export", "--format", "onnx"]])
def test_prune_and_export_refuse_to_write_over_their_input(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    (tmp_path / "link.pt").symlink_to(checkpoint)
    name, *options = command
    for out in ("model.pt", "sub/../model.pt", "link.pt"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        code, _, err = _main(capsys, name, "model.pt", *options, "--out", out)
        assert code == 2 and f"--out {out}: is the input checkpoint model.pt" in err
    (tmp_path / "other.bin").write_text("someone's file")
    code, _, err = _main(capsys, name, "model.pt", *options, "--out", "other.bin")
    assert code == 2 and "--out other.bin: exists; add --overwrite" in err
    assert checkpoint.read_bytes() == b"weights"
    assert (tmp_path / "other.bin").read_text() == "someone's file"


# --- case 3: a rerun checks before it removes, and keeps the old stage until the new completes ---
def _bare_runner(tmp_path: Path, log: list) -> Runner:
    runner = Runner.__new__(Runner)
    runner.order, runner.rerun_from, runner.only, runner.log = 0, None, None, log.append
    runner.stage_names = []
    runner.baseline_stage, runner.out_dir = None, tmp_path
    runner.model_config = tiny_config()
    return runner


def _finished_stage(folder: Path, fingerprint: str) -> Stage:
    (folder / "eval").mkdir(parents=True)
    (folder / "checkpoint.pt").write_text("old weights")
    (folder / "eval" / "metrics.json").write_text("{}")
    (folder / "stage.json").write_text(json.dumps({"complete": True, "fingerprint": "old"}))
    return Stage(folder, "l1/finetune", "finetune", fingerprint)


def test_a_failing_rerun_puts_the_previous_stage_back(tmp_path):
    log = []
    runner = _bare_runner(tmp_path, log)
    stage = _finished_stage(tmp_path / "l1" / "finetune", "new")

    def diverges(stage, resume):
        (stage.folder / "last.pt").write_text("new, diverging")
        raise TrainingDiverged("non-finite loss ... the last good checkpoint is X",
                               reason="non-finite loss (nan) at epoch 2, step 1")

    with pytest.raises(TrainingDiverged) as raised:
        runner._run_stage(stage, diverges)
    message = str(raised.value)
    assert "l1/finetune: non-finite loss (nan) at epoch 2, step 1" in message
    assert f"previous results (other settings) are back in {stage.folder}" in message
    assert (stage.folder / "checkpoint.pt").read_text() == "old weights"
    assert not (stage.folder / "last.pt").exists()
    assert not _aside_folder(stage.folder).exists()
    assert any(line.startswith("[restored] l1/finetune") for line in log)


def test_a_completed_rerun_removes_the_previous_stage(tmp_path, monkeypatch):
    monkeypatch.setattr("ctprune.run.stage_figures", lambda *args, **kwargs: {})
    runner = _bare_runner(tmp_path, [])
    runner.recipe = type("R", (), {"report": load_recipe(SMOKE, check_files=False).report})()
    stage = _finished_stage(tmp_path / "l1" / "finetune", "new")
    seen = []

    def work(stage, resume):
        seen.append(_aside_folder(stage.folder).is_dir())  # the old results wait aside
        (stage.folder / "checkpoint.pt").write_text("new weights")
        return {}

    info = runner._run_stage(stage, work)
    assert seen == [True] and info["complete"] is True
    assert (stage.folder / "checkpoint.pt").read_text() == "new weights"
    assert not _aside_folder(stage.folder).exists()


def test_results_a_killed_rerun_left_aside_are_recovered(tmp_path):
    runner = _bare_runner(tmp_path, [])
    folder = tmp_path / "l1" / "finetune"
    # killed right after the old results were moved aside: nothing replaced them
    _finished_stage(_aside_folder(folder), "old")
    old = Stage(folder, "l1/finetune", "finetune", "old")
    assert runner._run_stage(old, None)["fingerprint"] == "old"  # skipped: done, unchanged
    assert (folder / "checkpoint.pt").read_text() == "old weights"
    # killed during the replacement, then the old settings asked for again
    folder.rename(_aside_folder(folder))
    folder.mkdir()
    (folder / "stage.json").write_text(json.dumps({"complete": False, "fingerprint": "new"}))
    assert runner._run_stage(old, None)["fingerprint"] == "old"
    assert not _aside_folder(folder).exists()


def test_a_teacher_with_the_wrong_class_count_is_named_before_any_work(smoke, tmp_path):
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, tiny_model(num_classes=3), tiny_config(num_classes=3))
    recipe = load_recipe(smoke, [f"finetune.distill.teachers=[{{checkpoint: {teacher}}}]"])
    with pytest.raises(PreflightError, match=r"teachers\[0\].*has 3 classes, the student 6"):
        preflight(recipe, tmp_path / "run", "cpu")


def test_a_teacher_seeing_other_pixels_is_named_before_any_work(smoke, tmp_path):
    import dataclasses

    config = tiny_config(num_classes=6)
    config = dataclasses.replace(config, input=dataclasses.replace(config.input, std=(1, 1, 1)))
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, tiny_model(num_classes=6), config)
    recipe = load_recipe(smoke, [f"finetune.distill.teachers=[{{checkpoint: {teacher}}}]"])
    with pytest.raises(PreflightError, match=r"teachers\[0\].*input std is \[1.0, 1.0, 1.0\]"):
        preflight(recipe, tmp_path / "run", "cpu")


def test_a_baseline_checkpoint_for_other_data_is_named(smoke, tmp_path):
    baseline = tmp_path / "baseline.pt"
    save_checkpoint(baseline, tiny_model(num_classes=3), tiny_config(num_classes=3))
    recipe = load_recipe(smoke, [f"baseline.checkpoint={baseline}"])
    with pytest.raises(PreflightError, match=f"baseline.checkpoint: {baseline} has 3 classes"):
        preflight(recipe, tmp_path / "run", "cpu")


# --- case 4: one writer per run folder -----------------------------------------------------------
def test_a_locked_run_folder_names_its_holder(smoke, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # pid 1 always runs: a live holder on this host
    holder = {"pid": 1, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00",
              "command": "ctprune run recipes/x.yaml"}
    (out / LOCK_FILE).write_text(json.dumps(holder))
    for command in ("run", "train"):
        code, _, err = _main(capsys, command, smoke, "--out", out)
        assert code == 2
        assert (f"{out} is being written by pid 1 on host {socket.gethostname()} since "
                "2026-01-01T00:00:00+00:00 (ctprune run recipes/x.yaml)") in err
    assert json.loads((out / LOCK_FILE).read_text()) == holder


def test_a_stale_lock_is_taken_over_and_the_lock_is_released_on_errors(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead),
                                                  "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match=f"taking over the lock of pid {dead}"):
        path = acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    path.unlink()
    with pytest.raises(KeyboardInterrupt), run_lock(tmp_path, ["ctprune", "run", "x.yaml"]):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["command"] == "ctprune run x.yaml"
        raise KeyboardInterrupt
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with warnings.catch_warnings(), pytest.raises(RunLocked, match="pid 1 on host elsewhere"):
        warnings.simplefilter("error")  # another host's lock is never taken over
        acquire(tmp_path)


# --- case 5: Ctrl-C ------------------------------------------------------------------------------
def _interrupt_after_epoch(monkeypatch, module: str, epoch: int) -> None:
    """``module``'s `train` gets an on_epoch_end that presses Ctrl-C after ``epoch``."""
    import ctprune.train as ctprune_train

    real_fit = ctprune_train.fit

    def fit_then_interrupt(*args, **kwargs):
        def on_epoch_end(done, model, record):
            if done == epoch:
                raise KeyboardInterrupt

        return real_fit(*args, **{**kwargs, "on_epoch_end": on_epoch_end})

    monkeypatch.setattr(ctprune_train, "fit", fit_then_interrupt)


def test_ctrl_c_during_train_keeps_the_last_epoch_and_prints_the_resume_command(
    smoke, tmp_path, capsys, monkeypatch
):
    _interrupt_after_epoch(monkeypatch, "ctprune.train", 1)
    code, _, err = _main(capsys, "train", "recipes/smoke.yaml", "--out", "t",
                         "--set", "train.epochs=2")
    assert code == 130 and "Traceback" not in err
    assert "interrupted: kept t/last.pt (epoch 1) and its resume state." in err
    assert ("Resume with: ctprune train recipes/smoke.yaml --out t --set train.epochs=2 --resume"
            in err)
    assert not (tmp_path / "t" / LOCK_FILE).exists()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(capsys, "train", "recipes/smoke.yaml", "--out", "t",
                           "--set", "train.epochs=2", "--resume")
    assert code == 0, err
    assert "trained 2 epochs" in out


def test_ctrl_c_before_the_first_epoch_says_nothing_was_kept(smoke, tmp_path, capsys,
                                                              monkeypatch):
    def interrupted_in_epoch_1(model, model_config, config, loader, out_dir, **kwargs):
        (Path(out_dir) / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr("ctprune.train.fit", interrupted_in_epoch_1)
    code, _, err = _main(capsys, "train", "recipes/smoke.yaml", "--out", "t")
    assert code == 130 and "Traceback" not in err
    assert "no epoch finished, so nothing was kept in t." in err
    assert "Start again with: ctprune train recipes/smoke.yaml --out t --overwrite" in err


def test_ctrl_c_during_run_says_what_was_kept(smoke, tmp_path, capsys, monkeypatch):
    _interrupt_after_epoch(monkeypatch, "ctprune.run", 1)
    code, _, err = _main(capsys, "run", "recipes/smoke.yaml", "--out", "r", *FAST)
    assert code == 130 and "Traceback" not in err
    assert "finished stages kept in r: none; the interrupted stage resumes" in err
    assert ("Resume with: ctprune run recipes/smoke.yaml --out r --set train.epochs=1 "
            "--set report.latency=false") in err
    assert not (tmp_path / "r" / LOCK_FILE).exists()


# --- case 6: a diverging loss --------------------------------------------------------------------
def _fit(out_dir, epochs=2, **kwargs):
    config = TrainConfig(epochs=epochs, batch_size=4, lr=2e-3, workers=0, eval_interval=1,
                         lr_steps=[100.0], log_interval=1, seed=1)
    model_config = tiny_config()
    loader = train_loader(TinyDetectionData(8), config, collate_fn=default_collate)
    return fit(tiny_model(), model_config, config, loader, out_dir, **kwargs)


def test_an_exploding_loss_stops_and_says_no_checkpoint_was_kept(tmp_path):
    from detector.losses import centernet_loss

    steps = []

    def explodes_at_step_2(outputs, batch):
        loss, parts = centernet_loss(outputs, batch)
        steps.append(1)
        return (loss * 1e20 if len(steps) == 2 else loss), parts

    with pytest.raises(TrainingDiverged) as raised:
        _fit(tmp_path, loss_fn=explodes_at_step_2)
    message = str(raised.value)
    assert "exploding loss" in message and "at epoch 1, step 2" in message
    assert "no epoch finished, so no checkpoint was kept" in message
    assert not (tmp_path / "last.pt").exists()


def test_an_exploding_validation_loss_keeps_the_previous_epoch_only(tmp_path):
    losses = iter([3.0, 1e30])
    with pytest.raises(TrainingDiverged) as raised:
        _fit(tmp_path, evaluate=lambda model: {"loss": next(losses), "ap50": 0.5})
    message = str(raised.value)
    assert "validation loss 1e+30" in message and "end of epoch 2" in message
    assert f"the last good checkpoint is {tmp_path / 'last.pt'} (epoch 1)" in message
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["epoch"] == 1


# --- case 7: resuming from damaged files ---------------------------------------------------------
def test_resume_names_the_missing_or_damaged_file(tmp_path, capsys, smoke):
    out = tmp_path / "t"
    out.mkdir()
    (out / "last.pt").write_bytes(b"weights")
    code, _, err = _main(capsys, "train", smoke, "--out", out, "--resume")
    assert code == 2 and f"{out / 'resume.pt'}: missing, so {out / 'last.pt'} cannot" in err
    (out / "resume.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="resume.pt: not a readable resume file"):
        load_resume_state(out / "resume.pt")
    torch.save({"epoch": socket.socket}, out / "resume.pt")  # a pickled Python object
    with pytest.raises(ValueError, match="resume.pt: holds pickled Python objects"):
        load_resume_state(out / "resume.pt")
    torch.save({"epoch": 3}, out / "resume.pt")
    with pytest.raises(ValueError, match=r"resume.pt: not a resume file .*'optimizer'"):
        load_resume_state(out / "resume.pt")


# --- case 8: the recipe name as a folder ---------------------------------------------------------
def test_the_cli_refuses_a_path_as_the_run_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _smoke(tmp_path, SMOKE.read_text().replace("name: smoke", "name: ../../escaped"))
    code, _, err = _main(capsys, "run", path)
    assert code == 2 and "name: expected letters, digits" in err and "'../../escaped'" in err
    assert not (tmp_path.parent / "escaped").exists()


# --- case 9: --only ------------------------------------------------------------------------------
def test_only_baseline_in_a_new_folder_succeeds(smoke, tmp_path, capsys):
    code, out, err = _main(capsys, "run", smoke, "--out", "r", "--only", "baseline", *FAST)
    assert code == 0, err
    assert (tmp_path / "r" / "baseline" / "checkpoint.pt").is_file()
    assert not (tmp_path / "r" / "l1_r0.5").exists()


def test_only_a_stage_whose_inputs_are_missing_fails_before_work(smoke, tmp_path, capsys):
    code, _, err = _main(capsys, "run", smoke, "--out", "r", "--only", "finetune", *FAST)
    assert code == 2 and "baseline: needed by --only finetune but not done" in err
    assert not (tmp_path / "r" / "baseline").exists()


# --- case 10: devices ----------------------------------------------------------------------------
def test_devices_this_machine_lacks_are_named(monkeypatch):
    with pytest.raises(ConfigError, match="--device 'tpu': expected cpu, cuda, cuda:N or mps"):
        check_device("tpu")
    with pytest.raises(ConfigError, match="--device 'cpu:1'"):
        check_device("cpu:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
        check_device("cuda")
    assert check_device(None) == "cpu" and check_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="--device cuda:3: this machine has 1 CUDA device"):
        check_device("cuda:3")
    assert check_device("cuda:0") == "cuda:0"


def test_amp_on_the_cpu_fails_before_any_work(smoke, tmp_path, capsys):
    code, _, err = _main(capsys, "train", smoke, "--out", "t", "--device", "cpu",
                         "--set", "train.precision=amp")
    assert code == 2 and "train.precision: 'amp'" in err and "needs CUDA" in err
    assert not (tmp_path / "t").exists()


# --- case 11: preflight and `ctprune check` ------------------------------------------------------
def test_check_prints_ok_lines_and_exit_0(smoke, capsys):
    code, out, err = _main(capsys, "check", smoke, "--device", "cpu")
    assert code == 0, err
    assert "ok: device: cpu" in out and "ok: data: train split, 32 images, 6 classes" in out
    assert "ok: disk: about" in out and "ready to run into runs/smoke" in out


def test_check_lists_every_problem_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _smoke(tmp_path)  # the synthetic data is not generated: counts as present
    (tmp_path / "afile").write_text("")
    recipe = load_recipe(path, ["train.precision=amp"])
    notes = preflight(load_recipe(path), tmp_path / "run", "cpu")
    assert any("will be generated by the recipe's synthetic section" in note for note in notes)
    code, _, err = _main(capsys, "check", path, "--device", "tpu", "--out", "afile/run",
                         "--set", "train.precision=amp")
    assert code == 2
    assert "4 problem(s) found before any work" in err  # finetune inherits train's precision
    assert "--device 'tpu'" in err and "train.precision: 'amp'" in err
    assert "finetune.precision: 'amp'" in err
    assert "--out afile/run:" in err and "is not a folder" in err
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(PreflightError, match=r"--out run: 0.00 GiB free on its disk, the run's "
                                             r"checkpoints need about"):
        preflight(recipe, Path("run"), "cuda" if torch.cuda.is_available() else "cpu")


def test_check_names_data_that_does_not_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = "\n".join(
        "data: {train: missing/train.json, val: missing/val.json, images: missing}"
        if line.startswith("data:") else line
        for line in SMOKE.read_text().splitlines() if not line.startswith("synthetic:"))
    code, _, err = _main(capsys, "check", _smoke(tmp_path, text), "--device", "cpu")
    assert code == 2
    assert "data (train split)" in err and "data (val split)" in err and "missing" in err


# --- case 12: defaults taken for a missing section -----------------------------------------------
def test_sections_left_to_the_defaults_are_printed(smoke, tmp_path, capsys):
    path = _smoke(tmp_path / "bare", "name: bare\ndata: ../../data/smoke_shapes/data.yaml\n")
    notes = default_notes(load_recipe(path))
    assert any(note.startswith("recipe has no `model` section: using model.arch=res18, "
                               "input 512x512") for note in notes)
    assert any("recipe has no `train` section: training 140 epochs" in note for note in notes)
    overrides = ["model.arch=res18", "train.lr=1e-3"]
    assert default_notes(load_recipe(path, overrides), overrides) == [
        "recipe has no `evaluate` section: evaluating with the defaults"]
    code, out, _ = _main(capsys, "check", path, "--device", "cpu")
    assert "note: recipe has no `model` section" in out


# --- damaged bookkeeping files of a run ----------------------------------------------------------
def test_a_truncated_stage_or_manifest_file_is_named(smoke, tmp_path):
    from ctprune.run import RunError, write_manifest

    stage_folder = tmp_path / "run" / "baseline"
    stage_folder.mkdir(parents=True)
    (stage_folder / "stage.json").write_text('{"complete": tr')
    with pytest.raises(RunError, match=r"baseline/stage.json: not valid JSON .*remove .*baseline "
                                       "to run the stage again"):
        Stage(stage_folder, "baseline", "baseline", "x").is_done()
    (tmp_path / "run" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(RunError, match="manifest.json: expected a JSON object, got list"):
        write_manifest(load_recipe(smoke), tmp_path / "run", None)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CTPRUNE_SLOW_TESTS"),
                    reason="a child process and a real SIGINT, ~10 s; set CTPRUNE_SLOW_TESTS=1")
def test_a_real_sigint_during_train_exits_130_without_a_traceback(smoke, tmp_path):
    import signal
    import time

    from tiny import child_environment

    command = [sys.executable, "-m", "ctprune", "train", "recipes/smoke.yaml", "--out", "t",
               "--set", "train.epochs=50"]
    child = subprocess.Popen(command, cwd=tmp_path, env=child_environment(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "t" / "resume.pt").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted: kept t/last.pt (epoch " in err
    assert ("Resume with: ctprune train recipes/smoke.yaml --out t --set train.epochs=50 "
            "--resume") in err
    assert not (tmp_path / "t" / LOCK_FILE).exists()


def test_the_metrics_log_never_mixes_runs_or_repeats_steps(tmp_path):
    _fit(tmp_path, epochs=1)
    log = tmp_path / "metrics.jsonl"
    # a kill during epoch 2: its steps were logged, then a line was cut
    log.write_text(log.read_text() + '{"kind": "train", "epoch": 2, "step": 3}\n{"kind": "tr')
    _fit(tmp_path, epochs=2, resume=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [record["step"] for record in records if record["kind"] == "train"]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4]
    assert [record["epoch"] for record in records if record["kind"] == "epoch"] == [1, 2]
    _fit(tmp_path, epochs=1)  # a fresh run in the same folder starts a fresh log
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 1, 1]


def test_check_names_widths_the_architecture_cannot_take(tmp_path, capsys, monkeypatch):
    # model.widths is checked against the family's topology by building it on the meta device.
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(capsys, "check", _smoke(tmp_path), "--device", "cpu",
                         "--set", "model.widths.stages=[8, 16]")
    assert code == 2
    assert "model.widths.stages: expected 4 positive integers" in err
