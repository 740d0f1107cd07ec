"""Stages as plug-ins: what a stage declares, and what the pipeline gives it.

A stage is one module in ``pipelines/stages/`` that defines ``STAGE``, a :class:`Stage`:

* ``name``: what ``stage=<name>`` picks (the module's name);
* ``settings``: a dataclass of the stage's own keys and their defaults. Its fields are
  top-level keys of the config (``model=``, ``seeds=``), typed and checked like every other
  key; a key several stages read (``model``, ``batch_size``) is declared by each of them,
  with the same type and default (:func:`stage_fields` refuses anything else);
* ``not_hashed``: its keys that do not change its result (left out of ``resume``'s identity);
* ``run_name``: how its MLflow runs are named (default ``<stage> <data set>``);
* ``read_settings``: only where a typed copy of its keys does not do (``measure`` resolves
  the meter config it selects);
* ``run(ctx, settings)``: the stage itself. It receives its own settings as a dataclass and a
  :class:`Context` for what every stage shares (the data set, the predictor, the run folder,
  the MLflow run); it never sees the whole config.

:func:`stages` finds the modules by listing the folder, so a new stage is one file. Every
stage module is imported at start-up (the schema needs its settings), so a stage module
imports only what is light at its top and the heavy libraries (pandas, torch) inside its
functions.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from irene.errors import SettingsError

STAGES_PACKAGE = "pipelines.stages"


@dataclass(frozen=True)
class Stage:
    """A stage's declaration (see the module docstring)."""

    name: str
    settings: type
    run: Callable[[Context, Any], Any]
    not_hashed: tuple[str, ...] = ()
    run_name: Callable[[Context, Any], str] | None = None
    read_settings: Callable[[DictConfig], Any] | None = None


@functools.cache
def stages() -> dict[str, Stage]:
    """Every stage of ``pipelines/stages/``, by name."""
    package = importlib.import_module(STAGES_PACKAGE)
    found: dict[str, Stage] = {}
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if module.name.startswith("_"):
            continue
        stage = getattr(importlib.import_module(f"{STAGES_PACKAGE}.{module.name}"), "STAGE", None)
        if not isinstance(stage, Stage):
            raise TypeError(f"{STAGES_PACKAGE}.{module.name} defines no STAGE = Stage(...)")
        if stage.name != module.name:
            raise TypeError(f"{STAGES_PACKAGE}.{module.name}: STAGE.name is {stage.name!r}, "
                            "not the module's name")
        unknown = set(stage.not_hashed) - {f.name for f in dataclasses.fields(stage.settings)}
        if unknown:
            raise TypeError(f"stage {stage.name}: not_hashed names keys it does not have: "
                            f"{sorted(unknown)}")
        found[stage.name] = stage
    return found


def stage_names() -> tuple[str, ...]:
    return tuple(stages())


def stage_fields(shared: type) -> list[tuple[str, Any, dataclasses.Field]]:
    """The fields the stages add to the config's ``shared`` schema: each key once, in stage
    order; a key declared by two stages must have the same type and default in both."""
    taken = {f.name for f in dataclasses.fields(shared)}
    seen: dict[str, tuple[str, Any, dataclasses.Field]] = {}
    for stage in stages().values():
        hints = typing.get_type_hints(stage.settings)  # the types, not their names
        for f in dataclasses.fields(stage.settings):
            if f.name in taken:
                raise TypeError(f"stage {stage.name}: {f.name!r} is a key every stage shares")
            if f.name in seen:
                owner, kind, first = seen[f.name]
                if (kind, _default(first)) != (hints[f.name], _default(f)):
                    raise TypeError(f"stages {owner} and {stage.name} declare {f.name!r} "
                                    "differently (type or default)")
                continue
            seen[f.name] = (stage.name, hints[f.name], f)
    return [(name, kind, _copy_field(f)) for name, (_, kind, f) in seen.items()]


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return repr(f.default)


def _copy_field(f: dataclasses.Field) -> dataclasses.Field:
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory)
    return dataclasses.field(default=f.default)


def settings_of(cfg: DictConfig, stage: Stage) -> Any:
    """The stage's own keys of ``cfg`` as an instance of its settings dataclass."""
    if stage.read_settings is not None:
        return stage.read_settings(cfg)
    own = {f.name: cfg.get(f.name) for f in dataclasses.fields(stage.settings)}
    node = OmegaConf.merge(OmegaConf.structured(stage.settings), own)
    return OmegaConf.to_object(node)


def hashed_keys(cfg: DictConfig, stage_name: str) -> list[str]:
    """The keys of ``cfg`` that determine a run's result: the shared ones and the stage's own
    (a stage that is not a plug-in, e.g. a test's probe: every key)."""
    from pipelines.config import SHARED_NOT_HASHED, Config

    stage = stages().get(stage_name)
    if stage is None:
        return [k for k in cfg if k not in SHARED_NOT_HASHED]
    own = [f.name for f in dataclasses.fields(stage.settings) if f.name not in stage.not_hashed]
    shared = [f.name for f in dataclasses.fields(Config) if f.name not in SHARED_NOT_HASHED]
    return [*shared, *own]


def run_stage(name: str, cfg: DictConfig) -> Any:
    """Run the stage ``name`` on the composed ``cfg``: its settings checked, the process set
    up (logging, threads), then ``STAGE.run(ctx, settings)``."""
    from pipelines.paths import setup

    stage = stages().get(name)
    if stage is None:
        raise SettingsError(f"stage={name!r}: choose from {list(stages())}")
    setup(cfg)
    settings = settings_of(cfg, stage)
    return stage.run(Context(cfg, stage, settings), settings)


def foreign_settings(overrides: list[str], name: str) -> dict[str, list[str]]:
    """The command-line settings (``key=value``) that only other stages read, each with the
    stages that do: given with ``stage=<name>`` they change nothing (``stage=crossvalidate
    draws=3``)."""
    stage = stages().get(name)
    if stage is None:
        return {}
    readers: dict[str, list[str]] = {}
    for other in stages().values():
        for f in dataclasses.fields(other.settings):
            readers.setdefault(f.name, []).append(other.name)
    found = {}
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0].split(".")[0]
        if key in readers and name not in readers[key]:
            found[override] = readers[key]
    return found


class Context:
    """What the pipeline gives every stage besides its own settings: the data set, the
    predictor, the run folder and the MLflow run. Stages read the config only through it."""

    def __init__(self, cfg: DictConfig, stage: Stage, settings: Any = None) -> None:
        self._cfg = cfg
        self.stage = stage
        self.settings = settings  # the stage's own (what its run name may read)

    # ------------------------------------------------------------------ shared settings
    @property
    def data_name(self) -> str:
        """``data.name``, or the entries of ``data.devices`` joined by ``+``."""
        from pipelines.config import data_label

        return data_label(self._cfg.data)

    @property
    def data_models(self) -> list[str]:
        return list(self._cfg.data.models or [])

    @property
    def features_name(self) -> str:
        return str(self._cfg.features.name)

    @property
    def tracking_enabled(self) -> bool:
        return bool(self._cfg.tracking.enabled)

    @property
    def show_progress(self) -> bool:
        return bool(self._cfg.get("show_progress", True))

    @functools.cached_property
    def run_dir(self) -> Path:
        """The folder this run writes into (``run_dir=``, else Hydra's run folder)."""
        from pipelines.paths import run_dir

        return run_dir(self._cfg)

    # ------------------------------------------------------------------ the MLflow run
    @contextmanager
    def tracked_run(self, params: Mapping[str, Any] | None = None, *,
                    background: bool = True) -> Iterator[Any]:
        """The stage's MLflow run (see :func:`pipelines.tracking.tracked_run`), named by the
        stage's ``run_name``."""
        from pipelines.tracking import tracked_run

        name = (self.stage.run_name(self, self.settings) if self.stage.run_name is not None
                else f"{self.stage.name} {self.data_name}")
        with tracked_run(self._cfg, self.stage.name, params, name=name,
                         background=background) as tracker:
            yield tracker

    def finished_run(self) -> Any:
        """The latest FINISHED run of this stage, config and code (``resume=true``), or None."""
        from pipelines.run_identity import finished_run

        return finished_run(self._cfg, self.stage.name)

    # ------------------------------------------------------------------ data and predictor
    def load_trees(self, tracker: Any, *, require_energy: bool = True):
        """The data set's trees and the file they came from (:func:`pipelines.data.load_trees`)."""
        from pipelines.data import load_trees

        return load_trees(self._cfg, tracker, require_energy=require_energy)

    def load_forest(self, tracker: Any):
        from pipelines.data import load_forest

        return load_forest(self._cfg, tracker)

    def data_identity(self):
        """The configured data's devices and sha256 (:func:`pipelines.data.data_identity`)."""
        from pipelines.data import data_identity

        return data_identity(self._cfg)

    def for_device(self, name: str) -> Context:
        """The same context with ``data`` set to the published device ``name``."""
        cfg = self._cfg.copy()
        with open_dict(cfg):
            cfg.data.name, cfg.data.path, cfg.data.trees = name, None, None
            cfg.data.devices = None
        return Context(cfg, self.stage, self.settings)

    def build_predictor(self, **overrides: Any):
        from pipelines.config import build_predictor

        return build_predictor(self._cfg, **overrides)

    @property
    def has_predictor(self) -> bool:
        return OmegaConf.select(self._cfg, "predictor._target_", default=None) is not None

    @property
    def predictor_name(self) -> str:
        from pipelines.config import predictor_class

        return predictor_class(self._cfg).name

    @property
    def predictor_seed(self) -> int:
        return int(self._cfg.predictor.get("seed", 0) or 0)

    def run_params(self) -> dict[str, Any]:
        """The ablation axes and the predictor's hyperparameters (:func:`pipelines.config.run_params`)."""
        from pipelines.config import run_params

        return run_params(self._cfg)

    def trained_predictor(self, into: Path, tracker: Any, *, model_dir: str | None,
                          model_run: str | None, traced: bool, device: str | None = None):
        """A trained predictor and its folder (:func:`pipelines.models.load_predictor`)."""
        from pipelines.models import load_predictor

        return load_predictor(self._cfg, into, tracker, model_dir=model_dir,
                              model_run=model_run, traced=traced, device=device)

    # ------------------------------------------------------------------ sweeps and report
    def experiment_id(self) -> str:
        """The MLflow experiment of the runs (created if it is not there)."""
        from pipelines.tracking import ensure_experiment

        return ensure_experiment(self._cfg)

    @property
    def sweep_name(self) -> str | None:
        value = self._cfg.get("sweep_name")
        return None if value is None else str(value)


# ------------------------------------------------------------------ settings several stages share
@dataclass
class ModelInput:
    """A model to trace and its input shape (``measure``, ``predict``, ``whatif``)."""

    model: str | None = None  # registry name (e.g. bert-base-uncased) or a config.json
    batch_size: int = 8  # input batch size
    seq_len: int = 128  # input sequence length


@dataclass
class TrainedPredictor:
    """Where a trained predictor comes from, and how it meets what it was not trained on
    (``predict``, ``whatif``)."""

    model_dir: str | None = None  # train: output (default: run folder); predict/whatif: trained model
    model_run: str | None = None  # MLflow run id of stage=train (its "model" artifact)
    device: str | None = None  # a device id: the newest predictor stage=transfer kept for it
    unseen_op: str | None = None  # unseen primitive: null (predictor's) | error | <type>
    trace_convention: str = "irene"  # tracer's convention: irene (published data) | physical

    def convention_for(self, predictor: Any) -> str:
        """The convention to trace in: a device predictor's own (that of its target's
        measured trees), else ``trace_convention``."""
        own = getattr(predictor, "convention", None) if getattr(predictor, "name", "") == "device" else None
        return str(own or self.trace_convention or "irene")


def predictor_run_name(short: str) -> Callable[[Context, Any], str]:
    """A run name for a stage that fits the configured predictor:
    ``<short> irene both/end2end/close_to_one device_1``."""

    def name(ctx: Context, settings: Any) -> str:
        if not ctx.has_predictor:
            return f"{ctx.stage.name} {ctx.data_name}"
        params = ctx.run_params()
        predictor = ctx.predictor_name
        axes = (f"{params['features']}/{params['strategy']}/{params['weighting']}"
                if predictor == "irene" else params["features"])
        return f"{short} {predictor} {axes} {ctx.data_name}"

    return name
