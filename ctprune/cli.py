"""The `ctprune` command line. Each command is a small function; the work lives in the
library so every command is also a Python call."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path

from detector.layout import (
    BEST_CHECKPOINT,
    EVAL_FOLDER,
    HISTORY_FILE,
    HISTORY_TABLE,
    LAST_CHECKPOINT,
    LAST_EMA_CHECKPOINT,
    LOG_FILE,
    RECIPE_FILE,
    RESUME_FILE,
    TENSORBOARD_FOLDER,
)

from .cli_types import (
    input_side,
    int_at_least,
    non_negative_int,
    number_in,
    positive_int,
    probability,
)
from .layout import MANIFEST_FILE, REPORT_FILES, STAGE_FILE, STAGES


def _run_dir(name: str, out: Path | None) -> Path:
    """The run folder: ``out`` when given, else ``runs/<name>/`` under the current directory
    (ignored by git; ``experiments/`` holds only committed evidence). The recipe checked that
    its name is one plain folder name (not ``../x``, an absolute path or empty)."""
    return out if out is not None else Path("runs") / name


def _print_notes(lines: list[str], prefix: str = "") -> None:
    for line in lines:
        print(f"{prefix}{line}")


TRAINING_OUTPUTS = (LAST_CHECKPOINT, LAST_EMA_CHECKPOINT, BEST_CHECKPOINT, RESUME_FILE,
                    HISTORY_FILE)
"""The files that mark a folder as holding a training run (finished or partial)."""
TRAINING_FILES = (*TRAINING_OUTPUTS, RECIPE_FILE, EVAL_FOLDER, TENSORBOARD_FOLDER, HISTORY_TABLE,
                  LOG_FILE, "unlabelled_images.json")
"""Everything a training run writes into its folder: what --overwrite removes."""


def _claim_training_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder holding another run unless --resume (continue it) or
    --overwrite (remove its files first, so metrics.jsonl never mixes two runs)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite: give one (continue the run, or replace it)")
    if (out_dir / MANIFEST_FILE).is_file():
        raise ValueError(
            f"{out_dir}: holds a `ctprune run` ({MANIFEST_FILE}); train into another --out"
        )
    found = [name for name in TRAINING_OUTPUTS if (out_dir / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise ValueError(
            f"{out_dir}: holds a training run ({', '.join(found)}); add --resume to continue "
            "it, --overwrite to replace it, or choose another --out"
        )
    for name in TRAINING_FILES:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    print(f"--overwrite: removed the previous run's files from {out_dir}")


def _train(args: argparse.Namespace) -> None:
    from .lock import run_lock
    from .preflight import default_notes, preflight
    from .recipe import load_recipe, prepare_data
    from .train import train

    recipe = load_recipe(args.recipe, args.set)
    out_dir = args.out_dir = _run_dir(recipe.name, args.out)
    _print_notes(default_notes(recipe, args.set))
    preflight(recipe, out_dir, args.device, baseline_only=True)
    # Under torchrun every process runs this command; the first one owns the folder.
    first_process = os.environ.get("RANK", "0") == "0"
    with run_lock(out_dir, ["ctprune", *args.argv]) if first_process else nullcontext():
        if first_process:
            _claim_training_folder(out_dir, args.resume, args.overwrite)
        recipe = prepare_data(recipe)
        result = train(recipe.train_recipe(), out_dir, sparsity=recipe.sparsity,
                       resume=args.resume, device=args.device)
    last = result.history[-1] if result.history else {}
    metrics = {
        k: round(v, 4)
        for k, v in last.items()
        if k in ("ap", "ap50", "voc_ap50", "loss", "train_loss")
    }
    print(f"trained {result.epochs} epochs into {out_dir}: {metrics}")
    if result.best_epoch is not None:
        print(
            f"best {recipe.train.best_metric} {result.best_value:.4f} at epoch "
            f"{result.best_epoch}: {out_dir / BEST_CHECKPOINT}"
        )


def _run(args: argparse.Namespace) -> None:
    from .preflight import default_notes
    from .recipe import load_recipe
    from .run import run_recipe

    recipe = load_recipe(args.recipe, args.set)
    out_dir = args.out_dir = _run_dir(recipe.name, args.out)
    _print_notes(default_notes(recipe, args.set))
    report = run_recipe(recipe, out_dir, command=["ctprune", *args.argv], device=args.device,
                        rerun_from=args.from_stage, only=args.only)
    if report is not None:
        print((out_dir / REPORT_FILES["markdown"]).read_text())


def _check(args: argparse.Namespace) -> None:
    from .preflight import default_notes, preflight
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    out_dir = _run_dir(recipe.name, args.out)
    _print_notes(default_notes(recipe, args.set), "note: ")
    _print_notes(preflight(recipe, out_dir, args.device), "ok: ")
    print(f"{args.recipe}: ready to run into {out_dir}")


def _complete(stage_file: Path) -> bool:
    try:
        return json.loads(stage_file.read_text()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def _interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C kept, and the command that resumes."""
    out_dir = getattr(args, "out_dir", None)
    command = [arg for arg in args.argv if arg != "--overwrite"]
    if out_dir is None:
        return "nothing was started. Run again with: " + shlex.join(["ctprune", *command])
    if args.command == "train":
        last = out_dir / LAST_CHECKPOINT
        if not (out_dir / RESUME_FILE).is_file() or not last.is_file():
            restart = [arg for arg in command if arg != "--resume"]
            if any((out_dir / name).exists() for name in TRAINING_OUTPUTS):
                restart.append("--overwrite")  # the partial epoch's log would be refused
            return (f"no epoch finished, so nothing was kept in {out_dir}. Start again with: "
                    + shlex.join(["ctprune", *restart]))
        from detector.engine.fit import completed_epochs

        resume = command if "--resume" in command else [*command, "--resume"]
        return (f"kept {last} (epoch {completed_epochs(out_dir)}) and its resume state. "
                "Resume with: " + shlex.join(["ctprune", *resume]))
    finished = sorted(
        path.parent.relative_to(out_dir).as_posix() for path in out_dir.rglob(STAGE_FILE)
        if not any(part.startswith(".") for part in path.relative_to(out_dir).parts)
        and _complete(path)
    )
    kept = ", ".join(finished) if finished else "none"
    return (f"finished stages kept in {out_dir}: {kept}; the interrupted stage resumes from its "
            "last finished epoch. Resume with: " + shlex.join(["ctprune", *command]))


def _report(args: argparse.Namespace) -> None:
    from .report import build_report

    if len(args.runs) > 1 and args.out is None:
        raise ValueError("comparing several runs needs --out DIR for the combined report")
    build_report(args.runs, args.out, measure=args.measure, latency=not args.no_latency,
                 threads=args.threads)
    print(((args.out or args.runs[0]) / REPORT_FILES["markdown"]).read_text())


def _evaluate(args: argparse.Namespace) -> None:
    from detector.config import from_dict, parse_overrides
    from detector.data.sources import load_data_yaml, load_source
    from detector.evaluate.config import EvaluateConfig
    from detector.evaluate.run import evaluate_model
    from detector.inference.onnx_model import load_any_model

    # eval reads only the evaluate section: any other key would be silently ignored.
    overrides = parse_overrides(args.set, sections=("evaluate",))
    config = from_dict(EvaluateConfig, overrides.get("evaluate", {}), "evaluate")
    # A checkpoint, or an exported .onnx file run by onnxruntime through the same evaluator.
    model, model_config = load_any_model(args.checkpoint)
    source = load_source(load_data_yaml(args.data), args.split)
    if source.class_names != (model_config.class_names or source.class_names):
        raise ValueError(
            f"{args.data}: classes {source.class_names} differ from the checkpoint's "
            f"{model_config.class_names}"
        )
    out_dir = args.out or Path(args.checkpoint).parent / f"eval_{args.split}"
    device = args.device or ("cuda" if torch_cuda() else "cpu")
    metrics = evaluate_model(model, source, model_config, config, device, out_dir)
    for key in ("ap", "ap50", "ap75", "aps", "apm", "apl", "voc_ap50", "loss"):
        if key in metrics:
            print(f"{key:<9}{metrics[key]:.4f}")
    print(f"per-class table, results json and P-R curves in {out_dir}")


def _detect(args: argparse.Namespace) -> None:
    from detector.inference.predictor import Predictor

    from .detect import detect_files

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, flip=args.flip)
    written = detect_files(predictor, args.images, args.out, threshold=args.threshold,
                           batch_size=args.batch_size, show_heatmap=args.show_heatmap)
    print(f"wrote {len(written)} files with detections into {args.out}")


def _show_data(args: argparse.Namespace) -> None:
    from detector.visualize import show_data

    written = show_data(args.data, args.split, args.out, count=args.count)
    print(f"wrote {len(written)} images with ground-truth boxes and target heatmaps to {args.out}")


def _check_output_file(source: Path, out: Path, overwrite: bool) -> None:
    """An output file never replaces its input (whatever the spelling: a relative path, a
    symlink), nor an existing file unless --overwrite."""
    if out.resolve() == Path(source).resolve():
        raise ValueError(f"--out {out}: is the input checkpoint {source}; write elsewhere")
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file name")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out}: exists; add --overwrite to replace it")


def _prune(args: argparse.Namespace) -> None:
    import torch

    from detector import load_model, save_checkpoint

    from .pruning import prune_with
    from .pruning.criteria import DATA_CRITERIA

    options = prune_options(args)
    _check_output_file(args.checkpoint, args.out, args.overwrite)
    model, checkpoint = load_model(args.checkpoint)
    size = tuple(args.input_size or checkpoint.model_config.input.input_size)
    wants_data = options.criterion in DATA_CRITERIA or (
        options.allocation == "sensitivity" and options.sensitivity is None)
    if wants_data and args.data is None:
        raise ValueError(
            f"--data: the {options.criterion} criterion / {options.allocation} allocation "
            "needs calibration batches from a training split: pass --data DATA.yaml"
        )
    data = (calibration_batches(args.data, checkpoint.model_config, options.calibration_batches)
            if wants_data else None)
    result = prune_with(model, options, example_inputs=torch.zeros(1, 3, *size), data=data,
                        head=checkpoint.model_config.head)
    stats = result.stats
    meta = {
        "pruned_from": str(args.checkpoint),
        "prune": {
            "criterion": stats.criterion,
            "scope": stats.scope,
            "ratio": stats.ratio,
            "round_to": stats.round_to,
            "params_before": stats.params_before,
            "macs_before": stats.macs_before,
            "latency": stats.latency,  # with --target-latency: the realised ratio, measured
        },
    }
    save_checkpoint(args.out, result.model, checkpoint.model_config, meta=meta)
    rows = [("params (M)", stats.params_before / 1e6, stats.params_after / 1e6),
            ("state dict (MiB)", stats.mib_before, stats.mib_after),
            (f"GMACs at {size[0]}x{size[1]}", stats.macs_before / 1e9, stats.macs_after / 1e9)]
    print(f"| {stats.criterion}, {stats.scope}, ratio {stats.ratio:.3f} "
          "| before | after | change |")
    print("|---|---|---|---|")
    for name, before, after in rows:
        print(f"| {name} | {before:.2f} | {after:.2f} | {(after / before - 1) * 100:+.1f}% |")
    if stats.latency:
        print(stats.latency_line())
    print(f"pruned in {stats.seconds:.2f} s; wrote {args.out}")


def calibration_batches(data_yaml: Path, model_config, batches: int = 8, batch_size: int = 8,
                        seed: int = 0) -> list[dict]:
    """``batches`` batches of the TRAINING split of ``data_yaml`` (never the evaluated one),
    without augmentation, in a seeded order: what data-driven pruning calibrates on."""
    import itertools

    import torch
    from torch.utils.data import DataLoader

    from detector.data.dataset import CenterNetDataset, collate
    from detector.data.sources import load_data_yaml, load_source
    from detector.data.transforms import AugmentConfig

    source = load_source(load_data_yaml(data_yaml), "train")
    dataset = CenterNetDataset(source.records, model_config.num_classes, model_config.input,
                               train=True, augment=AugmentConfig(random_crop=False, flip=0.0,
                                                                 shift=0.0, scale=0.0,
                                                                 color=False),
                               seed=seed, head=model_config.head)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))
    return list(itertools.islice(loader, batches))


def _sensitivity(args: argparse.Namespace) -> None:
    from .sensitivity import PLOT_FILE, TABLE_FILE, scan

    out = args.out or Path(args.checkpoint).parent / "sensitivity"
    result = scan(args.checkpoint, args.data, out, ratios=tuple(args.ratios), images=args.images,
                  criterion=args.criterion, measure=args.measure,
                  round_to=args.round_to or None, budget_minutes=args.budget_minutes,
                  seed=args.seed)
    print((out / TABLE_FILE).read_text(), end="")
    state = "complete" if result["complete"] else "incomplete (run again to continue)"
    print(f"{result['measured']} points measured, scan {state}; wrote {out / TABLE_FILE} and "
          f"{out / PLOT_FILE}")


def add_prune_options(parser: argparse.ArgumentParser) -> None:
    """The flags of `PruneOptions`, with its defaults (``--round-to 0``: whole channels)."""
    from .pruning.options import DEFAULTS, SCOPES

    parser.add_argument("--criterion", default=DEFAULTS.criterion,
                        help="l1, l2, bn_gamma, kmeans, random, taylor or hessian (the last two "
                        f"need --data; default {DEFAULTS.criterion})")
    parser.add_argument("--ratio", type=number_in(0, 1, high_open=True),
                        help="fraction of channels to remove, per group or global, in [0, 1) "
                        f"(default {DEFAULTS.ratio} unless --target-macs is given)")
    parser.add_argument("--target-macs", type=number_in(0, 1, low_open=True),
                        help="instead of --ratio: keep this fraction of MACs")
    parser.add_argument("--scope", default=DEFAULTS.scope, choices=SCOPES)
    parser.add_argument("--max-layer-ratio", type=number_in(0, 1, low_open=True, high_open=True),
                        default=DEFAULTS.max_layer_ratio,
                        help=f"the most any group may lose (default {DEFAULTS.max_layer_ratio})")
    parser.add_argument("--round-to", type=non_negative_int, default=DEFAULTS.round_to,
                        help=f"keep multiples of this (default {DEFAULTS.round_to}; "
                             "0: no rounding)")
    parser.add_argument("--allocation", default=DEFAULTS.allocation,
                        choices=("uniform", "sensitivity"),
                        help="uniform ratio, or per-group widths from measured sensitivity "
                        "(needs a --target-* budget and --data)")
    parser.add_argument("--target-params", type=number_in(0, 1, low_open=True),
                        help="instead of --ratio: keep this fraction of parameters")
    parser.add_argument("--target-latency", type=number_in(0, 1, low_open=True),
                        help="instead of --ratio: keep this fraction of the latency on --runtime")
    parser.add_argument("--runtime", default=DEFAULTS.runtime,
                        choices=("torch", "onnxruntime", "cuda"),
                        help=f"the latency budget's runtime (default {DEFAULTS.runtime})")
    parser.add_argument("--threads", type=positive_int, default=DEFAULTS.threads,
                        help=f"the latency budget's threads (default {DEFAULTS.threads})")
    parser.add_argument("--sensitivity", help="with --allocation sensitivity: a sensitivity.json "
                        "of `ctprune sensitivity` to allocate from (default: measure)")


def prune_options(args: argparse.Namespace):
    """The `PruneOptions` that `add_prune_options`' flags give."""
    from .pruning import PruneOptions
    from .pruning.options import DEFAULTS

    ratio = args.ratio
    if ratio is None and args.target_macs is None and args.target_params is None and (
        args.target_latency is None
    ):
        ratio = DEFAULTS.ratio
    return PruneOptions(criterion=args.criterion, ratio=ratio, target_macs=args.target_macs,
                        scope=args.scope, max_layer_ratio=args.max_layer_ratio,
                        round_to=args.round_to or None, allocation=args.allocation,
                        target_params=args.target_params, target_latency=args.target_latency,
                        runtime=args.runtime, threads=args.threads,
                        sensitivity=args.sensitivity)


def _export(args: argparse.Namespace) -> None:
    from detector import load_model
    from detector.export import export_onnx, export_pt2, output_names

    out = args.out or Path(args.checkpoint).with_suffix(f".{args.format}")
    _check_output_file(args.checkpoint, out, args.overwrite)
    model, checkpoint = load_model(args.checkpoint)
    options = dict(decode=args.decode, max_detections=args.max_detections, dynamic=args.dynamic,
                   raw_pixels=args.raw_pixels,
                   input_size=tuple(args.input_size) if args.input_size else None,
                   head=checkpoint.model_config.head)
    if args.format == "onnx":
        path = export_onnx(out, model, checkpoint.model_config.input,
                           model_config=checkpoint.model_config, precision=args.precision,
                           **options)
    elif args.precision != "fp32":
        raise ValueError(f"--precision {args.precision}: only with --format onnx")
    else:
        path = export_pt2(out, model, checkpoint.model_config.input, **options)
    outputs = ("detections (B, K, 6) in input pixels" if args.decode
               else ", ".join(output_names(False, checkpoint.model_config.head)))
    print(f"wrote {path}: input images (B, 3, H, W), outputs {outputs}")


def _quantize(args: argparse.Namespace) -> None:
    from detector.data.sources import load_data_yaml, load_source

    from .quantize import INT8_FILE, QuantizeConfig, quantize_checkpoint

    config = QuantizeConfig(calibration=args.calibration, images=args.images,
                            percentile=args.percentile, reduce_range=args.reduce_range,
                            runtime=args.runtime)
    if args.out.is_file():
        raise ValueError(f"--out {args.out}: is a file; give a folder")
    if (args.out / INT8_FILE).exists() and not args.overwrite:
        raise ValueError(f"--out {args.out}: holds {INT8_FILE}; add --overwrite to replace it")
    # Calibration reads the training split only: the evaluation must not have seen its images.
    source = load_source(load_data_yaml(args.data), "train")
    result = quantize_checkpoint(args.checkpoint, source, config, args.out)
    summary = result.summary
    print(f"{summary['reduce_range_reason']}")
    print(f"calibrated on {summary['images']} training images at "
          f"{summary['input_size'][0]}x{summary['input_size'][1]} ({summary['calibration']}); "
          f"{summary['nodes']['QuantizeLinear']} QuantizeLinear nodes, "
          f"{len(summary['float_nodes'])} nodes kept in float")
    print(f"wrote {result.int8_path} (and {result.fp32_path.name} beside it); evaluate it "
          f"with: ctprune eval {result.int8_path} --data {args.data}")


def _bench(args: argparse.Namespace) -> None:
    from .bench import bench_checkpoints, format_bench

    rows = bench_checkpoints(args.checkpoints, input_size=args.input, threads=args.threads,
                             runtime=args.runtime, rounds=args.rounds, device=args.device,
                             compile=args.compile, spinning=args.spinning)
    print(format_bench(rows))


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _print_input_lines(config, path) -> None:
    spec = config.input
    names = config.class_names or []
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    print(f"checkpoint   {path}")
    print(f"arch         {config.arch}  (head {config.head}, head_conv {config.head_conv}, "
          f"widths {config.widths})")
    print(f"classes      {config.num_classes}" + (f": {shown}" if names else ""))
    print(
        f"input        {spec.color_order}, mean {list(spec.mean)}, std {list(spec.std)}, "
        f"size {list(spec.input_size)}, "
        + (f"keep-resolution (pad {spec.pad})" if spec.keep_resolution else "fixed resolution")
        + f", down ratio {spec.down_ratio}"
    )


def _info_onnx(args: argparse.Namespace) -> None:
    import onnx

    from detector.inference.onnx_model import read_onnx_metadata

    info = read_onnx_metadata(args.checkpoint)
    _print_input_lines(info.model_config, args.checkpoint)
    graph = info.graph
    print(f"graph        ONNX, outputs {', '.join(graph['outputs'])}"
          + (", takes raw 0-255 pixels" if graph.get("raw_pixels") else ""))
    print(f"precision    {info.precision}")
    params = "–" if info.params is None else f"{info.params:,} (of the fp32 model)"
    print(f"params       {params}")
    print(f"size         {info.size_mib:.2f} MiB (file on disk)")
    quantization = graph.get("quantization")
    if quantization:
        print(f"quantization {quantization['format']}, weights {quantization['weights']}, "
              f"activations {quantization['activations']}, {quantization['calibration']} "
              f"calibration on {quantization['images']} training images, "
              f"reduce range {'on' if quantization['reduce_range'] else 'off'}")
        print(f"kept float   {', '.join(quantization['float_nodes'])}")
    nodes = onnx.load(str(args.checkpoint), load_external_data=False).graph.node
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    print("nodes        " + ", ".join(f"{op} {count}" for op, count in sorted(counts.items())))


def _info(args: argparse.Namespace) -> None:
    import torch

    from detector import count_macs, count_parameters, load_model, state_dict_mib
    from detector.checkpoint import build_from_config
    from detector.inference.onnx_model import is_onnx_file

    if is_onnx_file(args.checkpoint):
        _info_onnx(args)
        return
    model, checkpoint = load_model(args.checkpoint)
    config = checkpoint.model_config
    spec = config.input
    size = tuple(args.input_size or spec.input_size)
    with torch.device("meta"):
        base = build_from_config(config)
    base_params = count_parameters(base)
    params = count_parameters(model)
    _print_input_lines(config, args.checkpoint)
    plan = checkpoint.channel_plan
    if plan:
        print(
            f"channel plan {len(plan)} layers resized; "
            f"params {params / base_params:.1%} of the base"
        )
    else:
        print("channel plan none (unpruned)")
    print(f"params       {params:,}")
    print(f"size         {state_dict_mib(model):.2f} MiB (fp32 state dict)")
    print(f"compute      {count_macs(model, size) / 1e9:.3g} GMACs at {size[0]}x{size[1]}")
    for key, value in sorted(checkpoint.meta.items()):
        print(f"{'meta.' + key:<12} {value}")


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


def _make_convert(args: argparse.Namespace) -> None:
    from detector.data.convert import convert_data

    data_file = convert_data(args.source, args.out_dir, args.to)
    print(f"wrote a {args.to} data set: {data_file}")


def add_recipe_arguments(parser: argparse.ArgumentParser, set_example: str) -> None:
    """The arguments of the commands that read a recipe: train, run and check."""
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override a recipe value, e.g. --set {set_example}")
    parser.add_argument("--out", type=Path, help="run folder (default ./runs/<recipe name>)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    from detector.data.shapes import MIN_IMAGE_SIZE

    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ctprune", description="Compress CenterNet detectors: prune, distil, evaluate."
    )
    parser.add_argument("--version", action="version", version=f"ctprune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a recipe's baseline (model, data, train, evaluate, sparsity)"
    )
    add_recipe_arguments(train, "train.epochs=10")
    train.add_argument("--resume", action="store_true", help="continue the run in the run folder")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the training run already in the run folder")
    train.set_defaults(run=_train)

    run = commands.add_parser(
        "run", help="run a recipe: baseline -> prune -> fine-tune -> evaluate -> report"
    )
    add_recipe_arguments(run, "prune.ratio=0.3")
    run.add_argument(
        "--from",
        dest="from_stage",
        choices=STAGES,
        help="run this stage and every later one again, even when done",
    )
    run.add_argument("--only", choices=STAGES,
                     help="run only this stage (the stages before it must be done)")
    run.set_defaults(run=_run)

    check = commands.add_parser(
        "check", help="check a recipe before running it: device, data, checkpoints, disk"
    )
    add_recipe_arguments(check, "prune.ratio=0.3")
    check.set_defaults(run=_check)

    report = commands.add_parser(
        "report", help="rebuild or compare run reports from their artifacts"
    )
    report.add_argument("runs", type=Path, nargs="+")
    report.add_argument(
        "--out", type=Path, help="folder for a combined report (default: the run folder)"
    )
    report.add_argument("--measure", action="store_true",
                        help="measure every stage's model again (size, MACs and latency, each "
                        "model interleaved with its run's baseline) instead of reading the "
                        "figures each stage stored when it finished")
    report.add_argument("--threads", type=positive_int,
                        help="CPU threads for the latency the report measures itself")
    report.add_argument("--no-latency", action="store_true",
                        help="time nothing here (latencies stored by the stages are still shown)")
    report.set_defaults(run=_report)

    evaluate = commands.add_parser(
        "eval", help="COCO and VOC metrics of a checkpoint (or .onnx file) on a data split"
    )
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--data", required=True, type=Path, help="a data.yaml")
    evaluate.add_argument("--split", default="val", choices=("train", "val"))
    evaluate.add_argument("--set", action="append", default=[], metavar="evaluate.KEY=VALUE",
                          help="e.g. --set evaluate.flip=true --set evaluate.scales=[0.5,1,1.5]")
    evaluate.add_argument("--out", type=Path, help="report folder (default: beside the checkpoint)")
    evaluate.add_argument("--device")
    evaluate.set_defaults(run=_evaluate)

    detect = commands.add_parser(
        "detect", help="draw a checkpoint's detections on images, folders, globs and videos"
    )
    detect.add_argument("checkpoint", type=Path)
    detect.add_argument("images", nargs="+", metavar="INPUT",
                        help="image or video files (.mp4, .avi, ...), folders (searched "
                        "recursively) or quoted globs ('shots/**/*.jpg')")
    detect.add_argument("--out", required=True, type=Path,
                        help="output folder; outputs mirror the inputs' folders below their "
                        "common folder, a video comes out as an mp4")
    detect.add_argument("--batch-size", type=positive_int, default=8,
                        help="images (or video frames) per forward pass")
    detect.add_argument("--threshold", type=probability, default=0.3,
                        help="minimum score drawn, in [0, 1]")
    detect.add_argument("--flip", action="store_true", help="flip test")
    detect.add_argument(
        "--show-heatmap", action="store_true",
        help="also write the heatmap overlay (images, not videos)"
    )
    detect.add_argument("--device")
    detect.set_defaults(run=_detect)

    show = commands.add_parser("show-data", help="draw ground-truth boxes and target heatmaps")
    show.add_argument("data", type=Path, help="a data.yaml")
    show.add_argument("--split", default="train", choices=("train", "val"))
    show.add_argument("--out", required=True, type=Path)
    show.add_argument("--count", type=positive_int, default=8, help="images to draw")
    show.set_defaults(run=_show_data)

    prune = commands.add_parser("prune", help="remove channels from a checkpoint's model")
    prune.add_argument("checkpoint", type=Path)
    add_prune_options(prune)
    prune.add_argument(
        "--input-size",
        type=input_side,
        nargs=2,
        metavar=("H", "W"),
        help="for MACs (default: the model's)",
    )
    prune.add_argument("--data", type=Path,
                       help="a data.yaml whose TRAINING split calibrates the taylor criterion "
                       "and the sensitivity allocation")
    prune.add_argument("--out", required=True, type=Path)
    prune.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    prune.set_defaults(run=_prune)

    sensitivity = commands.add_parser(
        "sensitivity", help="per-group sensitivity curves of a checkpoint (AP50 or output drift "
        "on training images), cached and resumable")
    sensitivity.add_argument("checkpoint", type=Path)
    sensitivity.add_argument("--data", required=True, type=Path,
                             help="a data.yaml; calibration images come from its TRAINING split")
    sensitivity.add_argument("--out", type=Path,
                             help="output folder (default: <checkpoint folder>/sensitivity)")
    sensitivity.add_argument("--ratios", type=number_in(0, 0.95, low_open=True), nargs="+",
                             default=[0.25, 0.5, 0.75],
                             help="fractions of each group's channels to remove")
    sensitivity.add_argument("--images", type=positive_int, default=64,
                             help="calibration images sampled from the training split")
    sensitivity.add_argument("--criterion", default="l1", choices=("l1", "l2", "bn_gamma",
                                                                   "random"))
    sensitivity.add_argument("--measure", default="ap50", choices=("ap50", "drift"),
                             help="AP50 lost, or output drift (no labels needed)")
    sensitivity.add_argument("--round-to", type=non_negative_int, default=0,
                             help="round kept widths to multiples of this (0: whole channels)")
    sensitivity.add_argument("--budget-minutes", type=number_in(0, 1e6, low_open=True),
                             help="stop after this long; a second run continues")
    sensitivity.add_argument("--seed", type=non_negative_int, default=0)
    sensitivity.set_defaults(run=_sensitivity)

    info = commands.add_parser(
        "info", help="describe a checkpoint or .onnx file: arch, input, plan, size, MACs")
    info.add_argument("checkpoint", type=Path)
    info.add_argument("--input-size", type=input_side, nargs=2, metavar=("H", "W"))
    info.set_defaults(run=_info)

    export = commands.add_parser("export", help="write a checkpoint as ONNX or torch.export")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("--format", required=True, choices=("onnx", "pt2"))
    export.add_argument("--out", type=Path, help="output file (default: beside the checkpoint)")
    export.add_argument("--decode", action="store_true",
                        help="decode in the graph: (B, K, 6) detections")
    export.add_argument("--max-detections", type=positive_int, default=100,
                        help="K of --decode")
    export.add_argument("--dynamic", action="store_true",
                        help="free batch and image sides (multiples of the spec's pad + 1)")
    export.add_argument("--raw-pixels", action="store_true",
                        help="the graph normalises 0-255 pixels itself")
    export.add_argument("--input-size", type=input_side, nargs=2, metavar=("H", "W"),
                        help="trace size (default: the model's)")
    export.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                        help="ONNX weights and arithmetic (fp16: the heads' last convs and the "
                        "decoding stay fp32; input and outputs stay float32)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output")
    export.set_defaults(run=_export)

    from .quantize import CALIBRATIONS, MAX_CALIBRATION_IMAGES, REDUCE_RANGE, RUNTIMES

    quantize = commands.add_parser(
        "quantize", help="INT8 post-training quantization (onnxruntime, QDQ) of a checkpoint"
    )
    quantize.add_argument("checkpoint", type=Path)
    quantize.add_argument("--data", required=True, type=Path,
                          help="a data.yaml: its train split is calibrated on (never val)")
    quantize.add_argument("--calibration", default="minmax", choices=CALIBRATIONS)
    quantize.add_argument("--images", type=int_at_least(1), default=64,
                          help=f"calibration images, at most {MAX_CALIBRATION_IMAGES}")
    quantize.add_argument("--percentile", type=number_in(90, 100, low_open=True),
                          default=99.999, help="with --calibration percentile, in (90, 100]")
    quantize.add_argument("--reduce-range", default="auto", choices=REDUCE_RANGE,
                          help="7-bit weights; auto: on exactly when the CPU lacks VNNI")
    quantize.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES)
    quantize.add_argument("--out", required=True, type=Path,
                          help="folder for model.fp32.onnx, model.int8.onnx and quantize.json")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing output")
    quantize.set_defaults(run=_quantize)

    bench = commands.add_parser("bench", help="deployed latency of checkpoints, interleaved")
    bench.add_argument("checkpoints", type=Path, nargs="+")
    bench.add_argument("--input", type=input_side, default=512,
                       help="square input side in pixels")
    bench.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's)")
    bench.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime"))
    bench.add_argument("--rounds", type=positive_int, default=10,
                       help="interleaved timed rounds")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--no-compile", dest="compile", action="store_false",
                       help="torch path without torch.compile (BN folding and channels-last only)")
    bench.add_argument("--no-spin", dest="spinning", action="store_false",
                       help="onnxruntime's idle threads sleep instead of spinning (a shared or "
                            "small CPU; for torch set OMP_WAIT_POLICY=PASSIVE)")
    bench.set_defaults(run=_bench)

    original = commands.add_parser(
        "import-original", help="convert a checkpoint of the original CenterNet or TTFNet code"
    )
    original.add_argument("checkpoint", type=Path)
    original.add_argument("--arch", required=True)
    original.add_argument("--out", required=True, type=Path)
    original.add_argument("--input-size", type=input_side, nargs=2, default=(512, 512),
                          metavar=("H", "W"))
    original.set_defaults(run=_import_original)

    make_data = commands.add_parser("make-data", help="generate or split data sets")
    kinds = make_data.add_subparsers(dest="kind", required=True, metavar="KIND")
    shapes = kinds.add_parser("shapes", help="generate the frozen synthetic benchmark")
    shapes.add_argument("out_dir", type=Path)
    shapes.add_argument("--train", type=positive_int, default=2000, help="training images")
    shapes.add_argument("--val", type=positive_int, default=500, help="validation images")
    shapes.add_argument("--size", type=int_at_least(MIN_IMAGE_SIZE), default=128,
                        help=f"image side in pixels (>= {MIN_IMAGE_SIZE})")
    shapes.add_argument("--seed", type=non_negative_int, default=0)
    shapes.set_defaults(run=_make_shapes)
    split = kinds.add_parser("split", help="split one COCO annotation file into train and val")
    split.add_argument("annotations", type=Path)
    split.add_argument("out_dir", type=Path)
    split.add_argument("--val-fraction", type=number_in(0, 1, low_open=True, high_open=True),
                       default=0.1, help="share of the images put in val, in (0, 1)")
    split.add_argument("--seed", type=non_negative_int, default=0)
    split.set_defaults(run=_make_split)
    convert = kinds.add_parser("convert", help="convert a data set between COCO and YOLO")
    convert.add_argument("source", type=Path, help="a data.yaml (coco, voc or yolo)")
    convert.add_argument("out_dir", type=Path, help="a new (or empty) folder")
    convert.add_argument("--to", required=True, choices=("coco", "yolo"))
    convert.set_defaults(run=_make_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from detector.engine.fit import TrainingDiverged
    from detector.engine.logs import console_logging

    from .lock import RunLocked

    try:
        with console_logging():
            args.run(args)
    except (ValueError, OSError, KeyError, TrainingDiverged, RunLocked) as error:
        # User mistakes (bad paths, files and values) and a diverged training run surface as
        # one clear line; set CTPRUNE_DEBUG=1 for the traceback.
        if os.environ.get("CTPRUNE_DEBUG"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"ctprune {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("CTPRUNE_DEBUG"):
            raise
        print(f"\ninterrupted: {_interrupted(args)}", file=sys.stderr)
        return 130
    return 0
