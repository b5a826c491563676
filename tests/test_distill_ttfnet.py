"""Distillation of the TTFNet head (the ChHanXiao/centerX fork's ttfnet_kdloss): the heatmap by
MSE and the ltrb distances by L1 at the teacher's peaks, against hand-computed values; the
dispatch on the head type, with named errors for a triplet student and for a teacher of another
head type; distillation terms are never rebalanced by the task loss's balancing.

Teachers and students here are fixed output dicts ({"heatmap": ..., "ltrb": ...}), so the
figures are exact and nothing depends on a TTFNet model being built."""

import dataclasses
import math

import pytest
import torch
from tiny import tiny_config, tiny_model
from torch import nn

from ctprune.distill import (
    DistillConfig,
    DistillError,
    Teacher,
    TeacherConfig,
    check_head,
    distillation_loss,
    load_teacher,
)
from detector import save_checkpoint
from detector.heads import HEADS, NUM_CLASSES, HeadType
from detector.losses import clamped_sigmoid, combine_terms, focal_loss

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def ttfnet_in_the_head_table(monkeypatch):
    """A model config may name the ttfnet head only where the head table has it; this branch's
    table may not (the TTFNet head is written elsewhere): a stand-in entry then."""
    if "ttfnet" not in HEADS:
        monkeypatch.setitem(HEADS, "ttfnet", HeadType(
            outputs={"heatmap": NUM_CLASSES, "ltrb": 4}, encode_targets=None, loss=None,
            decode=None))


def _logits(probabilities):
    probabilities = torch.tensor(probabilities, dtype=torch.float64)
    return torch.log(probabilities / (1 - probabilities)).float()


def _map(values):
    """One image, one row of cells: (channels per cell) -> (1, C, 1, W)."""
    return torch.tensor(values, dtype=torch.float32).T.reshape(1, len(values[0]), 1, len(values))


class FixedOutputs(nn.Module):
    """A teacher that predicts ``outputs`` whatever it sees."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, images, return_features=False):
        return [dict(self.outputs)]


def _ttfnet_config(num_classes=1):
    return dataclasses.replace(tiny_config("res18", num_classes), head="ttfnet")


# Teacher probabilities (0.2, 0.8, 0.4) over three cells: the middle one alone is a 3x3 local
# maximum, so the peak weight is W = (0, 0.8, 0) and Z = 0.8 + 1e-4.
TEACHER = {"heatmap": _logits([[0.2, 0.8, 0.4]]).reshape(1, 1, 1, 3),
           "ltrb": _map([[1, 1, 1, 1], [4, 8, 12, 16], [0, 0, 0, 0]])}
STUDENT = {"heatmap": _logits([[0.3, 0.6, 0.4]]).reshape(1, 1, 1, 3),
           "ltrb": _map([[9, 9, 9, 9], [6, 8, 10, 20], [5, 5, 5, 5]])}
HEATMAP_MSE = (0.1**2 + 0.2**2 + 0.0**2) / 3
PEAK_SUM = 0.8 + 1e-4
# Only the peak cell counts: |6-4| + |8-8| + |10-12| + |20-16| = 8, weighted by 0.8.
LTRB_L1 = 0.8 * 8 / PEAK_SUM
# Normalised: divided by the teacher's (4 + 8 + 12 + 16) / 2 + 1e-4 at that cell.
LTRB_L1_NORMALISED = 0.8 * 8 / (40 / 2 + 1e-4) / PEAK_SUM


def _loss(config, task_loss=None, stacks=1, head="ttfnet"):
    teacher = Teacher(FixedOutputs(TEACHER), _ttfnet_config(), [0], name="teacher")
    kwargs = {} if task_loss is None else {"task_loss": task_loss}
    loss_fn = distillation_loss([teacher], config, head=head, **kwargs)
    outputs = [{key: value.clone().requires_grad_() for key, value in STUDENT.items()}
               for _ in range(stacks)]
    return loss_fn(outputs, {"image": torch.zeros(1, 3, 4, 12)})


@pytest.mark.parametrize("normalize_wh, ltrb", [(False, LTRB_L1), (True, LTRB_L1_NORMALISED)])
def test_ttfnet_terms_by_hand(normalize_wh, ltrb):
    config = DistillConfig(with_labels=False, heatmap_weight=100.0, wh_weight=0.1,
                           offset_weight=7.0, normalize_wh=normalize_wh)
    total, parts = _loss(config, stacks=2)  # two identical stacks: their mean is one's value
    assert parts.keys() == {"distill_heatmap", "distill_ltrb", "distill_feature", "total"}
    assert parts["distill_heatmap"].item() == pytest.approx(HEATMAP_MSE, rel=1e-5)
    assert parts["distill_ltrb"].item() == pytest.approx(ltrb, rel=1e-5)
    # no offset term, whatever offset_weight says; ltrb is weighted by wh_weight
    assert total.item() == pytest.approx(100 * HEATMAP_MSE + 0.1 * ltrb, rel=1e-5)


def test_a_student_equal_to_its_teacher_has_zero_ttfnet_terms():
    teacher = Teacher(FixedOutputs(TEACHER), _ttfnet_config(), [0])
    loss_fn = distillation_loss([teacher], DistillConfig(with_labels=False, normalize_wh=True),
                                head="ttfnet")
    total, parts = loss_fn([{k: v.clone() for k, v in TEACHER.items()}],
                           {"image": torch.zeros(1, 3, 4, 12)})
    assert total.item() == 0.0 and parts["distill_ltrb"].item() == 0.0


def test_only_the_peak_cells_get_the_ltrb_gradient():
    outputs = [{key: value.clone().requires_grad_() for key, value in STUDENT.items()}]
    teacher = Teacher(FixedOutputs(TEACHER), _ttfnet_config(), [0])
    total, _ = distillation_loss([teacher], DistillConfig(with_labels=False, heatmap_weight=0.0),
                                 head="ttfnet")(outputs, {"image": torch.zeros(1, 3, 4, 12)})
    total.backward()
    gradient = outputs[0]["ltrb"].grad[0, :, 0]  # (4 channels, 3 cells)
    assert torch.all(gradient[:, [0, 2]] == 0)
    # d/dS of 0.1 * 0.8 |S - T| / Z = 0.1 * 0.8 sign(S - T) / Z; S = T on the t channel
    expected = torch.tensor([1.0, 0.0, -1.0, 1.0]) * 0.1 * 0.8 / PEAK_SUM
    torch.testing.assert_close(gradient[:, 1], expected)


def _balanced_task_loss(outputs, batch):
    """A task loss with the TTFNet contract's terms, balanced as centerX's communism loss."""
    heatmap = focal_loss(clamped_sigmoid(outputs[0]["heatmap"]), torch.zeros(1, 1, 1, 3))
    ltrb = outputs[0]["ltrb"].abs().mean()
    return combine_terms({"heatmap": heatmap, "ltrb": ltrb}, {"heatmap": 1.0, "ltrb": 5.0},
                         {"heatmap": 1.5, "ltrb": 0.3})


def test_distillation_terms_are_never_rebalanced():
    """centerX's balancing matches its kd_* loss names too and so cancels the KD weights; here
    the task loss is balanced (worth 1.5 + 0.3) and the KD terms keep their weights."""
    config = DistillConfig(heatmap_weight=100.0, wh_weight=0.1)
    total, parts = _loss(config, task_loss=_balanced_task_loss)
    assert parts["total"].item() == total.item()
    assert total.item() == pytest.approx(1.5 + 0.3 + 100 * HEATMAP_MSE + 0.1 * LTRB_L1, rel=1e-5)
    doubled, _ = _loss(dataclasses.replace(config, heatmap_weight=200.0),
                       task_loss=_balanced_task_loss)
    assert doubled.item() - total.item() == pytest.approx(100 * HEATMAP_MSE, rel=1e-4)


def test_a_triplet_student_has_no_distillation_loss_yet():
    with pytest.raises(DistillError, match="no triplet distillation loss yet"):
        check_head("triplet", "triplet", "distill teacher t.pt")
    teacher = Teacher(FixedOutputs(TEACHER), _ttfnet_config(), [0])
    with pytest.raises(DistillError, match="no triplet distillation loss yet"):
        distillation_loss([teacher], DistillConfig(), head="triplet")


def test_a_teacher_of_another_head_type_is_refused():
    centernet_teacher = Teacher(FixedOutputs(TEACHER), tiny_config("res18", 1), [0], name="c.pt")
    with pytest.raises(DistillError, match="distill teacher c.pt: its head type is 'centernet' "
                                           "but the student's is 'ttfnet'"):
        distillation_loss([centernet_teacher], DistillConfig(), head="ttfnet")
    ttfnet_teacher = Teacher(FixedOutputs(TEACHER), _ttfnet_config(), [0], name="t.pt")
    with pytest.raises(DistillError, match="its head type is 'ttfnet' but the student's is "
                                           "'centernet'"):
        distillation_loss([ttfnet_teacher], DistillConfig())  # the default head: centernet


def test_load_teacher_refuses_another_head_type(tmp_path):
    path = tmp_path / "centernet.pt"
    save_checkpoint(path, tiny_model("res18", 1), tiny_config("res18", 1))
    with pytest.raises(DistillError, match=f"distill teacher {path}: its head type is "
                                           "'centernet' but the student's is 'ttfnet'"):
        load_teacher(TeacherConfig(), _ttfnet_config(), path)


def test_kl_heatmap_distillation_works_for_the_ttfnet_head():
    config = DistillConfig(with_labels=False, heatmap_loss="kl", temperature=2.0,
                           heatmap_weight=1.0, wh_weight=0.0)
    total, parts = _loss(config)
    teacher = torch.tensor([0.2, 0.8, 0.4]).logit() / 2
    student = torch.tensor([0.3, 0.6, 0.4]).logit() / 2
    p, q = torch.sigmoid(teacher), torch.sigmoid(student)
    kl = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean() * 4
    assert total.item() == pytest.approx(kl.item(), rel=1e-4)
    assert math.isfinite(parts["distill_ltrb"].item())


def test_the_task_term_is_the_given_task_loss():
    calls = []

    def task(outputs, batch):
        calls.append(sorted(outputs[0]))
        return torch.tensor(3.0), {"heatmap": torch.tensor(2.0), "total": torch.tensor(3.0)}

    total, parts = _loss(DistillConfig(heatmap_weight=0.0, wh_weight=0.0), task_loss=task)
    assert calls == [["heatmap", "ltrb"]] and total.item() == 3.0 and parts["heatmap"] == 2.0


def test_ctprune_check_names_a_teacher_of_another_head_type(tmp_path):
    from ctprune.preflight import _check_teacher
    from ctprune.recipe import load_recipe

    save_checkpoint(tmp_path / "teacher.pt", tiny_model("res18", 2), tiny_config("res18", 2))
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "name: ttf\n"
        "model: {arch: res18, head: ttfnet, num_classes: 2, input: {input_size: [64, 64]}}\n"
        "data: {format: coco, train: a.json, val: b.json, images: imgs}\n"
        "train: {epochs: 1, lr_steps: []}\n"
        "prune: {ratio: 0.2}\n"
        "finetune: {epochs: 1, lr_steps: [], distill: {teachers: [{checkpoint: teacher.pt}]}}\n"
    )
    problems, notes = [], []
    _check_teacher(0, load_recipe(path, check_files=False), ["a", "b"], problems, notes)
    assert problems == [f"finetune.distill.teachers[0].checkpoint {tmp_path / 'teacher.pt'}: "
                        "its head type is 'centernet' but the student's is 'ttfnet'; a teacher "
                        "must predict what the student predicts"]
