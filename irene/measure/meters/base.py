"""The one interface every energy meter implements."""

from __future__ import annotations

from abc import ABC, abstractmethod


class MeterUnavailableError(RuntimeError):
    """A meter cannot be used on this machine; the message says why and what to do."""


class EnergyMeter(ABC):
    """A cumulative energy counter.

    ``read_energy_j`` returns the energy (in joules) consumed since an arbitrary origin; the
    energy of a window is the difference of two reads. Implementations must make a read
    close the window only after queued device work has finished.
    """

    #: Short name recorded with the measurements (``"nvml"``, ``"rapl"``, ``"none"``).
    name: str = "abstract"
    #: Whether ``read_energy_j`` returns real measurements.
    measures_energy: bool = True

    @classmethod
    @abstractmethod
    def available(cls, **kwargs: object) -> bool:
        """Whether this meter can be used on this machine (never raises)."""

    @abstractmethod
    def read_energy_j(self) -> float:
        """Cumulative energy in joules since an arbitrary origin."""

    def describe(self) -> dict[str, str]:
        """Parameters worth logging (device name, driver, domains...)."""
        return {"meter": self.name}

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release handles; the default does nothing."""
