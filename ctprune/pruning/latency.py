"""A latency model: what each prunable layer costs at each pair of widths, on a named runtime.

MACs say little about speed: oneDNN blocks channels by 8 or 16, so a conv 40 channels wide can
be as slow as one 48 wide, and pruned models that run no faster than their parents are common.
So latency is measured, not counted:

- `LatencyTable` times single layers (a conv or transposed conv with bias: BatchNorm is folded
  on every deployment path) at given input and output widths, on one runtime ("torch": eager
  CPU, channels-last, inference mode, as `bench.deploy_torch` without compile; "onnxruntime": a
  one-node ONNX graph; "cuda": torch on the GPU), one thread count and one input size. Every
  timing is cached in a JSON file keyed by the machine (CPU model, a digest of its flags, the
  GPU's name on cuda), the runtime and its version, the threads and the input size, so a layer
  shape is timed once per machine and runtime (`default_cache_dir`, or a run folder).
- `LatencyModel` predicts a whole model's latency from its widths: the sum of its layers'
  table entries, scaled, plus the rest of the forward (activations, additions, pooling, the
  layers the table does not model), both fitted on two measured models: the parent and a
  narrower probe (`LatencyModel.calibrate`).
- `LatencyTable.stairs` gives a layer's lower envelope over output widths: only widths faster
  than every wider one. The allocation applies the same rule to whole groups, on the whole
  model's predicted latency (`budget.allocate_budget` skips narrowings that save nothing,
  `budget.widen_for_free` gives back width that costs nothing).

Timing uses `bench.interleaved_times` (the one timer) and takes the median of its rounds.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Iterable
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from detector.channel_plan import apply_channel_plan

from .budget import widths_after_pruning
from .graph import is_depthwise, meta_copy
from .options import LATENCY_RUNTIMES

RUNTIMES = LATENCY_RUNTIMES
# Rounds per layer timing (after 2 warm-up calls), the median taken: what
# experiments/bench/latency_model/report.md used.
DEFAULT_ROUNDS = 15
# Rounds when timing a whole model (parent or pruned).
MODEL_ROUNDS = 40
CACHE_VERSION = 1
ONNX_OPSET = 17


@dataclass(frozen=True)
class LayerSpec:
    """What a layer's latency depends on besides its input and output widths."""

    kind: str
    """"conv" or "conv_transpose"."""
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    output_padding: tuple[int, int]
    depthwise: bool
    """One group per channel (input width = output width)."""
    input_hw: tuple[int, int]
    """The input's height and width at the model's input size."""

    def key(self, in_channels: int, out_channels: int) -> str:
        """The cache key of one timing."""
        return (
            f"{self.kind} k{self.kernel_size} s{self.stride} p{self.padding} d{self.dilation} "
            f"op{self.output_padding} dw{int(self.depthwise)} {self.input_hw} "
            f"{in_channels}->{out_channels}"
        ).replace(" ", "_")

    def build(self, in_channels: int, out_channels: int) -> nn.Module:
        """A layer of this spec with random weights and a bias (BatchNorm folded)."""
        groups = in_channels if self.depthwise else 1
        if self.depthwise and in_channels != out_channels:
            raise ValueError(f"a depthwise layer has equal widths, got {in_channels}, "
                             f"{out_channels}")
        common = dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                      dilation=self.dilation, groups=groups, bias=True)
        if self.kind == "conv_transpose":
            return nn.ConvTranspose2d(in_channels, out_channels,
                                      output_padding=self.output_padding, **common)
        return nn.Conv2d(in_channels, out_channels, **common)


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


def modelled(module: nn.Module) -> bool:
    """Layers the table times: convs and transposed convs, plain or depthwise, with integer
    padding. Grouped (not depthwise) and deformable convs fall into the rest of the forward."""
    if not isinstance(module, nn.Conv2d | nn.ConvTranspose2d) or isinstance(module.padding, str):
        return False
    return module.groups == 1 or is_depthwise(module)


def layer_specs(model: nn.Module, input_size: tuple[int, int]) -> dict[str, LayerSpec]:
    """Module path -> `LayerSpec` of every modelled layer, from one forward pass of a meta copy
    (no weights, no compute) at ``input_size`` (height, width)."""
    copy = meta_copy(model).eval()
    names = {module: name for name, module in copy.named_modules()}
    specs: dict[str, LayerSpec] = {}

    def record(module, inputs, output):
        transposed = isinstance(module, nn.ConvTranspose2d)
        specs[names[module]] = LayerSpec(
            kind="conv_transpose" if transposed else "conv",
            kernel_size=_pair(module.kernel_size),
            stride=_pair(module.stride),
            padding=_pair(module.padding),
            dilation=_pair(module.dilation),
            output_padding=_pair(module.output_padding) if transposed else (0, 0),
            depthwise=is_depthwise(module),
            input_hw=tuple(int(side) for side in inputs[0].shape[-2:]),
        )

    hooks = [module.register_forward_hook(record) for module in copy.modules() if modelled(module)]
    try:
        with torch.no_grad():
            copy(torch.zeros(1, 3, *input_size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return specs


def _output_hw(spec: LayerSpec) -> tuple[int, int]:
    sides = []
    for axis in range(2):
        size, kernel = spec.input_hw[axis], spec.kernel_size[axis]
        stride, padding = spec.stride[axis], spec.padding[axis]
        dilation = spec.dilation[axis]
        if spec.kind == "conv_transpose":
            sides.append((size - 1) * stride - 2 * padding + dilation * (kernel - 1)
                         + spec.output_padding[axis] + 1)
        else:
            sides.append((size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1)
    return sides[0], sides[1]


def machine_key(runtime: str, threads: int, input_size: tuple[int, int]) -> dict:
    """What a timing depends on besides the layer: the CPU (model and a digest of its flags),
    the GPU on cuda, the runtime and its version, the thread count and the input size."""
    cpu, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            field, _, value = line.partition(":")
            if field.strip() == "model name" and not cpu:
                cpu = value.strip()
            if field.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:  # not Linux: the processor string alone
        pass
    cpu = cpu or platform.processor() or platform.machine()
    if runtime == "onnxruntime":
        import onnxruntime

        version = f"onnxruntime {onnxruntime.__version__}"
    else:
        version = f"torch {torch.__version__}"
    key = {
        "cpu": cpu,
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "runtime": runtime,
        "version": version,
        "threads": threads,
        "input_size": list(input_size),
    }
    if runtime == "cuda":
        key["gpu"] = torch.cuda.get_device_name()
    return key


def default_cache_dir() -> Path:
    """``$CTPRUNE_CACHE/latency``, else ``$XDG_CACHE_HOME/ctprune/latency``, else
    ``~/.cache/ctprune/latency``."""
    if os.environ.get("CTPRUNE_CACHE"):
        return Path(os.environ["CTPRUNE_CACHE"]) / "latency"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ctprune" / "latency"


def _check_runtime(runtime: str, threads: int) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: expected one of {RUNTIMES}, got {runtime!r}")
    if runtime == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime: 'cuda' asked for, but torch sees no CUDA device")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads: expected a positive integer, got {threads!r}")


def _median_seconds(run, images, rounds: int) -> float:
    from ctprune.bench import interleaved_times  # the one timer

    return statistics.median(interleaved_times({"layer": run}, images, rounds)["layer"])


class LatencyTable:
    """Milliseconds of single layers at given widths on one runtime, thread count and input
    size, timed on first use and cached on disk (module docstring).

    Args:
        runtime: "torch" (CPU), "onnxruntime" (CPU) or "cuda".
        threads: intra-op threads (torch's or onnxruntime's).
        input_size: the model's input (height, width), part of the cache key.
        cache_dir: the folder of the JSON caches; None: `default_cache_dir`.
        rounds: timed rounds per layer.
    """

    def __init__(
        self,
        runtime: str = "torch",
        threads: int = 1,
        input_size: tuple[int, int] = (512, 512),
        cache_dir: str | Path | None = None,
        rounds: int = DEFAULT_ROUNDS,
    ):
        _check_runtime(runtime, threads)
        self.runtime, self.threads, self.rounds = runtime, threads, rounds
        self.input_size = tuple(int(side) for side in input_size)
        self.key = machine_key(runtime, threads, self.input_size)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(cache_dir or default_cache_dir()) / f"latency_{runtime}_{digest}.json"
        self.entries: dict[str, float] = {}
        self.measured = 0  # timings taken by this object (not read from the cache)
        if self.path.exists():
            stored = json.loads(self.path.read_text())
            if stored.get("version") == CACHE_VERSION and stored.get("key") == self.key:
                self.entries = {name: float(ms) for name, ms in stored["layers_ms"].items()}
        self._dirty = False

    def layer_ms(self, spec: LayerSpec, in_channels: int, out_channels: int) -> float:
        """Milliseconds of one call of a ``spec`` layer at these widths (batch 1)."""
        key = spec.key(in_channels, out_channels)
        if key not in self.entries:
            self.entries[key] = round(self._time(spec, in_channels, out_channels) * 1e3, 5)
            self.measured += 1
            self._dirty = True
        return self.entries[key]

    def save(self) -> Path:
        """Write the cache (atomically) when it has new timings; returns its path."""
        if self._dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            content = {"version": CACHE_VERSION, "key": self.key,
                       "layers_ms": dict(sorted(self.entries.items()))}
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False,
                                             suffix=".tmp") as handle:
                json.dump(content, handle, indent=1)
            os.replace(handle.name, self.path)
            self._dirty = False
        return self.path

    def stairs(
        self, spec: LayerSpec, in_channels: int, widths: Iterable[int]
    ) -> list[tuple[int, float]]:
        """The lower envelope of the layer's latency over output ``widths`` at ``in_channels``
        inputs (depthwise: both widths), ascending: (width, ms) for every width faster than
        all wider ones. A width missing from it is never worth choosing: a wider one is at
        least as fast."""
        steps = []
        fastest = float("inf")
        for width in sorted(set(widths), reverse=True):
            source = width if spec.depthwise else in_channels
            ms = self.layer_ms(spec, source, width)
            if ms < fastest:
                steps.append((width, ms))
                fastest = ms
        return steps[::-1]

    def _time(self, spec: LayerSpec, in_channels: int, out_channels: int) -> float:
        images = torch.randn(1, in_channels, *spec.input_hw)
        generator = torch.Generator().manual_seed(0)
        layer = spec.build(in_channels, out_channels).eval()
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        if self.runtime == "onnxruntime":
            return _median_seconds(self._onnx_runner(spec, layer), images, self.rounds)
        from ctprune.bench import torch_runner, torch_threads

        device = "cuda" if self.runtime == "cuda" else "cpu"
        layer = layer.to(device).to(memory_format=torch.channels_last)
        # Inside a deployed model every activation is already channels-last: converting the
        # input here (which the runner would do, and time) is no part of the layer's cost.
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        with torch_threads(self.threads if device == "cpu" else None):
            return _median_seconds(torch_runner(layer, channels_last=True), images, self.rounds)

    def _onnx_runner(self, spec: LayerSpec, layer: nn.Module):
        """A one-node ONNX graph (built directly: exporting through torch per layer shape
        would take seconds each) run in onnxruntime."""
        import onnx
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper

        attributes = dict(
            kernel_shape=list(spec.kernel_size), strides=list(spec.stride),
            pads=[*spec.padding, *spec.padding], dilations=list(spec.dilation),
            group=layer.groups,
        )
        if spec.kind == "conv_transpose":
            attributes["output_padding"] = list(spec.output_padding)
        operator = "ConvTranspose" if spec.kind == "conv_transpose" else "Conv"
        node = helper.make_node(operator, ["x", "w", "b"], ["y"], **attributes)
        initializers = [numpy_helper.from_array(layer.weight.detach().numpy(), "w"),
                        numpy_helper.from_array(layer.bias.detach().numpy(), "b")]
        in_channels = layer.in_channels
        out_channels = layer.out_channels
        graph = helper.make_graph(
            [node], "layer",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                           [1, in_channels, *spec.input_hw])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                           [1, out_channels, *_output_hw(spec)])],
            initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        onnx.checker.check_model(model)
        session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])

        def run(images: torch.Tensor):
            return session.run(None, {"x": images.numpy()})

        return run


def measure_model_ms(
    model: nn.Module,
    runtime: str = "torch",
    threads: int = 1,
    input_size: tuple[int, int] = (512, 512),
    rounds: int = MODEL_ROUNDS,
    others: dict[str, nn.Module] | None = None,
) -> dict[str, float]:
    """Median milliseconds of ``model`` (and of ``others``, timed interleaved with it: name ->
    model) on the deployment path of ``runtime``: BatchNorm folded, channels-last, eager, in
    inference mode; onnxruntime on the exported graph. Returns name -> ms, ``model`` as
    "model"."""
    from ctprune.bench import (
        deploy_torch,
        interleaved_times,
        onnxruntime_runner,
        torch_runner,
        torch_threads,
    )

    _check_runtime(runtime, threads)
    models = {"model": model, **(others or {})}
    device = "cuda" if runtime == "cuda" else "cpu"
    images = torch.randn(1, 3, *input_size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder, torch_threads(
        threads if device == "cpu" else None
    ):
        if runtime == "onnxruntime":
            from detector import input_preset

            spec = input_preset("imagenet", tuple(input_size))
            if input_size[0] != input_size[1]:
                raise ValueError("runtime onnxruntime: latency is measured on square inputs")
            # Idle threads sleep: timed interleaved, one session's spinning threads would take
            # the cores from the next session's run (on 2 cores: a 3-5 ms model measured 0.29
            # and 0.54 of its parent in two calls).
            runners = {
                name: onnxruntime_runner(each.eval(), spec, input_size[0], threads, Path(folder),
                                         name, spinning=False)
                for name, each in models.items()
            }
        else:
            runners = {name: torch_runner(deploy_torch(each, device, compile=False), True)
                       for name, each in models.items()}
        times = interleaved_times(runners, images.to(device), rounds)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


@dataclass
class LatencyModel:
    """Predicted latency of a model at any widths of its layers (module docstring).

    Built by `LatencyModel.calibrate(parent, table, probe)`: the parent's layers and its
    measured latency on the table's runtime, threads and input size. A whole model is predicted
    as ``scale * layers + rest_ms``, ``layers`` the sum of its layers' table entries: ``scale``
    carries what timing a layer alone misses inside a model (measured on a loaded 2-core CPU,
    resunet18's layers timed alone summed to half of its measured forward although convolutions
    take 95 % of it: caches are warm for a layer timed alone), ``rest_ms`` the ops the table does
    not time (activations, additions, pooling, upsampling, unmodelled layers). With a ``probe``
    (the parent resized to narrower widths, e.g. every group halved) both are solved from the
    two measurements; without one, ``rest_ms`` is 0 and ``scale`` makes the parent exact."""

    specs: dict[str, LayerSpec]
    widths: dict[str, tuple[int, int]]
    """The parent's (in, out) widths of each modelled layer."""
    parent_ms: float
    """The parent's measured latency."""
    scale: float
    rest_ms: float

    @classmethod
    def calibrate(cls, parent: nn.Module, table: LatencyTable, probe: nn.Module | None = None,
                  ) -> LatencyModel:
        specs = layer_specs(parent, table.input_size)
        widths = _modelled_widths(parent, specs)
        others = {"probe": probe} if probe is not None else None
        measured = measure_model_ms(parent, table.runtime, table.threads, table.input_size,
                                    others=others)
        layers = sum(table.layer_ms(specs[n], *widths[n]) for n in specs)
        scale, rest = measured["model"] / layers, 0.0
        if probe is not None:
            probe_widths = _modelled_widths(probe, specs)
            probe_layers = sum(table.layer_ms(specs[n], *probe_widths[n]) for n in specs)
            if layers > probe_layers:
                slope = (measured["model"] - measured["probe"]) / (layers - probe_layers)
                intercept = measured["model"] - slope * layers
                # A fit that makes the layers worthless or the rest negative is timing noise:
                # keep the one-point calibration then.
                if slope > 0 and intercept >= 0:
                    scale, rest = slope, intercept
        table.save()
        return cls(specs, widths, measured["model"], scale, rest)

    def predict_ms(self, table: LatencyTable, widths: dict[str, list[int] | tuple[int, int]]
                   ) -> float:
        """The latency of the parent resized to ``widths`` (module path -> [in, out], as
        `detector.layer_widths` gives them; layers not named keep the parent's)."""
        current = {name: tuple(widths.get(name, self.widths[name])[-2:]) for name in self.specs}
        layers = sum(table.layer_ms(self.specs[name], *current[name]) for name in self.specs)
        return self.scale * layers + self.rest_ms

    def as_dict(self) -> dict:
        return {"parent_ms": self.parent_ms, "scale": self.scale, "rest_ms": self.rest_ms,
                "layers": {name: asdict(spec) for name, spec in self.specs.items()}}


def _modelled_widths(model: nn.Module, specs: dict[str, LayerSpec]) -> dict[str, tuple[int, int]]:
    modules = dict(model.named_modules())
    return {name: (modules[name].in_channels, modules[name].out_channels) for name in specs}


def resized_copy(model: nn.Module, groups, widths_before, keeps: list[int]) -> nn.Module:
    """A copy of ``model`` with every group at ``keeps`` (weights are not chosen: for timing)."""
    plan = widths_after_pruning(widths_before, groups, keeps)
    return apply_channel_plan(deepcopy(model),
                              {k: v for k, v in plan.items() if v != widths_before[k]})


def calibrated_latency_model(model, groups, widths_before, input_size, runtime, threads, cache):
    """(LatencyModel, LatencyTable) of ``model`` on ``runtime``; the probe that splits the rest
    of the forward into fixed and scaling parts is the model with every group halved."""
    table = LatencyTable(runtime, threads, input_size, cache_dir=cache)
    halves = [max(1, group.width // 2) for group in groups]
    probe = resized_copy(model, groups, widths_before, halves)
    latency = LatencyModel.calibrate(model, table, probe)
    return latency, table


# The measured correction of a latency allocation: at most this many re-allocations, stopping
# once the measured fraction is within this relative distance of the budget.
LATENCY_CORRECTIONS = 4
LATENCY_TOLERANCE = 0.04


def next_target(points: list[tuple[float, float]], budget: float) -> float:
    """The allocator's next target from the (target, measured fraction) pairs so far: the secant
    between the nearest targets measured on either side of ``budget`` once both sides are known
    (the measured fraction is monotone in the target but not proportional to it: predicted 0.40,
    0.50 and 0.62 measured 0.25, 0.32 and 0.49 in onnxruntime at 128 px), else the last target
    scaled by the miss."""
    below = [point for point in points if point[1] < budget]
    above = [point for point in points if point[1] > budget]
    if below and above:
        (t0, m0), (t1, m1) = max(below), min(above)
        return t0 + (budget - m0) * (t1 - t0) / (m1 - m0)
    target, measured = points[-1]
    return min(1.0, target * budget / measured)


def meet_measured_latency(model, groups, widths_before, keeps, keeps_for, predicted_of, budget,
                          runtime, threads, input_size) -> tuple[list[int], list[dict]]:
    """``keeps`` re-allocated until the measured latency fraction (the resized model timed
    interleaved with ``model``) is within `LATENCY_TOLERANCE` of ``budget``, the allocator's
    target moved by `next_target` (``keeps_for(target)`` gives the widths for a predicted
    fraction, ``predicted_of(keeps)`` that fraction). The layer tables time each layer alone; a
    whole runtime graph fuses and caches differently, most at small inputs, so the whole
    model's measurement has the last word. Returns the widths measured nearest the budget and
    every round's (target, predicted, measured)."""
    rounds, points, tried = [], [], []
    target = budget
    for _ in range(LATENCY_CORRECTIONS + 1):
        candidate = resized_copy(model, groups, widths_before, keeps)
        times = measure_model_ms(model, runtime, threads, input_size,
                                 others={"candidate": candidate})
        measured = times["candidate"] / times["model"]
        rounds.append({"target": round(target, 4), "predicted": round(predicted_of(keeps), 4),
                       "measured": round(measured, 4)})
        points.append((target, measured))
        tried.append((abs(measured / budget - 1), keeps))
        if tried[-1][0] <= LATENCY_TOLERANCE:
            break
        target = next_target(points, budget)
        keeps = keeps_for(target)
    return min(tried, key=lambda entry: entry[0])[1], rounds


def realised_latency(parent, pruned, runtime, threads, input_size, predicted) -> dict:
    """The parent's and the pruned model's latency, timed interleaved; a pruned model slower
    than its parent is an error (pruning for latency that makes a model slower is a bug in the
    latency model or a runtime that cannot use the widths, never what the user wants)."""
    measured = measure_model_ms(parent, runtime, threads, input_size, others={"pruned": pruned})
    before, after = measured["model"], measured["pruned"]
    if after > before:
        raise ValueError(
            f"the pruned model is slower than its parent on {runtime} with {threads} threads "
            f"({after:.2f} ms against {before:.2f} ms at {input_size[0]}x{input_size[1]}); try "
            "another round_to or runtime"
        )
    return {"runtime": runtime, "threads": threads, "before_ms": round(before, 4),
            "after_ms": round(after, 4), "realised": round(after / before, 4),
            "predicted": round(predicted, 4)}
