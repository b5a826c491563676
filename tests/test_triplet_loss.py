"""Keypoint-triplet loss: hand-computed pull/push, and parity with a transcription of the
original's AELoss on random outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from detector.losses import focal_loss
from detector.triplet.loss import (
    TripletLossWeights,
    associative_embedding_loss,
    offset_loss,
    triplet_loss,
)
from detector.triplet.targets import encode_triplet_targets

pytestmark = pytest.mark.timeout(60)


# --- slow reference: Duan et al.'s models/py_utils/kp_utils.py _neg_loss, _ae_loss, _regr_loss
# and kp.py AELoss.forward (github:Duankaiwen/CenterNet), written from reading them. The
# original's model gathers tags and offsets at the target indices in training mode
# (kp._train, _tranpose_and_gather_feat); the reference does that gather itself.


def reference_gather(feat, ind):
    feat = feat.permute(0, 2, 3, 1).contiguous()
    feat = feat.view(feat.size(0), -1, feat.size(3))
    dim = feat.size(2)
    return feat.gather(1, ind.unsqueeze(2).expand(ind.size(0), ind.size(1), dim))


def reference_neg_loss(preds, gt):
    pos_inds = gt.eq(1)
    neg_inds = gt.lt(1)
    neg_weights = torch.pow(1 - gt[neg_inds], 4)
    loss = 0
    for pred in preds:
        pos_pred = pred[pos_inds]
        neg_pred = pred[neg_inds]
        pos_loss = torch.log(pos_pred) * torch.pow(1 - pos_pred, 2)
        neg_loss = torch.log(1 - neg_pred) * torch.pow(neg_pred, 2) * neg_weights
        num_pos = pos_inds.float().sum()
        if pos_pred.nelement() == 0:
            loss = loss - neg_loss.sum()
        else:
            loss = loss - (pos_loss.sum() + neg_loss.sum()) / num_pos
    return loss


def reference_ae_loss(tag0, tag1, mask):
    num = mask.sum(dim=1, keepdim=True).float()
    tag0 = tag0.squeeze()
    tag1 = tag1.squeeze()
    tag_mean = (tag0 + tag1) / 2
    tag0 = torch.pow(tag0 - tag_mean, 2) / (num + 1e-4)
    tag0 = tag0[mask].sum()
    tag1 = torch.pow(tag1 - tag_mean, 2) / (num + 1e-4)
    tag1 = tag1[mask].sum()
    pull = tag0 + tag1
    mask = mask.unsqueeze(1).long() + mask.unsqueeze(2).long()
    mask = mask.eq(2)
    num = num.unsqueeze(2)
    num2 = (num - 1) * num
    dist = tag_mean.unsqueeze(1) - tag_mean.unsqueeze(2)
    dist = 1 - torch.abs(dist)
    dist = nn.functional.relu(dist)
    dist = dist - 1 / (num + 1e-4)
    dist = dist / (num2 + 1e-4)
    push = dist[mask].sum()
    return pull, push


def reference_regr_loss(regr, gt_regr, mask):
    num = mask.float().sum()
    mask = mask.unsqueeze(2).expand_as(gt_regr)
    regr_loss = nn.functional.smooth_l1_loss(regr[mask], gt_regr[mask], reduction="sum")
    return regr_loss / (num + 1e-4)


def reference_ae_total(outputs, batch):
    """AELoss(pull_weight=0.1, push_weight=0.1).forward: (loss, focal, pull, push, regr)."""
    sigmoid = lambda x: torch.clamp(x.sigmoid(), min=1e-4, max=1 - 1e-4)  # noqa: E731
    mask = batch["mask"].bool()
    focal = 0
    for kind in ("tl", "br", "ct"):
        focal += reference_neg_loss(
            [sigmoid(o[f"{kind}_heatmap"]) for o in outputs], batch[f"{kind}_heatmap"]
        )
    pull_loss = push_loss = 0
    for output in outputs:
        tl_tag = reference_gather(output["tl_embedding"], batch["tl_index"])
        br_tag = reference_gather(output["br_embedding"], batch["br_index"])
        pull, push = reference_ae_loss(tl_tag, br_tag, mask)
        pull_loss += pull
        push_loss += push
    pull_loss, push_loss = 0.1 * pull_loss, 0.1 * push_loss
    regr = 0
    for output in outputs:
        for kind in ("tl", "br", "ct"):
            gathered = reference_gather(output[f"{kind}_offset"], batch[f"{kind}_index"])
            regr += reference_regr_loss(gathered, batch[f"{kind}_offset"], mask)
    stacks = len(outputs)
    loss = (focal + pull_loss + push_loss + regr) / stacks
    return loss, focal / stacks, pull_loss / stacks, push_loss / stacks, regr / stacks


# --- helpers ------------------------------------------------------------------------------------


def random_batch(rng, batch_size, classes, size, slots):
    height, width = size
    items = []
    for image in range(batch_size):
        count = 0 if image == batch_size - 1 and batch_size > 2 else int(rng.integers(1, 5))
        x1 = rng.uniform(0, width - 3, count)
        y1 = rng.uniform(0, height - 3, count)
        boxes = np.stack(
            [x1, y1, np.minimum(x1 + rng.uniform(1, 9, count), width - 1),
             np.minimum(y1 + rng.uniform(1, 9, count), height - 1)],
            axis=1,
        ).astype(np.float32)
        items.append(
            encode_triplet_targets(boxes, rng.integers(0, classes, count), classes, size, slots)
        )
    return {key: torch.from_numpy(np.stack([item[key] for item in items])) for key in items[0]}


def random_outputs(generator, stacks, batch_size, classes, size):
    channels = {"heatmap": classes, "embedding": 1, "offset": 2}
    outputs = []
    for _ in range(stacks):
        output = {}
        for kind, count in channels.items():
            for keypoint in ("tl", "br", "ct"):
                if kind == "embedding" and keypoint == "ct":
                    continue
                output[f"{keypoint}_{kind}"] = torch.randn(
                    batch_size, count, *size, generator=generator
                )
        outputs.append(output)
    return outputs


# --- hand-computed cases ------------------------------------------------------------------------


def test_pull_and_push_of_two_objects_by_hand() -> None:
    # Object 1: embeddings 0.2 and 0.6 (mean 0.4); object 2: 1.0 and 1.4 (mean 1.2).
    tl = torch.tensor([[0.2, 1.0, 7.0]])
    br = torch.tensor([[0.6, 1.4, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third slot is empty
    pull, push = associative_embedding_loss(tl, br, mask)
    n, eps = 2, 1e-4
    assert pull.item() == pytest.approx(4 * 0.2**2 / (n + eps), rel=1e-5)
    # Ordered pairs including the diagonal: 2 x (1 - 1/n) + 2 x (relu(1 - 0.8) - 1/n).
    expected_push = (
        2 * (1 - 1 / (n + eps)) + 2 * ((1 - 0.8) - 1 / (n + eps))
    ) / ((n - 1) * n + eps)
    assert push.item() == pytest.approx(expected_push, rel=1e-5)
    assert push.item() == pytest.approx(0.2, abs=1e-3)


def test_push_of_a_single_object_is_about_one_as_in_the_original() -> None:
    pull, push = associative_embedding_loss(
        torch.tensor([[0.3]]), torch.tensor([[0.3]]), torch.tensor([[1.0]])
    )
    assert pull.item() == 0
    assert push.item() == pytest.approx((1 - 1 / (1 + 1e-4)) / 1e-4, rel=1e-3)


def test_far_apart_objects_are_not_pushed() -> None:
    _, push_far = associative_embedding_loss(
        torch.tensor([[0.0, 5.0]]), torch.tensor([[0.0, 5.0]]), torch.ones(1, 2)
    )
    _, push_near = associative_embedding_loss(
        torch.tensor([[0.0, 0.5]]), torch.tensor([[0.0, 0.5]]), torch.ones(1, 2)
    )
    assert push_far.item() == pytest.approx(0.0, abs=1e-3)
    assert push_near.item() > push_far.item() + 0.2


def test_offset_loss_is_smooth_l1_per_object() -> None:
    output = torch.zeros(1, 2, 4, 4)
    output[0, :, 1, 2] = torch.tensor([0.5, 3.0])  # cell index 1 * 4 + 2 = 6
    target = torch.tensor([[[0.0, 0.0], [9.0, 9.0]]])
    loss = offset_loss(output, torch.tensor([[1.0, 0.0]]), torch.tensor([[6, 0]]), target)
    # smooth L1: 0.5 * 0.5^2 = 0.125 for |0.5|, 3 - 0.5 = 2.5 for |3|; one object.
    assert loss.item() == pytest.approx((0.125 + 2.5) / (1 + 1e-4), rel=1e-6)


# --- parity with the original's AELoss ----------------------------------------------------------


@pytest.mark.parametrize("stacks", [1, 2])
def test_matches_the_original_aeloss(stacks) -> None:
    rng = np.random.default_rng(stacks)
    generator = torch.Generator().manual_seed(stacks)
    batch = random_batch(rng, 3, 2, (12, 16), 6)
    outputs = random_outputs(generator, stacks, 3, 2, (12, 16))
    total, parts = triplet_loss(outputs, batch)
    loss, focal, pull, push, regr = reference_ae_total(outputs, batch)
    assert total.item() == pytest.approx(loss.item(), rel=1e-5)
    assert parts["heatmap"].item() == pytest.approx(focal.item(), rel=1e-5)
    assert parts["pull"].item() * 0.1 == pytest.approx(pull.item(), rel=1e-5)
    assert parts["push"].item() * 0.1 == pytest.approx(push.item(), rel=1e-5)
    assert parts["offset"].item() == pytest.approx(regr.item(), rel=1e-5)
    assert parts["total"].item() == total.item()


def test_gradients_reach_every_output_and_logits_are_untouched() -> None:
    rng = np.random.default_rng(5)
    batch = random_batch(rng, 2, 2, (8, 8), 4)
    outputs = random_outputs(torch.Generator().manual_seed(5), 2, 2, 2, (8, 8))
    for output in outputs:
        for value in output.values():
            value.requires_grad_(True)
    before = outputs[0]["tl_heatmap"].detach().clone()
    total, _ = triplet_loss(outputs, batch)
    total.backward()
    assert torch.equal(outputs[0]["tl_heatmap"].detach(), before)
    for output in outputs:
        for name, value in output.items():
            assert value.grad is not None and value.grad.abs().sum() > 0, name


def test_heatmap_loss_and_weights_are_replaceable() -> None:
    rng = np.random.default_rng(6)
    batch = random_batch(rng, 2, 2, (8, 8), 4)
    outputs = random_outputs(torch.Generator().manual_seed(6), 1, 2, 2, (8, 8))
    calls = []

    def mean_squared(probabilities, target):
        calls.append(probabilities.shape)
        return ((probabilities - target) ** 2).mean()

    total, parts = triplet_loss(outputs, batch, heatmap_loss=mean_squared)
    assert len(calls) == 3
    expected = sum(
        mean_squared(
            torch.clamp(outputs[0][f"{k}_heatmap"].sigmoid(), 1e-4, 1 - 1e-4),
            batch[f"{k}_heatmap"],
        )
        for k in ("tl", "br", "ct")
    )
    assert parts["heatmap"].item() == pytest.approx(expected.item(), rel=1e-6)
    weights = TripletLossWeights(heatmap=0.0, pull=1.0, push=0.0, offset=0.0)
    total, parts = triplet_loss(outputs, batch, weights=weights, heatmap_loss=focal_loss)
    assert total.item() == pytest.approx(parts["pull"].item(), rel=1e-6)
    # centerX's balancing through combine_terms: a balanced term is worth its magnitude.
    total, parts = triplet_loss(outputs, batch, balance={"push": 2.0})
    expected = parts["heatmap"] + 0.1 * parts["pull"] + 2.0 + parts["offset"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="wh"):
        triplet_loss(outputs, batch, balance={"wh": 1.0})


def test_missing_entries_are_named() -> None:
    rng = np.random.default_rng(7)
    batch = random_batch(rng, 2, 2, (8, 8), 4)
    outputs = random_outputs(torch.Generator().manual_seed(7), 1, 2, 2, (8, 8))
    with pytest.raises(ValueError, match="'ct_index'"):
        triplet_loss(outputs, {k: v for k, v in batch.items() if k != "ct_index"})
    with pytest.raises(ValueError, match=r"outputs\[0\] has no 'br_embedding'"):
        triplet_loss([{k: v for k, v in outputs[0].items() if k != "br_embedding"}], batch)
    with pytest.raises(ValueError, match="empty"):
        triplet_loss([], batch)
