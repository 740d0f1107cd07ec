"""The one interface every energy meter implements."""

from __future__ import annotations

from abc import ABC, abstractmethod


class MeterUnavailableError(RuntimeError):
    """A meter cannot be used on this machine; the message says why and what to do."""


class EnergyMeter(ABC):
    """A cumulative energy counter.

    ``read_energy_j`` returns the energy (in joules) consumed since an arbitrary origin; the
    energy of a window is the difference of two reads. Implementations must make a read
    close the window only after queued device work has finished. A counter may publish new
    values only at discrete updates ("ticks", every 100 ms for NVML on an H200); the protocol
    probes that period and aligns its windows to the updates.
    """

    #: Short name recorded with the measurements (``"nvml"``, ``"rapl"``, ``"none"``).
    name: str = "abstract"
    #: Whether ``read_energy_j`` returns real measurements.
    measures_energy: bool = True
    #: Whether this meter reads a GPU's own counter (a candidate for ``gpu_energy_mean``).
    is_gpu: bool = False

    @classmethod
    @abstractmethod
    def available(cls, **kwargs: object) -> bool:
        """Whether this meter can be used on this machine (never raises)."""

    @abstractmethod
    def read_energy_j(self) -> float:
        """Cumulative energy in joules since an arbitrary origin."""

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
