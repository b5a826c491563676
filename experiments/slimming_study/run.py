"""Network slimming on the synthetic benchmark: how sparse do the BatchNorm scales get, and
what does it cost in AP50?

A small ResNet-18 CenterNet (stem 32, stages 32/64/128/256, neck 64/64/64, head_conv 32, 128 px)
is trained from scratch on data/shapes once densely and once per sparsity setting, with the
same seed, data order and schedule. For each run the study reports the BatchNorm-gamma
statistics before and after training (share of |gamma| < 1e-2, quantiles), COCO AP50 / AP on
the val split, and two masking proxies for pruning (gamma = beta = 0, evaluated before and
after `recalibrate_bn`): every channel with |gamma| < 1e-2, and a fixed share of the channels
pruning removes exactly (each basic block's bn1, the neck BNs) ranked by |gamma|.

    python experiments/slimming_study/run.py                           # train and measure
    python experiments/slimming_study/run.py --reuse --prune-share 0   # re-measure the dead proxy
    python experiments/slimming_study/run.py --epochs 1 --no-evaluate --out runs/pilot

Run folders, results.json and the tables (report.md) go to --out (default
runs/slimming_study/); the rows (per arm its trained model and the masking proxies) are merged
into report.json beside this script, and experiments/slimming_study/report.md quotes the
tables with the analysis.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import re
import resource
import sys
import time
from pathlib import Path

import torch

from ctprune import SparsityConfig, bn_gamma_statistics, recalibrate_bn, sparsity_callbacks
from ctprune.pruning.slimming import lr_sum, scheduled_lr
from ctprune.report import study_row, update_study_report
from detector import build_model, load_model
from detector.config import ModelConfig, input_preset
from detector.data.dataset import CenterNetDataset
from detector.data.shapes import generate_shapes
from detector.data.sources import load_data_yaml, load_source
from detector.engine.config import TrainConfig
from detector.engine.fit import fit
from detector.engine.train import train_loader
from detector.evaluate.config import EvaluateConfig
from detector.evaluate.run import evaluate_model
from detector.layout import LAST_CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WIDTHS = {"stem": 32, "stages": [32, 64, 128, 256], "neck": [64, 64, 64]}
HEAD_CONV = 32
INPUT_SIZE = (128, 128)
THRESHOLD = 1e-2



def report_rows(results: list[dict]) -> list[dict]:
    """Per arm (one run each): the trained model as its baseline, and the masking proxies as
    prune rows (AP50 only; parameters and MACs unchanged by masking), before and after BN
    recalibration."""
    rows = []
    for result in results:
        baseline = {"ap": result.get("ap"), "ap50": result.get("ap50")}
        rows.append(study_row(result["arm"], "baseline", "baseline", **baseline))
        proxies = [("mask_dead", "dead_masked_ap50", "dead_masked_recalibrated_ap50")]
        if "prune_share" in result:
            proxies.append((f"mask_share{result['prune_share']:g}", "masked_ap50",
                            "masked_recalibrated_ap50"))
        for name, masked, recalibrated in proxies:
            if result.get(masked) is None:
                continue
            for suffix, key in (("prune", masked), ("recalibrated", recalibrated)):
                rows.append(study_row(result["arm"], f"{name}/{suffix}", "prune", baseline,
                                      ap50=result[key]))
    return rows
# BatchNorms whose channels pruning removes exactly (no residual add after them): inside each
# basic block, and in the deconv neck.
EXACTLY_PRUNABLE = re.compile(r"backbone\.layer\d\.\d+\.bn1|neck\.\d+")


def cpu_minutes() -> float:
    """CPU time of this process and its finished children (data-loading workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime) / 60


def mask_smallest_gammas(model: torch.nn.Module, share: float) -> int:
    """Zero gamma and beta of the ``share`` of exactly-prunable channels with the smallest
    |gamma| (one global ranking): each such channel then outputs 0, as if removed. Returns
    how many were masked (more than asked when several gammas tie at the cut-off)."""
    norms = [
        module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d) and EXACTLY_PRUNABLE.fullmatch(name)
    ]
    magnitudes = torch.cat([norm.weight.detach().abs() for norm in norms])
    count = int(share * magnitudes.numel())
    if count == 0:
        return 0
    cutoff = magnitudes.sort().values[count - 1]
    masked = 0
    with torch.no_grad():
        for norm in norms:
            chosen = norm.weight.abs() <= cutoff
            norm.weight[chosen] = 0.0
            norm.bias[chosen] = 0.0
            masked += int(chosen.sum())
    return masked


def train_config(args: argparse.Namespace, optimizer: str) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=optimizer,
        lr=args.sgd_lr if optimizer == "sgd" else args.lr,
        warmup_epochs=0.3,
        # A constant lr with one drop for the last quarter: about twice the lr sum of a cosine
        # decay, and the lr sum is what bounds how far the penalty can move a gamma.
        schedule="multistep",
        lr_steps=[0.75 * args.epochs],
        gamma=0.1,
        precision="bf16",
        channels_last=True,
        workers=args.workers,
        eval_interval=0,
        log_interval=10_000,
    )


def mask_dead_channels(model: torch.nn.Module, threshold: float) -> int:
    """Zero gamma and beta of every BatchNorm channel with |gamma| < ``threshold``, in every
    affine BatchNorm: what removing the channels slimming drove to zero would do (for a
    BatchNorm that feeds a residual add, its branch's share of the sum). Returns the count."""
    masked = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and module.weight is not None:
                chosen = module.weight.abs() < threshold
                module.weight[chosen] = 0.0
                module.bias[chosen] = 0.0
                masked += int(chosen.sum())
    return masked


def masked_ap50(model, mask, loader, args, model_config, val_source) -> tuple[int, float, float]:
    """Channels masked by ``mask(copy)``, and AP50 of the masked copy before and after
    `recalibrate_bn` (NaN when nothing was masked)."""
    evaluate_config = EvaluateConfig(workers=0, batch_size=32, pr_curves=False)
    masked_model = copy.deepcopy(model)
    count = mask(masked_model)
    if count == 0:
        return 0, float("nan"), float("nan")
    before = evaluate_model(masked_model, val_source, model_config, evaluate_config)["ap50"]
    recalibrate_bn(masked_model, loader, batches=args.recalibration_batches)
    after = evaluate_model(masked_model, val_source, model_config, evaluate_config)["ap50"]
    return count, before, after


def run_arm(name, optimizer, sparsity, args, model_config, train_source, val_source,
            previous: dict | None) -> dict:
    """Train one run (or, with ``previous``, take its weights and figures from --out) and
    measure it."""
    config = train_config(args, optimizer)
    torch.manual_seed(config.seed)
    model = build_model(model_config.arch, model_config.num_classes,
                        head_conv=model_config.head_conv, widths=model_config.widths)
    dataset = CenterNetDataset(train_source.records, model_config.num_classes, model_config.input,
                               train=True, augment=config.augment, max_objects=config.max_objects,
                               seed=config.seed)
    loader = train_loader(dataset, config)
    if previous is not None:
        model, _ = load_model(Path(args.out) / name / LAST_CHECKPOINT)
        model = model.to(memory_format=torch.channels_last)
        result = dict(previous)
    else:
        result = train_arm(name, model, optimizer, sparsity, config, loader, args, model_config)
        if args.evaluate:
            evaluate_config = EvaluateConfig(workers=0, batch_size=32, pr_curves=False)
            metrics = evaluate_model(model.eval(), val_source, model_config, evaluate_config)
            result.update(ap50=metrics["ap50"], ap=metrics["ap"])
    model.eval()  # channels-last, as fit leaves it: faster fp32 inference on CPU
    if args.evaluate and args.prune_share > 0:
        count, before, after = masked_ap50(
            model, lambda m: mask_smallest_gammas(m, args.prune_share), loader, args,
            model_config, val_source)
        result.update(prune_share=args.prune_share, masked_channels=count, masked_ap50=before,
                      masked_recalibrated_ap50=after)
    if args.evaluate:
        count, before, after = masked_ap50(
            model, lambda m: mask_dead_channels(m, THRESHOLD), loader, args, model_config,
            val_source)
        result.update(dead_channels=count, dead_masked_ap50=before,
                      dead_masked_recalibrated_ap50=after)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("gamma")}), flush=True)
    return result


def train_arm(name, model, optimizer, sparsity, config, loader, args, model_config) -> dict:
    before = bn_gamma_statistics(model, THRESHOLD)
    steps = config.epochs * len(loader)
    after_backward = after_step = None
    if sparsity is not None:
        lr_getter = scheduled_lr(config, len(loader))
        after_backward, after_step = sparsity_callbacks(model, sparsity, lr_getter)
    started = time.perf_counter()
    fit(model, model_config, config, loader, Path(args.out) / name,
        after_backward=after_backward, after_step=after_step, device="cpu")
    return {
        "arm": name,
        "optimizer": optimizer,
        "lr": config.lr,
        "scaled_lr": config.scaled_lr(),
        "sparsity": None if sparsity is None else dataclasses.asdict(sparsity),
        "steps": steps,
        "lr_sum": lr_sum(config, len(loader)),
        "train_minutes": (time.perf_counter() - started) / 60,
        "gamma_before": before,
        "gamma_after": bn_gamma_statistics(model, THRESHOLD),
    }


def arms(args: argparse.Namespace) -> list[tuple[str, str, SparsityConfig | None]]:
    chosen = [("dense-adam", "adam", None)]
    chosen += [(f"proximal-{s:g}", "adam", SparsityConfig("proximal", s)) for s in args.proximal]
    if args.l1:
        chosen += [("dense-sgd", "sgd", None)]
        chosen += [(f"l1-{s:g}", "sgd", SparsityConfig("l1", s)) for s in args.l1]
    return chosen


def _figure(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"  # NaN: nothing measured


def _run_line(run: dict) -> str:
    return (f"`{run['command']}`: {run['wall_minutes']:.1f} min wall, {run['cpu_minutes']:.1f} min "
            "CPU (data workers included)")


def report(results: list[dict], args: argparse.Namespace, val_images: int) -> str:
    images_per_epoch = results[0]["steps"] // args.epochs * args.batch_size
    runs = [results[0]["run"]] + ([results[0]["proxy_run"]] if "proxy_run" in results[0] else [])
    lines = [
        "# Network slimming on the synthetic benchmark",
        "",
        "Commands: " + "; then ".join(_run_line(run) for run in runs) + ". "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch "
        f"{torch.__version__}, on a 2-core machine shared with other jobs (wall times are not "
        "speeds).",
        "",
        f"Model: res18 CenterNet, widths {WIDTHS}, head_conv {HEAD_CONV}, {INPUT_SIZE[0]} px, "
        f"from scratch. Training: {args.epochs} epoch(s) of {images_per_epoch} images, batch "
        f"{args.batch_size}, constant lr after 0.3 warm-up epochs with a x0.1 drop for the last "
        f"quarter, bf16, seed 317; Adam at lr {args.lr:g} x batch / 32, SGD (momentum 0.9) at lr "
        f"{args.sgd_lr:g} x batch / 32. Evaluation: COCO AP50 and AP on the "
        f"{'first ' if args.val_images else ''}{val_images} val images.",
        "",
        "`lr sum` is the sum of the per-step learning rates: the penalty can move a gamma by at "
        "most strength x lr sum (proximal; l1 with SGD: up to 10 x that with momentum 0.9).",
        "",
        f"| run | strength | lr sum | train min | share abs(gamma) < {THRESHOLD:g} before -> after "
        "| exactly 0 | abs(gamma) p10 / p50 / p90 after | AP50 | AP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        before, after = r["gamma_before"], r["gamma_after"]
        quantiles = after["quantiles"]
        strength = "-" if r["sparsity"] is None else f"{r['sparsity']['strength']:g}"
        lines.append(
            f"| {r['arm']} | {strength} | {r['lr_sum']:.3f} | {r['train_minutes']:.1f} "
            f"| {before['share_below_threshold']:.3f} -> {after['share_below_threshold']:.3f} "
            f"| {after['exactly_zero']} / {after['channels']} "
            f"| {quantiles['p10']:.3g} / {quantiles['p50']:.3g} / {quantiles['p90']:.3g} "
            f"| {_figure(r.get('ap50'))} | {_figure(r.get('ap'))} |"
        )
    lines += [
        "",
        "Masking proxies (gamma = beta = 0 on a copy, so the channel outputs 0 as if removed; "
        f"then `recalibrate_bn` on {args.recalibration_batches} training batches). Dead: every "
        f"channel with abs(gamma) < {THRESHOLD:g}, in any BatchNorm. Fixed share: the "
        f"{results[0].get('prune_share', args.prune_share):.0%} of the exactly-prunable "
        "channels (each basic block's bn1, the neck BNs: no residual add after them) with the "
        "smallest abs(gamma), one global ranking.",
        "",
        "| run | dead channels | AP50 dead masked | + recalibrated | fixed-share channels "
        "| AP50 masked | + recalibrated |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = [
            r.get("dead_channels", "-"),
            _figure(r.get("dead_masked_ap50")),
            _figure(r.get("dead_masked_recalibrated_ap50")),
            r.get("masked_channels", "-"),
            _figure(r.get("masked_ap50")),
            _figure(r.get("masked_recalibrated_ap50")),
        ]
        lines.append(f"| {r['arm']} | " + " | ".join(str(cell) for cell in cells) + " |")
    lines += [
        "",
        f"Share of abs(gamma) < {THRESHOLD:g} per BatchNorm after training:",
        "",
        "| BatchNorm | " + " | ".join(r["arm"] for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for layer in results[0]["gamma_after"]["per_layer_share_below"]:
        cells = [f"{r['gamma_after']['per_layer_share_below'][layer]:.2f}" for r in results]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "shapes")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "slimming_study")
    parser.add_argument("--report", type=Path, default=None,
                        help="where the tables go (default: --out/report.md)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=4e-3, help="Adam lr for a batch of 32")
    parser.add_argument("--sgd-lr", type=float, default=0.1, help="SGD lr for a batch of 32")
    parser.add_argument("--proximal", type=float, nargs="*", default=[0.3, 0.9])
    parser.add_argument("--l1", type=float, nargs="*", default=[], help="adds SGD runs")
    parser.add_argument("--prune-share", type=float, default=0.5, help="0 skips the proxy")
    parser.add_argument("--recalibration-batches", type=int, default=20)
    parser.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                        help="gamma statistics only")
    parser.add_argument("--train-images", type=int, default=None, help="the first N only")
    parser.add_argument("--val-images", type=int, default=None, help="the first N only")
    parser.add_argument("--reuse", action="store_true",
                        help="take the trained runs and their figures from --out/results.json "
                             "and measure the proxies again (the pruning proxy is kept when "
                             "--prune-share is 0)")
    parser.add_argument("--workers", type=int, default=1)
    # One thread: on the shared 2-core machine, next to another busy process, two threads
    # trained at 6 images/s and one thread at 77 (see report.md).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.report = args.report or args.out / "report.md"

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    generate_shapes(args.data)  # a no-op when the frozen set is already there
    data = load_data_yaml(args.data / "data.yaml")
    train_source, val_source = load_source(data, "train"), load_source(data, "val")
    if args.train_images:
        records = train_source.records[: args.train_images]
        train_source = dataclasses.replace(train_source, records=records)
    if args.val_images:
        records = val_source.records[: args.val_images]
        val_source = dataclasses.replace(val_source, records=records, annotation_file=None)
    model_config = ModelConfig(
        arch="res18",
        num_classes=len(train_source.class_names),
        head_conv=HEAD_CONV,
        widths=WIDTHS,
        class_names=list(train_source.class_names),
        input=input_preset("imagenet", INPUT_SIZE),
    )
    previous = {}
    if args.reuse:
        previous = {r["arm"]: r for r in json.loads((args.out / "results.json").read_text())}
    results = [
        run_arm(name, optimizer, sparsity, args, model_config, train_source, val_source,
                previous.get(name) if args.reuse else None)
        for name, optimizer, sparsity in arms(args)
    ]
    script = Path(sys.argv[0]).resolve().relative_to(ROOT)
    run = {
        "command": " ".join(["python", str(script), *sys.argv[1:]]),
        "wall_minutes": (time.perf_counter() - started) / 60,
        "cpu_minutes": cpu_minutes(),
    }
    for result in results:
        result["proxy_run" if args.reuse else "run"] = run
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    update_study_report(HERE / "report.json", report_rows(results), "results", results)
    text = report(results, args, len(val_source.records))
    args.report.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
