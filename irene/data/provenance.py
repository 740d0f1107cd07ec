"""Where a tree line was measured: its ``device`` block, and a data set's identity.

A trees line may carry ``device``, what is known about the machine it was measured on::

    "device": {"id": "device_1",
               "gpu": {"name": null, "memory_mib": null, "driver": null, "cuda": null,
                       "power_limit_w": null},
               "meter": null, "convention": "irene",
               "source": {"kind": "published", "sha256": {"model_level_features.csv": "6113…", …}}}

* ``id``: a published device's name when the line comes from its published files (their
  sha256 match ``published.json``), else the name the user gave, else ``"unknown"``;
* ``gpu``, ``meter``: hardware facts and the energy meter, ``null`` where nothing says
  (the published CSVs name no GPU and no meter: never invented);
* ``convention``: the static-feature convention (``irene`` for the published devices,
  ``physical`` for this project's default measurements), ``null`` when not known;
* ``source``: ``kind`` (``published``, ``measured``, ``declared`` or ``unknown``) and the
  sha256 of the files the line came from (``sha256``: file name -> digest), or the measure
  run (``run``).

Files without the field (the public IrEne format) stay valid; their lines get a block on read
(:func:`stamp`). A data set's identity (:class:`DataIdentity`) is its devices plus the sha256 of
what was read; stages tag their runs with it and ``report`` selects runs by it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"
GPU_FIELDS = ("name", "memory_mib", "driver", "cuda", "power_limit_w")
CONVENTIONS = ("irene", "physical")
SOURCE_KINDS = ("published", "measured", "declared", UNKNOWN)
DEVICE_FIELDS = ("id", "gpu", "meter", "convention", "source")
SIDECAR = "device.json"  # next to a trees file: the device of that file's bytes (by sha256)
_NUMERIC_GPU = ("memory_mib", "power_limit_w")
_ID = re.compile(r"[A-Za-z0-9_.+-]+")  # a device names a folder: outputs/tables/<id>/


def published_devices() -> tuple[str, ...]:
    """The names of the devices whose published files ``published.json`` knows."""
    from irene.data.locate import load_sources

    return tuple(load_sources()["devices"])


def match_published(digests: Mapping[str, str]) -> str | None:
    """The published device whose files have exactly these sha256 (file name -> digest)."""
    from irene.data.locate import load_sources

    for device, checksums in load_sources()["devices"].items():
        if checksums and set(checksums) == set(digests) and all(
                checksums[name] == digest for name, digest in digests.items()):
            return device
    return None


def declared_id(name: str | None) -> str:
    """The device a user's name gives to data whose content matches no published device: the
    name itself, unless it is empty or a published device's (a published name is earned by
    the content alone, so ``data.name``'s default ``device_1`` never labels other bytes)."""
    if not name or name in published_devices() or name == UNKNOWN:
        return UNKNOWN
    return str(name)


def device_block(device_id: str, *, kind: str, sha256: Mapping[str, str] | None = None,
                 run: str | None = None, convention: str | None = None,
                 meter: str | None = None, gpu: Mapping[str, Any] | None = None) -> dict:
    """A ``device`` block: what is not given is ``null``."""
    source: dict[str, Any] = {"kind": kind}
    if sha256 is not None:
        source["sha256"] = dict(sorted(sha256.items()))
    if run is not None:
        source["run"] = run
    return {"id": device_id, "gpu": {f: (gpu or {}).get(f) for f in GPU_FIELDS},
            "meter": meter, "convention": convention, "source": source}


def csv_block(digests: Mapping[str, str], declared: str | None = None) -> dict:
    """The block of lines imported from CSVs of these sha256: a published device's files say
    their device and convention (``irene``) and nothing about the hardware; other files get
    the user's name (:func:`declared_id`) and nothing else."""
    device = match_published(digests)
    if device is not None:
        return device_block(device, kind="published", sha256=digests, convention="irene")
    name = declared_id(declared)
    return device_block(name, kind=UNKNOWN if name == UNKNOWN else "declared", sha256=digests)


def device_problem(block: Any) -> str | None:
    """Why ``block`` cannot be a line's ``device`` (None when it can), naming the sub-field."""
    if not isinstance(block, dict):
        return f"must be a JSON object, got {type(block).__name__}"
    unknown = sorted(set(block) - set(DEVICE_FIELDS))
    if unknown:
        return f"unknown key {unknown[0]!r} (a device has {', '.join(DEVICE_FIELDS)})"
    if not isinstance(block.get("id"), str) or not block["id"].strip():
        return f"'id' must be a non-empty string, got {block.get('id')!r}"
    if not _ID.fullmatch(block["id"]) or block["id"] in (".", ".."):  # tables/<id>/
        return (f"'id' must be a folder name (letters, digits, '_', '.', '+', '-'), "
                f"got {block['id']!r}")
    gpu = block.get("gpu")
    if gpu is not None:
        if not isinstance(gpu, dict):
            return f"'gpu' must be a JSON object or null, got {type(gpu).__name__}"
        for key, value in gpu.items():
            if key not in GPU_FIELDS:
                return f"unknown key 'gpu.{key}' (a gpu has {', '.join(GPU_FIELDS)})"
            if value is None:
                continue
            if key in _NUMERIC_GPU:
                if isinstance(value, bool) or not isinstance(value, int | float) or not (
                        math.isfinite(value) and value > 0):
                    return f"'gpu.{key}' must be a positive number or null, got {value!r}"
            elif not isinstance(value, str) or not value:
                return f"'gpu.{key}' must be a non-empty string or null, got {value!r}"
    meter = block.get("meter")
    if meter is not None and (not isinstance(meter, str) or not meter):
        return f"'meter' must be a non-empty string or null, got {meter!r}"
    convention = block.get("convention")
    if convention is not None and convention not in CONVENTIONS:
        return f"'convention' must be one of {list(CONVENTIONS)} or null, got {convention!r}"
    source = block.get("source")
    if source is not None:
        if not isinstance(source, dict):
            return f"'source' must be a JSON object or null, got {type(source).__name__}"
        if source.get("kind") not in SOURCE_KINDS:
            return f"'source.kind' must be one of {list(SOURCE_KINDS)}, got {source.get('kind')!r}"
        digests = source.get("sha256")
        if digests is not None and not (isinstance(digests, dict) and all(
                isinstance(v, str) and len(v) == 64 for v in digests.values())):
            return "'source.sha256' must map file names to sha256 hex digests"
    return None


def sidecar_block(path: Path, digest: str) -> dict | None:
    """The device a ``device.json`` next to the trees file ``path`` gives to its bytes (sha256
    ``digest``); None without a sidecar or when it describes other bytes (an edited file is
    no longer what was measured). The sidecar holds
    ``{"trees_sha256": {"<file name>": "<sha256>"}, "device": <block>}``; the shipped H200
    trees have one (``datasets/h200/device.json``), so the measured file stays as it was."""
    sidecar = Path(path).with_name(SIDECAR)
    if not sidecar.is_file():
        return None
    from irene.errors import InputError

    try:
        content = json.loads(sidecar.read_text())
        described = content["trees_sha256"].get(Path(path).name)
        block = content["device"]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{sidecar}: not a device sidecar ({error}); expected "
                         '{"trees_sha256": {"<file>": "<sha256>"}, "device": {...}}') from None
    if described != digest:
        return None
    problem = device_problem(block)
    if problem:
        raise InputError(f"{sidecar}: field 'device': {problem}")
    return block


def measurement_block(measurement: Mapping[str, Any], declared: str | None) -> dict:
    """The device of a line measured by ``stage=measure`` from its ``measurement`` block: the
    meter it names; the hardware stays unknown unless the block says it."""
    meter = measurement.get("ground_truth_meter")
    if not isinstance(meter, str) or meter in ("", "none"):
        meter = measurement.get("meter")
    known = isinstance(meter, str) and meter not in ("", "none")
    return device_block(declared_id(declared), kind="measured", meter=meter if known else None)


def measured_block(environment: Mapping[str, str], *, declared: str | None, convention: str,
                   run: str | None, memory_mib: float | None = None,
                   power_limit_w: float | None = None) -> dict:
    """The block ``stage=measure`` writes: the hardware facts its environment reports
    (:func:`irene.measure.runner.environment`: GPU name, driver, CUDA; a fact reported as
    ``unknown`` stays null), the meter, the convention and the run."""

    def fact(*keys: str) -> str | None:
        for key in keys:
            value = environment.get(key)
            if isinstance(value, str) and value not in ("", "unknown", "None"):
                return value
        return None

    gpu = {"name": fact("gpu_name"), "memory_mib": memory_mib, "driver": fact("driver_version"),
           "cuda": fact("cuda_runtime", "cuda_driver_version") if fact("gpu_name") else None,
           "power_limit_w": power_limit_w}
    meter = fact("meter")
    return device_block(declared_id(declared), kind="measured", run=run, convention=convention,
                        meter=None if meter == "none" else meter, gpu=gpu)


def stamp(trees: Iterable[dict], *, path: Path | None = None, digest: str | None = None,
          declared: str | None = None) -> list[dict]:
    """The trees, each with a ``device`` block: its own, else the sidecar's for these bytes,
    else one derived from its ``measurement`` block, else the user's name (or unknown) with the
    file's sha256 as its source. Trees are changed in place (and returned)."""
    trees = list(trees)
    if all("device" in tree for tree in trees):
        return trees
    side = sidecar_block(path, digest) if path is not None and digest is not None else None
    sha = {Path(path).name: digest} if path is not None and digest is not None else None
    name = declared_id(declared)
    plain = device_block(name, kind=UNKNOWN if name == UNKNOWN else "declared", sha256=sha)
    for tree in trees:
        if "device" in tree:
            continue
        if side is not None:
            tree["device"] = side
        elif isinstance(tree.get("measurement"), dict):
            tree["device"] = measurement_block(tree["measurement"], declared)
        else:
            tree["device"] = plain
    return trees


def device_ids(trees: Iterable[dict]) -> tuple[str, ...]:
    """The distinct device ids of ``trees``, sorted (a line without a block: ``unknown``)."""
    ids = {(tree.get("device") or {}).get("id") or UNKNOWN for tree in trees}
    return tuple(sorted(ids))


def check_same_device(gold: Iterable[dict], predicted: Iterable[dict], predictions: str,
                      measured: str) -> None:
    """Refuse, in one line, predictions made for one device's trees scored against another
    device's measurements (node ids are model/shape/scope only, so they would align). A side
    whose device is unknown is not refused: nothing says it differs.

    Raises:
        InputError: naming the predictions file, both devices and what to give instead.
    """
    from irene.errors import InputError

    gold_ids = set(device_ids(gold)) - {UNKNOWN}
    predicted_ids = set(device_ids(predicted)) - {UNKNOWN}
    if gold_ids and predicted_ids and gold_ids != predicted_ids:
        wanted = "+".join(sorted(predicted_ids))
        raise InputError(
            f"predictions={predictions}: predicted for {wanted}'s trees, but the measurements, "
            f"{measured}, are {'+'.join(sorted(gold_ids))}'s: scoring one device against "
            f"another's measurements is refused; give trees=<the measured trees of {wanted}> "
            "(or its data=/data.path=)")


@dataclass(frozen=True)
class DataIdentity:
    """What a run read: its devices and the sha256 of its bytes (one digest: a file's own, or
    that of the sorted ``name digest`` lines of several files)."""

    devices: tuple[str, ...]
    sha256: str

    @property
    def label(self) -> str:
        """The devices as one name (``device_1``, ``device_1+device_2``)."""
        return "+".join(self.devices) or UNKNOWN

    @property
    def published(self) -> bool:
        """Whether every device is a published one (its name earned by content)."""
        names = published_devices()
        return bool(self.devices) and all(d in names for d in self.devices)

    def tags(self, prefix: str = "data") -> dict[str, str]:
        return {f"{prefix}.device": self.label, f"{prefix}.identity": self.sha256}


def combined_sha256(digests: Mapping[str, str]) -> str:
    """One digest for several files: sha256 of their sorted ``name digest`` lines."""
    text = "".join(f"{name} {digests[name]}\n" for name in sorted(digests))
    return hashlib.sha256(text.encode()).hexdigest()


def conventions(parts: Mapping[str, Iterable[dict]]) -> dict[str, list[str]]:
    """Static-feature convention -> the devices that have it, each as ``id (where)``, over
    ``parts`` (where the trees were read: a file or a device's folder -> those trees); lines
    whose convention is not known (``null``) are not counted."""
    found: dict[str, list[str]] = {}
    for where, trees in parts.items():
        for tree in trees:
            block = tree.get("device") if isinstance(tree.get("device"), dict) else {}
            convention = block.get("convention")
            if convention is None:
                continue
            entry = f"{block.get('id') or UNKNOWN} ({where})"
            entries = found.setdefault(str(convention), [])
            if entry not in entries:
                entries.append(entry)
    return dict(sorted(found.items()))


APART = ("or use them apart (stage=transfer source=... target=... fits the source alone and "
         "learns its correction from the target's trees)")


def check_one_convention(parts: Mapping[str, Iterable[dict]], what: str,
                         otherwise: str = APART) -> None:
    """Refuse, in one line, trees of two static-feature conventions combined into one data set
    (:func:`conventions`): ``flops`` and ``mem_bytes`` are computed by different formulas in
    ``irene`` and ``physical``, and the project converts between them only by tracing a
    model again (:func:`irene.transfer.retrace`), never by a formula. A line whose convention
    is unknown is not refused: nothing says it differs.

    Args:
        parts: where the trees were read (a file, a device's folder) -> those trees.
        what: the setting that combined them (``data.devices=[...]``, ``data.trees=<file>``).
        otherwise: the message's last advice (the other way than re-tracing).

    Raises:
        InputError: naming every device with its file or folder and both conventions.
    """
    from irene.errors import InputError

    found = conventions({where: list(trees) for where, trees in parts.items()})
    if len(found) < 2:
        return
    sides = "; ".join(f"{convention}: {', '.join(entries)}"
                      for convention, entries in found.items())
    first, second = list(found)[:2]
    raise InputError(
        f"{what}: trees of two static-feature conventions in one data set ({sides}); their "
        "flops and mem_bytes follow different formulas, so one predictor cannot be fitted on "
        f"both. Re-trace one side in the other's convention (irene.transfer.retrace(trees, "
        f"convention={first!r} or {second!r}): the models traced again, measured energies kept) "
        f"{otherwise}")
