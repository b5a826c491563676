"""Everything about a recipe that can be checked before work starts, checked before work starts.

`preflight` looks at every stage a recipe will run: the device and precision, the data files
of both splits (data the recipe's own `synthetic` section will generate counts as present),
their class lists, the baseline and teacher checkpoints, the output folder and the disk space
the checkpoints will take. `ctprune run` and `ctprune train` call it first; `ctprune check`
calls it alone. It collects every problem and raises one `PreflightError` listing them all, so
a user fixes a recipe in one round instead of one error per three-hour attempt.

`run_folder_name` and `check_device` are the checks the CLI needs before it knows a folder or
a device; `default_notes` says which sections a recipe left to the defaults.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
from pathlib import Path

import torch

from detector.config import ConfigError, read_yaml
from detector.data.sources import DataConfig, load_data_yaml, load_source

from .recipe import Recipe, branches, resolve_path


class PreflightError(ConfigError):
    """One or more problems that would stop the run; the message lists each on its own line."""


RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
"""A recipe name that is one plain folder name: no separators, no leading dot (no `..`, no
hidden folder), not empty."""

CHECKPOINT_COPIES_PER_TRAINING = 6
"""Disk use of one training stage in model-sized units: last.pt, best.pt, checkpoint.pt and
resume.pt (Adam keeps two moments per weight, so about three model sizes)."""


def run_folder_name(name: str) -> str:
    """``name`` when it can be a folder under runs/, else a ConfigError naming it."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"name: {name!r} cannot be a run folder's name; use letters, digits, '.', '_' "
            "and '-', not starting with a dot (or give --out)"
        )
    return name


def check_device(device: str | None) -> str:
    """The device to run on: ``device`` when this machine has it (cpu, cuda, cuda:N, mps),
    else a ConfigError; None means cuda when available, else cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", device)
    if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
        raise ConfigError(f"--device {device!r}: expected cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine; "
                              "use --device cpu")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available on this machine")
    return device


def default_notes(recipe: Recipe, overrides: list[str] = ()) -> list[str]:
    """One line per section the recipe file (with its ``--set`` overrides) leaves out, saying
    which defaults it runs with: a missing `model` trains a full-size res18 at 512 px, a missing
    `train` 140 epochs, and nobody should learn that from the bill."""
    from detector.config import parse_overrides

    given = set(read_yaml(recipe.source)) | set(parse_overrides(list(overrides)))
    notes = []
    if "model" not in given:
        model = recipe.model
        size = "x".join(str(side) for side in model.input.input_size)
        notes.append(f"recipe has no `model` section: using model.arch={model.arch}, "
                     f"input {size} (the defaults)")
    if "train" not in given and recipe.baseline.checkpoint is None \
            and recipe.baseline.original is None:
        train = recipe.train
        notes.append(f"recipe has no `train` section: training {train.epochs} epochs, batch "
                     f"size {train.batch_size}, lr {train.lr:g} (the defaults)")
    if "evaluate" not in given:
        notes.append("recipe has no `evaluate` section: evaluating with the defaults")
    return notes


def _data_config(recipe: Recipe, problems: list[str], notes: list[str]) -> DataConfig | None:
    """The recipe's data section, reading a data.yaml it names; None when the recipe's
    synthetic section will write the data (then it cannot be read yet)."""
    if recipe.synthetic is not None:
        folder = resolve_path(recipe, recipe.synthetic.out_dir)
        # generate_shapes writes data.yaml last: without it the benchmark is (re)generated.
        if not (folder / "data.yaml").is_file():
            notes.append(f"data: {folder} will be generated by the recipe's synthetic section")
            return None
    if isinstance(recipe.data, DataConfig):
        return recipe.data
    path = resolve_path(recipe, recipe.data)
    try:
        return load_data_yaml(path)
    except (OSError, ValueError) as error:
        problems.append(f"data: {error}")
        return None


def _check_data(recipe: Recipe, problems: list[str], notes: list[str]) -> list[str] | None:
    """The class names of the data (None when they cannot be read yet)."""
    config = _data_config(recipe, problems, notes)
    if config is None:
        return None
    classes = {}
    for split in ("train", "val"):
        if split == "val" and config.val is None:
            notes.append("data: no val split: nothing is evaluated")
            continue
        try:
            source = load_source(config, split)
        except (OSError, ValueError) as error:
            problems.append(f"data ({split} split): {error}")
            continue
        classes[split] = source.class_names
        notes.append(f"data: {split} split, {len(source.records)} images, "
                     f"{len(source.class_names)} classes")
    if len(classes) == 2 and classes["train"] != classes["val"]:
        problems.append(f"data: the train and val splits declare different classes: "
                        f"{classes['train']} vs {classes['val']}")
    names = classes.get("train")
    stated = recipe.model.num_classes
    if names is not None and stated is not None and stated != len(names):
        problems.append(f"model.num_classes is {stated} but the data has {len(names)} classes")
    return names


def _read_config(path: Path, key: str, problems: list[str]):
    """The model config of the checkpoint ``key`` names; None (and a problem) when unreadable."""
    from detector.checkpoint import read_checkpoint

    try:
        return read_checkpoint(path).model_config
    except (OSError, ValueError) as error:
        problems.append(f"{key}: {error}")
        return None


def _check_baseline(path: Path, recipe: Recipe, class_names: list[str] | None,
                    problems: list[str], notes: list[str]) -> None:
    """The baseline checkpoint: readable, the recipe's architecture, the data's class count."""
    key = "baseline.checkpoint"
    config = _read_config(path, key, problems)
    if config is None:
        return
    if config.arch != recipe.model.arch:
        problems.append(f"{key}: {path} holds a {config.arch} model, but the recipe's "
                        f"model.arch is {recipe.model.arch}")
    if class_names is not None and config.num_classes != len(class_names):
        problems.append(f"{key}: {path} has {config.num_classes} classes, the data "
                        f"{len(class_names)}")
    notes.append(f"{key}: {path} ({config.arch}, {config.num_classes} classes)")


def _check_teacher(index: int, recipe: Recipe, class_names: list[str] | None,
                   problems: list[str], notes: list[str]) -> None:
    """A teacher checkpoint: readable, the student's input spec, classes that map onto the
    student's (the checks `load_teacher` makes when the fine-tune starts)."""
    from .distill import check_input_spec, resolve_classes

    teacher = recipe.finetune.distill.teachers[index]
    key = f"finetune.distill.teachers[{index}].checkpoint"
    path = resolve_path(recipe, teacher.checkpoint)
    config = _read_config(path, key, problems)
    if config is None:
        return
    student = recipe.model
    if class_names is not None:
        student = dataclasses.replace(student, num_classes=len(class_names),
                                      class_names=list(class_names))
    try:
        check_input_spec(student, config, f"{key} {path}")
        if class_names is not None:
            resolve_classes(teacher.classes, config, student, f"{key} {path}")
    except ValueError as error:
        problems.append(str(error))
        return
    notes.append(f"{key}: {path} ({config.arch}, {config.num_classes} classes)")


def _check_precision(recipe: Recipe, device: str, problems: list[str]) -> None:
    sections = [("train", recipe.train)]
    if recipe.prune is not None:
        sections.append(("finetune", recipe.finetune))
    for section, config in sections:
        if config.precision == "amp" and not device.startswith("cuda"):
            problems.append(f"{section}.precision: 'amp' (float16 with gradient scaling) needs "
                            f"CUDA, the device is {device}; use 'bf16' on CPU")
        if not (math.isfinite(config.lr) and config.lr > 0):
            problems.append(f"{section}.lr: expected a finite positive value, got {config.lr}")


def _probe_folder(out_dir: Path) -> Path:
    """The folder a probe file is written in: ``out_dir`` or its nearest existing parent."""
    folder = out_dir.resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_output(recipe: Recipe, out_dir: Path, problems: list[str], notes: list[str]) -> None:
    """The output folder is writable and its disk holds the checkpoints the run will write."""
    folder = _probe_folder(out_dir)
    if not folder.is_dir():
        problems.append(f"--out {out_dir}: {folder} is not a folder")
        return
    probe = folder / f".ctprune_write_probe_{os.getpid()}"  # one per process under torchrun
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        problems.append(f"--out {out_dir}: cannot write in {folder} ({error.strerror})")
        return
    needed = _estimated_bytes(recipe)
    if needed is None:
        return
    free = shutil.disk_usage(folder).free
    if free < needed:
        problems.append(f"--out {out_dir}: {free / 2**30:.2f} GiB free on its disk, the run's "
                        f"checkpoints need about {needed / 2**30:.2f} GiB")
    else:
        notes.append(f"disk: about {needed / 2**20:.0f} MiB of checkpoints, "
                     f"{free / 2**30:.1f} GiB free")


def _estimated_bytes(recipe: Recipe) -> int | None:
    """Bytes of checkpoints the run writes: the model's state-dict size (built on the meta
    device: no memory, no time) times the copies each stage keeps."""
    from detector.checkpoint import build_from_config
    from detector.stats import state_dict_mib

    model_config = recipe.model
    if model_config.num_classes is None:  # the class count only changes the heads' last convs
        model_config = dataclasses.replace(model_config, num_classes=1)
    try:
        with torch.device("meta"):
            model_bytes = state_dict_mib(build_from_config(model_config)) * 2**20
    except (ValueError, TypeError, KeyError):
        return None  # an impossible model section: the config checks name it
    prune = recipe.prune
    rounds = prune.rounds if prune is not None else 0
    stages = 1 + sum(rounds if branch.control is None else 1 for branch in branches(recipe))
    return int(model_bytes * CHECKPOINT_COPIES_PER_TRAINING * stages)


def preflight(recipe: Recipe, out_dir: str | Path, device: str | None, *,
              baseline_only: bool = False) -> list[str]:
    """Check everything about ``recipe`` that can be checked before work, for every stage it
    will run into ``out_dir`` on ``device`` (only its baseline training with
    ``baseline_only``, as `ctprune train`); return notes on what was checked ("ok" lines).
    Raises a `PreflightError` listing every problem found (not only the first)."""
    if baseline_only:
        recipe = dataclasses.replace(recipe, prune=None)
    problems: list[str] = []
    notes: list[str] = []
    try:
        device = check_device(device)
        notes.append(f"device: {device}")
    except ConfigError as error:
        problems.append(str(error))
        device = "cpu"
    _check_precision(recipe, device, problems)
    class_names = _check_data(recipe, problems, notes)
    for key in ("checkpoint", "original"):
        value = getattr(recipe.baseline, key)
        if value is None:
            continue
        path = resolve_path(recipe, value)
        if key == "original":
            if not path.is_file():
                problems.append(f"baseline.original: {path} does not exist")
            continue
        _check_baseline(path, recipe, class_names, problems, notes)
    distill = recipe.finetune.distill if recipe.prune is not None else None
    if distill is not None:
        for index, teacher in enumerate(distill.teachers):
            if teacher.checkpoint is not None:
                _check_teacher(index, recipe, class_names, problems, notes)
    _check_output(recipe, Path(out_dir), problems, notes)
    if problems:
        raise PreflightError(
            f"{recipe.source}: {len(problems)} problem(s) found before any work:\n  "
            + "\n  ".join(problems)
        )
    return notes
