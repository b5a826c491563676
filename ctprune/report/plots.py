"""The report's plots: AP and AP50 against GMACs, channels per layer of each prune stage, and
training curves. Figures are drawn by matplotlib's Agg canvas without pyplot, so no window
opens and the backend a user chose is left alone; every PNG is written atomically."""

from __future__ import annotations

import math
from pathlib import Path

from detector.files import atomic_replace

from ..layout import PLOT_FILES
from .artifacts import RunArtifacts, StageArtifacts, read_history

# Beyond this many prune stages the per-layer bar charts become too small to read.
MAX_WIDTH_PLOTS = 6
# Layer names fit under the bars up to this many layers; past it the axis shows indices.
MAX_NAMED_LAYERS = 30
# Point labels are tried at these distances (points) in eight directions, nearest first, and
# put at the first place that covers no marker, label or legend.
LABEL_RADII = (5, 9, 14, 22, 32, 44)
LABEL_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
# Half the side of the box a marker covers, in pixels (scatter's default marker is 6 points).
MARKER_HALF_PIXELS = 5
METRIC_MARKERS = {"ap50": ("o", "AP50"), "ap": ("s", "AP")}


def new_figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg canvas (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: Path) -> None:
    atomic_replace(path, lambda file: figure.savefig(file, format="png"))


def empty_plot(path: Path, message: str) -> None:
    figure = new_figure(6, 2)
    figure.text(0.5, 0.5, message, ha="center", va="center")
    save_figure(figure, path)


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


def _overlap(box, other) -> float:
    """Area (pixels²) two display boxes share."""
    width = min(box.x1, other.x1) - max(box.x0, other.x0)
    height = min(box.y1, other.y1) - max(box.y0, other.y0)
    return max(width, 0) * max(height, 0)


def _nearer_to_another(box, own, others) -> bool:
    """Whether the centre of label ``box`` is nearer to one of ``others`` (marker centres, in
    pixels) than to its own point ``own``: a reader would give the label to that marker."""
    centre_x, centre_y = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    own_distance = math.hypot(centre_x - own[0], centre_y - own[1])
    return any(math.hypot(centre_x - x, centre_y - y) < own_distance for x, y in others)


def _alignment(step: int, negative: str, positive: str) -> str:
    return {-1: negative, 0: "center", 1: positive}[step]


def place_labels(figure, axes, points: list[tuple[float, float]], labels: list[str],
                 obstacles: list) -> list:
    """Annotate each point (data coordinates) with its label at the nearest place, of the
    candidate offsets, that overlaps no marker, no label already placed, none of
    ``obstacles`` (display boxes), stays inside the axes and is nearer to its own point than
    to any other (so it cannot be read as another point's); where every candidate fails, the
    one with the least overlap. Labels set off from their point get a thin leader line.
    Call after the layout is final: positions are computed in display pixels."""
    from matplotlib.transforms import Bbox

    renderer = figure.canvas.get_renderer()
    inside = axes.get_window_extent(renderer)
    centres = [tuple(centre) for centre in axes.transData.transform(points)] if points else []
    markers = [Bbox.from_extents(x - MARKER_HALF_PIXELS, y - MARKER_HALF_PIXELS,
                                 x + MARKER_HALF_PIXELS, y + MARKER_HALF_PIXELS)
               for x, y in centres]
    taken = [*markers, *obstacles]
    annotations = []
    for index, (point, text) in enumerate(zip(points, labels, strict=True)):
        own = centres[index]
        others = [centre for centre in centres if centre != own]
        best = None
        for radius in LABEL_RADII:
            for step_x, step_y in LABEL_DIRECTIONS:
                label = axes.annotate(
                    text, point, xytext=(step_x * radius, step_y * radius),
                    textcoords="offset points", fontsize=7,
                    ha=_alignment(step_x, "right", "left"), va=_alignment(step_y, "top", "bottom"))
                box = label.get_window_extent(renderer)
                outside = box.width * box.height - _overlap(box, inside)
                # Overlap first, then ambiguity: an unambiguous label may sit further out.
                cost = (sum(_overlap(box, other) for other in taken) + outside,
                        _nearer_to_another(box, own, others))
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, label, box, radius)
                else:
                    label.remove()
                if best[0] == (0, False):
                    break
            if best[0] == (0, False):
                break
        _, label, box, radius = best
        taken.append(box)
        annotations.append(label)
        if radius > LABEL_RADII[1]:
            axes.annotate("", point, xytext=label.xyann, textcoords="offset points",
                          arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5,
                                      "shrinkA": 0, "shrinkB": 3})
    return annotations


def plot_ap_vs_gmacs(rows: list[dict], path: Path) -> None:
    """AP50 (circles) and AP (squares) against GMACs, one colour per run, the Pareto front of
    each metric as a grey line. Points carry their row's number (a short label placed clear of
    other marks, `place_labels`); the legend beside the axes maps numbers to stage names."""
    from matplotlib.lines import Line2D

    rows = [row for row in rows if row["ap50"] is not None or row["ap"] is not None]
    if not rows:
        empty_plot(path, "no AP to plot")
        return
    runs = list(dict.fromkeys(row["run"] for row in rows))
    colours = {run: f"C{index % 10}" for index, run in enumerate(runs)}
    figure = new_figure(10, max(5.5, 1.5 + 0.15 * (len(rows) + len(runs) + 4)))
    axes = figure.add_subplot()
    # Rows on the very same point (an unpruned control beside its baseline, a sweep's
    # zero-AP stages) share one label: "2,3".
    numbers_at: dict[tuple[float, float], list[str]] = {}
    for metric, (marker, _) in METRIC_MARKERS.items():
        for number, row in enumerate(rows, start=1):
            if row[metric] is None:
                continue
            axes.scatter(row["gmacs"], row[metric], color=colours[row["run"]], marker=marker,
                         facecolors=colours[row["run"]] if metric == "ap50" else "none", zorder=3)
            numbers = numbers_at.setdefault((row["gmacs"], row[metric]), [])
            if str(number) not in numbers:  # AP equal to AP50: one point
                numbers.append(str(number))
        scored = [(row["gmacs"], row[metric]) for row in rows if row[metric] is not None]
        front = [scored[index] for index in pareto_front(scored)]
        axes.plot([x for x, _ in front], [y for _, y in front], color="grey", zorder=2,
                  linestyle="--" if metric == "ap50" else ":")
    handles = [Line2D([], [], color="grey", marker=marker, linestyle="--" if metric == "ap50"
                      else ":", markerfacecolor="grey" if metric == "ap50" else "none",
                      label=f"{name} (line: Pareto front)")
               for metric, (marker, name) in METRIC_MARKERS.items()]
    if len(runs) > 1:
        handles += [Line2D([], [], color=colours[run], marker="o", linestyle="none", label=run)
                    for run in runs]
    handles += [Line2D([], [], color=colours[row["run"]], marker=f"${number}$", linestyle="none",
                       markersize=4 + 3 * len(str(number)),
                       label=row_label(row, len(runs) > 1))
                for number, row in enumerate(rows, start=1)]
    legend = axes.legend(handles=handles, fontsize=7, loc="upper left",
                         bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    axes.set_xlabel("GMACs (batch 1)")
    axes.set_ylabel("AP, AP50")
    axes.grid(alpha=0.3)
    axes.margins(0.08)
    figure.tight_layout()
    place_labels(figure, axes, list(numbers_at), [",".join(numbers) for numbers in
                                                  numbers_at.values()],
                 [legend.get_window_extent()])
    save_figure(figure, path)


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
    save_figure(figure, path)


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
    save_figure(figure, path)


def write_plots(runs: list[RunArtifacts], rows: list[dict], out_dir: Path) -> dict[str, Path]:
    """Every plot into ``out_dir``; their paths by `PLOT_FILES` key."""
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
