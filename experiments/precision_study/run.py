"""Does bf16 autocast keep the accuracy of fp32 training? Paired runs on the synthetic benchmark.

The same recipe (recipes/shapes_res18.yaml: res18 from scratch, channels-last) is trained once
per precision from the same seed, so both runs see the same initial weights and the same batches;
only the arithmetic differs. The loss is always computed in float32 (detector/losses.py). Reported:
the training loss per epoch, the final val COCO AP / AP50, and the wall time of each run.

    python experiments/precision_study/run.py [--set train.epochs=3]

Run folders, results.json and table.md go to --out (default runs/precision_study/). The
rows, one `baseline` row per training precision (runs `train_fp32`, `train_bf16`), are
merged into report.json beside this script; report.md discusses them.
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
PRECISIONS = ("fp32", "bf16")



def report_rows(results: dict) -> list[dict]:
    """One baseline row per trained precision: the final val AP and AP50."""
    return [
        study_row(f"train_{precision}", "baseline", "baseline", ap=run["ap"], ap50=run["ap50"])
        for precision, run in results["runs"].items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "shapes_res18.yaml")
    parser.add_argument("--set", action="append", default=["train.epochs=3"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "precision_study")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generate_shapes(ROOT / "data" / "shapes")  # a no-op when the frozen set is already there

    runs = {}
    for precision in PRECISIONS:
        recipe = load_train_recipe(args.recipe, [*args.set, f"train.precision={precision}",
                                                 "train.eval_interval=1000"])
        started = time.perf_counter()
        result = train_from_recipe(recipe, args.out / precision, device="cpu")
        runs[precision] = {"seconds": time.perf_counter() - started,
                           "train_loss": [record["train_loss"] for record in result.history],
                           **{k: result.history[-1].get(k) for k in ("ap", "ap50", "loss")}}
        print(precision, runs[precision], flush=True)

    report = {
        "recipe": str(args.recipe.relative_to(ROOT)),
        "overrides": args.set,
        "machine": (
            f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        ),
        "runs": runs,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    update_study_report(HERE / "report.json", report_rows(report), "training", report)
    epochs = len(runs["fp32"]["train_loss"])
    lines = ["| precision | " + " | ".join(f"train loss e{i + 1}" for i in range(epochs))
             + " | val loss | val AP | val AP50 | wall s |",
             "|---|" + "---|" * (epochs + 4)]
    for precision, run in runs.items():
        lines.append(
            f"| {precision} | "
            + " | ".join(f"{v:.3f}" for v in run["train_loss"])
            + f" | {run['loss']:.3f} | {run['ap']:.3f} | {run['ap50']:.3f} | {run['seconds']:.0f} |"
        )
    print("\n".join(lines))
    (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
