"""How well the latency model (ctprune/pruning/latency.py) predicts whole pruned models.

Builds an architecture at full width (random weights: latency does not depend on them),
calibrates the latency model on it (per-layer table, parent and a half-width probe), then draws
random plans (every group a random ratio in [0, max_ratio], rounded to --round-to) and compares
the predicted latency with the measured one (each plan timed interleaved with the parent).

    python experiments/bench/latency_model/run.py [--arch resunet18] [--size 256] [--threads 1]
        [--runtime torch] [--plans 5] [--out runs/latency_model]

Prints a table and writes <out>/results.json (the machine key, per plan the MAC fraction, the
predicted and measured milliseconds and the error). The cache of layer timings goes under <out>
too, so a second run reuses it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from ctprune.pruning import prune
from ctprune.pruning.latency import LatencyModel, LatencyTable, measure_model_ms
from detector import build_model, layer_widths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resunet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime", "cuda"))
    parser.add_argument("--plans", type=int, default=5)
    parser.add_argument("--max-ratio", type=float, default=0.75)
    parser.add_argument("--round-to", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/latency_model"))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    size = (args.size, args.size)
    example = torch.zeros(1, 3, *size)
    model = build_model(args.arch, 3).eval()
    started = time.perf_counter()
    table = LatencyTable(args.runtime, args.threads, size, cache_dir=args.out / "cache")
    halved = prune(model, 0.5, "l1", example_inputs=example, round_to=args.round_to).model
    latency = LatencyModel.calibrate(model, table, probe=halved)
    calibrated = time.perf_counter() - started
    groups = [entry["name"] for entry in prune(model, 0.0, "l1", example_inputs=example,
                                               round_to=args.round_to).stats.groups]
    rng = random.Random(args.seed)
    rows = []
    for index in range(args.plans):
        overrides = {name: rng.uniform(0, args.max_ratio) for name in groups}
        result = prune(model, 0.0, "random", example_inputs=example, round_to=args.round_to,
                       ratio_overrides=overrides)
        predicted = latency.predict_ms(table, layer_widths(result.model))
        measured = measure_model_ms(model, args.runtime, args.threads, size,
                                    others={"plan": result.model})
        scale = latency.parent_ms / measured["model"]  # the parent's drift since calibration
        rows.append({
            "plan": index,
            "macs_fraction": result.stats.macs_after / result.stats.macs_before,
            "predicted_ms": predicted,
            "measured_ms": measured["plan"],
            "error": predicted / measured["plan"] - 1,
            "error_drift_corrected": predicted / (measured["plan"] * scale) - 1,
            "parent_ms_now": measured["model"],
        })
        print(f"plan {index}: MACs {rows[-1]['macs_fraction']:.3f}, predicted {predicted:.2f} "
              f"ms, measured {measured['plan']:.2f} ms, error {rows[-1]['error']:+.1%}")
    table.save()
    errors = [abs(row["error"]) for row in rows]
    summary = {"mean_abs_error": statistics.mean(errors), "max_abs_error": max(errors),
               "calibration_s": calibrated, "table_entries": len(table.entries),
               "parent_ms": latency.parent_ms}
    print(f"mean |error| {summary['mean_abs_error']:.1%}, max {summary['max_abs_error']:.1%}; "
          f"calibration {calibrated:.1f} s, {len(table.entries)} layer timings")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"machine": table.key, "arch": args.arch, "summary": summary, "plans": rows}, indent=1))


if __name__ == "__main__":
    main()
