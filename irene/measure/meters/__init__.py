"""Energy meters behind one interface: NVML (GPU), RAPL (CPU packages), their sum, simulated, none.

:func:`meter_from_settings` builds the meter of the ``measure`` config (``MeterSettings``) for
the device the model runs on; ``meter: auto`` picks the counter of that device: NVML for a
GPU, RAPL for the CPU, else the null meter, which measures nothing and says so once.
"""

from __future__ import annotations

import logging
from pathlib import Path

from irene.measure.meters.base import EnergyMeter, MeterUnavailableError
from irene.measure.meters.combined import SumMeter
from irene.measure.meters.null import NullMeter
from irene.measure.meters.nvml import NvmlMeter
from irene.measure.meters.rapl import DEFAULT_POWERCAP_ROOT, RaplMeter, RaplPermissionError
from irene.measure.meters.simulated import SimulatedDevice, SimulatedMeter
from irene.measure.settings import METERS, MeterSettings, SimulatedMeterSettings

__all__ = [
    "EnergyMeter",
    "MeterUnavailableError",
    "NullMeter",
    "NvmlMeter",
    "RaplMeter",
    "RaplPermissionError",
    "SimulatedDevice",
    "SimulatedMeter",
    "SumMeter",
    "make_meter",
    "meter_from_settings",
]

log = logging.getLogger(__name__)


class MeterMismatchError(MeterUnavailableError):
    """The meter does not measure the device the model runs on."""


def _no_meter(reason: str) -> NullMeter:
    log.warning("No energy meter for this device (%s): recording features and times only, "
                "without ground_truth_energy.", reason)
    return NullMeter()


def make_meter(
    kind: str = "auto",
    *,
    gpu_index: int = 0,
    rapl_root: str | Path = DEFAULT_POWERCAP_ROOT,
    device: str | None = None,
    simulated: SimulatedMeterSettings | None = None,
) -> EnergyMeter:
    """Build the energy meter named by ``kind``.

    Args:
        kind: one of :data:`irene.measure.settings.METERS`.
        gpu_index: GPU of the NVML meter.
        rapl_root: powercap root of the RAPL meter.
        device: where the model runs (``cpu``, ``cuda:N``); with ``auto`` it picks the counter
            of that device, and a named meter that measures another device is refused.
            ``None``: no check, and ``auto`` takes NVML if usable, else RAPL.
        simulated: settings of ``kind="simulated"``.

    Returns:
        The meter. With ``"auto"`` and no usable counter, a :class:`NullMeter`, announced in
        one log line.

    Raises:
        MeterUnavailableError: when an explicitly named meter cannot be used.
        MeterMismatchError: when a named meter measures another device than ``device``.
        ValueError: for an unknown kind.
    """
    if kind not in METERS:
        raise ValueError(f"unknown meter {kind!r}: use {', '.join(METERS)}")
    on_gpu = None if device is None else str(device).split(":")[0] == "cuda"
    if on_gpu is False and kind in ("nvml", "rapl+nvml"):
        raise MeterMismatchError(f"meter={kind} reads the GPU but the model runs on {device}: "
                                 "use device=cuda (or auto), or meter=rapl")
    if on_gpu and kind == "rapl":
        raise MeterMismatchError(f"meter=rapl reads only the CPU packages but the model runs on {device}: "
                                 "use meter=rapl+nvml (CPU + GPU) or meter=nvml")
    if kind == "nvml":
        return NvmlMeter(gpu_index)
    if kind == "rapl":
        return RaplMeter(rapl_root)
    if kind == "rapl+nvml":
        return SumMeter([RaplMeter(rapl_root), NvmlMeter(gpu_index)])
    if kind == "simulated":
        return SimulatedMeter(simulated)
    if kind == "none":
        return NullMeter()
    # auto
    if on_gpu is not False and NvmlMeter.available(gpu_index=gpu_index):
        return NvmlMeter(gpu_index)
    if on_gpu:
        return _no_meter(f"NVML cannot read GPU {gpu_index}")
    try:
        return RaplMeter(rapl_root)
    except MeterUnavailableError as error:
        return _no_meter(f"no NVML GPU; RAPL: {error}")


def meter_from_settings(settings: MeterSettings, device: str | None = None) -> EnergyMeter:
    """The meter of the ``measure`` config for a model running on ``device``.

    Args:
        settings: the validated meter settings (the ``measure`` config block is one).
        device: where the model runs (see :func:`make_meter`).
    """
    return make_meter(settings.meter, gpu_index=settings.gpu_index, rapl_root=settings.rapl_root,
                      device=device, simulated=settings.simulated)
