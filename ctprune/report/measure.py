"""Measuring stage models: size, compute, precision and CPU latency, timed through
`ctprune.bench.interleaved_times` (the one latency timer).

A quantize stage's model is an ONNX file (stage.json ``model_file``): its figures are the
file's (`onnx_figures`: precision int8, the ``params`` and GMACs of its fp32 twin, its size on
disk) and its latency is onnxruntime's, timed interleaved with the baseline exported to fp32
ONNX (and with its own fp32 twin, ``twin_latency_ms``): the speed-up of pruning and INT8
together, within one runtime.

Figures are measured once, when `ctprune run` finishes a stage (`stage_figures`, stored in the
stage's stage.json under ``figures``), and read back by the report; `run_figures` measures a
run again only when asked (``ctprune report --measure``) or when a stage predates stored
figures. Either way each model is timed interleaved with its run's baseline, so a slow spell
on a shared machine slows both sides of the comparison alike and their ratio stays fair.
"""

from __future__ import annotations

import hashlib
import statistics
from pathlib import Path

import torch
from torch import nn

from detector import count_macs, count_parameters, load_model, state_dict_mib

from ..bench import interleaved_times, torch_runner, torch_threads
from ..layout import CHECKPOINT_FILE
from .artifacts import RunArtifacts

PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# The first call allocates buffers and picks kernels: not what a deployed model pays.
WARMUP_CALLS = 1


def precision_of(model: nn.Module) -> str:
    """The number format of the model's weights: fp32, bf16, fp16 (torch's name otherwise)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return PRECISIONS.get(dtype, str(dtype).removeprefix("torch."))


def architecture_digest(model: nn.Module) -> str:
    """A digest of the state dict's names and shapes: equal for two models exactly when they
    share architecture and layer widths (the speed-up column compares it with the baseline's)."""
    shapes = "\n".join(f"{name}:{tuple(tensor.shape)}"
                       for name, tensor in model.state_dict().items())
    return hashlib.sha256(shapes.encode()).hexdigest()[:16]


def model_figures(model: nn.Module, input_size: tuple[int, int]) -> dict:
    """Precision, parameters, state-dict MiB, GMACs of one forward at ``input_size`` (height,
    width) and batch 1, and the architecture digest."""
    return {
        "precision": precision_of(model),
        "params": count_parameters(model),
        "size_mib": state_dict_mib(model),
        "gmacs": count_macs(model, input_size) / 1e9,
        "architecture": architecture_digest(model),
    }


def latencies_ms(models: dict[str, nn.Module], input_size: tuple[int, int],
                 repeats: int) -> dict[str, float]:
    """Median CPU milliseconds of one batch-1 eager forward at ``input_size`` per model, the
    models timed interleaved round by round (`interleaved_times`) after one warm-up each."""
    images = torch.zeros(1, 3, *input_size)
    runners = {name: torch_runner(model.eval(), channels_last=False)
               for name, model in models.items()}
    seconds = interleaved_times(runners, images, rounds=repeats, warmup=WARMUP_CALLS)
    return {name: statistics.median(times) * 1e3 for name, times in seconds.items()}


def paired_latency(baseline: nn.Module, model: nn.Module, input_size: tuple[int, int],
                   repeats: int) -> tuple[float, float]:
    """Median milliseconds of ``baseline`` and ``model``, timed interleaved."""
    medians = latencies_ms({"baseline": baseline, "model": model}, input_size, repeats)
    return medians["baseline"], medians["model"]


def load_stage_model(folder: Path,
                     input_size: list[int] | None) -> tuple[nn.Module, tuple[int, int]]:
    """The model in ``folder/checkpoint.pt`` (CPU, eval mode) and its input size (height,
    width): ``input_size`` (stage.json's), else the checkpoint's."""
    model, checkpoint = load_model(folder / CHECKPOINT_FILE)
    size = input_size or checkpoint.model_config.input.input_size
    return model.eval(), (int(size[0]), int(size[1]))


def onnx_figures(path: Path, input_size: tuple[int, int]) -> dict:
    """`model_figures` of an exported file with ctprune metadata: its precision, the params of
    its fp32 model, its size on disk, its GMACs at ``input_size`` (the metadata's, scaled by
    the image area) and an architecture digest that differs from the fp32 model's (the
    report's speed-up column compares architectures)."""
    from detector.inference.onnx_model import read_onnx_metadata

    info = read_onnx_metadata(path)
    height, width = info.graph["input_size"]
    macs = info.graph["macs"] * input_size[0] * input_size[1] / (height * width)
    digest = hashlib.sha256(f"{info.precision}:{info.graph}".encode()).hexdigest()[:16]
    return {"precision": info.precision, "params": info.params, "size_mib": info.size_mib,
            "gmacs": macs / 1e9, "architecture": f"{info.precision}:{digest}"}


def onnx_latencies_ms(files: dict[str, Path], baseline: nn.Module | None, spec,
                      input_size: tuple[int, int], repeats: int,
                      threads: int | None) -> dict[str, float]:
    """Median onnxruntime milliseconds of each file in ``files`` and (name ``baseline``) of
    ``baseline`` exported to fp32 ONNX at ``input_size``, timed interleaved round by round."""
    import tempfile

    from detector.export import export_onnx, onnx_session

    images = torch.zeros(1, 3, *input_size)
    with tempfile.TemporaryDirectory() as folder:
        if baseline is not None:
            files = {"baseline": export_onnx(Path(folder) / "baseline.onnx", baseline, spec,
                                             input_size=input_size), **files}
        sessions = {name: onnx_session(path, threads=threads) for name, path in files.items()}
        runners = {name: (lambda array, session=session: session.run(
            None, {session.get_inputs()[0].name: array.numpy()}))
            for name, session in sessions.items()}
        seconds = interleaved_times(runners, images, rounds=repeats, warmup=WARMUP_CALLS)
    return {name: statistics.median(times) * 1e3 for name, times in seconds.items()}


def _onnx_stage_figures(folder: Path, model_file: str, size: tuple[int, int], *, latency: bool,
                        repeats: int, threads: int | None,
                        baseline_folder: Path | None) -> dict:
    from ..quantize import FP32_FILE

    figures = {**onnx_figures(folder / model_file, size), "latency_ms": None,
               "baseline_latency_ms": None, "twin_latency_ms": None, "threads": None,
               "latency_repeats": None, "runtime": "onnxruntime"}
    if not latency:
        return figures
    files = {"model": folder / model_file}
    if (folder / FP32_FILE).is_file() and model_file != FP32_FILE:
        files["twin"] = folder / FP32_FILE
    baseline, spec = None, None
    if baseline_folder is not None:
        baseline, _ = load_stage_model(baseline_folder, list(size))
        spec = load_model(baseline_folder / CHECKPOINT_FILE)[1].model_config.input
    with torch_threads(threads):
        medians = onnx_latencies_ms(files, baseline, spec, size, repeats, threads)
        figures["threads"] = threads or torch.get_num_threads()
    figures["latency_ms"] = medians["model"]
    figures["twin_latency_ms"] = medians.get("twin")
    figures["baseline_latency_ms"] = medians.get("baseline")
    figures["latency_repeats"] = repeats
    return figures


def stage_figures(folder: Path, input_size: list[int] | None, *, latency: bool, repeats: int,
                  threads: int | None, baseline_folder: Path | None = None,
                  model_file: str = CHECKPOINT_FILE) -> dict:
    """What `ctprune run` stores in a finished stage's stage.json under ``figures``:
    `model_figures` of its checkpoint and, with ``latency``, its ``latency_ms``, timed
    interleaved with the baseline in ``baseline_folder`` (whose median, from the same rounds,
    is ``baseline_latency_ms``) or alone without one, ``repeats`` forwards each on ``threads``
    CPU threads, and the ``threads`` and ``latency_repeats`` it ran with (all None without).
    A ``model_file`` other than the checkpoint is an ONNX file: see the module docstring."""
    if model_file != CHECKPOINT_FILE:
        size = (int(input_size[0]), int(input_size[1])) if input_size else None
        if size is None:
            from detector.inference.onnx_model import read_onnx_metadata

            size = tuple(read_onnx_metadata(folder / model_file).model_config.input.input_size)
        return _onnx_stage_figures(folder, model_file, size, latency=latency, repeats=repeats,
                                   threads=threads, baseline_folder=baseline_folder)
    model, size = load_stage_model(folder, input_size)
    figures = {**model_figures(model, size), "latency_ms": None, "baseline_latency_ms": None,
               "threads": None, "latency_repeats": None}
    if not latency:
        return figures
    with torch_threads(threads):
        if baseline_folder is None:
            figures["latency_ms"] = latencies_ms({"model": model}, size, repeats)["model"]
        else:
            baseline, _ = load_stage_model(baseline_folder, list(size))
            figures["baseline_latency_ms"], figures["latency_ms"] = paired_latency(
                baseline, model, size, repeats)
        figures["threads"] = torch.get_num_threads()
    figures["latency_repeats"] = repeats
    return figures


def run_figures(run: RunArtifacts, *, measure: bool, latency: bool, repeats: int,
                threads: int | None) -> tuple[list[dict], bool]:
    """Figures of every stage of ``run`` (`stage_figures`), and whether they were measured now.
    The figures the stages stored are used unless ``measure`` is set or a stage has none (a
    run from before figures were stored): then every stage is measured again, one at a time,
    each model timed interleaved with the run's baseline as `ctprune run` does."""
    if not measure and all(stage.figures is not None for stage in run.stages):
        return [stage.figures for stage in run.stages], False
    baseline = run.baseline
    figures = []
    for stage in run.stages:
        paired_with = None if baseline is None or stage is baseline else baseline.folder
        figures.append(stage_figures(stage.folder, stage.info.get("input_size"), latency=latency,
                                     repeats=repeats, threads=threads, baseline_folder=paired_with,
                                     model_file=stage.model_file))
    return figures, True
