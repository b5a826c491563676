"""The run folder's layout, named once: what `ctprune run` writes and `ctprune report` reads.

    RUN/manifest.json, RUN/recipe.yaml      what ran (recipe hash, versions, command) and how
    RUN/<stage folder>/stage.json           marks a stage folder; "complete": true when done
    STAGE/checkpoint.pt                     the stage's model (config + channel plan + weights)
    STAGE/eval/metrics.json                 COCO metrics of the stage's model on the val split
    STAGE/eval/pr_curves/*.png              P-R curves per class
    STAGE/metrics.jsonl, STAGE/resume.pt    training stages: the epoch log, the resume state
    RUN/report.json, .md, .html, *.png      the report

The names inside ``eval/`` and the training files are chosen by `detector` (the evaluation and
the training loop write them); they are repeated here so the report reads them by one name.
"""

from __future__ import annotations

from pathlib import PurePosixPath

STAGES = ("baseline", "prune", "finetune", "report")
"""The stages of a run in order; `--from` and `--only` take these names."""

MANIFEST_FILE = "manifest.json"
RECIPE_FILE = "recipe.yaml"
STAGE_FILE = "stage.json"
CHECKPOINT_FILE = "checkpoint.pt"
RESUME_FILE = "resume.pt"
HISTORY_FILE = "metrics.jsonl"
EVAL_FOLDER = "eval"
METRICS_FILE = PurePosixPath(EVAL_FOLDER, "metrics.json")
PR_CURVES_FOLDER = PurePosixPath(EVAL_FOLDER, "pr_curves")

REPORT_FILES = {"json": "report.json", "markdown": "report.md", "html": "report.html"}
PLOT_FILES = {
    "ap_vs_gmacs": "ap_vs_gmacs.png",
    "widths": "widths.png",
    "training_curves": "training_curves.png",
}
