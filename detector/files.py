"""Files written whole or not at all: filled as a temporary file beside the target, flushed to
disk, then renamed over it, so a crash or an interrupted run never leaves a truncated file
behind. Every file ctprune writes into a run folder goes through `atomic_replace`."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o644
"""Mode of every file written here: read-write for its owner, readable by everyone, whatever
the umask. Stated rather than inherited because temporary-file helpers create private (0o600)
files and the rename would keep that mode."""


class DiskFullError(OSError):
    """The disk (or the user's quota) filled up while a file was written; the message names
    the file, how much had been written and how much space is left."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return str(self.strerror)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def disk_full_error(path: Path, written: int, error: OSError) -> DiskFullError:
    """The error to raise when writing ``path`` failed with ENOSPC or EDQUOT after
    ``written`` bytes."""
    free = _free_bytes(path.parent)
    cause = "the disk quota is used up" if error.errno == errno.EDQUOT else "the disk is full"
    left = "unknown" if free is None else _mib(free)
    return DiskFullError(
        error.errno,
        f"{path}: cannot write the file: {cause} (needs more than the {_mib(written)} written "
        f"so far; {left} free in {path.parent}); the previous file, if any, is intact. Free "
        "some space or write elsewhere.",
    )


def atomic_replace(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file opened for binary writing in ``path``'s folder,
    fsync it, give it `FILE_MODE`, rename it over ``path`` and fsync the folder (so the rename
    itself survives a power cut). On any failure the temporary file is removed and ``path`` is
    left as it was. A full disk or quota raises `DiskFullError` naming the file and the
    space left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except OSError as error:
        written = temporary.stat().st_size if temporary.exists() else 0
        temporary.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(error, DiskFullError):
            raise disk_full_error(path, written, error) from None
        raise
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


# `atomic_replace`'s temporary files: .<name>.<pid of the writer>.<8 hex digits>.tmp
TEMPORARY_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files in ``folder`` that a killed writer left behind (its process
    is gone: the file can never be renamed into place); returns them. Files of live writers
    are kept."""
    folder = Path(folder)
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = TEMPORARY_NAME.match(path.name)
        if match and path.is_file() and not _process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _fsync_folder(folder: Path) -> None:
    # A folder cannot be opened for fsync on Windows; there the rename is as durable as it gets.
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_replace(path, lambda file: file.write(text.encode("utf-8")))


def atomic_copy(source: str | Path, destination: str | Path) -> Path:
    """Copy the bytes of ``source`` to ``destination`` atomically."""
    with open(source, "rb") as original:
        return atomic_replace(destination, lambda file: shutil.copyfileobj(original, file))


def finite_or_null(data: object) -> object:
    """``data`` with every NaN or infinite float replaced by None (JSON has neither) and tuples
    turned into lists, recursively; other values are returned unchanged."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: finite_or_null(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_null(value) for value in data]
    return data


def atomic_write_json(
    path: str | Path, data: object, *, default: Callable[[object], object] | None = None
) -> Path:
    """``data`` as strict, indented JSON (NaN and infinities become null) written atomically;
    ``default`` converts values JSON has no type for, as in `json.dumps`."""
    text = json.dumps(finite_or_null(data), indent=2, allow_nan=False, default=default)
    return atomic_write_text(path, text + "\n")
