"""The training loop: one function to read top to bottom.

Extension points are arguments, not subclasses: a loss function with the task loss's signature
(distillation), keyword arguments of the model's forward (``return_features`` for feature
distillation), an after-backward callable (sparsity regularisation), an after-step callable
(proximal updates), extra parameters to optimise (distillation adapters), and end-of-step and
end-of-epoch callables (logging, averaging weights). Every epoch ends with two atomic files in
``out_dir``: ``last.pt`` (the model, in the checkpoint format) and ``resume.pt`` (optimiser,
scheduler, scaler, RNG, extra parameters and progress), then ``best.pt`` when the selection
metric improved. With ``train.accumulate`` the optimiser steps once per group of batches (the
callables, the schedule and the weight average count those steps); with ``train.ema_decay`` a
weight average is evaluated and saved (``last_ema.pt``, ``best.pt``) beside the raw weights;
with ``train.skip_loss_factor`` a step whose loss jumps is not taken (`SkipLoss`).
"""

from __future__ import annotations

import math
import pickle
import random
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import (
    atomic_save,
    check_checkpoint_matches,
    load_model,
    save_checkpoint,
    unwrap_model,
)
from ..config import ModelConfig, to_dict
from ..distributed import average_gradients, average_value, barrier, is_main_process
from ..files import remove_stale_temporaries
from ..heads import task_loss
from ..layout import BEST_CHECKPOINT, LAST_CHECKPOINT, LAST_EMA_CHECKPOINT, RESUME_FILE
from .config import TrainConfig
from .ema import WeightAverage
from .logs import TrainingLog
from .optim import build_optimizer, build_scheduler, optimizer_steps_per_epoch

LossFn = Callable[
    [list[dict[str, torch.Tensor]], dict], tuple[torch.Tensor, dict[str, torch.Tensor]]
]
RESUME_FORMAT = 1


EXPLODED_FACTOR = 1e4
"""A loss this many times the run's first loss counts as exploded. A CenterNet loss starts at
a few units (focal loss with the prior bias, box regression in output pixels) and falls from
there; a healthy run never climbs four orders of magnitude above its start, while a diverging
one (``train.lr=1e6``: 1e20 within an epoch) passes it long before it overflows to inf. Waiting
for inf would let such a run end with exit 0 and a best.pt."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN, infinite or exploded; the last good checkpoint is kept.
    ``reason``: what diverged where, without the checkpoint advice (for callers that move the
    run's files and say where they went)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


@dataclass
class FitResult:
    epochs: int
    """Epochs completed."""
    best_value: float | None = None
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)
    """One record per epoch: train loss, lr, time and evaluation metrics."""
    parameter_checksum: float = 0.0
    """Sum of all parameters at the end: equal on every process of a distributed run."""
    last_accepted_loss: float | None = None
    """With train.skip_loss_factor: the loss of the last step taken (kept in resume.pt)."""


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    if precision == "amp" and device.type != "cuda":
        raise ValueError(
            "train.precision: 'amp' (float16 with gradient scaling) needs CUDA; use 'bf16' on CPU"
        )
    dtype = torch.float16 if precision == "amp" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _advance(scheduler, quiet: bool) -> None:
    """Step the learning-rate schedule. Under float16 AMP, GradScaler skips the first steps
    whose gradients overflow while it finds its scale; the schedule advances all the same (as
    in PyTorch's AMP recipe), so PyTorch's "scheduler before optimizer" warning is noise."""
    if not quiet:
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        scheduler.step()


def _restore_extra_parameters(
    parameters: list[nn.Parameter], saved: list[torch.Tensor] | None, path: Path
) -> None:
    """Put back the values of fit's extra parameters (distillation's feature adapters, say),
    which live outside the model checkpoint."""
    if saved is None:  # a resume.pt from before they were saved
        if parameters:
            warnings.warn(
                f"{path} holds no extra parameters: they restart from their initial values",
                stacklevel=3,
            )
        return
    shapes = [tuple(parameter.shape) for parameter in parameters]
    if [tuple(value.shape) for value in saved] != shapes:
        raise ValueError(
            f"{path}: its extra parameters have shapes {[tuple(v.shape) for v in saved]}, "
            f"this run's {shapes}; resume with the same distillation settings"
        )
    with torch.no_grad():
        for parameter, value in zip(parameters, saved, strict=True):
            parameter.copy_(value)


def _restore_average(average: WeightAverage, saved: dict | None, plain_model: nn.Module,
                     path: Path) -> None:
    """Put back the weight average of resume.pt; one written without it (train.ema_decay was
    off) restarts the average from the resumed weights."""
    if saved is None:
        warnings.warn(f"{path} holds no weight average (train.ema_decay was off): the average "
                      "starts from the resumed weights", stacklevel=3)
        average.model.load_state_dict(plain_model.state_dict())
        return
    try:
        average.load_state_dict(saved)
    except RuntimeError as error:
        raise ValueError(f"{path}: its weight average does not fit this run's model "
                         f"({str(error).splitlines()[0]})") from None


def _accumulation_group(step: int, batches: int, accumulate: int) -> tuple[int, bool]:
    """For batch ``step`` (0-based) of an epoch of ``batches``: the size of its accumulation
    group (``accumulate``, or fewer for the epoch's last, partial group) and whether the
    optimiser steps after it. Groups never span epochs, so a resume starts a fresh one."""
    start = step - step % accumulate
    return min(accumulate, batches - start), (step + 1) % accumulate == 0 or step + 1 == batches


def _gradient_sync(model: nn.Module, stepping: bool):
    """DistributedDataParallel averages gradients only on a group's last backward: the sum of
    the group's averaged gradients equals the average of their sums."""
    return nullcontext() if stepping or not hasattr(model, "no_sync") else model.no_sync()


def _optimizer_step(model: nn.Module, plain_model: nn.Module,
                    extra_parameters: list[nn.Parameter], config: TrainConfig, optimizer,
                    scheduler, scaler, after_backward, after_step,
                    average: WeightAverage | None) -> None:
    """One optimiser step on the accumulated gradients: the callables, clipping, the schedule
    and the weight average all count optimiser steps."""
    average_gradients(extra_parameters)  # DDP averages the model's gradients only
    if after_backward is not None or config.grad_clip is not None:
        scaler.unscale_(optimizer)  # hooks and clipping see true gradients under AMP
    if after_backward is not None:
        after_backward(plain_model)
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *extra_parameters],
                                       config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    _advance(scheduler, quiet=scaler.is_enabled())
    if after_step is not None:
        after_step(plain_model)
    if average is not None:
        average.update(plain_model)


class SkipLoss:
    """centerX's skip-loss (``train.skip_loss_factor``): an optimiser step whose loss exceeds
    ``factor`` times the last accepted step's is not taken; the first step is always taken.

    Skipping means no optimiser step at all, not a zero loss backward: centerX backpropagates
    ``0 * loss`` and still calls the optimiser, whose Adam moments keep moving the weights (and
    its weight decay shrinks them). Here the step's gradients are left to the next group's
    ``zero_grad``; the optimiser, the GradScaler (neither ``unscale_``, ``step`` nor ``update``
    runs, so its scale and inf checks are untouched and the skipped gradients, scaled or not,
    never reach a parameter), the callables and the weight average see nothing. Under
    ``train.accumulate`` the decision is per optimiser step on its group's mean loss, after the
    group's backwards. Under torchrun the loss is averaged over the processes first
    (`average_value`), so every process takes the same decision and the replicas stay equal.
    """

    def __init__(self, factor: float | None, last_accepted: float | None,
                 device: torch.device) -> None:
        self.factor, self.last_accepted, self.device = factor, last_accepted, device
        self.skipped = 0
        """Steps skipped since the last `epoch_count`."""

    def accepts(self, loss_value: float) -> bool:
        """Whether the step whose (this process's) loss is ``loss_value`` is taken."""
        if self.factor is None:
            return True
        loss_value = average_value(loss_value, self.device)
        if self.last_accepted is not None and loss_value > self.factor * self.last_accepted:
            self.skipped += 1
            return False
        self.last_accepted = loss_value
        return True

    def epoch_count(self) -> dict[str, int]:
        """``{"skipped_steps": n}`` for the epoch record when skip-loss is on (then restart)."""
        if self.factor is None:
            return {}
        count, self.skipped = self.skipped, 0
        return {"skipped_steps": count}


def _improved(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda", [])
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


RESUME_KEYS = ("epoch", "optimizer", "scheduler", "scaler", "rng", "best_value", "best_epoch",
               "history")


def load_resume_state(path: Path) -> dict:
    """``resume.pt``, read with weights_only=True; errors name the file and what is wrong
    (truncated, pickled objects, missing keys) instead of torch's unpickler message."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: holds pickled Python objects that a resume file never has; it is not "
            "ctprune's resume state. Remove it and train again without --resume"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError) as error:
        raise ValueError(
            f"{path}: not a readable resume file (truncated or damaged: {error}); resume from "
            "an earlier copy, or train again without --resume"
        ) from None
    missing = [key for key in RESUME_KEYS if not isinstance(state, dict) or key not in state]
    if missing or not isinstance(state["epoch"], int):
        raise ValueError(f"{path}: not a resume file of this training loop (missing {missing})")
    return state


def completed_epochs(out_dir: str | Path) -> int:
    """The epochs a run in ``out_dir`` has finished, as its resume file records (0 without one)."""
    path = Path(out_dir) / RESUME_FILE
    if not path.is_file():
        return 0
    return int(load_resume_state(path)["epoch"])


def check_resumable(out_dir: Path) -> None:
    """Both files a resume needs are there, else an error saying which is missing and why."""
    resume, last = out_dir / RESUME_FILE, out_dir / LAST_CHECKPOINT
    if resume.is_file() and last.is_file():
        return
    if last.is_file():
        raise FileNotFoundError(
            f"{resume}: missing, so {last} cannot be resumed (it holds the weights but not the "
            f"optimiser, schedule and progress); train again without --resume, or start a new "
            f"run from {last} as its initial model"
        )
    if resume.is_file():
        raise FileNotFoundError(f"{last}: missing beside {resume}; nothing to resume")
    raise FileNotFoundError(f"{out_dir}: nothing to resume (no {LAST_CHECKPOINT} and "
                            f"{RESUME_FILE}); train without --resume")


def _resume(out_dir: Path, model_config: ModelConfig, plain_model: nn.Module,
            extra_parameters: list[nn.Parameter], optimizer, scheduler, scaler,
            average: WeightAverage | None = None, accumulate: int = 1) -> FitResult:
    """Put ``out_dir``'s resume.pt back into the model, the extra parameters, the optimiser,
    the schedule, the scaler, the weight average and the RNGs; the progress so far. Temporary
    files of writes a kill interrupted are removed."""
    check_resumable(out_dir)
    if is_main_process():  # the one writer of the folder removes what a killed write left
        remove_stale_temporaries(out_dir)
    # On the CPU: RNG states must stay CPU byte tensors; the optimiser moves its own state to its
    # parameters' device.
    state = load_resume_state(out_dir / RESUME_FILE)
    # The run's architecture and classes, named by the checkpoint beside resume.pt.
    check_checkpoint_matches(out_dir / LAST_CHECKPOINT, model_config.num_classes,
                             arch=model_config.arch)
    if "model" in state:
        try:
            plain_model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ValueError(
                f"{out_dir / RESUME_FILE}: its model does not fit this run's (other widths or "
                f"layers: {str(error).splitlines()[0]}); resume with the settings it was "
                "trained with"
            ) from None
    else:  # a resume.pt from before it held the model: last.pt is of its epoch
        resumed, _ = load_model(
            out_dir / LAST_CHECKPOINT, arch=model_config.arch,
            num_classes=model_config.num_classes,
        )
        plain_model.load_state_dict(resumed.state_dict())
    _restore_extra_parameters(
        extra_parameters, state.get("extra_parameters"), out_dir / RESUME_FILE
    )
    saved_accumulate = state.get("accumulate", 1)  # resume.pt from before the key: 1
    if saved_accumulate != accumulate:
        raise ValueError(
            f"{out_dir / RESUME_FILE}: trained with train.accumulate={saved_accumulate}, this run "
            f"has {accumulate}; its schedule counts optimiser steps, so resume with "
            f"train.accumulate={saved_accumulate}"
        )
    if average is not None:
        _restore_average(average, state.get("ema"), plain_model, out_dir / RESUME_FILE)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return FitResult(state["epoch"], state["best_value"], state["best_epoch"], state["history"],
                     last_accepted_loss=state.get("last_accepted_loss"))


def _save_epoch(out_dir: Path, plain_model: nn.Module, model_config: ModelConfig,
                config: TrainConfig, record: dict, result: FitResult, improved: bool,
                optimizer, scheduler, scaler, extra_parameters: list[nn.Parameter],
                average: WeightAverage | None = None) -> None:
    """The end-of-epoch files: last.pt (checkpoint format), best.pt when the selection metric
    improved, then resume.pt (the model again and everything else a resume needs). With a
    weight average (train.ema_decay), last_ema.pt holds it and best.pt is it (the weights that
    were evaluated); last.pt keeps the raw weights; resume.pt holds both.

    resume.pt is written last and alone decides where a resume starts: a kill between the
    files leaves it at the previous epoch, with that epoch's model, so the resume redoes the
    epoch from consistent state and rewrites last.pt and best.pt (resuming from a last.pt
    one epoch ahead of the optimiser and RNG state would silently train a different model)."""
    meta = {
        "epoch": result.epochs,
        "metrics": {k: v for k, v in record.items() if isinstance(v, (int, float))},
        "train_config": to_dict(config),
    }
    save_checkpoint(out_dir / LAST_CHECKPOINT, plain_model, model_config, meta=meta)
    evaluated = plain_model if average is None else average.model
    if average is not None:
        save_checkpoint(out_dir / LAST_EMA_CHECKPOINT, evaluated, model_config, meta=meta)
    if improved:
        save_checkpoint(out_dir / BEST_CHECKPOINT, evaluated, model_config, meta=meta)
    atomic_save(
        {
            "format": RESUME_FORMAT,
            "epoch": result.epochs,
            "model": {name: tensor.detach().cpu()
                      for name, tensor in plain_model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": _rng_state(),
            "extra_parameters": [parameter.detach().cpu() for parameter in extra_parameters],
            "ema": None if average is None else average.state_dict(),
            "accumulate": config.accumulate,
            "best_value": result.best_value,
            "best_epoch": result.best_epoch,
            "history": result.history,
            "last_accepted_loss": result.last_accepted_loss,
        },
        out_dir / RESUME_FILE,
    )


def _record_best(result: FitResult, record: dict, metric: str) -> bool:
    """Append the epoch's record to ``result``; True (and the best updated) when ``metric``
    improved."""
    result.history.append(record)
    value = record.get(metric)
    improved = value is not None and math.isfinite(value) and _improved(metric, value,
                                                                         result.best_value)
    if improved:
        result.best_value, result.best_epoch = value, result.epochs
    return improved


def _exploded(value: float, first_loss: float | None) -> bool:
    """NaN, infinite, or `EXPLODED_FACTOR` times the run's first loss (at least 1, so that a
    fine-tune starting near zero loss is not stopped by an ordinary wobble)."""
    if not math.isfinite(value):
        return True
    return first_loss is not None and value > EXPLODED_FACTOR * max(first_loss, 1.0)


DIVERGED_ADVICE = "Try a lower train.lr or a train.grad_clip."


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def _diverged(what: str, where: str, out_dir: Path, result: FitResult) -> TrainingDiverged:
    """The divergence error, pointing at the checkpoint that is really there."""
    last = out_dir / LAST_CHECKPOINT
    if result.epochs > 0 and last.is_file():
        kept = f"the last good checkpoint is {last} (epoch {result.epochs})"
    else:
        kept = "no epoch finished, so no checkpoint was kept"
    return TrainingDiverged(f"{what} at {where}; {kept}. {DIVERGED_ADVICE}",
                            reason=f"{what} at {where}")


def _wants_evaluation(config: TrainConfig, done: int) -> bool:
    interval = config.eval_interval
    return interval > 0 and (done % interval == 0 or done == config.epochs)


def fit(
    model: nn.Module,
    model_config: ModelConfig,
    config: TrainConfig,
    train_loader: DataLoader,
    out_dir: str | Path,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    loss_fn: LossFn | None = None,
    forward_kwargs: dict | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    on_step_end: Callable[[int, nn.Module, dict], None] | None = None,
    on_epoch_end: Callable[[int, nn.Module, dict], None] | None = None,
    extra_parameters: Iterable[nn.Parameter] = (),
    resume: bool = False,
    device: str | torch.device = "cpu",
    log: TrainingLog | None = None,
) -> FitResult:
    """Train ``model`` for ``config.epochs`` epochs (from where ``out_dir`` left off when
    ``resume``), evaluating every ``config.eval_interval`` epochs with ``evaluate(model) ->
    metrics`` and keeping ``best.pt`` by ``config.best_metric``.

    ``model`` may be wrapped in DistributedDataParallel; then only rank 0 writes files. Each step
    calls ``model(images, **forward_kwargs)`` (``{"return_features": True}`` for feature
    distillation) and ``loss_fn(outputs, batch)``, which gets the batch on the device (with
    ``image``) and returns the total loss and a dict of its parts (default: the loss of the
    model's head type with the config's loss switches, `detector.heads.task_loss`). The
    callables get the plain
    model: ``after_backward`` with true gradients, ``after_step`` after the optimiser step,
    ``on_step_end(step, model, parts)`` at the end of every step, ``on_epoch_end(epoch, model,
    record)`` once the epoch's files are written. ``log`` records the run (metrics.jsonl and
    .csv, the console line per epoch; TensorBoard and train.log when it was opened with them,
    see `detector.engine.logs`): its opener closes it; default: the jsonl, csv and console line.
    """
    out_dir, device, forward_kwargs = Path(out_dir), torch.device(device), forward_kwargs or {}
    loss_fn = loss_fn or task_loss(model_config.head, config)
    main = is_main_process()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    plain_model = unwrap_model(model)
    memory_format = torch.channels_last if config.channels_last else torch.preserve_format
    model.to(device=device, memory_format=memory_format)
    extra_parameters = list(extra_parameters)
    optimizer = build_optimizer([*model.parameters(), *extra_parameters], config)
    scheduler = build_scheduler(
        optimizer, config, optimizer_steps_per_epoch(len(train_loader), config.accumulate)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "amp")
    average = None if config.ema_decay is None else WeightAverage(plain_model, config.ema_decay)
    result = FitResult(epochs=0)
    if resume:
        result = _resume(out_dir, model_config, plain_model, extra_parameters, optimizer,
                         scheduler, scaler, average, config.accumulate)
    log = log or TrainingLog(out_dir, enabled=main)
    log.start(result.epochs, config.epochs)
    global_step = result.epochs * len(train_loader)
    first_loss = None  # this process's first loss: the scale `_exploded` compares with
    skip = SkipLoss(config.skip_loss_factor, result.last_accepted_loss, device)

    for epoch in range(result.epochs, config.epochs):
        for epoch_aware in (train_loader.dataset, train_loader.sampler):
            if hasattr(epoch_aware, "set_epoch"):
                epoch_aware.set_epoch(epoch)
        model.train()
        started, images_seen, loss_sum = time.perf_counter(), 0, 0.0
        # Time spent waiting for the loader: a share near 0 means the data never starves the step.
        data_wait, step_ended = 0.0, started
        progress = tqdm(
            train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not main, leave=False
        )
        for step, batch in enumerate(progress):
            data_wait += time.perf_counter() - step_ended
            batch = {
                k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()
            }
            if config.channels_last:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            with _autocast(config.precision, device):
                outputs = model(batch["image"], **forward_kwargs)
            loss, parts = loss_fn(outputs, batch)
            # The step's one wait for the device: everything after it is queued asynchronously.
            loss_value = loss.item()
            if _exploded(loss_value, first_loss):
                state = "non-finite" if not math.isfinite(loss_value) else "exploding"
                raise _diverged(f"{state} loss ({loss_value:.4g}, the first was "
                                f"{_number(first_loss)})",
                                f"epoch {epoch + 1}, step {step + 1}", out_dir, result)
            first_loss = loss_value if first_loss is None else first_loss
            group_size, stepping = _accumulation_group(step, len(train_loader), config.accumulate)
            if step % config.accumulate == 0:
                optimizer.zero_grad(set_to_none=True)
                group_loss = 0.0
            with _gradient_sync(model, stepping):  # the group's gradient: its mean loss's
                scaler.scale(loss / group_size).backward()
            group_loss += loss_value / group_size
            if stepping and skip.accepts(group_loss):
                _optimizer_step(model, plain_model, extra_parameters, config, optimizer,
                                scheduler, scaler, after_backward, after_step, average)
            elif stepping:  # skipped: the schedule counts progress through the epochs all the same
                _advance(scheduler, quiet=True)
            global_step += 1
            images_seen += len(batch["image"])
            loss_sum += loss_value
            log.add_step(parts)
            step_ended = time.perf_counter()
            rate = images_seen / (step_ended - started)
            # refresh=False: the bar redraws at tqdm's own pace, not once per step (log files)
            progress.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{rate:.1f}", refresh=False)
            if global_step % config.log_interval == 0:
                log.write({"kind": "train", "epoch": epoch + 1, "step": global_step,
                           "lr": scheduler.get_last_lr()[0], "images_per_s": rate,
                           **{f"loss_{k}": float(v) for k, v in parts.items()}}, global_step)
            if on_step_end is not None:
                on_step_end(global_step, plain_model, parts)

        result.epochs = done = epoch + 1
        seconds = time.perf_counter() - started
        record = {"kind": "epoch", "epoch": done, "step": global_step,
                  "train_loss": loss_sum / max(len(train_loader), 1), "seconds": seconds,
                  "lr": scheduler.get_last_lr()[0],
                  "data_wait_share": data_wait / max(seconds, 1e-9),
                  "images_per_s": images_seen / max(seconds, 1e-9), **skip.epoch_count(),
                  **log.epoch_losses()}
        result.last_accepted_loss = skip.last_accepted
        if evaluate is not None and _wants_evaluation(config, done):
            record.update(evaluate(plain_model if average is None else average.model))
            validation_loss = record.get("loss")
            if isinstance(validation_loss, float) and _exploded(validation_loss, first_loss):
                # Before the epoch's files: a diverged model never becomes last.pt or best.pt.
                result.epochs = epoch
                raise _diverged(f"validation loss {validation_loss:.4g} (the first training "
                                f"loss was {_number(first_loss)})", f"the end of epoch {done}",
                                out_dir, result)
        improved = _record_best(result, record, config.best_metric)
        log.write(record, global_step)
        if main:
            _save_epoch(out_dir, plain_model, model_config, config, record, result, improved,
                        optimizer, scheduler, scaler, extra_parameters, average)
        barrier()  # every process leaves the epoch only once its checkpoint is on disk
        if on_epoch_end is not None:
            on_epoch_end(done, plain_model, record)
    result.parameter_checksum = float(
        sum(p.detach().double().sum() for p in plain_model.parameters())
    )
    return result
