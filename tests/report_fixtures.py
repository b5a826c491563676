"""Run folders written by hand, the way `ctprune run` lays them out, with known numbers: the
input of the report tests (tests/test_report.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from torch import nn

from detector import ModelConfig, save_checkpoint
from detector.evaluate.curves import plot_pr_curves


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def write_manifest(run: Path, recipe_name: str) -> None:
    manifest = {"recipe_name": recipe_name, "recipe_sha256": "0" * 64,
                "created": "2024-01-01T00:00:00+00:00", "command": ["ctprune", "run"]}
    write_json(run / "manifest.json", manifest)


def coco_metrics(ap: float, ap50: float, aps: float = math.nan) -> dict:
    """An eval/metrics.json as evaluate_model writes it; ap75 / apm / apl derived from ``ap``
    so each stage's numbers are distinct and known. NaN is what evaluate_model writes for a
    metric with no ground truth."""
    return {"ap": ap, "ap50": ap50, "ap75": ap * 1.1, "aps": aps, "apm": ap * 0.9, "apl": ap * 1.2,
            "voc_ap50": ap50, "loss": 1.0, "per_class_ap": {"a": ap, "b": ap}}


def epoch_records(train_losses: list[float], ap50: dict[int, float]) -> list[dict]:
    """metrics.jsonl epoch records (1-based epochs); ``ap50`` maps evaluated epochs to AP50."""
    records = []
    for epoch, loss in enumerate(train_losses, start=1):
        record = {"kind": "epoch", "epoch": epoch, "step": epoch * 10, "train_loss": loss}
        if epoch in ap50:
            record.update({"ap50": ap50[epoch], "ap": ap50[epoch] / 2})
        records.append(record)
    return records


def write_pr_curves(stage: Path, recall_end: float) -> list[Path]:
    """Two classes' P-R curves, as evaluate_model writes them; ``recall_end`` makes each
    stage's images differ."""
    recall = np.linspace(0.1, recall_end, 5)
    curve = {"precision": np.linspace(1.0, 0.5, 5), "recall": recall, "num_ground_truth": 5}
    return plot_pr_curves([curve, curve], ["a", "b"], stage / "eval" / "pr_curves")


def write_stage(
    run: Path,
    relative: str,
    *,
    kind: str,
    order: int,
    model: nn.Module | None = None,
    config: ModelConfig | None = None,
    metrics: dict | None = None,
    history: list[dict] | None = None,
    prune: dict | None = None,
    branch: str | None = None,
    figures: dict | None = None,
    complete: bool = True,
    extra_history_lines: list[str] = (),
) -> Path:
    """One stage folder ``run/relative``: stage.json (with the stored ``figures`` given: as
    `ctprune run` writes them since it stores them; without: an older run's), and the
    checkpoint, eval/metrics.json, metrics.jsonl lines given."""
    folder = run / relative
    folder.mkdir(parents=True, exist_ok=True)
    info = {"name": relative, "stage": kind, "branch": branch, "complete": complete, "seconds": 1.5,
            "input_size": [64, 64], "order": order, "fingerprint": "f" * 16}
    if prune is not None:
        info["prune"] = prune
    if figures is not None:
        info["figures"] = figures
    write_json(folder / "stage.json", info)
    if model is not None:
        save_checkpoint(folder / "checkpoint.pt", model, config)
    if metrics is not None:
        write_json(folder / "eval" / "metrics.json", metrics)
    if history is not None:
        lines = [json.dumps(record) for record in history] + list(extra_history_lines)
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder
