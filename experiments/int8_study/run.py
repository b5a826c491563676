"""What INT8 costs and buys after pruning: AP against fp32, and the deployed speed-up (issue 24).

On the synthetic benchmark at 128 px, seeds 0, 1, 2, two architectures, each unpruned and pruned:

- resunet18: the ctdet baselines of the TTFNet study (15 epochs) and their 4x model from the
  compression study's best pipeline (experiments/compress_study/, --pipeline);
- res18 (recipes/shapes_res18.yaml, its 6 epochs), pruned by the same pipeline here.

Every fp32 model is quantized by the recipe's `quantize` stage (static post-training INT8 through
onnxruntime, QDQ, symmetric per-channel weights, MinMax calibration on 64 training images, reduced
range where the CPU lacks VNNI) and evaluated by the same evaluator on the val split, so the rows
hold AP for fp32 and int8 side by side (`precision`). Speed (--speed, on a quiet machine):
onnxruntime at 512 px on 2 threads, paired and interleaved (`ctprune bench`'s measurement): INT8
against its fp32 twin, unpruned and pruned, and the compound model (the 4x model in INT8) against
the unpruned fp32 model.

Run folders go under --out (default runs/int8_study/; resunet18's chains are the compression
study's, under runs/compress_study/, extended by their quantize stages); finished runs are
reused.

    python experiments/int8_study/run.py --archs res18 --seeds 0 --threads 1   # one part
    python experiments/int8_study/run.py --speed --threads 2                    # quiet machine
    python experiments/int8_study/run.py --report
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
from pathlib import Path

import torch

from ctprune.layout import REPORT_FILES
from ctprune.quantize import FP32_FILE, INT8_FILE, reduce_range_decision
from ctprune.report import chain_rows, update_study_report
from ctprune.study import overrides, run_cli, train_once

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)
RES18_RECIPE = "recipes/shapes_res18.yaml"
RES18_EPOCHS = 6
QUANTIZE = {"quantize.calibration": "minmax"}
SPEED_SIZE = 512


def _compress_study():
    """The compression study's script: its chains (recipe, overrides, folders) are this
    study's resunet18 models."""
    path = ROOT / "experiments" / "compress_study" / "run.py"
    spec = importlib.util.spec_from_file_location("compress_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMPRESS = _compress_study()


def chain_of(arch: str, seed: int, pipeline: str, out: Path, threads: int) -> Path:
    """The `ctprune run` folder holding ``arch``'s baseline and its 4x model of ``pipeline`` (an
    arm of the compression study, "_distill" for its teacher), with their INT8 stages."""
    values = COMPRESS.chain_values(pipeline.removesuffix("_distill"),
                                   pipeline.endswith("_distill"), seed,
                                   COMPRESS.SENSITIVITY_CRITERION)
    run = _chain_folder(arch, seed, pipeline, out)
    if arch == "res18":
        trained = train_once(RES18_RECIPE, out / f"res18_e{RES18_EPOCHS}_seed{seed}",
                             RES18_EPOCHS, {"train.seed": seed}, threads, ROOT)
        values |= {"model.arch": "res18", "baseline.checkpoint": trained.resolve()}
    if not _quantized(run):
        # Earlier stages of a finished chain are reused (their fingerprints do not change).
        args = ["run", COMPRESS.RECIPE, "--out", str(run), *overrides(values | QUANTIZE)]
        run_cli(args, run.parent / f"{run.name}.log", threads, ROOT)
    return run


def _chain_folder(arch: str, seed: int, pipeline: str, out: Path) -> Path:
    distill = pipeline.endswith("_distill")
    if arch == "resunet18":
        return COMPRESS.chain_folder(COMPRESS.DEFAULT_OUT, pipeline.removesuffix("_distill"),
                                     distill, seed)
    return out / f"res18_{pipeline}_seed{seed}"


def _quantized(run: Path) -> bool:
    report = run / REPORT_FILES["json"]
    return report.is_file() and any(
        row["precision"] == "int8" for row in json.loads(report.read_text())["rows"])


def precision_rows(run: Path) -> dict[tuple[str, str], dict]:
    """(stage, precision) -> the report's row: baseline and finetune in fp32, their quantize
    stages in int8 (the baseline's named baseline_int8)."""
    rows = json.loads((run / REPORT_FILES["json"]).read_text())["rows"]
    found = {}
    for row in rows:
        stage = row["stage"]
        if stage == "quantize":
            stage = "baseline" if row["name"].startswith("baseline") else "finetune"
        if stage in ("baseline", "finetune"):
            found[(stage, row["precision"])] = row
    return found


def int8_files(run: Path) -> dict[str, Path]:
    """The INT8 models of a chain: "unpruned" (the baseline's) and "pruned" (the fine-tuned
    branch's); the fp32 ONNX twin lies beside each."""
    [pruned] = run.glob(f"*/int8/{INT8_FILE}")
    return {"unpruned": run / "baseline_int8" / INT8_FILE, "pruned": pruned}


def speed(run: Path, threads: int, rounds: int) -> dict:
    """onnxruntime at 512 px, every model interleaved in the same rounds: each INT8 model
    against its fp32 twin, and the pruned INT8 model (the compound) against the unpruned
    fp32 one."""
    from ctprune.bench import bench_models

    files = int8_files(run)
    onnx = {}
    for kind, path in files.items():
        onnx[f"{kind} int8"] = path
        onnx[f"{kind} fp32"] = path.with_name(FP32_FILE)
    pairs = {"unpruned int8": "unpruned fp32", "pruned int8": "pruned fp32",
             "pruned fp32": "unpruned fp32"}
    rows = bench_models({}, pairs=pairs, onnx_files=onnx, input_size=SPEED_SIZE,
                        threads=threads, runtime="onnxruntime", rounds=rounds, spinning=False,
                        throughput_batch=None, memory=False)
    measured = {row.name: row.as_dict() for row in rows}
    # The compound: pruned INT8 against unpruned fp32, from the same rounds' medians.
    compound = measured["unpruned fp32"]["latency_ms"] / measured["pruned int8"]["latency_ms"]
    return {"rows": measured, "compound_speedup": compound,
            "load_average": os.getloadavg(), "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="*", default=[], choices=("resunet18", "res18"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--pipeline", default="sensitivity_distill",
                        help="the compression study's arm whose 4x model is quantized")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "int8_study")
    parser.add_argument("--speed", action="store_true",
                        help="time the finished chains (onnxruntime, 512 px)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--report", action="store_true", help="write report.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for arch in args.archs:
            chain_of(arch, seed, args.pipeline, args.out, args.threads)
    if not (args.speed or args.report):
        return
    # Speed and rows from the chains already quantized; the others are listed as missing.
    runs = {(arch, seed): run for arch in ("resunet18", "res18") for seed in args.seeds
            if _quantized(run := _chain_folder(arch, seed, args.pipeline, args.out))}
    missing = [f"{arch} seed {seed}" for arch in ("resunet18", "res18") for seed in args.seeds
               if (arch, seed) not in runs]
    speeds_file = args.out / "speed.json"
    speeds = json.loads(speeds_file.read_text()) if speeds_file.is_file() else {}
    if args.speed:
        for (arch, seed), run in runs.items():
            speeds[f"{arch}_seed{seed}"] = speed(run, args.threads, args.rounds)
            print(arch, seed, json.dumps({k: v["speedup"] for k, v in
                                          speeds[f"{arch}_seed{seed}"]["rows"].items()}))
        speeds_file.write_text(json.dumps(speeds, indent=2))
    if args.report:
        report_rows, per_seed = [], {}
        for (arch, seed), run in runs.items():
            found = precision_rows(run)
            for precision in ("fp32", "int8"):
                names = {"baseline": f"seed{seed}/unpruned", "finetune": f"seed{seed}/pruned"}
                stages = {stage: found[stage, precision] for stage in names}
                rows = chain_rows(f"{arch}_{precision}", names, stages)
                for row in rows:
                    row["precision"] = precision
                report_rows += rows
            per_seed.setdefault(arch, {})[seed] = {
                f"{kind}_int8_minus_fp32_points": 100 * (found[stage, "int8"]["ap"]
                                                         - found[stage, "fp32"]["ap"])
                for kind, stage in (("unpruned", "baseline"), ("pruned", "finetune"))
            } | {"compound_minus_unpruned_fp32_points":
                 100 * (found["finetune", "int8"]["ap"] - found["baseline", "fp32"]["ap"])}
        summary = {arch: {key: COMPRESS.summary_of([r[key] for r in seeds.values()])
                          for key in next(iter(seeds.values()))}
                   for arch, seeds in per_seed.items()}
        setup = {"pipeline": args.pipeline, "missing": missing, "quantize": QUANTIZE,
                 "seeds": args.seeds,
                 "res18_epochs": RES18_EPOCHS, "reduce_range": reduce_range_decision("auto")[1],
                 "machine": f"{platform.machine()}, torch {torch.__version__}",
                 "per_seed": per_seed, "summary": summary, "speed": speeds}
        update_study_report(HERE / "report.json", report_rows, "int8", setup)
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
