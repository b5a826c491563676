"""Deployed speed of pruned CenterNets: realised vs ideal speed-up in PyTorch and onnxruntime
on CPU (and PyTorch on CUDA with --device cuda), the default torch path (compiled; --no-compile
for the plain one) against eager, and where the time goes per layer kind.

Full-size models (80 classes, 512 px, random seeded weights: latency does not depend on the
values), pruned with L1 at the default rounding (``round_to=16``). For each architecture the
unpruned model and its pruned variants run in one process, interleaved round by round
(`ctprune.bench.bench_models`), once on ctprune's default torch path and once in onnxruntime;
speed-ups are medians of per-round ratios against the unpruned model on the same path.

    nice -n -10 python experiments/bench/deploy/run.py --part speed --archs res18,res50 \
        --out runs/bench/deploy_speed.json
    OMP_WAIT_POLICY=PASSIVE nice -n -10 python experiments/bench/deploy/run.py --part layers \
        --archs res18,res50

Prints markdown tables (wall-clock and process-CPU-time speed-ups); --out keeps the raw rows as
JSON. The speed part is meant for an otherwise idle machine with PyTorch's default (spinning)
OpenMP threads, as a deployment runs them, and onnxruntime's pool without spinning, which ran
faster on the 2-vCPU VM measured (``--onnxruntime-spinning`` for its default). On a shared
machine, OMP_WAIT_POLICY=PASSIVE keeps idle threads from burning CPU time, so CPU time per
forward measures the work, but each parallel region then pays a thread wake-up, which costs
pruned models more; see experiments/bench/deploy/report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict

import torch
from torch import nn

from ctprune import prune
from ctprune.bench import bench_models, deploy_torch, torch_threads
from detector import InputSpec, build_model

NUM_CLASSES = 80
SETTINGS = {
    "res18": [("layer", 0.2), ("layer", 0.5), ("global", 0.2), ("global", 0.5)],
    "res50": [("layer", 0.2), ("layer", 0.5), ("global", 0.2), ("global", 0.5)],
    "res101": [("layer", 0.2), ("layer", 0.5), ("global", 0.2)],
}


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def variants(arch: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = build_model(arch, NUM_CLASSES).eval()
    models = {"unpruned": base}
    for scope, ratio in SETTINGS[arch]:
        models[f"{scope} {ratio}"] = prune(base, ratio, "l1", scope=scope).model.eval()
    return models


def speed_part(
    archs: list[str], threads: int, rounds: int, runtimes: list[str], size: int,
    device: str = "cpu", compile: bool = True, onnxruntime_spinning: bool = False,
) -> list[dict]:
    spec = InputSpec()
    rows = []
    for arch in archs:
        models = variants(arch)
        named = {f"{arch} {name}": (model, spec) for name, model in models.items()}
        base_name = f"{arch} unpruned"
        pairs = {name: base_name for name in named if name != base_name}
        for runtime in runtimes:
            started, load_before = time.perf_counter(), load()
            result = bench_models(
                named, pairs=pairs, eager=(base_name,) if runtime == "torch" else (),
                input_size=size, threads=threads, runtime=runtime, rounds=rounds,
                device=device, throughput_batch=None if device == "cpu" else 16,
                memory=runtime == "torch", compile=compile,
                spinning=onnxruntime_spinning,
            )
            for row in result:
                rows.append({**row.as_dict(), "arch": arch, "load_before": load_before,
                             "load_after": load(), "seconds": time.perf_counter() - started})
            print_speed([r for r in rows if r["arch"] == arch and r["runtime"] == runtime
                         or r["path"] == "eager" and r["arch"] == arch and runtime == "torch"])
    return rows


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"  # CUDA latencies are a few ms


def print_speed(rows: list[dict]) -> None:
    print("| model | path | GMACs | ms (median / p90) | peak MiB | realised speed-up (min–max) "
          "| ideal | realised / ideal | CPU ms | CPU-time speed-up / ideal | load before → after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["speedup"] is not None and row["pair"].endswith("(eager)"):
            spread = f"{row['speedup_min']:.2f}–{row['speedup_max']:.2f}"
            realised = f"{row['speedup']:.2f}x vs eager ({spread})"
            ideal = fraction = "–"
        elif row["speedup"] is not None:
            spread = f"{row['speedup_min']:.2f}–{row['speedup_max']:.2f}"
            realised = f"**{row['speedup']:.2f}x** ({spread})"
            ideal = f"{row['ideal_speedup']:.2f}x"
            fraction = f"{row['speedup'] / row['ideal_speedup']:.2f}"
        else:
            realised = ideal = fraction = "–"
        peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "–"
        cpu = "–"
        if row["cpu_speedup"] is not None:
            ideal_cpu = 1.0 if row["pair"].endswith("(eager)") else row["ideal_speedup"]
            cpu = f"{row['cpu_speedup']:.2f}x / {row['cpu_speedup'] / ideal_cpu:.2f}"
        print(f"| {row['name']} | {row['path']} | {row['macs'] / 1e9:.2f} | "
              f"{_ms(row['latency_ms'])} / {_ms(row['latency_p90_ms'])} | {peak} | {realised} | "
              f"{ideal} | {fraction} | {row['cpu_ms']:.0f} | {cpu} | "
              f"{row['load_before']} → {row['load_after']} |", flush=True)


def layer_kind(name: str, module: nn.Module) -> str | None:
    if isinstance(module, nn.ConvTranspose2d):
        return "neck deconv"
    if isinstance(module, nn.Conv2d):
        return "head conv (stride 4)" if name.startswith("heads.") else "trunk conv"
    if isinstance(module, (nn.ReLU, nn.MaxPool2d, nn.BatchNorm2d)):
        return "relu / pool / bn"
    return None


def conv_macs(module: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> int:
    """MACs of one call: a conv does k*k*in/groups per output element, a transposed conv
    k*k*out/groups per input element."""
    kernel = module.kernel_size[0] * module.kernel_size[1]
    if isinstance(module, nn.ConvTranspose2d):
        return inputs.numel() * kernel * module.out_channels // module.groups
    return output.numel() * kernel * module.in_channels // module.groups


class KindTimer:
    """Hooks on ``model``'s leaf layers that add each call's wall time (and a conv's MACs) to
    its layer kind; `forward` runs one timed forward (the hooks' own cost is included in every
    kind alike)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.times: dict[str, list[float]] = defaultdict(list)
        self.macs: dict[str, int] = defaultdict(int)
        self.current: dict[str, float] = defaultdict(float)
        self.starts: dict[str, float] = {}
        self.counting = True
        for name, module in model.named_modules():
            kind = layer_kind(name, module)
            if kind is not None and not list(module.children()):
                module.register_forward_pre_hook(self._pre(name))
                module.register_forward_hook(self._post(name, kind))

    def _pre(self, name: str):
        def hook(module, inputs):
            self.starts[name] = time.perf_counter()
        return hook

    def _post(self, name: str, kind: str):
        def hook(module, inputs, output):
            self.current[kind] += time.perf_counter() - self.starts[name]
            if self.counting and isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                self.macs[kind] += conv_macs(module, inputs[0], output)
        return hook

    def forward(self, images: torch.Tensor, record: bool) -> None:
        self.current.clear()
        started = time.perf_counter()
        with torch.inference_mode():
            self.model(images)
        self.current["total"] = time.perf_counter() - started
        self.counting = False
        if record:
            for kind, seconds in self.current.items():
                self.times[kind].append(seconds)

    def medians(self) -> dict[str, float]:
        return {kind: statistics.median(values) for kind, values in self.times.items()}


def layers_part(archs: list[str], threads: int, repeats: int, size: int) -> None:
    """Per layer kind: time and MACs, unpruned vs pruned, the variants interleaved."""
    images = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    for arch in archs:
        timers = {name: KindTimer(deploy_torch(model)) for name, model in variants(arch).items()}
        names = list(timers)
        with torch_threads(threads):
            for index in range(repeats + 1):  # the first round is a warm-up
                for name in names if index % 2 == 0 else reversed(names):
                    timers[name].forward(images, record=index > 0)
        base_times, base_macs = timers["unpruned"].medians(), timers["unpruned"].macs
        print(f"\n{arch}, default torch path, {threads} threads, median of {repeats} interleaved "
              f"forwards (load {load()})")
        print("| variant | layer kind | ms unpruned → pruned | share of unpruned time | "
              "realised | ideal (MACs) | realised / ideal |")
        print("|---|---|---|---|---|---|---|")
        for name, timer in timers.items():
            if name == "unpruned":
                continue
            kind_seconds, kind_macs = timer.medians(), timer.macs
            for kind in sorted(base_times, key=lambda k: -base_times[k]):
                before, after = base_times[kind], kind_seconds.get(kind, 0.0)
                realised = before / after if after else float("nan")
                ideal = base_macs[kind] / kind_macs[kind] if kind_macs.get(kind) else None
                if kind == "total":
                    ideal = sum(base_macs.values()) / sum(kind_macs.values())
                print(f"| {name} | {kind} | {before * 1e3:.1f} → {after * 1e3:.1f} | "
                      f"{before / base_times['total']:.0%} | {realised:.2f}x | "
                      + (f"{ideal:.2f}x | {realised / ideal:.2f} |" if ideal else "– | – |"),
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("speed", "layers", "all"), default="all")
    parser.add_argument("--archs", default="res18,res50,res101")
    parser.add_argument("--runtimes", default="torch,onnxruntime")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--size", type=int, default=512, help="square input side")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the torch runtime only)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="torch path without torch.compile")
    parser.add_argument("--onnxruntime-spinning", action="store_true",
                        help="let onnxruntime's idle pool threads spin (its own default)")
    parser.add_argument("--out", help="raw rows as JSON")
    args = parser.parse_args()
    if args.device != "cpu" and args.runtimes != "torch":
        parser.error("--device cuda times the torch runtime only: add --runtimes torch")
    archs = args.archs.split(",")
    print(f"torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(default)')}, onnxruntime spinning "
          f"{'on' if args.onnxruntime_spinning else 'off'}, load {load()}")
    rows = []
    if args.part in ("speed", "all"):
        rows = speed_part(archs, args.threads, args.rounds, args.runtimes.split(","), args.size,
                          args.device, args.compile, args.onnxruntime_spinning)
    if args.part in ("layers", "all"):
        layers_part(archs, args.threads, repeats=5, size=args.size)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
