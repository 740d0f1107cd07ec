"""Stage ``measure``: trace and measure one (model, batch_size, seq_len) into trees.jsonl.

``configs=[bert-base-uncased@8x128,gpt2@16x256]`` measures several configurations in one job,
in turn (what ``stage=plan`` prints for a new GPU; ``experiment=new_gpu`` holds its default).

A sweep is a Hydra multirun over ``model``, ``batch_size`` and ``seq_len``; every job appends
its line to the shared ``measure.output`` file, and a job whose line already exists returns at
once, so a killed sweep is resumed by running it again. A job prints a progress bar over its
nodes (with an ETA), one summary line (nodes, root energy and time, Σ children / parent,
window spread, drift), logged to MLflow as metrics, and, last, the trees file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from irene.errors import SettingsError, UserError, one_line
from irene.measure.settings import MeterSettings, ProtocolSettings
from pipelines.config import MeasureConfig
from pipelines.stage import Context, ModelInput, Stage

if TYPE_CHECKING:
    from irene.measure.meters import EnergyMeter

log = logging.getLogger(__name__)

#: One YAML per meter (its ``_target_`` and arguments): the group ``measure/meter``.
METER_DIR = Path(__file__).resolve().parents[2] / "conf" / "measure" / "meter"


@dataclass
class MeasureSettings(ModelInput):
    measure: MeasureConfig = field(default_factory=MeasureConfig)  # protocol, meter, output
    # several configurations in one job, measured in turn: ["bert-base-uncased@8x128", ...]
    # (stage=plan picks them; conf/experiment/new_gpu.yaml holds its default picks)
    configs: list[str] | None = None


_CONFIG = re.compile(r"^(?P<model>[^@\s]+)@(?P<batch>[0-9]+)x(?P<seq>[0-9]+)$")


def parse_configs(configs: list[str]) -> list[tuple[str, int, int]]:
    """``["model@BxS", ...]`` as (model, batch_size, seq_len) triples.

    Raises:
        SettingsError: naming the first entry that is not ``model@BxS`` with B, S ≥ 1.
    """
    out = []
    for position, entry in enumerate(configs):
        found = _CONFIG.match(str(entry).strip())
        if found is None or int(found["batch"]) < 1 or int(found["seq"]) < 1:
            raise SettingsError(f"configs[{position}]={entry!r}: expected <model>@<batch_size>x"
                                "<seq_len> with both at least 1, e.g. bert-base-uncased@8x128")
        out.append((found["model"], int(found["batch"]), int(found["seq"])))
    return out


def meter_config(cfg: DictConfig) -> DictConfig:
    """The ``measure.meter`` node: the selected ``conf/measure/meter/<name>.yaml``.

    A name in its place (``measure.meter=nvml``, the former form; or no meter at all: ``auto``)
    is read from that file into the config, where its interpolations resolve.

    Raises:
        SettingsError: a name without a file, in one line with the choices.
    """
    node = cfg.measure.get("meter")
    if isinstance(node, DictConfig):
        return node
    name = "auto" if node is None else str(node)
    path = METER_DIR / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in METER_DIR.glob("*.yaml")))
        raise SettingsError(f"measure.meter={name}: no such meter; choose one of {choices} "
                            f"(conf/measure/meter/), as measure/meter=<name>")
    cfg.measure.meter = OmegaConf.load(path)
    return cfg.measure.meter


def measure_settings(cfg: DictConfig) -> MeasureConfig:
    """The ``measure`` block as a validated :class:`MeasureConfig` (also from an untyped
    config); its ``meter`` is the meter config, resolved (a plain dict with ``_target_``).

    Raises:
        SettingsError: one line naming the first out-of-range or missing field.
    """
    meter = meter_config(cfg)
    try:
        resolved = OmegaConf.to_container(meter, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        key = error.full_key or "measure.meter"
        raise SettingsError(f"{key}: must be set for this meter ({key}=...)") from None
    node = OmegaConf.merge(OmegaConf.structured(MeasureConfig), cfg.measure)
    node.meter = None  # built from the resolved copy: its interpolations name the whole config
    settings = OmegaConf.to_object(node)
    settings.meter = resolved
    return settings.validate()


def read_settings(cfg: DictConfig) -> MeasureSettings:
    """The stage's settings: the shape and the ``measure`` block with its meter resolved."""
    configs = cfg.get("configs")
    if configs:
        if cfg.get("model"):
            raise SettingsError(f"model={cfg.model} and configs=[...] both name what to measure: "
                                "give one of them")
        parse_configs(list(configs))  # every entry checked before anything is measured
        return MeasureSettings(configs=[str(c) for c in configs], measure=measure_settings(cfg))
    if not cfg.get("model"):
        raise SettingsError("stage=measure needs model=<registry name or config.json path>, "
                            "e.g. model=bert-base-uncased batch_size=8 seq_len=128 (or "
                            "configs=[<model>@<batch>x<seq>,...])")
    return MeasureSettings(model=str(cfg.model), batch_size=int(cfg.batch_size),
                           seq_len=int(cfg.seq_len), measure=measure_settings(cfg))


def build_meter(settings: MeasureConfig, device: str) -> EnergyMeter:
    """Instantiate the meter config (``_target_``) and fit it to ``device`` (``auto`` picks the
    device's counter; a meter of another device is refused: MeterMismatchError).

    Raises:
        UserError: the meter's own one-line error (unavailable here, a bad argument or file);
            anything else the meter's constructor raised, as one SettingsError line.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        built = instantiate(settings.meter)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        target = settings.meter.get("_target_", "?")
        raise SettingsError(f"measure.meter ({target}): {one_line(cause or error)}") from None
    from irene.measure.meters import meter_for_device

    return meter_for_device(built, device)


def build_companion(settings: MeasureConfig, meter: EnergyMeter, device: str) -> EnergyMeter | None:
    """The counter of the model's device beside a ground truth without a GPU counter of its
    own (``none``, ``simulated``, ``replay`` on a GPU): auto's candidates, picked quietly, for
    its utilisation probes and ``gpu_energy_mean``. ``None`` when the ground truth has one or
    none opens here."""
    from hydra.utils import instantiate

    from irene.measure.runner import gpu_counter

    if gpu_counter(meter) is not None:
        return None
    node = OmegaConf.create({"measure": {"gpu_index": settings.gpu_index}})
    node.auto = OmegaConf.load(METER_DIR / "auto.yaml")
    picked = instantiate(node.auto).for_device(device, quiet=True)
    if gpu_counter(picked) is None:  # the CPU's counter, or none: nothing to add
        picked.close()
        return None
    return picked


def _flat(prefix: str, value: Any, into: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(f"{prefix}.{key}", item, into)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _flat(f"{prefix}.{index}", item, into)
    else:
        into[prefix] = value
    return into


def protocol_params(settings: MeasureConfig) -> dict[str, Any]:
    """Every protocol and meter setting, as MLflow parameters (``protocol.*``, ``meter.*``;
    the meter config flattened: ``meter._target_``, ``meter.tick_s``...)."""
    params = {f"protocol.{f.name}": getattr(settings, f.name) for f in dataclasses.fields(ProtocolSettings)}
    for f in dataclasses.fields(MeterSettings):
        _flat(f"meter.{f.name}", getattr(settings, f.name), params)
    return {key.replace("meter.meter.", "meter.", 1): value for key, value in params.items()}


def _tracking(ctx: Context, track: bool, params: dict[str, Any]) -> contextlib.AbstractContextManager:
    if not track:
        from pipelines.tracking import NullTracker

        return contextlib.nullcontext(NullTracker())
    return ctx.tracked_run(params)


def run(ctx: Context, request: MeasureSettings) -> Path:
    """Measure ``model`` at ``batch_size`` x ``seq_len`` (or every entry of ``configs``, in
    turn) into ``measure.output``; returns the path of the trees file."""
    if request.configs:
        triples = parse_configs(request.configs)
        for number, (model, batch_size, seq_len) in enumerate(triples, start=1):
            log.info("configuration %d of %d: %s %dx%d", number, len(triples), model,
                     batch_size, seq_len)
            output = run(ctx, dataclasses.replace(request, configs=None, model=model,
                                                  batch_size=batch_size, seq_len=seq_len))
        return output
    from irene.data.provenance import measured_block
    from irene.measure.meters import NullMeter
    from irene.measure.runner import environment, measure_into, resolve_device, wanted_completeness
    from irene.measure.store import ENERGY, TRACE, existing_completeness
    from irene.measure.summary import summarize, summary_line, summary_metrics

    settings = request.measure
    output = Path(settings.output)
    model, batch_size, seq_len = str(request.model), int(request.batch_size), int(request.seq_len)
    device = resolve_device(settings.device, settings.gpu_index)  # absent: an error, always
    found = existing_completeness(output, (model, batch_size, seq_len))  # None: no line yet
    if found is not None and found >= (ENERGY if settings.measure else TRACE):  # nothing to add
        log.info("%s %dx%d already measured in %s: skipped", model, batch_size, seq_len, output)
        print(f"trees: {output}")
        return output
    meter = build_meter(settings, device) if settings.measure else NullMeter()
    if found is not None and found >= wanted_completeness(meter, settings.measure):
        meter.close()
        log.info("%s %dx%d already in %s with all this meter (%s) measures: skipped", model,
                 batch_size, seq_len, output, meter.name)
        print(f"trees: {output}")
        return output
    if found is not None:
        log.info("%s %dx%d is in %s without energy: measured again with meter %s, and its "
                 "line replaced", model, batch_size, seq_len, output, meter.name)
    params = {
        "model": model,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "attn_implementation": settings.attn_implementation,
        "convention": settings.convention,
        "measured": settings.measure,
        **protocol_params(settings),
        **environment(device, meter),
    }
    log.info("measuring %s %dx%d on %s, meter %s, %s protocol", model, batch_size, seq_len, device,
             meter.name, settings.protocol)
    companion = build_companion(settings, meter, device) if settings.measure else None
    try:
        with _tracking(ctx, settings.track, params) as tracker:
            block = measured_block(params, declared=ctx.data_name, convention=settings.convention,
                                   run=tracker.run_id or f"stage=measure {model} "
                                   f"{batch_size}x{seq_len} on {device}",
                                   memory_mib=_gpu_memory_mib(device),
                                   power_limit_w=power_limit_w(meter))
            record = measure_into(
                output,
                model,
                batch_size,
                seq_len,
                meter=meter,
                companion=companion,
                settings=settings,
                device=device,
                attn_implementation=settings.attn_implementation,
                measure=settings.measure,
                seed=settings.seed,
                convention=settings.convention,
                show_progress=ctx.show_progress,
                device_block=block,
            )
            if record is not None and settings.measure:
                summary = summarize(record)
                line = summary_line(summary)
                log.info("%s", line)
                print(line)
                tracker.log_metrics(summary_metrics(summary))
            if settings.track:
                tracker.log_artifact(output)
    finally:
        meter.close()
        if companion is not None:
            companion.close()
    print(f"trees: {output}")
    return output


def power_limit_w(meter: EnergyMeter) -> float | None:
    """The GPU's enforced power limit (W) as the meter reads it (NVML), else None: a limit
    nothing reported is left unknown, never assumed."""
    state = getattr(meter, "device_state", None)
    try:
        value = state().get("gpu_power_limit_w") if callable(state) else None
    except Exception:  # noqa: BLE001 - descriptive only, as the meter's own device_state
        return None
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _gpu_memory_mib(device: str) -> int | None:
    """The measured GPU's memory in whole MiB as torch sees it (None on a CPU)."""
    import torch

    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory // 2**20


STAGE = Stage("measure", MeasureSettings, run, read_settings=read_settings)
