"""The report's rows and their text: one row per stage (`ROW_KEYS`), kept fractions and
speed-ups relative to the run's baseline, the markdown table and the header line."""

from __future__ import annotations

import statistics

from detector.files import finite_or_null

from .artifacts import METRIC_KEYS, RunArtifacts, StageArtifacts

ROW_KEYS = ("run", "name", "stage", "precision", "params", "size_mib", "gmacs", "latency_ms",
            *METRIC_KEYS, "ap_kept", "ap50_kept")
FIGURE_KEYS = ("precision", "params", "size_mib", "gmacs", "latency_ms")
DEFAULT_PRECISION = "fp32"
DEFAULT_RUNTIME = "torch"
EMPTY_CELL = "–"


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
    """The row of one stage: its figures (precision fp32 where they predate the key), its
    metrics (None where NaN); kept fractions are filled in by `run_rows`."""
    row = {"run": run.name, "name": stage.name, "stage": stage.kind,
           **{key: figures.get(key) for key in FIGURE_KEYS}}
    row["precision"] = row["precision"] or DEFAULT_PRECISION
    # pycocotools reports a metric with nothing to measure as -1, evaluate_model as NaN.
    row.update({metric: finite_or_null(stage.metrics[metric]) for metric in METRIC_KEYS})
    row.update({"ap_kept": None, "ap50_kept": None})
    return {key: row[key] for key in ROW_KEYS}


def latency_pairs(run: RunArtifacts, figures: list[dict]) -> list[dict]:
    """``{"run", "name", "baseline_ms", "model_ms", "runtime"}`` for each stage of ``run``
    timed interleaved with its baseline (``figures`` in stage order); ``runtime`` is where
    both were timed: torch (eager), or onnxruntime for a quantize stage, whose baseline was
    exported to fp32 ONNX."""
    return [{"run": run.name, "name": stage.name, "baseline_ms": measured["baseline_latency_ms"],
             "model_ms": measured["latency_ms"],
             "runtime": measured.get("runtime") or DEFAULT_RUNTIME}
            for stage, measured in zip(run.stages, figures, strict=True)
            if measured.get("baseline_latency_ms") is not None
            and measured.get("latency_ms") is not None]


def run_rows(run: RunArtifacts, figures: list[dict], pairs: list[dict]) -> list[dict]:
    """One row per stage of ``run`` (``figures`` in stage order), with kept fractions. The
    baseline row's latency is the median of its medians across the ``pairs`` timed in eager
    torch, as the baseline row is (its latency timed alone where there are none)."""
    rows = [stage_row(run, stage, stage_figures)
            for stage, stage_figures in zip(run.stages, figures, strict=True)]
    eager = [pair for pair in pairs if pair.get("runtime", DEFAULT_RUNTIME) == DEFAULT_RUNTIME]
    if run.baseline is not None and eager:
        baseline_row = rows[run.stages.index(run.baseline)]
        baseline_row["latency_ms"] = statistics.median(pair["baseline_ms"] for pair in eager)
    add_kept_fractions(rows)
    return rows


def run_speedups(run: RunArtifacts, figures: list[dict], pairs: list[dict]) -> list[dict]:
    """``{"run", "name", "speedup"}`` for each stage of ``run`` whose architecture (layer
    widths) differs from its baseline's: the ratio baseline ms / model ms of its interleaved
    timing (of the rows' latencies where it has none). A stage of the baseline's own
    architecture (the baseline, an unpruned control) gets none: the ratio of two timings of
    one architecture is noise, not a speed-up."""
    baseline = run.baseline
    if baseline is None:
        return []
    reference = figures[run.stages.index(baseline)]
    paired = {pair["name"]: pair for pair in pairs}
    speedups = []
    for stage, stage_figures in zip(run.stages, figures, strict=True):
        if stage_figures["architecture"] == reference["architecture"]:
            continue
        pair = paired.get(stage.name, {"baseline_ms": reference.get("latency_ms"),
                                       "model_ms": stage_figures.get("latency_ms")})
        if pair["baseline_ms"] is not None and pair["model_ms"]:
            speedups.append({"run": run.name, "name": stage.name,
                             "speedup": pair["baseline_ms"] / pair["model_ms"]})
    return speedups


def format_number(value: float | None, pattern: str) -> str:
    return EMPTY_CELL if value is None else format(value, pattern)


def format_percent(fraction: float | None) -> str:
    return EMPTY_CELL if fraction is None else f"{fraction * 100:.1f}%"


def table_cells(report: dict) -> tuple[list[str], list[list[str]]]:
    """The results table as text cells: a header and one line per row."""
    header = ["run", "stage", "kind", "precision", "params (M)", "size (MiB)", "GMACs",
              "latency (ms)", "speed-up", "AP", "AP50", "AP75", "APs", "APm", "APl", "AP kept",
              "AP50 kept"]
    ratios = {(entry["run"], entry["name"]): entry["speedup"] for entry in report["speedups"]}
    lines = []
    for row in report["rows"]:
        ratio = ratios.get((row["run"], row["name"]))
        lines.append([
            row["run"], row["name"], row["stage"], row["precision"],
            format_number(row["params"] / 1e6, ".2f"),
            format_number(row["size_mib"], ".1f"),
            format_number(row["gmacs"], ".3f"),
            format_number(row["latency_ms"], ".2f"),
            EMPTY_CELL if ratio is None else f"{ratio:.2f}x",
            *(format_number(row[metric], ".3f") for metric in METRIC_KEYS),
            format_percent(row["ap_kept"]),
            format_percent(row["ap50_kept"]),
        ])
    return header, lines


def latency_phrase(run: dict) -> str:
    """How one run's latencies were measured (a run summary of `build_report`)."""
    if not run["timed"]:
        return "latency not measured"
    threads, repeats = run["threads"], run["latency_repeats"]
    on = f"on {threads} thread{'s' if threads != 1 else ''}" if threads else "on varying threads"
    forwards = f"{repeats} forwards" if repeats else "its forwards"
    if run["measured"]:
        return (f"CPU latency at batch 1 {on}, median of {forwards} interleaved with the run's "
                "baseline's, measured now")
    return (f"CPU latency at batch 1 {on}, median of {forwards}, measured once as each stage "
            "finished")


def header_line(report: dict) -> str:
    """Which runs the report covers and how latency was measured (markdown: run names in
    backticks)."""
    runs = ", ".join(
        f"`{run['name']}` (recipe {run['recipe_name']}, created {run['created']})"
        for run in report["runs"]
    )
    phrases = [latency_phrase(run) for run in report["runs"]]
    if len(set(phrases)) == 1:
        latency = phrases[0]
    else:
        latency = "; ".join(f"`{run['name']}`: {phrase}"
                            for run, phrase in zip(report["runs"], phrases, strict=True))
    return f"Runs: {runs}. {latency}."


def format_markdown(report: dict) -> str:
    header, lines = table_cells(report)
    text = ["# ctprune report", "", header_line(report), "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text += ["| " + " | ".join(cells) + " |" for cells in lines]
    if any(pair.get("runtime") == "onnxruntime" for pair in report["latency_pairs"]):
        text += ["", "Quantized rows (precision int8) are ONNX files timed in onnxruntime, "
                 "interleaved with the run's baseline exported to fp32 ONNX: their latency is "
                 "onnxruntime's and their speed-up is against that fp32 baseline (pruning and "
                 "INT8 together, in one runtime); params and GMACs are their fp32 model's, "
                 "size is the file on disk."]
    if report["incomplete"]:
        text += ["", "Skipped stages:", ""]
        text += [f"- `{entry['run']}/{entry['stage']}`: {entry['reason']}"
                 for entry in report["incomplete"]]
    return "\n".join(text) + "\n"
