"""Training-step cost of each head type on one trunk: what an epoch of each costs, paired.

One step = the head type's targets for a batch (its own encoder, as the data loader runs it),
forward under bf16 autocast, its loss, backward and an Adam update, for a resunet18 trunk with
each head of `detector.heads.HEADS` (6 classes, batch 8 at 128 px: the synthetic benchmark's
studies). The head types run interleaved in one process (round-robin after warm-up) and are
compared as ratios of per-round medians against the centernet head, so the shared machine's
noise cancels; the triplet study sets its epoch budget from these ratios.

    python experiments/bench/head_types/run.py                 # 2 threads, 20 rounds
    python experiments/bench/head_types/run.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from detector import build_model
from detector.heads import HEADS

NUM_CLASSES = 6
SIZE = 128
BATCH = 8
DOWN_RATIO = 4


def example_boxes(generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Four boxes of 12-64 input pixels (the benchmark's range), in output-map cells."""
    corners = generator.uniform(0, SIZE - 64, (4, 2))
    sides = generator.uniform(12, 64, (4, 2))
    boxes = np.concatenate([corners, corners + sides], axis=1) / DOWN_RATIO
    return boxes.astype(np.float32), generator.integers(0, NUM_CLASSES, 4)


def step_function(head: str):
    """One training step of a fresh resunet18 model with ``head``, as a closure."""
    torch.manual_seed(0)
    model = build_model("resunet18", NUM_CLASSES, head=head).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    entry = HEADS[head]
    generator = np.random.default_rng(0)
    images = torch.randn(BATCH, 3, SIZE, SIZE).to(memory_format=torch.channels_last)
    output_size = (SIZE // DOWN_RATIO, SIZE // DOWN_RATIO)

    def step() -> None:
        targets = [entry.encode_targets(*example_boxes(generator), NUM_CLASSES, output_size)
                   for _ in range(BATCH)]
        batch = {key: torch.stack([torch.from_numpy(t[key]) for t in targets])
                 for key in targets[0]}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(images)
        outputs = [{key: value.float() for key, value in stack.items()} for stack in outputs]
        loss, _ = entry.loss(outputs, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = {head: step_function(head) for head in HEADS}
    seconds: dict[str, list[float]] = {head: [] for head in HEADS}
    for round_index in range(args.warmup + args.rounds):
        for head, step in steps.items():
            started = time.perf_counter()
            step()
            if round_index >= args.warmup:
                seconds[head].append(time.perf_counter() - started)
    reference = statistics.median(seconds["centernet"])
    print(f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"{args.rounds} rounds after {args.warmup} warm-up")
    print("| head | median step (s) | images/s | x centernet |")
    print("|---|---|---|---|")
    for head, values in seconds.items():
        median = statistics.median(values)
        print(f"| {head} | {median:.3f} | {BATCH / median:.1f} | {median / reference:.2f} |")


if __name__ == "__main__":
    main()
