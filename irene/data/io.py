"""Atomic file output: a reader never sees a half-written file, and no input is overwritten."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from irene.errors import SettingsError


def atomic_write_text(path: str | Path, text: str, *, protect: Iterable[str | Path] = ()) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``.

    Args:
        path: destination file; parent folders are created.
        text: the whole content.
        protect: input files that must never be overwritten by this write.

    Returns:
        The destination path.

    Raises:
        SettingsError: if ``path`` is one of the ``protect`` files (a ``ValueError``).
    """
    return atomic_write_bytes(path, text.encode("utf-8"), protect=protect)


def atomic_write_bytes(path: str | Path, data: bytes, *, protect: Iterable[str | Path] = ()
                       ) -> Path:
    """:func:`atomic_write_text` for bytes. The file gets the permissions a plain ``open``
    would give it (0666 less the umask), not the temporary file's 0600."""
    path = Path(path)
    for other in protect:
        if Path(other).exists() and path.exists() and path.resolve() == Path(other).resolve():
            raise SettingsError(f"refusing to overwrite input file {path}: choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)  # a failed write (e.g. a full disk) names its file
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any, **kwargs: Any) -> Path:
    """Write one JSON document atomically (indented, keys in insertion order)."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", **kwargs)
