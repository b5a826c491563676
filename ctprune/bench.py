"""Deployed speed of checkpoints: latency (median, p90), throughput and peak memory, with every
model timed in one process, interleaved round by round, and compared as paired ratios.

`ctprune bench CHECKPOINT...` times each checkpoint on ctprune's default deployment path
(`deploy_torch`: BatchNorm folded, channels-last, inference mode; or onnxruntime with all graph
optimisations on the exported graph). A pruned checkpoint is paired with its unpruned
architecture (the same config without the channel plan, seeded random weights) on the same
path: the realised speed-up is the median of the per-round latency ratios, shown beside the
ideal one, MACs before / MACs after. An unpruned checkpoint is paired with itself in plain
eager PyTorch: the gain of the default path over eager. An exported ``.onnx`` file (with
ctprune metadata: `ctprune export`, `ctprune quantize`) runs in onnxruntime as it is; an INT8
file is paired with the fp32 file `ctprune quantize` wrote beside it (``model.fp32.onnx``),
timed in the same rounds, so the INT8 speed-up is a paired ratio too.

Interleaving: each round runs every model once, in forward order on even rounds and reverse
order on odd ones, so slow drifts of a shared machine hit all models alike and no model always
runs first. Ratios of the same round cancel what remains.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from detector import count_macs, load_model
from detector.checkpoint import build_from_config
from detector.export import export_onnx, fold_batchnorm, fuse_heads, onnx_session
from detector.inference.onnx_model import read_onnx_metadata

RUNTIMES = ("torch", "onnxruntime")
MIB = 2**20
P90 = 0.9

Runner = Callable[[torch.Tensor], object]


@dataclass
class BenchRow:
    """One model on one path. Latencies in ms at batch 1; throughput in images/s at
    ``throughput_batch``; ``peak_mib`` the most memory the forward held at once (weights
    included; torch on CPU: tensors torch allocated, from the profiler; CUDA: the allocator's
    peak; None where not measured). ``pair`` names the row this one is compared with and
    ``speedup`` is the median of per-round latency ratios pair / this (with ``speedup_min``,
    ``speedup_max``); ``ideal_speedup`` is MACs of the pair / MACs of this model.
    ``cpu_ms`` is the median CPU time of the process (all threads) per forward and
    ``cpu_speedup`` the paired ratio of CPU times: the work done, which waiting for a core
    on a loaded machine does not inflate (run with OMP_WAIT_POLICY=PASSIVE, and onnxruntime
    without spinning, so idle threads do not burn CPU time)."""

    name: str
    path: str
    runtime: str
    device: str
    input_size: int
    macs: int
    latency_ms: float
    latency_p90_ms: float
    throughput: float | None = None
    throughput_batch: int | None = None
    peak_mib: float | None = None
    pair: str | None = None
    speedup: float | None = None
    speedup_min: float | None = None
    speedup_max: float | None = None
    ideal_speedup: float | None = None
    cpu_ms: float | None = None
    cpu_speedup: float | None = None
    precision: str = "fp32"
    """The number format the model runs in: fp32, or an ONNX file's (int8, fp16)."""

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the block (None: unchanged)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def room_for_recompiles(count: int) -> Iterator[None]:
    """Models of one architecture share the code of their forward, and torch.compile keeps a
    few compiled versions per code object (8 by default), then silently runs the rest eagerly.
    Empty the compile cache (models compiled before recompile on their next call) and make
    room for ``count`` versions (one per model and input shape)."""
    import torch._dynamo
    import torch._dynamo.config as dynamo_config

    torch._dynamo.reset()
    # recompile_limit since torch 2.6, cache_size_limit before
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    with dynamo_config.patch({name: max(getattr(dynamo_config, name), count)}):
        yield


def deploy_torch(
    model: nn.Module,
    device: str | torch.device = "cpu",
    *,
    fold_bn: bool = True,
    channels_last: bool = True,
    compile: bool = False,
) -> nn.Module:
    """ctprune's PyTorch inference path: a copy of ``model`` in eval mode with BatchNorm folded
    into the convolutions (one memory-bound pass less per layer), in channels-last memory format
    (oneDNN's native layout on CPU, tensor cores' on CUDA) and, with ``compile`` (the default of
    `bench_models` and `ctprune bench`), the heads' 3x3 convs fused into one (`fuse_heads`) and
    the whole through torch.compile. Feed it channels-last images under
    ``torch.inference_mode``; outputs equal the model's to float rounding."""
    deployed = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
    if compile:
        # Only compiled: eager PyTorch copies the fused output's channel slices for the 1x1
        # convs and ran slower than three separate heads (experiments/bench/deploy/report.md).
        deployed = fuse_heads(deployed)
    deployed = deployed.to(device)
    if channels_last:
        deployed = deployed.to(memory_format=torch.channels_last)
    if compile and torch.device(device).type == "cuda":
        # CUDA graphs: the whole forward replays as one launch. A batch-1 detector on a large
        # GPU is bound by kernel launches, not by its MACs (see experiments/bench/deploy/report.md).
        # A replay overwrites the previous call's outputs: clone what must outlive the next call.
        deployed = torch.compile(deployed, mode="reduce-overhead")
    elif compile:
        # Inductor's freezing (weights as constants, prepacked for oneDNN, ReLUs and adds fused
        # into the convs) ran no faster here than plain compile
        # (experiments/bench/deploy/report.md), and it only takes effect when set globally while
        # dynamo traces: not worth the state.
        deployed = torch.compile(deployed)
    return deployed


def torch_runner(model: nn.Module, channels_last: bool) -> Runner:
    def run(images: torch.Tensor):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            outputs = model(images)
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        return outputs

    return run


def _torch_path(
    model: nn.Module, device: torch.device, compile: bool, images: torch.Tensor, name: str
) -> tuple[nn.Module, Runner]:
    """The deployed model and its runner; compiled now (on ``images``) when asked, so that a
    model torch.compile cannot build falls back to the uncompiled path here, not mid-timing."""
    deployed = deploy_torch(model, device, compile=compile)
    runner = torch_runner(deployed, channels_last=True)
    if not compile:
        return deployed, runner
    try:
        runner(images)
    except Exception as error:  # inductor raises many kinds; any of them means "no compile"
        warnings.warn(f"{name}: torch.compile failed ({type(error).__name__}: {error}); "
                      "timing it uncompiled", stacklevel=3)
        return _torch_path(model, device, False, images, name)
    return deployed, runner


def onnxruntime_runner(
    model: nn.Module,
    spec,
    input_size: int,
    threads: int | None,
    folder: Path,
    name: str,
    spinning: bool = True,
    batches: tuple[int, ...] = (1,),
) -> Runner:
    """Export ``model`` (raw heads, static shapes: one graph per batch size in ``batches``)
    into ``folder`` and run it in onnxruntime (``spinning``: see `detector.export.onnx_session`).
    Static graphs because a fixed shape is what a deployment exports and lets onnxruntime plan
    its memory once."""
    sessions = {}
    for batch in sorted(set(batches)):
        path = export_onnx(folder / f"{name}_b{batch}.onnx", model, spec,
                           input_size=(input_size, input_size), batch=batch)
        sessions[batch] = onnx_session(path, threads=threads, spinning=spinning)

    def run(images: torch.Tensor):
        return sessions[images.shape[0]].run(None, {"images": images.cpu().numpy()})

    return run


def onnx_file_runner(path: str | Path, input_size: int, threads: int | None,
                     spinning: bool = True) -> tuple[Runner, int]:
    """A runner of an exported file with ctprune metadata as it is (an INT8 or fp16 file
    included), and its MACs at ``input_size`` (the metadata's, scaled by the image area)."""
    info = read_onnx_metadata(path)
    session = onnx_session(path, threads=threads, spinning=spinning)
    [graph_input] = session.get_inputs()
    fixed = [side for side in graph_input.shape[2:] if isinstance(side, int)]
    if fixed and fixed != [input_size, input_size]:
        raise ValueError(f"{path}: a static graph for {graph_input.shape[2:]} images; time it "
                         f"with --input {fixed[0]} or export it with --dynamic")
    batch = graph_input.shape[0] if isinstance(graph_input.shape[0], int) else None
    height, width = info.graph["input_size"]
    macs = round(info.graph["macs"] * input_size * input_size / (height * width))

    def run(images: torch.Tensor):
        array = images.cpu().numpy()
        step = batch or len(array)
        return [session.run(None, {graph_input.name: array[i:i + step]})
                for i in range(0, len(array), step)]

    return run, macs


def interleaved_times(
    runners: dict[str, Runner],
    images: torch.Tensor,
    rounds: int,
    warmup: int = 2,
    cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds per call of each runner over ``rounds`` interleaved rounds (module
    docstring), after ``warmup`` untimed calls of each; process CPU seconds per call go to
    ``cpu_times`` when given."""
    for run in runners.values():
        for _ in range(warmup):
            run(images)
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            cpu_started, started = time.process_time(), time.perf_counter()
            runners[name](images)
            times[name].append(time.perf_counter() - started)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(time.process_time() - cpu_started)
    return times


def percentile(values: list[float], fraction: float) -> float:
    """Linear-interpolated percentile (``fraction`` in [0, 1])."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def paired_speedup(reference: list[float], candidate: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of per-round ratios reference / candidate."""
    ratios = [r / c for r, c in zip(reference, candidate, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def torch_peak_mib(model: nn.Module, images: torch.Tensor) -> float:
    """Peak memory of one forward: weights plus the most tensor memory live at once. On CUDA
    the caching allocator's peak; on CPU the running sum of torch's allocations and frees as
    the profiler records them, in order."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with torch.inference_mode():
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
            torch.cuda.reset_peak_memory_stats(images.device)
            before = torch.cuda.memory_allocated(images.device)
            model(images)
            torch.cuda.synchronize(images.device)
            return (torch.cuda.max_memory_allocated(images.device) - before + weights) / MIB
        from torch.profiler import ProfilerActivity, profile

        # A CUDA build on a machine without a GPU logs "gpuGetDeviceCount failed" at every
        # profile: quiet the profiler's errors unless the user asked for its logs.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            model(images)
    # Every allocation (+bytes) and free (-bytes), in time order.
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return (weights + peak) / MIB


def _base_model(config) -> nn.Module:
    """The unpruned architecture of ``config`` with seeded random weights."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_from_config(config).eval()


def bench_models(
    models: dict[str, tuple[nn.Module, object]],
    *,
    pairs: dict[str, str] | None = None,
    eager: tuple[str, ...] = (),
    onnx_files: dict[str, Path] | None = None,
    input_size: int = 512,
    threads: int | None = None,
    runtime: str = "torch",
    rounds: int = 10,
    warmup: int = 2,
    device: str | None = None,
    throughput_batch: int | None = 4,
    throughput_rounds: int = 3,
    compile: bool = True,
    memory: bool = True,
    spinning: bool = True,
) -> list[BenchRow]:
    """Time ``models`` (name -> (model, input spec)) interleaved on the default path of
    ``runtime``; ``pairs`` maps a name to the name of its reference (speed-up = reference
    latency / this latency, ideal = their MACs ratio); each name in ``eager`` is also timed as
    plain eager PyTorch under ``<name> (eager)``, with the default path paired against it.
    ``onnx_files`` (name -> exported file with metadata, run in onnxruntime as it is; needs
    ``runtime="onnxruntime"``) are timed in the same rounds; they may appear in ``pairs``.
    ``compile``: the torch path through `deploy_torch(compile=True)`; a model torch.compile
    cannot build (no C++ compiler, say) is timed uncompiled, with a warning."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: expected one of {RUNTIMES}, got {runtime!r}")
    if not isinstance(input_size, int) or input_size < 32 or input_size % 32:
        raise ValueError(f"input size: expected a multiple of 32, got {input_size!r}")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds: expected a positive integer, got {rounds!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if runtime == "onnxruntime" and device.type != "cpu":
        raise ValueError("--runtime onnxruntime is benchmarked on CPU; pass --device cpu")
    pairs = dict(pairs or {})
    onnx_files = dict(onnx_files or {})
    if onnx_files and runtime != "onnxruntime":
        raise ValueError(f"{next(iter(onnx_files))}: an ONNX file is timed in onnxruntime: "
                         "pass --runtime onnxruntime")
    unknown = [n for n in [*pairs, *pairs.values(), *eager] if n not in {**models, **onnx_files}]
    if unknown:
        raise ValueError(f"pairs/eager name models that are not given: {unknown}")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, input_size, input_size, generator=generator).to(device)
    runners: dict[str, Runner] = {}
    deployed: dict[str, nn.Module] = {}
    macs: dict[str, int] = {}
    with (torch_threads(threads), tempfile.TemporaryDirectory() as folder,
          room_for_recompiles(2 * len(models)) if compile else contextlib.nullcontext()):
        for name, (model, spec) in models.items():
            macs[name] = count_macs(model, (input_size, input_size))
            if runtime == "onnxruntime":
                runners[name] = onnxruntime_runner(
                    model, spec, input_size, threads, Path(folder), f"model{len(runners)}",
                    spinning, batches=(1, throughput_batch) if throughput_batch else (1,),
                )
            else:
                deployed[name], runners[name] = _torch_path(model, device, compile, images, name)
        for name, path in onnx_files.items():
            runners[name], macs[name] = onnx_file_runner(path, input_size, threads, spinning)
        for name in eager:
            eager_name = f"{name} (eager)"
            deployed[eager_name] = copy.deepcopy(models[name][0]).eval().to(device)
            runners[eager_name] = torch_runner(deployed[eager_name], channels_last=False)
            macs[eager_name] = macs[name]
            pairs[name] = eager_name
        cpu_times: dict[str, list[float]] = {}
        times = interleaved_times(runners, images, rounds, warmup, cpu_times)
        throughputs: dict[str, float] = {}
        if throughput_batch:
            batch = images.expand(throughput_batch, -1, -1, -1).contiguous()
            batch_times = interleaved_times(runners, batch, throughput_rounds, warmup=1)
            throughputs = {
                name: throughput_batch / statistics.median(seconds)
                for name, seconds in batch_times.items()
            }
        peaks = {}
        if memory:
            for name, model in deployed.items():
                eager_layout = name.endswith("(eager)")
                layout = torch.contiguous_format if eager_layout else torch.channels_last
                peaks[name] = torch_peak_mib(model, images.contiguous(memory_format=layout))
    precisions = {name: read_onnx_metadata(path).precision for name, path in onnx_files.items()}
    rows = []
    for name in runners:
        precision = precisions.get(name, "fp32")
        row = BenchRow(
            name=name,
            path=(runtime if not name.endswith("(eager)") else "eager")
            + ("" if precision == "fp32" else f" {precision}"),
            precision=precision,
            runtime=runtime if not name.endswith("(eager)") else "torch",
            device=str(device),
            input_size=input_size,
            macs=macs[name],
            latency_ms=statistics.median(times[name]) * 1e3,
            latency_p90_ms=percentile(times[name], P90) * 1e3,
            throughput=throughputs.get(name),
            throughput_batch=throughput_batch or None,
            peak_mib=peaks.get(name),
            cpu_ms=statistics.median(cpu_times[name]) * 1e3,
        )
        if name in pairs:
            reference = pairs[name]
            row.pair = reference
            row.speedup, row.speedup_min, row.speedup_max = paired_speedup(
                times[reference], times[name]
            )
            row.ideal_speedup = macs[reference] / macs[name]
            row.cpu_speedup = paired_speedup(cpu_times[reference], cpu_times[name])[0]
        rows.append(row)
    return rows


def bench_checkpoints(
    paths: list[str | Path],
    *,
    input_size: int = 512,
    threads: int | None = None,
    runtime: str = "torch",
    rounds: int = 10,
    device: str | None = None,
    **options,
) -> list[BenchRow]:
    """`bench_models` for checkpoint files: a pruned checkpoint is paired with its unpruned
    architecture (added as ``<path> (unpruned)``), an unpruned one with plain eager; an
    ``.onnx`` file runs as it is, an INT8 one paired with the ``model.fp32.onnx`` beside it
    (added as ``<path> (fp32)``)."""
    from detector.inference.onnx_model import is_onnx_file

    from .quantize import FP32_FILE

    models: dict[str, tuple[nn.Module, object]] = {}
    onnx_files: dict[str, Path] = {}
    pairs: dict[str, str] = {}
    eager: list[str] = []
    for path in paths:
        name = str(path)
        if name in models or name in onnx_files:
            raise ValueError(f"{name}: given twice")
        if is_onnx_file(path):
            onnx_files[name] = Path(path)
            twin = Path(path).with_name(FP32_FILE)
            if read_onnx_metadata(path).precision != "fp32" and twin.is_file():
                onnx_files[f"{name} (fp32)"] = twin
                pairs[name] = f"{name} (fp32)"
            continue
        model, checkpoint = load_model(path)
        spec = checkpoint.model_config.input
        models[name] = (model.eval(), spec)
        if checkpoint.channel_plan:
            base_name = f"{name} (unpruned)"
            models[base_name] = (_base_model(checkpoint.model_config), spec)
            pairs[name] = base_name
        elif runtime == "torch":
            eager.append(name)
    return bench_models(
        models, pairs=pairs, eager=tuple(eager), onnx_files=onnx_files, input_size=input_size,
        threads=threads,
        runtime=runtime, rounds=rounds, device=device, **options,
    )


def format_bench(rows: list[BenchRow]) -> str:
    """A markdown table of `bench_models` rows."""
    lines = [
        "| model | path | GMACs | latency ms (median / p90) | images/s | peak MiB | "
        "speed-up vs | realised | ideal (MACs) | realised / ideal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        throughput = (
            f"{row.throughput:.2f} (batch {row.throughput_batch})" if row.throughput else "–"
        )
        peak = f"{row.peak_mib:.0f}" if row.peak_mib is not None else "–"
        if row.speedup is not None:
            realised = f"{row.speedup:.2f}x ({row.speedup_min:.2f}–{row.speedup_max:.2f})"
            ideal = f"{row.ideal_speedup:.2f}x"
            fraction = f"{row.speedup / row.ideal_speedup:.2f}"
        else:
            realised = ideal = fraction = "–"
        lines.append(
            f"| {row.name} | {row.path} ({row.device}) | {row.macs / 1e9:.2f} | "
            f"{row.latency_ms:.1f} / {row.latency_p90_ms:.1f} | {throughput} | {peak} | "
            f"{row.pair or '–'} | {realised} | {ideal} | {fraction} |"
        )
    return "\n".join(lines)
