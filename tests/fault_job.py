"""A `ctprune` command that stops itself at one fixed point: the fault injector of
tests/test_faults.py. ctprune itself is unchanged; the stop is wrapped around its public
functions before the command starts, in a child process (SIGKILL) or, through `install` with
pytest's monkeypatch, in the test's own process (SIGINT).

    python tests/fault_job.py POINT SIGNAL ctprune-arguments...

POINT is where the process sends itself SIGNAL (KILL or INT):

    none                    nowhere: the command runs to its end (the rerun)
    STAGE:epoch:N           right after epoch N's files of a training whose folder is named
                            STAGE (baseline, finetune; ``train`` matches every training)
    prune:start             as a prune stage starts pruning (`ctprune.run.prune_with`)
    report:start            as the run's report starts (`ctprune.run.build_report`)
    save:NAME:N             halfway through the N-th atomic write of a file whose path ends
                            in NAME (last.pt, baseline/checkpoint.pt ...): half its bytes are on
                            disk in the temporary file when the signal comes

Before the signal it prints ``fault: SIG<SIGNAL> at POINT`` to stderr, so a test knows the point was
reached. The command line ctprune sees is ``ctprune ctprune-arguments...``.
"""

from __future__ import annotations

import inspect
import io
import os
import signal
import sys
from pathlib import Path

import ctprune.cli
import ctprune.run
import ctprune.train
import detector.files

SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT}


def stop(point: str, signal_name: str) -> None:
    """Send this process ``signal_name``: SIGKILL ends it at once; SIGINT becomes the
    KeyboardInterrupt a Ctrl-C in the terminal raises, raised here directly: a signal sent to
    oneself is handled at the next bytecode boundary, which on a loaded machine was once inside
    a finaliser (`__del__`), where Python ignores the exception and the job ran on."""
    print(f"fault: SIG{signal_name} at {point}", file=sys.stderr, flush=True)
    if signal_name == "INT":
        raise KeyboardInterrupt
    os.kill(os.getpid(), SIGNALS[signal_name])


def stop_after_epoch(patch, point: str, signal_name: str, stage: str, epoch: int) -> None:
    """Wrap the training loop `ctprune.train` calls (every `ctprune train` and every training
    stage of `ctprune run`) so its on_epoch_end stops the process after ``epoch``."""
    original = ctprune.train.fit
    signature = inspect.signature(original)

    def fit(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        folder = Path(bound.arguments["out_dir"]).name
        if stage != "train" and folder != stage and not folder.startswith(f"{stage}_"):
            return original(*args, **kwargs)
        callback = bound.arguments.get("on_epoch_end")

        def on_epoch_end(done, model, record):
            if callback is not None:
                callback(done, model, record)
            if done == epoch:
                stop(point, signal_name)

        bound.arguments["on_epoch_end"] = on_epoch_end
        return original(*bound.args, **bound.kwargs)

    patch(ctprune.train, "fit", fit)


def stop_at_start(patch, point: str, signal_name: str, module, name: str) -> None:
    """Stop the process as ``module.name`` is called."""
    original = getattr(module, name)

    def stopped(*args, **kwargs):
        stop(point, signal_name)
        return original(*args, **kwargs)

    patch(module, name, stopped)


def stop_mid_write(patch, point: str, signal_name: str, suffix: str, count: int) -> None:
    """Wrap `detector.files.atomic_replace`, wherever a module imported it, so that its
    ``count``-th write of a path ending in ``suffix`` puts half the bytes into the temporary
    file and then stops the process."""
    original = detector.files.atomic_replace
    seen = []

    def atomic_replace(path, write):
        if not f"/{Path(path).as_posix()}".endswith(f"/{suffix}"):
            return original(path, write)
        seen.append(path)
        if len(seen) != count:
            return original(path, write)

        def half_then_stop(file):
            content = io.BytesIO()
            write(content)
            data = content.getvalue()
            file.write(data[: len(data) // 2])
            file.flush()
            os.fsync(file.fileno())
            stop(point, signal_name)
            # Still here: a SIGINT handler put the stop off, and the write goes on as it would.
            file.write(data[len(data) // 2 :])

        return original(path, half_then_stop)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("detector", "ctprune") and getattr(
            module, "atomic_replace", None
        ) is original:
            patch(module, "atomic_replace", atomic_replace)


def install(point: str, signal_name: str, patch=setattr) -> None:
    """Make the process stop at ``point`` with SIG``signal_name``; ``patch(module, name,
    value)`` replaces a function (`setattr`, or a monkeypatch's, undone after a test)."""
    if signal_name not in SIGNALS:
        raise SystemExit(f"fault_job: signal {signal_name!r}: expected one of {sorted(SIGNALS)}")
    parts = point.split(":")
    if point == "none":
        return
    if len(parts) == 3 and parts[1] == "epoch":
        stop_after_epoch(patch, point, signal_name, parts[0], int(parts[2]))
    elif point == "prune:start":
        stop_at_start(patch, point, signal_name, ctprune.run, "prune_with")
    elif point == "report:start":
        stop_at_start(patch, point, signal_name, ctprune.run, "build_report")
    elif len(parts) == 3 and parts[0] == "save":
        stop_mid_write(patch, point, signal_name, parts[1], int(parts[2]))
    else:
        raise SystemExit(f"fault_job: unknown point {point!r}; see this script's docstring")


if __name__ == "__main__":
    point, signal_name, *arguments = sys.argv[1:]
    install(point, signal_name)
    sys.argv = ["ctprune", *arguments]
    sys.exit(ctprune.cli.main(arguments))
