"""The report of a run (or a comparison of runs), built only from the artifacts its stages left
in the run folder (`ctprune.layout`), so it can be rebuilt without rerunning anything.

One module per concern: `artifacts` reads the run folders, `measure` measures stage models
(through `ctprune.bench`'s timer; `ctprune run` stores each stage's figures as it finishes),
`tables` makes the rows and the markdown, `plots` the PNGs, `html` the self-contained page,
and `build` ties them together in `build_report`; `study` writes the same rows for results a
study measured itself (experiments/).
"""

from .artifacts import read_history, read_run
from .build import build_report
from .measure import paired_latency, stage_figures
from .plots import pareto_front
from .study import (
    chain_rows,
    run_stage_rows,
    seed_chain_rows,
    study_row,
    training_record,
    update_study_report,
)
from .tables import ROW_KEYS

__all__ = [
    "ROW_KEYS",
    "build_report",
    "paired_latency",
    "pareto_front",
    "read_history",
    "read_run",
    "stage_figures",
    "chain_rows",
    "run_stage_rows",
    "seed_chain_rows",
    "study_row",
    "training_record",
    "update_study_report",
]
