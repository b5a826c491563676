"""Training-step speed: ctprune's step variants against the original CenterNet's step.

One step = forward, loss, backward, Adam update, for a res18 CenterNet (80 classes) on random
inputs and targets. Variants run interleaved in one process (round-robin, after warm-up) and
are compared as ratios of per-round medians, so the shared machine's noise cancels.

    python experiments/bench/train_step/run.py                       # ctprune variants only
    python experiments/bench/train_step/run.py --original /path/to/CenterNet   # + the original

``--original`` takes a checkout of github xingyizhou/CenterNet (never committed here): its
msra_resnet model and its FocalLoss / RegL1Loss are timed as the original trains them (fp32,
contiguous, the in-place sigmoid). Without it the recorded figures of the original are printed:
0.745 images/s at 8 x 512 px and 18.4 images/s at 32 x 128 px on this kind of machine (2 threads).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from detector import build_model
from detector.losses import centernet_loss

RECORDED_ORIGINAL = {(8, 512): 0.745, (32, 128): 18.4}
NUM_CLASSES = 80
MAX_OBJECTS = 128


def random_batch(batch: int, size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = size // 4
    heatmap = torch.rand(batch, NUM_CLASSES, out, out, generator=generator) * 0.9
    index = torch.randint(0, out * out, (batch, MAX_OBJECTS), generator=generator)
    heatmap.view(batch, NUM_CLASSES, -1)[:, 0].scatter_(1, index[:, :10], 1.0)  # some positives
    mask = torch.zeros(batch, MAX_OBJECTS)
    mask[:, :10] = 1
    return {
        "image": torch.randn(batch, 3, size, size, generator=generator),
        "heatmap": heatmap,
        "wh": torch.rand(batch, MAX_OBJECTS, 2, generator=generator) * 20,
        "offset": torch.rand(batch, MAX_OBJECTS, 2, generator=generator),
        "index": index,
        "mask": mask,
    }


def ctprune_step(channels_last: bool, bf16: bool, batch: dict):
    model = build_model("res18", NUM_CLASSES)
    images = batch["image"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1.25e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step():
        with autocast:
            outputs = model(images)
        loss, _ = centernet_loss(outputs, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def original_step(checkout: Path, batch: dict):
    """The original's res18 and loss, imported from its source tree."""
    sys.path.insert(0, str(checkout / "src" / "lib"))  # the checkout is not a package
    msra = importlib.import_module("models.networks.msra_resnet")
    losses = importlib.import_module("models.losses")
    # Its constructor fetches ImageNet weights from the internet; give it random ones instead.
    msra.model_zoo.load_url = lambda url, **kwargs: {}
    model = msra.get_pose_net(18, {"hm": NUM_CLASSES, "wh": 2, "reg": 2}, 64)
    focal, l1 = losses.FocalLoss(), losses.RegL1Loss()
    optimizer = torch.optim.Adam(model.parameters(), 1.25e-4)
    mask = batch["mask"].to(torch.uint8)

    def step():
        output = model(batch["image"])[0]
        hm = torch.clamp(output["hm"].sigmoid_(), min=1e-4, max=1 - 1e-4)
        loss = (
            focal(hm, batch["heatmap"])
            + 0.1 * l1(output["wh"], mask, batch["index"], batch["wh"])
            + l1(output["reg"], mask, batch["index"], batch["offset"])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def measure(steps: dict, batch_size: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--original", type=Path, help="checkout of xingyizhou/CenterNet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shapes", default="32x128,8x512", help="batch x size, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        batch_size, size = (int(v) for v in shape.split("x"))
        batch = random_batch(batch_size, size)
        steps = {
            "ctprune fp32": ctprune_step(False, False, batch),
            "ctprune fp32 channels-last": ctprune_step(True, False, batch),
            "ctprune bf16 channels-last": ctprune_step(True, True, batch),
        }
        if args.original:
            steps = {"original": original_step(args.original, batch), **steps}
        times = measure(steps, batch_size, args.rounds, warmup=1 if size >= 512 else 2)
        reference = "original" if args.original else "ctprune fp32"
        print(
            f"\n{batch_size} x {size} px, {args.threads} threads, {args.rounds} interleaved rounds"
        )
        print("| variant | images/s (median) | vs " + reference + " (median of per-round ratios) |")
        print("|---|---|---|")
        for name, values in times.items():
            ratios = [r / v for r, v in zip(times[reference], values, strict=True)]
            print(
                f"| {name} | {batch_size / statistics.median(values):.2f} | "
                f"{statistics.median(ratios):.2f}x |"
            )
        if not args.original:
            print(f"recorded original: {RECORDED_ORIGINAL.get((batch_size, size), 'n/a')} images/s "
                  "(separate run; pass --original for a paired comparison)")


if __name__ == "__main__":
    main()
