"""`build_report`: a run's (or several runs') results table, plots and HTML page, built only
from the artifacts the stages left on disk, so a report can be rebuilt or compared without
rerunning anything.

What it reads, per run folder ``RUN``:

    RUN/manifest.json                  {"recipe_name", "recipe_sha256", "created", ...}
    RUN/**/stage.json                  marks a stage folder: {"name", "stage", "branch",
                                       "complete", "order", "input_size", "prune"?, ...}
    STAGE/checkpoint.pt                a ctprune checkpoint (config + channel plan + weights)
    STAGE/eval/metrics.json            COCO metrics from `detector.evaluate.run.evaluate_model`
    STAGE/eval/pr_curves/*.png         P-R curves (optional)
    STAGE/metrics.jsonl                training log; "kind": "epoch" lines give the curves

What it writes into ``out_dir``: report.json, report.md, ap_vs_gmacs.png, widths.png,
training_curves.png and a self-contained report.html (every image embedded as base64).

Size and compute are measured on the loaded checkpoints (`detector.stats`), never copied from
stage.json, so every row is counted the same way. CPU latency is measured in pairs: each model's
forwards alternate with its run's baseline's, so a slow spell on a shared machine slows both
sides of the comparison alike; the medians of each side are reported.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from detector import count_macs, count_parameters, load_model, state_dict_mib

from .bench import torch_threads

MANIFEST_FILE = "manifest.json"
STAGE_FILE = "stage.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = Path("eval") / "metrics.json"
PR_CURVES_FOLDER = Path("eval") / "pr_curves"
HISTORY_FILE = "metrics.jsonl"

METRIC_KEYS = ("ap", "ap50", "ap75", "aps", "apm", "apl")
ROW_KEYS = ("run", "name", "stage", "params", "size_mib", "gmacs", "latency_ms", *METRIC_KEYS,
            "ap_kept", "ap50_kept")
PLOT_FILES = {
    "ap_vs_gmacs": "ap_vs_gmacs.png",
    "widths": "widths.png",
    "training_curves": "training_curves.png",
}
# Beyond this many prune stages the per-layer bar charts become too small to read.
MAX_WIDTH_PLOTS = 6
# Layer names fit under the bars up to this many layers; past it the axis shows indices.
MAX_NAMED_LAYERS = 30
# COCO has 80 classes, one P-R PNG each: embedding them all for every final stage would make a
# page of tens of MB. VOC's 20 classes all fit.
MAX_PR_CURVES_PER_STAGE = 20


@dataclass
class StageArtifacts:
    """One complete stage folder: its stage.json (``info``) and eval/metrics.json
    (``metrics``). ``name``, ``kind`` ("baseline" / "prune" / "finetune"), ``branch`` and
    ``order`` come from stage.json."""

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


# --- reading artifacts -------------------------------------------------------------------------


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; errors name the file and what it should have held."""
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"{path}: cannot read the {what} ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the {what} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object, got {type(data).__name__}")
    return data


def is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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


def check_metrics(metrics: dict, path: Path) -> None:
    missing = [key for key in METRIC_KEYS if key not in metrics]
    if missing:
        raise ValueError(
            f"{path}: missing {missing}; expected the keys evaluate_model writes: "
            f"{list(METRIC_KEYS)}"
        )
    for key in METRIC_KEYS:
        value = metrics[key]
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ValueError(f"{path}: {key}: expected a number, got {value!r}")


def find_stage_folders(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """Folders below ``run_dir`` marked by a stage.json, and folders that hold stage outputs
    (checkpoint.pt or eval/metrics.json) without one; both sorted by path."""
    marked = {path.parent for path in run_dir.rglob(STAGE_FILE)}
    with_outputs = {path.parent for path in run_dir.rglob(CHECKPOINT_FILE)}
    with_outputs |= {path.parent.parent for path in run_dir.rglob(str(METRICS_FILE))}
    return sorted(marked), sorted(with_outputs - marked)


def read_stage(folder: Path) -> tuple[StageArtifacts | None, str | None]:
    """The stage in ``folder``, or None and why it cannot be reported."""
    info = read_json(folder / STAGE_FILE, "stage record (stage.json)")
    check_stage_info(info, folder / STAGE_FILE)
    if info.get("complete") is not True:
        return None, "stage.json does not say complete: true (interrupted or still running)"
    if not (folder / CHECKPOINT_FILE).is_file():
        return None, f"no {CHECKPOINT_FILE}"
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
            "wrote, holding manifest.json and one folder per stage)"
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


# --- measuring ---------------------------------------------------------------------------------


def load_stage_model(stage: StageArtifacts) -> tuple[nn.Module, tuple[int, int]]:
    """The stage's model (CPU, eval mode) and its input size (height, width): stage.json's,
    else the checkpoint's."""
    model, checkpoint = load_model(stage.folder / CHECKPOINT_FILE)
    size = stage.info.get("input_size") or checkpoint.model_config.input.input_size
    return model.eval(), (int(size[0]), int(size[1]))


def model_figures(model: nn.Module, input_size: tuple[int, int]) -> dict:
    """Parameters, fp32 state-dict MiB and GMACs of one forward at ``input_size``, batch 1."""
    return {
        "params": count_parameters(model),
        "size_mib": state_dict_mib(model),
        "gmacs": count_macs(model, input_size) / 1e9,
    }


def forward_ms(model: nn.Module, images: torch.Tensor) -> float:
    started = time.perf_counter()
    model(images)
    return (time.perf_counter() - started) * 1e3


def paired_latency(
    baseline: nn.Module, model: nn.Module, input_size: tuple[int, int], repeats: int
) -> tuple[float, float]:
    """Median CPU milliseconds of one batch-1 forward at ``input_size`` (height, width) for
    ``baseline`` and ``model``, measured interleaved: one warm-up each, then ``repeats``
    alternating forwards (baseline, model, baseline, model, ...)."""
    images = torch.zeros(1, 3, *input_size)
    baseline.eval()
    model.eval()
    baseline_times, model_times = [], []
    with torch.no_grad():
        # The first call allocates buffers and picks kernels: not what a deployed model pays.
        forward_ms(baseline, images)
        forward_ms(model, images)
        for _ in range(repeats):
            baseline_times.append(forward_ms(baseline, images))
            model_times.append(forward_ms(model, images))
    return statistics.median(baseline_times), statistics.median(model_times)


def single_latency(model: nn.Module, input_size: tuple[int, int], repeats: int) -> float:
    """Median CPU milliseconds of ``repeats`` batch-1 forwards after one warm-up, for a model
    with no baseline to pair it with."""
    images = torch.zeros(1, 3, *input_size)
    model.eval()
    with torch.no_grad():
        forward_ms(model, images)
        return statistics.median(forward_ms(model, images) for _ in range(repeats))


def finite_or_none(value: object) -> float | None:
    """Metrics with nothing to measure are NaN (pycocotools' -1); JSON has no NaN, so None."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def kept_fraction(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline <= 0:
        return None
    return value / baseline


def add_kept_fractions(rows: list[dict]) -> None:
    """``ap_kept`` and ``ap50_kept``: each row's AP as a fraction of the first baseline row's
    among ``rows`` (one run's rows); None without one."""
    baseline = next((row for row in rows if row["stage"] == "baseline"), None)
    for row in rows:
        for metric in ("ap", "ap50"):
            reference = None if baseline is None else baseline[metric]
            row[f"{metric}_kept"] = kept_fraction(row[metric], reference)


def stage_row(run: RunArtifacts, stage: StageArtifacts, figures: dict) -> dict:
    row = {"run": run.name, "name": stage.name, "stage": stage.kind, **figures, "latency_ms": None}
    row.update({metric: finite_or_none(stage.metrics[metric]) for metric in METRIC_KEYS})
    row.update({"ap_kept": None, "ap50_kept": None})
    return {key: row[key] for key in ROW_KEYS}


def measure_run(
    run: RunArtifacts, latency: bool, repeats: int, threads: int | None
) -> tuple[list[dict], list[dict]]:
    """One row per stage of ``run`` and, when ``latency``, the latency pairs
    (``{"run", "name", "baseline_ms", "model_ms"}``). Each model is paired with the run's
    baseline; the baseline row's own latency is the median of its medians across the pairs
    (measured alone when the run has nothing else, as is a model in a run without a
    baseline). Models are loaded one at a time; ``threads`` applies to latency only."""
    baseline_stage = next((stage for stage in run.stages if stage.kind == "baseline"), None)
    if baseline_stage is not None:
        baseline_model, baseline_size = load_stage_model(baseline_stage)
    rows, pairs = [], []
    for stage in run.stages:
        if stage is baseline_stage:
            model, input_size = baseline_model, baseline_size
        else:
            model, input_size = load_stage_model(stage)
        row = stage_row(run, stage, model_figures(model, input_size))
        rows.append(row)
        if not latency or stage is baseline_stage:
            continue
        with torch_threads(threads):
            if baseline_stage is None:
                row["latency_ms"] = single_latency(model, input_size, repeats)
            else:
                baseline_ms, row["latency_ms"] = paired_latency(
                    baseline_model, model, input_size, repeats
                )
                pairs.append({"run": run.name, "name": stage.name, "baseline_ms": baseline_ms,
                              "model_ms": row["latency_ms"]})
    if latency and baseline_stage is not None:
        baseline_row = rows[run.stages.index(baseline_stage)]
        with torch_threads(threads):
            baseline_row["latency_ms"] = (
                statistics.median(pair["baseline_ms"] for pair in pairs) if pairs
                else single_latency(baseline_model, baseline_size, repeats)
            )
    add_kept_fractions(rows)
    return rows, pairs


# --- tables ------------------------------------------------------------------------------------


def format_number(value: float | None, pattern: str) -> str:
    return "–" if value is None else format(value, pattern)


def format_percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{fraction * 100:.1f}%"


def speedups(report: dict) -> dict[tuple[str, str], float]:
    """(run, stage name) -> paired baseline median / model median; 1 for baseline rows."""
    ratios = {(pair["run"], pair["name"]): pair["baseline_ms"] / pair["model_ms"]
              for pair in report.get("latency_pairs", []) if pair["model_ms"] > 0}
    for row in report["rows"]:
        if row["stage"] == "baseline" and row["latency_ms"] is not None:
            ratios[(row["run"], row["name"])] = 1.0
    return ratios


def table_cells(report: dict) -> tuple[list[str], list[list[str]]]:
    """The results table as text cells: a header and one line per row."""
    header = ["run", "stage", "kind", "params (M)", "size (MiB)", "GMACs", "latency (ms)",
              "speed-up", "AP", "AP50", "AP75", "APs", "APm", "APl", "AP kept", "AP50 kept"]
    ratios = speedups(report)
    lines = []
    for row in report["rows"]:
        ratio = ratios.get((row["run"], row["name"]))
        lines.append([
            row["run"], row["name"], row["stage"],
            format_number(row["params"] / 1e6, ".2f"),
            format_number(row["size_mib"], ".1f"),
            format_number(row["gmacs"], ".3f"),
            format_number(row["latency_ms"], ".2f"),
            "–" if ratio is None else f"{ratio:.2f}x",
            *(format_number(row[metric], ".3f") for metric in METRIC_KEYS),
            format_percent(row["ap_kept"]),
            format_percent(row["ap50_kept"]),
        ])
    return header, lines


def header_line(report: dict) -> str:
    """Which runs the report covers and how latency was measured."""
    runs = ", ".join(
        f"`{run['name']}` (recipe {run['recipe_name']}, created {run['created']})"
        for run in report["runs"]
    )
    if report["threads"] is None:
        latency = "latency not measured"
    else:
        threads = report["threads"]
        plural = "s" if threads != 1 else ""
        latency = (f"CPU latency at batch 1 on {threads} thread{plural}, median of "
                   f"{report['latency_repeats']} forwards interleaved with the run's baseline's")
    return f"Runs: {runs}. {latency}."


def format_markdown(report: dict) -> str:
    header, lines = table_cells(report)
    text = ["# ctprune report", "", header_line(report), "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text += ["| " + " | ".join(cells) + " |" for cells in lines]
    if report["incomplete"]:
        text += ["", "Skipped stages:", ""]
        text += [f"- `{entry['run']}/{entry['stage']}`: {entry['reason']}"
                 for entry in report["incomplete"]]
    return "\n".join(text) + "\n"


# --- plots -------------------------------------------------------------------------------------


def new_figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg canvas. It never goes through pyplot, so no window
    opens and the process-wide backend a user chose is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def empty_plot(path: Path, message: str) -> None:
    figure = new_figure(6, 2)
    figure.text(0.5, 0.5, message, ha="center", va="center")
    figure.savefig(path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, value) no other point beats on both (lower or equal cost
    and higher value), in increasing cost."""
    ranked = sorted(range(len(points)), key=lambda index: (points[index][0], -points[index][1]))
    front, best = [], -math.inf
    for index in ranked:
        if points[index][1] > best:
            front.append(index)
            best = points[index][1]
    return front


def row_label(row: dict, several_runs: bool) -> str:
    return f"{row['run']}/{row['name']}" if several_runs else row["name"]


def plot_ap_vs_gmacs(rows: list[dict], path: Path) -> None:
    """AP50 against GMACs, one colour per run, every point labelled, the Pareto front of all
    rows as a line."""
    rows = [row for row in rows if row["ap50"] is not None]
    if not rows:
        empty_plot(path, "no AP50 to plot")
        return
    runs = list(dict.fromkeys(row["run"] for row in rows))
    figure = new_figure(8, 5.5)
    axes = figure.add_subplot()
    for run in runs:
        mine = [row for row in rows if row["run"] == run]
        axes.scatter([row["gmacs"] for row in mine], [row["ap50"] for row in mine], label=run,
                     zorder=3)
    for row in rows:
        axes.annotate(row_label(row, len(runs) > 1), (row["gmacs"], row["ap50"]), fontsize=7,
                      xytext=(4, 4), textcoords="offset points")
    points = [(row["gmacs"], row["ap50"]) for row in rows]
    front = [points[index] for index in pareto_front(points)]
    axes.plot([x for x, _ in front], [y for _, y in front], color="grey", linestyle="--",
              label="Pareto front", zorder=2)
    axes.set_xlabel("GMACs (batch 1)")
    axes.set_ylabel("AP50")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def output_widths(widths: dict[str, list[int]]) -> dict[str, int]:
    """Output channels of every convolution / linear layer (entries [in, out]); norm layers
    ([num_features]) repeat their convolution's width and are left out."""
    return {name: pair[1] for name, pair in widths.items()
            if isinstance(pair, list) and len(pair) == 2}


def plot_widths(stages: list[tuple[str, StageArtifacts]], path: Path) -> None:
    """Per prune stage (``(label, stage)`` pairs), output channels per layer before (grey)
    and after (colour) pruning, layers in module order; the first MAX_WIDTH_PLOTS stages."""
    stages = [(label, stage) for label, stage in stages
              if "widths_before" in (stage.info.get("prune") or {})]
    if not stages:
        empty_plot(path, "no prune stages")
        return
    shown = stages[:MAX_WIDTH_PLOTS]
    figure = new_figure(10, 2.8 * len(shown) + 0.6)
    for position, (label, stage) in enumerate(shown, start=1):
        stats = stage.info["prune"]
        before = output_widths(stats["widths_before"])
        after = output_widths(stats.get("widths_after", {}))
        names = list(before)
        axes = figure.add_subplot(len(shown), 1, position)
        positions = range(len(names))
        axes.bar(positions, [before[name] for name in names], color="lightgrey", label="before")
        axes.bar(positions, [after.get(name, before[name]) for name in names], color="tab:blue",
                 width=0.6, label="after")
        title = f"{label} ({stats.get('criterion')}, ratio {stats.get('ratio')})"
        axes.set_title(title, fontsize=9)
        axes.set_ylabel("channels")
        if len(names) <= MAX_NAMED_LAYERS:
            axes.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        else:
            axes.set_xlabel("layer (module order)")
        axes.legend(fontsize=7)
    if len(stages) > len(shown):
        figure.suptitle(f"first {len(shown)} of {len(stages)} prune stages")
    figure.tight_layout()
    figure.savefig(path)


def plot_training_curves(histories: list[tuple[str, list[dict]]], path: Path) -> None:
    """Train loss per epoch for every training stage (``(label, epoch records)``), and val
    AP50 on a second axis (dashed, same colour) where it was evaluated."""
    histories = [(label, records) for label, records in histories if records]
    if not histories:
        empty_plot(path, "no training stages")
        return
    from matplotlib.ticker import MaxNLocator

    figure = new_figure(9, 5)
    loss_axes = figure.add_subplot()
    ap_axes = loss_axes.twinx()
    for index, (label, records) in enumerate(histories):
        colour = f"C{index % 10}"
        losses = [record for record in records if record.get("train_loss") is not None]
        scores = [record for record in records if record.get("ap50") is not None]
        if losses:
            loss_axes.plot([record["epoch"] for record in losses],
                           [record["train_loss"] for record in losses], color=colour,
                           label=f"{label} loss")
        if scores:
            ap_axes.plot([record["epoch"] for record in scores],
                         [record["ap50"] for record in scores], color=colour, linestyle="--",
                         marker="o", markersize=3, label=f"{label} AP50")
    loss_axes.set_xlabel("epoch")
    loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axes.set_ylabel("train loss (solid)")
    ap_axes.set_ylabel("val AP50 (dashed)")
    handles = loss_axes.get_legend_handles_labels()
    ap_handles = ap_axes.get_legend_handles_labels()
    loss_axes.legend(handles[0] + ap_handles[0], handles[1] + ap_handles[1], fontsize=7)
    loss_axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def write_plots(runs: list[RunArtifacts], rows: list[dict], out_dir: Path) -> dict[str, Path]:
    several_runs = len(runs) > 1
    labelled = [(f"{run.name}/{stage.name}" if several_runs else stage.name, stage)
                for run in runs for stage in run.stages]
    paths = {key: out_dir / name for key, name in PLOT_FILES.items()}
    plot_ap_vs_gmacs(rows, paths["ap_vs_gmacs"])
    prune_stages = [(label, stage) for label, stage in labelled if stage.kind == "prune"]
    plot_widths(prune_stages, paths["widths"])
    plot_training_curves([(label, read_history(stage.folder)) for label, stage in labelled],
                         paths["training_curves"])
    return paths


# --- html --------------------------------------------------------------------------------------


def final_stages(run: RunArtifacts) -> list[StageArtifacts]:
    """The last stage (highest order) of each branch; the baseline is a branch of its own."""
    last = {}
    for stage in run.stages:
        last[stage.branch] = stage
    return sorted(last.values(), key=lambda stage: stage.order)


def embedded_image(path: Path, alt: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def html_table(report: dict) -> str:
    header, lines = table_cells(report)
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>"
                   for cells in lines)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pr_curve_section(runs: list[RunArtifacts]) -> list[str]:
    parts = []
    for run in runs:
        for stage in final_stages(run):
            curves = sorted((stage.folder / PR_CURVES_FOLDER).glob("*.png"))
            if not curves:
                continue
            parts.append(f"<h3>{html.escape(run.name)} / {html.escape(stage.name)}</h3>")
            shown = curves[:MAX_PR_CURVES_PER_STAGE]
            parts += [embedded_image(curve, curve.stem) for curve in shown]
            if len(curves) > MAX_PR_CURVES_PER_STAGE:
                parts.append(f"<p>{len(curves) - MAX_PR_CURVES_PER_STAGE} more in "
                             f"{html.escape(str(stage.folder / PR_CURVES_FOLDER))}</p>")
    return parts


def render_html(report: dict, runs: list[RunArtifacts], plots: dict[str, Path]) -> str:
    """One self-contained page: the table, every plot and the final stages' P-R curves,
    images embedded as base64 (the page needs no other file)."""
    titles = {"ap_vs_gmacs": "AP50 vs GMACs", "widths": "Channels per layer",
              "training_curves": "Training curves"}
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>ctprune report</title>',
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "img{max-width:100%}</style></head><body>",
             "<h1>ctprune report</h1>", f"<p>{html.escape(header_line(report))}</p>",
             html_table(report)]
    if report["incomplete"]:
        items = "".join(f"<li>{html.escape(entry['run'] + '/' + entry['stage'])}: "
                        f"{html.escape(entry['reason'])}</li>" for entry in report["incomplete"])
        parts.append(f"<h2>Skipped stages</h2><ul>{items}</ul>")
    for key, path in plots.items():
        parts += [f"<h2>{titles[key]}</h2>", embedded_image(path, titles[key])]
    curves = pr_curve_section(runs)
    if curves:
        parts += ["<h2>P-R curves of the final stages</h2>", *curves]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- the entry point ---------------------------------------------------------------------------


def check_arguments(run_dirs: list[Path], out_dir: Path | None, latency_repeats: int,
                    threads: int | None) -> None:
    if not run_dirs:
        raise ValueError("build_report: expected at least one run folder")
    if out_dir is None and len(run_dirs) > 1:
        raise ValueError(
            "build_report: comparing several runs needs out_dir for the combined report"
        )
    if not is_positive_int(latency_repeats):
        raise ValueError(f"latency_repeats: expected an int >= 1, got {latency_repeats!r}")
    if threads is not None and not is_positive_int(threads):
        raise ValueError(f"threads: expected an int >= 1 or None, got {threads!r}")


def run_summary(run: RunArtifacts) -> dict:
    return {"name": run.name, "path": str(run.folder.resolve()),
            **{key: run.manifest.get(key) for key in ("recipe_name", "recipe_sha256", "created")}}


def measure(runs: list[RunArtifacts], latency: bool, repeats: int,
            threads: int | None) -> tuple[list[dict], list[dict], int | None]:
    """Rows and latency pairs of every run, and the CPU thread count latency ran with (None
    when not measured)."""
    rows, pairs = [], []
    for run in runs:
        run_rows, run_pairs = measure_run(run, latency, repeats, threads)
        rows += run_rows
        pairs += run_pairs
    if not latency:
        return rows, pairs, None
    return rows, pairs, threads if threads is not None else torch.get_num_threads()


def write_report(report: dict, runs: list[RunArtifacts], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(format_markdown(report))
    plots = write_plots(runs, report["rows"], out_dir)
    (out_dir / "report.html").write_text(render_html(report, runs, plots))


def build_report(
    run_dirs: list[Path],
    out_dir: Path | None = None,
    *,
    latency: bool = True,
    latency_repeats: int = 7,
    threads: int | None = None,
) -> dict:
    """Build the report of one run, or compare several, from their artifacts alone.

    Args:
        run_dirs: run folders (each with manifest.json and stage folders; see the module
            docstring). Rows follow this order, then each run's stage.json ``order``.
        out_dir: where report.json / .md / .html and the PNGs go; None means the run folder
            itself, which needs exactly one run.
        latency: measure CPU latency (batch 1, the stage's input size, eval mode, no grad);
            False leaves ``latency_ms`` None.
        latency_repeats: forwards per model after one warm-up; each model's alternate with
            its run's baseline's and the medians are reported.
        threads: CPU threads for the latency runs (torch's setting is restored afterwards);
            None keeps torch's current count. The count used is recorded.

    Returns:
        ``{"runs": [{"name", "path", "recipe_name", "recipe_sha256", "created"}],
        "threads": int | None, "latency_repeats": int, "rows": [...], "latency_pairs":
        [{"run", "name", "baseline_ms", "model_ms"}], "incomplete": [{"run", "stage",
        "reason"}]}``, also written to report.json. Each row has exactly ``ROW_KEYS``:
        params, size_mib (fp32 state dict as torch.save writes it) and gmacs are measured on
        the loaded checkpoint; AP metrics come from eval/metrics.json (None where NaN);
        ap_kept / ap50_kept are fractions of the run's baseline row (None without one).

    Raises:
        ValueError: a folder that is missing or holds no manifest.json, unreadable or
            malformed stage.json / metrics.json, or no complete stage in any run.
    """
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    check_arguments(run_dirs, out_dir, latency_repeats, threads)
    out_dir = Path(out_dir) if out_dir is not None else run_dirs[0]
    runs = [read_run(run_dir) for run_dir in run_dirs]
    incomplete = [entry for run in runs for entry in run.incomplete]
    if not any(run.stages for run in runs):
        raise ValueError(
            f"no complete stages in {', '.join(str(path) for path in run_dirs)}: a stage needs a "
            f"stage.json saying complete: true, {CHECKPOINT_FILE} and {METRICS_FILE.as_posix()} "
            f"({len(incomplete)} stage folders skipped)"
        )
    rows, pairs, used_threads = measure(runs, latency, latency_repeats, threads)
    report = {"runs": [run_summary(run) for run in runs], "threads": used_threads,
              "latency_repeats": latency_repeats if latency else None, "rows": rows,
              "latency_pairs": pairs, "incomplete": incomplete}
    write_report(report, runs, out_dir)
    return report
