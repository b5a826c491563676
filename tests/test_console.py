"""The console and the run's record: the per-epoch line, train.log, metrics.csv beside
metrics.jsonl, the TensorBoard writer's closing, and `ctprune --help` without torch."""

import csv
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny import TinyDetectionData, tiny_config
from torch.utils.data import default_collate

from detector.checkpoint import build_from_config
from detector.engine.config import TrainConfig
from detector.engine.fit import fit
from detector.engine.logs import TrainingLog, console_logging, epoch_line, run_log
from detector.engine.train import train_loader

ROOT = Path(__file__).resolve().parents[1]

IMPORTED_AFTER = (
    "import sys\n"
    "from ctprune.cli import main\n"
    "try:\n"
    "    main([{argument!r}])\n"
    "except SystemExit:\n"
    "    pass\n"
    "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
)


def test_help_and_version_do_not_import_torch():
    for argument in ("--help", "--version"):
        completed = subprocess.run(
            [sys.executable, "-c", IMPORTED_AFTER.format(argument=argument)],
            capture_output=True, text=True, cwd=ROOT, check=True,
            env={"PYTHONPATH": str(ROOT), "PATH": ""},
        )
        assert completed.stdout.strip().splitlines()[-1] == "no torch", (argument, completed)
        assert "ctprune" in completed.stdout


def test_prune_defaults_are_valid_options():
    from ctprune.pruning.options import DEFAULTS, PruneOptions

    assert DEFAULTS == PruneOptions()


def _config(**overrides):
    settings = dict(epochs=2, batch_size=4, lr=2e-3, workers=0, eval_interval=1,
                    lr_steps=[100.0], log_interval=1, seed=1)
    return TrainConfig(**{**settings, **overrides})


def _fit(out_dir, config, **kwargs):
    torch.manual_seed(0)
    model_config = tiny_config()
    loader = train_loader(TinyDetectionData(8), config, collate_fn=default_collate)
    return fit(build_from_config(model_config), model_config, config, loader, out_dir, **kwargs)


def _evaluate(model):
    return {"ap": 0.25, "ap50": 0.5}


def test_every_epoch_leaves_one_console_line_with_the_losses_rate_time_and_ap(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="detector.engine.logs")
    _fit(tmp_path, _config(), evaluate=_evaluate)
    lines = [record.getMessage() for record in caplog.records
             if record.name == "detector.engine.logs"]
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    for line in lines:
        for part in ("loss ", "heatmap ", "wh ", "offset ", "lr ", " img/s", "epoch time ",
                     "ETA ", "AP 0.2500", "AP50 0.5000"):
            assert part in line, (part, line)
    assert "ETA 0.0s" in lines[-1]


def test_epoch_line_without_evaluation_has_no_ap():
    record = {"epoch": 3, "train_loss": 2.5, "loss_heatmap": 2.0, "loss_wh": 0.4,
              "loss_offset": 0.1, "lr": 1.25e-4, "images_per_s": 52.25, "seconds": 83.0}
    assert epoch_line(record, 140, 3 * 3600 + 12 * 60) == (
        "epoch 3/140  loss 2.5000 (heatmap 2.0000, wh 0.4000, offset 0.1000)  lr 0.000125  "
        "52.2 img/s  epoch time 1m 23s  ETA 3h 12m")


class _Interrupt(KeyboardInterrupt):
    pass


def _interrupt_after_epoch_1(epoch, model, record):
    warnings.warn("a warning of the run", UserWarning, stacklevel=1)
    if epoch == 1:
        raise _Interrupt


def _rows(path):
    with path.open() as file:
        return list(csv.DictReader(file))


def test_train_log_and_csv_agree_with_the_jsonl_after_a_resume(tmp_path):
    """A run stopped after epoch 1 (as by Ctrl-C) and resumed: train.log holds both sessions'
    epoch lines, the warning and the stop; metrics.csv one row per epoch of metrics.jsonl,
    without the step line and the cut line a kill leaves after the last saved epoch."""
    handlers = list(logging.getLogger().handlers)
    with console_logging():
        with pytest.raises(_Interrupt), run_log(tmp_path) as log:
            _fit(tmp_path, _config(), log=log, on_epoch_end=_interrupt_after_epoch_1)
        # A kill after epoch 2's lines were written but before its resume.pt: a resume redoes
        # epoch 2, so these lines (and the cut one) must go from both files.
        unsaved = {"kind": "epoch", "epoch": 2, "train_loss": 9.0, "lr": 0.1, "seconds": 1.0}
        with (tmp_path / "metrics.jsonl").open("a") as file:
            file.write(json.dumps({"kind": "train", "epoch": 2, "step": 3}) + "\n")
            file.write(json.dumps(unsaved) + '\n{"kind": "ep')
        with (tmp_path / "metrics.csv").open("a") as file:
            file.write("2,,9.0\n")
        with run_log(tmp_path) as log:
            _fit(tmp_path, _config(), log=log, resume=True)
    text = (tmp_path / "train.log").read_text()
    assert "epoch 1/2" in text and "epoch 2/2" in text
    assert "a warning of the run" in text
    assert "training interrupted: _Interrupt" in text
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [record for record in epochs if record["kind"] == "epoch"]
    rows = _rows(tmp_path / "metrics.csv")
    assert [int(row["epoch"]) for row in rows] == [record["epoch"] for record in epochs] == [1, 2]
    for row, record in zip(rows, epochs, strict=True):
        assert set(row) == set(record) - {"kind"}
        assert {key: float(value) for key, value in row.items()} == {
            key: value for key, value in record.items() if key != "kind"}
        assert {"train_loss", "loss_heatmap", "loss_wh", "loss_offset", "images_per_s"} <= set(row)
    assert logging.getLogger().handlers == handlers, "the run's handlers are removed at its end"


class _FakeWriter:
    made: list["_FakeWriter"] = []

    def __init__(self, folder):
        self.folder, self.scalars, self.closed = Path(folder), [], False
        _FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append(tag)

    def close(self):
        self.closed = True


def _failing_evaluation(model):
    raise ValueError("evaluation failed on purpose")


def test_the_tensorboard_writer_is_closed_at_the_end_and_on_errors(tmp_path):
    _FakeWriter.made = []
    with TrainingLog(tmp_path / "ok", tensorboard=_FakeWriter) as log:
        _fit(tmp_path / "ok", _config(epochs=1), log=log)
    with pytest.raises(ValueError, match="evaluation failed on purpose"):
        with TrainingLog(tmp_path / "failed", tensorboard=_FakeWriter) as log:
            _fit(tmp_path / "failed", _config(epochs=1), log=log, evaluate=_failing_evaluation)
    assert [writer.folder for writer in _FakeWriter.made] == [
        tmp_path / "ok" / "tensorboard", tmp_path / "failed" / "tensorboard"]
    assert all(writer.closed for writer in _FakeWriter.made)
    assert "epoch/train_loss" in _FakeWriter.made[0].scalars
    assert "train/loss_heatmap" in _FakeWriter.made[1].scalars


def test_other_ranks_write_nothing(tmp_path):
    with TrainingLog(tmp_path, enabled=False, tensorboard=_FakeWriter, log_file=True) as log:
        log.start(0, 1)
        log.write({"kind": "epoch", "epoch": 1, "train_loss": 1.0, "lr": 0.1, "seconds": 1.0}, 1)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_removes_the_record_of_the_replaced_run(tmp_path, capsys):
    from ctprune.cli import _claim_training_folder

    for name in ("last.pt", "metrics.jsonl", "metrics.csv", "train.log"):
        (tmp_path / name).write_text("old run")
    (tmp_path / "tensorboard").mkdir()
    with pytest.raises(ValueError, match=r"holds a training run \(last.pt, metrics.jsonl\)"):
        _claim_training_folder(tmp_path, resume=False, overwrite=False)
    _claim_training_folder(tmp_path, resume=False, overwrite=True)
    assert list(tmp_path.iterdir()) == []
