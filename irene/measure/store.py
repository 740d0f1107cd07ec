"""``trees.jsonl`` on disk: one line per (model, batch size, sequence length), crash-safe.

A line is added by rewriting the whole file to a temporary sibling, flushing it to disk and
renaming it over the original (``os.replace`` is atomic on POSIX): a sweep killed at any
moment leaves either the old file or the new one, never a torn line. An exclusive lock on a
``.lock`` sibling serialises parallel jobs of one sweep. On start a job checks whether its
line already exists and skips the work if so, so a restarted sweep neither loses nor
duplicates a configuration; a line with less than the job would measure (the trace alone,
or times without energy, from a machine without an energy meter) does not stop it, and the
job's line replaces it (:func:`completeness`).
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


# what a record holds: the trace alone, times measured without energy, energy measured
TRACE, TIMES, ENERGY = 0, 1, 2


def completeness(record: dict) -> int:
    """:data:`ENERGY` when the root has ``ground_truth_energy``, :data:`TIMES` when the record
    was measured (a ``measurement`` block or ``times_mean``) without energy, else :data:`TRACE`."""
    root = record.get("frontend_tree") or {}
    if root.get("ground_truth_energy") is not None:
        return ENERGY
    return TIMES if "measurement" in record or root.get("times_mean") is not None else TRACE


def existing_completeness(path: str | Path, key: RecordKey) -> int | None:
    """:func:`completeness` of the line of ``key`` (None: no such line)."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path) as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                if record_key(record) == key:
                    return completeness(record)
    return None


def has_record(path: str | Path, key: RecordKey, wanted: int = TRACE) -> bool:
    """Whether the trees file already holds the line of ``key`` with at least ``wanted``
    (:func:`completeness`): then a job that would produce ``wanted`` has nothing to add."""
    found = existing_completeness(path, key)
    return found is not None and found >= wanted


def append_record(path: str | Path, record: dict) -> bool:
    """Add one record atomically, unless a record with the same key and at least as much
    (:func:`completeness`) is already there; a line with less is replaced.

    Args:
        path: the ``trees.jsonl`` file (created with its folder if missing).
        record: ``{"model_name", "batch_size", "seq_len", "frontend_tree"}``.

    Returns:
        True when the line was written, False when its key was already present.
    """
    path = Path(path)
    key, new = record_key(record), completeness(record)
    with _locked(path):
        lines = [line for line in (path.read_text().splitlines() if path.exists() else [])
                 if line.strip()]
        for i, line in enumerate(lines):
            there = json.loads(line)
            if record_key(there) == key:
                if completeness(there) >= new:
                    return False
                lines[i] = json.dumps(record)  # the line with less, replaced where it was
                break
        else:
            lines.append(json.dumps(record))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as handle:
            handle.write("".join(f"{line}\n" for line in lines))
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
