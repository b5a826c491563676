"""Per-convolution CPU time of res18 (or --arch) unpruned vs pruned by 0.5 per layer on the
default torch path (BN folded, channels-last, 2 threads, 512 px): which layers miss their ideal
speed-up.

    OMP_WAIT_POLICY=PASSIVE python experiments/bench/deploy/layers.py [--arch res50]

"ideal" is a layer's unpruned time divided by its MAC ratio (in x out channels); "excess" is how
far the pruned layer's time is above it. Results: experiments/bench/deploy/report.md, section 5.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from ctprune import prune
from ctprune.bench import deploy_torch
from detector import build_model

SIZE = 512
ROUNDS = 5


def conv_times(model: nn.Module, images: torch.Tensor) -> dict[str, tuple[float, int, int]]:
    """Median milliseconds per conv of the deployed model, with its (in, out) channels."""
    deployed = deploy_torch(model)
    started: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    convs = {
        name: module
        for name, module in deployed.named_modules()
        if isinstance(module, nn.modules.conv._ConvNd)
    }

    def before(name: str):
        return lambda module, inputs: started.__setitem__(name, time.perf_counter())

    def after(name: str):
        return lambda module, inputs, output: times[name].append(
            time.perf_counter() - started[name]
        )

    for name, module in convs.items():
        times[name] = []
        module.register_forward_pre_hook(before(name))
        module.register_forward_hook(after(name))
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            deployed(images)
        for values in times.values():
            values.clear()
        for _ in range(ROUNDS):
            deployed(images)
    return {
        name: (statistics.median(times[name]) * 1000, module.in_channels, module.out_channels)
        for name, module in convs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="res18")
    arch = parser.parse_args().arch
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = build_model(arch, 80).eval()
    example = torch.zeros(1, 3, SIZE, SIZE)
    pruned = prune(base, 0.5, "l1", example_inputs=example).model.eval()
    images = torch.randn(1, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    before, after = conv_times(base, images), conv_times(pruned, images)
    rows = []
    for name, (base_ms, base_in, base_out) in before.items():
        pruned_ms, pruned_in, pruned_out = after[name]
        ideal_ms = base_ms * (pruned_in * pruned_out) / (base_in * base_out)
        rows.append((pruned_ms - ideal_ms, name, base_in, base_out, pruned_in, pruned_out,
                     base_ms, pruned_ms, ideal_ms))
    total_base = sum(row[6] for row in rows)
    total_pruned = sum(row[7] for row in rows)
    total_ideal = sum(row[8] for row in rows)
    print(f"all convs: {total_base:.1f} ms -> {total_pruned:.1f} ms (ideal {total_ideal:.1f})")
    print("| layer | channels | ms unpruned | ms pruned | ideal | excess |")
    print("|---|---|---|---|---|---|")
    worst = sorted(rows, reverse=True)[:10]
    for excess, name, bi, bo, pi, po, base_ms, pruned_ms, ideal_ms in worst:
        print(f"| {name} | {bi}x{bo} -> {pi}x{po} | {base_ms:.2f} | {pruned_ms:.2f} | "
              f"{ideal_ms:.2f} | {excess:.2f} |")


if __name__ == "__main__":
    main()
