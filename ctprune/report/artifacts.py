"""Reading a run folder (`ctprune.layout`): its manifest, its stages' stage.json and
eval/metrics.json, their stored figures and training logs. Nothing here loads a model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..layout import CHECKPOINT_FILE, HISTORY_FILE, MANIFEST_FILE, METRICS_FILE, STAGE_FILE
from ..quantize import INT8_FILE

METRIC_KEYS = ("ap", "ap50", "ap75", "aps", "apm", "apl")
FIGURE_TYPES = {
    "params": (int,),
    "size_mib": (int, float),
    "gmacs": (int, float),
    "architecture": (str,),
}
"""The keys of stage.json ``figures`` every row needs, with their types; ``precision``
(default fp32), ``latency_ms`` and ``baseline_latency_ms`` (null when not timed) are optional."""


@dataclass
class StageArtifacts:
    """One complete stage folder: its stage.json (``info``) and eval/metrics.json
    (``metrics``). ``name``, ``kind`` ("baseline" / "prune" / "finetune" / "quantize"),
    ``branch``,
    ``order`` and the stored ``figures`` (None for stages written before figures were stored)
    come from stage.json."""

    folder: Path
    info: dict
    metrics: dict

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def kind(self) -> str:
        return self.info["stage"]

    @property
    def branch(self) -> str | None:
        return self.info.get("branch")

    @property
    def order(self) -> int:
        return self.info["order"]

    @property
    def figures(self) -> dict | None:
        return self.info.get("figures")

    @property
    def model_file(self) -> str:
        """The stage's model in its folder: checkpoint.pt, or a quantize stage's ONNX file."""
        return self.info.get("model_file") or CHECKPOINT_FILE


@dataclass
class RunArtifacts:
    """One run folder: its manifest, its usable stages ordered by stage.json ``order``, and
    the stage folders it skipped (``{"run", "stage", "reason"}``, ``stage`` relative to the
    run folder)."""

    folder: Path
    manifest: dict
    stages: list[StageArtifacts] = field(default_factory=list)
    incomplete: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def baseline(self) -> StageArtifacts | None:
        """The run's first baseline stage, the reference of its kept fractions and speed-ups."""
        return next((stage for stage in self.stages if stage.kind == "baseline"), None)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; errors name the file and what it should have held."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"{path}: cannot read the {what} ({error.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the {what} is not a UTF-8 text (JSON) file") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: the {what} is not valid JSON ({error}); a truncated file? Rerun the "
            "stage that wrote it"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object, got {type(data).__name__}")
    return data


def is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_stage_info(info: dict, path: Path) -> None:
    """The stage.json keys the report relies on, with their types."""
    expected = {"name": str, "stage": str, "order": int}
    for key, kind in expected.items():
        if key not in info:
            raise ValueError(
                f"{path}: missing key {key!r} (expected keys name, stage, order, complete)"
            )
        if not isinstance(info[key], kind) or isinstance(info[key], bool):
            raise ValueError(f"{path}: {key}: expected {kind.__name__}, got {info[key]!r}")
    size = info.get("input_size")
    if size is not None and not (
        isinstance(size, list) and len(size) == 2
        and all(is_positive_int(side) for side in size)
    ):
        raise ValueError(f"{path}: input_size: expected [height, width] in pixels, got {size!r}")
    if info.get("figures") is not None:
        check_figures(info["figures"], path)


def check_figures(figures: object, path: Path) -> None:
    """stage.json ``figures`` as `ctprune.report.measure.stage_figures` writes them."""
    if not isinstance(figures, dict):
        raise ValueError(f"{path}: figures: expected an object, got {figures!r}")
    for key, kinds in FIGURE_TYPES.items():
        value = figures.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ValueError(
                f"{path}: figures.{key}: expected {' or '.join(k.__name__ for k in kinds)}, "
                f"got {value!r}"
            )
    for key in ("latency_ms", "baseline_latency_ms"):
        value = figures.get(key)
        if value is not None and not is_number(value):
            raise ValueError(f"{path}: figures.{key}: expected a number or null, got {value!r}")
    precision = figures.get("precision")
    if precision is not None and not isinstance(precision, str):
        raise ValueError(f"{path}: figures.precision: expected fp32, bf16 ..., got {precision!r}")


def check_metrics(metrics: dict, path: Path) -> None:
    missing = [key for key in METRIC_KEYS if key not in metrics]
    if missing:
        raise ValueError(
            f"{path}: missing {missing}; expected the keys evaluate_model writes: "
            f"{list(METRIC_KEYS)}"
        )
    for key in METRIC_KEYS:
        value = metrics[key]
        if value is not None and not is_number(value):
            raise ValueError(f"{path}: {key}: expected a number, got {value!r}")


def find_stage_folders(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """Folders below ``run_dir`` marked by a stage.json, and folders that hold stage outputs
    (checkpoint.pt or eval/metrics.json) without one; both sorted by path. Hidden folders are
    passed over: a rerun keeps a stage's previous results aside in ``.<stage>.old`` until the
    new ones are complete."""

    def visible(paths) -> set[Path]:
        return {path for path in paths
                if not any(part.startswith(".") for part in path.relative_to(run_dir).parts)}

    marked = visible(path.parent for path in run_dir.rglob(STAGE_FILE))
    with_outputs = visible(path.parent for path in run_dir.rglob(CHECKPOINT_FILE))
    with_outputs |= visible(path.parent for path in run_dir.rglob(INT8_FILE))
    with_outputs |= visible(path.parent.parent for path in run_dir.rglob(str(METRICS_FILE)))
    return sorted(marked), sorted(with_outputs - marked)


def read_stage(folder: Path) -> tuple[StageArtifacts | None, str | None]:
    """The stage in ``folder``, or None and why it cannot be reported."""
    info = read_json(folder / STAGE_FILE, "stage record (stage.json)")
    check_stage_info(info, folder / STAGE_FILE)
    if info.get("complete") is not True:
        return None, "stage.json does not say complete: true (interrupted or still running)"
    model_file = info.get("model_file") or CHECKPOINT_FILE
    if not isinstance(model_file, str) or "/" in model_file or model_file.startswith("."):
        raise ValueError(f"{folder / STAGE_FILE}: model_file: expected a file name in the stage "
                         f"folder, got {model_file!r}")
    if not (folder / model_file).is_file():
        return None, f"no {model_file}"
    if not (folder / METRICS_FILE).is_file():
        return None, f"no {METRICS_FILE.as_posix()}"
    metrics = read_json(folder / METRICS_FILE, "evaluation metrics")
    check_metrics(metrics, folder / METRICS_FILE)
    return StageArtifacts(folder, info, metrics), None


def read_run(run_dir: Path) -> RunArtifacts:
    """Every stage of one run folder, complete ones ordered by stage.json ``order``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(
            f"{run_dir}: no such run folder (expected a folder written by `ctprune run`)"
        )
    if not (run_dir / MANIFEST_FILE).is_file():
        raise ValueError(
            f"{run_dir}: not a run folder: no {MANIFEST_FILE} (expected the folder `ctprune run` "
            f"wrote, holding {MANIFEST_FILE} and one folder per stage)"
        )
    run = RunArtifacts(run_dir, read_json(run_dir / MANIFEST_FILE, "run manifest"))
    marked, unmarked = find_stage_folders(run_dir)
    for folder in marked:
        stage, reason = read_stage(folder)
        if stage is None:
            run.incomplete.append(_incomplete(run, folder, reason))
        else:
            run.stages.append(stage)
    for folder in unmarked:
        run.incomplete.append(_incomplete(run, folder, f"no {STAGE_FILE}"))
    run.stages.sort(key=lambda stage: stage.order)
    return run


def _incomplete(run: RunArtifacts, folder: Path, reason: str) -> dict:
    return {"run": run.name, "stage": folder.relative_to(run.folder).as_posix(), "reason": reason}


def final_stages(run: RunArtifacts) -> list[StageArtifacts]:
    """The last stage (highest order) of each branch; the baseline is a branch of its own."""
    last = {}
    for stage in run.stages:
        last[stage.branch] = stage
    return sorted(last.values(), key=lambda stage: stage.order)


def read_history(folder: Path) -> list[dict]:
    """The ``"kind": "epoch"`` records of ``folder/metrics.jsonl``, one per epoch in epoch
    order (the last record wins: a resumed run logs the epochs it redoes again). Lines that
    are not JSON objects are skipped: an interrupted run can leave half a line behind, and
    the curves it feeds are a diagnostic plot, not worth failing the report over."""
    path = folder / HISTORY_FILE
    if not path.is_file():
        return []
    by_epoch = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("kind") == "epoch" and "epoch" in record:
            by_epoch[record["epoch"]] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]
