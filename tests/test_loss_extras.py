"""centerX's training extras as recipe switches (train.heatmap_loss, train.balance_losses,
train.skip_loss_factor): the heatmap losses against hand-computed values and a slow loop
reference, balancing's values and gradients through the loss contract, `task_loss` as the one
place a config becomes a loss, and skip-loss in `fit` (no optimiser step at all, counted, kept
across a resume, one decision for every process)."""

import math
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch
from tiny import TinyDetectionData, child_environment, tiny_config
from torch.utils.data import default_collate

from detector.checkpoint import build_from_config
from detector.engine.config import CENTERX_BALANCE_MAGNITUDES, LOSS_TERM_NAMES, TrainConfig
from detector.engine.fit import SkipLoss, fit
from detector.engine.logs import epoch_line
from detector.engine.train import train_loader
from detector.heads import HEADS, NUM_CLASSES, HeadType, task_loss
from detector.losses import (
    HEATMAP_LOSSES,
    centernet_loss,
    clamped_sigmoid,
    combine_terms,
    focal_loss,
    heatmap_loss_named,
    ignore_unlabelled_focal_loss,
    mse_heatmap_loss,
)

pytestmark = pytest.mark.timeout(60)


def _batch(num_classes=3, size=2, seed=0):
    data = TinyDetectionData(length=size, num_classes=num_classes, seed=seed)
    return {key: torch.stack([item[key] for item in data.items]) for key in data.items[0]}


def _outputs(batch, seed=0, stacks=1):
    generator = torch.Generator().manual_seed(seed)
    batch_size, classes, height, width = batch["heatmap"].shape
    return [
        {
            "heatmap": torch.randn(batch_size, classes, height, width, generator=generator)
            .sub(2).requires_grad_(),
            "wh": torch.rand(batch_size, 2, height, width, generator=generator)
            .mul(8).requires_grad_(),
            "offset": torch.rand(batch_size, 2, height, width, generator=generator)
            .requires_grad_(),
        }
        for _ in range(stacks)
    ]


# -- heatmap losses ------------------------------------------------------------------------


def test_mse_heatmap_loss_is_the_mean_over_every_cell():
    pred = torch.tensor([[[[0.5, 0.2], [0.1, 0.9]]]])
    gt = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])
    # (0.25 + 0.09 + 0.01 + 0.81) / 4
    assert mse_heatmap_loss(pred, gt).item() == pytest.approx(0.29)


def test_ignore_unlabelled_focal_loss_by_hand():
    # One image, two classes, two cells: class 0 holds an object, class 1 none.
    pred = torch.tensor([[[[0.8, 0.3]], [[0.6, 0.2]]]])
    gt = torch.tensor([[[[1.0, 0.5]], [[0.0, 0.0]]]])
    positive = math.log(0.8) * 0.2**2
    negative_labelled = math.log(0.7) * 0.3**2 * 0.5**4
    negative_unlabelled = math.log(0.4) * 0.6**2 + math.log(0.8) * 0.2**2
    expected = -(positive + negative_labelled)  # one positive: divided by 1
    assert ignore_unlabelled_focal_loss(pred, gt).item() == pytest.approx(expected, rel=1e-6)
    # The plain focal loss counts the unlabelled channel's negatives too.
    assert focal_loss(pred, gt).item() == pytest.approx(expected - negative_unlabelled, rel=1e-6)


def _centerx_ignore_unlabel_reference(pred, gt):
    """centerX's ignore_unlabel_focal_loss as it reads: a loop over (image, class) channels."""
    positive = gt.eq(1).double()
    negative = gt.lt(1).double()
    for n in range(gt.shape[0]):
        for c in range(gt.shape[1]):
            if gt[n, c].sum() == 0:
                negative[n, c] = 0
    pred, gt = pred.double(), gt.double()
    positive_loss = (torch.log(pred) * (1 - pred) ** 2 * positive).sum()
    negative_loss = (torch.log(1 - pred) * pred**2 * (1 - gt) ** 4 * negative).sum()
    count = positive.sum()
    return -negative_loss if count == 0 else -(positive_loss + negative_loss) / count


def test_ignore_unlabelled_focal_loss_matches_the_loop_reference():
    batch = _batch(num_classes=4, size=3, seed=2)
    pred = clamped_sigmoid(torch.randn(batch["heatmap"].shape, generator=torch.Generator()
                                       .manual_seed(1)))
    gt = batch["heatmap"]
    labelled = gt.eq(1).flatten(2).any(-1)
    assert labelled.any() and not labelled.all()  # both kinds of channel are exercised
    reference = _centerx_ignore_unlabel_reference(pred, gt)
    assert ignore_unlabelled_focal_loss(pred, gt).item() == pytest.approx(reference.item(),
                                                                           rel=1e-5)
    # Where every channel is labelled it is the focal loss; without any object it is 0.
    full = gt.clone()
    full[:, :, 0, 0] = 1.0
    assert ignore_unlabelled_focal_loss(pred, full).item() == pytest.approx(
        focal_loss(pred, full).item(), rel=1e-6)
    assert ignore_unlabelled_focal_loss(pred, torch.zeros_like(gt)).item() == 0.0


def test_heatmap_losses_are_named_and_unknown_names_list_the_known():
    assert HEATMAP_LOSSES == {"focal": focal_loss, "mse": mse_heatmap_loss,
                              "focal_labelled": ignore_unlabelled_focal_loss}
    with pytest.raises(ValueError, match="heatmap_loss: expected one of focal, mse, "
                                         "focal_labelled, got 'l2'"):
        heatmap_loss_named("l2")
    with pytest.raises(ValueError, match="same shape"):
        mse_heatmap_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))


# -- task_loss and balancing ---------------------------------------------------------------


def test_the_default_task_loss_is_the_heads_loss():
    batch = _batch()
    outputs = _outputs(batch)
    total, parts = task_loss("centernet", TrainConfig())(outputs, batch)
    expected, expected_parts = centernet_loss(outputs, batch)
    assert total.item() == expected.item()
    assert parts.keys() == expected_parts.keys() == {*HEADS["centernet"].loss_terms, "total"}


@pytest.mark.parametrize("name", ["mse", "focal_labelled"])
def test_the_heatmap_loss_switch_replaces_the_heatmap_term_alone(name):
    batch = _batch()
    outputs = _outputs(batch, stacks=2)  # averaged over the stacks
    total, parts = task_loss("centernet", TrainConfig(heatmap_loss=name))(outputs, batch)
    heatmap = sum(HEATMAP_LOSSES[name](clamped_sigmoid(output["heatmap"]), batch["heatmap"])
                  for output in outputs) / 2
    _, focal_parts = centernet_loss(outputs, batch)
    assert parts["heatmap"].item() == pytest.approx(heatmap.item(), rel=1e-6)
    assert parts["heatmap"].item() != pytest.approx(focal_parts["heatmap"].item())
    # The original's weights 1, 0.1, 1 on the terms
    expected = parts["heatmap"] + 0.1 * focal_parts["wh"] + focal_parts["offset"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def _gradients(total, outputs):
    return torch.autograd.grad(total, [outputs[0][key] for key in ("heatmap", "wh", "offset")])


def test_balancing_fixes_each_terms_value_and_scales_its_gradient():
    batch = _batch()
    outputs = _outputs(batch)
    config = TrainConfig(balance_losses=True)
    total, parts = task_loss("centernet", config)(outputs, batch)
    assert total.item() == pytest.approx(1.5 + 0.3 + 0.1)  # centerX's cls, wh, off
    # parts keep the unbalanced terms (what the epoch line shows)
    _, plain_parts = centernet_loss(outputs, batch)
    for name in HEADS["centernet"].loss_terms:
        assert parts[name].item() == pytest.approx(plain_parts[name].item())
    # d(c L / stopgrad(L)) = c / L dL: each output's gradient is its own term's, times c / L.
    balanced = _gradients(total, outputs)
    for gradient, name in zip(balanced, ("heatmap", "wh", "offset"), strict=True):
        term = plain_parts[name]
        reference = torch.autograd.grad(_term(outputs, batch, name), outputs[0][name])[0]
        magnitude = CENTERX_BALANCE_MAGNITUDES[name]
        torch.testing.assert_close(gradient, reference * magnitude / term, rtol=1e-5, atol=1e-9)


def _term(outputs, batch, name):
    """One unweighted term of the CenterNet loss, with its gradient (weights isolate it)."""
    from detector.losses import LossWeights

    weights = LossWeights(**{key: float(key == name) for key in ("heatmap", "wh", "offset")})
    return centernet_loss(outputs, batch, weights)[0]


def test_balancing_uses_the_configured_magnitudes_and_leaves_unnamed_terms_weighted():
    batch = _batch()
    outputs = _outputs(batch)
    config = TrainConfig(balance_losses=True, balance_magnitudes={"heatmap": 2.0})
    total, parts = task_loss("centernet", config)(outputs, batch)
    expected = 2.0 + 0.1 * parts["wh"] + 1.0 * parts["offset"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    # The validation loss is unbalanced: a balanced total is constant whatever the model does.
    unbalanced, _ = task_loss("centernet", config, balanced=False)(outputs, batch)
    assert unbalanced.item() == pytest.approx(centernet_loss(outputs, batch)[0].item())


def test_balance_magnitudes_are_checked_and_default_to_centerx_on_our_term_names():
    assert TrainConfig().balance_magnitudes == {"heatmap": 1.5, "wh": 0.3, "ltrb": 0.3,
                                                "offset": 0.1}
    assert TrainConfig(balance_magnitudes={"wh": 1}).balance_magnitudes == {"wh": 1.0}
    with pytest.raises(ValueError, match="balance_magnitudes: expected task-term names"):
        TrainConfig(balance_magnitudes={"cls": 1.5})
    with pytest.raises(ValueError, match=r"balance_magnitudes.wh: expected a finite number > 0"):
        TrainConfig(balance_magnitudes={"wh": -1.0})
    with pytest.raises(ValueError, match=r"skip_loss_factor: expected a finite number > 1"):
        TrainConfig(skip_loss_factor=0.5)


def test_every_head_names_its_loss_terms():
    assert {name for head in HEADS.values() for name in head.loss_terms} == set(LOSS_TERM_NAMES)


def _contract_ttfnet_loss(outputs, batch, *, heatmap_loss=focal_loss, balance=None):
    """A loss with the TTFNet head's contract (terms heatmap and ltrb, ending in combine_terms),
    standing in for the real one where this branch has no TTFNet head."""
    heatmap = sum(heatmap_loss(clamped_sigmoid(output["heatmap"]), batch["heatmap"])
                  for output in outputs) / len(outputs)
    ltrb = sum((output["ltrb"] - batch["ltrb"]).abs().mean() for output in outputs) / len(outputs)
    return combine_terms({"heatmap": heatmap, "ltrb": ltrb}, {"heatmap": 1.0, "ltrb": 5.0},
                         balance)


def test_both_heads_get_the_switches_through_the_loss_contract(monkeypatch):
    """The default magnitudes name wh and offset, which a TTFNet head lacks: each head
    balances only its own terms (combine_terms refuses unknown ones)."""
    monkeypatch.setitem(HEADS, "ttfnet", HeadType(
        outputs={"heatmap": NUM_CLASSES, "ltrb": 4}, encode_targets=None,
        loss=_contract_ttfnet_loss, decode=None, loss_terms=("heatmap", "ltrb")))
    generator = torch.Generator().manual_seed(3)
    batch = {"heatmap": _batch()["heatmap"], "ltrb": torch.rand(2, 4, 16, 16, generator=generator)}
    outputs = [{"heatmap": torch.randn(2, 3, 16, 16, generator=generator).requires_grad_(),
                "ltrb": torch.rand(2, 4, 16, 16, generator=generator).requires_grad_()}]
    config = TrainConfig(heatmap_loss="mse", balance_losses=True)
    total, parts = task_loss("ttfnet", config)(outputs, batch)
    assert total.item() == pytest.approx(1.5 + 0.3)  # heatmap 1.5, ltrb as centerX's wh 0.3
    mse = mse_heatmap_loss(clamped_sigmoid(outputs[0]["heatmap"]), batch["heatmap"])
    assert parts["heatmap"].item() == pytest.approx(mse.item())
    unbalanced, _ = task_loss("ttfnet", config, balanced=False)(outputs, batch)
    assert unbalanced.item() == pytest.approx((parts["heatmap"] + 5 * parts["ltrb"]).item())


def test_the_ttfnet_head_takes_the_switches():
    """The real TTFNet loss (where the head table has it) through `task_loss`."""
    import numpy as np

    entry = HEADS["ttfnet"]
    targets = [entry.encode_targets(np.array([[2.0, 3.0, 9.0, 12.0]]), np.array([label]), 3,
                                    (16, 16)) for label in (0, 2)]
    batch = {key: torch.stack([torch.from_numpy(item[key]) for item in targets])
             for key in targets[0]}
    generator = torch.Generator().manual_seed(4)
    outputs = [{"heatmap": torch.randn(2, 3, 16, 16, generator=generator).requires_grad_(),
                "ltrb": torch.rand(2, 4, 16, 16, generator=generator).mul(30).requires_grad_()}]
    total, parts = task_loss("ttfnet", TrainConfig(heatmap_loss="mse", balance_losses=True))(
        outputs, batch)
    assert set(parts) == {*HEADS["ttfnet"].loss_terms, "total"}
    assert total.item() == pytest.approx(1.5 + 0.3)
    mse = mse_heatmap_loss(clamped_sigmoid(outputs[0]["heatmap"]), batch["heatmap"])
    assert parts["heatmap"].item() == pytest.approx(mse.item())


# -- skip-loss in fit ----------------------------------------------------------------------


def _fit(out_dir, loss_fn, snapshots, **settings):
    config = TrainConfig(**{**dict(epochs=2, batch_size=4, lr=2e-3, workers=0, eval_interval=0,
                                   lr_steps=[100.0], log_interval=1, seed=1), **settings})
    torch.manual_seed(0)
    model_config = tiny_config()
    model = build_from_config(model_config)
    loader = train_loader(TinyDetectionData(8), config, collate_fn=default_collate)

    def snapshot(step, model, parts):
        snapshots.append([parameter.detach().clone() for parameter in model.parameters()])

    result = fit(model, model_config, config, loader, out_dir, loss_fn=loss_fn,
                 on_step_end=snapshot)
    return result


def _jump_at(calls, jumps, outputs, batch):
    """The task loss, times 100 on the calls listed in ``jumps`` (1-based)."""
    calls.append(1)
    total, parts = centernet_loss(outputs, batch)
    factor = 100.0 if len(calls) in jumps else 1.0
    return total * factor, {**parts, "total": (total * factor).detach()}


def _changed(snapshots):
    """For each step after the first: whether it changed any parameter."""
    return [any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
            for before, after in zip(snapshots, snapshots[1:], strict=False)]


def test_a_jumping_loss_takes_no_optimiser_step(tmp_path):
    snapshots = []
    result = _fit(tmp_path, partial(_jump_at, [], {3}), snapshots, skip_loss_factor=3.0)
    # 2 epochs of 2 steps; step 3 (epoch 2's first) jumped 100x and was skipped entirely:
    # Adam would still move the weights on a zero gradient, so no optimiser step ran at all.
    assert _changed(snapshots) == [True, False, True]
    assert [record["skipped_steps"] for record in result.history] == [0, 1]
    resume = torch.load(tmp_path / "resume.pt", weights_only=True)
    adam_steps = {state["step"].item() for state in resume["optimizer"]["state"].values()}
    assert adam_steps == {3.0}
    assert resume["scheduler"]["last_epoch"] == 4  # the schedule counts every step
    assert resume["last_accepted_loss"] == pytest.approx(result.last_accepted_loss)
    assert "skipped 1 steps" in epoch_line(result.history[1], 2, None)
    assert "skipped" not in epoch_line(result.history[0], 2, None)


def test_without_skip_loss_the_same_jump_is_stepped_and_not_counted(tmp_path):
    snapshots = []
    result = _fit(tmp_path, partial(_jump_at, [], {3}), snapshots)
    assert _changed(snapshots) == [True, True, True]
    assert all("skipped_steps" not in record for record in result.history)


def test_with_accumulation_a_group_is_judged_by_its_mean_loss(tmp_path):
    snapshots = []
    # batch 2, accumulate 2: 4 batches an epoch, two optimiser steps after batches 2 and 4.
    result = _fit(tmp_path, partial(_jump_at, [], {4}), snapshots, epochs=1, batch_size=2,
                  accumulate=2, skip_loss_factor=3.0)
    # Group 1 stepped after batch 2; group 2 (whose batch 4 jumped) did not step after batch 4.
    assert _changed(snapshots) == [True, False, False]
    assert result.history[0]["skipped_steps"] == 1


def test_skip_loss_decides_on_the_mean_over_processes(monkeypatch):
    seen = []

    def mean_of_two(value, device):  # this process's loss, the other process's 3.0
        seen.append(value)
        return (value + 3.0) / 2

    monkeypatch.setattr("detector.engine.fit.average_value", mean_of_two)
    skip = SkipLoss(2.0, last_accepted=1.0, device=torch.device("cpu"))
    assert not skip.accepts(1.5)  # alone it would pass (1.5 < 2), the mean 2.25 does not
    assert skip.accepts(0.5) and skip.last_accepted == 1.75  # the mean is what is remembered
    assert seen == [1.5, 0.5] and skip.epoch_count() == {"skipped_steps": 1}
    assert SkipLoss(None, None, torch.device("cpu")).epoch_count() == {}


AVERAGE_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    from detector.distributed import average_value
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    value = average_value([1.5, 3.0][rank], torch.device("cpu"))
    open(os.path.join(sys.argv[1], f"rank{rank}"), "w").write(repr(value))
    dist.destroy_process_group()
""")


def test_average_value_is_the_same_on_every_process(tmp_path):
    """Two gloo processes (started directly: torchrun's agent would cost a third start)."""
    import socket

    script = tmp_path / "average.py"
    script.write_text(AVERAGE_SCRIPT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            env=child_environment(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for rank in (0, 1)
    ]
    for process in processes:
        _, error = process.communicate(timeout=50)
        assert process.returncode == 0, error.decode()[-2000:]
    assert {(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)} == {"2.25"}


def test_the_last_accepted_loss_survives_a_resume(tmp_path):
    """Resumed, the first step is judged against the loss the interrupted run last accepted
    (a fresh SkipLoss would accept any first step)."""
    first = _fit(tmp_path, partial(_jump_at, [], set()), [], epochs=1, skip_loss_factor=3.0)
    assert first.history[0]["skipped_steps"] == 0
    snapshots = []
    config = dict(epochs=2, batch_size=4, lr=2e-3, workers=0, eval_interval=0, lr_steps=[100.0],
                  log_interval=1, seed=1, skip_loss_factor=3.0)
    torch.manual_seed(0)
    model_config = tiny_config()
    loader = train_loader(TinyDetectionData(8), TrainConfig(**config), collate_fn=default_collate)
    result = fit(build_from_config(model_config), model_config, TrainConfig(**config), loader,
                 tmp_path, loss_fn=partial(_jump_at, [], {1}), resume=True,
                 on_step_end=lambda step, model, parts: snapshots.append(
                     [p.detach().clone() for p in model.parameters()]))
    assert result.history[-1]["skipped_steps"] == 1
    assert _changed(snapshots) == [True]  # step 1 skipped (no change seen), step 2 taken


def test_a_skipped_step_leaves_the_gradient_scaler_alone(tmp_path, monkeypatch):
    """Float16 AMP's GradScaler on the CPU (fit's autocast bypassed: amp autocast needs CUDA):
    a skipped step calls neither unscale_, step nor update, so the scaler's growth tracker
    counts the steps taken and the next step unscales its own gradients without error."""
    from contextlib import nullcontext

    monkeypatch.setattr("detector.engine.fit._autocast", lambda precision, device: nullcontext())
    snapshots = []
    result = _fit(tmp_path, partial(_jump_at, [], {3}), snapshots, precision="amp",
                  skip_loss_factor=3.0, grad_clip=10.0)  # clipping: unscale_ on every step
    assert _changed(snapshots) == [True, False, True]
    assert result.history[1]["skipped_steps"] == 1
    scaler = torch.load(tmp_path / "resume.pt", weights_only=True)["scaler"]
    assert scaler["scale"] == 2.0**16 and scaler["_growth_tracker"] == 3  # 3 steps taken


def test_the_validation_loss_is_the_given_task_loss(tmp_path):
    """Training's evaluation computes its validation loss with `task_loss(..., balanced=False)`
    (prepare_run); predict_source takes that loss in place of the head's."""
    import cv2
    import numpy as np

    from detector.data.records import DetectionSource, ImageRecord
    from detector.evaluate.config import EvaluateConfig
    from detector.evaluate.run import predict_source

    records = []
    for image_id in (1, 2):
        path = tmp_path / f"{image_id}.png"
        cv2.imwrite(str(path), np.full((64, 64, 3), 40 * image_id, dtype=np.uint8))
        records.append(ImageRecord(image_id, path, 64, 64, np.array([[8.0, 8.0, 40.0, 48.0]]),
                                   np.array([1]), np.zeros(1, bool)))
    source = DetectionSource(records, ["a", "b", "c"], [1, 2, 3], None, {})
    model_config = tiny_config()
    model = build_from_config(model_config)
    config = EvaluateConfig(batch_size=2, workers=0, pr_curves=False)
    training = TrainConfig(heatmap_loss="mse", balance_losses=True)
    _, plain = predict_source(model, source, model_config, config, "cpu")
    _, balanced = predict_source(model, source, model_config, config, "cpu",
                                 loss_fn=task_loss("centernet", training))
    _, validation = predict_source(model, source, model_config, config, "cpu",
                                   loss_fn=task_loss("centernet", training, balanced=False))
    assert balanced == pytest.approx(1.9)  # why validation is never balanced
    assert validation not in (plain, pytest.approx(1.9))  # the MSE heatmap term, unbalanced
