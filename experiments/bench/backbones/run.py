"""Every backbone in `detector.models.ARCHITECTURES` at 512 px, before and after L1 pruning.

    nice -n 15 python experiments/bench/backbones/run.py                 # every architecture
    nice -n 15 python experiments/bench/backbones/run.py --arch dla34 --arch res18

For each architecture (80 classes, full width, random weights, the architecture's own
head_conv): parameters, fp32 state-dict MiB (`detector.state_dict_mib`), GMACs at 512 x 512
(`detector.count_macs`, FLOPs / 2; deformable convs count as a plain conv plus their offset
conv) and CPU latency of one 1 x 3 x 512 x 512 forward, for the model as built and after
`prune(model, ratio, "l1", scope="layer")` at each ratio (every coupled group loses that
fraction, kept widths rounded to the default multiple of 16).

Latency is measured in one process with the models interleaved: every round runs each model
once, in an order rotated from round to round, and the report gives the median time per model
and the median over rounds of the per-round speed-up, which cancels most of the load other
processes put on the shared machine. Rounds are few (``--rounds``, default 3, after one
warm-up round) because the big models take seconds per forward on a 2-core machine: treat the
latencies as +-20 %, the MACs and sizes as exact.

Writes the Markdown report (``--report``, default experiments/bench/backbones/report.md) and the raw
rows as JSON (``--json``, default runs/bench/backbones.json). An architecture that
fails to build or run is reported as missing, with its error, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch

from ctprune.bench import interleaved_times, torch_runner
from ctprune.pruning import DEFAULT_ROUND_TO, prune
from ctprune.pruning.graph import meta_copy
from detector import ARCHITECTURES, build_model, count_macs, count_parameters, state_dict_mib
from detector.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[3]
SIZE = (512, 512)
NUM_CLASSES = 80
RATIOS = (0.2, 0.5)
CRITERION = "l1"
SCOPE = "layer"


# Per-architecture remarks printed under the table when the architecture is measured.
NOTES = {
    "dla34": (
        "dla34 / dlav0_34: parameters exclude the 1000-class ImageNet classifier `base.fc` "
        "(Conv2d(512, 1000, 1), 513,000 parameters) the original keeps but never runs: with it "
        "they are the original's 20,188,892 / 18,474,476. GMACs are 0.067 below the reference "
        "figures (33.10 / 31.12) because the original also computes two 1x1 projections whose "
        "outputs it discards (`level3.project`, `level4.project`: 64 x 128 x 64^2 + 128 x 256 x "
        "32^2 = 67,108,864 MACs at 512 px); ctprune keeps their weights, so checkpoints match, "
        "but never runs them, and pruning leaves them (41,728 parameters) untouched."
    ),
}


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def describe(model: torch.nn.Module) -> dict:
    return dict(
        params=count_parameters(model),
        mib=state_dict_mib(model),
        gmacs=count_macs(meta_copy(model), SIZE) / 1e9,
    )


def interleaved_latency(models: list[torch.nn.Module], rounds: int) -> list[dict]:
    """Median forward time of each model and, for models 1..n, the median over rounds of
    time(model 0) / time(model i), from `ctprune.bench`'s interleaved timer (the order of the
    models alternates between rounds, after one warm-up call each)."""
    images = torch.randn(1, 3, *SIZE)
    names = [f"model{index}" for index in range(len(models))]
    runners = {
        name: torch_runner(model, channels_last=False)
        for name, model in zip(names, models, strict=True)
    }
    by_name = interleaved_times(runners, images, rounds, warmup=1)
    times = [by_name[name] for name in names]
    results = []
    for model_times in times:
        speedups = [base / own for base, own in zip(times[0], model_times, strict=True)]
        results.append(
            dict(
                ms=1000 * statistics.median(model_times),
                speedup=statistics.median(speedups),
                ms_all=[round(1000 * t, 1) for t in model_times],
            )
        )
    return results


def bench(arch: str, rounds: int) -> list[dict]:
    started = time.perf_counter()
    model = build_model(arch, NUM_CLASSES).eval()
    rows = [dict(arch=arch, ratio=0.0, **describe(model))]
    models = [model]
    for ratio in RATIOS:
        result = prune(model, ratio, CRITERION, scope=SCOPE)
        pruned = result.model.eval()
        rows.append(dict(arch=arch, ratio=ratio, prune_s=result.stats.seconds, **describe(pruned)))
        models.append(pruned)
    load_before = load_average()
    for row, latency in zip(rows, interleaved_latency(models, rounds), strict=True):
        row.update(latency, load=f"{load_before} -> {load_average()}")
    for row in rows:
        row["bench_s"] = round(time.perf_counter() - started, 1)
    return rows


def markdown(rows: list[dict], missing: dict[str, str], args: argparse.Namespace) -> str:
    command = "nice -n 15 python experiments/bench/backbones/run.py" + "".join(
        f" --arch {arch}" for arch in args.arch or []
    )
    lines = [
        "# Backbones at 512 px: size, compute and CPU latency, before and after pruning",
        "",
        f"Command: `{command} --rounds {args.rounds} --threads {args.threads}` "
        f"(torch {torch.__version__}, {platform.machine()}, "
        f"intra-op threads: {torch.get_num_threads()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
        "",
        f"Every architecture in `detector.models.ARCHITECTURES`, built for {NUM_CLASSES} classes "
        "at full width with random weights and its own default head_conv; pruned with "
        f"`prune(model, ratio, \"{CRITERION}\", scope=\"{SCOPE}\")` (every coupled group loses "
        f"`ratio` of its channels, kept widths rounded to multiples of {DEFAULT_ROUND_TO}). "
        "Params and MiB (fp32 state dict as `torch.save` writes it) are exact; GMACs are "
        "`detector.count_macs` at 512 x 512 (FLOPs / 2; BN, ReLU, additions, pooling and "
        "upsampling count 0; a deformable conv counts as a plain conv of its shape plus its "
        "offset conv). Latency: one 1 x 3 x 512 x 512 forward in inference mode on the CPU, "
        f"median of {args.rounds} rounds after one warm-up, the models of one architecture "
        "interleaved in one process (order rotated each round); speed-up is the median over "
        "rounds of the per-round ratio. The VM is a shared 2-core machine that other engineers "
        "load at the same time (load average before -> after each architecture in the last "
        "column): treat latencies as +-20 % and compare speed-ups, not milliseconds, between "
        "rows.",
        "",
        "| arch | ratio | params (M) | MiB | GMACs @512 | CPU ms | speed-up | prune s | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "built" if row["ratio"] == 0 else f"{row['ratio']:.1f}"
        prune_seconds = f"{row['prune_s']:.1f}" if "prune_s" in row else ""
        lines.append(
            f"| {row['arch']} | {ratio} | {row['params'] / 1e6:.2f} | {row['mib']:.1f} | "
            f"{row['gmacs']:.2f} | {row['ms']:.0f} | {row['speedup']:.2f}x | {prune_seconds} | "
            f"{row['load']} |"
        )
    notes = [note for arch, note in NOTES.items() if any(row["arch"] == arch for row in rows)]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    if missing:
        lines += ["", "Not measured (the architecture did not build or run):", ""]
        lines += [f"- `{arch}`: {error}" for arch, error in missing.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="an architecture; repeat for several")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per architecture")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on the loaded 2-core VM two OpenMP threads "
        "spin against other processes and one res18 forward varied 6-19 s)",
    )
    parser.add_argument("--report", type=Path, default=Path(__file__).with_name("report.md"))
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "backbones.json")
    args = parser.parse_args()
    unknown = sorted(set(args.arch or []) - set(ARCHITECTURES))
    if unknown:
        parser.error(f"unknown --arch {unknown}; known architectures: {', '.join(ARCHITECTURES)}")
    if args.rounds < 1:
        parser.error("--rounds: expected a positive integer")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, missing = [], {}
    for arch in args.arch or list(ARCHITECTURES):
        try:
            arch_rows = bench(arch, args.rounds)
        except Exception as error:  # report the others; this one is listed as missing
            traceback.print_exc()
            first_line = (str(error).splitlines() or [""])[0]
            missing[arch] = f"{type(error).__name__}: {first_line}"
            continue
        rows += arch_rows
        for row in arch_rows:
            print(json.dumps(row), flush=True)
        args.json.write_text(json.dumps({"rows": rows, "missing": missing}, indent=1))
        atomic_write_text(args.report, markdown(rows, missing, args))
    args.json.write_text(json.dumps({"rows": rows, "missing": missing}, indent=1))
    atomic_write_text(args.report, markdown(rows, missing, args))
    print(args.report.read_text())


if __name__ == "__main__":
    main()
