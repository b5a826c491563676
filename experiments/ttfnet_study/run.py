"""Does the TTFNet head train in a third of the epochs and recover from pruning in half?

Issue 22's target, on the synthetic benchmark with the resunet18 trunk at 128 px, 2 CPU threads:

- the ctdet head (recipes/shapes_resunet18.yaml) trained 15 epochs against the TTFNet head
  (recipes/shapes_ttfnet.yaml, the same settings but `model.head: ttfnet`) trained 5, each with
  the recipe's cosine schedule over its own length: the TTFNet head should match or beat the
  ctdet head on AP and AP50;
- both pruned to half the MACs (global L1, recipes/shapes_macs.yaml's prune and fine-tune
  settings): the TTFNet head fine-tuned for half the ctdet head's fine-tune epochs should reach
  the ctdet head's post-fine-tune AP.

Seeds 0, 1, 2 set each training's initialisation, data order and augmentation; the two heads of a
seed form a pair. Everything runs through the CLI a user runs (`ctprune train`, `ctprune run`),
with the run folders under --out (default runs/ttfnet_study/, not committed); finished runs are
reused, so an interrupted study continues where it stopped.

    python experiments/ttfnet_study/run.py                      # the committed figures
    python experiments/ttfnet_study/run.py --seeds 0 --ctdet-epochs 2 --ttfnet-epochs 1 \\
        --ctdet-finetune 2 --out runs/ttfnet_quick              # a quick check of the chain

The rows (run = the head; per seed the baseline, the pruned start and the fine-tuned model) go
to report.json beside this script; report.md discusses them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ctprune.report import run_stage_rows, seed_chain_rows, training_record, update_study_report
from ctprune.study import chain_once, train_once

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RECIPES = {"ctdet": "recipes/shapes_resunet18.yaml", "ttfnet": "recipes/shapes_ttfnet.yaml"}
HEADS = {"ctdet": "centernet", "ttfnet": "ttfnet"}
PRUNE_RECIPE = "recipes/shapes_macs.yaml"
TARGET_MACS = 0.5
EVAL_INTERVAL = 5


def train_baseline(arm: str, epochs: int, seed: int, out: Path, threads: int) -> Path:
    """The trained model of the arm's baseline run for this seed."""
    values = {"train.seed": seed, "train.eval_interval": min(EVAL_INTERVAL, epochs)}
    run = out / f"{arm}_e{epochs}_seed{seed}"
    return train_once(RECIPES[arm], run, epochs, values, threads, ROOT)


def prune_and_finetune(
    arm: str, model: Path, finetune_epochs: int, seed: int, out: Path, threads: int
) -> Path:
    """The `ctprune run` folder that pruned ``model`` to half its MACs and fine-tuned it."""
    values = {
        "model.head": HEADS[arm],
        "baseline.checkpoint": model.resolve(),
        "prune.target_macs": TARGET_MACS,
        "finetune.epochs": finetune_epochs,
        "finetune.seed": seed,
    }
    run = out / f"{model.parent.name}_half_ft{finetune_epochs}"
    return chain_once(PRUNE_RECIPE, run, values, threads, ROOT)


def summarise(results: dict) -> dict:
    """Per metric and stage: each head's mean and spread over seeds and the paired difference
    (ttfnet - ctdet)."""
    summary = {}
    seeds = sorted(set(results["arms"]["ctdet"]) & set(results["arms"]["ttfnet"]))
    for stage in ("baseline", "prune", "finetune"):
        for metric in ("ap", "ap50"):
            values = {
                arm: [results["arms"][arm][seed]["rows"][stage][metric] for seed in seeds]
                for arm in ("ctdet", "ttfnet")
            }
            differences = [t - c for t, c in zip(values["ttfnet"], values["ctdet"], strict=True)]
            summary[f"{stage}_{metric}"] = {
                arm: {
                    "mean": statistics.mean(v),
                    "sd": statistics.stdev(v) if len(v) > 1 else None,
                    "values": v,
                }
                for arm, v in values.items()
            } | {
                "paired_difference_mean": statistics.mean(differences),
                "paired_difference_range": [min(differences), max(differences)],
            }
    return summary


def markdown_tables(results: dict) -> str:
    """Per seed and head: AP / AP50 of the baseline, right after pruning and after the
    fine-tune, with the training seconds; then the means with their spread (from results.json
    alone)."""
    lines = [
        "| head | seed | epochs | train s | AP | AP50 | pruned AP | fine-tune epochs | "
        "fine-tune s | AP | AP50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, per_seed in results["arms"].items():
        for seed, result in per_seed.items():
            rows = result["rows"]
            lines.append(
                f"| {arm} | {seed} | {result['epochs']} | "
                f"{result['training']['train_seconds']:.0f} | {rows['baseline']['ap']:.4f} | "
                f"{rows['baseline']['ap50']:.4f} | {rows['prune']['ap']:.4f} | "
                f"{result['finetune_epochs']} | "
                f"{result['finetune_training']['train_seconds']:.0f} | "
                f"{rows['finetune']['ap']:.4f} | {rows['finetune']['ap50']:.4f} |"
            )
    lines += ["", "| stage, metric | ctdet mean (sd) | ttfnet mean (sd) | paired diff (range) |",
              "|---|---|---|---|"]
    for key, summary in results["summary"].items():
        ctdet, ttfnet = summary["ctdet"], summary["ttfnet"]
        low, high = summary["paired_difference_range"]

        def spread(values: dict) -> str:
            return "n/a" if values["sd"] is None else f"{values['sd']:.4f}"

        lines.append(
            f"| {key} | {ctdet['mean']:.4f} ({spread(ctdet)}) | {ttfnet['mean']:.4f} "
            f"({spread(ttfnet)}) | {summary['paired_difference_mean']:+.4f} "
            f"[{low:+.4f}, {high:+.4f}] |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ctdet-epochs", type=int, default=15)
    parser.add_argument("--ttfnet-epochs", type=int, default=5)
    parser.add_argument("--ctdet-finetune", type=int, default=4,
                        help="the ctdet head's fine-tune epochs; the TTFNet head gets half")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ttfnet_study")
    parser.add_argument("--no-report", action="store_true", help="do not touch report.json")
    parser.add_argument("--table", action="store_true", help="print results.json's tables")
    args = parser.parse_args()
    if args.table:
        print(markdown_tables(json.loads((args.out / "results.json").read_text())), end="")
        return
    epochs = {"ctdet": args.ctdet_epochs, "ttfnet": args.ttfnet_epochs}
    finetune = {"ctdet": args.ctdet_finetune, "ttfnet": max(1, args.ctdet_finetune // 2)}
    started = time.perf_counter()
    results: dict = {"arms": {"ctdet": {}, "ttfnet": {}}}
    for seed in args.seeds:
        for arm in ("ctdet", "ttfnet"):
            baseline = train_baseline(arm, epochs[arm], seed, args.out, args.threads)
            pruned = prune_and_finetune(
                arm, baseline, finetune[arm], seed, args.out, args.threads
            )
            rows = run_stage_rows(pruned)
            results["arms"][arm][seed] = {
                "epochs": epochs[arm],
                "finetune_epochs": finetune[arm],
                "training": training_record(baseline.parent),
                "model": baseline.name,
                "finetune_training": training_record(pruned / rows["finetune"]["name"]),
                "rows": rows,
            }
            print(arm, seed, {k: results["arms"][arm][seed]["rows"][k]["ap"]
                              for k in ("baseline", "prune", "finetune")}, flush=True)
    results["summary"] = summarise(results)
    results["setup"] = {
        "recipes": RECIPES,
        "prune_recipe": PRUNE_RECIPE,
        "target_macs": TARGET_MACS,
        "epochs": epochs,
        "finetune_epochs": finetune,
        "seeds": args.seeds,
        "threads": args.threads,
        "wall_minutes_this_invocation": round((time.perf_counter() - started) / 60, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", torch {torch.__version__}",
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if not args.no_report:
        rows = seed_chain_rows(results["arms"])
        setup = json.loads(json.dumps(results, default=str))
        update_study_report(HERE / "report.json", rows, "ttfnet_vs_ctdet", setup)
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
