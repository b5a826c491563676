"""The run folder's layout, named once: what `ctprune run` writes and `ctprune report` reads.

    RUN/manifest.json, RUN/recipe.yaml      what ran (recipe hash, versions, command) and how
    RUN/<stage folder>/stage.json           marks a stage folder; "complete": true when done
    STAGE/checkpoint.pt                     the stage's model (config + channel plan + weights)
    QUANTIZE/model.int8.onnx                a quantize stage's model instead (stage.json
                                            ``model_file``), model.fp32.onnx beside it
    STAGE/eval/metrics.json                 COCO metrics of the stage's model on the val split
    STAGE/eval/pr_curves/*.png              P-R curves per class
    STAGE/metrics.jsonl, STAGE/resume.pt    training stages: the epoch log, the resume state
    RUN/report.json, .md, .html, *.png      the report

The training files and the names inside ``eval/`` are `detector.layout`'s (the training loop
and the evaluation write them); this module adds what only a ctprune run has.
"""

from __future__ import annotations

from detector.layout import (  # noqa: F401 (re-exported: the report reads them from here)
    EVAL_FOLDER,
    HISTORY_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    PR_CURVES_FOLDER,
    RECIPE_FILE,
    RESUME_FILE,
)

STAGES = ("baseline", "prune", "finetune", "quantize", "report")
"""The stages of a run in order; `--from` and `--only` take these names."""

STAGE_FILE = "stage.json"
CHECKPOINT_FILE = "checkpoint.pt"

REPORT_FILES = {"json": "report.json", "markdown": "report.md", "html": "report.html"}
PLOT_FILES = {
    "ap_vs_gmacs": "ap_vs_gmacs.png",
    "widths": "widths.png",
    "training_curves": "training_curves.png",
}
