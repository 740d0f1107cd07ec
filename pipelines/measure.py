"""Stage ``measure``: trace and measure one (model, batch_size, seq_len) into trees.jsonl.

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
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from irene.measure.meters import NullMeter, meter_from_settings
from irene.measure.runner import environment, measure_into, resolve_device, wanted_completeness
from irene.measure.settings import MeterSettings, ProtocolSettings
from irene.measure.store import ENERGY, TRACE, existing_completeness
from irene.measure.summary import summarize, summary_line, summary_metrics
from pipelines.config import MeasureConfig
from pipelines.tracking import log_artifact, log_metrics, tracked_run

log = logging.getLogger(__name__)


def measure_settings(cfg: DictConfig) -> MeasureConfig:
    """The ``measure`` block as a validated :class:`MeasureConfig` (also from an untyped config).

    Raises:
        SettingsError: one line naming the first out-of-range field and its valid range.
    """
    node = OmegaConf.merge(OmegaConf.structured(MeasureConfig), cfg.measure)
    return OmegaConf.to_object(node).validate()


def protocol_params(settings: MeasureConfig) -> dict[str, Any]:
    """Every protocol and meter setting, as MLflow parameters (``protocol.*``, ``meter.*``)."""
    params = {f"protocol.{f.name}": getattr(settings, f.name) for f in dataclasses.fields(ProtocolSettings)}
    for f in dataclasses.fields(MeterSettings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            params.update({f"meter.{f.name}.{k}": v for k, v in dataclasses.asdict(value).items()})
        else:
            params[f"meter.{f.name}"] = value
    return params


def _tracking(cfg: DictConfig, track: bool, params: dict[str, Any]) -> contextlib.AbstractContextManager:
    if not track:
        return contextlib.nullcontext()
    return tracked_run(cfg, stage="measure", params=params)


def run(cfg: DictConfig) -> Path:
    """Measure ``cfg.model`` at ``cfg.batch_size`` x ``cfg.seq_len`` into ``cfg.measure.output``.

    Args:
        cfg: the composed config: top-level ``model``, ``batch_size``, ``seq_len`` and the
            ``measure`` block (schema: ``MeasureConfig`` in ``pipelines/config.py``).

    Returns:
        The path of the trees file.
    """
    if not cfg.model:
        raise ValueError("stage=measure needs model=<registry name or config.json path>, "
                         "e.g. model=bert-base-uncased batch_size=8 seq_len=128")
    settings = measure_settings(cfg)
    output = Path(settings.output)
    model, batch_size, seq_len = str(cfg.model), int(cfg.batch_size), int(cfg.seq_len)
    device = resolve_device(settings.device, settings.gpu_index)  # absent: an error, always
    found = existing_completeness(output, (model, batch_size, seq_len))  # None: no line yet
    if found is not None and found >= (ENERGY if settings.measure else TRACE):  # nothing to add
        log.info("%s %dx%d already measured in %s: skipped", model, batch_size, seq_len, output)
        print(f"trees: {output}")
        return output
    meter = meter_from_settings(settings, device) if settings.measure else NullMeter()
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
    try:
        with _tracking(cfg, settings.track, params):
            record = measure_into(
                output,
                model,
                batch_size,
                seq_len,
                meter=meter,
                settings=settings,
                device=device,
                attn_implementation=settings.attn_implementation,
                measure=settings.measure,
                gpu_index=settings.gpu_index,
                seed=settings.seed,
                convention=settings.convention,
                show_progress=bool(cfg.get("show_progress", True)),
            )
            if record is not None and settings.measure:
                summary = summarize(record)
                line = summary_line(summary)
                log.info("%s", line)
                print(line)
                log_metrics(summary_metrics(summary))
            if settings.track:
                log_artifact(output)
    finally:
        meter.close()
    print(f"trees: {output}")
    return output
