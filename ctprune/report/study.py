"""Rows of a study (`experiments/<study>/report.json`) in the report's row layout (`ROW_KEYS`),
for results measured outside `ctprune run`: a study's script evaluates its models itself and
records what it measured here, so every committed result reads the same way."""

from __future__ import annotations

import json
from pathlib import Path

from detector.files import atomic_write_json

from .tables import DEFAULT_PRECISION, ROW_KEYS, kept_fraction


def study_row(run: str, name: str, stage: str, baseline: dict | None = None, **measured) -> dict:
    """One row of a model evaluated in fp32: ``measured`` fills the keys of `ROW_KEYS` the study
    measured (None elsewhere); ``ap_kept`` / ``ap50_kept`` are fractions of ``baseline``'s AP /
    AP50 (of the row's own for a baseline row)."""
    unknown = sorted(set(measured) - set(ROW_KEYS))
    if unknown:
        raise ValueError(f"study_row: unknown keys {unknown}; a row has {ROW_KEYS}")
    row = dict.fromkeys(ROW_KEYS) | {
        "run": run, "name": name, "stage": stage, "precision": DEFAULT_PRECISION
    }
    row.update(measured)
    reference = row if stage == "baseline" else baseline or {}
    for metric in ("ap", "ap50"):
        row[f"{metric}_kept"] = kept_fraction(row[metric], reference.get(metric))
    return row


def update_study_report(path: str | Path, rows: list[dict], key: str, setup: dict) -> None:
    """Merge one invocation of a study into its report.json (``{"rows": [...], "setup":
    {...}}``): its rows replace those of the same run and name (the others are kept, in
    order), its settings and raw results go to ``setup[key]``."""
    path = Path(path)
    report = json.loads(path.read_text()) if path.exists() else {"rows": [], "setup": {}}
    position = {(row["run"], row["name"]): index for index, row in enumerate(report["rows"])}
    for row in rows:
        index = position.get((row["run"], row["name"]))
        if index is None:
            report["rows"].append(row)
        else:
            report["rows"][index] = row
    report["setup"][key] = setup
    atomic_write_json(path, report)


def training_record(folder: str | Path) -> dict:
    """What a training folder's epoch log (`HISTORY_FILE`) says of its run: the epochs, the
    seconds spent training them (evaluation excluded) and the AP / AP50 at every evaluated
    epoch."""
    from ..layout import HISTORY_FILE

    lines = (Path(folder) / HISTORY_FILE).read_text().splitlines()
    epochs = [record for record in map(json.loads, lines) if record.get("kind") == "epoch"]
    return {
        "epochs": len(epochs),
        "train_seconds": round(sum(record.get("seconds", 0.0) for record in epochs), 1),
        "curve": [
            {"epoch": record["epoch"], "ap": record["ap"], "ap50": record["ap50"]}
            for record in epochs
            if "ap" in record
        ],
    }


def run_stage_rows(run: str | Path) -> dict[str, dict]:
    """The fp32 rows of a finished `ctprune run` folder's report, by stage (baseline, prune,
    finetune; the last row of a stage when rounds repeat it)."""
    from ..layout import REPORT_FILES

    report = json.loads((Path(run) / REPORT_FILES["json"]).read_text())
    return {row["stage"]: row for row in report["rows"] if row["precision"] == DEFAULT_PRECISION}


def chain_rows(run: str, names: dict[str, str], stage_rows: dict[str, dict]) -> list[dict]:
    """A study's rows for one `ctprune run` chain (``stage_rows``, `run_stage_rows`): one row per
    stage in ``names`` (stage -> the row's name, e.g. {"baseline": "seed0/baseline_e15",
    "prune": "seed0/half_macs/prune", ...}) with the chain's measured figures; kept fractions
    relative to the chain's baseline."""
    measured_keys = [key for key in ROW_KEYS if key not in ("run", "name", "stage", "precision")
                     and not key.endswith("_kept")]
    rows: list[dict] = []
    baseline = None
    for stage, name in names.items():
        measured = {key: stage_rows[stage].get(key) for key in measured_keys}
        row = study_row(run, name, stage, baseline, **measured)
        baseline = row if stage == "baseline" else baseline
        rows.append(row)
    return rows


def seed_chain_rows(arms: dict[str, dict]) -> list[dict]:
    """A head-comparison study's rows: per arm (the row's run) and seed, its `ctprune run` chain
    as ``seed{S}/baseline_e{epochs}``, ``seed{S}/half_macs/prune`` and
    ``seed{S}/half_macs/finetune_e{finetune_epochs}``. ``arms``: arm -> seed -> {"epochs",
    "finetune_epochs", "rows" (`run_stage_rows`)}."""
    rows = []
    for arm, per_seed in arms.items():
        for seed, result in per_seed.items():
            names = {
                "baseline": f"seed{seed}/baseline_e{result['epochs']}",
                "prune": f"seed{seed}/half_macs/prune",
                "finetune": f"seed{seed}/half_macs/finetune_e{result['finetune_epochs']}",
            }
            rows += chain_rows(arm, names, result["rows"])
    return rows
