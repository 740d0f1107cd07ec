"""The meter of a machine without any energy counter: it measures nothing."""

from __future__ import annotations

from irene.measure.meters.base import EnergyMeter


class NullMeter(EnergyMeter):
    """No energy counter: trees get features and times, and no ``ground_truth_energy``."""

    name = "none"
    measures_energy = False

    @classmethod
    def available(cls, **kwargs: object) -> bool:
        """Always usable."""
        return True

    def read_energy_j(self) -> float:
        """Never invents a measurement.

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError("no energy meter on this machine: nothing to read")
