"""The data set of a stage: trees from ``data.trees``, or a device's CSVs imported once and
cached under ``outputs/cache/`` (keyed by the CSVs' sha256 and the model list)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import DictConfig

from irene.data.published import CSV_FILES, csv_name, import_device, resolve_device_dir, sha256_of
from irene.data.tree import Tree, read_trees, write_trees
from irene.measure.leakage import check_no_leaked_target
from pipelines.paths import datasets_dir, log, outputs_dir

CACHE_VERSION = 1  # bump when the import's output changes


def _import_cache_path(folder: Path, models: list[str] | None) -> Path:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{models}".encode())
    for level in CSV_FILES:
        digest.update(sha256_of(folder / csv_name(level)).encode())
    return outputs_dir() / "cache" / f"trees-{digest.hexdigest()[:16]}.jsonl"


def load_trees(cfg: DictConfig, *, require_energy: bool = True) -> tuple[list[Tree], Path]:
    """The data set's trees and the file they came from.

    ``data.trees`` is read as it is; otherwise the device's CSVs are imported once and the
    trees cached under ``outputs/cache/``.
    """
    data = cfg.data
    if data.trees:
        path = Path(data.trees)
        log.info("reading trees from %s", path)
        trees = read_trees(path, require_energy=require_energy)
        check_no_leaked_target(trees, cfg.features.sets, path)  # a feature that is the target: refused
        return trees, path
    folder = resolve_device_dir(data.path, data.name, datasets_dir=datasets_dir(),
                                download=data.download)
    models = None if data.models is None else list(data.models)
    cache = _import_cache_path(folder, models)
    if cache.exists():
        log.info("reading trees of %s from cache %s", folder, cache)
        return read_trees(cache, require_energy=require_energy), cache
    log.info("importing the published CSVs of %s (models: %s)", folder, models or "all")
    trees = import_device(folder, models)
    write_trees(cache, trees)
    return trees, cache
