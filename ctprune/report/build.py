"""`build_report`: read the runs' artifacts, take each stage's figures (stored, or measured
when asked), make the rows, and write report.json, report.md, the plots and report.html."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from detector.files import atomic_write_json, atomic_write_text

from ..layout import CHECKPOINT_FILE, METRICS_FILE, REPORT_FILES
from .artifacts import RunArtifacts, is_positive_int, read_run
from .html import render_html
from .measure import run_figures
from .plots import write_plots
from .tables import format_markdown, latency_pairs, run_rows, run_speedups


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


def the_one_value(values: list) -> object:
    """The value all of ``values`` share, else None."""
    return values[0] if values and all(value == values[0] for value in values) else None


def _set_aside_other_stages(run: RunArtifacts, names: set[str]) -> None:
    """Keep only the stages called ``names``; list the others as left by an earlier recipe."""
    others = [stage for stage in run.stages if stage.name not in names]
    run.stages = [stage for stage in run.stages if stage.name in names]
    run.incomplete += [
        {"run": run.name, "stage": stage.name,
         "reason": "left by an earlier recipe: not a stage of the current one"}
        for stage in others
    ]


def run_summary(run: RunArtifacts, figures: list[dict], measured: bool, out_dir: Path) -> dict:
    """What the report says about one run: where it is (relative to the report's folder, so a
    report moved together with its runs, or committed, holds no path of this machine), its
    manifest's identity, whether its figures were measured now, and the latency settings its
    stages share (None where they differ)."""
    timed = [stage for stage in figures if stage.get("latency_ms") is not None]
    return {
        "name": run.name,
        "path": Path(os.path.relpath(run.folder.resolve(), out_dir.resolve())).as_posix(),
        **{key: run.manifest.get(key) for key in ("recipe_name", "recipe_sha256", "created")},
        "measured": measured,
        "timed": bool(timed),
        "threads": the_one_value([stage.get("threads") for stage in timed]),
        "latency_repeats": the_one_value([stage.get("latency_repeats") for stage in timed]),
    }


def write_report(report: dict, runs: list[RunArtifacts], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / REPORT_FILES["json"], report)
    atomic_write_text(out_dir / REPORT_FILES["markdown"], format_markdown(report))
    plots = write_plots(runs, report["rows"], out_dir)
    atomic_write_text(out_dir / REPORT_FILES["html"], render_html(report, runs, plots))


def build_report(
    run_dirs: list[Path],
    out_dir: Path | None = None,
    *,
    measure: bool = False,
    latency: bool = True,
    latency_repeats: int = 7,
    threads: int | None = None,
    stages: Collection[str] | None = None,
) -> dict:
    """Build the report of one run, or compare several, from their artifacts alone.

    Args:
        run_dirs: run folders (`ctprune.layout`). Rows follow this order, then each run's
            stage.json ``order``.
        out_dir: where report.json / .md / .html and the PNGs go; None means the run folder
            itself, which needs exactly one run.
        measure: measure every stage's model again (size, compute and, with ``latency``, CPU
            latency, each model interleaved with its run's baseline) instead of reading the
            ``figures`` the stages stored in stage.json. A run with a stage without stored
            figures (written before they were stored) is measured so whatever this says.
        latency: when measuring, time the models (batch 1, the stage's input size, eval mode,
            no grad); False leaves ``latency_ms`` None. Stored latencies are shown regardless.
        latency_repeats: when timing, forwards per model after one warm-up.
        threads: CPU threads for timing (torch's setting is restored afterwards); None keeps
            torch's current count. The count used is recorded.
        stages: the names of the stages to report (`ctprune run` passes its recipe's); a
            complete stage of another name, left in the folder by an earlier recipe (another
            ratio, say), is listed under ``incomplete`` instead of reported as a current row.
            None reports every complete stage.

    Returns:
        ``{"runs": [{"name", "path", "recipe_name", "recipe_sha256", "created", "measured",
        "timed", "threads", "latency_repeats"}], "threads": int | None, "latency_repeats":
        int | None, "rows": [...], "latency_pairs": [{"run", "name", "baseline_ms",
        "model_ms", "runtime"}], "speedups": [{"run", "name", "speedup"}], "incomplete": [{"run",
        "stage", "reason"}]}``, also written to report.json as strict JSON. Top-level
        ``threads`` / ``latency_repeats`` are the settings of latency timed now (None when
        nothing was). Each row has exactly ``ROW_KEYS``: precision, params, size_mib (state
        dict as torch.save writes it), gmacs and latency_ms of the stage's checkpoint; AP
        metrics from eval/metrics.json (None where NaN); ap_kept / ap50_kept as fractions of
        the run's baseline row (None without one). ``speedups`` holds the rows whose layer
        widths differ from their baseline's (see `ctprune.report.tables.run_speedups`).

    Raises:
        ValueError: a folder that is missing or holds no manifest.json, unreadable or
            malformed stage.json / metrics.json, or no complete stage in any run.
    """
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    check_arguments(run_dirs, out_dir, latency_repeats, threads)
    out_dir = Path(out_dir) if out_dir is not None else run_dirs[0]
    runs = [read_run(run_dir) for run_dir in run_dirs]
    if stages is not None:
        for run in runs:
            _set_aside_other_stages(run, set(stages))
    incomplete = [entry for run in runs for entry in run.incomplete]
    if not any(run.stages for run in runs):
        raise ValueError(
            f"no complete stages in {', '.join(str(path) for path in run_dirs)}: a stage needs a "
            f"stage.json saying complete: true, {CHECKPOINT_FILE} and {METRICS_FILE.as_posix()} "
            f"({len(incomplete)} stage folders skipped)"
        )
    summaries, rows, pairs, speedups = [], [], [], []
    for run in runs:
        figures, measured = run_figures(
            run, measure=measure, latency=latency, repeats=latency_repeats, threads=threads)
        run_pairs = latency_pairs(run, figures)
        summaries.append(run_summary(run, figures, measured, out_dir))
        rows += run_rows(run, figures, run_pairs)
        pairs += run_pairs
        speedups += run_speedups(run, figures, run_pairs)
    timed_now = [summary for summary in summaries if summary["measured"] and summary["timed"]]
    report = {
        "runs": summaries,
        "threads": the_one_value([summary["threads"] for summary in timed_now]),
        "latency_repeats": latency_repeats if timed_now else None,
        "rows": rows,
        "latency_pairs": pairs,
        "speedups": speedups,
        "incomplete": incomplete,
    }
    write_report(report, runs, out_dir)
    return report
