"""ctprune.study: the study scripts' command runner reuses finished folders and resumes others."""

from pathlib import Path

import pytest

from ctprune import study

pytestmark = pytest.mark.timeout(60)


def test_overrides_become_set_options():
    assert study.overrides({"train.epochs": 5, "model.head": "ttfnet"}) == [
        "--set", "train.epochs=5", "--set", "model.head=ttfnet",
    ]


def test_finished_folders_are_reused_and_killed_trainings_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "run_cli", lambda args, log, threads, cwd: calls.append(args))
    done, killed, fresh = tmp_path / "done", tmp_path / "killed", tmp_path / "fresh"
    done.mkdir()
    (done / "checkpoint.pt").write_bytes(b"")
    killed.mkdir()
    (killed / "resume.pt").write_bytes(b"")
    for run in (done, killed, fresh):
        assert study.train_once("r.yaml", run, {"train.seed": 1}, 2, Path.cwd()) == run
    assert calls == [
        ["train", "r.yaml", "--out", str(killed), "--resume", "--set", "train.seed=1"],
        ["train", "r.yaml", "--out", str(fresh), "--set", "train.seed=1"],
    ]
    calls.clear()
    (done / "report.json").write_text("{}")
    study.chain_once("r.yaml", done, {}, 2, Path.cwd())
    study.chain_once("r.yaml", fresh, {}, 2, Path.cwd())
    assert calls == [["run", "r.yaml", "--out", str(fresh)]]
