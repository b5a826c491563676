"""Exported ONNX files as models: an onnxruntime session behind the model contract, so that
evaluation, the `Predictor` and every command run a ``.onnx`` file through the same
pre-processing, decoding and evaluator as a checkpoint (one code path, not a copy).

A file is usable when `detector.export.export_onnx` wrote its metadata (the model config with
its input spec, and what the graph computes) and the graph returns the raw heads (exported
without ``--decode``): decoding then runs in PyTorch exactly as for a checkpoint, the flip
test and multi-scale testing included. Quantized (``ctprune quantize``) and fp16 files keep
their fp32 model's metadata, with their own ``precision``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig, from_dict
from ..export import GRAPH_KEY, MODEL_CONFIG_KEY, PIXEL_MAX, ExportError, onnx_session
from ..heads import head_type

ONNX_SUFFIX = ".onnx"


def is_onnx_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ONNX_SUFFIX


@dataclass
class OnnxFile:
    """What an exported file's metadata says about it."""

    path: Path
    model_config: ModelConfig
    graph: dict
    """`detector.export.onnx_metadata`'s graph record: outputs, raw_pixels, precision,
    params (of the fp32 model), output_layer_weights; quantized files add ``quantization``."""

    @property
    def precision(self) -> str:
        return self.graph.get("precision", "fp32")

    @property
    def params(self) -> int | None:
        """Parameters of the fp32 model the file was exported (and maybe quantized) from."""
        return self.graph.get("params")

    @property
    def size_mib(self) -> float:
        """The file's size on disk in MiB."""
        return self.path.stat().st_size / 2**20


def read_onnx_metadata(path: str | Path) -> OnnxFile:
    """The metadata of an exported file; a file without it (exported by another tool, or by
    ``ctprune export`` before the metadata existed) raises naming the key it lacks."""
    from ..export import _require

    onnx = _require("onnx")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and others on a damaged file
        raise ExportError(f"{path}: not a readable ONNX file ({error})") from None
    props = {prop.key: prop.value for prop in model.metadata_props}
    missing = [key for key in (MODEL_CONFIG_KEY, GRAPH_KEY) if key not in props]
    if missing:
        raise ExportError(
            f"{path}: no ctprune metadata ({', '.join(missing)}): the file does not say which "
            "input spec, head type and classes it was trained with; export it with `ctprune "
            "export CHECKPOINT --format onnx` (or `ctprune quantize`)"
        )
    try:
        config = from_dict(ModelConfig, json.loads(props[MODEL_CONFIG_KEY]), "model")
        graph = json.loads(props[GRAPH_KEY])
    except ValueError as error:
        raise ExportError(f"{path}: damaged ctprune metadata ({error})") from None
    return OnnxFile(path, config, graph)


class OnnxModel(nn.Module):
    """An onnxruntime session with the model contract: ``forward(images)`` takes the prepared
    (normalised) images (B, 3, H, W) and returns one dict of the head type's raw outputs (a
    single stack: the exported graph is the last stack's), as torch tensors on the images'
    device. It holds no parameters; ``train()`` changes nothing (the graph is in eval mode)."""

    def __init__(self, info: OnnxFile, threads: int | None = None, spinning: bool = True):
        super().__init__()
        outputs = info.graph.get("outputs")
        expected = list(head_type(info.model_config.head).outputs)
        if outputs != expected:
            raise ExportError(
                f"{info.path}: the graph returns {outputs}, not the raw heads {expected} of "
                f"head type {info.model_config.head!r} (exported with --decode?); evaluation "
                "and the predictor decode themselves: export without --decode"
            )
        self.info, self.output_names = info, expected
        self.session = onnx_session(info.path, threads=threads, spinning=spinning)
        [graph_input] = self.session.get_inputs()
        self.input_name = graph_input.name
        # A static graph takes a fixed batch: larger batches run in slices of it.
        batch = graph_input.shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else None
        spec = info.model_config.input
        self.raw_pixels = bool(info.graph.get("raw_pixels"))
        self.pixel_std = np.asarray(spec.std, np.float32).reshape(1, 3, 1, 1) * PIXEL_MAX
        self.pixel_mean = np.asarray(spec.mean, np.float32).reshape(1, 3, 1, 1) * PIXEL_MAX

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        array = images.detach().to("cpu", torch.float32).numpy()
        if self.raw_pixels:  # the graph normalises itself: undo the prepared normalisation
            array = array * self.pixel_std + self.pixel_mean
        step = self.fixed_batch or len(array)
        parts = [self.session.run(self.output_names, {self.input_name: array[i:i + step]})
                 for i in range(0, len(array), step)]
        return [{
            name: torch.from_numpy(np.concatenate([part[index] for part in parts])).to(
                images.device)
            for index, name in enumerate(self.output_names)
        }]


def load_onnx_model(path: str | Path, threads: int | None = None,
                    spinning: bool = True) -> tuple[OnnxModel, OnnxFile]:
    """The model in an exported file and its metadata (``threads``, ``spinning``: see
    `detector.export.onnx_session`)."""
    info = read_onnx_metadata(path)
    return OnnxModel(info, threads=threads, spinning=spinning), info


def load_any_model(path: str | Path) -> tuple[nn.Module, ModelConfig]:
    """A checkpoint (``.pt``) or an exported ``.onnx`` file as a model and its config: what
    `ctprune eval` and `ctprune detect` run."""
    if is_onnx_file(path):
        model, info = load_onnx_model(path)
        return model, info.model_config
    from .. import load_model

    model, checkpoint = load_model(path)
    return model, checkpoint.model_config
