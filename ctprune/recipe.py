"""Recipes: one flat YAML file that states a whole compression experiment.

Sections, each validated strictly into the dataclasses the CLI uses (an unknown key or a wrong
type raises with its dotted path, ``--set section.key=value`` overrides any key):

    name:       the run's name; it writes under ./runs/<name>/ unless --out says otherwise
    synthetic:  optional; generate the built-in benchmark there first (a no-op when present)
    model:      the architecture and input spec (detector.config.ModelConfig)
    data:       a mapping or the path of a data.yaml (detector.data.sources.DataConfig)
    baseline:   where the unpruned model comes from: a ctprune checkpoint, an original
                CenterNet checkpoint, or (neither given) training it with `train`
    train:      how the baseline is trained (detector.engine.config.TrainConfig)
    sparsity:   optional; sparsity-train the baseline's BN scales (ctprune.slimming)
    prune:      what to prune and how (PruneConfig); a list of ratios or criteria is a sweep
    finetune:   how each pruned model is trained afterwards (a TrainConfig), with an optional
                `distill` part: the unpruned baseline (or other teachers) as teacher
    evaluate:   detector.engine.config.EvaluateConfig, used after every stage
    report:     ReportConfig
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from detector.config import (
    ConfigError,
    ModelConfig,
    from_dict,
    merge,
    parse_overrides,
    read_yaml,
    to_dict,
)
from detector.data.sources import DataConfig
from detector.engine.config import EvaluateConfig, TrainConfig, read_recipe

from .distill import DistillConfig
from .pruning.api import DEFAULT_ROUND_TO
from .pruning.criteria import check_criterion
from .slimming import SparsityConfig


@dataclass
class SyntheticConfig:
    """The built-in synthetic benchmark, generated before anything reads the data."""

    out_dir: str = "data/shapes"
    """Where to write it, relative to the recipe file."""
    num_train: int = 2000
    """Training images."""
    num_val: int = 500
    """Validation images (the val split is the same for any num_train)."""
    image_size: int = 128
    """Image side in pixels."""
    seed: int = 0
    """Generation seed."""


@dataclass
class BaselineConfig:
    """Where the unpruned model comes from. With neither key set, it is trained with `train`."""

    checkpoint: str | None = None
    """A ctprune checkpoint (relative to the recipe file)."""
    original: str | None = None
    """A checkpoint of the original CenterNet code (ctdet, msra ResNet), imported."""

    def __post_init__(self) -> None:
        if self.checkpoint is not None and self.original is not None:
            raise ValueError(
                "checkpoint: give either baseline.checkpoint or baseline.original, not both"
            )


@dataclass
class PruneConfig:
    """How the baseline is pruned. A list in `ratio`, `target_macs` or `criterion` makes a
    sweep: one branch per combination, each pruned and fine-tuned on its own."""

    criterion: str | list[str] = "l1"
    """One of ctprune.pruning.CRITERIA (l1, l2, bn_gamma, kmeans, random), or a list."""
    ratio: float | list[float] | None = 0.2
    """Fraction of channels removed per round (per group in layer scope), or a list."""
    target_macs: float | list[float] | None = None
    """Instead of `ratio`: the fraction of the baseline's MACs to keep (bisected), or a list."""
    scope: str = "layer"
    """"layer": every group loses the ratio; "global": groups ranked together."""
    max_layer_ratio: float = 0.8
    """The most any group may lose in global scope."""
    round_to: int | None = DEFAULT_ROUND_TO
    """Kept widths are multiples of this (None: whole channels)."""
    ratio_overrides: dict = field(default_factory=dict)
    """Module-name pattern -> ratio for the groups it matches."""
    rounds: int = 1
    """Iterative pruning: prune -> fine-tune repeated this many times, each round removing
    `ratio` of what is left (the first seed's schedule)."""
    recalibrate_batches: int = 20
    """Training batches used to re-estimate BatchNorm statistics after each pruning (0: off)."""

    def __post_init__(self) -> None:
        for criterion in _as_list(self.criterion):
            try:
                check_criterion(criterion)
            except ValueError as error:
                raise ValueError(f"criterion: {error}") from None
        if (self.ratio is None) == (self.target_macs is None):
            raise ValueError("ratio: give exactly one of prune.ratio and prune.target_macs")
        for ratio in _as_list(self.ratio):
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"ratio: expected values in [0, 1), got {ratio!r}")
        for target in _as_list(self.target_macs):
            if not 0.0 < target <= 1.0:
                raise ValueError(f"target_macs: expected values in (0, 1], got {target!r}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope: expected 'layer' or 'global', got {self.scope!r}")
        if self.rounds < 1:
            raise ValueError(f"rounds: expected an integer >= 1, got {self.rounds!r}")
        if self.recalibrate_batches < 0:
            raise ValueError(
                f"recalibrate_batches: expected an integer >= 0, got {self.recalibrate_batches!r}"
            )


@dataclass
class ReportConfig:
    """What the report measures beside the stage artifacts."""

    latency: bool = True
    """Measure CPU latency (paired medians, batch 1, at the model's input size)."""
    latency_repeats: int = 7
    """Paired forward passes per model."""
    threads: int | None = None
    """CPU threads for the latency runs (None: torch's default)."""
    controls: bool = False
    """Add two controls beside each branch: the same pruning with the `random` criterion, and
    the unpruned baseline fine-tuned for the same epochs (is pruning better than chance, and is
    the fine-tune itself what helps?)."""


@dataclass
class FinetuneConfig(TrainConfig):
    """How each pruned model is trained afterwards: the `train` keys, plus `distill`."""

    distill: DistillConfig | None = None
    """Knowledge distillation while fine-tuning (ctprune.distill); by default the teacher is the
    run's unpruned baseline. None: the task loss alone."""

    def train_config(self) -> TrainConfig:
        """The training keys alone, as the detector's training loop takes them."""
        keys = [f.name for f in dataclasses.fields(TrainConfig)]
        return TrainConfig(**{key: getattr(self, key) for key in keys})


@dataclass
class Recipe:
    """A whole experiment: baseline -> prune -> fine-tune -> evaluate -> report."""

    name: str = "run"
    """The run's name: runs/<name>/ under the current directory unless --out is given."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig | None = None
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sparsity: SparsityConfig | None = None
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    source: str = ""
    """The recipe file (set by `load_recipe`; relative paths resolve against its folder)."""


@dataclass(frozen=True)
class Branch:
    """One sweep point: a criterion with a ratio or a MAC target."""

    name: str
    criterion: str
    ratio: float | None
    target_macs: float | None
    control: str | None = None
    """None for a real branch; "random" or "unpruned" for a control."""


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def branches(recipe: Recipe) -> list[Branch]:
    """The sweep's branches (criteria x ratios or MAC targets), then the controls."""
    config = recipe.prune
    amounts = [("r", ratio, None) for ratio in _as_list(config.ratio)]
    amounts += [("macs", None, target) for target in _as_list(config.target_macs)]
    result = [
        Branch(
            f"{criterion}_{tag}{ratio if ratio is not None else target}", criterion, ratio, target
        )
        for criterion in _as_list(config.criterion)
        for tag, ratio, target in amounts
    ]
    if recipe.report.controls:
        for tag, ratio, target in amounts:
            amount = ratio if ratio is not None else target
            result.append(
                Branch(f"control_random_{tag}{amount}", "random", ratio, target, control="random")
            )
        result.append(Branch("control_unpruned", "none", None, None, control="unpruned"))
    return result


def resolve_path(recipe: Recipe, path: str) -> Path:
    """A path from the recipe, relative to the recipe file's folder."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else Path(recipe.source).parent / candidate


def load_recipe(path: str | Path, overrides: list[str] = (), *, check_files: bool = True) -> Recipe:
    """Read and validate a recipe; the synthetic benchmark is generated first when declared,
    so that its data.yaml can be read. Every error names the key or the file.

    ``check_files=False`` validates keys and types only: no data is generated or read and
    the files the recipe names need not exist (a recipe whose COCO paths a user still has to
    edit validates; its `data` section then comes back as the defaults)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe file")
    raw = merge(read_yaml(path), parse_overrides(list(overrides)))
    if not check_files:
        data = raw.pop("data", None)
        if isinstance(data, dict):
            from_dict(DataConfig, data, "data")
        elif data is not None and not isinstance(data, str):
            raise ConfigError(f"data: expected a mapping or the path of a data.yaml, got {data!r}")
        return from_dict(Recipe, {**raw, "source": str(path.resolve())}, "")
    synthetic = raw.get("synthetic")
    if synthetic is not None:
        from detector.data.shapes import generate_shapes

        config = from_dict(SyntheticConfig, synthetic, "synthetic")
        out_dir = (
            Path(config.out_dir)
            if Path(config.out_dir).is_absolute()
            else path.parent / config.out_dir
        )
        generate_shapes(out_dir, config.num_train, config.num_val, config.image_size, config.seed)
    recipe = from_dict(Recipe, {**read_recipe(path, overrides), "source": str(path.resolve())}, "")
    for key in ("checkpoint", "original"):
        value = getattr(recipe.baseline, key)
        if value is not None and not resolve_path(recipe, value).is_file():
            raise FileNotFoundError(
                f"{path}: baseline.{key}: {resolve_path(recipe, value)} does not exist"
            )
    distill = recipe.finetune.distill
    if distill is not None:
        for index, teacher in enumerate(distill.teachers):
            teacher_path = resolve_path(recipe, teacher.checkpoint or ".")
            if teacher.checkpoint is not None and not teacher_path.is_file():
                raise FileNotFoundError(f"{path}: finetune.distill.teachers[{index}].checkpoint: "
                                        f"{teacher_path} does not exist")
        images = distill.unlabelled_images
        if images is not None and not resolve_path(recipe, images).is_dir():
            raise FileNotFoundError(f"{path}: finetune.distill.unlabelled_images: "
                                    f"{resolve_path(recipe, images)} is not a folder")
    return recipe


def stage_fingerprint(*parts) -> str:
    """A stable hash of a stage's resolved configuration and inputs (plain data)."""
    text = json.dumps([to_dict(part) if dataclasses.is_dataclass(part) else part for part in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
