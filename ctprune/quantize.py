"""INT8 post-training quantization of a (pruned or unpruned) checkpoint through onnxruntime.

`quantize_checkpoint` exports the model as ONNX (raw heads, free batch and sides, metadata as
`detector.export.onnx_metadata`, the neck's transposed convs as sub-pixel convs:
`detector.export.subpixel_deconvs`, since onnxruntime has no integer transposed conv),
calibrates activation ranges on training images and writes a QDQ graph:
QuantizeLinear/DequantizeLinear pairs around the ops onnxruntime (and TensorRT) fuse into
integer kernels, with

- weights int8, symmetric, per output channel; activations uint8 with a zero point, the pairing
  onnxruntime's x86 kernels run fastest (its own guidance for CPU inference);
- calibration (`CALIBRATIONS`: min-max, entropy or percentile) on at most
  `MAX_CALIBRATION_IMAGES` training images, never validation images (the evaluation would
  otherwise have seen its own data), prepared as evaluation prepares them, at the model's input
  size, taken evenly spaced through the split: the same images and so the same scales every
  time;
- reduced range (7-bit weights) where the CPU lacks VNNI: without it, x86's u8 x s8 multiply-add
  (``vpmaddubsw``) saturates its 16-bit sums (`reduce_range_decision`);
- kept in floating point (`detector.export.float_nodes`): every head's last conv and the
  deformable convs' offset convs (`detector.models.output_layers`, named in the file's
  metadata), everything after the heads' last convs (the in-graph decoding of a ``decode``
  graph: sigmoid, max-pool, TopK, gathers; quantized scores would tie at the peaks and TopK
  would pick among equals) and deformable convolutions (onnxruntime has no integer DeformConv).

The quantized file carries its fp32 model's metadata with ``precision: int8`` and the settings
under ``quantization``, so `ctprune eval`, `detect`, `info` and `bench` take it as they take
the fp32 file beside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line reads this module's constants without importing torch
    import numpy as np

    from detector.data.records import DetectionSource

CALIBRATIONS = ("minmax", "entropy", "percentile")
REDUCE_RANGE = ("auto", "on", "off")
RUNTIMES = ("onnxruntime", "torch")
MAX_CALIBRATION_IMAGES = 128
"""The entropy and percentile calibrators keep every activation of every calibration image in
memory (histograms are built at the end): 128 images of a 512 px res18 are about 13 GB."""
FP32_FILE = "model.fp32.onnx"
INT8_FILE = "model.int8.onnx"
SUMMARY_FILE = "quantize.json"
# The x86 instruction-set flags (Linux /proc/cpuinfo names) with the 8-bit dot product that
# accumulates without 16-bit saturation: AVX512-VNNI, AVX-VNNI (Alder Lake and later), AMX.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


class QuantizeError(ValueError):
    """A model, option or runtime that cannot be quantized as asked."""


@dataclass
class QuantizeConfig:
    """INT8 post-training quantization (`ctprune quantize`, and a recipe's `quantize` section,
    run on every branch's final model and on the baseline after fine-tuning)."""

    calibration: str = "minmax"
    """How activation ranges are calibrated: minmax (the observed range), entropy (the range
    minimising the KL divergence of the quantized histogram) or percentile. On a resunet18
    trained on the synthetic benchmark, minmax and percentile kept the AP (-0.04 and +0.04
    points) and entropy lost 16.5 points: it clipped the activation ranges to a median half of
    the observed maxima (down to an eighth), and a detector's largest activations are its
    objects."""
    images: int = 64
    """Training images calibrated on, 1 to 128 (entropy and percentile keep every activation
    in memory), taken evenly spaced through the train split at the model's input size."""
    percentile: float = 99.999
    """With calibration percentile: the percentile of |activation| kept, in (90, 100]."""
    reduce_range: str = "auto"
    """7-bit weights: auto (on exactly when the x86 CPU lacks VNNI, whose 8-bit multiply-adds
    would saturate), on or off."""
    runtime: str = "onnxruntime"
    """The quantization runtime: onnxruntime. torch (PT2E with the x86 Inductor quantizer,
    in torchao) is not available here."""

    def __post_init__(self) -> None:
        from detector.config import require_int, require_number

        if self.calibration not in CALIBRATIONS:
            raise ValueError(
                f"calibration: expected one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}"
            )
        require_int(self.images, "images", 1, MAX_CALIBRATION_IMAGES)
        require_number(self.percentile, "percentile", above=90, at_most=100)
        if self.reduce_range not in REDUCE_RANGE:
            raise ValueError(
                f"reduce_range: expected one of {', '.join(REDUCE_RANGE)}, "
                f"got {self.reduce_range!r}"
            )
        if self.runtime not in RUNTIMES:
            raise ValueError(
                f"runtime: expected one of {', '.join(RUNTIMES)}, got {self.runtime!r}"
            )
        if self.runtime == "torch":
            raise ValueError(
                "runtime: expected onnxruntime; torch (PT2E with the x86 Inductor quantizer) "
                "needs torchao, which ctprune does not use: its speed against onnxruntime INT8 "
                "was not measured"
            )


def cpu_flags() -> set[str] | None:
    """The CPU's instruction-set flags from /proc/cpuinfo; None where there is no such file
    (not Linux) or the machine is not x86."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def reduce_range_decision(setting: str, flags: set[str] | None = None,
                          detect: bool = True) -> tuple[bool, str]:
    """Whether weights use a reduced (7-bit) range, and why. ``flags``: the CPU's flags
    (`cpu_flags` when ``detect`` and none are given; None: not an x86 Linux machine)."""
    if setting not in REDUCE_RANGE:
        raise QuantizeError(
            f"reduce_range: expected one of {', '.join(REDUCE_RANGE)}, got {setting!r}"
        )
    if setting != "auto":
        return setting == "on", f"reduce_range {setting}: forced"
    if flags is None and detect:
        flags = cpu_flags()
    if flags is None:
        return False, ("reduce_range auto: off (not an x86 Linux CPU, or its flags are "
                       "unreadable; force it with reduce_range on for an x86 CPU without VNNI)")
    found = sorted(flag for flag in VNNI_FLAGS if flag in flags)
    if found:
        return False, f"reduce_range auto: off (the CPU has {', '.join(found)})"
    return True, ("reduce_range auto: on (the CPU has no VNNI: 8-bit multiply-adds would "
                  "saturate)")


def calibration_images(source: DetectionSource, spec, count: int) -> np.ndarray:
    """(N, 3, H, W) float32: ``count`` images of ``source`` (a training split) evenly spaced
    through its records, prepared as evaluation prepares them at the spec's input size (fixed
    resolution, no augmentation). N = min(count, images in the split)."""
    import numpy as np

    from detector.config import require_int
    from detector.data.dataset import read_image
    from detector.data.transforms import test_transform

    require_int(count, "images", 1, MAX_CALIBRATION_IMAGES)
    records = source.records
    if not records:
        raise QuantizeError("calibration: the train split holds no images")
    positions = np.linspace(0, len(records) - 1, num=min(count, len(records))).round()
    arrays = [test_transform(read_image(records[int(position)]), spec,
                             keep_resolution=False)[0] for position in positions]
    return np.stack(arrays).astype(np.float32)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over prepared images, one per batch."""

    def __init__(self, input_name: str, images: np.ndarray):
        self.input_name, self.images, self.position = input_name, images, 0

    def get_next(self) -> dict | None:
        if self.position >= len(self.images):
            return None
        self.position += 1
        return {self.input_name: self.images[self.position - 1:self.position]}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, images: np.ndarray,
                  config: QuantizeConfig, *, reduce_range: tuple[bool, str] | None = None
                  ) -> dict:
    """Quantize an exported fp32 file (with its metadata) into ``out_path``, calibrated on
    ``images`` (prepared, (N, 3, H, W)); returns the settings and counts it also stores in the
    quantized file's metadata (graph ``quantization``). ``reduce_range``: a decision of
    `reduce_range_decision` (default: from ``config.reduce_range`` on this CPU)."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from detector.export import GRAPH_KEY, float_nodes, set_metadata
    from detector.inference.onnx_model import read_onnx_metadata

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    info = read_onnx_metadata(fp32_path)
    if info.precision != "fp32":
        raise QuantizeError(f"{fp32_path}: holds a {info.precision} model; quantize the fp32 one")
    model = onnx.load(str(fp32_path))
    keep_float = float_nodes(model, info.graph.get("output_layer_weights", []))
    reduce, reason = reduce_range or reduce_range_decision(config.reduce_range)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    extra = {"WeightSymmetric": True, "ActivationSymmetric": False}
    if config.calibration == "percentile":
        extra["CalibPercentile"] = config.percentile
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # ONNX shape inference only: onnxruntime's graph optimisations here would rename the nodes
    # that `float_nodes` names, and its symbolic shape inference gives up on the sub-pixel
    # convs' slices of dynamic sides.
    prepared = out_path.with_name(out_path.stem + ".prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_optimization=True,
                      skip_symbolic_shape=True)
    cache = out_path.with_name(out_path.stem + ".calibration.json")
    reader = _Reader(model.graph.input[0].name, images)
    try:
        # onnxruntime's histogram calibrators print their progress: kept off the console.
        with contextlib.redirect_stdout(io.StringIO()):
            if config.calibration == "entropy":
                # quantize_static passes no histogram size to its entropy calibrator, whose
                # default (128 bins for 128 quantized bins) leaves one candidate range: the
                # min-max one. TensorRT's search instead: 2048 bins, thresholds from 128 up.
                _entropy_ranges(prepared, reader, cache)
            quantize_static(
                str(prepared), str(out_path), reader,
                quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=keep_float, calibrate_method=methods[config.calibration],
                extra_options=extra,
                calibration_cache_path=str(cache) if cache.is_file() else None,
            )
    finally:
        prepared.unlink(missing_ok=True)
        cache.unlink(missing_ok=True)
    quantized = onnx.load(str(out_path))
    counts = {op: sum(node.op_type == op for node in quantized.graph.node)
              for op in ("QuantizeLinear", "DequantizeLinear")}
    summary = {
        "format": "QDQ", "weights": "int8 symmetric per channel",
        "activations": "uint8 asymmetric per tensor",
        **{key: value for key, value in asdict(config).items()
           if key != "percentile" or config.calibration == "percentile"},
        "images": int(len(images)), "input_size": list(images.shape[2:]),
        "reduce_range": reduce, "reduce_range_reason": reason,
        "float_nodes": keep_float, "nodes": counts,
        "onnxruntime": onnxruntime.__version__,
    }
    graph = {**info.graph, "precision": "int8", "quantization": summary}
    set_metadata(quantized, {GRAPH_KEY: json.dumps(graph)})
    onnx.save(quantized, str(out_path))
    return summary


ENTROPY_BINS = 2048
"""Histogram bins of the entropy calibration (TensorRT's count): thresholds from
`ENTROPY_QUANTIZED_BINS` bins up to all of them are tried, one KL divergence each, in Python:
about 20-30 s for a res18."""
ENTROPY_QUANTIZED_BINS = 128


def _entropy_ranges(model_path: Path, reader: _Reader, cache: Path) -> None:
    """Entropy (KL-divergence) calibration of every tensor quantize_static would quantize,
    over `ENTROPY_BINS` histogram bins, written as quantize_static's calibration cache."""
    import tempfile

    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        create_calibrator,
        save_tensors_data,
    )
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))  # quantize_static's default
    with tempfile.TemporaryDirectory(prefix="ctprune-calibration.") as folder:
        calibrator = create_calibrator(
            model_path, op_types, augmented_model_path=str(Path(folder) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": ENTROPY_BINS,
                           "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
        )
        calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator
    reader.position = 0  # quantize_static reads no data with a cache, but stay rewound


@dataclass
class QuantizeResult:
    """The files `quantize_checkpoint` wrote and its summary (as `quantize_onnx` returns it)."""

    fp32_path: Path
    int8_path: Path
    summary: dict


def quantize_checkpoint(checkpoint_path: str | Path, train_source: DetectionSource,
                        config: QuantizeConfig, out_dir: str | Path) -> QuantizeResult:
    """Export ``checkpoint_path``'s model to ``out_dir/model.fp32.onnx`` and quantize it into
    ``out_dir/model.int8.onnx`` (module docstring), calibrated on ``train_source`` (the train
    split); writes the summary to ``out_dir/quantize.json`` too."""
    from detector import load_model
    from detector.export import ExportError, export_onnx
    from detector.files import atomic_write_json

    model, checkpoint = load_model(checkpoint_path)
    model_config = checkpoint.model_config
    names = model_config.class_names
    if names and train_source.class_names != names:
        raise QuantizeError(
            f"calibration data: classes {train_source.class_names} differ from the "
            f"checkpoint's {names}"
        )
    out_dir = Path(out_dir)
    try:
        # subpixel: onnxruntime has no integer ConvTranspose on CPU; the neck's 4x4 stride-2
        # deconvs would run in float between a dequantize and a quantize (res18's neck holds
        # a quarter of its MACs there).
        fp32_path = export_onnx(out_dir / FP32_FILE, model, model_config.input,
                                model_config=model_config, head=model_config.head,
                                dynamic=True, subpixel=True)
    except ExportError as error:
        raise QuantizeError(
            f"{checkpoint_path}: cannot export it for quantization: {error}") from None
    images = calibration_images(train_source, model_config.input, config.images)
    summary = quantize_onnx(fp32_path, out_dir / INT8_FILE, images, config)
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    return QuantizeResult(fp32_path, out_dir / INT8_FILE, summary)
