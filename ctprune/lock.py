"""One writer per run folder: `run_lock` holds ``RUN/.lock`` while a `ctprune run` or
`ctprune train` writes the folder, so two runs never write epochs into one metrics.jsonl.

The lock file is created with O_CREAT | O_EXCL (atomic on local file systems) and holds who
holds it: pid, host, start time and command. A lock whose pid no longer runs on this host is
stale (its process was killed without cleaning up) and is taken over with a warning; a lock of
another host is never taken over, since its pid cannot be checked from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = ".lock"


class RunLocked(ValueError):
    """The run folder is being written by another process."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock's record; None when it vanished meanwhile; {} when unreadable (half written)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _try_create(path: Path, record: dict) -> bool:
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as file:
        json.dump(record, file)
    return True


def acquire(folder: Path, command: list[str] | None = None) -> Path:
    """Take ``folder``'s lock (creating the folder); raise `RunLocked` naming the holder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host,
              "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(command) if command else None}
    for _ in range(3):  # a stale lock removed by two processes at once: try again
        if _try_create(path, record):
            return path
        holder = _holder(path)
        if holder is None:
            continue
        pid, holder_host = holder.get("pid"), holder.get("host")
        if holder_host == host and isinstance(pid, int) and not _pid_alive(pid):
            warnings.warn(f"{path}: taking over the lock of pid {pid}, which no longer runs "
                          "(killed without cleaning up)", stacklevel=2)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        command_text = f" ({holder['command']})" if holder.get("command") else ""
        raise RunLocked(
            f"{folder} is being written by pid {pid} on host {holder_host} since "
            f"{holder.get('since')}{command_text}; wait for it to finish, or if it is gone, "
            f"remove {path}"
        )
    raise RunLocked(f"{path}: could not take the lock")


def release(path: Path) -> None:
    """Remove the lock when it is still this process's."""
    holder = _holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def run_lock(folder: str | Path, command: list[str] | None = None) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block; released on exit, errors and Ctrl-C. A process
    that already holds it (a run calling `train` on its own folder) is let through."""
    folder = Path(folder)
    holder = _holder(folder / LOCK_FILE)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        yield folder / LOCK_FILE
        return
    created = not folder.exists()
    path = acquire(folder, command)
    try:
        yield path
    finally:
        release(path)
        if created and not any(folder.iterdir()):
            folder.rmdir()  # refused before anything was written: leave no empty folder
