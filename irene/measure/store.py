"""``trees.jsonl`` on disk: one line per (model, batch size, sequence length), crash-safe.

A line is added by rewriting the whole file to a temporary sibling, flushing it to disk and
renaming it over the original (``os.replace`` is atomic on POSIX): a sweep killed at any
moment leaves either the old file or the new one, never a torn line. An exclusive lock on a
``.lock`` sibling serialises parallel jobs of one sweep. On start a job checks whether its
line already exists and skips the work if so, so a restarted sweep neither loses nor
duplicates a configuration.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RecordKey = tuple[str, int, int]


def record_key(record: dict) -> RecordKey:
    """``(model_name, batch_size, seq_len)`` of a record."""
    return (str(record["model_name"]), int(record["batch_size"]), int(record["seq_len"]))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_keys(path: str | Path) -> set[RecordKey]:
    """Keys of the complete lines of a trees file (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return set()
    keys = set()
    with open(path) as handle:
        for line in handle:
            if line.strip():
                keys.add(record_key(json.loads(line)))
    return keys


def has_record(path: str | Path, key: RecordKey) -> bool:
    """Whether the trees file already holds the line of ``key``."""
    return key in read_keys(path)


def append_record(path: str | Path, record: dict) -> bool:
    """Add one record atomically, unless a record with the same key is already there.

    Args:
        path: the ``trees.jsonl`` file (created with its folder if missing).
        record: ``{"model_name", "batch_size", "seq_len", "frontend_tree"}``.

    Returns:
        True when the line was written, False when its key was already present.
    """
    path = Path(path)
    with _locked(path):
        existing = path.read_text() if path.exists() else ""
        if record_key(record) in read_keys(path):
            return False
        if existing and not existing.endswith("\n"):
            existing += "\n"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as handle:
            handle.write(existing + json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    return True


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
