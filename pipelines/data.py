"""The data set of a stage: trees from ``data.trees``, or a device's CSVs imported once and
cached under ``outputs/cache/`` (keyed by the CSVs' sha256 and the model list).

Where the data come from follows one rule (:func:`irene.data.published.locate_device`, and
``docs/trust.md``); every stage that reads them tags its MLflow run with the location, how it
was found and the sha256 of each file read (``data.location``, ``data.source``,
``data.sha256.<file>``), so a table can be traced to its bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from irene.data.forest import Forest, build_forest, save_forest
from irene.data.forest import load_forest as load_forest_arrays
from irene.data.io import atomic_write_text
from irene.data.published import (
    CSV_FILES,
    PAPER_MODELS,
    DataFormatError,
    csv_name,
    import_device,
    locate_device,
    sha256_of,
)
from irene.data.tree import Tree, read_trees, write_trees
from irene.measure.leakage import check_no_leaked_target
from pipelines.paths import datasets_dir, log, outputs_dir
from pipelines.tracking import Tracker

CACHE_VERSION = 1  # bump when the import's output changes


def _import_cache_path(digests: dict[str, str], models: list[str] | None) -> Path:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{models}".encode())
    for level in CSV_FILES:
        digest.update(digests[csv_name(level)].encode())
    return outputs_dir() / "cache" / f"trees-{digest.hexdigest()[:16]}.jsonl"


def wanted_models(cfg: DictConfig) -> list[str] | None:
    """``data.models`` as a list, or None when not set (see :func:`load_trees`)."""
    models = cfg.data.get("models")
    return None if models is None else [str(m) for m in models]


def select_models(trees: list[Tree], models: list[str], where: Path) -> list[Tree]:
    """The trees of ``models`` (file order kept); every model asked for must be there."""
    available = list(dict.fromkeys(t["model_name"] for t in trees))
    absent = [m for m in models if m not in available]
    if absent:
        raise DataFormatError(f"data.models: {absent} not in {where}; it has {available} "
                              "(data.models=null keeps every model of the file)")
    return [t for t in trees if t["model_name"] in models]


def record_input(tracker: Tracker, name: str, path: Path, *, source: str) -> str:
    """Tag the stage's run with an input file's location and sha256; returns the digest."""
    digest = sha256_of(path)
    tracker.set_tags({f"{name}.location": str(Path(path).absolute()), f"{name}.source": source,
              f"{name}.sha256.{Path(path).name}": digest})
    return digest


def load_trees(cfg: DictConfig, tracker: Tracker, *, require_energy: bool = True
               ) -> tuple[list[Tree], Path]:
    """The data set's trees and the file they came from.

    ``data.trees`` is read as it is; otherwise the device's CSVs are located
    (:func:`~irene.data.published.locate_device`), imported once and the trees cached under
    ``outputs/cache/``. ``data.models`` selects models from either source; when it is not set
    a trees file gives every model it has and the CSVs give the paper's six.
    """
    if cfg.data.trees:
        return _read_trees_file(cfg, tracker, require_energy), Path(cfg.data.trees)
    cache = _device_cache(cfg, tracker)
    return read_cache(cache, require_energy=require_energy, max_mb=cfg.data.max_file_mb), cache


@dataclass
class DataSet:
    """A data set as arrays, with its trees read only if asked for."""

    forest: Forest
    source: Path  # the file the trees come from
    _trees: list[Tree] | None = None

    def trees(self) -> list[Tree]:
        """The trees of :attr:`forest`, in its order."""
        if self._trees is None:
            self._trees = read_trees(self.source, validate=False)  # validated before
        return self._trees


def load_forest(cfg: DictConfig, tracker: Tracker) -> DataSet:
    """:func:`load_trees` as a :class:`~irene.data.forest.Forest` (measured energies
    required). The forest of a device's import cache is itself cached (``.forest.npz``, keyed
    by the sha256 of the validated trees), so a repeated run reads arrays, not 14 MB of JSON."""
    if cfg.data.trees:
        trees = _read_trees_file(cfg, tracker, require_energy=True)
        return DataSet(build_forest(trees), Path(cfg.data.trees), trees)
    cache = _device_cache(cfg, tracker)
    digest = sha256_of(cache)
    arrays = cache.with_name(f"{cache.stem}.{digest[:16]}.forest.npz")
    if arrays.is_file() and _is_validated(cache, digest, require_energy=True):
        return DataSet(load_forest_arrays(arrays), cache)
    trees = _read_cache(cache, digest, require_energy=True, max_mb=cfg.data.max_file_mb)
    forest = build_forest(trees)
    save_forest(forest, arrays)
    return DataSet(forest, cache, trees)


def _read_trees_file(cfg: DictConfig, tracker: Tracker, require_energy: bool) -> list[Tree]:
    path, models = Path(cfg.data.trees), wanted_models(cfg)
    log.info("reading trees from %s", path)
    trees = read_trees(path, require_energy=require_energy, max_mb=cfg.data.max_file_mb)
    check_no_leaked_target(trees, cfg.features.sets, path)  # a feature that is the target: refused
    record_input(tracker, "data", path, source="data.trees")
    return trees if models is None else select_models(trees, models, path)


def _device_cache(cfg: DictConfig, tracker: Tracker) -> Path:
    """The import cache of the configured device (imported now if it is not there yet)."""
    data = cfg.data
    location = locate_device(data.path, data.name, datasets_dir=datasets_dir(),
                             download=data.download, max_mb=data.max_file_mb)
    log.info("data of %s: %s (found through %s)", data.name, location.folder, location.source)
    tracker.set_tags({"data.location": str(location.folder.absolute()), "data.source": location.source,
              **{f"data.sha256.{name}": digest for name, digest in location.sha256.items()}})
    models = wanted_models(cfg)
    models = list(PAPER_MODELS) if models is None else models
    cache = _import_cache_path(location.sha256, models)
    if cache.exists():
        log.info("reading trees of %s from cache %s", location.folder, cache)
    else:
        log.info("importing the published CSVs of %s (models: %s)", location.folder, models)
        write_trees(cache, import_device(location.folder, models, max_mb=data.max_file_mb))
    return cache


def _validated_marker(cache: Path) -> Path:
    return cache.with_name(cache.name + ".validated")


def _stamp(digest: str, energy: bool) -> str:
    from irene import __version__

    return f"{digest} irene {__version__} cache v{CACHE_VERSION} energy={energy}\n"


def _is_validated(cache: Path, digest: str, *, require_energy: bool) -> bool:
    """Whether the cache's bytes (of sha256 ``digest``) passed validation, as required, before."""
    marker = _validated_marker(cache)
    recorded = marker.read_text() if marker.is_file() else None
    return recorded == _stamp(digest, True) or (recorded == _stamp(digest, False)
                                                 and not require_energy)


def read_cache(cache: Path, *, require_energy: bool, max_mb: float | None = None) -> list[Tree]:
    """The trees of an import cache. The first read validates them (as any trees file) and
    records the sha256 of the bytes that passed in ``<cache>.validated``; later reads of the
    same bytes by the same version only parse them. Changed bytes, a missing or stale marker:
    full validation again. ``max_mb``: the size limit (``data.max_file_mb``)."""
    return _read_cache(cache, sha256_of(cache), require_energy=require_energy, max_mb=max_mb)


def _read_cache(cache: Path, digest: str, *, require_energy: bool, max_mb: float | None = None
                ) -> list[Tree]:
    if _is_validated(cache, digest, require_energy=require_energy):
        return read_trees(cache, validate=False, max_mb=max_mb)
    trees = read_trees(cache, require_energy=require_energy, max_mb=max_mb)
    atomic_write_text(_validated_marker(cache), _stamp(digest, require_energy))
    return trees
