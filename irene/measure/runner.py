"""Measure one (model, batch size, sequence length) configuration end to end."""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

import torch
import transformers

from irene.data.architectures import model_from_name
from irene.measure.meters import EnergyMeter, NullMeter, NvmlMeter
from irene.measure.protocol import ProtocolSettings, device_sync, measure_trace
from irene.measure.store import append_record, has_record
from irene.measure.trace import trace_model, trace_to_record

log = logging.getLogger(__name__)


def gpu_companion(meter: EnergyMeter, device: str, gpu_index: int) -> NvmlMeter | None:
    """The NVML meter that supplies ``gpu_energy_mean`` and GPU utilisation, if any.

    The ground-truth meter itself when it is NVML; a second NVML meter when the model runs
    on a GPU under another ground-truth meter; ``None`` on CPU.
    """
    if isinstance(meter, NvmlMeter):
        return meter
    if torch.device(device).type == "cuda" and NvmlMeter.available(gpu_index=gpu_index):
        return NvmlMeter(gpu_index)
    return None


def measure_configuration(
    model_name: str,
    batch_size: int,
    seq_len: int,
    *,
    meter: EnergyMeter | None = None,
    settings: ProtocolSettings | None = None,
    device: str = "cpu",
    attn_implementation: str = "eager",
    measure: bool = True,
    gpu_index: int = 0,
    seed: int = 0,
    convention: str = "physical",
) -> dict:
    """Trace, measure and return one ``trees.jsonl`` record.

    Args:
        model_name: a name accepted by :func:`irene.data.architectures.model_from_name`.
        batch_size: batch size of the input.
        seq_len: sequence length of the input.
        meter: ground-truth energy meter (default: none, i.e. no energy).
        settings: protocol settings (default: :class:`ProtocolSettings`).
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).
        attn_implementation: forced attention implementation.
        measure: False records static features only (no run of the protocol).
        gpu_index: NVML index of the GPU used.
        seed: seed of the random input ids.
        convention: static-feature convention of the trace (``physical`` or ``irene``).

    Returns:
        The record; ``ground_truth_energy`` is present only where a meter measured it.
    """
    meter = meter or NullMeter()
    settings = settings or ProtocolSettings()
    model = model_from_name(model_name, attn_implementation, device=device)
    trace = trace_model(model, batch_size, seq_len, model_name, capture_inputs=measure, seed=seed,
                        convention=convention)
    measured = None
    if measure:
        gpu_meter = gpu_companion(meter, device, gpu_index)
        probes = [gpu_meter.utilisation] if gpu_meter is not None else None
        measured = measure_trace(
            trace, meter, settings, sync=device_sync(device), gpu_meter=gpu_meter, probes=probes
        )
    return trace_to_record(trace, measured)


def measure_into(path: str | Path, model_name: str, batch_size: int, seq_len: int, **kwargs: Any) -> bool:
    """Measure one configuration into a trees file unless its line is already there.

    Args:
        path: the ``trees.jsonl`` file shared by a sweep.
        model_name: model to measure.
        batch_size: batch size.
        seq_len: sequence length.
        **kwargs: passed to :func:`measure_configuration`.

    Returns:
        True when a line was added, False when the configuration was already measured.
    """
    if has_record(path, (model_name, batch_size, seq_len)):
        log.info("%s (%d x %d) already in %s: skipped", model_name, batch_size, seq_len, path)
        return False
    record = measure_configuration(model_name, batch_size, seq_len, **kwargs)
    return append_record(path, record)


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
