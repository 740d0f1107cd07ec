"""Energy meters behind one interface: NVML (GPU), RAPL (CPU packages), or none.

``make_meter("auto")`` picks the best available: NVML when CUDA and NVML see a GPU, else RAPL
when readable package counters exist, else the null meter, which measures nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from irene.measure.meters.base import EnergyMeter, MeterUnavailableError
from irene.measure.meters.null import NullMeter
from irene.measure.meters.nvml import NvmlMeter
from irene.measure.meters.rapl import DEFAULT_POWERCAP_ROOT, RaplMeter, RaplPermissionError

__all__ = [
    "EnergyMeter",
    "MeterUnavailableError",
    "NullMeter",
    "NvmlMeter",
    "RaplMeter",
    "RaplPermissionError",
    "make_meter",
]

log = logging.getLogger(__name__)


def make_meter(
    kind: str = "auto",
    *,
    gpu_index: int = 0,
    rapl_root: str | Path = DEFAULT_POWERCAP_ROOT,
) -> EnergyMeter:
    """Build the energy meter named by ``kind``.

    Args:
        kind: ``"auto"``, ``"nvml"``, ``"rapl"`` or ``"none"``.
        gpu_index: GPU of the NVML meter.
        rapl_root: powercap root of the RAPL meter.

    Returns:
        The meter. With ``"auto"`` and no usable counter, a :class:`NullMeter`, announced in
        one log line.

    Raises:
        MeterUnavailableError: when an explicitly named meter cannot be used.
        ValueError: for an unknown kind.
    """
    if kind == "nvml":
        return NvmlMeter(gpu_index)
    if kind == "rapl":
        return RaplMeter(rapl_root)
    if kind == "none":
        return NullMeter()
    if kind != "auto":
        raise ValueError(f"unknown meter {kind!r}: use auto, nvml, rapl or none")
    if NvmlMeter.available(gpu_index=gpu_index):
        return NvmlMeter(gpu_index)
    try:
        return RaplMeter(rapl_root)
    except MeterUnavailableError as error:
        log.warning(
            "No energy meter on this machine (no NVML GPU; RAPL: %s): recording "
            "features and times only, without ground_truth_energy.",
            error,
        )
    return NullMeter()
