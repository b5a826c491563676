"""Benchmark of `ctprune.pruning.prune` on full-size CenterNets, on CPU.

    python experiments/bench/prune/run.py --part structure   # sizes, MACs, time to prune (~3 min)
    python experiments/bench/prune/run.py --part latency     # paired CPU latency at 512 px (~6 min)
    python experiments/bench/prune/run.py --part merge       # k-means drift, trained model (~4 min)

Each part prints Markdown tables (pasted into experiments/bench/prune/report.md) and writes its raw
figures as JSON beside the output (``--out``, default runs/bench/prune). Models are built with
random weights (80 classes, full width): sizes, MACs and per-layer latency do not depend on the
values, but the channels global scope keeps do (see the notes in the report). The merge part
trains a narrow ResNet-18 on the synthetic shapes benchmark (`data/shapes`, generated if
absent) so that k-means has real, trained filters to cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import ctprune.pruning.api as prune_api
from ctprune import prune, recalibrate_bn
from ctprune.bench import interleaved_times, torch_runner
from ctprune.pruning.graph import meta_copy
from detector import build_model, count_macs, input_preset
from detector.data.dataset import CenterNetDataset, collate
from detector.data.shapes import generate_shapes
from detector.data.sources import load_data_yaml, load_source
from detector.losses import centernet_loss

ROOT = Path(__file__).resolve().parents[3]
ARCHS = ("res18", "res50", "res101")
RATIOS = (0.2, 0.5)
SCOPES = ("layer", "global")
ROUNDINGS = (None, 8, 16)
SIZE = (512, 512)
# Paired forwards per configuration (a res101 forward at 512 px is ~0.6 s on 2 threads).
PAIRS = {"res18": 7, "res50": 5, "res101": 3}
WARM_UP = 2


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def gmacs(model: torch.nn.Module) -> float:
    return count_macs(meta_copy(model), SIZE) / 1e9


def structure() -> list[dict]:
    rows = []
    for arch in ARCHS:
        model = build_model(arch, 80).eval()
        base_gmacs = gmacs(model)
        for scope in SCOPES:
            for ratio in RATIOS:
                for round_to in ROUNDINGS:
                    result = prune(model, ratio, "l1", scope=scope, round_to=round_to)
                    stats = result.stats
                    removed = max((g["width"] - g["kept"]) / g["width"] for g in stats.groups)
                    rows.append(
                        dict(
                            arch=arch,
                            scope=scope,
                            ratio=ratio,
                            round_to=round_to,
                            seconds=stats.seconds,
                            graph_seconds=stats.timings["graph"],
                            params_before=stats.params_before,
                            params_after=stats.params_after,
                            mib_before=stats.mib_before,
                            mib_after=stats.mib_after,
                            gmacs_before=base_gmacs,
                            gmacs_after=gmacs(result.model),
                            max_layer_removed=removed,
                        )
                    )
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def kmeans_timing() -> list[dict]:
    rows = []
    model = build_model("res101", 80).eval()
    for criterion in ("l1", "kmeans"):
        stats = prune(model, 0.2, criterion, scope="layer").stats
        rows.append(
            dict(
                criterion=criterion,
                seconds=stats.seconds,
                timings=stats.timings,
                params_before=stats.params_before,
                params_after=stats.params_after,
                mib_before=stats.mib_before,
                mib_after=stats.mib_after,
                gmacs_before=stats.macs_before * 16 / 1e9,
                gmacs_after=stats.macs_after * 16 / 1e9,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def paired_latency(before: torch.nn.Module, after: torch.nn.Module, pairs: int) -> dict:
    """Interleaved forwards (before, after, then after, before, ...) through `ctprune.bench`'s
    timer: the per-pair ratio cancels most of the load other processes put on the machine."""
    images = torch.randn(1, 3, *SIZE)
    runners = {
        "before": torch_runner(before, channels_last=False),
        "after": torch_runner(after, channels_last=False),
    }
    times = interleaved_times(runners, images, pairs, warmup=WARM_UP)
    ratios = [b / a for b, a in zip(times["before"], times["after"], strict=True)]
    return dict(
        ms_before=1000 * statistics.median(times["before"]),
        ms_after=1000 * statistics.median(times["after"]),
        speedup=statistics.median(ratios),
        speedup_min=min(ratios),
        speedup_max=max(ratios),
    )


def latency() -> list[dict]:
    rows = []
    for arch in ARCHS:
        model = build_model(arch, 80).eval()
        base_gmacs = gmacs(model)
        for scope in SCOPES:
            for ratio in RATIOS:
                for round_to in ROUNDINGS:
                    pruned = prune(model, ratio, "l1", scope=scope, round_to=round_to).model.eval()
                    row = dict(
                        arch=arch,
                        scope=scope,
                        ratio=ratio,
                        round_to=round_to,
                        ideal=base_gmacs / gmacs(pruned),
                        load=load_average(),
                    )
                    row.update(paired_latency(model, pruned, PAIRS[arch]))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


# The merge part's model: ResNet-18 at a quarter of the width, 128 px, the 6 shape classes.
MERGE_WIDTHS = {"stem": 16, "stages": [16, 32, 64, 128], "neck": [64, 64, 64]}
MERGE_HEAD_CONV = 32
MERGE_INPUT = (128, 128)


def _shapes_loaders(batch_size: int, val_images: int):
    data = ROOT / "data" / "shapes"
    generate_shapes(data)  # a no-op when the frozen set is already there
    config = load_data_yaml(data / "data.yaml")
    train, val = load_source(config, "train"), load_source(config, "val")
    spec = input_preset("imagenet", MERGE_INPUT)
    classes = len(train.class_names)
    train_set = CenterNetDataset(train.records, classes, spec, train=True)
    val_set = CenterNetDataset(val.records[:val_images], classes, spec, train=False)
    train_loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    return (
        classes,
        train_loader,
        next(iter(DataLoader(val_set, batch_size=val_images, collate_fn=collate))),
    )


def _drift(model, reference: dict, batch: dict) -> dict:
    model.eval()
    with torch.no_grad():
        outputs = model(batch["image"])
        loss, _ = centernet_loss(outputs, batch)
    heatmap = outputs[0]["heatmap"].sigmoid()
    difference = (heatmap - reference["heatmap"]).abs()
    return dict(
        heatmap_drift=difference.mean().item(),
        heatmap_drift_max=difference.max().item(),
        wh_drift=(outputs[0]["wh"] - reference["wh"]).abs().mean().item(),
        val_loss=loss.item(),
    )


def merge(steps: int) -> dict:
    torch.manual_seed(0)
    classes, train_loader, val_batch = _shapes_loaders(batch_size=16, val_images=64)
    model = build_model("res18", classes, head_conv=MERGE_HEAD_CONV, widths=MERGE_WIDTHS)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    started, step, losses = time.perf_counter(), 0, []
    while step < steps:
        for batch in train_loader:
            loss, _ = centernet_loss(model(batch["image"]), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step == steps:
                break
    train_seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        outputs = model(val_batch["image"])[0]
        base_loss = centernet_loss([outputs], val_batch)[0].item()
    reference = {"heatmap": outputs["heatmap"].sigmoid(), "wh": outputs["wh"]}
    recalibration = [batch for _, batch in zip(range(10), train_loader, strict=False)]

    def variants(ratio: float):
        yield "kmeans merge", prune(model, ratio, "kmeans", round_to=None)
        fold = prune_api.fold_into_kept
        prune_api.fold_into_kept = lambda group, merged: None  # same channels, no fold
        try:
            yield "kmeans channels, removed", prune(model, ratio, "kmeans", round_to=None)
        finally:
            prune_api.fold_into_kept = fold
        yield "l1", prune(model, ratio, "l1", round_to=None)
        yield "random", prune(model, ratio, "random", round_to=None)

    rows = []
    for ratio in (0.2, 0.5):
        for name, result in variants(ratio):
            row = dict(
                ratio=ratio,
                method=name,
                seconds=result.stats.seconds,
                **_drift(result.model, reference, val_batch),
            )
            recalibrate_bn(result.model, recalibration, batches=len(recalibration))
            row.update(
                {
                    f"recalibrated_{k}": v
                    for k, v in _drift(result.model, reference, val_batch).items()
                }
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    return dict(
        steps=steps,
        train_seconds=train_seconds,
        first_loss=sum(losses[:20]) / 20,
        last_loss=sum(losses[-20:]) / 20,
        base_val_loss=base_loss,
        rows=rows,
    )


def _round_to(value) -> str:
    return "–" if value is None else str(value)


def _header(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def structure_table(rows: list[dict]) -> str:
    lines = _header(
        "arch", "scope", "ratio", "round_to", "params M", "MiB", "GMACs @512",
        "max group pruned", "prune s (graph s)",
    )  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['scope']} | {r['ratio']} | {_round_to(r['round_to'])} | "
            f"{r['params_before'] / 1e6:.2f}→{r['params_after'] / 1e6:.2f} | "
            f"{r['mib_before']:.1f}→{r['mib_after']:.1f} | "
            f"{r['gmacs_before']:.2f}→{r['gmacs_after']:.2f} | "
            f"{r['max_layer_removed']:.2f} | {r['seconds']:.2f} ({r['graph_seconds']:.2f}) |"
        )
    return "\n".join(lines)


def latency_table(rows: list[dict]) -> str:
    lines = _header(
        "arch", "scope", "ratio", "round_to", "ideal speed-up (MACs)",
        "paired speed-up (median, min–max)", "ms before→after (medians)", "load",
    )  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['scope']} | {r['ratio']} | {_round_to(r['round_to'])} | "
            f"{r['ideal']:.2f}x | "
            f"**{r['speedup']:.2f}x** ({r['speedup_min']:.2f}–{r['speedup_max']:.2f}) | "
            f"{r['ms_before']:.0f}→{r['ms_after']:.0f} | {r['load']} |"
        )
    return "\n".join(lines)


def merge_table(result: dict) -> str:
    lines = _header(
        "ratio", "method", "heatmap drift (mean abs sigmoid diff)", "max", "wh drift", "val loss",
        "after BN recalibration: heatmap drift / val loss", "prune s",
    )  # fmt: skip
    for r in result["rows"]:
        lines.append(
            f"| {r['ratio']} | {r['method']} | {r['heatmap_drift']:.4f} | "
            f"{r['heatmap_drift_max']:.3f} | "
            f"{r['wh_drift']:.3f} | {r['val_loss']:.3f} | {r['recalibrated_heatmap_drift']:.4f} / "
            f"{r['recalibrated_val_loss']:.3f} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("structure", "latency", "merge"), required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400, help="training steps of the merge part")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "prune")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"load average {load_average()}, {os.cpu_count()} CPUs, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    if args.part == "structure":
        rows, timing = structure(), kmeans_timing()
        (args.out / "structure.json").write_text(
            json.dumps({"rows": rows, "res101_kmeans": timing}, indent=1)
        )
        print(structure_table(rows))
    elif args.part == "latency":
        rows = latency()
        (args.out / "latency.json").write_text(json.dumps(rows, indent=1))
        print(latency_table(rows))
    else:
        result = merge(args.steps)
        (args.out / "merge.json").write_text(json.dumps(result, indent=1))
        print(
            f"trained {result['steps']} steps in {result['train_seconds']:.0f} s, train loss "
            f"{result['first_loss']:.2f} -> {result['last_loss']:.2f}, "
            f"val loss {result['base_val_loss']:.3f}"
        )
        print(merge_table(result))
    print(f"load average {load_average()}")


if __name__ == "__main__":
    main()
