"""Does distillation from the unpruned model help a pruned one recover? A paired study.

A ResNet-18 baseline on the synthetic benchmark (recipes/quickstart.yaml's resunet18: 5 epochs
at 128 px) is pruned globally by 0.5 (L1, at most 0.8 per layer, BN recalibrated on 20
batches), then fine-tuned for the same epochs with and without distillation (the baseline as
teacher, `ctprune.distill` defaults), once per seed. The seed sets the fine-tune's data order and
augmentation; both arms of a seed start from the same pruned weights, so their difference is
paired.

    python experiments/distill_study/run.py --epochs 1 --full-val      # the committed figures
    python experiments/distill_study/run.py --train-images 64 --epochs 1 --seeds 0 --out runs/t

Run folders go under --out (default runs/distill_study/), the results (results.json) under
--report (default runs/distill_study/report/); neither is committed. The rows (run = the
baseline's architecture: `baseline` = the teacher, the pruned start, `plain_seedN/finetune`,
`distill_seedN/finetune`; an ablation's `distill_heatmapW_seedN/finetune`) and the results are
merged into report.json beside this script; report.md discusses them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ctprune import DistillConfig, prune, recalibrate_bn
from ctprune.layout import CHECKPOINT_FILE, HISTORY_FILE
from ctprune.report import study_row, update_study_report
from ctprune.train import train
from detector import load_model, save_checkpoint
from detector.config import to_dict
from detector.data.dataset import CenterNetDataset, collate
from detector.data.sources import load_data_yaml, load_source
from detector.data.transforms import AugmentConfig
from detector.engine.config import TrainConfig, TrainRecipe
from detector.evaluate.config import EvaluateConfig
from detector.evaluate.run import evaluate_model
from detector.layout import LAST_CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BASELINE = ROOT / "runs" / "quickstart" / "baseline" / CHECKPOINT_FILE
DATA = ROOT / "data" / "shapes" / "data.yaml"
PRUNE = {"ratio": 0.5, "criterion": "l1", "scope": "global", "max_layer_ratio": 0.8}
RECALIBRATE_BATCHES = 20
PRUNED = f"{PRUNE['criterion']}_{PRUNE['scope']}{PRUNE['ratio']}"



def report_rows(run: str, results: dict, suffix: str = "") -> list[dict]:
    """The teacher (the run's baseline), the pruned start, and per seed the plain and the
    distilled fine-tune. An ablation (``suffix``) reuses the plain arm: its distilled
    fine-tunes only."""
    teacher = results["references"]["teacher"]
    rows = []
    if not suffix:
        start = results["references"]["pruned_before_finetune"]
        rows.append(study_row(run, "baseline", "baseline", ap=teacher["ap"],
                              ap50=teacher["ap50"]))
        rows.append(study_row(run, f"{PRUNED}/prune", "prune", teacher, ap=start["ap"],
                              ap50=start["ap50"]))
    for row in results["rows"]:
        for arm in ("distill",) if suffix else ("plain", "distill"):
            rows.append(study_row(run, f"{arm}{suffix}_seed{row['seed']}/finetune", "finetune",
                                  teacher, ap=row[arm]["ap"], ap50=row[arm]["ap50"]))
    return rows


def finetune_config(epochs: int, seed: int) -> TrainConfig:
    """recipes/shapes_global.yaml's fine-tune, evaluated once at the end."""
    return TrainConfig(
        epochs=epochs,
        batch_size=8,
        lr=2.0e-3,
        schedule="cosine",
        precision="bf16",
        channels_last=True,
        workers=1,
        eval_interval=epochs,
        seed=seed,
        log_interval=10,
        augment=AugmentConfig(random_crop=False, scale=0.0, shift=0.0, color=False),
    )


def subset_data(out: Path, train_images: int | None, val_images: int | None):
    """The benchmark's data config, its splits cut to their first images when asked."""
    data = load_data_yaml(DATA)
    changes = {}
    for split, count in (("train", train_images), ("val", val_images)):
        if count is None:
            continue
        annotations = json.loads((DATA.parent / getattr(data, split)).read_text())
        kept = annotations["images"][:count]
        ids = {image["id"] for image in kept}
        annotations.update(
            images=kept, annotations=[a for a in annotations["annotations"] if a["image_id"] in ids]
        )
        path = out / f"{split}_{count}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(annotations))
        changes[split] = str(path)
    return data.__class__(**{**to_dict(data), **changes})


def pruned_model(out: Path, data) -> Path:
    path = out / "pruned" / CHECKPOINT_FILE
    if path.is_file():
        return path
    model, checkpoint = load_model(BASELINE)
    size = tuple(checkpoint.model_config.input.input_size)
    result = prune(
        model,
        PRUNE["ratio"],
        PRUNE["criterion"],
        scope=PRUNE["scope"],
        max_layer_ratio=PRUNE["max_layer_ratio"],
        example_inputs=torch.zeros(1, 3, *size),
        inplace=True,
    )
    source = load_source(data, "train")
    dataset = CenterNetDataset(
        source.records,
        checkpoint.model_config.num_classes,
        checkpoint.model_config.input,
        train=True,
        augment=finetune_config(1, 0).augment,
        seed=0,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=8,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    recalibrate_bn(result.model, loader, RECALIBRATE_BATCHES)
    save_checkpoint(
        path, result.model, checkpoint.model_config, meta={"pruned_from": str(BASELINE)}
    )
    return path


def scores(checkpoint: Path, data, prefix: str = "") -> dict:
    """COCO AP and AP50 of a checkpoint on ``data``'s val split."""
    model, loaded = load_model(checkpoint)
    config = EvaluateConfig(batch_size=32, workers=0, pr_curves=False)
    metrics = evaluate_model(model, load_source(data, "val"), loaded.model_config, config, "cpu")
    return {f"{prefix}ap": metrics["ap"], f"{prefix}ap50": metrics["ap50"]}


def final_metrics(run: Path) -> dict:
    records = [json.loads(line) for line in (run / HISTORY_FILE).read_text().splitlines()]
    final = [r for r in records if r["kind"] == "epoch"][-1]
    keys = ("ap", "ap50", "train_loss", "seconds")
    return {key: final[key] for key in keys if key in final}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--train-images", type=int, default=None, help="first N train images (default: all)"
    )
    parser.add_argument(
        "--val-images", type=int, default=None, help="first N val images (default: all)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "distill_study")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", type=Path, default=ROOT / "runs" / "distill_study" / "report")
    parser.add_argument("--table", action="store_true", help="print results.json's tables and exit")
    parser.add_argument(
        "--heatmap-weight", type=float, default=None, help="ablation: distill.heatmap_weight"
    )
    parser.add_argument(
        "--full-val", action="store_true", help="also score every model on the whole val split"
    )
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads((args.report / "results.json").read_text())), end="")
        return
    torch.set_num_threads(args.threads)
    data = subset_data(args.out, args.train_images, args.val_images)
    pruned = pruned_model(args.out, data)
    _, checkpoint = load_model(pruned)
    distill = DistillConfig()
    distill_folder = "distill"
    if args.heatmap_weight is not None:  # an ablation arm, in folders of its own
        distill = DistillConfig(heatmap_weight=args.heatmap_weight)
        distill_folder = f"distill_heatmap{args.heatmap_weight:g}"
    rows = []
    started = time.perf_counter()
    for seed in args.seeds:
        row = {"seed": seed}
        for arm in ("plain", "distill"):
            run = args.out / f"seed{seed}_{arm if arm == 'plain' else distill_folder}"
            if not (run / HISTORY_FILE).is_file() or "ap" not in final_metrics(run):
                recipe = TrainRecipe(
                    name=run.name,
                    model=checkpoint.model_config,
                    data=data,
                    train=finetune_config(args.epochs, seed),
                    evaluate=EvaluateConfig(batch_size=32, workers=0, pr_curves=False),
                )
                model, _ = load_model(pruned)
                train(
                    recipe,
                    run,
                    device="cpu",
                    initial_model=model,
                    distill=distill if arm == "distill" else None,
                    teacher_paths=[BASELINE] if arm == "distill" else None,
                )
            row[arm] = final_metrics(run)
            if args.full_val:
                row[arm].update(scores(run / LAST_CHECKPOINT, load_data_yaml(DATA), "full_val_"))
            print(seed, arm, row[arm], flush=True)
        rows.append(row)
    _, pruned_checkpoint = load_model(pruned)
    report = summarise(rows)
    references = {"teacher": scores(BASELINE, data), "pruned_before_finetune": scores(pruned, data)}
    if args.full_val:
        for name, path in (("teacher", BASELINE), ("pruned_before_finetune", pruned)):
            references[name].update(scores(path, load_data_yaml(DATA), "full_val_"))
    report["references"] = references
    report.update(
        {
            "baseline": str(BASELINE.relative_to(ROOT)),
            "prune": PRUNE,
            "recalibrate_batches": RECALIBRATE_BATCHES,
            "finetune": to_dict(finetune_config(args.epochs, 0)) | {"seed": "per row"},
            "distill": to_dict(distill),
            "train_images": args.train_images or "all",
            "val_images": args.val_images or "all",
            "wall_minutes_this_invocation": round((time.perf_counter() - started) / 60, 1),
            "machine": f"{platform.machine()}, {args.threads} threads (shared), "
            f"torch {torch.__version__}",
            "pruned_meta": {k: v for k, v in pruned_checkpoint.meta.items() if k != "pruned_from"},
        }
    )
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "results.json").write_text(json.dumps(report, indent=2, default=str))
    run = pruned_checkpoint.model_config.arch
    suffix = "" if args.heatmap_weight is None else f"_heatmap{args.heatmap_weight:g}"
    setup = json.loads(json.dumps(report, default=str))
    update_study_report(HERE / "report.json", report_rows(run, report, suffix), run + suffix, setup)
    print(json.dumps(report["summary"], indent=2))


def markdown_table(report: dict) -> str:
    """The per-seed table and the paired summary, as markdown (from results.json alone)."""
    lines = [
        "| seed | AP plain | AP distill | AP diff | AP50 plain | AP50 distill | AP50 diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        plain, distill = row["plain"], row["distill"]
        lines.append(
            f"| {row['seed']} | {plain['ap']:.4f} | {distill['ap']:.4f} | "
            f"{distill['ap'] - plain['ap']:+.4f} | {plain['ap50']:.4f} | {distill['ap50']:.4f} | "
            f"{distill['ap50'] - plain['ap50']:+.4f} |"
        )
    lines += [
        "",
        "| metric | plain mean | distill mean | mean paired diff | sd of diffs | range |",
        "|---|---|---|---|---|---|",
    ]
    for metric, summary in report["summary"].items():
        spread = summary["std_difference"]
        lines.append(
            f"| {metric} | {summary['plain_mean']:.4f} | {summary['distill_mean']:.4f} | "
            f"{summary['mean_difference']:+.4f} | "
            f"{'n/a' if spread is None else f'{spread:.4f}'} | "
            f"[{summary['min_difference']:+.4f}, {summary['max_difference']:+.4f}] |"
        )
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict]) -> dict:
    """Per-seed rows and, per metric, the mean paired difference (distill - plain), its sample
    standard deviation across seeds and the range of the differences."""
    summary = {}
    metrics = [key for key in rows[0]["plain"] if "ap" in key]
    for metric in metrics:
        differences = [row["distill"][metric] - row["plain"][metric] for row in rows]
        summary[metric] = {
            "plain_mean": statistics.mean(row["plain"][metric] for row in rows),
            "distill_mean": statistics.mean(row["distill"][metric] for row in rows),
            "differences": differences,
            "mean_difference": statistics.mean(differences),
            "std_difference": statistics.stdev(differences) if len(differences) > 1 else None,
            "min_difference": min(differences),
            "max_difference": max(differences),
        }
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
