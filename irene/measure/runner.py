"""Measure one (model, batch size, sequence length) configuration end to end."""

from __future__ import annotations

import dataclasses
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from irene.data.architectures import model_from_name
from irene.errors import SettingsError
from irene.measure.meters import GPU_ENERGY_FEATURE, EnergyMeter, NullMeter, Probe
from irene.measure.protocol import ProgressCallback, ProtocolSettings, device_sync, measure_nodes
from irene.measure.store import ENERGY, TIMES, TRACE, append_record, has_record
from irene.measure.trace import trace_model, trace_to_record

log = logging.getLogger(__name__)


def resolve_device(device: str, gpu_index: int = 0) -> str:
    """``auto``: ``cuda:<gpu_index>`` when CUDA is available, else ``cpu``; ``cuda``: ``cuda:<gpu_index>``."""
    if device == "auto":
        return f"cuda:{gpu_index}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"measure.device={device}: CUDA is not available on this machine "
                            "(torch.cuda.is_available() is False); use measure.device=auto or cpu")
    if device == "cuda":
        return f"cuda:{gpu_index}"
    return device


def gpu_counter(meter: EnergyMeter) -> EnergyMeter | None:
    """The part of the ground-truth meter whose reading is a GPU's own counter (it supplies
    ``gpu_energy_mean`` beside another ground truth, and never as the only one), if any."""
    return next((p for p in meter.parts() if p.reading_feature == GPU_ENERGY_FEATURE), None)


def ground_truth_features(meter: EnergyMeter) -> list[str]:
    """Node features that the ground truth itself is: the reading feature of a meter that is
    the only ground truth (e.g. ``gpu_energy_mean`` under a GPU counter alone). Recorded in
    the ``measurement`` block for :mod:`irene.measure.leakage`."""
    parts = meter.parts() if meter.measures_energy else []
    return [parts[0].reading_feature] if len(parts) == 1 and parts[0].reading_feature else []


def meter_probes(meter: EnergyMeter) -> list[Probe]:
    """The probes every part of the meter offers (utilisation, clocks)."""
    return [probe for part in meter.parts() for probe in part.probes()]


def _progress_bar(label: str, enabled: bool) -> tuple[ProgressCallback | None, Any]:
    """A tqdm bar over the nodes of one configuration (with an ETA), as a progress callback."""
    if not enabled:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc=label, unit="node", file=sys.stderr, dynamic_ncols=True)

    def update(done: int, total: int, scope: str) -> None:
        bar.total = total
        bar.set_postfix_str(scope[-40:], refresh=False)
        bar.update(done - bar.n)

    return update, bar


def measure_configuration(
    model_name: str,
    batch_size: int,
    seq_len: int,
    *,
    meter: EnergyMeter | None = None,
    companion: EnergyMeter | None = None,
    settings: ProtocolSettings | None = None,
    device: str = "cpu",
    attn_implementation: str = "eager",
    measure: bool = True,
    seed: int = 0,
    convention: str = "physical",
    show_progress: bool = False,
    device_block: dict | None = None,
) -> dict:
    """Trace, measure and return one ``trees.jsonl`` record.

    Args:
        model_name: a name accepted by :func:`irene.data.architectures.model_from_name`.
        batch_size: batch size of the input.
        seq_len: sequence length of the input.
        meter: ground-truth energy meter (default: none, i.e. no energy); its parts' probes
            are sampled, a part that is a GPU counter supplies ``gpu_energy_mean`` beside
            another ground truth, and its ``period_s`` (when known) replaces probing the tick.
        companion: the counter of the model's device, read beside a ground truth that has
            no GPU counter of its own: its probes are sampled and a GPU counter's energy is
            recorded as ``gpu_energy_mean`` (not the target there).
        settings: protocol settings (default: :class:`ProtocolSettings`).
        device: ``"cpu"`` or ``"cuda:N"`` (see :func:`resolve_device`).
        attn_implementation: forced attention implementation.
        measure: False records static features only (no run of the protocol).
        seed: seed of the random input ids.
        convention: static-feature convention of the trace (``physical`` or ``irene``).
        show_progress: a progress bar over the nodes, with an ETA, on stderr.
        device_block: the record's ``device`` (:mod:`irene.data.provenance`), when given.

    Returns:
        The record; ``ground_truth_energy`` is present only where a meter measured it. A
        measured record carries a ``measurement`` block (protocol, meters, tick, steady state,
        device states, drift, flagged nodes, seconds measuring and ``total_seconds`` with the
        model's build and trace; see docs/measure.md).
    """
    meter = meter or NullMeter()
    settings = settings or ProtocolSettings()
    start_s = time.perf_counter()
    model = model_from_name(model_name, attn_implementation, device=device)
    trace = trace_model(model, batch_size, seq_len, model_name, capture_inputs=measure, seed=seed,
                        convention=convention)
    if not measure:
        return _with_device(trace_to_record(trace), device_block)
    if settings.tick_s is None and meter.measures_energy and meter.period_s is not None:
        settings = dataclasses.replace(settings, tick_s=meter.period_s)  # known exactly: not probed
    on_progress, bar = _progress_bar(f"{model_name} {batch_size}x{seq_len}", show_progress)
    try:
        gpu_meter = gpu_counter(meter) or (gpu_counter(companion) if companion is not None else None)
        probes = meter_probes(meter) + (meter_probes(companion) if companion is not None else [])
        result = measure_nodes(trace, meter, settings, sync=device_sync(device), gpu_meter=gpu_meter,
                               probes=probes or None, on_progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
    record = trace_to_record(trace, result.fields)
    record["measurement"] = {"device": device, **result.report,
                             "ground_truth_features": ground_truth_features(meter),
                             "total_seconds": time.perf_counter() - start_s}
    return _with_device(record, device_block)


def _with_device(record: dict, device_block: dict | None) -> dict:
    if device_block is not None:
        record["device"] = device_block
    return record


def wanted_completeness(meter: EnergyMeter | None, measure: bool) -> int:
    """What a measurement with ``meter`` records (:func:`irene.measure.store.completeness`)."""
    if not measure:
        return TRACE
    return ENERGY if meter is not None and meter.measures_energy else TIMES


def measure_into(path: str | Path, model_name: str, batch_size: int, seq_len: int, **kwargs: Any
                 ) -> dict | None:
    """Measure one configuration into a trees file unless its line is already there with as
    much as this measurement would give (a times-only line is measured again with an energy
    meter, and replaced).

    Args:
        path: the ``trees.jsonl`` file shared by a sweep.
        model_name: model to measure.
        batch_size: batch size.
        seq_len: sequence length.
        **kwargs: passed to :func:`measure_configuration`.

    Returns:
        The record added, or ``None`` when the configuration was already in the file.
    """
    if has_record(path, (model_name, batch_size, seq_len), wanted_completeness(
            kwargs.get("meter"), kwargs.get("measure", True))):
        log.info("%s (%d x %d) already in %s: skipped", model_name, batch_size, seq_len, path)
        return None
    record = measure_configuration(model_name, batch_size, seq_len, **kwargs)
    return record if append_record(path, record) else None


def environment(device: str, meter: EnergyMeter) -> dict[str, str]:
    """Device, driver, meter and library versions, for the run's parameters."""
    info = {
        "device": device,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cuda_runtime": str(torch.version.cuda),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name(torch.device(device))
    info.update(meter.describe())
    return info
