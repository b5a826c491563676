"""The repository stays clean: running the main job leaves no tracked or untracked change, and no
tracked file holds a path of the machine it was written on.

Both tests read the committed state (``git clone`` and ``git ls-files``), so they skip outside a
git checkout (an installed package or an unpacked archive)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ctprune.report import ROW_KEYS

HERE = Path(__file__).resolve().parent


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=60
    ).stdout


@pytest.fixture(scope="module")
def repo_root() -> Path:
    try:
        return Path(_git("rev-parse", "--show-toplevel", cwd=HERE).strip())
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not in a git checkout")


@pytest.mark.timeout(300)
def test_the_smoke_run_in_a_fresh_clone_leaves_git_status_empty(repo_root, tmp_path):
    """`ctprune run recipes/smoke.yaml` with the default run folder writes only ignored files
    (data/smoke_shapes, runs/smoke). The clone holds the committed HEAD: uncommitted changes of
    the checkout under test are not part of it, on purpose."""
    clone = tmp_path / "clone"
    _git("clone", "--quiet", str(repo_root), str(clone), cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "ctprune", "run", "recipes/smoke.yaml", "--device", "cpu"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert (clone / "runs" / "smoke" / "report.md").is_file()
    assert (clone / "data" / "smoke_shapes" / "data.yaml").is_file()
    assert _git("status", "--porcelain", cwd=clone) == ""


def _machine_paths(repo_root: Path) -> set[str]:
    """Absolute paths a file written on this machine could leak: the usual roots of home,
    scratch and work folders, this checkout, and the Python environment."""
    paths = {"/work/", "/root/", "/home/", "/tmp/", str(repo_root), sys.prefix + "/"}
    paths.add(str(Path.home()) + "/")
    # A path of one or two characters ("/" as the home of a service account) would match
    # every file; the usual roots above still apply there.
    return {path for path in paths if len(path.strip("/")) > 1}


# Lines that hold one of those paths for a reason. Keep this list tiny: a shell script's
# shebang names the interpreter's location by convention (and sys.prefix is /usr for a system
# Python).
ALLOWED_LINE_PREFIXES = ("#!/usr/bin/env ",)


def test_no_tracked_file_holds_a_path_of_this_machine(repo_root):
    needles = _machine_paths(repo_root)
    found = []
    for name in _git("ls-files", "-z", cwd=repo_root).split("\0"):
        path = repo_root / name
        # This file names the roots it searches for.
        if not name or not path.is_file() or path.resolve() == Path(__file__).resolve():
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary: images
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if line.startswith(ALLOWED_LINE_PREFIXES):
                continue
            found += [f"{name}:{number}: {needle}" for needle in needles if needle in line]
    assert not found, "absolute machine paths in tracked files:\n" + "\n".join(found)


# What `ctprune report` writes per row; `precision` (fp32/bf16/int8) is part of the layout.
STUDY_ROW_KEYS = set(ROW_KEYS)


def test_every_study_holds_one_report_and_its_rows_in_the_report_layout():
    """experiments/<study>/ has one report.md; an accuracy study's report.json has
    ``ctprune report``'s rows, a baseline row per run; benchmarks (experiments/bench/<name>/)
    have their report.md."""
    experiments = HERE.parent / "experiments"
    studies = [path for path in experiments.iterdir() if path.is_dir() and path.name != "bench"]
    benchmarks = [path for path in (experiments / "bench").iterdir() if path.is_dir()]
    assert studies and benchmarks
    for folder in studies + benchmarks:
        if folder.name == "__pycache__":
            continue
        assert (folder / "report.md").is_file(), folder
        assert not [p.name for p in folder.glob("*.md") if p.name != "report.md"], folder
    for folder in studies:
        if folder.name == "__pycache__":
            continue
        rows = json.loads((folder / "report.json").read_text())["rows"]
        assert rows, folder
        for row in rows:
            assert set(row) == STUDY_ROW_KEYS, (folder, row)
        runs = {row["run"] for row in rows}
        baselines = {row["run"] for row in rows if row["stage"] == "baseline"}
        assert runs == baselines, f"{folder.name}: runs without a baseline row: {runs - baselines}"


def test_references_to_experiment_files_exist(repo_root):
    """Every experiments/... path the README, the guides, the recipes, the tests and the
    studies themselves mention exists (docs/recipe_keys.md is generated from the code's
    docstrings: its references are checked where they are written)."""
    pattern = re.compile(r"experiments/[A-Za-z0-9_./-]+")
    names = _git("ls-files", "README.md", "docs", "experiments", "recipes", "tests",
                 cwd=repo_root).split()
    missing = []
    for name in names:
        if name == "docs/recipe_keys.md" or not name.endswith((".md", ".py", ".yaml")):
            continue
        for reference in pattern.findall((repo_root / name).read_text()):
            reference = reference.rstrip(".,:)`/")
            if not (repo_root / reference).exists():
                missing.append(f"{name}: {reference}")
    assert not missing, "references to missing experiment files:\n" + "\n".join(missing)
