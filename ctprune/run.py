"""`ctprune run`: a recipe's stages in order, each in its own folder, never redoing finished work.

Layout of a run (``runs/<name>/`` under the current directory unless --out says otherwise):

    manifest.json, recipe.yaml           what ran: recipe hash, versions, git revision, command
    baseline/                            the unpruned model (trained, imported or copied)
    <branch>/prune/, <branch>/finetune/  per sweep point; prune_2/, finetune_2/ ... with rounds
    baseline_int8/, <branch>/int8/       with a `quantize` section: each final model in INT8
    control_random_r0.5/, control_unpruned/   the controls, when report.controls is on
    report.json, report.md, report.html, *.png

Every stage folder holds ``checkpoint.pt`` (an INT8 stage: ``model.int8.onnx``, its
``model.fp32.onnx`` and ``quantize.json``), ``eval/metrics.json`` (val COCO metrics, P-R curves)
and ``stage.json``; training stages add ``metrics.jsonl``, ``last.pt``, ``resume.pt``. A stage
is skipped when its ``stage.json`` is complete and records the same fingerprint (its resolved
configuration and its input's fingerprint; with ``finetune.distill``, also the distillation
settings and each teacher's identity, so changing them reruns the fine-tunes only); a stage
that was interrupted resumes from its ``resume.pt``; a stage whose configuration changed starts
again from scratch, its previous folder kept aside (``.<folder>.old``) until the new one
completes and put back if it fails. A failure leaves the folders of the finished stages
untouched. Before any work `ctprune.preflight.preflight` checks every stage's inputs, and
``RUN/.lock`` (`ctprune.lock`) keeps a second run out while this one writes. A fine-tune
whose `distill` names no teacher checkpoint learns from ``baseline/checkpoint.pt``.

Under torchrun every process runs the same stages on its own device (``cuda:LOCAL_RANK``);
rank 0 alone takes the lock, decides what each stage does, writes and moves the run folder's
files, and prunes (the others load its pruned checkpoint, and every rank's plan digest is
compared with rank 0's); see docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from detector import distributed, load_model, save_checkpoint
from detector.config import ModelConfig, to_dict
from detector.data.dataset import CenterNetDataset, collate
from detector.data.sources import load_splits
from detector.engine.config import TrainConfig, TrainRecipe
from detector.engine.fit import DIVERGED_ADVICE, TrainingDiverged
from detector.engine.train import resolve_model_config
from detector.evaluate.run import evaluate_model
from detector.files import (
    atomic_copy,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temporaries,
)
from detector.layout import trained_model
from detector.original import import_original_checkpoint

from .distill import DistillConfig
from .layout import CHECKPOINT_FILE as CHECKPOINT
from .layout import (
    EVAL_FOLDER,
    MANIFEST_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    RESUME_FILE,
    STAGE_FILE,
    STAGES,
)
from .lock import LOCK_FILE, run_lock
from .preflight import preflight
from .pruning import prune_with
from .pruning.criteria import DATA_CRITERIA
from .pruning.recalibrate import recalibrate_bn
from .quantize import INT8_FILE, quantize_checkpoint
from .recipe import Branch, Recipe, branches, prepare_data, resolve_path, stage_fingerprint
from .report import build_report, stage_figures
from .train import train


class RunError(ValueError):
    """A run folder or stage that cannot be used as asked."""


def _git_revision() -> str | None:
    """The package's git commit, with "+dirty" when tracked files differ from it (the run's
    code is then not exactly that commit); None outside a git checkout."""
    folder = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=folder, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, cwd=folder, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    revision = head.stdout.strip()
    if not revision:
        return None
    return revision + ("+dirty" if status.stdout.strip() else "")


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "torch-pruning", "numpy", "ctprune"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _portable(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, so that a manifest
    copied out of ``runs/`` (into a study's folder, say) holds no path of this machine."""
    try:
        return Path(path).resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path


def write_manifest(recipe: Recipe, out_dir: Path, command: list[str] | None) -> None:
    """Record what runs in ``out_dir``; refuse a folder that holds another recipe's run. The
    recipe file and the command are written relative to the working directory, the program
    by its name."""
    path = out_dir / MANIFEST_FILE
    recipe_dict = {k: v for k, v in to_dict(recipe).items() if k != "source"}
    digest = stage_fingerprint(recipe_dict)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    created = now
    if path.is_file():
        previous = _read_json(path, f"remove {path} if {out_dir} holds nothing you need")
        if previous.get("recipe_name") != recipe.name:
            raise RunError(
                f"{out_dir}: holds a run of recipe {previous.get('recipe_name')!r}, "
                f"not {recipe.name!r}; choose another --out"
            )
        created = previous.get("created", now)
    elif out_dir.is_dir() and any(path.name != LOCK_FILE for path in out_dir.iterdir()):
        raise RunError(
            f"{out_dir}: not empty and holds no ctprune run (no manifest.json); "
            "choose another --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if command:
        command = [Path(command[0]).name, *command[1:]]
    atomic_write_json(path, {
        "recipe_name": recipe.name, "recipe_sha256": digest,
        "recipe_file": _portable(recipe.source), "command": command,
        "git_revision": _git_revision(), "versions": _versions(),
        "seed": recipe.train.seed, "created": created, "updated": now,
    }, default=str)
    atomic_write_text(out_dir / RECIPE_FILE, yaml.safe_dump(recipe_dict, sort_keys=False))


@dataclasses.dataclass
class Stage:
    """One stage's folder and identity."""

    folder: Path
    name: str
    kind: str
    fingerprint: str
    branch: str | None = None
    model_file: str = CHECKPOINT
    """The stage's model in its folder: the checkpoint, or a quantize stage's ONNX file."""

    def info(self) -> dict | None:
        path = self.folder / STAGE_FILE
        if not path.is_file():
            return None
        return _read_json(path, f"remove {self.folder} to run the stage again")

    def is_done(self) -> bool:
        info = self.info()
        return (
            info is not None
            and info.get("complete") is True
            and info.get("fingerprint") == self.fingerprint
            and (self.folder / self.model_file).is_file()
            and (self.folder / METRICS_FILE).is_file()
        )


class Runner:
    """Runs one recipe's stages into ``out_dir``; see the module docstring."""

    def __init__(self, recipe: Recipe, out_dir: Path, *, device: str | None = None,
                 rerun_from: str | None = None, only: str | None = None,
                 on_epoch_end: Callable[[int, torch.nn.Module, dict], None] | None = None,
                 log: Callable[[str], None] = print) -> None:
        for stage in (rerun_from, only):
            if stage is not None and stage not in STAGES:
                raise RunError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        # This process's device: cuda:LOCAL_RANK under torchrun (joining its process group).
        self.device = str(distributed.setup(device))
        # The synthetic benchmark is generated here (by rank 0), before anything reads the data.
        self.recipe = distributed.run_on_main(lambda: prepare_data(recipe))
        self.out_dir = Path(out_dir)
        self.rerun_from, self.only = rerun_from, only
        # One copy of each line under torchrun: rank 0's.
        self.log = log if distributed.is_main_process() else _quiet
        self.on_epoch_end = on_epoch_end
        self.order = 0
        self.stage_names: list[str] = []  # this recipe's stages, in order: what the report shows
        self.baseline_stage: Stage | None = None
        self.train_source, self.val_source = load_splits(self.recipe.data)
        if self.val_source is None:
            raise RunError("data.val: a run evaluates every stage, so it needs a val split")
        self.model_config = resolve_model_config(self.recipe.model, self.train_source.class_names)

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder: rank 0 (or the only process)."""
        return distributed.is_main_process()

    # --- stage bookkeeping -------------------------------------------------------------------
    def _wanted(self, kind: str) -> bool:
        if self.only is not None:
            return kind == self.only
        return True

    def _forced(self, kind: str) -> bool:
        return self.rerun_from is not None and STAGES.index(kind) >= STAGES.index(self.rerun_from)

    def _run_stage(self, stage: Stage, work: Callable[[Stage, bool], dict]) -> dict | None:
        """Run ``stage`` unless it is done; None when it comes after the `--only` stage. Under
        torchrun rank 0 alone reads and moves the stage's folders and writes its files; every
        rank follows its decision and does the stage's work."""
        self.order += 1
        self.stage_names.append(stage.name)
        action, info = distributed.run_on_main(lambda: self._claim_stage(stage))
        if action in ("skip", "later"):
            return info
        aside = _aside_folder(stage.folder)
        try:
            info = self._do_stage(stage, work, action == "resume")
        except Exception as error:
            if not self.main or not aside.exists():
                raise
            shutil.rmtree(stage.folder, ignore_errors=True)
            aside.rename(stage.folder)
            self.log(f"[restored] {stage.name}: the new attempt failed; the previous results "
                     "are back")
            if isinstance(error, TrainingDiverged):
                # Its checkpoint advice named the discarded attempt's files.
                raise TrainingDiverged(
                    f"{stage.name}: {error.reason}; the attempt was discarded and the stage's "
                    f"previous results (other settings) are back in {stage.folder}. "
                    f"{DIVERGED_ADVICE}", reason=error.reason) from None
            raise
        # KeyboardInterrupt is not caught: the new stage's progress stays for the resume, the
        # previous results stay aside until the new stage completes.
        if self.main and aside.exists():
            shutil.rmtree(aside)
        return info

    def _claim_stage(self, stage: Stage) -> tuple[str, dict | None]:
        """What to do with ``stage`` (rank 0's decision): ("skip", its info) when it is done,
        ("later", None) after the `--only` stage, ("resume", None) to continue its interrupted
        training, ("fresh", None) to run it from scratch (its folder of other settings moved
        aside first)."""
        _recover_aside(stage)
        if stage.is_done() and not self._forced(stage.kind):
            self.log(f"[skip] {stage.name}: done, unchanged")
            return "skip", stage.info()
        if not self._wanted(stage.kind):
            if STAGES.index(stage.kind) > STAGES.index(self.only):
                return "later", None  # after the --only stage: left for a later run
            raise RunError(
                f"{stage.name}: needed by --only {self.only} but not done; run without --only first"
            )
        previous = stage.info()
        resume = (previous is not None and previous.get("fingerprint") == stage.fingerprint
                  and not self._forced(stage.kind) and (stage.folder / RESUME_FILE).is_file())
        aside = _aside_folder(stage.folder)
        if not resume and stage.folder.exists():
            # Another configuration's results: kept aside until the new stage completes, and put
            # back if it fails, so a rerun with impossible settings loses nothing.
            if aside.exists():
                shutil.rmtree(stage.folder)  # an interrupted replacement; the aside is older
            else:
                stage.folder.rename(aside)
        return ("resume" if resume else "fresh"), None

    def _do_stage(self, stage: Stage, work: Callable[[Stage, bool], dict], resume: bool) -> dict:
        distributed.run_on_main(lambda: stage.folder.mkdir(parents=True, exist_ok=True))
        base = {
            "name": stage.name,
            "stage": stage.kind,
            "branch": stage.branch,
            "order": self.order,
            "fingerprint": stage.fingerprint,
            "input_size": list(self.model_config.input.input_size),
            "model_file": stage.model_file,
        }
        distributed.run_on_main(lambda: atomic_write_json(
            stage.folder / STAGE_FILE, {**base, "complete": False}, default=str))
        self.log(f"[{'resume' if resume else 'run'}] {stage.name}")
        started = time.perf_counter()
        extra = work(stage, resume)
        seconds = time.perf_counter() - started
        return distributed.run_on_main(lambda: self._finish_stage(stage, base, extra, seconds))

    def _finish_stage(self, stage: Stage, base: dict, extra: dict, seconds: float) -> dict:
        """The finished stage's figures and its complete stage.json (rank 0)."""
        # Measured once here, each model timed interleaved with the baseline; reports read it.
        settings = self.recipe.report
        baseline = self.baseline_stage.folder if self.baseline_stage is not None else None
        figures = stage_figures(stage.folder, base["input_size"], latency=settings.latency,
                                repeats=settings.latency_repeats, threads=settings.threads,
                                baseline_folder=baseline, model_file=stage.model_file)
        info = {**base, **extra, "figures": figures, "complete": True, "seconds": seconds}
        atomic_write_json(stage.folder / STAGE_FILE, info, default=str)
        return info

    def _evaluate(self, model: torch.nn.Module, model_config: ModelConfig, stage: Stage) -> dict:
        metrics = evaluate_model(
            model.to(self.device),
            self.val_source,
            model_config,
            self.recipe.evaluate,
            self.device,
            stage.folder / EVAL_FOLDER,
        )
        return {k: v for k, v in metrics.items() if k in ("ap", "ap50", "ap75", "voc_ap50")}

    def _train_into(self, stage: Stage, config: TrainConfig, resume: bool,
                    initial_model: torch.nn.Module | None, model_config: ModelConfig,
                    distill: DistillConfig | None = None) -> torch.nn.Module:
        recipe = TrainRecipe(
            name=stage.name,
            model=model_config,
            data=self.recipe.data,
            train=config,
            evaluate=self.recipe.evaluate,
        )
        sparsity = self.recipe.sparsity if stage.kind == "baseline" else None
        teacher_paths = self._teacher_paths(distill) if distill is not None else None
        if distill is not None and distill.unlabelled_images is not None:
            images = resolve_path(self.recipe, distill.unlabelled_images)
            distill = dataclasses.replace(distill, unlabelled_images=str(images))
        train(recipe, stage.folder, sparsity=sparsity, distill=distill, teacher_paths=teacher_paths,
              resume=resume, device=self.device, initial_model=initial_model,
              on_epoch_end=self.on_epoch_end)
        chosen = trained_model(stage.folder)
        distributed.run_on_main(lambda: atomic_copy(chosen, stage.folder / CHECKPOINT))
        model, _ = load_model(stage.folder / CHECKPOINT)
        return model

    def _teacher_paths(self, distill: DistillConfig) -> list[Path]:
        """Each teacher's checkpoint; a teacher without one is the run's unpruned baseline."""
        return [resolve_path(self.recipe, teacher.checkpoint) if teacher.checkpoint is not None
                else self.out_dir / "baseline" / CHECKPOINT for teacher in distill.teachers]

    def _distill_fingerprint(self, baseline: Stage | None) -> dict | None:
        """What a fine-tune's distillation depends on: its settings and each teacher's identity
        (the baseline stage's fingerprint, or a teacher file's size and time). None without
        distillation, so recipes without it keep their fingerprints."""
        distill = self.recipe.finetune.distill
        if distill is None:
            return None
        teachers = [
            _file_digest(resolve_path(self.recipe, teacher.checkpoint))
            if teacher.checkpoint is not None
            else (baseline.fingerprint if baseline is not None else "baseline")
            for teacher in distill.teachers
        ]
        images = distill.unlabelled_images
        return {"settings": to_dict(distill), "teachers": teachers,
                "images": str(resolve_path(self.recipe, images)) if images is not None else None}

    # --- stages ------------------------------------------------------------------------------
    def baseline(self) -> Stage:
        recipe = self.recipe
        inputs = {
            key: _file_digest(resolve_path(recipe, value))
            for key, value in dataclasses.asdict(recipe.baseline).items()
            if value is not None
        }
        trained = not inputs
        stage = Stage(self.out_dir / "baseline", "baseline", "baseline", stage_fingerprint(
            "baseline", self.model_config, recipe.data, recipe.evaluate, inputs,
            recipe.train if trained else None, recipe.sparsity if trained else None))

        def work(stage: Stage, resume: bool) -> dict:
            if recipe.baseline.checkpoint is not None:
                distributed.run_on_main(lambda: atomic_copy(
                    resolve_path(recipe, recipe.baseline.checkpoint), stage.folder / CHECKPOINT))
                model, checkpoint = load_model(stage.folder / CHECKPOINT)
                config = checkpoint.model_config
                if config.arch != self.model_config.arch:
                    raise RunError(
                        f"baseline.checkpoint {recipe.baseline.checkpoint} holds a {config.arch} "
                        f"model, but the recipe's model.arch is {self.model_config.arch}: make "
                        "them agree"
                    )
            elif recipe.baseline.original is not None:
                distributed.run_on_main(lambda: import_original_checkpoint(
                    resolve_path(recipe, recipe.baseline.original),
                    self.model_config.arch,
                    stage.folder / CHECKPOINT,
                    tuple(self.model_config.input.input_size),
                ))
                model, checkpoint = load_model(stage.folder / CHECKPOINT)
                config = checkpoint.model_config
            else:
                config = self.model_config
                model = self._train_into(stage, recipe.train, resume, None, config)
            return {"metrics": self._evaluate(model, config, stage)}

        self._run_stage(stage, work)
        return stage

    def prune_stage(self, source: Stage, branch: Branch, round_index: int) -> Stage:
        config = self.recipe.prune
        suffix = "" if config.rounds == 1 else f"_{round_index}"
        options = config.options(branch.criterion, branch.ratio, branch.target_macs)
        settings = {**to_dict(options), "recalibrate_batches": config.recalibrate_batches}
        if options.sensitivity is not None:  # a path relative to the recipe file
            scan = resolve_path(self.recipe, options.sensitivity)
            options = dataclasses.replace(options, sensitivity=str(scan))
            settings["sensitivity"] = _file_digest(scan)  # a new scan reruns the pruning
        stage = Stage(
            self.out_dir / branch.name / f"prune{suffix}",
            f"{branch.name}/prune{suffix}",
            "prune",
            stage_fingerprint(
                "prune",
                source.fingerprint,
                settings,
                self.recipe.evaluate,
                self.recipe.finetune.augment,
            ),
            branch.name,
        )

        def prune_and_save() -> dict:
            model, checkpoint = load_model(source.folder / CHECKPOINT)
            size = tuple(checkpoint.model_config.input.input_size)
            # Data-driven criteria and the sensitivity allocation calibrate on the training set,
            # never on the evaluated split.
            wants_data = options.criterion in DATA_CRITERIA or (
                options.allocation == "sensitivity" and options.sensitivity is None)
            data = self._recalibration_loader(checkpoint.model_config) if wants_data else None
            result = prune_with(model, options, example_inputs=torch.zeros(1, 3, *size),
                                data=data, head=checkpoint.model_config.head, inplace=True)
            if result.stats.latency:  # the realised latency beside the target
                self.log(f"[prune] {stage.name}: {result.stats.latency_line()}")
            if config.recalibrate_batches > 0:
                recalibrate_bn(result.model, self._recalibration_loader(checkpoint.model_config),
                               config.recalibrate_batches)
            save_checkpoint(stage.folder / CHECKPOINT, result.model, checkpoint.model_config,
                            meta={"pruned_from": str(source.folder / CHECKPOINT)})
            stats = dataclasses.asdict(result.stats)
            stats.pop("groups", None)  # per-group details stay out of the report's input
            return stats

        def work(stage: Stage, resume: bool) -> dict:
            # Under torchrun rank 0 prunes and the others load its pruned checkpoint; every
            # rank's plan digest is then compared with rank 0's.
            stats = distributed.run_on_main(prune_and_save)
            model, checkpoint = load_model(stage.folder / CHECKPOINT)
            digests = _same_plan_on_every_rank(stage, checkpoint.channel_plan)
            return {
                "prune": stats,
                "plan_sha256_per_rank": digests,
                "metrics": self._evaluate(model, checkpoint.model_config, stage),
            }

        self._run_stage(stage, work)
        return stage

    def finetune_stage(
        self, source: Stage, name: str, branch: str, epochs_factor: int = 1
    ) -> Stage:
        config = dataclasses.replace(self.recipe.finetune.train_config(),
                                     epochs=self.recipe.finetune.epochs * epochs_factor)
        distill = self.recipe.finetune.distill
        parts = [config, self.recipe.evaluate]
        if distill is not None:
            parts.append(self._distill_fingerprint(self.baseline_stage))
        fingerprint = stage_fingerprint("finetune", source.fingerprint, *parts)
        stage = Stage(self.out_dir / name, name, "finetune", fingerprint, branch)

        def work(stage: Stage, resume: bool) -> dict:
            model, checkpoint = load_model(source.folder / CHECKPOINT)
            model = self._train_into(stage, config, resume, model, checkpoint.model_config, distill)
            return {"metrics": self._evaluate(model, checkpoint.model_config, stage)}

        self._run_stage(stage, work)
        return stage

    def quantize_stage(self, source: Stage, name: str, branch: str | None) -> Stage:
        """INT8 post-training quantization of ``source``'s model (`ctprune.quantize`),
        calibrated on the train split and evaluated on val through onnxruntime."""
        config = self.recipe.quantize
        fingerprint = stage_fingerprint("quantize", source.fingerprint, config,
                                        self.recipe.evaluate)
        stage = Stage(self.out_dir / name, name, "quantize", fingerprint, branch, INT8_FILE)

        def work(stage: Stage, resume: bool) -> dict:
            from detector.inference.onnx_model import load_onnx_model

            result = distributed.run_on_main(lambda: quantize_checkpoint(
                source.folder / CHECKPOINT, self.train_source, config, stage.folder))
            self.log(f"  {result.summary['reduce_range_reason']}")
            model, info = load_onnx_model(result.int8_path)
            return {"quantize": result.summary,
                    "metrics": self._evaluate(model, info.model_config, stage)}

        self._run_stage(stage, work)
        return stage

    def _recalibration_loader(self, model_config: ModelConfig) -> DataLoader:
        dataset = CenterNetDataset(
            self.train_source.records,
            model_config.num_classes,
            model_config.input,
            train=True,
            augment=self.recipe.finetune.augment,
            seed=self.recipe.finetune.seed,
            head=model_config.head,
        )
        generator = torch.Generator().manual_seed(self.recipe.finetune.seed)
        return DataLoader(dataset, batch_size=self.recipe.finetune.batch_size, shuffle=True,
                          collate_fn=collate, generator=generator)

    def report(self) -> dict:
        """The run's report from the figures its stages stored (nothing is timed again)."""
        config = self.recipe.report
        return distributed.run_on_main(lambda: build_report(
            [self.out_dir], self.out_dir, latency=config.latency,
            latency_repeats=config.latency_repeats, threads=config.threads,
            stages=self.stage_names))

    def run(self) -> dict | None:
        baseline = self.baseline()
        self.baseline_stage = baseline
        finals = [(baseline, "baseline_int8", "baseline_int8")]
        for branch in branches(self.recipe):
            if branch.control == "unpruned":
                source = self.finetune_stage(
                    baseline, f"{branch.name}/finetune", branch.name, self.recipe.prune.rounds
                )
            else:
                source = baseline
                for round_index in range(1, self.recipe.prune.rounds + 1):
                    pruned = self.prune_stage(source, branch, round_index)
                    suffix = "" if self.recipe.prune.rounds == 1 else f"_{round_index}"
                    source = self.finetune_stage(pruned, f"{branch.name}/finetune{suffix}",
                                                 branch.name)
            finals.append((source, f"{branch.name}/int8", branch.name))
        if self.recipe.quantize is not None:
            # After every fine-tune: the stage order (`STAGES`) puts quantize after finetune.
            for source, name, branch_name in finals:
                self.quantize_stage(source, name, branch_name)
        if self.only in (None, "report"):
            report = self.report()
            return report if self.main else None
        return None


def _quiet(line: str) -> None:
    """The log of ranks other than 0."""


def plan_digest(channel_plan: dict | None) -> str:
    """sha256 of a channel plan (module path -> widths), independent of key order."""
    text = json.dumps(channel_plan, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _same_plan_on_every_rank(stage: Stage, channel_plan: dict | None) -> list[str]:
    """Every rank's plan digest (rank order), all equal to rank 0's; a rank that loaded
    another plan (a run folder not shared between the machines, say) is an error."""
    digests = distributed.gather_to_all(plan_digest(channel_plan))
    different = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    if different:
        raise RunError(
            f"{stage.folder / CHECKPOINT}: ranks {different} loaded another channel plan than "
            "rank 0 (sha256 " + ", ".join(digests) + "); every machine of a multi-node run must "
            "see one run folder (a shared file system)"
        )
    return digests


def _read_json(path: Path, remedy: str) -> dict:
    """A run's bookkeeping file (manifest.json, stage.json); a damaged one is named with what
    to do instead of a bare JSON error."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise RunError(f"{path}: not valid JSON ({error}); {remedy}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object, got {type(data).__name__}; {remedy}")
    return data


def _aside_folder(folder: Path) -> Path:
    """Where a stage folder's previous results wait while the stage runs again: beside it,
    hidden (``.finetune.old``)."""
    return folder.with_name(f".{folder.name}.old")


def _recover_aside(stage: Stage) -> None:
    """Put back results a killed rerun left aside when nothing replaced them, or when they are
    what is asked for again (the settings went back to theirs)."""
    aside = _aside_folder(stage.folder)
    if not aside.is_dir():
        return
    if stage.folder.exists() and not dataclasses.replace(stage, folder=aside).is_done():
        return  # the replacement's progress: it resumes, the aside waits for it to complete
    shutil.rmtree(stage.folder, ignore_errors=True)
    aside.rename(stage.folder)


def _file_digest(path: Path) -> str:
    """Size and modification time: enough to notice a replaced input without hashing 200 MB."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    command: list[str] | None = None,
    device: str | None = None,
    rerun_from: str | None = None,
    only: str | None = None,
    on_epoch_end: Callable[[int, torch.nn.Module, dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Run every stage of ``recipe`` into ``out_dir`` and return the report (None with ``only``
    a stage other than report). ``on_epoch_end`` is given to every training stage's `fit`."""
    out_dir = Path(out_dir)
    # Under torchrun every process runs this; each joins the process group and takes its own
    # device (cuda:LOCAL_RANK); rank 0 alone takes the lock and writes the run folder's files.
    joined = distributed.launched_by_torchrun() and not torch.distributed.is_initialized()
    device = str(distributed.setup(device))
    try:
        return _run_locked(recipe, out_dir, device, command, rerun_from, only, on_epoch_end, log)
    finally:
        if joined:  # the group this call joined, it leaves (a process exiting inside it aborts)
            distributed.cleanup()


def _run_locked(recipe: Recipe, out_dir: Path, device: str, command: list[str] | None,
                rerun_from: str | None, only: str | None,
                on_epoch_end: Callable[[int, torch.nn.Module, dict], None] | None,
                log: Callable[[str], None]) -> dict | None:
    # Everything checkable is checked before the lock, the data generation or any folder.
    preflight(recipe, out_dir, device)
    with contextlib.ExitStack() as held:

        def take_lock() -> None:
            held.enter_context(run_lock(out_dir, command))
            remove_stale_temporaries(out_dir)  # a killed run's half-written report or manifest

        distributed.run_on_main(take_lock)
        # Reads the data: errors surface before any work.
        runner = Runner(recipe, out_dir, device=device, rerun_from=rerun_from, only=only,
                        on_epoch_end=on_epoch_end, log=log)
        distributed.run_on_main(lambda: write_manifest(runner.recipe, out_dir, command))
        return runner.run()
