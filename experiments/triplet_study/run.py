"""The keypoint-triplet head beside the ctdet head on the same trunk: accuracy, false discoveries,
and what half the MACs cost it. A paired study (issue 21).

On the synthetic benchmark with the resunet18 trunk at 128 px, 2 CPU threads, seeds 0, 1, 2:

- the triplet head (recipes/shapes_triplets.yaml) trained for its 15-minute budget, against the
  ctdet head (recipes/shapes_resunet18.yaml) trained 15 epochs (the TTFNet study's runs, reused
  when present): AP, AP50, AP75 and Duan et al.'s false discovery rates (FD = 1 - AP at IoU
  0.05:0.05:0.5, top 100 boxes; `detector.evaluate.false_discovery_rates`) of each;
- each pruned to half the MACs (global L1, recipes/shapes_macs.yaml's settings) and fine-tuned,
  the triplet head 2 epochs (the ctdet head 4, the TTFNet study's chain, reused): the AP50 each
  keeps. Target: the triplet model reaches AP50 >= 0.8 and keeps >= 95 % of it.

Run folders go under --out (default runs/triplet_study/; the ctdet baselines under
--ctdet-out, default runs/ttfnet_study/), not committed; finished runs are reused.

    python experiments/triplet_study/run.py                   # the committed figures
    python experiments/triplet_study/run.py --seeds 0 --triplet-epochs 1 --ctdet-epochs 1 \\
        --out runs/triplet_quick --ctdet-out runs/triplet_quick   # a quick check of the chain
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
from detector.data.sources import load_data_yaml
from detector.evaluate import false_discovery_rates
from detector.layout import EVAL_FOLDER, EVAL_RESULTS_FILE

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DATA = ROOT / "data" / "shapes" / "data.yaml"
RECIPES = {"ctdet": "recipes/shapes_resunet18.yaml", "triplet": "recipes/shapes_triplets.yaml"}
HEADS = {"ctdet": "centernet", "triplet": "triplet"}
PRUNE_RECIPE = "recipes/shapes_macs.yaml"
TARGET_MACS = 0.5
# The triplet head's fine-tune is the 2 epochs; the ctdet head's chain is the TTFNet
# study's (4 epochs), reused: only its baseline is compared here.
FINETUNE_EPOCHS = {"triplet": 2, "ctdet": 4}
# The triplet head's 15 minutes at 2 threads on the idle VM: a training step costs 1.9x the ctdet
# head's (cascade corner pooling, three heatmaps; paired timing in report.md), whose epoch takes
# 37 s there, so 12 epochs. The ctdet head gets its 15 epochs of the TTFNet study (9.3 minutes).
TRIPLET_EPOCHS = 12
EVAL_INTERVAL = {"ctdet": 5, "triplet": 4}


def false_discoveries(stage_folder: Path, annotations: Path) -> dict[str, float]:
    """FD rates of the detections a `ctprune run` stage's evaluation wrote."""
    return false_discovery_rates(annotations, stage_folder / EVAL_FOLDER / EVAL_RESULTS_FILE)


def run_arm(arm: str, epochs: int, seed: int, out: Path, threads: int, annotations: Path) -> dict:
    values = {"train.seed": seed, "train.eval_interval": EVAL_INTERVAL[arm]}
    model = train_once(RECIPES[arm], out / f"{arm}_e{epochs}_seed{seed}", epochs, values,
                       threads, ROOT)
    chain = {
        "model.head": HEADS[arm],
        "baseline.checkpoint": model.resolve(),
        "prune.target_macs": TARGET_MACS,
        "finetune.epochs": FINETUNE_EPOCHS[arm],
        "finetune.seed": seed,
    }
    run = chain_once(PRUNE_RECIPE, out / f"{model.parent.name}_half_ft{FINETUNE_EPOCHS[arm]}",
                     chain, threads, ROOT)
    rows = run_stage_rows(run)
    return {
        "epochs": epochs,
        "finetune_epochs": FINETUNE_EPOCHS[arm],
        "model": model.name,
        "training": training_record(model.parent),
        "rows": rows,
        "false_discovery": {
            stage: false_discoveries(run / rows[stage]["name"], annotations)
            for stage in ("baseline", "finetune")
        },
    }


def summarise(results: dict) -> dict:
    """Per arm: mean and spread over seeds of each metric before and after pruning, and the
    AP50 kept after the fine-tune."""
    summary = {}
    for arm, per_seed in results["arms"].items():
        values: dict[str, list[float]] = {}
        for result in per_seed.values():
            rows, fd = result["rows"], result["false_discovery"]
            for metric in ("ap", "ap50", "ap75"):
                values.setdefault(f"baseline_{metric}", []).append(rows["baseline"][metric])
                values.setdefault(f"finetune_{metric}", []).append(rows["finetune"][metric])
            for metric in ("fd", "fd5", "fd25", "fd50"):
                values.setdefault(f"baseline_{metric}", []).append(fd["baseline"][metric])
                values.setdefault(f"finetune_{metric}", []).append(fd["finetune"][metric])
            values.setdefault("ap50_kept", []).append(
                rows["finetune"]["ap50"] / rows["baseline"]["ap50"]
            )
        summary[arm] = {
            key: {
                "mean": statistics.mean(v),
                "sd": statistics.stdev(v) if len(v) > 1 else None,
                "min": min(v),
                "max": max(v),
            }
            for key, v in values.items()
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--triplet-epochs", type=int, default=TRIPLET_EPOCHS)
    parser.add_argument("--ctdet-epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "triplet_study")
    parser.add_argument("--ctdet-out", type=Path, default=ROOT / "runs" / "ttfnet_study")
    parser.add_argument("--arms", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                        help="train and prune only these heads (the others must be done)")
    parser.add_argument("--no-report", action="store_true", help="do not touch report.json")
    args = parser.parse_args()
    data = load_data_yaml(DATA)
    annotations = DATA.parent / data.val
    started = time.perf_counter()
    results: dict = {"arms": {"triplet": {}, "ctdet": {}}}
    epochs = {"triplet": args.triplet_epochs, "ctdet": args.ctdet_epochs}
    outs = {"triplet": args.out, "ctdet": args.ctdet_out}
    for seed in args.seeds:
        for arm in args.arms:
            results["arms"][arm][seed] = run_arm(
                arm, epochs[arm], seed, outs[arm], args.threads, annotations
            )
            print(arm, seed, results["arms"][arm][seed]["rows"]["baseline"]["ap50"], flush=True)
    if set(args.arms) != set(RECIPES):
        return
    results["summary"] = summarise(results)
    results["setup"] = {
        "recipes": RECIPES,
        "prune_recipe": PRUNE_RECIPE,
        "target_macs": TARGET_MACS,
        "finetune_epochs": FINETUNE_EPOCHS,
        "epochs": epochs,
        "seeds": args.seeds,
        "threads": args.threads,
        "wall_minutes_this_invocation": round((time.perf_counter() - started) / 60, 1),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if not args.no_report:
        rows = seed_chain_rows(results["arms"])
        setup = json.loads(json.dumps(results, default=str))
        update_study_report(HERE / "report.json", rows, "triplet_vs_ctdet", setup)
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
