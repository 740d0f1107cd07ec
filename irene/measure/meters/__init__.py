"""Energy meters behind one interface (:class:`EnergyMeter`, ``base.py``), one file each.

The ``measure`` stage builds the meter of its config (``conf/measure/meter/<name>.yaml``,
chosen with ``measure/meter=<name>``) with Hydra, then hands the built object to
:func:`meter_for_device`: a meter is checked against the device the model runs on
(:func:`check_device`), a :class:`DeviceCounter` (``auto``) picks the counter of that device,
else the null meter, which measures nothing and says so once. Nothing here names a meter:
adding one is a file in this package and a YAML (docs/architecture.md, "Adding a meter").
"""

from __future__ import annotations

from irene.measure.meters.auto import DeviceCounter, device_type
from irene.measure.meters.base import (
    GPU_ENERGY_FEATURE,
    REGISTRY,
    EnergyMeter,
    MeterUnavailableError,
    Probe,
    reading_feature_of,
)
from irene.measure.meters.combined import SumMeter
from irene.measure.meters.null import NullMeter
from irene.measure.meters.nvml import NvmlMeter
from irene.measure.meters.rapl import DEFAULT_POWERCAP_ROOT, RaplMeter, RaplPermissionError
from irene.measure.meters.simulated import SimulatedDevice, SimulatedMeter

__all__ = [
    "DEFAULT_POWERCAP_ROOT",
    "GPU_ENERGY_FEATURE",
    "REGISTRY",
    "DeviceCounter",
    "EnergyMeter",
    "MeterMismatchError",
    "MeterUnavailableError",
    "NullMeter",
    "NvmlMeter",
    "Probe",
    "RaplMeter",
    "RaplPermissionError",
    "SimulatedDevice",
    "SimulatedMeter",
    "SumMeter",
    "check_device",
    "meter_for_device",
    "reading_feature_of",
]


class MeterMismatchError(MeterUnavailableError):
    """The meter does not measure the device the model runs on."""


def check_device(meter: EnergyMeter, device: str) -> None:
    """Refuse a meter that does not measure the device the model runs on.

    From the parts' :attr:`~EnergyMeter.measured_devices` (parts that declare none, such as
    a simulated or replayed counter, are never refused): some part must measure the model's
    device, and every part must measure that device or the host CPU that drives it (a GPU
    counter beside a model on the CPU would add an idle GPU to the target).

    Raises:
        MeterMismatchError: one line naming the meter, what it measures and the device.
    """
    kind = device_type(device)
    parts = [p for p in meter.parts() if p.measured_devices is not None]
    if not parts:
        return
    used = {kind, "cpu"}  # the host CPU runs the model or launches its kernels
    measured = sorted(set().union(*(p.measured_devices for p in parts)))
    if not any(kind in p.measured_devices for p in parts):
        raise MeterMismatchError(
            f"meter {meter.name} measures {'+'.join(measured)} but the model runs on {device}: use a meter "
            f"of that device (measure/meter=auto picks it) or the measure.device that meter reads")
    for part in parts:
        if not part.measured_devices & used:
            devices = "+".join(sorted(part.measured_devices))
            raise MeterMismatchError(
                f"meter {meter.name}: its part {part.name} measures {devices} "
                f"but the model runs on {device}, which does not use it: drop that part or use "
                f"measure/meter=auto")


def meter_for_device(built: EnergyMeter | DeviceCounter, device: str) -> EnergyMeter:
    """The meter for a model on ``device``, from what the meter config built.

    Args:
        built: a meter (checked with :func:`check_device`) or a :class:`DeviceCounter`
            (``auto``: picks the device's counter, else the null meter).
        device: where the model runs (``cpu``, ``cuda:N``).

    Raises:
        MeterMismatchError: a meter of another device.
        TypeError: ``built`` is neither.
    """
    if isinstance(built, DeviceCounter):
        return built.for_device(device)
    if not isinstance(built, EnergyMeter):
        raise TypeError("a meter config must build an EnergyMeter or a DeviceCounter, "
                        f"got {type(built).__name__}")
    try:
        check_device(built, device)
    except MeterMismatchError:
        built.close()
        raise
    return built
