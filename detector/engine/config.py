"""The `train` and `evaluate` sections of a recipe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import (
    ConfigError,
    ModelConfig,
    from_dict,
    merge,
    parse_overrides,
    read_yaml,
    require_folder_name,
    require_int,
    require_number,
    to_dict,
)
from ..data.sources import DataConfig, load_data_yaml
from ..data.transforms import AugmentConfig
from ..evaluate.config import EvaluateConfig

# The original's learning rate, for a batch of 32 images; ctprune scales it linearly with the
# global batch (1.25e-4 x 128 / 32 = 5e-4, as the original's released schedules do by hand).
REFERENCE_BATCH = 32

# centerX's "communism" constants (LOSS.COMMUNISM: CLS_LOSS, WH_LOSS, OFF_LOSS) on our term names.
# centerX matches loss names by substring, so the ChHanXiao TTFNet fork's "wh_loss" (its GIoU
# term, our ltrb) gets the wh value while its "hm_loss" matches no constant and is left as is; we
# deliberately balance every head's heatmap term alike.
CENTERX_BALANCE_MAGNITUDES = {"heatmap": 1.5, "wh": 0.3, "ltrb": 0.3, "offset": 0.1}
# Every head type's task-term names (`detector.heads`; here without importing torch).
LOSS_TERM_NAMES = ("heatmap", "wh", "offset", "ltrb", "pull", "push")


@dataclass
class TrainConfig:
    """How to train (or fine-tune) a model. Epoch-denominated: schedules survive changes of
    data set size and batch size."""

    epochs: int = 140
    """Number of passes over the training set (>= 1)."""
    batch_size: int = 32
    """Images per forward pass, summed over all processes (>= 1); the optimiser steps once per
    `accumulate` of them."""
    accumulate: int = 1
    """Gradient accumulation (>= 1): the optimiser steps once every this many batches, on
    their mean loss, so the effective batch is batch_size x accumulate (what the lr rule and
    the schedule's steps count). A partial group at the end of an epoch steps on its own (its
    mean); groups never span epochs, the unit a resume restarts from (with the same value)."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """Adam (the original's choice, robust for CenterNet) or SGD with momentum."""
    lr: float = 1.25e-4
    """Learning rate for a batch of 32 images (finite, > 0); the optimiser uses
    lr x batch_size x accumulate / 32 (the effective batch)."""
    momentum: float = 0.9
    """SGD momentum, in [0, 1) (ignored by Adam)."""
    weight_decay: float = 0.0
    """L2 weight decay (>= 0); the original uses none."""
    schedule: Literal["multistep", "step", "cosine"] = "multistep"
    """multistep: lr x gamma at each of `lr_steps`; step: lr x gamma every `lr_steps[0]` epochs;
    cosine: cosine decay to lr x min_lr_ratio after the warm-up."""
    lr_steps: list[float] = field(default_factory=lambda: [90.0, 120.0])
    """Epochs at which multistep drops the lr (the original's 90, 120), increasing, each > 0
    and at most `epochs`; step uses the first."""
    gamma: float = 0.1
    """Factor of each lr drop, in (0, 1]."""
    warmup_epochs: float = 0.0
    """Linear warm-up from lr x warmup_factor over this many epochs (fractions allowed), from
    0 to `epochs`."""
    warmup_factor: float = 0.001
    """Starting fraction of the lr during warm-up, in (0, 1]."""
    min_lr_ratio: float = 0.0
    """Cosine schedule: final lr as a fraction of the peak lr, in [0, 1]."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay per optimiser step,
    in (0, 1), e.g. 0.9998 (early steps use min(decay, (1 + n) / (10 + n)) after n steps);
    None = off. When on, evaluation and best.pt use the averaged weights, last.pt keeps the
    raw ones and last_ema.pt the averaged ones; resume.pt holds both."""
    grad_clip: float | None = None
    """Clip the gradient norm to this value (> 0); None disables clipping (the original does not
    clip)."""
    precision: Literal["fp32", "amp", "bf16"] = "fp32"
    """fp32; amp = float16 autocast with gradient scaling (CUDA only); bf16 = bfloat16
    autocast (CPU and CUDA). Losses are always computed in float32."""
    sync_batchnorm: bool = False
    """Under torchrun on CUDA, synchronise BatchNorm statistics across processes."""
    channels_last: bool = False
    """Run convolutions in channels-last memory format (faster on recent CPUs and GPUs)."""
    seed: int = 317
    """Seed of weights, data order and augmentation (>= 0; 317 is the original's)."""
    deterministic: bool = False
    """Ask PyTorch for deterministic kernels (slower; bit-identical reruns on one machine)."""
    workers: int = 2
    """Data-loading worker processes per training process (>= 0; 0 loads in the main
    process)."""
    eval_interval: int = 5
    """Evaluate on the val split every this many epochs (and after the last), >= 0; 0 never."""
    best_metric: Literal["ap", "ap50", "loss"] = "ap50"
    """Metric that selects best.pt: COCO AP, COCO AP50 (the pruning seed's choice) or the
    validation loss."""
    max_objects: int = 128
    """Objects per image kept for training targets (>= 1; the original: 128 for COCO)."""
    min_overlap: float = 0.7
    """Gaussian-radius IoU target, in (0, 1) (0.7 with the original formula; 0.3 with the
    corrected one)."""
    radius: Literal["original", "corrected"] = "original"
    """Gaussian-radius formula: the original's (CornerNet's algebra quirk) or the corrected one."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation; the defaults are the original's."""
    log_interval: int = 20
    """Steps between log records (>= 1)."""
    pretrained: str | None = None
    """Local file with torchvision ImageNet weights for the backbone; None trains from scratch."""
    heatmap_loss: Literal["focal", "mse", "focal_labelled"] = "focal"
    """Loss on the class heatmaps, for every head type: focal (CornerNet's, the original's),
    mse (centerX's mean squared error over all cells) or focal_labelled (centerX's
    ignore-unlabelled focal loss: an (image, class) channel without any object contributes no
    negatives; for data sets merged from single-class sets)."""
    balance_losses: bool = False
    """centerX's loss balancing ("communism loss"): each task term named in
    `balance_magnitudes` is rescaled to that fixed value, c x L / L with the divisor detached,
    so every term's gradient is scaled by c / L. Terms not named keep their weight;
    distillation terms are never rebalanced. The training loss total is then nearly constant
    (the divergence check and skip-loss see only the unbalanced terms); the validation loss is
    computed unbalanced."""
    balance_magnitudes: dict[str, float] = field(
        default_factory=lambda: dict(CENTERX_BALANCE_MAGNITUDES)
    )
    """With `balance_losses`: task-term name -> its fixed magnitude (finite, > 0). The default
    maps centerX's constants onto the terms of every head: cls 1.5 -> heatmap, wh 0.3 -> wh and
    ltrb, off 0.1 -> offset. Names: heatmap, wh, offset (centernet), ltrb (ttfnet), pull, push
    (triplet); a name the head does not produce is ignored."""
    skip_loss_factor: float | None = None
    """centerX's skip-loss: an optimiser step whose loss (its batch's; with `accumulate`, its
    group's mean) exceeds this factor (finite, > 1; centerX's recipes use 1.3) times the last
    accepted step's is not taken at all: no optimiser, weight-average or scaler update (the
    schedule still advances). Counted as ``skipped_steps`` in the epoch record and line; None =
    off."""

    def __post_init__(self) -> None:
        for name, minimum in (("epochs", 1), ("batch_size", 1), ("accumulate", 1), ("seed", 0),
                              ("workers", 0), ("eval_interval", 0), ("max_objects", 1),
                              ("log_interval", 1)):
            require_int(getattr(self, name), name, minimum)
        # No upper bound on lr: a rate that makes the loss explode is caught by fit's check of
        # the loss, not guessed here.
        require_number(self.lr, "lr", above=0)
        require_number(self.momentum, "momentum", at_least=0, below=1)
        require_number(self.weight_decay, "weight_decay", at_least=0)
        require_number(self.gamma, "gamma", above=0, at_most=1)
        require_number(self.warmup_epochs, "warmup_epochs", at_least=0, at_most=self.epochs)
        require_number(self.warmup_factor, "warmup_factor", above=0, at_most=1)
        require_number(self.min_lr_ratio, "min_lr_ratio", at_least=0, at_most=1)
        require_number(self.min_overlap, "min_overlap", above=0, below=1)
        if self.ema_decay is not None:
            require_number(self.ema_decay, "ema_decay", above=0, below=1)
        if self.grad_clip is not None:
            # A negative clip norm multiplies the gradient by a negative factor: it reverses it.
            require_number(self.grad_clip, "grad_clip", above=0)
        for step in self.lr_steps:
            require_number(step, "lr_steps", above=0)
        if list(self.lr_steps) != sorted(set(self.lr_steps)):
            raise ValueError(f"lr_steps: expected increasing epochs, got {list(self.lr_steps)}")
        if self.schedule == "step" and not self.lr_steps:
            raise ValueError("lr_steps: the step schedule needs a step length in epochs")
        for name, magnitude in self.balance_magnitudes.items():
            if name not in LOSS_TERM_NAMES:
                raise ValueError(
                    f"balance_magnitudes: expected task-term names ({', '.join(LOSS_TERM_NAMES)}), "
                    f"got {name!r}"
                )
            require_number(magnitude, f"balance_magnitudes.{name}", above=0)
        self.balance_magnitudes = {
            name: float(magnitude) for name, magnitude in self.balance_magnitudes.items()
        }
        if self.skip_loss_factor is not None:
            # At or below 1 every rise of the loss is skipped and never accepted later, so the
            # accepted loss can only fall: training would stop once a batch is unusually easy.
            require_number(self.skip_loss_factor, "skip_loss_factor", above=1)
        if self.pretrained is not None and not self.pretrained.strip():
            raise ValueError(f"pretrained: expected a file path or null, got {self.pretrained!r}")

    def scaled_lr(self) -> float:
        """The optimiser's peak lr: `lr` scaled linearly by the effective batch (batch_size x
        accumulate images per optimiser step) over the reference batch of 32."""
        return self.lr * self.batch_size * self.accumulate / REFERENCE_BATCH


@dataclass
class TrainRecipe:
    """A training run: what to build, on which data, how to train and evaluate it."""

    name: str = "run"
    """Run name: outputs go to runs/<name>/ unless --out says otherwise; in a recipe file a
    folder name (letters, digits, '.', '_', '-', not starting with '.')."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The architecture and its input spec."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the data set lives (or the path of a data.yaml)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training settings."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Evaluation settings."""


def read_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    """A recipe YAML as a dict with ``overrides`` (``section.key=value`` strings) merged in.
    The data section may be a mapping or the path of a data.yaml; it comes back as a mapping
    whose relative paths resolve against the file that declared them."""
    path = Path(path)
    sections = [f.name for f in dataclasses.fields(TrainRecipe)]
    raw = merge(read_yaml(path), parse_overrides(list(overrides), sections))
    data = raw.get("data")
    if isinstance(data, str):
        data_path = Path(data) if Path(data).is_absolute() else path.parent / data
        raw["data"] = to_dict(load_data_yaml(data_path))
    elif isinstance(data, dict) and data.get("root") is None:
        raw["data"] = {**data, "root": str(path.parent.resolve())}
    return raw


def load_train_recipe(path: str | Path, overrides: list[str] = ()) -> TrainRecipe:
    """Read a training recipe YAML strictly (see `read_recipe`)."""
    raw = read_recipe(path, overrides)
    try:
        # Only a recipe's own name is a folder under runs/; the runner names stages "a/b".
        require_folder_name(raw.get("name", TrainRecipe.name), "name")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return from_dict(TrainRecipe, raw, "")
