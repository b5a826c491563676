"""Deployment: a CenterNet as one graph (ONNX or a torch.export program), with the decoding and
the input normalisation optionally inside it.

It lives in `detector`, not `ctprune`: exporting needs a model and its input spec, which a
checkpoint alone gives (pruned or not, since loading applies the channel plan here), so a user
who deploys a detector never needs the pruning library. `ctprune export` is a thin command over
these functions.

- `DeployModel` wraps a model for export: raw heads ``(heatmap logits, wh, offset)`` of the last
  stack, or with ``decode`` the top-K detections ``(B, K, 6)`` in input-image pixels.
- The decoding in the graph is the decoder eager inference runs, the head type's
  (`detector.heads.HEADS`; centernet: `detector.inference.decode.ctdet_decode`): max-pool peak
  suppression and TopK, with K clamped to the map size symbolically; no NonZero, no OneHot
  (TensorRT rejects NonZero).
- `fold_batchnorm` folds each BatchNorm into the (transposed) convolution before it.
- `subpixel_deconvs` rewrites 4x4 stride-2 transposed convolutions as four 2x2 convolutions
  and a pixel shuffle (same outputs, same MACs), for runtimes without an integer transposed
  convolution: INT8 quantization exports with it (onnxruntime's CPU kernels have none).
- `export_onnx` / `export_pt2` write the files; deformable convolutions (torchvision's
  ``deform_conv2d``) become ONNX ``DeformConv`` (opset 19), see `DEFORM_CONV_MIN_ORT`.
- Given the model config, `export_onnx` stores it (input spec, head type, class names) and
  what the graph computes in the file's metadata (`onnx_metadata`), which makes the file a
  model of its own: `detector.inference.onnx_model` evaluates and runs it like a checkpoint.

onnx, onnxscript, onnxruntime and onnxslim are the ``export`` extra; they are imported only
when an ONNX function runs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .config import InputSpec, ModelConfig, to_dict
from .heads import head_type
from .models.centernet import CenterNet, FusedHeads, HeadSet, output_layers
from .stats import count_macs, count_parameters

# ONNX opset of the exported graphs: 19 is the first with DeformConv; everything else CenterNet
# needs exists since opset 11.
ONNX_OPSET = 19
# The first onnxruntime release with a DeformConv kernel (CPU and CUDA, microsoft/onnxruntime
# PR 27393). Checked on the wheels: 1.24.4 fails with NOT_IMPLEMENTED for DeformConv(19), 1.25.0
# runs it and matches torchvision's deform_conv2d to 1e-6.
DEFORM_CONV_MIN_ORT = "1.25.0"
# Raw pixels are 8-bit: the input spec's mean/std are for pixels scaled to [0, 1].
PIXEL_MAX = 255.0
# The ONNX metadata keys (JSON values) that make an exported file a self-describing model.
MODEL_CONFIG_KEY = "ctprune.model_config"
GRAPH_KEY = "ctprune.graph"
PRECISIONS = ("fp32", "fp16")
# Opset-19 DeformConv: onnxruntime has neither an integer nor an fp16 kernel for it.
FLOAT_OP_TYPES = ("DeformConv",)


class ExportError(ValueError):
    """A model, option or installed runtime that cannot give the requested export."""


class DeployModel(nn.Module):
    """A CenterNet as a deployed graph sees it: one image tensor in, plain tensors out.

    images: (B, 3, H, W) float32 in the spec's colour order, either normalised as the model was
    trained (``raw_pixels=False``) or raw 0-255 pixels (``raw_pixels=True``: the graph applies
    ``(pixels / 255 - mean) / std`` itself, one multiply-add per pixel).

    forward returns the last stack's raw outputs in the order of the head type's outputs
    (centernet: ``(heatmap, wh, offset)``, heatmap as logits, all (B, ., H/down, W/down)), or
    with ``decode`` the detections ``(B, K', 6)`` of the head type's decoder (the one eager
    inference runs) with boxes in input-image pixels (map coordinates times the down ratio),
    K' = min(max_detections, C * H/down * W/down). ``head`` is the model config's ``head``.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: InputSpec,
        *,
        head: str = "centernet",
        decode: bool = False,
        max_detections: int = 100,
        raw_pixels: bool = False,
    ):
        super().__init__()
        if int(max_detections) != max_detections or max_detections < 1:
            raise ExportError(
                f"max_detections: expected a positive integer, got {max_detections!r}"
            )
        self.model, self.head_type = model, head_type(head)
        self.decode, self.max_detections = decode, int(max_detections)
        self.down_ratio, self.raw_pixels = spec.down_ratio, raw_pixels
        std = torch.tensor(spec.std).reshape(1, 3, 1, 1)
        mean = torch.tensor(spec.mean).reshape(1, 3, 1, 1)
        # Folded into the graph's first op rather than into conv1's weights: conv1 pads with
        # zeros in normalised space, which raw pixels cannot express at the borders.
        self.register_buffer("pixel_scale", 1.0 / (PIXEL_MAX * std), persistent=False)
        self.register_buffer("pixel_shift", -mean / std, persistent=False)

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, ...]:
        if self.raw_pixels:
            images = images * self.pixel_scale + self.pixel_shift
        outputs = self.model(images)[-1]
        if self.decode:
            detections = self.head_type.decode(outputs, None, self.max_detections)
            boxes = detections[..., :4] * self.down_ratio
            return torch.cat([boxes, detections[..., 4:]], dim=2)
        return tuple(outputs[name] for name in self.head_type.outputs)


def _fusable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv path, batchnorm path) where the BN reads only that conv's output and nothing else
    reads it, found on a torch.fx trace; [] when the model does not trace."""
    from torch import fx

    try:
        graph = fx.symbolic_trace(model, concrete_args={"return_features": False}).graph
    except Exception:  # a model fx cannot trace (data-dependent Python): nothing is folded
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], (nn.Conv2d, nn.ConvTranspose2d))
            and len(source.users) == 1
            and calls[source.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((source.target, node.target))
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every BatchNorm that directly follows a Conv2d or
    ConvTranspose2d folded into it and replaced by Identity: the same outputs (to float
    rounding) with one memory-bound pass less per layer. BNs in any other position stay."""
    folded = copy.deepcopy(model).eval()
    modules = dict(folded.named_modules())
    for conv_path, norm_path in _fusable_pairs(folded):
        conv, norm = modules[conv_path], modules[norm_path]
        fused = fuse_conv_bn_eval(conv, norm, transpose=isinstance(conv, nn.ConvTranspose2d))
        parent_path, _, name = conv_path.rpartition(".")
        setattr(modules[parent_path] if parent_path else folded, name, fused)
        parent_path, _, name = norm_path.rpartition(".")
        setattr(modules[parent_path] if parent_path else folded, name, nn.Identity())
    return folded


class SubpixelConvTranspose(nn.Module):
    """A ``ConvTranspose2d(kernel 4, stride 2, padding 1)`` as four 2x2 convolutions, one per
    output phase, interleaved by a pixel shuffle: the same outputs (to float rounding) and the
    same MACs, built from ops that integer runtimes implement.

    Output row ``2m`` of the transposed conv reads input rows ``m - 1, m`` through kernel rows
    3 and 1, row ``2m + 1`` reads rows ``m, m + 1`` through kernel rows 2 and 0 (``y = 2i - 1 +
    k``); likewise for columns. On the input padded by one pixel, phase (py, px) is a valid
    2x2 conv starting at offset (py, px)."""

    TAPS = ((3, 1), (2, 0))  # kernel rows (columns) read by even and odd output rows (columns)

    def __init__(self, deconv: nn.ConvTranspose2d):
        super().__init__()
        if not is_subpixel_convertible(deconv):
            raise ExportError(f"not a 4x4 stride-2 padding-1 transposed conv: {deconv}")
        self.phases = nn.ModuleList()
        for rows in self.TAPS:
            for columns in self.TAPS:
                conv = nn.Conv2d(deconv.in_channels, deconv.out_channels, 2,
                                 bias=deconv.bias is not None)
                conv = conv.to(device=deconv.weight.device, dtype=deconv.weight.dtype)
                with torch.no_grad():
                    taps = deconv.weight[:, :, list(rows)][:, :, :, list(columns)]
                    conv.weight.copy_(taps.transpose(0, 1))
                    if deconv.bias is not None:
                        conv.bias.copy_(deconv.bias)
                self.phases.append(conv)

    def forward(self, features: Tensor) -> Tensor:
        height, width = features.shape[-2:]
        padded = nn.functional.pad(features, (1, 1, 1, 1))
        outputs = [conv(padded[:, :, row:row + height + 1, column:column + width + 1])
                   for conv, (row, column) in zip(self.phases, ((0, 0), (0, 1), (1, 0), (1, 1)),
                                                  strict=True)]
        # (B, C, 4, H, W) -> (B, 4C, H, W): channel c * 4 + phase, what pixel_shuffle reads.
        return nn.functional.pixel_shuffle(torch.stack(outputs, dim=2).flatten(1, 2), 2)


def is_subpixel_convertible(module: nn.Module) -> bool:
    """Whether `SubpixelConvTranspose` can replace ``module`` (the CenterNet neck's deconvs:
    kernel 4, stride 2, padding 1, no output padding, dilation 1, one group)."""
    return (isinstance(module, nn.ConvTranspose2d) and module.kernel_size == (4, 4)
            and module.stride == (2, 2) and module.padding == (1, 1)
            and module.output_padding == (0, 0) and module.dilation == (1, 1)
            and module.groups == 1)


def subpixel_deconvs(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every `is_subpixel_convertible` transposed conv replaced by a
    `SubpixelConvTranspose`; ``model`` itself when it has none. Other transposed convs (DLA's
    grouped bilinear up-sampling) stay."""
    if not any(is_subpixel_convertible(module) for module in model.modules()):
        return model
    converted = copy.deepcopy(model)
    for path, module in list(converted.named_modules()):
        if is_subpixel_convertible(module):
            parent_path, _, name = path.rpartition(".")
            parent = converted.get_submodule(parent_path) if parent_path else converted
            setattr(parent, name, SubpixelConvTranspose(module))
    return converted


def fuse_heads(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose heads run as `FusedHeads`; ``model`` itself when its heads are
    not all 3x3 conv + ReLU + 1x1 conv reading one feature map (multi-stack hourglass, heads
    without head_conv) or are not the CenterNet head type's per-output heads (a `HeadSet`:
    TTFNet's box branch scales its output, which `FusedHeads` would drop). For inference: a
    pruned model keeps its per-head widths."""
    heads = getattr(model, "heads", None)
    if not isinstance(model, CenterNet) or not isinstance(heads, HeadSet):
        return model
    shapes = [[type(layer) for layer in head] for head in heads.values()]
    if any(shape != [nn.Conv2d, nn.ReLU, nn.Conv2d] for shape in shapes):
        return model
    fused = copy.deepcopy(model)
    firsts = [head[0] for head in fused.heads.values()]
    if any(conv.kernel_size != firsts[0].kernel_size or conv.padding != firsts[0].padding
           or conv.bias is None for conv in firsts):
        return model
    first = nn.Conv2d(firsts[0].in_channels, sum(conv.out_channels for conv in firsts),
                      firsts[0].kernel_size, padding=firsts[0].padding)
    first = first.to(device=firsts[0].weight.device, dtype=firsts[0].weight.dtype)
    with torch.no_grad():
        first.weight.copy_(torch.cat([conv.weight for conv in firsts]))
        first.bias.copy_(torch.cat([conv.bias for conv in firsts]))
    fused.heads = FusedHeads(first, {name: head[2] for name, head in fused.heads.items()})
    return fused


def side_multiple(spec: InputSpec) -> int:
    """Image sides the model maps exactly to input / down_ratio: multiples of ``pad + 1``, the
    keep-resolution padding of its input spec (32 for ResNet and DLA, 128 for hourglass)."""
    return spec.pad + 1


def _example_input(spec: InputSpec, input_size: tuple[int, int] | None, batch: int) -> Tensor:
    height, width = input_size or spec.input_size
    multiple = side_multiple(spec)
    if height % multiple or width % multiple:
        raise ExportError(
            f"input size {height}x{width}: expected sides that are multiples of {multiple} "
            "(the model's input spec pads to that)"
        )
    # Mid-range values: a zero image would give a flat heatmap, where every cell is a peak.
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))


def dynamic_shapes_spec(spec: InputSpec) -> dict:
    """torch.export dynamic shapes for the ``images`` input: any batch, sides any multiple of
    `side_multiple` up to 8192 pixels."""
    from torch.export import Dim

    multiple = side_multiple(spec)
    most_blocks = 8192 // multiple
    batch = Dim("batch", min=1, max=1024)
    height_blocks = Dim("height_blocks", min=1, max=most_blocks)
    width_blocks = Dim("width_blocks", min=1, max=most_blocks)
    return {"images": {0: batch, 2: multiple * height_blocks, 3: multiple * width_blocks}}


def prepare_for_export(
    model: nn.Module,
    spec: InputSpec,
    *,
    head: str = "centernet",
    decode: bool = False,
    max_detections: int = 100,
    raw_pixels: bool = False,
    subpixel: bool = False,
) -> DeployModel:
    """The eval-mode, BN-folded `DeployModel` both exporters trace (``model`` is not changed);
    with ``subpixel`` its neck's transposed convs rewritten by `subpixel_deconvs`."""
    folded = fold_batchnorm(model)
    return DeployModel(
        subpixel_deconvs(folded) if subpixel else folded, spec, head=head, decode=decode,
        max_detections=max_detections, raw_pixels=raw_pixels,
    ).eval()


def output_names(decode: bool, head: str = "centernet") -> list[str]:
    """The graph's output names: ``detections``, or the head type's raw outputs."""
    return ["detections"] if decode else list(head_type(head).outputs)


def export_program(
    model: nn.Module,
    spec: InputSpec,
    *,
    head: str = "centernet",
    decode: bool = False,
    max_detections: int = 100,
    raw_pixels: bool = False,
    dynamic: bool = False,
    input_size: tuple[int, int] | None = None,
    batch: int = 1,
    subpixel: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export`` of the prepared model (`prepare_for_export`), traced at ``input_size``
    (default the spec's) and ``batch`` (the fixed batch of a static program; at least 2 when
    ``dynamic``, since a batch of 1 would be specialised)."""
    deploy = prepare_for_export(
        model, spec, head=head, decode=decode, max_detections=max_detections,
        raw_pixels=raw_pixels, subpixel=subpixel,
    )
    example = _example_input(spec, input_size, max(batch, 2) if dynamic else batch)
    with torch.no_grad():
        return torch.export.export(
            deploy, (example,), dynamic_shapes=dynamic_shapes_spec(spec) if dynamic else None
        )


def export_pt2(path: str | Path, model: nn.Module, spec: InputSpec, **options) -> Path:
    """Write a ``torch.export`` program (``.pt2``); options as `export_program`. Load it with
    ``torch.export.load(path).module()``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(export_program(model, spec, **options), path)
    return path


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"ONNX export needs the package {module!r}: pip install 'ctprune[export]'"
        ) from None


def _deform_conv_translation():
    """ONNX DeformConv for ``torchvision::deform_conv2d`` (an onnxscript trace-only function).

    torchvision's op and ONNX's take the same tensors in a different order and the same offset
    layout ((dy, dx) pairs per kernel tap and offset group), so it is a one-node translation;
    kernel_shape is inferred from the weight. torchvision passes a mask of ones with
    ``use_mask=False`` when there is none; ONNX's default mask is also ones.
    """
    from onnxscript import opset19 as op

    def deform_conv2d(
        input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
        dilation_h, dilation_w, groups, offset_groups, use_mask,
    ):
        return op.DeformConv(
            input, weight, offset, bias, mask if use_mask else None,
            strides=[stride_h, stride_w],
            pads=[pad_h, pad_w, pad_h, pad_w],
            dilations=[dilation_h, dilation_w],
            group=groups,
            offset_group=offset_groups,
        )

    return deform_conv2d


def uses_deform_conv(onnx_model) -> bool:
    return any(node.op_type == "DeformConv" for node in onnx_model.graph.node)


def check_runtime_supports(onnx_model) -> None:
    """Raise ExportError naming the needed version when the installed onnxruntime lacks a
    kernel this graph uses (today: DeformConv, from `DEFORM_CONV_MIN_ORT`)."""
    if not uses_deform_conv(onnx_model):
        return
    onnxruntime = _require("onnxruntime")
    installed = tuple(int(part) for part in onnxruntime.__version__.split(".")[:2])
    needed = tuple(int(part) for part in DEFORM_CONV_MIN_ORT.split(".")[:2])
    if installed < needed:
        raise ExportError(
            f"this model uses deformable convolution (ONNX DeformConv, opset 19); onnxruntime "
            f"{onnxruntime.__version__} has no kernel for it: onnxruntime>={DEFORM_CONV_MIN_ORT} "
            "runs it (the .onnx file itself is valid for any runtime that implements DeformConv)"
        )


def onnx_metadata(model: nn.Module, model_config: ModelConfig, *, decode: bool,
                  raw_pixels: bool, max_detections: int, precision: str = "fp32") -> dict:
    """The metadata `export_onnx` stores (key -> JSON text): `MODEL_CONFIG_KEY` the model
    config (input spec, head type, class names), `GRAPH_KEY` what the graph computes
    (``outputs``: the head type's raw outputs or ``detections``, ``raw_pixels``,
    ``max_detections``), its ``precision``, the ``params`` of the fp32 model (a quantized
    file keeps its fp32 twin's count), its ``macs`` at the config's ``input_size`` (scale by
    the image area for other sizes: the network is fully convolutional) and
    ``output_layer_weights``: the initializer names of
    the layers that must stay in floating point (`detector.models.output_layers`: every head's
    last conv and the deformable convs' offset convs), which quantization reads."""
    paths = {id(module): name for name, module in model.named_modules()}
    # DeployModel wraps the model as ``model``: its parameters are named ``model.<path>``.
    output_weights = [f"model.{paths[id(layer)]}.weight" for layer in output_layers(model)]
    graph = {
        "outputs": output_names(decode, model_config.head),
        "raw_pixels": raw_pixels,
        "max_detections": max_detections if decode else None,
        "precision": precision,
        "params": count_parameters(model),
        "macs": count_macs(model, tuple(model_config.input.input_size)),
        "input_size": list(model_config.input.input_size),
        "output_layer_weights": output_weights,
    }
    return {MODEL_CONFIG_KEY: json.dumps(to_dict(model_config)), GRAPH_KEY: json.dumps(graph)}


def set_metadata(onnx_model, metadata: dict[str, str]) -> None:
    """Write ``metadata`` into ``onnx_model``'s metadata_props (replacing equal keys)."""
    kept = [prop for prop in onnx_model.metadata_props if prop.key not in metadata]
    del onnx_model.metadata_props[:]
    onnx_model.metadata_props.extend(kept)
    for key, value in metadata.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, value


def float_nodes(onnx_model, output_layer_weights: list[str]) -> list[str]:
    """Names of the nodes quantization must leave in floating point: the nodes whose weight is
    one of ``output_layer_weights`` (the heads' last convs, DCN offset convs), every node that
    reads their outputs directly or further down (the decoding of a ``decode`` graph), and
    `FLOAT_OP_TYPES`. Quantization and the fp16 conversion keep them in fp32: the raw outputs
    keep their precision and quantized or fp16 scores would tie at the peaks TopK ranks. Raises when
    a named weight is in no node (the metadata does not belong to this graph)."""
    nodes = list(onnx_model.graph.node)
    for index, node in enumerate(nodes):
        if not node.name:  # nodes_to_exclude needs names; exporters name every node anyway
            node.name = f"{node.op_type}_{index}"
    weights = set(output_layer_weights)
    roots = [node for node in nodes if len(node.input) > 1 and node.input[1] in weights]
    found = {node.input[1] for node in roots}
    if found != weights:
        raise ExportError(
            f"the graph has no conv reading {sorted(weights - found)}: its metadata "
            "(output_layer_weights) does not describe it; export it again"
        )
    readers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    kept, stack = {}, list(roots)
    while stack:
        node = stack.pop()
        if node.name in kept:
            continue
        kept[node.name] = node
        for output in node.output:
            stack += readers.get(output, [])
    kept.update({node.name: node for node in nodes if node.op_type in FLOAT_OP_TYPES})
    return sorted(kept)


def convert_to_fp16(onnx_model):
    """``onnx_model`` (with ctprune metadata) with its weights and arithmetic in float16,
    except `float_nodes` (heads' last convs, decoding, deformable convs), with float32 input
    and outputs (onnxruntime's converter inserts the casts), and ``precision: fp16``."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    props = {prop.key: prop.value for prop in onnx_model.metadata_props}
    graph = json.loads(props[GRAPH_KEY])
    keep = float_nodes(onnx_model, graph.get("output_layer_weights", []))
    converted = convert_float_to_float16(onnx_model, keep_io_types=True, node_block_list=keep)
    set_metadata(converted, {GRAPH_KEY: json.dumps({**graph, "precision": "fp16"})})
    return converted


def export_onnx(
    path: str | Path,
    model: nn.Module,
    spec: InputSpec,
    *,
    model_config: ModelConfig | None = None,
    head: str = "centernet",
    decode: bool = False,
    max_detections: int = 100,
    raw_pixels: bool = False,
    dynamic: bool = False,
    input_size: tuple[int, int] | None = None,
    batch: int = 1,
    simplify: bool = True,
    precision: str = "fp32",
    subpixel: bool = False,
) -> Path:
    """Write ``model`` as ONNX (opset `ONNX_OPSET`) through torch.export, check it with
    ``onnx.checker``, simplify it with onnxslim and check it again.

    Input ``images`` (B, 3, H, W); outputs the head type's raw outputs (centernet: ``heatmap``,
    ``wh``, ``offset``) or, with ``decode``, ``detections`` (B, K, 6) in input pixels (see
    `DeployModel`; ``head`` is the model config's ``head``). ``dynamic``: batch and image
    sides (multiples of `side_multiple`) are free; otherwise the graph takes ``batch`` images of
    ``input_size``. With ``model_config`` (whose input spec must be ``spec``) the file's
    metadata describes the model (`onnx_metadata`); ``precision`` fp16 (which needs it)
    converts the graph with `convert_to_fp16`; ``subpixel`` rewrites the neck's transposed
    convs (`subpixel_deconvs`). Raises ExportError when a package is missing.
    """
    onnx = _require("onnx")
    _require("onnxscript")
    if precision not in PRECISIONS:
        raise ExportError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "fp32" and model_config is None:
        raise ExportError(f"precision {precision}: needs the model config (its metadata names "
                          "the layers kept in fp32)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(
        model, spec, head=head, decode=decode, max_detections=max_detections,
        raw_pixels=raw_pixels, dynamic=dynamic, input_size=input_size, batch=batch,
        subpixel=subpixel,
    )
    translations = {}
    if hasattr(torch.ops, "torchvision") and hasattr(torch.ops.torchvision, "deform_conv2d"):
        translations[torch.ops.torchvision.deform_conv2d.default] = _deform_conv_translation()
    onnx_program = torch.onnx.export(
        program,
        input_names=["images"],
        output_names=output_names(decode, head),
        opset_version=ONNX_OPSET,
        dynamo=True,
        custom_translation_table=translations,
        optimize=True,
        verbose=False,
    )
    onnx_model = onnx_program.model_proto
    onnx.checker.check_model(onnx_model, full_check=True)
    if simplify:
        onnxslim = _require("onnxslim")
        onnx_model = onnxslim.slim(onnx_model)
        onnx.checker.check_model(onnx_model, full_check=True)
    if model_config is not None:
        metadata = onnx_metadata(model, model_config, decode=decode, raw_pixels=raw_pixels,
                                 max_detections=max_detections)
        graph = json.loads(metadata[GRAPH_KEY])
        metadata[GRAPH_KEY] = json.dumps({**graph, "subpixel_deconvs": subpixel})
        set_metadata(onnx_model, metadata)
    if precision == "fp16":
        onnx_model = convert_to_fp16(onnx_model)
    onnx.save(onnx_model, path)
    return path


def onnx_session(
    path: str | Path, threads: int | None = None, optimize: bool = True, spinning: bool = True
):
    """An onnxruntime CPU (or CUDA when available) session for an exported file, with all
    graph optimisations and ``threads`` intra-op threads (None: onnxruntime's default);
    ``spinning=False`` lets idle pool threads sleep instead of spinning (less CPU burnt on a
    shared machine, slightly higher latency on an idle one)."""
    onnx = _require("onnx")
    onnxruntime = _require("onnxruntime")
    check_runtime_supports(onnx.load(str(path), load_external_data=False))
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = (
        onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = onnxruntime.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return onnxruntime.InferenceSession(str(path), options, providers=providers)
