"""Knowledge distillation (ctprune.distill): the terms against hand-computed references, zero
when the student is its teacher, frozen eval-mode teachers that get no gradient, multi-teacher
class slices, refused teachers, the unlabelled path and distillation inside a recipe run."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TINY_HEAD_CONV, TINY_WIDTHS, TinyDetectionData, tiny_config, tiny_model
from torch.nn import functional

from ctprune.distill import (
    DistillConfig,
    DistillError,
    Teacher,
    TeacherConfig,
    distillation_loss,
    feature_adapters,
    heatmap_term,
    load_teacher,
    peak_weight,
    regression_term,
    resolve_classes,
)
from ctprune.recipe import load_recipe
from ctprune.run import run_recipe
from ctprune.train import train
from detector import build_model, save_checkpoint
from detector.config import ConfigError, from_dict
from detector.data.shapes import generate_shapes
from detector.data.sources import load_data_yaml, load_source
from detector.engine.config import TrainConfig, TrainRecipe
from detector.engine.fit import fit
from detector.evaluate.config import EvaluateConfig

ALL_TERMS = ("distill_heatmap", "distill_wh", "distill_offset", "distill_feature")


def _teacher(model, num_classes=3, classes=None):
    return Teacher(model, tiny_config("res18", num_classes), classes or list(range(num_classes)))


def _batch(num_classes=3, size=2, seed=0):
    data = TinyDetectionData(length=size, num_classes=num_classes, seed=seed)
    return {key: torch.stack([item[key] for item in data.items]) for key in data.items[0]}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_shapes")
    generate_shapes(root, num_train=16, num_val=8, image_size=64, seed=5, progress=False)
    return root


def test_peak_weight_matches_a_loop_over_cells():
    torch.manual_seed(0)
    probability = torch.rand(2, 3, 6, 7)
    expected = torch.zeros(2, 1, 6, 7)
    for b in range(2):
        for y in range(6):
            for x in range(7):
                best = 0.0
                for c in range(3):
                    window = probability[b, c, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
                    if probability[b, c, y, x] == window.max():
                        best = max(best, float(probability[b, c, y, x]))
                expected[b, 0, y, x] = best
    assert torch.equal(peak_weight(probability), expected)


def test_regression_term_by_hand():
    weight = torch.zeros(1, 1, 2, 2)
    weight[0, 0, 0, 1] = 0.5  # one teacher peak, confidence 0.5
    student = torch.tensor([[[[9.0, 3.0], [9.0, 9.0]], [[9.0, 1.0], [9.0, 9.0]]]])
    teacher = torch.tensor([[[[0.0, 2.0], [0.0, 0.0]], [[0.0, 5.0], [0.0, 0.0]]]])
    # |0.5 * 3 - 0.5 * 2| + |0.5 * 1 - 0.5 * 5| = 0.5 + 2 = 2.5, over Z = 0.5 + 1e-4.
    assert regression_term(student, teacher, weight).item() == pytest.approx(2.5 / 0.5001)
    # normalize_wh divides both by the same per-cell norm: 2.5 / 2 = 1.25.
    assert regression_term(student, teacher, weight, norm=2.0).item() == pytest.approx(
        1.25 / 0.5001
    )


def test_softened_kl_is_binary_cross_entropy_minus_entropy():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    temperature = 3.0
    p_teacher, p_student = (
        torch.sigmoid(teacher / temperature),
        torch.sigmoid(student / temperature),
    )
    entropy = functional.binary_cross_entropy(p_teacher, p_teacher)
    reference = (functional.binary_cross_entropy(p_student, p_teacher) - entropy) * temperature**2
    assert heatmap_term(student, teacher, "kl", temperature).item() == pytest.approx(
        reference.item(), rel=1e-4
    )
    mse = (torch.sigmoid(student) - torch.sigmoid(teacher)).pow(2).mean()
    assert heatmap_term(student, teacher, "mse").item() == pytest.approx(mse.item())


@pytest.mark.parametrize("heatmap_loss", ["mse", "kl"])
def test_every_distillation_term_is_zero_when_the_student_is_its_teacher(heatmap_loss):
    torch.manual_seed(0)
    student = tiny_model()
    teacher = copy.deepcopy(student)
    config = DistillConfig(
        heatmap_loss=heatmap_loss, temperature=2.0, feature_weight=1.0, with_labels=False
    )
    batch = _batch()
    adapters = feature_adapters(student, [_teacher(teacher)], batch["image"][:1])
    assert torch.equal(adapters[0].weight[:, :, 0, 0], torch.eye(adapters[0].weight.shape[0]))
    loss_fn = distillation_loss([_teacher(teacher)], config, adapters=adapters)
    student.eval()  # the same BN statistics as the eval-mode teacher
    total, parts = loss_fn(student(batch["image"], return_features=True), batch)
    for name in ALL_TERMS:
        assert parts[name].item() == pytest.approx(0.0, abs=1e-6), name
    assert total.item() == pytest.approx(0.0, abs=1e-5)  # heatmap_weight 100 scales the rounding


def test_no_gradient_reaches_the_teacher_and_the_student_learns_from_it():
    torch.manual_seed(0)
    student, teacher = tiny_model(), tiny_model()
    teacher_copy = copy.deepcopy(teacher)
    loss_fn = distillation_loss([_teacher(teacher)], DistillConfig(with_labels=False))
    batch = _batch()
    total, parts = loss_fn(student(batch["image"]), batch)
    total.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            teacher.state_dict().values(), teacher_copy.state_dict().values(), strict=True
        )
    )
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    assert set(parts) == {*ALL_TERMS, "total"}  # without labels: no task term


def test_the_teacher_stays_in_eval_mode_through_fit(tmp_path):
    torch.manual_seed(0)
    student, teacher = tiny_model(), tiny_model()
    teacher.train()  # even a teacher handed over in train mode is switched and kept in eval
    statistics = {name: buffer.clone() for name, buffer in teacher.named_buffers()}
    loss_fn = distillation_loss([_teacher(teacher)], DistillConfig())
    seen = []
    loader = torch.utils.data.DataLoader(TinyDetectionData(length=4), batch_size=2)
    config = TrainConfig(
        epochs=1, batch_size=2, lr=1e-3, lr_steps=[100], workers=0, eval_interval=0, log_interval=1
    )
    fit(
        student,
        tiny_config(),
        config,
        loader,
        tmp_path,
        loss_fn=loss_fn,
        after_backward=lambda model: seen.append(teacher.training),
    )
    assert seen == [False, False] and not teacher.training
    assert all(torch.equal(buffer, statistics[name]) for name, buffer in teacher.named_buffers())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "loss_distill_heatmap" in records[0] and "loss_heatmap" in records[0]


def test_multi_teacher_slices_line_up_with_class_ids():
    torch.manual_seed(0)
    first, second = tiny_model(num_classes=2), tiny_model(num_classes=2)
    teachers = [_teacher(first, 2, [0, 2]), _teacher(second, 2, [3, 1])]
    batch = _batch(num_classes=4)
    with torch.no_grad():
        first_output, second_output = (
            first.eval()(batch["image"])[0],
            second.eval()(batch["image"])[0],
        )
    # A student whose class c is exactly what the teacher owning c says about it.
    heatmap = torch.empty(2, 4, 16, 16)
    heatmap[:, [0, 2]] = first_output["heatmap"]
    heatmap[:, [3, 1]] = second_output["heatmap"]
    outputs = [{"heatmap": heatmap, "wh": first_output["wh"], "offset": first_output["offset"]}]
    config = DistillConfig(with_labels=False)
    _, parts = distillation_loss(teachers, config)(outputs, batch)
    assert parts["distill_heatmap"].item() == pytest.approx(0.0, abs=1e-7)
    # Swapping the second teacher's slice makes its term the MSE of the mismatched channels.
    swapped = [teachers[0], _teacher(second, 2, [1, 3])]
    _, parts = distillation_loss(swapped, config)(outputs, batch)
    reference = (
        (torch.sigmoid(heatmap[:, [1, 3]]) - torch.sigmoid(second_output["heatmap"])).pow(2).mean()
    )
    assert parts["distill_heatmap"].item() == pytest.approx(reference.item(), rel=1e-5)
    assert reference > 0
    with pytest.raises(DistillError, match="student class 2 is covered by both"):
        distillation_loss([teachers[0], _teacher(second, 2, [2, 1])], config)


def test_teacher_classes_are_checked_against_the_student():
    student, teacher = tiny_config("res18", 4), tiny_config("res18", 2)
    student.class_names = ["circle", "square", "star", "cross"]
    teacher.class_names = ["circle", "star"]
    assert resolve_classes([0, 2], teacher, student, "t") == [0, 2]
    with pytest.raises(DistillError, match="its class 1 is 'star' but student class 1 is 'square'"):
        resolve_classes([0, 1], teacher, student, "t")
    with pytest.raises(DistillError, match="give `classes`"):
        resolve_classes(None, teacher, student, "t")
    with pytest.raises(DistillError, match="class 7 is not a student class"):
        resolve_classes([0, 7], teacher, student, "t")


def test_a_teacher_with_another_input_spec_is_refused(tmp_path):
    config = tiny_config()
    bgr = copy.deepcopy(config)
    bgr.input.color_order = "BGR"
    path = save_checkpoint(tmp_path / "teacher.pt", tiny_model(), bgr)
    with pytest.raises(DistillError, match="input color_order is 'BGR' but the student's is 'RGB'"):
        load_teacher(TeacherConfig(), config, path)
    shifted = copy.deepcopy(config)
    shifted.input.mean = (0.5, 0.5, 0.5)
    path = save_checkpoint(tmp_path / "teacher2.pt", tiny_model(), shifted)
    with pytest.raises(DistillError, match="input mean"):
        load_teacher(TeacherConfig(), config, path)
    teacher = load_teacher(
        TeacherConfig(), config, save_checkpoint(tmp_path / "ok.pt", tiny_model(), config)
    )
    assert not teacher.model.training and not any(
        p.requires_grad for p in teacher.model.parameters()
    )


def test_a_pruned_student_of_other_widths_learns_features_through_an_adapter():
    torch.manual_seed(0)
    teacher = tiny_model()
    student_config = tiny_config()
    student_config.widths = {**TINY_WIDTHS["res"], "neck": [16, 16, 8]}
    student = build_model("res18", 3, head_conv=TINY_HEAD_CONV, widths=student_config.widths)
    batch = _batch()
    adapters = feature_adapters(student, [_teacher(teacher)], batch["image"][:1])
    assert adapters[0].weight.shape == (16, 8, 1, 1)
    student.train()
    outputs = student(batch["image"], return_features=True)  # what fit's forward_kwargs pass
    assert "features" in outputs[0]
    total, parts = distillation_loss(
        [_teacher(teacher)], DistillConfig(feature_weight=1.0), adapters=adapters
    )(outputs, batch)
    total.backward()
    assert parts["distill_feature"] > 0 and adapters[0].weight.grad.abs().sum() > 0
    assert "features" not in student(batch["image"])[0]


def test_distill_config_is_strict():
    with pytest.raises(ConfigError, match="distill.heatmap_loss: expected 'mse' or 'kl'"):
        from_dict(DistillConfig, {"heatmap_loss": "l2"}, "distill")
    with pytest.raises(
        ConfigError, match="distill.unlabelled_images: only used with with_labels: false"
    ):
        from_dict(DistillConfig, {"unlabelled_images": "images"}, "distill")
    with pytest.raises(ConfigError, match="distill.teachers: expected at least one teacher"):
        from_dict(DistillConfig, {"teachers": []}, "distill")


def _tiny_recipe(shapes):
    return TrainRecipe(
        name="tiny",
        model=tiny_config(num_classes=None),
        data=load_data_yaml(shapes / "data.yaml"),
        train=TrainConfig(
            epochs=1,
            batch_size=4,
            lr=1e-3,
            lr_steps=[100],
            workers=0,
            eval_interval=1,
            log_interval=1,
        ),
        evaluate=EvaluateConfig(batch_size=8, workers=0, pr_curves=False),
    )


def test_the_unlabelled_path_trains_on_a_folder_of_images_without_annotations(tmp_path, shapes):
    folder = tmp_path / "unlabelled"
    shutil.copytree(shapes / "images" / "train", folder)  # images alone: no json anywhere near
    assert not list(folder.rglob("*.json"))
    recipe = _tiny_recipe(shapes)
    class_names = load_source(recipe.data, "val").class_names
    teacher_config = tiny_config(num_classes=len(class_names))
    teacher_config.class_names = class_names
    teacher_path = save_checkpoint(
        tmp_path / "teacher.pt", tiny_model(num_classes=teacher_config.num_classes), teacher_config
    )
    config = DistillConfig(with_labels=False, unlabelled_images=str(folder))
    result = train(
        recipe, tmp_path / "run", distill=config, teacher_paths=[teacher_path], device="cpu"
    )
    assert result.epochs == 1 and "ap50" in result.history[-1]
    listing = json.loads((tmp_path / "run" / "unlabelled_images.json").read_text())
    assert len(listing["images"]) == len(list(folder.glob("*.*"))) and listing["annotations"] == []
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    train_records = [record for record in records if record["kind"] == "train"]
    assert len(train_records) == len(listing["images"]) // 4
    assert all(
        "loss_distill_heatmap" in record and "loss_heatmap" not in record
        for record in train_records
    )


SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"


def test_a_recipe_distils_from_its_baseline_and_changing_distill_reruns_only_finetunes(tmp_path):
    (tmp_path / "recipes").mkdir()
    path = Path(shutil.copy(SMOKE, tmp_path / "recipes" / "smoke.yaml"))
    # A saved tiny baseline instead of a trained one: this test is about the fine-tune stage.
    baseline = save_checkpoint(
        tmp_path / "baseline.pt", tiny_model(num_classes=6), tiny_config("res18", 6)
    )
    fast = [
        "report.controls=false",
        "report.latency=false",
        "finetune.log_interval=1",
        "synthetic.num_train=16",
        "synthetic.num_val=8",
        f"baseline.checkpoint={baseline}",
    ]
    recipe = load_recipe(path, [*fast, "finetune.distill={}"])
    assert recipe.finetune.distill == DistillConfig()
    run_recipe(recipe, tmp_path / "run", log=lambda line: None)
    records = [
        json.loads(line)
        for line in (tmp_path / "run" / "l1_r0.5" / "finetune" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    assert any("loss_distill_wh" in record for record in records)
    log = []
    run_recipe(
        load_recipe(path, [*fast, "finetune.distill.heatmap_weight=10.0"]),
        tmp_path / "run",
        log=log.append,
        only="finetune",  # the report would be rebuilt too; skipping it keeps the test short
    )
    assert sorted(line.split()[1] for line in log if line.startswith("[run]")) == [
        "l1_r0.5/finetune"
    ]
    with pytest.raises(
        FileNotFoundError, match=r"finetune.distill.teachers\[0\].checkpoint: .*nope.pt"
    ):
        load_recipe(path, [*fast, "finetune.distill.teachers=[{checkpoint: nope.pt}]"])


def test_teacher_output_is_computed_on_the_students_input_tensor():
    torch.manual_seed(0)
    seen = []
    teacher = tiny_model()
    teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    batch = _batch()
    distillation_loss([_teacher(teacher)], DistillConfig())(tiny_model()(batch["image"]), batch)
    assert seen[0] is batch["image"]
    assert np.isfinite(seen[0].numpy()).all()


class FixedTeacher(torch.nn.Module):
    """A teacher with set outputs: one confident peak, the same box size (w, h) everywhere."""

    def __init__(self, wh: tuple[float, float], size: int = 16):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))
        heatmap = torch.full((1, 1, size, size), -10.0)
        heatmap[0, 0, 5, 7] = 2.0
        self.heatmap = heatmap
        self.wh = torch.tensor(wh).view(1, 2, 1, 1).expand(1, 2, size, size)

    def forward(self, images, return_features=False):
        batch = images.shape[0]
        return [
            {
                "heatmap": self.heatmap.expand(batch, -1, -1, -1),
                "wh": self.wh.expand(batch, -1, -1, -1),
            }
        ]


@pytest.mark.parametrize(("wh", "norm"), [((4.0, 6.0), 5.0), ((0.2, 0.4), 1.0)])
def test_normalize_wh_divides_by_the_teachers_mean_side_of_at_least_one_cell(wh, norm):
    teacher = FixedTeacher(wh)
    weight_sum = float(peak_weight(torch.sigmoid(teacher.heatmap)).sum())
    student = {
        "heatmap": teacher.heatmap.expand(2, -1, -1, -1).clone(),
        "wh": teacher.wh.expand(2, -1, -1, -1) + 1.0,
    }  # off by one cell in w and h
    batch = {"image": torch.zeros(2, 3, 64, 64)}
    config = tiny_config("res18", 1)
    for normalize, divisor in ((False, 1.0), (True, norm)):
        settings = DistillConfig(with_labels=False, normalize_wh=normalize)
        loss_fn = distillation_loss([Teacher(teacher, config, [0])], settings)
        _, parts = loss_fn([student], batch)
        # Two channels off by 1 at every cell, weighted by W, over Z = sum W + 1e-4 (both images).
        expected = 2 * 2 * weight_sum / divisor / (2 * weight_sum + 1e-4)
        assert parts["distill_wh"].item() == pytest.approx(expected, rel=1e-5)
        assert parts["distill_heatmap"].item() == pytest.approx(0.0, abs=1e-9)
