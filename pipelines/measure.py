"""Stage ``measure``: trace and measure one (model, batch_size, seq_len) into trees.jsonl.

A sweep is a Hydra multirun over ``model``, ``batch_size`` and ``seq_len``; every job appends
its line to the shared ``measure.output`` file, and a job whose line already exists returns at
once, so a killed sweep is resumed by running it again.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from irene.measure.meters import make_meter
from irene.measure.protocol import ProtocolSettings
from irene.measure.runner import environment, measure_into
from irene.measure.store import has_record
from pipelines.tracking import tracked_run

log = logging.getLogger(__name__)


def protocol_settings(mcfg: DictConfig) -> ProtocolSettings:
    """The protocol settings of the ``measure`` config block."""
    return ProtocolSettings(
        min_window_s=float(mcfg.min_window_s),
        windows=int(mcfg.windows),
        warmup=int(mcfg.warmup),
        reuse_identical=bool(mcfg.reuse_identical),
        sample_interval_s=float(mcfg.sample_interval_s),
    )


def _tracking(cfg: DictConfig, params: dict[str, Any]) -> contextlib.AbstractContextManager:
    if not cfg.measure.get("track", True):
        return contextlib.nullcontext()
    return tracked_run(cfg, stage="measure", params=params)


def run(cfg: DictConfig) -> Path:
    """Measure ``cfg.model`` at ``cfg.batch_size`` x ``cfg.seq_len`` into ``cfg.measure.output``.

    Args:
        cfg: the composed config: top-level ``model``, ``batch_size``, ``seq_len`` and the
            ``measure`` block (see ``conf/measure/default.yaml``).

    Returns:
        The path of the trees file.
    """
    if not cfg.model:
        raise ValueError("stage=measure needs model=<registry name or config.json path>, "
                         "e.g. model=bert-base-uncased batch_size=8 seq_len=128")
    mcfg = cfg.measure
    output = Path(str(mcfg.output))
    model, batch_size, seq_len = str(cfg.model), int(cfg.batch_size), int(cfg.seq_len)
    if has_record(output, (model, batch_size, seq_len)):
        log.info("%s %dx%d already measured in %s: skipped", model, batch_size, seq_len, output)
        return output
    meter = make_meter(str(mcfg.meter), gpu_index=int(mcfg.gpu_index), rapl_root=str(mcfg.rapl_root))
    device = str(mcfg.device)
    if device == "cuda":
        device = f"cuda:{int(mcfg.gpu_index)}"
    settings = protocol_settings(mcfg)
    params = {
        "model": model,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "attn_implementation": str(mcfg.attn_implementation),
        "convention": str(mcfg.get("convention", "physical")),
        "measured": bool(mcfg.measure),
        **{f"protocol.{k}": v for k, v in vars(settings).items()},
        **environment(device, meter),
    }
    try:
        with _tracking(cfg, params):
            measure_into(
                output,
                model,
                batch_size,
                seq_len,
                meter=meter,
                settings=settings,
                device=device,
                attn_implementation=str(mcfg.attn_implementation),
                measure=bool(mcfg.measure),
                gpu_index=int(mcfg.gpu_index),
                seed=int(mcfg.seed),
                convention=str(mcfg.get("convention", "physical")),
            )
            if mcfg.get("track", True):
                _log_artifact(output)
    finally:
        meter.close()
    return output


def _log_artifact(path: Path) -> None:
    try:
        import mlflow
    except ImportError:
        return
    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(path))
