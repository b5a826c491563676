"""What the study scripts under experiments/ share: running the ``ctprune`` commands a user runs,
each in a child process with its own thread count and log, once per run folder.

A study reruns cheaply: a training folder with its checkpoint and a `ctprune run` folder with its
report are reused as they are, an interrupted training resumes. What the runs measured is read
back with `ctprune.report.training_record` and `ctprune.report.run_stage_rows`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from detector.engine.fit import completed_epochs
from detector.layout import trained_model

from .layout import REPORT_FILES, RESUME_FILE


def run_cli(args: list[str], log: Path, threads: int, cwd: Path) -> None:
    """``python -m ctprune ARGS`` in ``cwd`` with ``threads`` OpenMP threads, its output appended
    to ``log``; a failure raises CalledProcessError (the log says why)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = os.environ | {"OMP_NUM_THREADS": str(threads)}
    with log.open("a") as stream:
        subprocess.run(
            [sys.executable, "-m", "ctprune", *args],
            cwd=cwd, env=environment, stdout=stream, stderr=subprocess.STDOUT, check=True,
        )


def overrides(values: dict[str, object]) -> list[str]:
    """{"train.epochs": 5, "finetune.distill": None} -> ["--set", "train.epochs=5", "--set",
    "finetune.distill=null"] (values are read back as YAML)."""
    return [part for key, value in values.items()
            for part in ("--set", f"{key}={'null' if value is None else value}")]


def train_once(
    recipe: str, run: Path, epochs: int, values: dict[str, object], threads: int, cwd: Path
) -> Path:
    """`ctprune train RECIPE --out RUN` for ``epochs`` epochs with ``values`` set, unless RUN
    finished them; resumed when a killed training left its resume state, started over when it
    was killed before its first epoch ended. Returns RUN's model
    (`detector.layout.trained_model`)."""
    if completed_epochs(run) < epochs:
        if (run / RESUME_FILE).is_file():
            resume = ["--resume"]
        else:
            resume = ["--overwrite"] if run.is_dir() and any(run.iterdir()) else []
        values = {"train.epochs": epochs, **values}
        args = ["train", recipe, "--out", str(run), *resume, *overrides(values)]
        run_cli(args, run.parent / f"{run.name}.log", threads, cwd)
    return trained_model(run)


def chain_once(
    recipe: str, run: Path, values: dict[str, object], threads: int, cwd: Path
) -> Path:
    """`ctprune run RECIPE --out RUN` with ``values`` set, unless RUN holds its report (an
    unfinished run continues from its last finished stage). Returns RUN."""
    if not (run / REPORT_FILES["json"]).is_file():
        args = ["run", recipe, "--out", str(run), *overrides(values)]
        run_cli(args, run.parent / f"{run.name}.log", threads, cwd)
    return run
