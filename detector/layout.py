"""The files a training run writes into its folder, named once: the training loop, the
evaluation and `ctprune`'s run folders (`ctprune.layout`) all use these names.

    OUT/recipe.yaml            the resolved recipe the run trained with
    OUT/last.pt, OUT/best.pt   the model after the latest epoch / the best by train.best_metric
    OUT/last_ema.pt            with train.ema_decay: the weight average after the latest epoch
                               (best.pt is then chosen among, and holds, the averages)
    OUT/resume.pt              optimiser, schedule, scaler, RNG state and progress for --resume
    OUT/metrics.jsonl          one JSON line per logged step and per epoch
    OUT/metrics.csv            one row per epoch (the epoch lines of metrics.jsonl)
    OUT/train.log              the run's console lines, warnings and error, appended on resume
    OUT/tensorboard/           TensorBoard scalars (with the `tensorboard` extra)
    OUT/eval/metrics.json      the latest evaluation's metrics (with results.json,
                               per_class_ap.md and pr_curves/ beside it)

`MANIFEST_FILE` marks a `ctprune run` folder; it is named here because training refuses to
write into such a folder (its recipe.yaml is the run's).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

RECIPE_FILE = "recipe.yaml"
MANIFEST_FILE = "manifest.json"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
LAST_EMA_CHECKPOINT = "last_ema.pt"
RESUME_FILE = "resume.pt"
HISTORY_FILE = "metrics.jsonl"
HISTORY_TABLE = "metrics.csv"
LOG_FILE = "train.log"
TENSORBOARD_FOLDER = "tensorboard"
EVAL_FOLDER = "eval"
EVAL_METRICS_FILE = "metrics.json"
EVAL_RESULTS_FILE = "results.json"
PER_CLASS_TABLE = "per_class_ap.md"
PR_CURVES_FOLDER_NAME = "pr_curves"
METRICS_FILE = PurePosixPath(EVAL_FOLDER, EVAL_METRICS_FILE)
"""The evaluation metrics, relative to a run folder."""
PR_CURVES_FOLDER = PurePosixPath(EVAL_FOLDER, PR_CURVES_FOLDER_NAME)


def trained_model(folder: str | Path) -> Path:
    """A training folder's model: the best by the selection metric, else the weights
    evaluation would have seen (the average, with train.ema_decay), else the last raw weights.
    FileNotFoundError when no epoch finished."""
    names = (BEST_CHECKPOINT, LAST_EMA_CHECKPOINT, LAST_CHECKPOINT)
    for name in names:
        if Path(folder, name).is_file():
            return Path(folder, name)
    raise FileNotFoundError(f"{folder}: none of {', '.join(names)}: no epoch finished")
