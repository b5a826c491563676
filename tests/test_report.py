"""The report: rows, kept fractions and figures against hand-written artifacts and
detector.stats on the loaded checkpoints; files; comparisons; latency; errors."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
import shutil
import statistics

import pytest
import torch
from report_fixtures import (
    coco_metrics,
    epoch_records,
    write_json,
    write_manifest,
    write_pr_curves,
    write_stage,
)
from tiny import tiny_config, tiny_model

import ctprune
from ctprune.cli import main
from ctprune.report import (
    ROW_KEYS,
    build_report,
    chain_rows,
    measure,
    paired_latency,
    pareto_front,
    read_history,
    run_stage_rows,
    seed_chain_rows,
    training_record,
)
from ctprune.report.measure import model_figures
from ctprune.report.plots import new_figure, place_labels
from detector import count_macs, count_parameters, load_model, state_dict_mib

INPUT = (64, 64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a loaded 2-core machine two intra-op threads spin against each other: a 64 px forward
    of the tiny model takes 0.8 s instead of 2 ms. Sizes and MACs do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(one_thread):
    torch.manual_seed(0)
    model = tiny_model()
    pruned = ctprune.prune(model, 0.5, "l1", example_inputs=torch.zeros(1, 3, *INPUT))
    stats = dataclasses.asdict(pruned.stats)
    stats.pop("groups")  # the runner leaves the per-group details out of stage.json
    return {"baseline": model, "pruned": pruned.model, "stats": stats, "config": tiny_config()}


@pytest.fixture(scope="module")
def run_a(models, tmp_path_factory):
    """baseline -> l1_0.5/prune -> l1_0.5/finetune, plus an interrupted control and a folder
    with a checkpoint but no stage.json."""
    run = tmp_path_factory.mktemp("runs") / "run_a"
    write_manifest(run, "recipe_a")
    config = models["config"]
    write_stage(run, "baseline", kind="baseline", order=1, model=models["baseline"],
                config=config, metrics=coco_metrics(0.40, 0.60),
                history=epoch_records([3.0, 2.0, 1.5], {2: 0.5, 3: 0.6}))
    prune = write_stage(run, "l1_0.5/prune", kind="prune", order=2, branch="l1_0.5",
                        model=models["pruned"], config=config,
                        metrics=coco_metrics(0.20, 0.30, aps=0.1), prune=models["stats"])
    write_pr_curves(prune, 0.3)
    finetune = write_stage(run, "l1_0.5/finetune", kind="finetune", order=3, branch="l1_0.5",
                           model=models["pruned"], config=config, metrics=coco_metrics(0.36, 0.57),
                           history=epoch_records([1.8, 1.6], {2: 0.57}))
    write_pr_curves(finetune, 0.9)
    write_stage(run, "controls/random_0.5/finetune", kind="finetune", order=4, branch="random_0.5",
                complete=False, history=epoch_records([2.5], {}))
    orphan = run / "l1_0.7" / "prune"
    orphan.mkdir(parents=True)
    shutil.copyfile(prune / "checkpoint.pt", orphan / "checkpoint.pt")
    return run


@pytest.fixture(scope="module")
def run_b(models, tmp_path_factory):
    """A second run with its own baseline: its kept fractions are relative to it."""
    run = tmp_path_factory.mktemp("runs") / "run_b"
    write_manifest(run, "recipe_b")
    write_stage(run, "baseline", kind="baseline", order=1, model=models["baseline"],
                config=models["config"], metrics=coco_metrics(0.50, 0.80))
    write_stage(run, "l1_0.5/finetune", kind="finetune", order=2, branch="l1_0.5",
                model=models["pruned"], config=models["config"], metrics=coco_metrics(0.25, 0.40),
                history=epoch_records([1.0], {1: 0.4}))
    return run


@pytest.fixture(scope="module")
def run_without_baseline(models, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run_c"
    write_manifest(run, "recipe_c")
    write_stage(run, "l1_0.5/prune", kind="prune", order=1, branch="l1_0.5", model=models["pruned"],
                config=models["config"], metrics=coco_metrics(0.1, 0.2), prune=models["stats"])
    return run


@pytest.fixture(scope="module")
def report_a(run_a, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("report_a")
    return build_report([run_a], out_dir, latency=False), out_dir


def test_rows_follow_stage_order_with_the_hand_written_metrics(report_a):
    report, _ = report_a
    rows = report["rows"]
    assert [row["name"] for row in rows] == ["baseline", "l1_0.5/prune", "l1_0.5/finetune"]
    assert [row["stage"] for row in rows] == ["baseline", "prune", "finetune"]
    assert all(tuple(row) == ROW_KEYS for row in rows)
    assert all(row["run"] == "run_a" for row in rows)
    finetune = rows[2]
    assert finetune["ap"] == 0.36 and finetune["ap50"] == 0.57
    assert finetune["ap75"] == pytest.approx(0.36 * 1.1)
    assert finetune["apl"] == pytest.approx(0.36 * 1.2)
    # evaluate_model writes NaN where there is nothing to measure; JSON gets None.
    assert rows[0]["aps"] is None and rows[1]["aps"] == 0.1


def test_kept_fractions_are_relative_to_the_run_baseline(report_a):
    rows = report_a[0]["rows"]
    assert [row["ap_kept"] for row in rows] == pytest.approx([1.0, 0.20 / 0.40, 0.36 / 0.40])
    assert [row["ap50_kept"] for row in rows] == pytest.approx([1.0, 0.30 / 0.60, 0.57 / 0.60])


def test_size_and_compute_are_measured_on_the_checkpoints(report_a, run_a, models):
    for row in report_a[0]["rows"]:
        model, _ = load_model(run_a / row["name"] / "checkpoint.pt")
        assert row["params"] == count_parameters(model)
        assert row["size_mib"] == state_dict_mib(model)
        assert row["gmacs"] == count_macs(model, INPUT) / 1e9
    # Cross-check against the numbers prune() reported when it made the model.
    pruned = report_a[0]["rows"][1]
    assert pruned["params"] == models["stats"]["params_after"]
    assert pruned["gmacs"] * 1e9 == models["stats"]["macs_after"]
    assert report_a[0]["rows"][0]["params"] > pruned["params"]


def test_incomplete_stages_are_skipped_and_listed(report_a):
    incomplete = {entry["stage"]: entry["reason"] for entry in report_a[0]["incomplete"]}
    assert set(incomplete) == {"controls/random_0.5/finetune", "l1_0.7/prune"}
    assert "complete" in incomplete["controls/random_0.5/finetune"]
    assert "stage.json" in incomplete["l1_0.7/prune"]
    names = {row["name"] for row in report_a[0]["rows"]}
    assert not names & set(incomplete)


def test_report_json_is_strict_json_equal_to_the_returned_report(report_a):
    report, out_dir = report_a

    def refuse(constant):
        raise AssertionError(f"report.json holds {constant}")

    written = json.loads((out_dir / "report.json").read_text(), parse_constant=refuse)
    assert written == report
    assert written["threads"] is None
    assert [run["recipe_name"] for run in written["runs"]] == ["recipe_a"]


def test_markdown_has_one_table_line_per_row(report_a):
    report, out_dir = report_a
    text = (out_dir / "report.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(report["rows"])  # header and separator
    assert "run_a" in text.splitlines()[2] and "latency not measured" in text
    finetune = next(line for line in table if "l1_0.5/finetune" in line)
    assert "| 0.360 |" in finetune and "| 90.0% |" in finetune and "| 95.0% |" in finetune
    assert "controls/random_0.5/finetune" in text  # listed under the skipped stages


def test_plots_are_written(report_a):
    out_dir = report_a[1]
    for name in ("ap_vs_gmacs.png", "widths.png", "training_curves.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_embeds_every_image_and_refers_to_no_file(report_a, run_a):
    out_dir = report_a[1]
    page = (out_dir / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    assert "href=" not in page
    embedded = {source.removeprefix("data:image/png;base64,") for source in sources}
    for name in ("ap_vs_gmacs.png", "widths.png", "training_curves.png"):
        assert base64.b64encode((out_dir / name).read_bytes()).decode() in embedded
    # P-R curves: the final stage of each branch (l1_0.5/finetune), not the prune stage before it.
    for curve in (run_a / "l1_0.5/finetune/eval/pr_curves").glob("*.png"):
        assert base64.b64encode(curve.read_bytes()).decode() in embedded
    for curve in (run_a / "l1_0.5/prune/eval/pr_curves").glob("*.png"):
        assert base64.b64encode(curve.read_bytes()).decode() not in embedded
    assert len(sources) == 3 + 2


def test_default_out_dir_is_the_run_folder(run_a, tmp_path):
    run = shutil.copytree(run_a, tmp_path / "run_a")
    report = build_report([run], latency=False)
    assert (run / "report.json").is_file() and (run / "report.html").is_file()
    assert report["runs"][0]["path"] == "."  # relative to the report: no machine path


def test_two_runs_in_one_report(run_a, run_b, run_without_baseline, tmp_path):
    report = build_report([run_b, run_a, run_without_baseline], tmp_path, latency=False)
    assert [(row["run"], row["name"]) for row in report["rows"]] == [
        ("run_b", "baseline"), ("run_b", "l1_0.5/finetune"),
        ("run_a", "baseline"), ("run_a", "l1_0.5/prune"), ("run_a", "l1_0.5/finetune"),
        ("run_c", "l1_0.5/prune"),
    ]
    kept = [row["ap_kept"] for row in report["rows"]]
    assert kept[:5] == pytest.approx([1.0, 0.25 / 0.50, 1.0, 0.20 / 0.40, 0.36 / 0.40])
    assert kept[5] is None and report["rows"][5]["ap50_kept"] is None
    assert [run["name"] for run in report["runs"]] == ["run_b", "run_a", "run_c"]
    header = (tmp_path / "report.md").read_text().splitlines()[2]
    assert all(name in header for name in ("run_a", "run_b", "run_c"))


def test_latency_is_paired(run_a, run_without_baseline, tmp_path):
    threads_before = torch.get_num_threads()
    report = build_report([run_a, run_without_baseline], tmp_path, latency_repeats=1, threads=1)
    assert torch.get_num_threads() == threads_before
    assert report["threads"] == 1 and report["latency_repeats"] == 1
    assert all(row["latency_ms"] > 0 for row in report["rows"])
    pairs = report["latency_pairs"]
    assert [(pair["run"], pair["name"]) for pair in pairs] == [
        ("run_a", "l1_0.5/prune"), ("run_a", "l1_0.5/finetune")
    ]
    baseline = report["rows"][0]
    # The baseline row: the median of its paired medians.
    assert baseline["latency_ms"] == statistics.median(pair["baseline_ms"] for pair in pairs)
    assert "speed-up" in (tmp_path / "report.md").read_text()


def test_latency_off_gives_none(report_a):
    assert all(row["latency_ms"] is None for row in report_a[0]["rows"])
    assert report_a[0]["latency_pairs"] == []


class Recorder(torch.nn.Module):
    def __init__(self, name: str, calls: list[str]):
        super().__init__()
        self.name, self.calls = name, calls

    def forward(self, images):
        self.calls.append(self.name)
        assert not torch.is_grad_enabled() and not self.training
        return images


def test_paired_latency_interleaves_through_the_bench_timer_after_one_warm_up_each():
    calls = []
    baseline, model = Recorder("baseline", calls), Recorder("model", calls)
    baseline_ms, model_ms = paired_latency(baseline, model, (8, 8), repeats=3)
    # ctprune.bench.interleaved_times: forward order on even rounds, reverse on odd ones.
    assert calls == ["baseline", "model"] * 2 + ["model", "baseline"] + ["baseline", "model"]
    assert baseline_ms >= 0 and model_ms >= 0


def test_pareto_front_by_hand():
    points = [(1, 0.5), (2, 0.4), (2, 0.7), (3, 0.7), (4, 0.9), (0.5, 0.1)]
    # (2, 0.4) loses to (2, 0.7); (3, 0.7) costs more than (2, 0.7) for the same value.
    assert pareto_front(points) == [5, 0, 2, 4]
    assert pareto_front([]) == []


def test_history_keeps_the_last_record_per_epoch_and_skips_broken_lines(tmp_path):
    records = epoch_records([3.0, 2.0], {2: 0.5})
    redone = {**records[1], "train_loss": 1.9}  # epoch 2 again after a resume
    lines = [json.dumps(records[0]), json.dumps(records[1]), '{"kind": "epo', json.dumps(redone),
             json.dumps({"kind": "train", "epoch": 2, "step": 5})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert [(r["epoch"], r["train_loss"]) for r in read_history(tmp_path)] == [(1, 3.0), (2, 1.9)]
    assert read_history(tmp_path / "missing") == []


def test_errors_name_the_folder(run_a, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=f"{missing}: no such run folder"):
        build_report([missing], latency=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ValueError, match=f"{bare}: not a run folder: no manifest.json"):
        build_report([bare], latency=False)
    with pytest.raises(ValueError, match="several runs needs out_dir"):
        build_report([run_a, run_a], latency=False)


def test_no_complete_stage_is_an_error(tmp_path):
    run = tmp_path / "run"
    write_manifest(run, "recipe")
    write_stage(run, "baseline", kind="baseline", order=1, complete=False)
    with pytest.raises(ValueError, match="no complete stages"):
        build_report([run], latency=False)


def test_malformed_artifacts_name_the_file_and_key(run_a, tmp_path):
    run = shutil.copytree(run_a, tmp_path / "run")
    write_json(run / "baseline" / "eval" / "metrics.json", {"ap": 0.4})
    with pytest.raises(ValueError, match=r"baseline/eval/metrics.json: missing \['ap50'"):
        build_report([run], latency=False)
    (run / "baseline" / "stage.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"baseline/stage.json: the stage record .* not valid"):
        build_report([run], latency=False)
    no_order = {"name": "baseline", "stage": "baseline", "complete": True}
    write_json(run / "baseline" / "stage.json", no_order)
    with pytest.raises(ValueError, match=r"baseline/stage.json: missing key 'order'"):
        build_report([run], latency=False)


# --- stored figures ------------------------------------------------------------------------------


def stored_figures(model, latency_ms: float, baseline_ms: float | None = None) -> dict:
    """stage.json ``figures`` as `ctprune run` stores them, with chosen latencies."""
    return {**model_figures(model, INPUT), "latency_ms": latency_ms,
            "baseline_latency_ms": baseline_ms, "threads": 1, "latency_repeats": 7}


@pytest.fixture(scope="module")
def run_stored(models, tmp_path_factory):
    """A run whose stages stored their figures: the baseline (12 ms alone), an unpruned control
    of the baseline's widths (9 ms, its baseline 10 ms in the same rounds) and a pruned
    fine-tune (5 ms, its baseline 10 ms) whose AP is NaN."""
    run = tmp_path_factory.mktemp("runs") / "run_stored"
    write_manifest(run, "recipe_stored")
    baseline, pruned, config = models["baseline"], models["pruned"], models["config"]
    write_stage(run, "baseline", kind="baseline", order=1, model=baseline, config=config,
                metrics=coco_metrics(0.40, 0.60), figures=stored_figures(baseline, 12.0))
    write_stage(run, "control_unpruned/finetune", kind="finetune", order=2,
                branch="control_unpruned", model=baseline, config=config,
                metrics=coco_metrics(0.41, 0.61), figures=stored_figures(baseline, 9.0, 10.0))
    write_stage(run, "l1_0.5/finetune", kind="finetune", order=3, branch="l1_0.5", model=pruned,
                config=config, metrics=coco_metrics(math.nan, 0.55),
                figures=stored_figures(pruned, 5.0, 10.0))
    return run


def table_column(markdown: str, header: str) -> list[str]:
    lines = [line.split("|")[1:-1] for line in markdown.splitlines() if line.startswith("|")]
    column = [cell.strip() for cell in lines[0]].index(header)
    return [cells[column].strip() for cells in lines[2:]]


def test_stored_figures_are_read_without_loading_or_timing_a_model(run_stored, tmp_path,
                                                                   monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the report measured a model")

    monkeypatch.setattr(measure, "interleaved_times", refuse)
    monkeypatch.setattr(measure, "load_model", refuse)
    report = build_report([run_stored], tmp_path)
    # The baseline row: the median of its medians in the stored pairs, as when re-timed.
    assert [row["latency_ms"] for row in report["rows"]] == [10.0, 9.0, 5.0]
    assert report["runs"][0]["measured"] is False and report["runs"][0]["threads"] == 1
    assert report["threads"] is None
    assert [(pair["name"], pair["baseline_ms"], pair["model_ms"])
            for pair in report["latency_pairs"]] == [
        ("control_unpruned/finetune", 10.0, 9.0), ("l1_0.5/finetune", 10.0, 5.0)]
    assert "measured once as each stage finished" in (tmp_path / "report.md").read_text()


def test_measure_times_every_stage_again_interleaved_with_the_baseline(run_stored, tmp_path,
                                                                      monkeypatch, capsys):
    timed = []
    timer = measure.interleaved_times

    def recording_timer(runners, *args, **kwargs):
        timed.append(len(runners))
        return timer(runners, *args, **kwargs)

    monkeypatch.setattr(measure, "interleaved_times", recording_timer)
    command = ["report", str(run_stored), "--out", str(tmp_path), "--measure", "--threads", "1"]
    assert main(command) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert timed == [1, 2, 2]  # the baseline alone, then each model paired with it
    assert report["runs"][0]["measured"] is True and report["threads"] == 1
    assert [pair["name"] for pair in report["latency_pairs"]] == [
        "control_unpruned/finetune", "l1_0.5/finetune"]
    assert [row["latency_ms"] for row in report["rows"]] != [10.0, 9.0, 5.0]
    assert "measured now" in capsys.readouterr().out


def test_every_row_carries_its_precision(report_a, run_stored, tmp_path):
    stored = build_report([run_stored], tmp_path)
    for report, out_dir in (report_a, (stored, tmp_path)):
        assert [row["precision"] for row in report["rows"]] == ["fp32"] * len(report["rows"])
        markdown = (out_dir / "report.md").read_text()
        assert table_column(markdown, "precision") == ["fp32"] * len(report["rows"])
        assert "<th>precision</th>" in (out_dir / "report.html").read_text()


def test_stored_figures_without_precision_are_fp32(run_stored, tmp_path):
    run = shutil.copytree(run_stored, tmp_path / "run")
    info = json.loads((run / "baseline" / "stage.json").read_text())
    del info["figures"]["precision"]
    write_json(run / "baseline" / "stage.json", info)
    assert build_report([run], tmp_path / "out")["rows"][0]["precision"] == "fp32"


def test_a_nan_metric_is_null_in_strict_json(run_stored, tmp_path):
    report = build_report([run_stored], tmp_path)

    def refuse(constant):
        raise AssertionError(f"report.json holds {constant}")

    written = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    pruned = written["rows"][2]
    assert pruned["ap"] is None and pruned["ap_kept"] is None and pruned["ap50"] == 0.55
    assert written == report


def test_only_rows_of_other_widths_than_the_baseline_show_a_speedup(run_stored, tmp_path):
    report = build_report([run_stored], tmp_path)
    assert report["speedups"] == [
        {"run": "run_stored", "name": "l1_0.5/finetune", "speedup": 2.0}]
    markdown = (tmp_path / "report.md").read_text()
    assert table_column(markdown, "speed-up") == ["–", "–", "2.00x"]


def test_html_has_no_literal_backticks(report_a):
    out_dir = report_a[1]
    page = (out_dir / "report.html").read_text()
    assert "`" in (out_dir / "report.md").read_text()  # the markdown has code spans ...
    assert "`" not in page and "<code>run_a</code>" in page  # ... the page has <code>


def test_point_labels_do_not_overlap_each_other_or_the_markers():
    figure = new_figure(6, 4)
    axes = figure.add_subplot()
    points = [(1.0 + 0.01 * (index % 4), 0.5 + 0.004 * index) for index in range(16)]
    axes.scatter(*zip(*points, strict=True))
    axes.set_xlim(0, 2)
    axes.set_ylim(0, 1)
    labels = place_labels(figure, axes, points, [f"stage {index}" for index in range(16)], [])
    renderer = figure.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in labels]
    for index, box in enumerate(boxes):
        assert not any(box.overlaps(other) for other in boxes[index + 1:])
        for x, y in axes.transData.transform(points):
            assert not box.contains(x, y)


def test_a_label_is_nearer_to_its_own_point_than_to_a_close_neighbour():
    # The quickstart's case: the baseline (added first) just below the unpruned control.
    figure = new_figure(6, 4)
    axes = figure.add_subplot()
    points = [(0.876, 0.841), (0.876, 0.853)]
    axes.scatter(*zip(*points, strict=True))
    axes.set_xlim(0.4, 0.9)
    axes.set_ylim(0, 1)
    labels = place_labels(figure, axes, points, ["baseline", "control"], [])
    renderer = figure.canvas.get_renderer()
    centres = axes.transData.transform(points)
    for label, own in zip(labels, centres, strict=True):
        box = label.get_window_extent(renderer)
        centre = ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)
        distances = [math.dist(centre, point) for point in centres]
        assert min(distances) == math.dist(centre, own)


def test_study_rows_share_the_report_layout_and_merge_by_run_and_name(tmp_path):
    from ctprune.report import ROW_KEYS, study_row, update_study_report

    baseline = study_row("study", "baseline", "baseline", ap=0.5, ap50=0.8)
    pruned = study_row("study", "l1/prune", "prune", baseline, ap=0.25, ap50=None, gmacs=1.0)
    assert list(baseline) == list(ROW_KEYS) and list(pruned) == list(ROW_KEYS)
    assert baseline["ap_kept"] == 1.0 and baseline["precision"] == "fp32"
    assert pruned["ap_kept"] == 0.5 and pruned["ap50_kept"] is None
    with pytest.raises(ValueError, match="unknown keys \\['mAP'\\]"):
        study_row("study", "x", "prune", mAP=0.3)

    path = tmp_path / "report.json"
    update_study_report(path, [baseline, pruned], "first", {"seed": 0})
    better = study_row("study", "l1/prune", "prune", baseline, ap=0.4)
    update_study_report(path, [better], "second", {"seed": 1})
    report = json.loads(path.read_text())
    assert [row["ap"] for row in report["rows"]] == [0.5, 0.4]
    assert report["setup"] == {"first": {"seed": 0}, "second": {"seed": 1}}


def test_a_stage_kept_aside_by_a_rerun_is_not_reported(run_a, tmp_path):
    # A rerun with other settings keeps the stage's previous results in .<stage>.old until the
    # new ones are complete (ctprune.run): they are not a stage of the run.
    run = shutil.copytree(run_a, tmp_path / "run_a")
    rows = build_report([run], tmp_path / "before", latency=False)["rows"]
    before = [row["name"] for row in rows]
    shutil.copytree(run / "l1_0.5" / "finetune", run / "l1_0.5" / ".finetune.old")
    after = build_report([run], tmp_path / "after", latency=False)
    assert [row["name"] for row in after["rows"]] == before
    assert not any(".old" in entry["stage"] for entry in after["incomplete"])


def test_stages_of_an_earlier_recipe_are_not_reported_as_current(run_a, tmp_path):
    # `ctprune run` with another ratio into the folder of an earlier one: the earlier branch's
    # stages are still there, complete, but not this recipe's.
    report = build_report([run_a], tmp_path, latency=False, stages=["baseline", "l1_0.5/prune"])
    assert [row["name"] for row in report["rows"]] == ["baseline", "l1_0.5/prune"]
    [stale] = [entry for entry in report["incomplete"] if entry["stage"] == "l1_0.5/finetune"]
    assert "earlier recipe" in stale["reason"]
    assert "l1_0.5/finetune" in (tmp_path / "report.md").read_text().split("| run |")[-1]


def test_study_readers_take_a_run_folder_apart(run_a, report_a, tmp_path):
    """training_record reads a training folder's epoch log; run_stage_rows a run's report."""
    _, out_dir = report_a
    record = training_record(run_a / "baseline")
    assert record["epochs"] == 3
    assert [point["epoch"] for point in record["curve"]] == [2, 3]
    assert record["curve"][-1]["ap50"] == pytest.approx(0.6)
    shutil.copy(out_dir / "report.json", tmp_path / "report.json")
    rows = run_stage_rows(tmp_path)
    assert list(rows) == ["baseline", "prune", "finetune"]
    assert rows["prune"]["name"] == "l1_0.5/prune" and rows["prune"]["ap"] == pytest.approx(0.20)
    names = {"baseline": "s0/baseline", "finetune": "s0/finetune"}
    study = chain_rows("arm", names, rows)
    assert [row["name"] for row in study] == ["s0/baseline", "s0/finetune"]
    assert all(tuple(row) == ROW_KEYS for row in study)
    assert study[1]["ap"] == rows["finetune"]["ap"]
    assert study[1]["ap_kept"] == pytest.approx(rows["finetune"]["ap"] / rows["baseline"]["ap"])
    arms = {"ctdet": {0: {"epochs": 15, "finetune_epochs": 4, "rows": rows}}}
    assert [row["name"] for row in seed_chain_rows(arms)] == [
        "seed0/baseline_e15", "seed0/half_macs/prune", "seed0/half_macs/finetune_e4",
    ]
