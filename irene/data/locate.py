"""Where a device's published CSVs are: found on disk by one rule, or downloaded and checked.

:func:`locate_device` is the only place that decides which folder a device's data come from;
:func:`download_device` fetches the public files and lands them only once their sha256
matches ``published.json``; :func:`published_device` names the device whose published files
a folder holds (all four checksums match).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from irene.errors import MissingInputError

log = logging.getLogger(__name__)

CSV_FILES = ("model", "module", "ml1", "ml2")
SOURCES_FILE = Path(__file__).resolve().with_name("published.json")  # packaged with irene
ENV_VAR = "IRENE_DATA_DIR"


class DataNotFoundError(MissingInputError):
    """The published CSVs are neither on disk nor downloadable, or a folder lacks one."""


def csv_name(level: str) -> str:
    return f"{level}_level_features.csv"


def _missing_files(folder: Path) -> list[str]:
    return [csv_name(level) for level in CSV_FILES if not (folder / csv_name(level)).is_file()]


def _why(folder: Path, name: str) -> str:
    """Why a device file is not there: missing, a folder, a link that loops..."""
    from irene.data.integrity import file_problem

    return file_problem(folder / name) or "is missing"


def load_sources(path: Path = SOURCES_FILE) -> dict:
    """Public raw-file URLs and sha256 checksums of each device's CSVs."""
    return json.loads(path.read_text())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_device(device: str, target: Path, *, timeout_s: float = 30.0) -> Path:
    """Download a device's CSVs from the public repository and check their sha256.

    Files land in ``target`` only once complete and verified.
    """
    sources = load_sources()
    if device not in sources["devices"]:
        raise DataNotFoundError(
            f"no public source known for device {device!r}; known: {sorted(sources['devices'])}"
        )
    entry = sources["devices"][device]
    for level in CSV_FILES:
        name = csv_name(level)
        url = f"{sources['base_url']}/{device}/{name}"
        expected = entry.get(name)
        partial = target / f".{name}.part"
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                content = response.read()
            target.mkdir(parents=True, exist_ok=True)  # only once there is something to keep
            partial.write_bytes(content)
        except (urllib.error.URLError, OSError) as error:
            partial.unlink(missing_ok=True)
            raise DataNotFoundError(f"could not download {url}: {error}") from error
        actual = sha256_of(partial)
        if expected and actual != expected:
            partial.unlink(missing_ok=True)
            raise DataNotFoundError(f"{url}: sha256 {actual} does not match the published {expected}")
        if not expected:
            log.warning("no published checksum for %s; its content is not verified", name)
        os.replace(partial, target / name)
    return target


@dataclass(frozen=True)
class DataLocation:
    """Where a device's CSVs were found, and how (see :func:`locate_device`).

    Attributes:
        folder: the folder of the four CSVs.
        source: ``data.path``, ``$IRENE_DATA_DIR``, ``datasets`` or ``download``.
        sha256: file name -> sha256 of its bytes, for the four CSVs.
    """

    folder: Path
    source: str
    sha256: dict[str, str]


def published_device(folder: Path) -> str | None:
    """The device whose published CSVs (sha256 in ``published.json``) ``folder`` holds."""
    if _missing_files(folder):
        return None
    digests = {csv_name(level): sha256_of(folder / csv_name(level)) for level in CSV_FILES}
    for device, checksums in load_sources()["devices"].items():
        if checksums and all(checksums.get(name) == digest for name, digest in digests.items()):
            return device
    return None


def _env_folder(device: str, env_dir: str) -> tuple[Path | None, str]:
    """The folder ``$IRENE_DATA_DIR`` gives for ``device`` (None if it names another one),
    and what it is. It names ``device`` when it holds a ``<device>/`` folder (a folder of
    device folders), when its own name is ``device``, or when its files are the published
    CSVs of ``device``."""
    root = Path(env_dir).expanduser()
    if (root / device).is_dir():
        return root / device, f"${ENV_VAR}/{device}"
    if root.name == device:
        return root, f"${ENV_VAR}"
    holds = published_device(root)
    if holds == device:
        return root, f"${ENV_VAR} (the published {device} files)"
    if holds:
        reason = f"holds the published {holds} files"
    elif root.name in load_sources()["devices"]:
        reason = f"is the folder of {root.name}"
    else:
        reason = f"is not named {device} and has no {device}/ folder"
    return None, f"${ENV_VAR}={root} skipped: it {reason}"


def locate_device(path: str | Path | None, device: str = "device_1", *, datasets_dir: Path,
                  download: bool = True, max_mb: float | None = None) -> DataLocation:
    """Find a device's four CSVs. The one rule, first match wins:

    1. ``path`` (``data.path``): that folder, which must hold all four files; never another.
    2. ``$IRENE_DATA_DIR``, only for the device it names: a folder holding ``<device>/``, a
       folder named ``<device>``, or a folder of that device's published files (sha256). A
       folder it names that lacks a file is an error; one naming another device is skipped,
       so ``data=device_2`` never reads device 1.
    3. ``datasets/<device>`` next to ``outputs/``.
    4. With ``download``: fetch the published files into ``datasets/<device>`` (sha256 checked).

    Raises:
        DataNotFoundError: naming the folder and the missing file, or every place it looked.
        InputError: a file of the folder found is larger than ``max_mb`` (checked before the
            sha256 of its bytes is taken).
    """
    if path:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise DataNotFoundError(f"data.path={folder}: no such folder")
        missing = _missing_files(folder)
        if missing:
            raise DataNotFoundError(f"data.path={folder}: {missing[0]} {_why(folder, missing[0])} "
                                    f"(a device folder holds {', '.join(_all_files())})")
        return _located(folder, "data.path", max_mb)
    tried: list[str] = []
    env_dir = os.environ.get(ENV_VAR)
    if env_dir:
        folder, label = _env_folder(device, env_dir)
        if folder is not None:
            missing = _missing_files(folder)
            if missing:
                raise DataNotFoundError(f"{label}={folder}: {missing[0]} {_why(folder, missing[0])} "
                                        f"(a device folder holds {', '.join(_all_files())})")
            return _located(folder, f"${ENV_VAR}", max_mb)
        log.info("%s", label)
        tried.append(label)
    target = datasets_dir / device
    if not _missing_files(target):
        return _located(target, "datasets", max_mb)
    tried.append(f"project datasets folder: {target}")
    if download:
        try:
            return _located(download_device(device, target), "download")
        except DataNotFoundError as error:
            tried.append(f"download: {error}")
    raise DataNotFoundError(
        f"published data for {device} not found. Looked in: {'; '.join(tried)}. "
        f"Provide a folder with {', '.join(_all_files())} via data.path=..., or "
        f"${ENV_VAR}=<folder holding {device}/>, or put them in {target} "
        f"(public URLs and sha256 in {SOURCES_FILE})."
    )


def resolve_device_dir(path: str | Path | None, device: str = "device_1", *,
                       datasets_dir: Path, download: bool = True) -> Path:
    """The folder of :func:`locate_device`."""
    return locate_device(path, device, datasets_dir=datasets_dir, download=download).folder


def _all_files() -> list[str]:
    return [csv_name(level) for level in CSV_FILES]


def _located(folder: Path, source: str, max_mb: float | None = None) -> DataLocation:
    """The location, with each file's sha256; a file over ``max_mb`` (None: the default
    limit, :mod:`irene.data.integrity`) is refused before any of its bytes is read."""
    from irene.data.integrity import check_input_file

    for name in _all_files():
        check_input_file(folder / name, "CSV file", max_mb)
    return DataLocation(folder=folder, source=source,
                        sha256={name: sha256_of(folder / name) for name in _all_files()})
