"""The one interface every energy meter implements.

The runner, the protocol and the leakage rule talk only to :class:`EnergyMeter`; a meter is
one file here plus one YAML in ``conf/measure/meter/`` (see docs/architecture.md, "Adding a
meter"). What a meter declares:

* ``read_energy_j()``: the counter (joules since an arbitrary origin);
* ``period_s``: its update period when known exactly (``None``: the protocol probes it);
* ``probes()``: utilisation/clock readings the runner samples while a window runs;
* ``measured_devices``: the device types whose energy the reading includes (``"cuda"``,
  ``"cpu"``; ``None``: no device of this machine, e.g. a simulation), so a meter of another
  device than the model's is refused (:func:`irene.measure.meters.check_device`);
* ``reading_feature``: the node feature that the reading *is* (``"gpu_energy_mean"`` for a
  GPU's own counter): recorded as that feature beside another ground truth, and, as the only
  ground truth, never recorded and refused as a feature (:mod:`irene.measure.leakage`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from irene.errors import UserError

#: The node feature of a GPU's own energy counter (joules per call).
GPU_ENERGY_FEATURE = "gpu_energy_mean"

#: A probe returns named readings, e.g. ``{"gpu": 97.0, "gpu_clk": 1410.0}``.
Probe = Callable[[], dict[str, float]]

#: Every meter class with a ``name``, by that name (filled as classes are defined).
REGISTRY: dict[str, type[EnergyMeter]] = {}


class MeterUnavailableError(UserError, RuntimeError):
    """A meter cannot be used on this machine; the message (one line) says why and what to do."""


class EnergyMeter(ABC):
    """A cumulative energy counter.

    ``read_energy_j`` returns the energy (in joules) consumed since an arbitrary origin; the
    energy of a window is the difference of two reads. Implementations must make a read
    close the window only after queued device work has finished. A counter may publish new
    values only at discrete updates ("ticks", every 100 ms for NVML on an H200); the protocol
    probes that period (unless :attr:`period_s` gives it) and aligns its windows to the updates.
    """

    #: Short name recorded with the measurements (``"nvml"``, ``"rapl"``, ``"none"``).
    name: str = "abstract"
    #: Whether ``read_energy_j`` returns real measurements.
    measures_energy: bool = True
    #: Device types (``torch.device(...).type``) whose energy the reading includes; ``None``:
    #: none of this machine's (simulated, replayed, no meter), never refused for a device.
    measured_devices: frozenset[str] | None = None
    #: The node feature this reading is (:data:`GPU_ENERGY_FEATURE` for a GPU's own counter).
    reading_feature: str | None = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if isinstance(cls.__dict__.get("name"), str):
            REGISTRY.setdefault(cls.name, cls)

    @classmethod
    @abstractmethod
    def available(cls, **kwargs: object) -> bool:
        """Whether this meter can be used on this machine (never raises)."""

    @abstractmethod
    def read_energy_j(self) -> float:
        """Cumulative energy in joules since an arbitrary origin."""

    @property
    def period_s(self) -> float | None:
        """Update period of the counter in seconds when known exactly (0: continuous);
        ``None`` (the default): unknown, the protocol probes it."""
        return None

    def probes(self) -> list[Probe]:
        """Readings sampled while a window runs (utilisation, clocks); none by default."""
        return []

    def parts(self) -> list[EnergyMeter]:
        """The counters whose sum this meter is (itself, for a single counter)."""
        return [self]

    def describe(self) -> dict[str, str]:
        """Parameters worth logging (device name, driver, domains...)."""
        return {"meter": self.name}

    def device_state(self) -> dict[str, float | str]:
        """Temperature, clocks, throttle reasons... of the measured device (empty if unknown)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release handles; the default does nothing."""


def reading_feature_of(name: str) -> str | None:
    """The :attr:`~EnergyMeter.reading_feature` of the meter class named ``name`` (``None``
    for a sum such as ``rapl+nvml``, or a name no loaded meter class has)."""
    cls = REGISTRY.get(name)
    return cls.reading_feature if cls is not None else None
