"""Training loss of the keypoint-triplet CenterNet, as the original computes it (Duan et al.,
github:Duankaiwen/CenterNet ``models/py_utils/kp.py`` ``AELoss`` with ``kp_utils._neg_loss``,
``_ae_loss`` and ``_regr_loss``; the simple CenterNet-47's ``utils/losses.py`` gives the same
numbers).

Shapes: B images, C classes, H x W output map, M object slots (`encode_triplet_targets`'
max_objects). Predictions are the model's raw head outputs (one dict per stack: heatmap logits,
embeddings (B, 1, H, W), offsets (B, 2, H, W)); targets the `encode_triplet_targets` arrays,
batched. The original's model gathers embeddings and offsets at the target cells inside its
forward pass in training mode; here the model returns dense maps in every mode and the loss
gathers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import HeatmapLoss, _gather_at, clamped_sigmoid, combine_terms, focal_loss

# The original's guard against dividing by zero objects, in the pull, push and offset terms.
EPSILON = 1e-4
# Two corners whose embeddings differ by at least this margin are not pushed further apart.
PUSH_MARGIN = 1.0
KEYPOINTS = ("tl", "br", "ct")


@dataclass(frozen=True)
class TripletLossWeights:
    """Weights of the triplet loss terms (the original's ``AELoss(pull_weight=0.1,
    push_weight=0.1)``, focal and offset weight 1); frozen, so a shared default is safe."""

    heatmap: float = 1.0
    """Weight of the focal loss (summed over the three heatmaps)."""
    pull: float = 0.1
    """Weight of the pull term, which draws an object's two corner embeddings together."""
    push: float = 0.1
    """Weight of the push term, which drives different objects' embeddings apart."""
    offset: float = 1.0
    """Weight of the smooth-L1 offset loss (summed over the three keypoint kinds)."""


def associative_embedding_loss(
    tl_embedding: Tensor, br_embedding: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Pull and push of the corners' embeddings, the original's ``_ae_loss``.

    tl_embedding, br_embedding: (B, M) embedding of each object's top-left / bottom-right
        corner; mask: (B, M), 1 for slots holding an object.

    With n_b objects in image b, e_k the mean of object k's two embeddings and
    ``eps = 1e-4``::

        pull = sum_b sum_k [(tl_k - e_k)^2 + (br_k - e_k)^2] / (n_b + eps)
        push = sum_b sum_{j,k} [relu(1 - |e_j - e_k|) - 1 / (n_b + eps)]
                              / ((n_b - 1) n_b + eps)

    The push sum runs over all ordered pairs of objects *including* j = k, as the original:
    subtracting 1 / n_b per pair cancels the n_b diagonal terms only up to eps, so an image with
    a single object contributes ``(1 - 1/(1 + eps)) / eps`` (about 1) to push. Kept for the
    original's numbers. Returns (pull, push), scalars, float32.
    """
    if tl_embedding.shape != br_embedding.shape or tl_embedding.shape != mask.shape:
        raise ValueError(
            "associative_embedding_loss: tl_embedding, br_embedding and mask must all be "
            f"(B, M), got {tuple(tl_embedding.shape)}, {tuple(br_embedding.shape)} and "
            f"{tuple(mask.shape)}"
        )
    mask = mask.float()
    count = mask.sum(dim=1, keepdim=True)  # (B, 1)
    mean = (tl_embedding + br_embedding) / 2
    pull = (
        (tl_embedding - mean).pow(2) / (count + EPSILON) * mask
    ).sum() + ((br_embedding - mean).pow(2) / (count + EPSILON) * mask).sum()

    pair_mask = mask.unsqueeze(1) * mask.unsqueeze(2)  # (B, M, M)
    count = count.unsqueeze(2)  # (B, 1, 1)
    distance = F.relu(PUSH_MARGIN - torch.abs(mean.unsqueeze(1) - mean.unsqueeze(2)))
    distance = (distance - 1 / (count + EPSILON)) / ((count - 1) * count + EPSILON)
    push = (distance * pair_mask).sum()
    return pull, push


def offset_loss(output: Tensor, mask: Tensor, index: Tensor, target: Tensor) -> Tensor:
    """The original's ``_regr_loss``: smooth L1 (beta 1) between a dense offset map read at the
    object cells and the targets, summed and divided by the number of objects (not by objects
    times 2, unlike `detector.losses.reg_l1_loss`).

    output: (B, 2, H, W); mask: (B, M); index: (B, M) int64 flat cells; target: (B, M, 2).
    ``L = sum_masked smooth_l1(pred - target) / (sum(mask) + 1e-4)``.
    """
    if output.dim() != 4:
        raise ValueError(f"offset_loss: output must be (B, D, H, W), got {tuple(output.shape)}")
    batch, channels = output.shape[:2]
    if index.dim() != 2 or index.shape[0] != batch or mask.shape != index.shape:
        raise ValueError(
            f"offset_loss: index and mask must be (B, M) with B = {batch}, got "
            f"{tuple(index.shape)} and {tuple(mask.shape)}"
        )
    if target.shape != (batch, index.shape[1], channels):
        raise ValueError(
            f"offset_loss: target must be (B, M, D) = {(batch, index.shape[1], channels)}, got "
            f"{tuple(target.shape)}"
        )
    pred = _gather_at(output.float(), index.long())
    expanded_mask = mask.float().unsqueeze(2).expand_as(pred)
    error = F.smooth_l1_loss(pred, target.float(), reduction="none", beta=1.0)
    return (error * expanded_mask).sum() / (mask.float().sum() + EPSILON)


_OUTPUT_KEYS = tuple(
    f"{keypoint}_{kind}" for kind in ("heatmap", "offset") for keypoint in KEYPOINTS
) + ("tl_embedding", "br_embedding")
_BATCH_KEYS = tuple(
    f"{keypoint}_{kind}" for kind in ("heatmap", "offset", "index") for keypoint in KEYPOINTS
) + ("mask",)


def triplet_loss(
    outputs: list[dict[str, Tensor]],
    batch: dict[str, Tensor],
    weights: TripletLossWeights = TripletLossWeights(),  # noqa: B008 (frozen, so safe to share)
    *,
    heatmap_loss: HeatmapLoss = focal_loss,
    balance: dict[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total keypoint-triplet loss and its detached parts.

    outputs: the model's list of per-stack dicts: "tl_heatmap", "br_heatmap", "ct_heatmap"
        (B, C, H, W) logits, "tl_embedding", "br_embedding" (B, 1, H, W), "tl_offset",
        "br_offset", "ct_offset" (B, 2, H, W). Every stack is supervised.
    batch: `encode_triplet_targets`' arrays, batched: the three heatmaps (B, C, H, W), indices
        (B, M), offsets (B, M, 2) and "mask" (B, M).
    weights: the term weights, by default the original's.
    heatmap_loss: (probabilities, target heatmap) -> scalar, applied to each of the three
        heatmaps after `clamped_sigmoid`; by default CornerNet's focal loss.
    balance: term name -> fixed magnitude, centerX's loss balancing
        (`detector.losses.combine_terms`).

    Per stack: heatmap = the sum of the three heatmap losses; pull, push from
    `associative_embedding_loss` on the corner embeddings read at the corner cells; offset = the
    sum of the three `offset_loss` terms. Each is averaged over the stacks, then
    ``total = heatmap_w * heatmap + pull_w * pull + push_w * push + offset_w * offset``, which
    is the original's loss. Returns (total, {"heatmap", "pull", "push", "offset", "total"}),
    the dict values detached and unweighted (the original logs pull and push already weighted).
    """
    if not outputs:
        raise ValueError("triplet_loss: outputs is empty; expected one dict per stack")
    for key in _BATCH_KEYS:
        if key not in batch:
            raise ValueError(f"triplet_loss: batch has no {key!r} entry")
    for stack, output in enumerate(outputs):
        for key in _OUTPUT_KEYS:
            if key not in output:
                raise ValueError(f"triplet_loss: outputs[{stack}] has no {key!r} entry")

    mask = batch["mask"]
    heatmap_terms, pull_terms, push_terms, offset_terms = [], [], [], []
    device_type = outputs[0]["tl_heatmap"].device.type
    # float32 throughout, also under autocast, as `centernet_loss`.
    with torch.autocast(device_type=device_type, enabled=False):
        for output in outputs:
            heatmap_terms.append(
                sum(
                    heatmap_loss(
                        clamped_sigmoid(output[f"{keypoint}_heatmap"].float()),
                        batch[f"{keypoint}_heatmap"],
                    )
                    for keypoint in KEYPOINTS
                )
            )
            embeddings = [
                _gather_at(output[f"{corner}_embedding"].float(), batch[f"{corner}_index"].long())
                .squeeze(2)
                for corner in ("tl", "br")
            ]
            pull, push = associative_embedding_loss(*embeddings, mask)
            pull_terms.append(pull)
            push_terms.append(push)
            offset_terms.append(
                sum(
                    offset_loss(
                        output[f"{keypoint}_offset"],
                        mask,
                        batch[f"{keypoint}_index"],
                        batch[f"{keypoint}_offset"],
                    )
                    for keypoint in KEYPOINTS
                )
            )
        stacks = len(outputs)
        terms = {
            "heatmap": sum(heatmap_terms) / stacks,
            "pull": sum(pull_terms) / stacks,
            "push": sum(push_terms) / stacks,
            "offset": sum(offset_terms) / stacks,
        }
        return combine_terms(
            terms,
            {
                "heatmap": weights.heatmap,
                "pull": weights.pull,
                "push": weights.push,
                "offset": weights.offset,
            },
            balance,
        )
