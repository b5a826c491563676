"""Losses: focal and L1 terms on tiny hand-computed examples, and their combination over stacks."""

from __future__ import annotations

import math

import pytest
import torch

from detector.losses import (
    LossWeights,
    centernet_loss,
    clamped_sigmoid,
    focal_loss,
    reg_l1_loss,
)


def test_clamped_sigmoid_clamps_and_leaves_its_input_alone() -> None:
    logits = torch.tensor([-100.0, 0.0, 100.0])
    probabilities = clamped_sigmoid(logits)
    assert probabilities.tolist() == pytest.approx([1e-4, 0.5, 1 - 1e-4])
    assert logits.tolist() == [-100.0, 0.0, 100.0]


def test_focal_loss_by_hand() -> None:
    pred = torch.tensor([0.8, 0.3, 0.1]).view(1, 1, 1, 3)
    gt = torch.tensor([1.0, 0.5, 0.0]).view(1, 1, 1, 3)
    positive = math.log(0.8) * 0.2**2
    negatives = math.log(0.7) * 0.3**2 * 0.5**4 + math.log(0.9) * 0.1**2 * 1.0**4
    assert focal_loss(pred, gt).item() == pytest.approx(-(positive + negatives) / 1, rel=1e-6)


def test_focal_loss_without_positives_is_the_unnormalised_negative_sum() -> None:
    pred = torch.tensor([0.8, 0.3, 0.1]).view(1, 1, 1, 3)
    gt = torch.tensor([0.99, 0.5, 0.0]).view(1, 1, 1, 3)
    negatives = (
        math.log(0.2) * 0.8**2 * 0.01**4 + math.log(0.7) * 0.3**2 * 0.5**4 + math.log(0.9) * 0.1**2
    )
    assert focal_loss(pred, gt).item() == pytest.approx(-negatives, rel=1e-5)


def test_focal_loss_counts_positives_over_the_whole_batch() -> None:
    pred = torch.tensor([[0.6, 0.2], [0.9, 0.4]]).view(2, 1, 1, 2)
    gt = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 1, 1, 2)
    terms = [
        math.log(0.6) * 0.4**2,
        math.log(0.8) * 0.2**2,
        math.log(0.9) * 0.1**2,
        math.log(0.6) * 0.4**2,
    ]
    assert focal_loss(pred, gt).item() == pytest.approx(-sum(terms) / 2, rel=1e-6)


def test_focal_loss_runs_in_float32_under_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    pred = clamped_sigmoid(torch.randn(2, 3, 4, 4, generator=generator)).bfloat16()
    gt = torch.rand(2, 3, 4, 4, generator=generator).bfloat16()
    gt[0, 1, 2, 2] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = focal_loss(pred, gt)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(focal_loss(pred.float(), gt.float()).item())


def test_focal_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        focal_loss(torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 4))


def test_reg_l1_loss_by_hand() -> None:
    # output (B=1, D=2, H=2, W=2); channel 0 holds 0..3, channel 1 holds 10..13.
    output = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[10.0, 11.0], [12.0, 13.0]]]])
    index = torch.tensor([[3, 1, 0]])  # cells (x=1, y=1), (x=1, y=0), (0, 0)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    target = torch.tensor([[[2.5, 13.0], [1.0, 9.0], [100.0, 100.0]]])
    # |3 - 2.5| + |13 - 13| + |1 - 1| + |11 - 9| = 2.5 over 2 objects x 2 coordinates.
    loss = reg_l1_loss(output, mask, index, target)
    assert loss.item() == pytest.approx(2.5 / (2 * 2 + 1e-4), rel=1e-7)


def test_reg_l1_loss_without_objects_is_zero() -> None:
    loss = reg_l1_loss(
        torch.rand(2, 2, 3, 3),
        torch.zeros(2, 4),
        torch.zeros(2, 4, dtype=torch.long),
        torch.rand(2, 4, 2),
    )
    assert loss.item() == 0.0


def test_reg_l1_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="target must be"):
        reg_l1_loss(
            torch.rand(1, 2, 3, 3),
            torch.ones(1, 4),
            torch.zeros(1, 4, dtype=torch.long),
            torch.rand(1, 4, 3),
        )
    with pytest.raises(ValueError, match="index and mask"):
        reg_l1_loss(
            torch.rand(1, 2, 3, 3),
            torch.ones(1, 5),
            torch.zeros(1, 4, dtype=torch.long),
            torch.rand(1, 4, 2),
        )


def _tiny_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    heatmap = torch.rand(2, 3, 6, 6, generator=generator) * 0.9
    heatmap[0, 1, 2, 3] = 1.0
    heatmap[1, 0, 4, 4] = 1.0
    return {
        "heatmap": heatmap,
        "wh": torch.rand(2, 4, 2, generator=generator) * 5,
        "offset": torch.rand(2, 4, 2, generator=generator),
        "index": torch.tensor([[2 * 6 + 3, 0, 0, 0], [4 * 6 + 4, 0, 0, 0]]),
        "mask": torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]),
    }


def _tiny_outputs(generator: torch.Generator, stacks: int) -> list[dict[str, torch.Tensor]]:
    return [
        {
            name: torch.randn(2, channels, 6, 6, generator=generator)
            for name, channels in (("heatmap", 3), ("wh", 2), ("offset", 2))
        }
        for _ in range(stacks)
    ]


def test_centernet_loss_averages_stacks_and_applies_weights() -> None:
    generator = torch.Generator().manual_seed(1)
    batch = _tiny_batch(generator)
    outputs = _tiny_outputs(generator, stacks=2)
    logits_before = [output["heatmap"].clone() for output in outputs]
    weights = LossWeights(heatmap=2.0, wh=0.5, offset=3.0)

    total, parts = centernet_loss(outputs, batch, weights)

    def term(output: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name == "heatmap":
            return focal_loss(clamped_sigmoid(output["heatmap"]), batch["heatmap"])
        return reg_l1_loss(output[name], batch["mask"], batch["index"], batch[name])

    for name in ("heatmap", "wh", "offset"):
        expected = (term(outputs[0], name) + term(outputs[1], name)) / 2
        assert parts[name].item() == pytest.approx(expected.item(), rel=1e-6)
    expected_total = 2.0 * parts["heatmap"] + 0.5 * parts["wh"] + 3.0 * parts["offset"]
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-6)
    assert parts["total"].item() == total.item()
    assert all(not part.requires_grad for part in parts.values())
    # The model's outputs are not overwritten (the original's in-place sigmoid did that).
    assert all(
        torch.equal(output["heatmap"], before)
        for output, before in zip(outputs, logits_before, strict=True)
    )


def test_centernet_loss_default_weights_and_gradient() -> None:
    generator = torch.Generator().manual_seed(2)
    batch = _tiny_batch(generator)
    outputs = _tiny_outputs(generator, stacks=1)
    for output in outputs:
        for tensor in output.values():
            tensor.requires_grad_(True)
    total, parts = centernet_loss(outputs, batch)
    expected = parts["heatmap"] + 0.1 * parts["wh"] + parts["offset"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert all(tensor.grad is not None for tensor in outputs[0].values())


def test_centernet_loss_skips_a_missing_offset() -> None:
    generator = torch.Generator().manual_seed(3)
    batch = _tiny_batch(generator)
    outputs = _tiny_outputs(generator, stacks=1)
    del outputs[0]["offset"]
    total, parts = centernet_loss(outputs, batch)
    assert parts["offset"].item() == 0.0
    assert total.item() == pytest.approx((parts["heatmap"] + 0.1 * parts["wh"]).item(), rel=1e-6)


def test_centernet_loss_names_missing_keys() -> None:
    generator = torch.Generator().manual_seed(4)
    batch = _tiny_batch(generator)
    outputs = _tiny_outputs(generator, stacks=1)
    with pytest.raises(ValueError, match="batch has no 'index'"):
        centernet_loss(outputs, {key: value for key, value in batch.items() if key != "index"})
    with pytest.raises(ValueError, match=r"outputs\[0\] has no 'wh'"):
        centernet_loss([{"heatmap": outputs[0]["heatmap"]}], batch)
    with pytest.raises(ValueError, match="outputs is empty"):
        centernet_loss([], batch)
