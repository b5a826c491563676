"""The head table: a plain dict from head-type name to what a head type is made of.

A head type is everything that depends on what the model predicts per output-map cell: the
outputs the model builds (name -> channels), how one image's boxes become training targets, the
loss of the model's outputs against a batch of those targets, and the decoder from one stack's
raw outputs to detections. ``model.head`` in a recipe or checkpoint names an entry (default
"centernet"), as ``model.arch`` names a backbone in `detector.models.ARCHITECTURES`;
`build_model`, the dataset, evaluation, the predictor and export all look it up here
(`head_type`).

TTFNet (``ttfnet``: outputs ``heatmap`` and ``ltrb``, its own Gaussian targets, GIoU loss,
ltrb decoder; `detector.ttfnet`) is the second entry, the keypoint triplet (``triplet``:
``tl_heatmap``, ``br_heatmap``, ``ct_heatmap``, embeddings and offsets; `detector.triplet`) the
third, with its own merge of test scales (`ScaleMerge`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor, nn

from .inference.decode import decode_centernet
from .losses import centernet_loss, heatmap_loss_named
from .models.centernet import HeadFactory, per_output_heads
from .targets import encode_targets
from .triplet.decode import (
    decode_triplet,
    merge_triplet_scales,
    triplet_scale_arrays,
    triplet_scale_arrays_to_image,
)
from .triplet.heads import build_triplet_heads
from .triplet.loss import triplet_loss
from .triplet.targets import encode_triplet_targets
from .ttfnet.decode import decode_ttfnet
from .ttfnet.heads import build_ttfnet_heads
from .ttfnet.loss import ttfnet_loss
from .ttfnet.targets import encode_ttfnet_targets

if TYPE_CHECKING:
    from .engine.config import TrainConfig

LossFn = Callable[[list[dict[str, Tensor]], dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class ScaleMerge:
    """How a head type merges the test scales of one image (`detector.inference.Predictor`
    with several ``scales``), when decoding each scale to detections and merging those with
    soft-NMS (`detector.inference.tta.merge_multiscale`, the default) is not what its original
    does. The keypoint triplet pools every scale's corner pairs *before* centre matching and
    merges them with its own soft-NMS: `detector.triplet.decode.merge_triplet_multiscale`."""

    decode: Callable[[dict[str, Tensor], dict[str, Tensor] | None, int], dict[str, Tensor]]
    """(one stack's raw outputs of one scale, the mirrored images' or None, max detections) ->
    named (B, ...) tensors in output-map coordinates."""
    to_image: Callable[[dict[str, np.ndarray], np.ndarray], dict[str, np.ndarray]]
    """(one image's arrays of `decode`, its 2x3 output-map -> image affine) -> the arrays in
    image pixels."""
    merge: Callable[..., np.ndarray]
    """(per scale the image's arrays in image pixels, the scales, num_classes, max_detections,
    soft_nms method) -> (M, 6) x1, y1, x2, y2, score, class in image pixels, best first."""

# In `HeadType.outputs`: one channel per class (a class heatmap).
NUM_CLASSES = "num_classes"


@dataclass(frozen=True)
class HeadType:
    """One head type: its outputs and the plain functions that train and decode them."""

    outputs: dict[str, int | str]
    """Output name -> channels, in the order the heads are built and returned; `NUM_CLASSES`
    for one channel per class. Outputs named ``heatmap`` or ``*_heatmap`` are class heatmaps
    (logits: their last bias starts at the prior), the others regressions
    (`detector.models.centernet.is_class_heatmap`)."""
    encode_targets: Callable[..., dict[str, np.ndarray]]
    """(boxes, labels, num_classes, output_size, max_objects, min_overlap, radius_variant) ->
    one image's targets as numpy arrays (boxes in output-map coordinates), as
    `detector.targets.encode_targets`; the dataset batches every array it returns."""
    loss: Callable[[list[dict[str, Tensor]], dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]
    """(model outputs: one dict per stack, batched targets) -> (total, detached parts), as
    `detector.losses.centernet_loss`."""
    decode: Callable[[dict[str, Tensor], dict[str, Tensor] | None, int], Tensor]
    """(one stack's raw outputs, the mirrored images' outputs for the flip test or None,
    max detections) -> (B, K, 6) x1, y1, x2, y2 in output-map coordinates, score, class; as
    `detector.inference.decode.decode_centernet`. Must stay traceable by torch.export (the
    exported graph runs it)."""

    build_heads: Callable[[int, int, dict[str, int]], nn.Module] = per_output_heads
    """(in_channels, head_conv, output channels) -> one stack's heads: a module mapping the
    neck's features to the dict of raw outputs, with ``output_convs()`` (the convs pruning
    never cuts), as `detector.models.centernet.per_output_heads`."""

    loss_terms: tuple[str, ...] = ("heatmap", "wh", "offset")
    """The names of the loss's terms (its parts besides "total"), which
    ``train.balance_magnitudes`` names (`detector.engine.config.LOSS_TERM_NAMES` is their
    union over the table)."""

    merge_scales: ScaleMerge | None = None
    """How several test scales are merged; None: each scale decoded by ``decode`` and the
    detections merged with per-class soft-NMS (`detector.inference.tta.merge_multiscale`, the
    original CenterNet's merge)."""

    def output_channels(self, num_classes: int) -> dict[str, int]:
        """Output name -> channels for a model of ``num_classes`` classes."""
        return {
            name: num_classes if channels == NUM_CLASSES else channels
            for name, channels in self.outputs.items()
        }


HEADS: dict[str, HeadType] = {
    "centernet": HeadType(
        outputs={"heatmap": NUM_CLASSES, "wh": 2, "offset": 2},
        encode_targets=encode_targets,
        loss=centernet_loss,
        decode=decode_centernet,
    ),
    # TTFNet (`detector.ttfnet`): Gaussian-area box targets, GIoU loss, ltrb decoder.
    "ttfnet": HeadType(
        outputs={"heatmap": NUM_CLASSES, "ltrb": 4},
        encode_targets=encode_ttfnet_targets,
        loss=ttfnet_loss,
        decode=decode_ttfnet,
        build_heads=build_ttfnet_heads,
        loss_terms=("heatmap", "ltrb"),
    ),
    # The keypoint triplet (`detector.triplet`, Duan et al.): corner and center heatmaps with
    # cascade corner / center pooling, associative embeddings, offsets; corner pairs kept when
    # a center keypoint confirms them.
    "triplet": HeadType(
        outputs={
            "tl_heatmap": NUM_CLASSES,
            "br_heatmap": NUM_CLASSES,
            "ct_heatmap": NUM_CLASSES,
            "tl_embedding": 1,
            "br_embedding": 1,
            "tl_offset": 2,
            "br_offset": 2,
            "ct_offset": 2,
        },
        encode_targets=encode_triplet_targets,
        loss=triplet_loss,
        decode=decode_triplet,
        build_heads=build_triplet_heads,
        loss_terms=("heatmap", "pull", "push", "offset"),
        # The original pools the candidates of every scale and matches centres once.
        merge_scales=ScaleMerge(
            decode=triplet_scale_arrays,
            to_image=triplet_scale_arrays_to_image,
            merge=merge_triplet_scales,
        ),
    ),
}


def head_type(name: str) -> HeadType:
    """The entry of `HEADS` called ``name``; a ValueError listing the known ones otherwise."""
    if name not in HEADS:
        raise ValueError(f"unknown head type {name!r}; known head types: {', '.join(HEADS)}")
    return HEADS[name]


def head_type_of(model: nn.Module) -> str:
    """The head type of a built model: its head modules' ``head_type`` (every head type's
    ``build_heads`` module names its table entry); a ValueError for a model without heads."""
    for module in model.modules():
        name = getattr(module, "head_type", None)
        if isinstance(name, str) and callable(getattr(module, "output_convs", None)):
            return name
    raise ValueError(f"{type(model).__name__} has no head module (none declares its head_type)")


def head_factory(head: str, num_classes: int) -> HeadFactory:
    """``make_heads(in_channels, head_conv, options=None)`` for head type ``head`` and a model
    of ``num_classes`` classes: what every backbone family in `detector.models.ARCHITECTURES`
    calls to build its heads. ``options`` maps head-type names to keyword arguments for that
    type's ``build_heads``: a family's original settings for one head type (TTFNet-34's two box
    convs: ``{"ttfnet": {"ltrb_convs": 2}}``); entries for other head types are ignored."""
    entry = head_type(head)
    outputs = entry.output_channels(num_classes)

    def make_heads(
        in_channels: int, head_conv: int, options: dict[str, dict] | None = None
    ) -> nn.Module:
        return entry.build_heads(in_channels, head_conv, outputs, **(options or {}).get(head, {}))

    return make_heads


def task_loss(head: str, config: TrainConfig, *, balanced: bool = True) -> LossFn:
    """Head type ``head``'s loss with the recipe's loss switches: the one place a training
    config becomes a loss, used by `fit`, the validation loss and distillation's task term.

    ``config.heatmap_loss`` picks the loss on the class heatmaps (`HEATMAP_LOSSES`);
    ``config.balance_losses`` rescales the head's terms named in ``config.balance_magnitudes``
    to those magnitudes (centerX's loss balancing, `detector.losses.combine_terms`), unless
    ``balanced`` is False: the validation loss is computed unbalanced, since a balanced total is
    worth the sum of the magnitudes whatever the model does and could not select a best model.
    """
    entry = head_type(head)
    balance = None
    if balanced and config.balance_losses:
        terms = entry.loss_terms
        # The magnitudes cover every head's terms; each head balances those it has.
        balance = {
            name: magnitude
            for name, magnitude in config.balance_magnitudes.items()
            if name in terms
        }
    return partial(
        entry.loss, heatmap_loss=heatmap_loss_named(config.heatmap_loss), balance=balance
    )
