"""A ground truth that is the sum of several counters (``meter=rapl+nvml``)."""

from __future__ import annotations

from irene.measure.meters.base import EnergyMeter, Probe


class SumMeter(EnergyMeter):
    """The sum of several meters, e.g. CPU packages (RAPL) plus the GPU (NVML).

    The protocol reads each part once per counter read (:meth:`parts`), aligns its windows to
    the slowest part's updates and keeps a GPU part's own energy as the ``gpu_energy_mean``
    feature, which then is a part of the target, not the target itself.

    Args:
        parts: the meters summed (at least two).
    """

    def __init__(self, parts: list[EnergyMeter]) -> None:
        if len(parts) < 2:
            raise ValueError("SumMeter needs at least two meters")
        self._parts = list(parts)
        self.name = "+".join(p.name for p in parts)

    @classmethod
    def available(cls, **kwargs: object) -> bool:
        """Available when its parts are; built only from parts that exist."""
        return True

    def read_energy_j(self) -> float:
        """Sum of the parts' cumulative energies, in joules."""
        return sum(p.read_energy_j() for p in self._parts)

    @property
    def period_s(self) -> float | None:
        """The slowest part's period when every part knows its own, else ``None`` (probed)."""
        periods = [p.period_s for p in self._parts]
        return None if any(p is None for p in periods) else max(periods)

    def probes(self) -> list[Probe]:
        """Every part's probes."""
        return [probe for part in self._parts for probe in part.probes()]

    def parts(self) -> list[EnergyMeter]:
        """The summed meters."""
        return list(self._parts)

    def describe(self) -> dict[str, str]:
        """Every part's description; ``meter`` names the sum."""
        info: dict[str, str] = {}
        for part in self._parts:
            info.update(part.describe())
        info["meter"] = self.name
        return info

    def device_state(self) -> dict[str, float | str]:
        """Every part's device state."""
        state: dict[str, float | str] = {}
        for part in self._parts:
            state.update(part.device_state())
        return state

    def close(self) -> None:
        """Close every part."""
        for part in self._parts:
            part.close()
