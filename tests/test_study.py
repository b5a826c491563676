"""ctprune.study: the study scripts' command runner reuses finished folders and resumes others."""

from pathlib import Path

import pytest

from ctprune import study

pytestmark = pytest.mark.timeout(60)


def test_overrides_become_set_options():
    assert study.overrides({"train.epochs": 5, "model.head": "ttfnet"}) == [
        "--set", "train.epochs=5", "--set", "model.head=ttfnet",
    ]


def test_none_overrides_are_yaml_null():
    """None must reach the recipe as null (YAML reads "None" as a string)."""
    from detector.config import parse_overrides

    options = study.overrides({"finetune.distill": None})
    assert options == ["--set", "finetune.distill=null"]
    assert parse_overrides(options[1::2]) == {"finetune": {"distill": None}}


def test_finished_folders_are_reused_and_killed_trainings_resume(tmp_path, monkeypatch):
    calls = []

    def train(args, log, threads, cwd):  # what a finished training leaves
        calls.append(args)
        (Path(args[3]) / "last.pt").write_bytes(b"")

    monkeypatch.setattr(study, "run_cli", train)
    finished = {"done": 3, "killed": 1, "early": 0, "fresh": 0}
    monkeypatch.setattr(study, "completed_epochs", lambda run: finished[Path(run).name])
    for name in finished:
        (tmp_path / name).mkdir()
    (tmp_path / "done" / "best.pt").write_bytes(b"")
    (tmp_path / "killed" / "resume.pt").write_bytes(b"")
    (tmp_path / "early" / "metrics.jsonl").write_text("")  # killed in its first epoch
    models = [study.train_once("r.yaml", tmp_path / name, 3, {"train.seed": 1}, 2, Path.cwd())
              for name in finished]
    assert [model.relative_to(tmp_path).as_posix() for model in models] == [
        "done/best.pt", "killed/last.pt", "early/last.pt", "fresh/last.pt",
    ]
    options = ["--set", "train.epochs=3", "--set", "train.seed=1"]
    assert calls == [
        ["train", "r.yaml", "--out", str(tmp_path / "killed"), "--resume", *options],
        ["train", "r.yaml", "--out", str(tmp_path / "early"), "--overwrite", *options],
        ["train", "r.yaml", "--out", str(tmp_path / "fresh"), *options],
    ]
    done, fresh = tmp_path / "done", tmp_path / "fresh"
    calls.clear()
    (done / "report.json").write_text("{}")
    study.chain_once("r.yaml", done, {}, 2, Path.cwd())
    study.chain_once("r.yaml", fresh, {}, 2, Path.cwd())
    assert calls == [["run", "r.yaml", "--out", str(fresh)]]
