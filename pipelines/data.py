"""The data set of a stage: trees from ``data.trees``, or a device's CSVs imported once and
cached under ``outputs/cache/`` (keyed by the CSVs' sha256 and the model list).

Where the data come from follows one rule (:func:`irene.data.published.locate_device`, and
``docs/trust.md``); every stage that reads them tags its MLflow run with the location, how it
was found and the sha256 of each file read (``data.location``, ``data.source``,
``data.sha256.<file>``), so a table can be traced to its bytes, and with the data's identity
(``data.device``: the devices, ``data.identity``: one sha256 of what was read;
:mod:`irene.data.provenance`). The device comes from the content: CSVs whose sha256 are a
published device's are that device whatever ``data.name`` says; other data are the device
``data.name`` names, unless that is a published device's name (then ``unknown``).

Several data sets as one: ``data.devices=[device_1,device_2]`` (each entry a device name, a
trees file or a folder of the four CSVs, each read by the rules above). Their trees are
written to one trees file under ``outputs/cache/`` (each line with its device block: a tree's
key is its device, model and shape), which is then read like a device's import cache. The run
is tagged ``data.device`` (every device, ``device_1+device_2``) and ``data.identity`` (one
sha256 over the parts' own), each part's files under ``data.<device>.*``. Trees of two
static-feature conventions are refused in one line (:func:`irene.data.provenance.check_one_convention`),
in one trees file as across the entries.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from irene.data.forest import Forest, build_forest, save_forest
from irene.data.forest import load_forest as load_forest_arrays
from irene.data.io import atomic_write_text
from irene.data.provenance import (
    DataIdentity,
    check_one_convention,
    combined_sha256,
    csv_block,
    device_ids,
    stamp,
)
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
from irene.errors import InputError, SettingsError
from irene.measure.leakage import check_no_leaked_target
from pipelines.paths import datasets_dir, log, outputs_dir
from pipelines.tracking import Tracker

CACHE_VERSION = 2  # bump when the import's output changes


def _import_cache_path(digests: dict[str, str], models: list[str] | None, device: str) -> Path:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{models}|{device}".encode())
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
    if data_devices(cfg):
        cache = _combined_cache(cfg, tracker)
    elif cfg.data.trees:
        return _read_trees_file(cfg, tracker, require_energy), Path(cfg.data.trees)
    else:
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
    if cfg.data.trees and not data_devices(cfg):
        trees = _read_trees_file(cfg, tracker, require_energy=True)
        return DataSet(build_forest(trees), Path(cfg.data.trees), trees)
    cache = _combined_cache(cfg, tracker) if data_devices(cfg) else _device_cache(cfg, tracker)
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
    digest = record_input(tracker, "data", path, source="data.trees")
    trees = read_identified(trees, path, digest, cfg.data.name, tracker)
    return trees if models is None else select_models(trees, models, path)


def read_identified(trees: list[Tree], path: Path, digest: str, declared: str | None,
                    tracker: Tracker | None = None, prefix: str = "data") -> list[Tree]:
    """``trees`` read from ``path`` (sha256 ``digest``), each with its ``device`` block
    (:func:`irene.data.provenance.stamp`), the run tagged with their identity. A file whose
    lines are of two static-feature conventions is refused (``prefix``: the setting named)."""
    trees = stamp(trees, path=path, digest=digest, declared=declared)
    check_one_convention({str(path): trees}, f"{'data.trees' if prefix == 'data' else prefix}={path}")
    identity = DataIdentity(device_ids(trees), digest)
    _warn_label(declared, identity, path)
    if tracker is not None:
        tracker.set_tags(identity.tags(prefix))
    return trees


def _warn_label(declared: str | None, identity: DataIdentity, where: Path) -> None:
    """A warning where a published device's files are read under another name."""
    if declared and identity.published and identity.label != declared:
        log.warning("data.name=%s, but %s is %s by its content: the run is tagged data.device=%s",
                    declared, where, identity.label, identity.label)


def data_identity(cfg: DictConfig) -> DataIdentity:
    """The identity of the configured data without importing it: a trees file's devices and
    sha256, a CSV folder's device (by the files' sha256), else ``data.name`` itself (the
    device whose runs are meant; they are selected by their own, content-derived tags)."""
    data = cfg.data
    if data_devices(cfg):
        parts = [data_identity(part) for part in _part_cfgs(cfg)]
        return _combined_identity(parts)
    if data.trees:
        path = Path(data.trees)
        trees = read_trees(path, max_mb=data.max_file_mb)  # validated: ids name folders
        digest = sha256_of(path)
        return DataIdentity(device_ids(stamp(trees, path=path, digest=digest,
                                             declared=data.name)), digest)
    if data.path:
        location = locate_device(data.path, data.name, datasets_dir=datasets_dir(),
                                 download=False, max_mb=data.max_file_mb)
        return DataIdentity((csv_block(location.sha256, data.name)["id"],),
                            combined_sha256(location.sha256))
    return DataIdentity((str(data.name),), "")


def _device_cache(cfg: DictConfig, tracker: Tracker) -> Path:
    """The import cache of the configured device (imported now if it is not there yet)."""
    data = cfg.data
    location = locate_device(data.path, data.name, datasets_dir=datasets_dir(),
                             download=data.download, max_mb=data.max_file_mb)
    log.info("data of %s: %s (found through %s)", data.name, location.folder, location.source)
    identity = DataIdentity((csv_block(location.sha256, data.name)["id"],),
                            combined_sha256(location.sha256))
    _warn_label(data.name, identity, location.folder)
    tracker.set_tags({"data.location": str(location.folder.absolute()), "data.source": location.source,
              **{f"data.sha256.{name}": digest for name, digest in location.sha256.items()},
              **identity.tags()})
    models = wanted_models(cfg)
    models = list(PAPER_MODELS) if models is None else models
    cache = _import_cache_path(location.sha256, models, identity.label)
    if cache.exists():
        log.info("reading trees of %s from cache %s", location.folder, cache)
    else:
        log.info("importing the published CSVs of %s (models: %s)", location.folder, models)
        write_trees(cache, import_device(location.folder, models, max_mb=data.max_file_mb,
                                         device=data.name))
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


# ------------------------------------------------------------------ several devices as one
def data_devices(cfg: DictConfig) -> list[str]:
    """``data.devices`` as a list (empty when not set: one device, ``data.name``)."""
    devices = OmegaConf.select(cfg, "data.devices", default=None)
    return [] if devices is None else [str(d) for d in devices]


def _is_trees_file(entry: str) -> bool:
    path = Path(entry)
    return path.suffix == ".jsonl" or path.is_file()


def _part_cfgs(cfg: DictConfig) -> list[DictConfig]:
    """One config per entry of ``data.devices``: a trees file as ``data.trees``, a folder as
    ``data.path`` (its name the declared device), else a device name as ``data.name``."""
    devices = data_devices(cfg)
    repeated = sorted({d for d in devices if devices.count(d) > 1})
    if repeated:
        raise SettingsError(f"data.devices={devices}: names {repeated} more than once")
    parts = []
    for entry in devices:
        part = cfg.copy()
        with open_dict(part):
            part.data.devices = None
            part.data.name, part.data.path, part.data.trees = entry, None, None
            if _is_trees_file(entry):
                part.data.name, part.data.trees = "unknown", entry  # its lines say their device
            elif Path(entry).is_dir():
                part.data.name, part.data.path = Path(entry).resolve().name, entry
        parts.append(part)
    return parts


def _combined_identity(parts: list[DataIdentity]) -> DataIdentity:
    """The identity of several parts: every device, one sha256 over the parts' own (empty
    when a part's is not known without importing it)."""
    devices = tuple(sorted({d for part in parts for d in part.devices}))
    if any(not part.sha256 for part in parts):
        return DataIdentity(devices, "")
    return DataIdentity(devices, combined_sha256({p.label: p.sha256 for p in parts}))


class _Tags:
    """A tracker that keeps the tags a part's loader sets (the stage's run gets them renamed)."""

    def __init__(self) -> None:
        self.tags: dict[str, str] = {}

    def set_tags(self, tags) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})


def _combined_cache(cfg: DictConfig, tracker: Tracker) -> Path:
    """The trees of every entry of ``data.devices`` in one trees file under
    ``outputs/cache/`` (written once for these parts' bytes), the run tagged with them."""
    parts, identities, tags = {}, [], {}
    for part in _part_cfgs(cfg):
        collected = _Tags()
        if part.data.trees:
            trees = _read_trees_file(part, collected, require_energy=False)
            where = str(Path(part.data.trees))
        else:
            cache = _device_cache(part, collected)
            trees = read_cache(cache, require_energy=False, max_mb=part.data.max_file_mb)
            where = collected.tags["data.location"]
        identity = DataIdentity(tuple(collected.tags["data.device"].split("+")),
                                collected.tags["data.identity"])
        for other, seen in zip(parts, identities, strict=True):
            shared = sorted(set(identity.devices) & set(seen.devices))
            if shared:
                raise InputError(f"data.devices: {other} and {where} both hold device "
                                 f"{shared[0]}'s trees; name each device once")
        parts[where], identities = trees, [*identities, identity]
        label = re.sub(r"[^\w.\-/ ]", "_", identity.label)  # an MLflow key: no '+'
        tags.update({f"data.{label}.{key.removeprefix('data.')}": value
                     for key, value in collected.tags.items()
                     if key not in ("data.device", "data.identity")})
    check_one_convention(parts, f"data.devices={data_devices(cfg)}")
    identity = _combined_identity(identities)
    tracker.set_tags({**tags, **identity.tags()})
    models = wanted_models(cfg)
    key = hashlib.sha256(f"v{CACHE_VERSION}|devices|{models}|{identity.sha256}".encode())
    cache = outputs_dir() / "cache" / f"trees-{identity.label}-{key.hexdigest()[:16]}.jsonl"
    if cache.exists():
        log.info("reading the trees of %s from cache %s", identity.label, cache)
    else:
        log.info("writing the trees of %s into one file: %s", identity.label, cache)
        write_trees(cache, [tree for trees in parts.values() for tree in trees])
    return cache
