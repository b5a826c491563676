"""`ctprune sensitivity CHECKPOINT --data DATA.yaml`: per-group sensitivity curves of a trained
model, for choosing (or checking) a per-group allocation.

Each coupled group is narrowed alone to ``1 - ratio`` of its width (rounded like pruning, its
lowest-scoring channels by ``criterion`` removed; `ctprune.pruning.sensitivity.channels_unread`
makes the model compute exactly what the pruned one would, without rebuilding it) and measured
on a calibration split carved from the TRAINING split (a seeded sample of ``images`` images;
the val split, which reports are made on, is never read):
- ``measure="ap50"``: COCO AP50 of the calibration images (the loss is the parent's minus it);
- ``measure="drift"``: the output drift against the parent (mean squared change of every raw
  output over its mean square), which needs no labels.

The scan writes ``sensitivity.json`` into the output folder after every point: a second run
with the same checkpoint, data, images, seed, criterion, measure and round_to reuses every
point and measures only the missing ones, so an interrupted scan (Ctrl-C, ``budget_minutes``
spent) continues where it stopped; with other settings it starts over. ``sensitivity.md`` (a
table: one row per group, one column per ratio) and ``sensitivity.png`` (the curves) are
written at the end of every run. Losses are stored as measured (not made monotone), so that
their noise shows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

import torch

SCAN_FILE = "sensitivity.json"
TABLE_FILE = "sensitivity.md"
PLOT_FILE = "sensitivity.png"
DEFAULT_RATIOS = (0.25, 0.5, 0.75)
DEFAULT_IMAGES = 64
MEASURES = ("ap50", "drift")
# Groups never lose more than this in a scan (a group of one channel keeps it).
MAX_SCAN_RATIO = 0.95
DRIFT_BATCH = 8


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, content: dict) -> None:
    from detector.files import atomic_write_json

    atomic_write_json(path, content)


def calibration_split(data_yaml: Path, images: int, seed: int):
    """A seeded sample of ``images`` records of the TRAINING split, as a source of its own
    (ground truth rebuilt from the sample's records)."""
    from detector.data.sources import load_data_yaml, load_source

    source = load_source(load_data_yaml(data_yaml), "train")
    records = list(source.records)
    random.Random(seed).shuffle(records)
    return dataclasses.replace(source, records=records[:images], annotation_file=None)


def scan(
    checkpoint: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    images: int = DEFAULT_IMAGES,
    criterion: str = "l1",
    measure: str = "ap50",
    round_to: int | None = None,
    budget_minutes: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Scan ``checkpoint``'s groups (module docstring) into ``out_dir``; returns the scan:
    ``{"key", "base", "groups": {name: {"width", "points": {ratio: {"keep", "value",
    "loss"}}}}, "complete", "measured"}`` (``measured``: points measured by this call).

    Raises:
        ValueError: a bad ratio, measure or criterion (the data-driven ones need a loss the
            scan does not compute), or images < 1.
    """
    from tqdm import tqdm

    from detector import load_model
    from detector.evaluate.config import EvaluateConfig
    from detector.evaluate.run import evaluate_model

    from .pruning.allocate import rounded_keep
    from .pruning.criteria import CRITERIA, DATA_CRITERIA, keep_highest
    from .pruning.graph import build_graph, collect_groups, resolve_ignored_layers
    from .pruning.sensitivity import _measure, channels_unread

    if measure not in MEASURES:
        raise ValueError(f"measure: expected one of {MEASURES}, got {measure!r}")
    if criterion not in CRITERIA or criterion in DATA_CRITERIA or criterion == "kmeans":
        raise ValueError(f"criterion: expected one of l1, l2, bn_gamma, random, got {criterion!r}")
    for ratio in ratios:
        if not 0 < ratio <= MAX_SCAN_RATIO:
            raise ValueError(f"ratios: expected values in (0, {MAX_SCAN_RATIO}], got {ratio!r}")
    if images < 1:
        raise ValueError(f"images: expected an integer >= 1, got {images!r}")
    started = time.perf_counter()
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, stored = load_model(checkpoint)
    model_config = stored.model_config
    model.eval()
    source = calibration_split(Path(data), images, seed)
    key = {"checkpoint_sha256": _file_digest(checkpoint), "data": Path(data).name,
           "images": len(source.records), "seed": seed, "criterion": criterion,
           "measure": measure, "round_to": round_to}
    path = out_dir / SCAN_FILE
    previous = json.loads(path.read_text()) if path.exists() else None
    state = previous if previous and previous.get("key") == key else {
        "key": key, "base": None, "groups": {}}
    evaluate_config = EvaluateConfig(pr_curves=False, workers=0)

    drift_batches, reference = None, None
    if measure == "drift":
        from detector.data.dataset import CenterNetDataset, collate

        dataset = CenterNetDataset(source.records, model_config.num_classes, model_config.input,
                                   train=False, head=model_config.head)
        loader = torch.utils.data.DataLoader(dataset, batch_size=DRIFT_BATCH, collate_fn=collate)
        drift_batches = [{"image": batch["image"]} for batch in loader]
        with torch.no_grad():
            reference = _measure(model, drift_batches, None, None)

    def value() -> float:
        if measure == "ap50":
            metrics = evaluate_model(model, source, model_config, evaluate_config,
                                     write_reports=False)
            return float(metrics["ap50"])
        with torch.no_grad():
            return float(_measure(model, drift_batches, None, reference))

    if state["base"] is None:
        state["base"] = 0.0 if measure == "drift" else value()
        _write_json(path, state)
    size = tuple(model_config.input.input_size)
    graph = build_graph(model, torch.zeros(1, 3, *size))
    groups = collect_groups(graph, model, resolve_ignored_layers(model, None, model))
    score = CRITERIA[criterion]
    todo = [(group, ratio) for group in groups for ratio in ratios
            if f"{ratio:g}" not in state["groups"].get(group.name, {}).get("points", {})]
    measured = 0
    stopped = False
    bar = tqdm(total=len(todo), desc="sensitivity", unit="point", disable=not progress)
    try:
        scores = {}
        for group, ratio in todo:
            if budget_minutes is not None and time.perf_counter() - started > 60 * budget_minutes:
                stopped = True
                break
            if group.name not in scores:
                scores[group.name] = score(group)
            keep = rounded_keep((1 - ratio) * group.width, group.width, round_to,
                                MAX_SCAN_RATIO)
            kept = set(keep_highest(group, scores[group.name], keep).kept)
            removed = [channel for channel in range(group.width) if channel not in kept]
            with channels_unread(group, removed):
                point = value()
            loss = point if measure == "drift" else state["base"] - point
            entry = state["groups"].setdefault(group.name, {"width": group.width, "points": {}})
            entry["points"][f"{ratio:g}"] = {"keep": keep, "value": point, "loss": loss}
            _write_json(path, state)  # after every point: an interrupted scan resumes here
            measured += 1
            bar.update(1)
    finally:
        bar.close()
    state["complete"] = not stopped and all(
        f"{ratio:g}" in state["groups"].get(group.name, {}).get("points", {})
        for group in groups for ratio in ratios
    )
    _write_json(path, state)
    write_table(state, ratios, out_dir / TABLE_FILE)
    plot_curves(state, out_dir / PLOT_FILE)
    return {**state, "measured": measured}


def write_table(state: dict, ratios, path: Path) -> None:
    """The scan as a markdown table: per group its width and the loss at each ratio."""
    what = "AP50 lost" if state["key"]["measure"] == "ap50" else "output drift"
    header = " | ".join(f"{ratio:g}" for ratio in ratios)
    lines = [f"{what} when one group alone loses the ratio of its channels "
             f"(base {state['key']['measure']} {state['base']:.4f}; "
             f"{state['key']['images']} training images)", "",
             f"| group | width | {header} |", "|---|---|" + "---|" * len(ratios)]
    for name, entry in state["groups"].items():
        cells = []
        for ratio in ratios:
            point = entry["points"].get(f"{ratio:g}")
            cells.append("" if point is None else f"{point['loss']:.4f}")
        lines.append(f"| {name} | {entry['width']} | {' | '.join(cells)} |")
    path.write_text("\n".join(lines) + "\n")


def plot_curves(state: dict, path: Path) -> None:
    """One line per group: loss against the fraction of its channels removed."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5))
    axes = figure.add_subplot()
    for name, entry in state["groups"].items():
        points = sorted((float(ratio), point["loss"]) for ratio, point in entry["points"].items())
        axes.plot([0.0] + [r for r, _ in points], [0.0] + [loss for _, loss in points],
                  marker="o", linewidth=1, label=name)
    axes.set_xlabel("fraction of the group's channels removed")
    axes.set_ylabel("AP50 lost" if state["key"]["measure"] == "ap50" else "output drift")
    axes.set_title("sensitivity per coupled group")
    if 0 < len(state["groups"]) <= 20:
        axes.legend(fontsize=6)
    figure.savefig(path, dpi=100)
