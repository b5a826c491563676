"""A ResNet-18 CenterNet trained from scratch on the synthetic benchmark, on CPU, timed.

Target (issue 4): COCO AP50 >= 0.80 on the val split within 8 minutes on 2 CPU cores.

    python experiments/shapes_res18/run.py            # resunet18; generates data/shapes if absent
    python experiments/shapes_res18/run.py --recipe recipes/shapes_res18.yaml   # the msra neck
    python experiments/shapes_res18/run.py --set train.epochs=20 --out runs/long

The run folder (--out, default runs/shapes_res18/<recipe name>/) gets <recipe name>.md and
.json too; the run's `baseline` row (final val AP, AP50; run = the recipe's file name) and
its settings and history are merged into report.json beside this script.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ctprune.report import study_row, update_study_report
from detector.data.shapes import generate_shapes
from detector.engine.config import load_train_recipe
from detector.engine.train import train_from_recipe

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent



def report_rows(run: str, results: dict) -> list[dict]:
    """The trained model's row: its final val AP and AP50."""
    return [study_row(run, "baseline", "baseline", ap=results["final_ap"],
                      ap50=results["final_ap50"])]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "shapes_resunet18.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.out is None:
        args.out = ROOT / "runs" / "shapes_res18" / args.recipe.stem

    torch.set_num_threads(args.threads)
    generate_shapes(ROOT / "data" / "shapes")  # a no-op when the frozen set is already there
    recipe = load_train_recipe(args.recipe, args.set)
    started = time.perf_counter()
    result = train_from_recipe(recipe, args.out, device="cpu")
    minutes = (time.perf_counter() - started) / 60
    history = [
        {
            k: v
            for k, v in record.items()
            if k
            in (
                "epoch",
                "train_loss",
                "seconds",
                "data_wait_share",
                "ap",
                "ap50",
                "voc_ap50",
                "loss",
            )
        }
        for record in result.history
    ]
    final = history[-1]
    report = {
        "recipe": str(args.recipe.relative_to(ROOT)),
        "overrides": args.set,
        "wall_minutes": round(minutes, 2),
        "threads": args.threads,
        "machine": (
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}"
        ),
        "final_ap50": final.get("ap50"),
        "final_ap": final.get("ap"),
        "best_ap50": result.best_value,
        "best_epoch": result.best_epoch,
        "history": history,
    }
    (args.out / f"{args.recipe.stem}.json").write_text(json.dumps(report, indent=2))
    rows = report_rows(args.recipe.stem, report)
    update_study_report(HERE / "report.json", rows, args.recipe.stem, report)
    command = ["python experiments/shapes_res18/run.py --recipe", report["recipe"]]
    command += [f"--set {override}" for override in args.set]
    lines = [
        "# ResNet-18 from scratch on the synthetic benchmark (CPU)",
        "",
        f"Command: `{' '.join(command)}`",
        f"Recipe: `{report['recipe']}`; {report['machine']}.",
        "",
        f"**Wall time {minutes:.2f} min** (data loading, training and every evaluation included); "
        f"final COCO AP50 **{final.get('ap50', float('nan')):.3f}**, "
        f"AP {final.get('ap', float('nan')):.3f} on the val split.",
        "",
        "| epoch | train loss | seconds | loader wait | val loss | AP | AP50 | VOC AP50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in history:
        cells = [
            record.get(k)
            for k in ("train_loss", "seconds", "data_wait_share", "loss", "ap", "ap50", "voc_ap50")
        ]
        lines.append(
            f"| {record['epoch']} | "
            + " | ".join("" if c is None else f"{c:.3f}" for c in cells)
            + " |"
        )
    (args.out / f"{args.recipe.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
