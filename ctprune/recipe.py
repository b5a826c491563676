"""Recipes: one flat YAML file that states a whole compression experiment, or (without
`prune`) a training run.

Sections, each validated strictly into the dataclasses the CLI uses (an unknown key or a wrong
type raises with its dotted path, ``--set section.key=value`` overrides any key):

    name:       the run's name; it writes under ./runs/<name>/ unless --out says otherwise
    synthetic:  optional; the runner generates the built-in benchmark there before reading
                data (a no-op when present; `prepare_data`), loading never does
    model:      the architecture and input spec (detector.config.ModelConfig)
    data:       a mapping or the path of a data.yaml (detector.data.sources.DataConfig)
    baseline:   where the unpruned model comes from: a ctprune checkpoint, an original
                CenterNet checkpoint, or (neither given) training it with `train`
    train:      how the baseline is trained (detector.engine.config.TrainConfig)
    sparsity:   optional; sparsity-train the baseline's BN scales (ctprune.pruning.slimming)
    prune:      optional; what to prune and how (PruneConfig, the knobs of
                ctprune.pruning.PruneOptions); a list of ratios or criteria is a sweep
    finetune:   how each pruned model is trained afterwards (a TrainConfig whose unset keys
                come from `train`), with an optional `distill` part: the unpruned baseline
                (or other teachers) as teacher
    quantize:   optional; INT8 post-training quantization (ctprune.quantize.QuantizeConfig) of
                the baseline and of every branch's final model, after fine-tuning
    evaluate:   detector.evaluate.config.EvaluateConfig, used after every stage
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
    require_folder_name,
    require_int,
    to_dict,
)
from detector.data.shapes import MIN_IMAGE_SIZE
from detector.data.sources import DataConfig, load_data_yaml
from detector.engine.config import TrainConfig, TrainRecipe
from detector.evaluate.config import EvaluateConfig

from .distill import DistillConfig, DistillError, check_head
from .pruning.options import DEFAULTS, PruneOptions
from .pruning.slimming import SparsityConfig
from .quantize import QuantizeConfig


@dataclass
class SyntheticConfig:
    """The built-in synthetic benchmark, generated before anything reads the data."""

    out_dir: str = "data/shapes"
    """Where to write it, relative to the recipe file."""
    num_train: int = 2000
    """Training images (>= 1)."""
    num_val: int = 500
    """Validation images (>= 1; the val split is the same for any num_train)."""
    image_size: int = 128
    """Image side in pixels (>= 32)."""
    seed: int = 0
    """Generation seed (>= 0)."""

    def __post_init__(self) -> None:
        if not self.out_dir.strip():
            raise ValueError(f"out_dir: expected a folder path, got {self.out_dir!r}")
        require_int(self.num_train, "num_train", 1)
        require_int(self.num_val, "num_val", 1)
        require_int(self.image_size, "image_size", MIN_IMAGE_SIZE)
        require_int(self.seed, "seed", 0)


@dataclass
class BaselineConfig:
    """Where the unpruned model comes from. With neither key set, it is trained with `train`."""

    checkpoint: str | None = None
    """A ctprune checkpoint (relative to the recipe file)."""
    original: str | None = None
    """A checkpoint of the original CenterNet code (ctdet, msra ResNet), imported."""

    def __post_init__(self) -> None:
        for key in ("checkpoint", "original"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ValueError(f"{key}: expected a file path or null, got {value!r}")
        if self.checkpoint is not None and self.original is not None:
            raise ValueError(
                "checkpoint: give either baseline.checkpoint or baseline.original, not both"
            )


@dataclass
class PruneConfig(PruneOptions):
    """How the baseline is pruned: `PruneOptions`' knobs, where a list in `ratio`, `target_macs`
    or `criterion` makes a sweep (one branch per combination, each pruned and fine-tuned on its
    own), plus rounds and BatchNorm recalibration."""

    criterion: str | list[str] = DEFAULTS.criterion
    """One of ctprune.pruning.CRITERIA (l1, l2, bn_gamma, kmeans, random, taylor, hessian), or a
    list of distinct ones."""
    ratio: float | list[float] | None = DEFAULTS.ratio
    """Fraction of channels removed per round (per group in layer scope), in [0, 1) and at most
    `max_layer_ratio`, or a list of distinct ones."""
    target_macs: float | list[float] | None = DEFAULTS.target_macs
    """Instead of `ratio`: the fraction of the baseline's MACs to keep (bisected), in (0, 1], or
    a list of distinct ones."""
    rounds: int = 1
    """Iterative pruning (>= 1): prune -> fine-tune repeated this many times, each round removing
    `ratio` of what is left (the first seed's schedule)."""
    recalibrate_batches: int = 20
    """Training batches used to re-estimate BatchNorm statistics after each pruning (>= 0;
    0: off)."""

    def __post_init__(self) -> None:
        ratios, targets = _as_list(self.ratio), _as_list(self.target_macs)
        budgets = [value for value in (self.target_params, self.target_latency)
                   if value is not None]
        if bool(ratios) + bool(targets) + bool(budgets) != 1:
            raise ValueError("ratio: expected exactly one of prune.ratio, prune.target_macs, "
                             "prune.target_params and prune.target_latency")
        for criterion in _as_list(self.criterion):
            for ratio in ratios or [None]:
                for target in targets or [None]:
                    self.options(criterion, ratio, target)  # checks every sweep point
        for name, values in (("criterion", _as_list(self.criterion)), ("ratio", ratios),
                             ("target_macs", targets)):
            if len(set(values)) != len(values):
                # Two equal sweep points would be one branch folder written twice.
                raise ValueError(f"{name}: expected distinct sweep values, got {values}")
        require_int(self.rounds, "rounds", 1)
        require_int(self.recalibrate_batches, "recalibrate_batches", 0)

    def options(
        self, criterion: str, ratio: float | None, target_macs: float | None
    ) -> PruneOptions:
        """One sweep point: this section's shared knobs with one criterion and one amount."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(PruneOptions)}
        return PruneOptions(
            **{**shared, "criterion": criterion, "ratio": ratio, "target_macs": target_macs}
        )


@dataclass
class ReportConfig:
    """What is measured beside the stage artifacts: once, as each stage finishes (stored in its
    stage.json), and again only by `ctprune report --measure`."""

    latency: bool = True
    """Measure CPU latency at batch 1 and the model's input size, each stage interleaved with
    the baseline (paired medians)."""
    latency_repeats: int = 7
    """Paired forward passes per model (>= 1)."""
    threads: int | None = None
    """CPU threads for the latency runs (>= 1; None: torch's default)."""
    controls: bool = False
    """Add two controls beside each branch: the same pruning with the `random` criterion, and
    the unpruned baseline fine-tuned for the same epochs (is pruning better than chance, and is
    the fine-tune itself what helps?)."""

    def __post_init__(self) -> None:
        require_int(self.latency_repeats, "latency_repeats", 1)
        if self.threads is not None:
            require_int(self.threads, "threads", 1)


@dataclass
class FinetuneConfig(TrainConfig):
    """How each pruned model is trained afterwards: every `train` key the section does not set
    is taken from the recipe's `train` section (not from the defaults), plus `distill`."""

    distill: DistillConfig | None = None
    """Knowledge distillation while fine-tuning (ctprune.distill); by default the teacher is the
    run's unpruned baseline. None: the task loss alone."""

    def train_config(self) -> TrainConfig:
        """The training keys alone, as the detector's training loop takes them."""
        keys = [f.name for f in dataclasses.fields(TrainConfig)]
        return TrainConfig(**{key: getattr(self, key) for key in keys})


@dataclass
class Recipe:
    """A whole experiment: baseline -> prune -> fine-tune -> evaluate -> report. Without a
    `prune` section it is a training recipe: `ctprune train` (and `ctprune run`) train its
    baseline; `ctprune train` on a recipe with `prune` trains its baseline too."""

    name: str = "run"
    """The run's name: runs/<name>/ under the current directory unless --out is given; a folder
    name (letters, digits, '.', '_', '-', not starting with '.')."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The architecture and its input spec."""
    data: DataConfig | str = field(default_factory=DataConfig)
    """The data section, or the path of a data.yaml (relative to the recipe file) that
    `prepare_data` reads once the synthetic benchmark is generated."""
    synthetic: SyntheticConfig | None = None
    """The built-in benchmark, generated by the runner before it reads the data."""
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    """Where the unpruned model comes from."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """How the baseline is trained."""
    sparsity: SparsityConfig | None = None
    """Sparsity training of the baseline's BatchNorm scales (network slimming)."""
    prune: PruneConfig | None = None
    """How the baseline is pruned; None: a training recipe (no branches)."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """How each pruned model is trained; unset keys come from `train`."""
    quantize: QuantizeConfig | None = None
    """INT8 post-training quantization of the baseline and of each branch's final model, run
    after fine-tuning (stages ``baseline_int8`` and ``<branch>/int8``); None: no quantization."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Evaluation after every stage."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """What the report measures."""
    source: str = ""
    """The recipe file (set by `load_recipe`; relative paths resolve against its folder)."""

    def __post_init__(self) -> None:
        require_folder_name(self.name, "name")

    def train_recipe(self) -> TrainRecipe:
        """The detector's view of the recipe's baseline training (after `prepare_data`)."""
        if isinstance(self.data, str):
            raise ValueError(f"data: {self.data} is not read yet; call prepare_data(recipe)")
        return TrainRecipe(name=self.name, model=self.model, data=self.data, train=self.train,
                           evaluate=self.evaluate)


@dataclass(frozen=True)
class Branch:
    """One sweep point: a criterion with a ratio or a MAC target (or the section's parameter or
    latency target, when neither is given)."""

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
    """The sweep's branches (criteria x ratios or MAC targets), then the controls; none
    without a `prune` section."""
    config = recipe.prune
    if config is None:
        return []
    amounts = [(f"r{ratio}", ratio, None) for ratio in _as_list(config.ratio)]
    amounts += [(f"macs{target}", None, target) for target in _as_list(config.target_macs)]
    for kind in ("params", "latency"):
        if getattr(config, f"target_{kind}") is not None:
            amounts.append((f"{kind}{getattr(config, f'target_{kind}')}", None, None))
    # A sensitivity allocation names its branches apart from the uniform ones.
    allocation = "_sensitivity" if config.allocation == "sensitivity" else ""
    result = [
        Branch(f"{criterion}{allocation}_{label}", criterion, ratio, target)
        for criterion in _as_list(config.criterion)
        for label, ratio, target in amounts
    ]
    if recipe.report.controls:
        for label, ratio, target in amounts:
            result.append(
                Branch(f"control_random_{label}", "random", ratio, target, control="random")
            )
        result.append(Branch("control_unpruned", "none", None, None, control="unpruned"))
    return result


def resolve_path(recipe: Recipe, path: str) -> Path:
    """A path from the recipe, relative to the recipe file's folder."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else Path(recipe.source).parent / candidate


def load_recipe(path: str | Path, overrides: list[str] = (), *, check_files: bool = True) -> Recipe:
    """Read and validate a recipe: the YAML file and the ``--set`` overrides, each read once.
    Every error names the key or the file. Loading has no side effects: a `synthetic`
    benchmark is generated, and a data.yaml named by `data` read, by `prepare_data`, which the
    runner calls before it reads the data.

    `finetune` takes every key it does not set from `train` (``{**train, **finetune}`` before
    validation); without a `train` section, a recipe that prunes must give `finetune.epochs`.

    ``check_files=False`` validates keys and types only; by default the files the recipe names
    (baseline, teachers, unlabelled images, a data.yaml the synthetic benchmark will not
    write) must exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe file")
    sections = [f.name for f in dataclasses.fields(Recipe) if f.name != "source"]
    raw = merge(read_yaml(path), parse_overrides(list(overrides), sections))
    raw = _inherit_finetune(raw)
    data = raw.pop("data", None)
    recipe = from_dict(Recipe, {**raw, "source": str(path.resolve())}, "")
    recipe.data = _data_section(data, path)
    for section in ("train", "finetune"):
        _check_lr_steps(getattr(recipe, section), section)
    if recipe.finetune.distill is not None:
        # Named before any work: a head type without a distillation loss (the keypoint
        # triplet's) would otherwise fail only when the fine-tune starts, after training.
        try:
            check_head(recipe.model.head, recipe.model.head, "finetune.distill")
        except DistillError as error:
            raise ConfigError(f"{path}: {error}") from None
    if check_files:
        _check_files(recipe, path)
    return recipe


def _inherit_finetune(raw: dict) -> dict:
    """``raw`` with its finetune section completed from its train section."""
    train, finetune = raw.get("train"), raw.get("finetune")
    if not isinstance(train, dict) and train is not None:
        return raw  # from_dict names the wrong type
    if finetune is not None and not isinstance(finetune, dict):
        return raw
    if train is None and raw.get("prune") is not None and "epochs" not in (finetune or {}):
        raise ConfigError("finetune.epochs: required when the recipe has no train section")
    if train is None and finetune is None:
        return raw
    return {**raw, "finetune": {**(train or {}), **(finetune or {})}}


def _check_lr_steps(config: TrainConfig, section: str) -> None:
    """A multistep schedule's drops must fall within the epochs (a drop beyond them never
    happens: usually a schedule written for another length)."""
    if config.schedule != "multistep":
        return
    for step in config.lr_steps:
        if step > config.epochs:
            raise ConfigError(
                f"{section}.lr_steps: step {step:g} is beyond {section}.epochs {config.epochs}"
            )


def _data_section(data, path: Path) -> DataConfig | str:
    """The data section as a DataConfig whose relative paths resolve against the recipe's
    folder, or the data.yaml path as written (read later by `prepare_data`)."""
    if data is None:
        return DataConfig()
    if isinstance(data, str) and data.strip():
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"data: expected a mapping or the path of a data.yaml, got {data!r}")
    if data.get("root") is None:
        data = {**data, "root": str(path.parent.resolve())}
    return from_dict(DataConfig, data, "data")


def _check_files(recipe: Recipe, path: Path) -> None:
    if isinstance(recipe.data, str) and recipe.synthetic is None:
        data_file = resolve_path(recipe, recipe.data)
        if not data_file.is_file():
            raise FileNotFoundError(f"{path}: data: {data_file} does not exist")
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


def prepare_data(recipe: Recipe) -> Recipe:
    """``recipe`` with its data ready to read: the synthetic benchmark generated first when the
    recipe declares one (a no-op when it is already there), then the data.yaml that `data`
    names read. The runner's first step (`ctprune run`, `ctprune train`)."""
    if recipe.synthetic is not None:
        from detector.data.shapes import generate_shapes

        config = recipe.synthetic
        generate_shapes(resolve_path(recipe, config.out_dir), config.num_train, config.num_val,
                        config.image_size, config.seed)
    if isinstance(recipe.data, str):
        return dataclasses.replace(recipe, data=load_data_yaml(resolve_path(recipe, recipe.data)))
    return recipe


def stage_fingerprint(*parts) -> str:
    """A stable hash of a stage's resolved configuration and inputs (plain data)."""
    text = json.dumps([to_dict(part) if dataclasses.is_dataclass(part) else part for part in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
