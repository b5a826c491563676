"""Four times fewer MACs at the least AP lost: which criterion, which allocation, distillation or
not (issue 23).

On the synthetic benchmark with the resunet18 trunk at 128 px, seeds 0, 1, 2 (the ctdet baselines
of the TTFNet study, 15 epochs, reused), every arm prunes the same baseline to 25 % of its MACs
(`prune.target_macs: 0.25`, recipes/shapes_compress.yaml) and fine-tunes it 5 epochs, with and
without the unpruned baseline as teacher:

- uniform_l1: every group the same ratio, L1 norms (the recipes' default);
- global_l1: one L1 ranking over all groups (mean-normalised scores);
- kmeans: every group the same ratio, similar channels merged;
- taylor: every group the same ratio, first-order Taylor importance on calibration batches;
- sensitivity: each group's width from its measured sensitivity (the least predicted loss within
  the MAC budget), channels ranked by --sensitivity-criterion.

The control is the unpruned baseline fine-tuned the same 5 epochs (`prune.ratio: 0`): the AP a
pipeline keeps is measured against it, not against a baseline that is still learning. Two latency
arms beside them: the sensitivity allocation given uniform L1's realised latency as its budget
(onnxruntime, 2 threads, 128 px; fine-tuned without a teacher, against uniform_l1 without one),
and `target_latency: 0.4` pruned twice in separate processes (the realised ratio of each).

Everything runs through the CLI a user runs (`ctprune run`, `ctprune prune`), run folders under
--out (default runs/compress_study/, not committed); finished chains are reused, so an
interrupted study continues where it stopped, and disjoint --arms / --seeds can run in parallel
processes. `--report` gathers whatever is finished into report.json beside this script.

    python experiments/compress_study/run.py --arms uniform_l1 taylor --seeds 0 --threads 1
    python experiments/compress_study/run.py --latency-probe   # uniform L1's latency ratio
    python experiments/compress_study/run.py --report
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from ctprune.layout import MANIFEST_FILE, STAGE_FILE
from ctprune.report import chain_rows, run_stage_rows, update_study_report
from ctprune.study import chain_once, overrides, run_cli
from detector.layout import trained_model

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RECIPE = "recipes/shapes_compress.yaml"
DATA = "data/shapes/data.yaml"
BASELINES = ROOT / "runs" / "ttfnet_study"
BASELINE_EPOCHS = 15
SEEDS = (0, 1, 2)
TARGET_MACS = 0.25
FINETUNE_EPOCHS = 5
# The latency budgets' runtime: what the issue's speed target is measured on (onnxruntime, 2
# threads), at the models' own input size (the latency model times each layer there).
LATENCY = {"prune.runtime": "onnxruntime", "prune.threads": 2}
LATENCY_SIZE = 128
SPEED_SIZE = 512

UNIFORM = {"prune.allocation": "uniform", "prune.scope": "layer"}
ARMS = {
    "uniform_l1": {**UNIFORM, "prune.criterion": "l1"},
    "global_l1": {**UNIFORM, "prune.criterion": "l1", "prune.scope": "global"},
    "kmeans": {**UNIFORM, "prune.criterion": "kmeans"},
    "taylor": {**UNIFORM, "prune.criterion": "taylor"},
    "sensitivity": {"prune.allocation": "sensitivity"},  # criterion: --sensitivity-criterion
}
# The sensitivity allocation's ranking within a group: on seed 0, uniform Taylor and uniform L1
# ended 5 fine-tune epochs level (AP 0.576 and 0.577) and Taylor kept more right after pruning
# (0.006 against 0.000), so Taylor: its ranking is measured on the same batches as the curves.
SENSITIVITY_CRITERION = "taylor"
DEFAULT_OUT = ROOT / "runs" / "compress_study"
CONTROL = "control_unpruned"
LATENCY_ARM = "latency_budget"


def baseline_of(seed: int) -> Path:
    return trained_model(BASELINES / f"ctdet_e{BASELINE_EPOCHS}_seed{seed}").resolve()


def chain_values(arm: str, distill: bool, seed: int, criterion: str) -> dict[str, object]:
    """The `--set` overrides of one chain."""
    values: dict[str, object] = {
        "baseline.checkpoint": baseline_of(seed),
        "finetune.seed": seed,
        "finetune.epochs": FINETUNE_EPOCHS,
    }
    if arm == CONTROL:
        values |= {**UNIFORM, "prune.criterion": "l1", "prune.ratio": 0.0,
                   "prune.target_macs": None}
    elif arm == LATENCY_ARM:
        values |= {"prune.allocation": "sensitivity", "prune.criterion": criterion,
                   "prune.target_macs": None, "prune.target_latency": latency_budget(),
                   **LATENCY}
    else:
        values |= {"prune.target_macs": TARGET_MACS, **ARMS[arm]}
        if arm == "sensitivity":
            values["prune.criterion"] = criterion
    if not distill:
        values["finetune.distill"] = None
    return values


def chain_folder(out: Path, arm: str, distill: bool, seed: int) -> Path:
    folder = out / f"{arm}{'_distill' if distill else ''}_seed{seed}"
    fallback = out / f"{arm}_fp32_seed{seed}"
    if arm == CONTROL and not (folder / "report.json").is_file() and fallback.is_dir():
        # Seed 2's control diverged in bf16 (a NaN loss at epoch 3, step 228, again on resume):
        # its rerun fine-tunes in fp32 (`--control-fp32`), the only setting changed.
        return fallback
    return folder


def prune_record(run: Path) -> dict:
    """What the prune stage recorded: its wall seconds (the analysis: calibration, scoring,
    sensitivity, the allocation) and its parts, the MACs kept and, with a latency budget, the
    realised latency."""
    [stage_file] = run.glob(f"*/prune/{STAGE_FILE}")
    stage = json.loads(stage_file.read_text())
    stats = stage["prune"]
    return {
        "seconds": stats["seconds"],
        "timings": stats.get("timings"),
        "macs_kept": stats["macs_after"] / stats["macs_before"],
        "params_kept": stats["params_after"] / stats["params_before"],
        "latency": stats.get("latency"),
    }


def reuse_pruned_twin(run: Path, twin: Path) -> None:
    """Start a distillation chain from its twin without a teacher: the same baseline and prune
    stages (their settings are equal, so `ctprune run` keeps them), so both fine-tune the same
    pruned model and the sensitivity measurement runs once per arm and seed."""
    if run.exists() or not (twin / "report.json").is_file():
        return
    for stage in [twin / "baseline", *twin.glob("*/prune")]:
        shutil.copytree(stage, run / stage.relative_to(twin))
    shutil.copy2(twin / MANIFEST_FILE, run / MANIFEST_FILE)  # marks the folder as a run


def prune_stage_only(arm: str, seed: int, out: Path, threads: int, criterion: str) -> None:
    """The chain's baseline and prune stages alone (`ctprune run --only`): a latency budget's
    measurements want a quiet machine, its fine-tune does not."""
    run = chain_folder(out, arm, False, seed)
    values = overrides(chain_values(arm, False, seed, criterion))
    for stage in ("baseline", "prune"):
        run_cli(["run", RECIPE, "--out", str(run), *values, "--only", stage],
                out / f"{run.name}.log", threads, ROOT)


def run_chain(arm: str, distill: bool, seed: int, out: Path, threads: int,
              criterion: str) -> None:
    if distill:
        reuse_pruned_twin(chain_folder(out, arm, True, seed), chain_folder(out, arm, False, seed))
    chain_once(RECIPE, chain_folder(out, arm, distill, seed),
               chain_values(arm, distill, seed, criterion), threads, ROOT)


def latency_budget() -> float:
    """Uniform L1's realised latency ratio, measured by --latency-probe."""
    probe = DEFAULT_OUT / "latency_probe.json"
    if not probe.is_file():
        raise SystemExit(f"{probe}: run --latency-probe first (uniform_l1 seed 0 must be done)")
    return json.loads(probe.read_text())["budget"]


def latency_probe(out: Path, threads: int) -> dict:
    """Uniform L1's pruned model (seed 0) against its parent on the latency budgets' runtime,
    interleaved: the ratio the latency arm is given. Run on a quiet machine."""
    from ctprune.pruning.latency import measure_model_ms
    from detector import load_model

    pruned, _ = load_model(next(chain_folder(out, "uniform_l1", False, 0).glob(
        "*/prune/checkpoint.pt")))
    parent, _ = load_model(baseline_of(0))
    measured = measure_model_ms(parent, LATENCY["prune.runtime"], LATENCY["prune.threads"],
                                (LATENCY_SIZE, LATENCY_SIZE), rounds=60,
                                others={"pruned": pruned})
    ratio = measured["pruned"] / measured["model"]
    record = {"parent_ms": measured["model"], "uniform_l1_ms": measured["pruned"],
              "budget": round(ratio, 4), "threads": threads}
    (out / "latency_probe.json").write_text(json.dumps(record, indent=2))
    return record


def latency_04(out: Path, seed: int, criterion: str, repeat: int) -> dict:
    """`ctprune prune --target-latency 0.4` in its own process: the latency it measured (parent
    and pruned model interleaved, the realised ratio, the prediction), from the checkpoint."""
    folder = out / f"latency0.4_seed{seed}_run{repeat}"
    result = folder / "pruned.pt"
    if not result.is_file():
        run_cli(["prune", str(baseline_of(seed)), "--criterion", criterion, "--allocation",
                 "sensitivity", "--target-latency", "0.4", "--runtime",
                 LATENCY["prune.runtime"], "--threads", str(LATENCY["prune.threads"]),
                 "--data", DATA, "--out", str(result), "--overwrite"],
                folder / "prune.log", LATENCY["prune.threads"], ROOT)
    from detector import load_model

    _, checkpoint = load_model(result)
    return checkpoint.meta["prune"]["latency"]


def speed_at_512(run: Path, threads: int) -> dict:
    """The fine-tuned model against the unpruned architecture, onnxruntime at 512 px, paired
    and interleaved (`ctprune bench`'s measurement)."""
    from ctprune.bench import bench_checkpoints

    output = run.parent / f"{run.name}_bench{SPEED_SIZE}.json"
    if not output.is_file():
        checkpoint = next(run.glob("*/finetune/checkpoint.pt"))
        # No spinning threads: sessions timed interleaved on 2 cores (see latency.py).
        rows = bench_checkpoints([checkpoint], input_size=SPEED_SIZE, threads=threads,
                                 runtime="onnxruntime", rounds=30, spinning=False,
                                 throughput_batch=None, memory=False)
        output.write_text(json.dumps([row.as_dict() for row in rows], indent=2))
    return json.loads(output.read_text())


def _json_or_none(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def summary_of(values: list[float]) -> dict:
    return {"mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def gather(out: Path) -> tuple[list[dict], dict]:
    """Rows of every finished chain (run = the arm, name = seed/stage) and per arm the seeds'
    spread of AP right after pruning and after fine-tuning, and of the paired differences with
    uniform L1 and with the control."""
    rows: list[dict] = []
    results: dict = {}
    arms = [*ARMS, CONTROL, LATENCY_ARM]
    for arm in arms:
        for distill in (False, True):
            if distill and arm in (CONTROL, LATENCY_ARM):
                continue
            name = f"{arm}{'_distill' if distill else ''}"
            for seed in SEEDS:
                run = chain_folder(out, arm, distill, seed)
                if not (run / "report.json").is_file():
                    continue
                stages = run_stage_rows(run)
                names = {"baseline": f"seed{seed}/baseline_e{BASELINE_EPOCHS}",
                         "prune": f"seed{seed}/prune",
                         "finetune": f"seed{seed}/finetune_e{FINETUNE_EPOCHS}"}
                rows += chain_rows(name, names, stages)
                results.setdefault(name, {})[seed] = {
                    "baseline_ap": stages["baseline"]["ap"],
                    "prune_ap": stages["prune"]["ap"],
                    "prune_ap50": stages["prune"]["ap50"],
                    "finetune_ap": stages["finetune"]["ap"],
                    "finetune_ap50": stages["finetune"]["ap50"],
                    "gmacs": stages["finetune"]["gmacs"],
                    "params": stages["finetune"]["params"],
                    "prune_stage": prune_record(run),
                }
    summary: dict = {}
    control = results.get(CONTROL, {})
    for name, per_seed in results.items():
        entry = {key: summary_of([r[key] for r in per_seed.values()])
                 for key in ("prune_ap", "finetune_ap", "finetune_ap50", "gmacs")}
        entry["analysis_seconds"] = summary_of(
            [r["prune_stage"]["seconds"] for r in per_seed.values()])
        kept = [r["finetune_ap"] / control[s]["finetune_ap"]
                for s, r in per_seed.items() if s in control]
        if kept:
            entry["ap_kept_vs_control"] = summary_of(kept)
        compared = "uniform_l1_distill" if name.endswith("_distill") else "uniform_l1"
        pairs = results.get(compared, {})
        for stage in ("prune_ap", "finetune_ap"):
            differences = [100 * (r[stage] - pairs[s][stage])
                           for s, r in per_seed.items() if s in pairs]
            if differences and name not in (compared, CONTROL):
                entry[f"{stage}_minus_{compared}_points"] = summary_of(differences)
        summary[name] = entry
    return rows, {"per_seed": results, "summary": summary}


def _spread(entry: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    """"mean (sd x)" of a summary_of entry, scaled."""
    if not entry:
        return ""
    mean = f"{entry['mean'] * scale:.{digits}f}"
    if entry["sd"] is None:
        return f"{mean} (n={entry['n']})"
    return f"{mean} (sd {entry['sd'] * scale:.{digits}f})"


def table(summary: dict) -> str:
    """The report's main table: per arm, the seeds' mean and spread."""
    lines = [
        "| arm | seeds | GMACs | AP after pruning | AP after 5 epochs | AP50 after 5 epochs | "
        "AP kept vs control | prune AP - uniform L1 (points) | fine-tuned AP - uniform L1 "
        "(points) | prune stage (s) |",
        # The differences pair each seed with uniform L1 fine-tuned the same way (with the
        # teacher for a _distill arm, without it otherwise).
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary.items():
        compared = next((key for key in entry if key.startswith("finetune_ap_minus_")), None)
        pruned = next((key for key in entry if key.startswith("prune_ap_minus_")), None)
        lines.append(
            f"| {name} | {entry['finetune_ap']['n']} | {entry['gmacs']['mean']:.3f} "
            f"| {_spread(entry['prune_ap'])} | {_spread(entry['finetune_ap'])} "
            f"| {_spread(entry['finetune_ap50'])} "
            f"| {_spread(entry.get('ap_kept_vs_control'))} "
            f"| {_spread(entry.get(pruned), digits=2)} | {_spread(entry.get(compared), digits=2)} "
            f"| {_spread(entry['analysis_seconds'], digits=0)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arms", nargs="+", default=[],
                        choices=[*ARMS, CONTROL, LATENCY_ARM])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--distill", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--sensitivity-criterion", default=SENSITIVITY_CRITERION)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--latency-probe", action="store_true",
                        help="measure uniform L1's realised latency ratio (seed 0)")
    parser.add_argument("--control-fp32", type=int, nargs="*", default=[], metavar="SEED",
                        help="the control of these seeds fine-tuned in fp32 (bf16 diverged)")
    parser.add_argument("--prune-only", type=int, nargs="*", default=[], metavar="SEED",
                        help="run the latency arm's baseline and prune stages for these seeds")
    parser.add_argument("--latency-04", action="store_true",
                        help="prune seed 0 to target_latency 0.4 twice, in separate processes")
    parser.add_argument("--speed", nargs="*", metavar="CHAIN",
                        help="bench these chain folders' fine-tuned models at 512 px")
    parser.add_argument("--report", action="store_true", help="write report.json")
    parser.add_argument("--table", action="store_true", help="print report.md's table")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    distills = {"no": [False], "yes": [True], "both": [False, True]}[args.distill]
    for seed in args.seeds:
        for arm in args.arms:
            for distill in distills:
                if distill and arm in (CONTROL, LATENCY_ARM):
                    continue
                started = time.perf_counter()
                run_chain(arm, distill, seed, args.out, args.threads,
                          args.sensitivity_criterion)
                print(f"{arm} distill={distill} seed {seed}: "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
    for seed in args.control_fp32:
        chain_once(RECIPE, args.out / f"{CONTROL}_fp32_seed{seed}",
                   chain_values(CONTROL, False, seed, args.sensitivity_criterion)
                   | {"finetune.precision": "fp32"}, args.threads, ROOT)
    for seed in args.prune_only:
        prune_stage_only(LATENCY_ARM, seed, args.out, args.threads, args.sensitivity_criterion)
    if args.latency_probe:
        print(json.dumps(latency_probe(args.out, args.threads), indent=2))
    if args.latency_04:
        for repeat in (1, 2):
            print(json.dumps(latency_04(args.out, 0, args.sensitivity_criterion, repeat),
                             indent=2))
    for name in args.speed or []:
        print(json.dumps(speed_at_512(args.out / name, args.threads), indent=2))
    if args.report:
        rows, results = gather(args.out)
        extras = {
            "latency_probe": _json_or_none(args.out / "latency_probe.json"),
            "latency_0.4": [latency_04(args.out, 0, args.sensitivity_criterion, repeat)
                            for repeat in (1, 2)
                            if (args.out / f"latency0.4_seed0_run{repeat}/pruned.pt").is_file()],
            # Benchmark rows name their checkpoints: relative to the repository here.
            "speed_512": {path.name.removesuffix(f"_bench{SPEED_SIZE}.json"):
                          json.loads(path.read_text().replace(f"{ROOT}/", ""))
                          for path in sorted(args.out.glob(f"*_bench{SPEED_SIZE}.json"))},
        }
        setup = {"recipe": RECIPE, "target_macs": TARGET_MACS, **extras,
                 "finetune_epochs": FINETUNE_EPOCHS, "seeds": list(SEEDS),
                 "sensitivity_criterion": args.sensitivity_criterion,
                 "machine": f"{platform.machine()}, torch {torch.__version__}", **results}
        update_study_report(HERE / "report.json", rows, "compress_4x", setup)
        print(json.dumps(results["summary"], indent=2))
    if args.table:
        print(table(gather(args.out)[1]["summary"]))


if __name__ == "__main__":
    main()
