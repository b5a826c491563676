"""The `ctprune` command line. Each command is a small function; the work lives in the
library so every command is also a Python call."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch


def _info(args: argparse.Namespace) -> None:
    from detector import count_macs, count_parameters, load_model, state_dict_mib
    from detector.checkpoint import build_from_config

    model, checkpoint = load_model(args.checkpoint)
    config = checkpoint.model_config
    spec = config.input
    size = tuple(args.input_size or spec.input_size)
    with torch.device("meta"):
        base = build_from_config(config)
    base_params = count_parameters(base)
    params = count_parameters(model)
    names = config.class_names or []
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    print(f"checkpoint   {args.checkpoint}")
    print(f"arch         {config.arch}  (head_conv {config.head_conv}, widths {config.widths})")
    print(f"classes      {config.num_classes}" + (f": {shown}" if names else ""))
    print(
        f"input        {spec.color_order}, mean {list(spec.mean)}, std {list(spec.std)}, "
        f"size {list(spec.input_size)}, "
        + (f"keep-resolution (pad {spec.pad})" if spec.keep_resolution else "fixed resolution")
        + f", down ratio {spec.down_ratio}"
    )
    plan = checkpoint.channel_plan
    if plan:
        print(f"channel plan {len(plan)} layers resized; params {params / base_params:.1%} of the base")
    else:
        print("channel plan none (unpruned)")
    print(f"params       {params:,}")
    print(f"size         {state_dict_mib(model):.2f} MiB (fp32 state dict)")
    print(f"compute      {count_macs(model, size) / 1e9:.3g} GMACs at {size[0]}x{size[1]}")
    for key, value in sorted(checkpoint.meta.items()):
        print(f"meta.{key:<8}{value}")


def _import_original(args: argparse.Namespace) -> None:
    from detector.original import import_original_checkpoint

    path = import_original_checkpoint(
        args.checkpoint, args.arch, args.out, input_size=tuple(args.input_size)
    )
    print(f"wrote {path}")


def _make_shapes(args: argparse.Namespace) -> None:
    from detector.data.shapes import generate_shapes

    summary = generate_shapes(
        args.out_dir, num_train=args.train, num_val=args.val, image_size=args.size, seed=args.seed
    )
    print(f"synthetic benchmark in {args.out_dir}: {summary}")


def _make_split(args: argparse.Namespace) -> None:
    from detector.data.split import split_coco

    train, val = split_coco(args.annotations, args.out_dir, args.val_fraction, args.seed)
    print(f"wrote {train} and {val}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ctprune", description="Compress CenterNet detectors: prune, distil, evaluate."
    )
    parser.add_argument("--version", action="version", version=f"ctprune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="describe a checkpoint: arch, input, plan, size, MACs")
    info.add_argument("checkpoint", type=Path)
    info.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"))
    info.set_defaults(run=_info)

    original = commands.add_parser(
        "import-original", help="convert a checkpoint of the original CenterNet code"
    )
    original.add_argument("checkpoint", type=Path)
    original.add_argument("--arch", required=True)
    original.add_argument("--out", required=True, type=Path)
    original.add_argument("--input-size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    original.set_defaults(run=_import_original)

    make_data = commands.add_parser("make-data", help="generate or split data sets")
    kinds = make_data.add_subparsers(dest="kind", required=True, metavar="KIND")
    shapes = kinds.add_parser("shapes", help="generate the frozen synthetic benchmark")
    shapes.add_argument("out_dir", type=Path)
    shapes.add_argument("--train", type=int, default=2000, help="training images")
    shapes.add_argument("--val", type=int, default=500, help="validation images")
    shapes.add_argument("--size", type=int, default=128, help="image side in pixels")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.set_defaults(run=_make_shapes)
    split = kinds.add_parser("split", help="split one COCO annotation file into train and val")
    split.add_argument("annotations", type=Path)
    split.add_argument("out_dir", type=Path)
    split.add_argument("--val-fraction", type=float, default=0.1)
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(run=_make_split)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, KeyError) as error:
        # User mistakes (bad paths, bad files, bad values) surface as one clear line; set
        # CTPRUNE_DEBUG=1 for the traceback.
        if os.environ.get("CTPRUNE_DEBUG"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"ctprune {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
