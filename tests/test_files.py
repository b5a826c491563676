"""The one atomic writer: stated mode, fsync of file and folder, the old file kept on failure."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest

from detector import files
from detector.files import (
    FILE_MODE,
    atomic_copy,
    atomic_replace,
    atomic_write_json,
    atomic_write_text,
)


def test_written_file_has_the_stated_mode_whatever_the_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "hello")
    finally:
        os.umask(previous)
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE == 0o644


def test_file_and_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append(stat.S_ISDIR(os.fstat(descriptor).st_mode))
        real_fsync(descriptor)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    atomic_write_text(tmp_path / "a.txt", "hello")
    expected = [False, True] if os.name == "posix" else [False]
    assert synced == expected  # the file's data first, then the folder holding the rename


def test_failure_leaves_the_original_intact_and_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "original")

    def broken(file):
        file.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_replace(path, broken)
    assert path.read_text() == "original"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_copy_and_strict_json(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)))
    assert atomic_copy(source, tmp_path / "sub" / "copy.bin").read_bytes() == bytes(range(256))
    path = atomic_write_json(tmp_path / "a.json", {"ap": math.nan, "values": (1.0, math.inf)})

    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    written = json.loads(path.read_text(), parse_constant=refuse)
    assert written == {"ap": None, "values": [1.0, None]}
