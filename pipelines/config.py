"""The typed config: dataclass schemas in Hydra's ConfigStore, and the objects built from it.

``conf/config.yaml`` puts ``schema`` first in its defaults list, so every option file and every
command-line override is checked against these types: a typo in a key fails at start-up.

Predictors have no hand-written schema: :func:`estimator_schema` derives one from each
predictor's constructor (names, types, defaults), registered as ``predictor/<name>_schema``
and used by ``conf/predictor/<name>.yaml``, which adds ``_target_`` and the interpolations of
the other groups (``feature_sets: ${features.sets}``). A default therefore lives in exactly
one place, the constructor's signature; :func:`build_predictor` instantiates it.
"""

from __future__ import annotations

import inspect
import re
import secrets
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, make_dataclass
from pathlib import Path
from typing import Any  # noqa: UP035 - OmegaConf needs typing.Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from irene.data.forest import ALL_FEATURE_SETS
from irene.data.integrity import DEFAULT_MAX_FILE_MB
from irene.errors import SettingsError
from irene.measure.settings import MeterSettings, ProtocolSettings


@dataclass
class DataConfig:
    name: str = "device_1"  # device name; also the download source in datasets/published.json
    path: str | None = None  # folder of the four CSVs (wins over $IRENE_DATA_DIR, datasets/<name>)
    trees: str | None = None  # a trees jsonl to use instead of the CSVs
    models: list[str] | None = None  # these models (null: the CSVs' paper six, a trees file's all)
    # several data sets as one (device names, trees files or CSV folders; name/path/trees unused)
    devices: list[str] | None = None
    download: bool = True  # fetch the CSVs from the public repository when not found
    # the largest CSV or trees file read, in MB (2**20 bytes); checked before reading
    max_file_mb: float = DEFAULT_MAX_FILE_MB


@dataclass
class FeaturesConfig:
    name: str = "both"  # option name, logged as a param
    sets: list[str] = field(default_factory=lambda: list(ALL_FEATURE_SETS))


@dataclass
class StrategyConfig:
    name: str = "end2end"  # end2end | stepwise | unstructured | none (see irene/predictors/irene.py)


@dataclass
class WeightingConfig:
    name: str = "close_to_one"  # exact_one | close_to_one | free


@dataclass
class TrackingConfig:
    enabled: bool = True  # log to MLflow
    uri: str | None = None  # default: sqlite:///<outputs>/mlflow.db ($MLFLOW_TRACKING_URI wins)
    experiment: str = "irene"  # MLflow experiment name
    artifact_root: str | None = None  # default: <outputs>/mlartifacts
    # log from a second process while the stage computes (single runs that have not imported
    # MLflow yet; see pipelines.tracking): false logs from the stage's own process
    background: bool = True


@dataclass
class MeasureConfig(ProtocolSettings, MeterSettings):
    """``stage=measure``: the protocol and meter fields (and their defaults) are inherited from
    :class:`irene.measure.settings.ProtocolSettings` and :class:`~irene.measure.settings.MeterSettings`;
    the stage's own fields follow. The block is instantiated (``OmegaConf.to_object``) into
    the settings the protocol and the meter factory take."""

    device: str = "auto"  # where the model runs: auto (CUDA when available, else CPU) | cpu | cuda | cuda:N
    attn_implementation: str = "eager"  # eager: MatMul/Softmax leaves | sdpa: one attention leaf
    convention: str = "physical"  # static features: physical | irene (the published mem_bytes formulas)
    measure: bool = True  # false: trace static features only (num_parameters, flops, mem_bytes)
    seed: int = 0  # seed of the random input token ids
    output: str = "${outputs:}/measured/trees.jsonl"  # the trees file a sweep appends to
    track: bool = True  # log the run to MLflow (pipelines.tracking.tracked_run)

    def validate(self, prefix: str = "measure.") -> MeasureConfig:
        """Every range of the block; a :class:`SettingsError` names the first bad field."""
        ProtocolSettings.validate(self, prefix)
        MeterSettings.validate(self, prefix)
        device = self.device.split(":")
        if not (self.device in ("auto", "cpu", "cuda") or (device[0] == "cuda" and len(device) == 2
                                                            and device[1].isdigit())):
            raise SettingsError(f"{prefix}device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if len(device) == 2 and int(device[1]) != self.gpu_index:
            raise SettingsError(f"{prefix}device: {self.device} is not the GPU the meter reads "
                                f"({prefix}gpu_index={self.gpu_index}): use device=cuda and gpu_index=N")
        if self.convention not in ("physical", "irene"):
            raise SettingsError(f"{prefix}convention: must be physical or irene, got {self.convention!r}")
        return self


@dataclass
class Config:
    """The keys every stage shares. Each stage adds its own (``pipelines/stages/<name>.py``,
    its ``STAGE.settings``): :func:`schema` builds the whole config's schema from both."""

    stage: str = "crossvalidate"  # a stage of pipelines/stages/ (train, predict, crossvalidate...)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    predictor: Any = None  # a predictor's hyperparameters + _target_ (schema from its signature)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep_name: str | None = None  # preset name, tagged on the runs of a sweep (report reads it)
    resume: bool = False  # skip a stage whose identical config already has a FINISHED run
    run_dir: str | None = None  # where the stage writes (default: Hydra's run folder)
    threads: int = 0  # threads of numpy's BLAS and torch (0: 1, and the libraries' default for measure)
    show_progress: bool = True  # progress bars


# shared keys that do not change a stage's result (sweep_name is hashed: resume works within
# a preset); a stage names its own in STAGE.not_hashed
SHARED_NOT_HASHED = ("stage", "tracking", "run_dir", "show_progress", "threads", "resume")


def schema() -> type:
    """The whole config's schema: :class:`Config` and every stage's own keys."""
    from pipelines.stage import stage_fields

    return make_dataclass("Config", stage_fields(Config), bases=(Config,))


# ------------------------------------------------------------------------- predictors
def estimator_schema(cls: type) -> type:
    """A dataclass with ``_target_`` and one typed field per constructor argument of ``cls``,
    with the constructor's default (tuples become lists)."""
    hints = typing.get_type_hints(cls.__init__)
    fields: list[tuple] = [("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))]
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        kind, default = hints.get(name, Any), parameter.default
        if default is inspect.Parameter.empty:
            fields.append((name, kind, field(default=MISSING)))
        elif isinstance(default, list | tuple):
            fields.append((name, kind, field(default_factory=lambda d=default: list(d))))
        else:
            fields.append((name, kind, field(default=default)))
    return make_dataclass(f"{cls.__name__}Schema", fields)


def predictor_class(cfg: DictConfig) -> type:
    from hydra.utils import get_class

    return get_class(str(cfg.predictor._target_))


def build_predictor(cfg: DictConfig, **overrides: Any):
    """The configured predictor, unfitted, its hyperparameters checked (a bad value fails
    here, before any data is read). ``overrides`` of hyperparameters the predictor does not
    have (e.g. ``show_progress`` of a predictor without a progress bar) are ignored."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    overrides = {k: v for k, v in overrides.items() if k in cfg.predictor}
    try:
        predictor = instantiate(cfg.predictor, _convert_="all", **overrides)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, SettingsError):
            raise cause from None
        raise SettingsError(f"predictor: {str(error).splitlines()[0]}") from error
    predictor.validate_params()
    return predictor


# ------------------------------------------------------------------------- settings
MAX_BATCH_SIZE = 65_536  # predict / whatif / measure: inputs per forward pass, at most
MAX_SEQ_LEN = 1_048_576  # tokens per input, at most (a model's own limit is checked when traced)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a device name is a folder name


def _settings_checks() -> dict[str, Any]:
    """Setting (dotted path) -> check: every number and choice a user can set outside the
    predictor (whose hyperparameters check themselves: ``Predictor.constraints``)."""
    from irene.predictors.base import Each, OneOf, Range
    from irene.predictors.irene import STRATEGIES, WEIGHTINGS
    from pipelines.stage import stage_names

    shape = {"batch_size": Range(int, 1, MAX_BATCH_SIZE), "seq_len": Range(int, 1, MAX_SEQ_LEN)}

    def device_name(value: Any) -> str | None:
        ok = isinstance(value, str) and _NAME.match(value) and value not in (".", "..")
        return None if ok else "must be a folder name (letters, digits, '_', '.', '+', '-')"

    def name_list(what: str, item: str) -> Callable[[Any], str | None]:
        """A check of a non-empty list of distinct non-empty strings, or null."""

        def check(value: Any) -> str | None:
            if value is None:
                return None
            if isinstance(value, str) or not isinstance(value, list) or not value:
                return f"must be a non-empty list of {what}, or null"
            if any(not isinstance(v, str) or not v for v in value):
                return f"every {item} must be a non-empty string"
            duplicates = sorted({v for v in value if value.count(v) > 1})
            return f"names {duplicates} more than once" if duplicates else None

        return check

    model_list = name_list("model names", "model name")
    device_list = name_list("device names, trees files or folders", "entry")

    def shapes(value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            return "must be a non-empty list of [batch_size, seq_len] pairs, or null"
        for pair in value:
            if not isinstance(pair, list) or len(pair) != 2:
                return f"every entry is [batch_size, seq_len], got {pair!r}"
            for key, number in zip(("batch_size", "seq_len"), pair, strict=True):
                problem = shape[key].check(number)
                if problem:
                    return f"{key} {number!r} {problem}"
        return None

    def optional(check):
        return lambda value: None if value is None else check.check(value)

    return {
        "stage": OneOf(stage_names()),
        "data.name": device_name,
        "data.models": model_list,
        "data.devices": device_list,
        "data.max_file_mb": Range(float, 0, None, low_open=True),
        "features.sets": Each(OneOf(ALL_FEATURE_SETS)),
        "strategy.name": OneOf(STRATEGIES),
        "weighting.name": OneOf((*WEIGHTINGS, "paper")),
        "tracking.experiment": lambda v: None if isinstance(v, str) and v.strip() else
        "must be a non-empty name",
        "batch_size": shape["batch_size"],
        "seq_len": shape["seq_len"],
        "shapes": shapes,
        "batch_sizes": optional(Each(shape["batch_size"])),
        "seq_lens": optional(Each(shape["seq_len"])),
        "threads": Range(int, 0, 4096),
        "cv_group": OneOf(("model", "device")),
        "cv_jobs": lambda v: None if v == -1 or (isinstance(v, int) and 1 <= v <= 4096) else
        "must be -1 (all cores) or a number of processes from 1 to 4096",
        "trace_convention": OneOf(("irene", "physical")),
        "explain.max_depth": Range(int, 1, 1000),
        "explain.max_trees": Range(int, 0, 100_000),
        "explain.source": OneOf(("auto", "predicted", "measured")),
    }


def check_settings(cfg: DictConfig) -> None:
    """Check every setting a user can give outside the predictor; raise
    :class:`~irene.errors.SettingsError` naming the first bad one and its valid values
    (``strategy.name='bogus': choose from [...]``)."""
    for key, check in _settings_checks().items():
        node = OmegaConf.select(cfg, key, default=None)
        value = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
        problem = check.check(value) if hasattr(check, "check") else check(value)
        if problem:
            raise SettingsError(f"{key}={value!r}: {problem}")


def seeds_request(seeds: Any) -> str | None:
    """``seeds`` as one canonical string (``"5"``, ``"[1, 2, 3]"``), the MLflow param by which
    ``report`` finds the runs of a request; None when seeds are not asked for."""
    import json

    if seeds is None:
        return None
    if OmegaConf.is_list(seeds) or isinstance(seeds, list | tuple):
        return json.dumps(list(seeds))
    return str(seeds)


def seed_list(seeds: Any, base: int = 0) -> list[int] | None:
    """The seeds of a ``seeds`` setting: None when unset (one run, the predictor's ``seed``,
    ``base``); an integer k gives ``base + 0 … k − 1`` (so the first is the single-seed run),
    a list is taken as it is. Raises :class:`SettingsError` (one line) for anything else."""
    if seeds is None:
        return None
    if OmegaConf.is_list(seeds) or isinstance(seeds, list | tuple):
        values = list(seeds)
        if not values or not all(isinstance(s, int) and not isinstance(s, bool) for s in values):
            raise SettingsError(f"seeds={seeds_request(seeds)}: must be a non-empty list of integers")
        if len(set(values)) != len(values):
            raise SettingsError(f"seeds={seeds_request(seeds)}: a seed is repeated")
        return values
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise SettingsError(f"seeds={seeds!r}: must be a number of seeds ≥ 1 or a list of seeds")
    return [base + i for i in range(seeds)]


def data_label(data: DictConfig) -> str:
    """``data.name``, or the entries of ``data.devices`` joined by ``+``."""
    devices = data.get("devices")
    return "+".join(str(d) for d in devices) if devices else str(data.name)


def run_params(cfg: DictConfig) -> dict[str, Any]:
    """MLflow params of a run: the chosen option of every ablation axis, then every
    hyperparameter of the predictor as composed (the ones the axes set are not repeated)."""
    from irene.predictors.irene import effective_weighting

    params: dict[str, Any] = {
        "data": data_label(cfg.data),
        "features": cfg.features.name,
        "strategy": cfg.strategy.name,
        "weighting": ("n/a" if cfg.strategy.name == "none"
                      else effective_weighting(cfg.weighting.name, cfg.strategy.name)),
        "predictor": predictor_class(cfg).name,
    }
    own = OmegaConf.to_container(cfg.predictor, resolve=True)
    for key, value in own.items():
        if key not in ("_target_", "feature_sets", "training_strategy", "weighting", "show_progress"):
            params[key] = value
    return params


def register_configs() -> None:
    """The top-level schema, one schema per predictor, and the ``${outputs:}`` resolver."""
    from pipelines.paths import outputs_dir

    store = ConfigStore.instance()
    store.store(name="schema", node=schema())
    from irene.predictors import classes

    for cls in classes().values():
        store.store(group="predictor", name=f"{cls.name}_schema", node=estimator_schema(cls))
    if not OmegaConf.has_resolver("outputs"):
        OmegaConf.register_new_resolver("outputs", lambda: str(outputs_dir()))
    if not OmegaConf.has_resolver("unique"):
        # one random suffix per process (cached, like ${now:}; Hydra copies the cache into
        # every job of a sweep): runs started in the same second get folders of their own
        OmegaConf.register_new_resolver("unique", lambda: secrets.token_hex(3), use_cache=True)


def bad_group_option(overrides: list[str], conf_dir: Path) -> str | None:
    """The one-line message for a command-line override that picks an option a config group
    does not have (``strategy=nonsense``), else None. Hydra would print a dozen lines and exit
    1; sweeps (``strategy=end2end,none``) are checked item by item, Hydra's sweep functions
    (``choice(...)``) and ``hydra/...`` groups are left to Hydra."""
    for override in overrides:
        key, sep, value = override.lstrip("+").partition("=")
        group = conf_dir / key
        if (not sep or key.startswith(("hydra", "~", "-")) or "(" in value
                or not group.is_dir()):
            continue
        options = sorted(p.stem for p in group.glob("*.yaml"))
        if key == "data" and value.startswith("["):  # several devices: a key, not a group
            return (f"data={value}: picks one option of the group; several devices as one "
                    f"data set are data.devices={value} (or data=paper_devices)")
        for item in value.split(","):
            if item.strip() not in (*options, "null"):
                return f"{key}={item.strip()}: no such option; choose from {options}"
    return None
