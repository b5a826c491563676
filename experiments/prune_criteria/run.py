"""Pruning criteria compared where they mean something: on a res18 trained on the synthetic
benchmark.

Weight-dependent criteria (l1, l2, bn_gamma, kmeans, and the global scope, which ranks groups
against each other) can only be told apart on trained weights. This study prunes one trained
checkpoint with every criterion, at layer and global scope, recalibrates BatchNorm (as the
recipes do before fine-tuning), and measures val COCO AP50/AP straight after pruning and after
the same short fine-tune for every variant. `random` is the baseline every criterion must beat.

    python experiments/prune_criteria/run.py CHECKPOINT [--ratio 0.5] [--finetune-epochs 1]

The checkpoint must be trained on data/shapes (e.g. experiments/shapes_res18/run.py). Writes
<name>.json and <name>_table.md into --out (default runs/prune_criteria/; --name, default
"results") and merges the rows (baseline; per scope and criterion a prune and a fine-tune row;
the control) into report.json beside this script; report.md discusses them. Without
--finetune-epochs 0 the first row is the control: the unpruned baseline given the same
fine-tune.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ctprune import prune, recalibrate_bn
from ctprune.report import study_row, update_study_report
from detector import count_macs, load_model
from detector.data.dataset import CenterNetDataset, collate
from detector.data.shapes import generate_shapes
from detector.data.sources import load_data_yaml, load_source
from detector.data.transforms import AugmentConfig
from detector.engine.config import TrainConfig
from detector.engine.fit import fit
from detector.engine.train import train_loader
from detector.evaluate.config import EvaluateConfig
from detector.evaluate.run import evaluate_model

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CRITERIA = ("random", "l1", "l2", "bn_gamma", "kmeans")
SCOPES = ("layer", "global")
RECALIBRATION_BATCHES = 20
RUN = "prune_criteria"



def report_rows(results: dict) -> list[dict]:
    """The baseline's row, and per pruned variant a row after pruning (BN recalibrated) and
    one after the fine-tune; the control is the unpruned model's fine-tune."""
    baseline = results["baseline"]
    rows = [study_row(RUN, "baseline", "baseline", gmacs=baseline["gmacs"], ap=baseline["ap"],
                      ap50=baseline["ap50"])]
    for row in results["rows"]:
        size = {"params": row["params"], "gmacs": row["gmacs"]}
        if row["criterion"].startswith("unpruned"):
            branch = "control_unpruned"
        else:
            if results["ratio"] is None:
                target = f"macs{results['target_macs']}"
            else:
                target = f"r{results['ratio']}"
            branch = f"{row['scope']}_{row['criterion']}_{target}"
            rows.append(study_row(RUN, f"{branch}/prune", "prune", baseline, **size,
                                  ap=row["pruned_ap"], ap50=row["pruned_ap50"]))
        if results["finetune_epochs"] > 0:
            rows.append(study_row(RUN, f"{branch}/finetune", "finetune", baseline, **size,
                                  ap=row["finetuned_ap"], ap50=row["finetuned_ap50"]))
    return rows


def finetune_config(epochs: int) -> TrainConfig:
    """The same short fine-tune for every variant: Adam, cosine, flips only."""
    return TrainConfig(
        epochs=epochs, batch_size=8, lr=1e-3, schedule="cosine", warmup_epochs=0.1,
        precision="bf16", channels_last=True, workers=1, eval_interval=0,
        augment=AugmentConfig(random_crop=False, scale=0.0, shift=0.0, color=False),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "shapes")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "prune_criteria")
    parser.add_argument(
        "--ratio", type=float, default=None, help="channels removed (instead of --target-macs)"
    )
    parser.add_argument(
        "--target-macs",
        type=float,
        default=0.5,
        help="fraction of MACs kept (default 0.5), so both scopes compare at the same cost",
    )
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--criteria", nargs="*", default=list(CRITERIA), help="criteria to compare (default: all)"
    )
    parser.add_argument(
        "--scopes", nargs="*", default=list(SCOPES), help="scopes to compare (default: both)"
    )
    parser.add_argument("--name", default="results", help="base name of the result files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generate_shapes(args.data)  # a no-op when the frozen set is already there
    data = load_data_yaml(args.data / "data.yaml")
    train_source, val_source = load_source(data, "train"), load_source(data, "val")
    base, checkpoint = load_model(args.checkpoint)
    model_config = checkpoint.model_config
    evaluate_config = EvaluateConfig(batch_size=32, workers=0, pr_curves=False)
    config = finetune_config(max(args.finetune_epochs, 1))
    train_set = CenterNetDataset(train_source.records, model_config.num_classes, model_config.input,
                                 train=True, augment=config.augment, seed=config.seed)
    recalibration_loader = DataLoader(train_set, batch_size=32, shuffle=True, collate_fn=collate,
                                      generator=torch.Generator().manual_seed(0))
    example = torch.zeros(1, 3, *model_config.input.input_size)

    def metrics(model) -> dict:
        result = evaluate_model(
            model, val_source, model_config, evaluate_config, write_reports=False
        )
        return {"ap": result["ap"], "ap50": result["ap50"]}

    baseline = {
        "gmacs": count_macs(base, tuple(model_config.input.input_size)) / 1e9,
        **metrics(base),
    }
    print("baseline", baseline, flush=True)
    rows = []
    if args.finetune_epochs > 0:
        # The control: the unpruned baseline given the same fine-tune. A short run from a
        # checkpoint whose lr had not yet decayed can gain on its own; pruned rows are read
        # against this row, not only against the baseline.
        model = load_model(args.checkpoint)[0]
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out_dir:
            fit(model, model_config, config, train_loader(train_set, config), out_dir)
        row = {"scope": "-", "criterion": "unpruned, fine-tuned", "ratio": 0.0, "prune_s": 0.0,
               "gmacs": baseline["gmacs"], "params": sum(p.numel() for p in model.parameters()),
               "pruned_ap": baseline["ap"], "pruned_ap50": baseline["ap50"],
               "finetune_s": time.perf_counter() - started}
        row.update({f"finetuned_{k}": v for k, v in metrics(model).items()})
        print(row, flush=True)
        rows.append(row)
    for scope in args.scopes:
        for criterion in args.criteria:
            torch.manual_seed(0)  # `random` draws from torch's generator
            target = None if args.ratio is not None else args.target_macs
            pruned = prune(
                base, args.ratio, criterion, scope=scope, example_inputs=example, target_macs=target
            )
            model = recalibrate_bn(pruned.model, recalibration_loader, RECALIBRATION_BATCHES)
            row = {
                "scope": scope,
                "criterion": criterion,
                "ratio": pruned.stats.ratio,
                "prune_s": pruned.stats.seconds,
                "gmacs": pruned.stats.macs_after / 1e9,
                "params": pruned.stats.params_after,
            }
            row.update({f"pruned_{k}": v for k, v in metrics(model).items()})
            started = time.perf_counter()
            if args.finetune_epochs > 0:
                with tempfile.TemporaryDirectory() as out_dir:
                    fit(model, model_config, config, train_loader(train_set, config), out_dir)
                row.update({f"finetuned_{k}": v for k, v in metrics(model).items()})
            else:
                row.update({"finetuned_ap": row["pruned_ap"], "finetuned_ap50": row["pruned_ap50"]})
            row["finetune_s"] = time.perf_counter() - started
            print(row, flush=True)
            rows.append(row)

    report = {
        "checkpoint": args.checkpoint.name,  # a file name: no machine paths in the report
        "ratio": args.ratio,
        "target_macs": args.target_macs,
        "finetune_epochs": args.finetune_epochs,
        "machine": (
            f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        ),
        "val_annotations_sha256": json.loads((args.data / "shapes.json").read_text())["summary"][
            "val"
        ]["annotations_sha256"],
        "baseline": baseline,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    update_study_report(HERE / "report.json", report_rows(report), args.name, report)
    lines = [
        "| scope | criterion | ratio | GMACs | AP50 pruned | AP50 fine-tuned | AP fine-tuned "
        "| prune s | fine-tune s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| – | unpruned | 0 | {baseline['gmacs']:.3f} | {baseline['ap50']:.3f} | "
        f"| {baseline['ap']:.3f} | | |",
    ]
    for row in rows:
        lines.append(
            f"| {row['scope']} | {row['criterion']} | {row['ratio']:.3f} | {row['gmacs']:.3f} "
            f"| {row['pruned_ap50']:.3f} | {row['finetuned_ap50']:.3f} | {row['finetuned_ap']:.3f} "
            f"| {row['prune_s']:.1f} | {row['finetune_s']:.0f} |"
        )
    print("\n".join(lines))
    (args.out / f"{args.name}_table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
