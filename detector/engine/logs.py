"""What a training run records: ``metrics.jsonl`` (one JSON line per logged step and per epoch),
``metrics.csv`` beside it (one row per epoch), TensorBoard scalars when tensorboard is installed
(the ``tensorboard`` extra), one console line per epoch, and ``train.log`` (the run's console
lines, warnings and error).

`fit` takes a `TrainingLog` as its ``log`` argument and only calls it: ``start`` once its progress
is known, ``add_step`` every step, ``epoch_losses`` and ``write`` for the records. Whoever opens a
`TrainingLog` closes it: use it as a context manager around `fit`, so the TensorBoard writer and
the train.log handler are closed on errors too. Library code never configures logging;
`console_logging` is for the command line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from ..files import atomic_write_text
from ..layout import HISTORY_FILE, HISTORY_TABLE, LOG_FILE, TENSORBOARD_FOLDER

logger = logging.getLogger(__name__)

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter writing into ``folder``, or None when tensorboard is not
    installed (``pip install ctprune[tensorboard]``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def _duration(seconds: float) -> str:
    """``1h 02m``, ``3m 07s``, ``12.3s``: short enough for one console line."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def epoch_line(record: dict, total_epochs: int, eta_seconds: float | None) -> str:
    """The console line of one epoch record: epoch/total, the training loss and its parts, lr,
    the steps skip-loss skipped (when any), images per second, the epoch's time, the time left,
    and AP/AP50 when evaluation ran."""
    parts = [f"{key.removeprefix('loss_')} {value:.4f}" for key, value in record.items()
             if key.startswith("loss_") and key != "loss_total" and isinstance(value, float)]
    fields = [f"epoch {record['epoch']}/{total_epochs}",
              f"loss {record['train_loss']:.4f}" + (f" ({', '.join(parts)})" if parts else ""),
              f"lr {record['lr']:.3g}"]
    if record.get("skipped_steps"):  # train.skip_loss_factor: steps not taken this epoch
        fields.append(f"skipped {record['skipped_steps']} steps")
    if "images_per_s" in record:
        fields.append(f"{record['images_per_s']:.1f} img/s")
    fields.append(f"epoch time {_duration(record['seconds'])}")
    if eta_seconds is not None:
        fields.append(f"ETA {_duration(eta_seconds)}")
    for key in ("ap", "ap50"):
        if isinstance(record.get(key), (int, float)):
            fields.append(f"{key.upper()} {record[key]:.4f}")
    return "  ".join(fields)


def csv_text(records: list[dict]) -> str:
    """The epoch records as CSV: one row per record, the columns the union of their keys in
    the order they first appear (a key an epoch lacks, AP on an epoch without evaluation, is
    an empty cell); values that are not numbers or text are written as JSON."""
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(key for key in record if key != "kind"))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({key: value if isinstance(value, (int, float, str)) or value is None
                         else json.dumps(value)
                         for key, value in record.items() if key != "kind"})
    return buffer.getvalue()


class TrainingLog:
    """The records of one training run in ``out_dir`` (written only when ``enabled``: rank 0
    of a distributed run). ``tensorboard``: a factory ``folder -> writer or None``
    (`tensorboard_writer`; None: no TensorBoard); ``log_file``: copy this process's log lines
    (the epoch lines, warnings, the error that ended the run) into ``out_dir/train.log``,
    appending on resume."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True,
                 tensorboard: Callable[[Path], object] | None = None,
                 log_file: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.path = self.out_dir / HISTORY_FILE
        self.csv_path = self.out_dir / HISTORY_TABLE
        self.tensorboard = tensorboard if enabled else None
        self.writer = None
        self.log_file = log_file and enabled
        self.epochs: list[dict] = []
        self.total_epochs = 0
        self._step_losses: dict = {}
        self._steps = 0
        self._started = time.perf_counter()
        self._epochs_this_run = 0
        self._file_handler: logging.Handler | None = None
        self._level: int | None = None

    def __enter__(self) -> TrainingLog:
        if self.log_file:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._file_handler = logging.FileHandler(self.out_dir / LOG_FILE, mode="a",
                                                     encoding="utf-8")
            self._file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
            self._file_handler.setLevel(logging.INFO)
            logging.getLogger().addHandler(self._file_handler)
            # The epoch lines reach train.log even where no one configured logging.
            if not logger.isEnabledFor(logging.INFO):
                self._level = logger.level
                logger.setLevel(logging.INFO)
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error is not None and self._file_handler is not None:
            # Into the file only: the command line prints the error on the console itself.
            what = "interrupted" if isinstance(error, KeyboardInterrupt) else "stopped"
            self._file_handler.handle(logger.makeRecord(
                logger.name, logging.ERROR, __file__, 0,
                f"training {what}: {error_type.__name__}: {error}", (), None))
        self.close()

    def close(self) -> None:
        """Close the TensorBoard writer and detach train.log; safe to call twice."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._file_handler is not None:
            logging.getLogger().removeHandler(self._file_handler)
            self._file_handler.close()
            self._file_handler = None
        if self._level is not None:
            logger.setLevel(self._level)
            self._level = None

    def start(self, epochs_done: int, total_epochs: int) -> None:
        """Keep only the records of the epochs a run starts after: none for a fresh run (an
        old run's lines never mix in), those up to the resumed epoch for a resume (steps
        logged after the last saved epoch, and a line cut by a kill, are dropped); metrics.csv
        is rewritten from the kept epochs, so it always agrees with metrics.jsonl."""
        self.total_epochs, self.epochs = total_epochs, []
        self._started, self._epochs_this_run = time.perf_counter(), 0
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.tensorboard is not None and self.writer is None:
            self.writer = self.tensorboard(self.out_dir / TENSORBOARD_FOLDER)
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if (isinstance(record, dict)
                        and record.get("epoch", epochs_done + 1) <= epochs_done):
                    kept.append(line + "\n")
                    if record.get("kind") == "epoch":
                        self.epochs.append(record)
            atomic_write_text(self.path, "".join(kept))
        atomic_write_text(self.csv_path, csv_text(self.epochs))

    def add_step(self, parts: dict) -> None:
        """Add one step's loss parts (tensors, detached) to the epoch's sums: no device sync."""
        for key, value in parts.items():
            self._step_losses[key] = self._step_losses.get(key, 0.0) + value
        self._steps += 1

    def epoch_losses(self) -> dict[str, float]:
        """The epoch's mean loss parts as ``loss_<part>`` (then the sums restart)."""
        means = {f"loss_{key}": float(total) / max(self._steps, 1)
                 for key, total in self._step_losses.items()}
        self._step_losses, self._steps = {}, 0
        return means

    def write(self, record: dict, step: int) -> None:
        """One record (``kind`` "train" for a step, "epoch" for an epoch) into metrics.jsonl
        and TensorBoard; an epoch record also into metrics.csv and onto the console."""
        if not self.enabled:
            return
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, step)
        if record.get("kind") != "epoch":
            return
        self.epochs.append(record)
        atomic_write_text(self.csv_path, csv_text(self.epochs))
        self._epochs_this_run += 1
        elapsed = time.perf_counter() - self._started  # with evaluation and checkpoints
        remaining = max(self.total_epochs - record["epoch"], 0)
        logger.info(epoch_line(record, self.total_epochs,
                               elapsed / self._epochs_this_run * remaining))


def run_log(out_dir: str | Path) -> TrainingLog:
    """The full record of a training run for this process: metrics, TensorBoard when
    installed, train.log; everything only on rank 0. Open it with ``with`` around `fit`."""
    from ..distributed import is_main_process  # here: the command line imports logs.py, not torch

    return TrainingLog(out_dir, enabled=is_main_process(), tensorboard=tensorboard_writer,
                       log_file=True)


class _TqdmHandler(logging.StreamHandler):
    """Writes above a running progress bar (tqdm.write) instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's contract: a handler never raises
            self.handleError(record)


class _ConsoleFormatter(logging.Formatter):
    """Information as it is (the epoch lines); warnings and errors with their level."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


@contextmanager
def console_logging(level: int = logging.INFO) -> Iterator[None]:
    """For the command line: log lines of ``level`` and above to stderr (above tqdm's bars),
    Python warnings through logging (so train.log keeps them too); undone on exit, so calling
    the command line in-process leaves logging as it was."""
    root = logging.getLogger()
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter())
    handler.setLevel(level)
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, previous_level) if previous_level else level)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.setLevel(previous_level)
        root.removeHandler(handler)
