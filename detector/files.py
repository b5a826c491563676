"""Files written whole or not at all: filled as a temporary file beside the target, then renamed
over it, so an interrupted run never leaves a truncated file behind."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_replace(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary)`` to fill a temporary file in ``path``'s folder, then rename it
    over ``path``; on any failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (mode 0600) and the rename would keep that.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_replace(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
