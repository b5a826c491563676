"""Knowledge distillation for CenterNet: a loss factory with the task loss's signature.

`distillation_loss(teachers, config)` returns ``loss_fn(outputs, batch) -> (total, parts)``,
the signature of `detector.losses.centernet_loss`, so `detector.engine.fit.fit` trains with it
unchanged; the feature adapters it optimises go in through fit's ``extra_parameters``, and
fit's ``forward_kwargs={"return_features": True}`` makes the student return its neck
features. The main use is compression: fine-tune a pruned model with the unpruned one as its
teacher.

Output distillation is centerX's (JDAI-CV/centerX, ``centernet_kdloss.py``; formulas in
shared/reference/peers.md section 2.3). For teacher k, S and T the student's and teacher's heads
at the same output cell, and the teacher's classes mapped to student channels ``classes``:

- heatmap: ``mean (sigmoid(S_c) - sigmoid(T_c))^2`` over every image, mapped class and cell
  (background included). centerX's head applies the sigmoid itself; ours returns logits.
- peak weight ``W(x) = max_c P_c(x)``, ``P_c(x) = T_c(x)`` where the teacher's probability is a
  3 x 3 local maximum, else 0: the teacher's confidence at its own peaks. ``Z = sum W + 1e-4``.
- wh: ``sum |W S_wh / n - W T_wh / n| / Z`` with ``n = (T_w + T_h) / 2`` when ``normalize_wh``
  (relative size errors, for data whose boxes span many sizes), else 1.
- offset: ``sum |W S_offset - W T_offset| / Z``.

The TTFNet head (``model.head: ttfnet``) is distilled as the ChHanXiao/centerX fork does
(``ttfnet_kdloss.py``): the same heatmap term and peak weight W, no offset term, and in place of
wh its four ltrb distances (input pixels):

- ltrb: ``sum |W S_ltrb / n - W T_ltrb / n| / Z`` over the 4 channels, with
  ``n = (T_l + T_t + T_r + T_b) / 2 + 1e-4`` when ``normalize_wh`` (the teacher box's mean side),
  else 1; weighted by ``wh_weight`` (the fork's KD_WH_WEIGHT).

The loss dispatches on the student's head type (`detector.heads`), and every teacher must have
the student's head type; the keypoint-triplet head has no distillation loss yet.

Options beyond centerX: ``heatmap_loss: kl`` (temperature-softened binary KL per cell, times
T^2 as Hinton et al. do so that gradients keep their size when T changes), and feature
distillation: an MSE between the student's neck output, through a 1x1 adapter per teacher, and
the teacher's neck output. An adapter starts as the identity where the widths match, so a
pruned student of other widths still learns from its teacher through a learned projection.

Where centerX is deliberately not followed:
- its "communism" loss balancing rescales every term whose name contains cls/wh/off to a fixed
  value; its distillation terms (``kd_cls_loss``, ``kd_wh_loss``, ``kd_off_loss``) match too, so
  turning it on silently cancels the distillation weights. Here distillation terms are never
  rebalanced: ``train.balance_losses`` acts on the task loss alone (the ``task_loss`` given,
  `detector.heads.task_loss`), and the weights below are what the distillation terms get.
- with ``normalize_wh`` the CenterNet head's wh divisor is clamped to at least one output cell
  instead of adding 1e-4: at background peaks the teacher's predicted size can be near 0 or
  negative, where centerX divides by almost nothing. (The TTFNet head's ltrb divisor follows the
  fork, + 1e-4: its distances are a ReLU's output, never negative, but they can be 0 at a
  background peak, where the divisor is then 1e-4.)

The adapters are trained as fit's ``extra_parameters``: not part of the student's checkpoint,
but kept in ``resume.pt`` so a resumed fine-tune continues with them, and under torchrun their
gradients are averaged over the processes like the student's.

Teachers are frozen (no gradients), kept in eval mode, never wrapped in DistributedDataParallel,
and run under ``no_grad`` on the same input tensor as the student; a teacher whose input spec
(colour order, mean/std, down ratio) differs from the student's is refused, since it would see
pixels it was not trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import torch
from torch import Tensor, nn
from torch.nn import functional

from detector.checkpoint import load_model
from detector.config import ModelConfig, require_int, require_number
from detector.losses import centernet_loss

LossFn = Callable[[list[dict[str, Tensor]], dict], tuple[Tensor, dict[str, Tensor]]]

# centerX's normaliser of the peak-weighted regression sums (Z = sum W + 1e-4).
PEAK_EPSILON = 1e-4
# The ChHanXiao fork's ltrb divisor with normalize_wh: (l + t + r + b) / 2 + 1e-4.
LTRB_NORM_EPSILON = 1e-4
# The smallest wh divisor with normalize_wh: one output-map cell (see the module docstring).
MIN_WH_NORM = 1.0
# Local maxima are found over this window, as CenterNet's decoding pseudo-NMS does.
PEAK_WINDOW = 3
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Defaults: wh and offset as the task loss weighs them. The heatmap MSE is a mean over every cell,
# almost all background, so it is 1e-4 to 1e-2 and needs a large weight (centerX's own recipes
# use 10 to 5e5). On the synthetic benchmark 100 gave a pruned res18 more than 1000 did
# (experiments/distill_study/report.md), although the heatmap term is then only ~0.05 there.
DEFAULT_HEATMAP_WEIGHT = 100.0
DEFAULT_WH_WEIGHT = 0.1
DEFAULT_OFFSET_WEIGHT = 1.0


class DistillError(ValueError):
    """A teacher or distillation setting that cannot be used; the message names it."""


@dataclass
class TeacherConfig:
    """One teacher: a ctprune checkpoint and the student classes its heatmap channels stand for."""

    checkpoint: str | None = None
    """A ctprune checkpoint (relative to the recipe file). None in a `ctprune run` recipe: the
    run's own unpruned baseline (the compression case)."""
    classes: list[int] | None = None
    """Student class index of each of the teacher's heatmap channels, in order (several teachers
    each cover a slice: [0, 1, 2] and [3, 4, 5]); None: the teacher has the student's classes."""
    weight: float = 1.0
    """Multiplies all of this teacher's distillation terms (>= 0)."""

    def __post_init__(self) -> None:
        require_number(self.weight, "weight", at_least=0)
        if self.checkpoint is not None and not self.checkpoint.strip():
            raise ValueError(f"checkpoint: expected a file path or null, got {self.checkpoint!r}")
        for index in self.classes or []:
            require_int(index, "classes", 0)
        if self.classes is not None and not self.classes:
            raise ValueError("classes: expected at least one student class index, got []")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes: a student class listed twice in {self.classes}")


@dataclass
class DistillConfig:
    """Knowledge distillation during fine-tuning (centerX's output distillation, optionally
    with a temperature-softened heatmap and neck-feature distillation)."""

    teachers: list[TeacherConfig] = field(default_factory=lambda: [TeacherConfig()])
    """The teachers; the default is one teacher, the run's unpruned baseline."""
    with_labels: bool = True
    """True: task loss plus distillation. False: distillation alone, so images need no labels
    (see `unlabelled_images`)."""
    unlabelled_images: str | None = None
    """With with_labels false: a folder of images (no annotations) to train on, relative to the
    recipe file; None trains on the train split's images with their labels ignored."""
    heatmap_weight: float = DEFAULT_HEATMAP_WEIGHT
    """Weight of the heatmap term (>= 0; centerX's KD_WEIGHT x KD_CLS_WEIGHT). The MSE is a mean
    over all cells, mostly background, so it is small and needs a large weight."""
    wh_weight: float = DEFAULT_WH_WEIGHT
    """Weight of the peak-weighted L1 on box sizes (>= 0; KD_WEIGHT x KD_WH_WEIGHT); sizes are in
    output cells, so as in the task loss it is 10x below the offset's. For the TTFNet head it
    weighs the L1 on the ltrb distances (input pixels) instead."""
    offset_weight: float = DEFAULT_OFFSET_WEIGHT
    """Weight of the peak-weighted L1 on centre offsets (>= 0; KD_WEIGHT x KD_REG_WEIGHT); the
    TTFNet head has no offset."""
    normalize_wh: bool = False
    """Divide wh (TTFNet: ltrb) by the teacher's mean box side (centerX's NORM_WH): relative
    size errors."""
    heatmap_loss: Literal["mse", "kl"] = "mse"
    """mse: centerX's MSE of probabilities; kl: binary KL between temperature-softened teacher
    and student probabilities, times temperature^2."""
    temperature: float = 1.0
    """Softening temperature of heatmap_loss kl (logits / T before the sigmoid), > 0."""
    feature_weight: float = 0.0
    """Weight of the neck-feature MSE through 1x1 adapters (>= 0; 0: off)."""

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ValueError("teachers: expected at least one teacher")
        for name in ("heatmap_weight", "wh_weight", "offset_weight", "feature_weight"):
            require_number(getattr(self, name), name, at_least=0)
        require_number(self.temperature, "temperature", above=0)
        if self.unlabelled_images is not None and self.with_labels:
            raise ValueError("unlabelled_images: only used with with_labels: false")


@dataclass
class Teacher:
    """A loaded, frozen teacher and the student classes its heatmap channels map to."""

    model: nn.Module
    model_config: ModelConfig
    classes: list[int]
    """Student class index of each teacher heatmap channel."""
    weight: float = 1.0
    name: str = "teacher"


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every parameter frozen (returned for chaining)."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def check_input_spec(student: ModelConfig, teacher: ModelConfig, name: str) -> None:
    """Refuse a teacher that would see other pixels or produce maps of another size."""
    for key in ("color_order", "mean", "std", "down_ratio"):
        mine, theirs = _plain(getattr(student.input, key)), _plain(getattr(teacher.input, key))
        if mine != theirs:
            raise DistillError(
                f"{name}: input {key} is {theirs!r} but the student's is {mine!r}; a teacher "
                "runs on the student's input tensor, so both must share colour order, mean/std "
                "and down ratio"
            )


DISTILLED_HEADS = ("centernet", "ttfnet")
"""Head types (`detector.heads.HEADS`) with a distillation loss."""


def check_head(student: str, teacher: str, name: str) -> None:
    """Refuse a student head type (``model.head``) without a distillation loss, and a teacher
    whose head type differs from the student's (their outputs would not correspond)."""
    if student == "triplet":
        raise DistillError(
            f"{name}: the student's head type is 'triplet': no triplet distillation loss yet "
            f"(distillable head types: {', '.join(DISTILLED_HEADS)})"
        )
    if student not in DISTILLED_HEADS:
        raise DistillError(
            f"{name}: the student's head type {student!r} has no distillation loss "
            f"(distillable head types: {', '.join(DISTILLED_HEADS)})"
        )
    if teacher != student:
        raise DistillError(
            f"{name}: its head type is {teacher!r} but the student's is {student!r}; "
            "a teacher must predict what the student predicts"
        )


def _plain(value):
    return [float(item) for item in value] if isinstance(value, (list, tuple)) else value


def load_teacher(
    config: TeacherConfig, student: ModelConfig, path: str | Path | None = None
) -> Teacher:
    """Load ``config``'s teacher (from ``path`` when given, else its checkpoint), frozen, and
    check it against the student: same input spec, classes mapped into the student's."""
    path = Path(path if path is not None else config.checkpoint or "")
    if not path.is_file():
        raise FileNotFoundError(f"distill teacher: checkpoint {path} does not exist")
    model, checkpoint = load_model(path)
    teacher_config = checkpoint.model_config
    check_head(student.head, teacher_config.head, f"distill teacher {path}")
    check_input_spec(student, teacher_config, f"distill teacher {path}")
    classes = resolve_classes(config.classes, teacher_config, student, str(path))
    return Teacher(freeze(model), teacher_config, classes, config.weight, name=str(path))


def resolve_classes(
    classes: list[int] | None, teacher: ModelConfig, student: ModelConfig, name: str
) -> list[int]:
    """The student class of each teacher channel; names must agree where both models have them."""
    if classes is None:
        if teacher.num_classes != student.num_classes:
            raise DistillError(
                f"distill teacher {name}: has {teacher.num_classes} classes, the student "
                f"{student.num_classes}; give `classes` (the student class of each teacher class)"
            )
        classes = list(range(teacher.num_classes))
    if len(classes) != teacher.num_classes:
        raise DistillError(
            f"distill teacher {name}: classes lists {len(classes)} student classes "
            f"for a teacher with {teacher.num_classes}"
        )
    for index in classes:
        if not 0 <= index < student.num_classes:
            raise DistillError(
                f"distill teacher {name}: class {index} is not a student class "
                f"(0..{student.num_classes - 1})"
            )
    if teacher.class_names and student.class_names:
        for channel, index in enumerate(classes):
            if teacher.class_names[channel] != student.class_names[index]:
                raise DistillError(
                    f"distill teacher {name}: its class {channel} is "
                    f"{teacher.class_names[channel]!r} but student class {index} is "
                    f"{student.class_names[index]!r}"
                )
    return list(classes)


def check_teachers(teachers: Sequence[Teacher]) -> None:
    """Several teachers must cover disjoint student classes (each owns its slice)."""
    seen: dict[int, str] = {}
    for teacher in teachers:
        for index in teacher.classes:
            if index in seen:
                raise DistillError(
                    f"distill: student class {index} is covered by both {seen[index]} "
                    f"and {teacher.name}; give each teacher its own classes"
                )
            seen[index] = teacher.name


def peak_weight(teacher_probability: Tensor) -> Tensor:
    """centerX's W: (B, C, H, W) probabilities -> (B, 1, H, W), the largest class probability
    among those at a 3x3 local maximum of their own channel, 0 where no channel peaks."""
    pooled = functional.max_pool2d(
        teacher_probability, PEAK_WINDOW, stride=1, padding=PEAK_WINDOW // 2
    )
    peaks = teacher_probability * (pooled == teacher_probability)
    return peaks.amax(dim=1, keepdim=True)


def heatmap_term(
    student_logits: Tensor, teacher_logits: Tensor, mode: str = "mse", temperature: float = 1.0
) -> Tensor:
    """Heatmap distillation over matching (B, C, H, W) logits: the mean squared difference of
    probabilities (mse) or the mean binary KL(teacher || student) of the temperature-softened
    probabilities times temperature^2 (kl)."""
    if mode == "mse":
        return (torch.sigmoid(student_logits) - torch.sigmoid(teacher_logits)).pow(2).mean()
    # In log space from the logits on both sides: stable for saturated teachers, and exactly 0
    # where the student equals its teacher.
    student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
    teacher = torch.sigmoid(teacher_logits)
    divergence = teacher * (
        functional.logsigmoid(teacher_logits) - functional.logsigmoid(student_logits)
    ) + (1 - teacher) * (
        functional.logsigmoid(-teacher_logits) - functional.logsigmoid(-student_logits)
    )
    return divergence.mean() * temperature**2


def regression_term(
    student: Tensor, teacher: Tensor, weight: Tensor, norm: Tensor | float = 1.0
) -> Tensor:
    """centerX's peak-weighted L1: student, teacher (B, D, H, W), weight (B, 1, H, W) ->
    ``sum |W S / n - W T / n| / (sum W + 1e-4)`` (summed over the D channels, not averaged)."""
    difference = (weight * student / norm - weight * teacher / norm).abs().sum()
    return difference / (weight.sum() + PEAK_EPSILON)


def centernet_regression_terms(
    output: dict[str, Tensor], teacher_output: dict[str, Tensor], weight: Tensor,
    normalize_wh: bool,
) -> dict[str, Tensor]:
    """The CenterNet head's peak-weighted terms for one student stack: ``distill_wh`` (wh / n
    with n the teacher's mean side clamped to >= 1 cell when ``normalize_wh``) and
    ``distill_offset`` (when both predict an offset)."""
    norm: Tensor | float = 1.0
    if normalize_wh:
        norm = teacher_output["wh"].mean(dim=1, keepdim=True).clamp(min=MIN_WH_NORM)  # (w + h) / 2
    terms = {"distill_wh": regression_term(output["wh"].float(), teacher_output["wh"], weight,
                                           norm)}
    if "offset" in output and "offset" in teacher_output:
        terms["distill_offset"] = regression_term(
            output["offset"].float(), teacher_output["offset"], weight
        )
    return terms


def ttfnet_regression_terms(
    output: dict[str, Tensor], teacher_output: dict[str, Tensor], weight: Tensor,
    normalize_wh: bool,
) -> dict[str, Tensor]:
    """The TTFNet head's peak-weighted term for one student stack, as the ChHanXiao fork:
    ``distill_ltrb`` over the 4 distances, divided by ``(l + t + r + b) / 2 + 1e-4`` of the
    teacher when ``normalize_wh``; no offset term."""
    norm: Tensor | float = 1.0
    if normalize_wh:
        norm = teacher_output["ltrb"].sum(dim=1, keepdim=True) / 2 + LTRB_NORM_EPSILON
    return {"distill_ltrb": regression_term(output["ltrb"].float(), teacher_output["ltrb"],
                                            weight, norm)}


# Head type -> (its regression term names, the function computing them for one student stack).
REGRESSION_TERMS = {
    "centernet": (("distill_wh", "distill_offset"), centernet_regression_terms),
    "ttfnet": (("distill_ltrb",), ttfnet_regression_terms),
}


def feature_adapters(
    student: nn.Module, teachers: Sequence[Teacher], example: Tensor
) -> nn.ModuleList:
    """One 1x1 conv (no bias) per teacher from the student's neck width to the teacher's: the
    identity where the widths match, PyTorch's default initialisation elsewhere. ``example``
    (1, 3, H, W) is run once through both models to read the widths."""
    with torch.no_grad():
        was_training = student.training
        student.eval()
        student_width = student(example, return_features=True)[-1]["features"].shape[1]
        student.train(was_training)
        adapters = []
        for teacher in teachers:
            teacher_width = teacher.model(
                example.to(_device_of(teacher.model)), return_features=True
            )[-1]["features"].shape[1]
            adapter = nn.Conv2d(student_width, teacher_width, kernel_size=1, bias=False)
            if teacher_width == student_width:
                adapter.weight.copy_(
                    torch.eye(student_width).view(student_width, student_width, 1, 1)
                )
            adapters.append(adapter)
    return nn.ModuleList(adapters)


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def distillation_loss(
    teachers: Sequence[Teacher],
    config: DistillConfig,
    *,
    task_loss: LossFn = centernet_loss,
    head: str = "centernet",
    adapters: nn.ModuleList | None = None,
    precision: str = "fp32",
) -> LossFn:
    """A loss function with `centernet_loss`'s signature: ``loss_fn(outputs, batch) ->
    (total, parts)``. outputs: the student's list of per-stack dicts (with ``features`` when
    feature distillation is on: fit's ``forward_kwargs={"return_features": True}``); batch:
    the training batch, whose ``image`` (B, 3, H, W) the teachers run on.

    ``head``: the student's head type, whose terms are distilled (every teacher must have it):
    centernet ``total = task (when config.with_labels) + sum_k weight_k (heatmap_weight
    L_heatmap + wh_weight L_wh + offset_weight L_offset + feature_weight L_feature)``; ttfnet
    the same with ``wh_weight L_ltrb`` in place of the wh and offset terms. ``task_loss``: the
    student's task loss (`detector.heads.task_loss`, with the recipe's heatmap loss and
    balancing); distillation terms are added after it and never rebalanced. Every student stack
    is distilled from the teacher's last stack and the terms are averaged over the stacks.
    parts: the task parts, ``distill_heatmap``, the head's regression terms (``distill_wh``,
    ``distill_offset``; ttfnet ``distill_ltrb``), ``distill_feature`` (unweighted sums over
    teachers) and ``total``, all detached.
    """
    teachers = list(teachers)
    if not teachers:
        raise DistillError("distill: no teacher")
    for teacher in teachers:
        check_head(head, teacher.model_config.head, f"distill teacher {teacher.name}")
    regression_names, regression_terms = REGRESSION_TERMS[head]
    check_teachers(teachers)
    if config.feature_weight > 0 and (adapters is None or len(adapters) != len(teachers)):
        raise DistillError(
            "distill: feature_weight > 0 needs one adapter per teacher (feature_adapters)"
        )
    for teacher in teachers:
        freeze(teacher.model)

    def loss_fn(outputs: list[dict[str, Tensor]], batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        images = batch["image"]
        if config.with_labels:
            total, parts = task_loss(outputs, batch)
            parts = dict(parts)
        else:
            total, parts = images.new_zeros((), dtype=torch.float32), {}
        sums = {
            name: images.new_zeros((), dtype=torch.float32)
            for name in ("distill_heatmap", *regression_names, "distill_feature")
        }
        for index, teacher in enumerate(teachers):
            if teacher.model.training:  # someone called .train() on it: statistics must not move
                teacher.model.eval()
            teacher.model.to(images.device)
            with torch.no_grad(), _autocast(precision, images.device):
                stacks = teacher.model(images, return_features=config.feature_weight > 0)
            teacher_output = {key: value.float() for key, value in stacks[-1].items()}
            teacher_probability = torch.sigmoid(teacher_output["heatmap"])
            weight = peak_weight(teacher_probability)
            classes = torch.as_tensor(teacher.classes, device=images.device)
            terms = {name: [] for name in sums}
            for output in outputs:
                student_heatmap = output["heatmap"].float().index_select(1, classes)
                terms["distill_heatmap"].append(
                    heatmap_term(
                        student_heatmap,
                        teacher_output["heatmap"],
                        config.heatmap_loss,
                        config.temperature,
                    )
                )
                for name, value in regression_terms(
                    output, teacher_output, weight, config.normalize_wh
                ).items():
                    terms[name].append(value)
                if config.feature_weight > 0:
                    if "features" not in output:
                        raise DistillError(
                            "distill: feature_weight > 0 but the student outputs no 'features'; "
                            "train with fit(..., forward_kwargs={'return_features': True})"
                        )
                    adapted = adapters[index](output["features"].float())
                    terms["distill_feature"].append(
                        functional.mse_loss(adapted, teacher_output["features"])
                    )
            for name, values in terms.items():
                if not values:
                    continue
                term = sum(values) / len(values)
                sums[name] = sums[name] + term
                total = total + teacher.weight * _weight_of(config, name) * term
        parts.update({name: value.detach() for name, value in sums.items()})
        parts["total"] = total.detach()
        return total, parts

    return loss_fn


def _weight_of(config: DistillConfig, name: str) -> float:
    return {
        "distill_heatmap": config.heatmap_weight,
        "distill_wh": config.wh_weight,
        "distill_ltrb": config.wh_weight,
        "distill_offset": config.offset_weight,
        "distill_feature": config.feature_weight,
    }[name]


def _autocast(precision: str, device: torch.device):
    """The teacher runs at the student's precision (bf16 halves its CPU cost); fp16 only on CUDA."""
    if precision == "fp32" or (precision == "amp" and device.type != "cuda"):
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(
        device.type, dtype=torch.float16 if precision == "amp" else torch.bfloat16
    )


def image_folder_json(folder: str | Path, class_names: Sequence[str], out_path: str | Path) -> Path:
    """Write a COCO json that lists every image in ``folder`` (recursively) with no annotation
    and the student's classes, so unlabelled images go through the labelled data's own loader
    and input pipeline (`detector.data.load_coco`; images without boxes are kept).

    Raises DistillError when the folder holds no image or an image cannot be read."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"distill.unlabelled_images: {folder} is not a folder")
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DistillError(
            f"distill.unlabelled_images: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    images = []
    for image_id, path in enumerate(files, start=1):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise DistillError(f"distill.unlabelled_images: {path} cannot be read as an image")
        images.append(
            {
                "id": image_id,
                "file_name": str(path.relative_to(folder)),
                "height": int(image.shape[0]),
                "width": int(image.shape[1]),
            }
        )
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(class_names)]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"images": images, "annotations": [], "categories": categories}))
    return out_path
