"""CPU package energy through Intel RAPL counters in ``/sys/class/powercap``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from irene.measure.meters.base import EnergyMeter, MeterUnavailableError

DEFAULT_POWERCAP_ROOT = Path("/sys/class/powercap")
_PACKAGE_DOMAIN = re.compile(r"^intel-rapl:\d+$")  # packages only, not intel-rapl:0:0 subdomains

PERMISSION_HELP = (
    "RAPL energy counters ({path}) are readable only by root since Linux 5.10 "
    "(CVE-2020-8694, the PLATYPUS power side channel). Run the measurement as root, or "
    "grant read access once per boot: sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj"
)


class RaplPermissionError(MeterUnavailableError, PermissionError):
    """``energy_uj`` exists but cannot be read by this user."""


@dataclass
class _Domain:
    path: Path
    max_range_uj: int
    last_uj: int
    total_uj: int = 0


def _read_int(path: Path) -> int:
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except PermissionError as error:
        raise RaplPermissionError(PERMISSION_HELP.format(path=path)) from error


def package_domains(root: str | Path = DEFAULT_POWERCAP_ROOT) -> list[Path]:
    """The package-level RAPL domains (``intel-rapl:N``) under a powercap root, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _PACKAGE_DOMAIN.match(p.name) and (p / "energy_uj").exists())


class RaplMeter(EnergyMeter):
    """Sum of the package domains' energy counters, wrap-around corrected.

    Each ``energy_uj`` counter (microjoules) wraps to 0 after ``max_energy_range_uj``; a read
    that is smaller than the previous one is taken as one wrap. Reads must therefore come
    more often than one wrap period (minutes at full load on current CPUs).

    Args:
        root: powercap directory (``/sys/class/powercap``; configurable for tests).

    Raises:
        MeterUnavailableError: when no package domain exists.
        RaplPermissionError: when a counter is not readable (root-only since CVE-2020-8694).
    """

    name = "rapl"
    measured_devices = frozenset({"cpu"})

    def __init__(self, root: str | Path = DEFAULT_POWERCAP_ROOT) -> None:
        self.root = Path(root)
        paths = package_domains(self.root)
        if not paths:
            raise MeterUnavailableError(f"no RAPL package domain (intel-rapl:N) under {root}")
        self.domains = [
            _Domain(p, _read_int(p / "max_energy_range_uj"), _read_int(p / "energy_uj")) for p in paths
        ]

    @classmethod
    def available(cls, root: str | Path = DEFAULT_POWERCAP_ROOT, **kwargs: object) -> bool:
        """True when at least one package domain exists and every counter is readable."""
        try:
            cls(root)
            return True
        except MeterUnavailableError:
            return False

    def read_energy_j(self) -> float:
        """Package energy since this meter was created, in joules (all packages summed)."""
        for domain in self.domains:
            now = _read_int(domain.path / "energy_uj")
            delta = now - domain.last_uj
            if delta < 0:  # the counter wrapped around max_energy_range_uj
                delta += domain.max_range_uj
            domain.total_uj += delta
            domain.last_uj = now
        return sum(d.total_uj for d in self.domains) / 1e6

    def device_state(self) -> dict[str, float | str]:
        """CPU clock (MHz) and the hottest package/core temperature (°C), where the OS exposes them."""
        import psutil

        state: dict[str, float | str] = {}
        try:
            freq = psutil.cpu_freq()
            if freq is not None:
                state["cpu_clock_mhz"] = float(freq.current)
        except Exception:  # noqa: BLE001 - descriptive only
            pass
        try:
            readings = [t.current for group in psutil.sensors_temperatures().values() for t in group]
            if readings:
                state["cpu_temperature_c"] = float(max(readings))
        except Exception:  # noqa: BLE001 - not on every OS
            pass
        return state

    def describe(self) -> dict[str, str]:
        """Meter and the package domains it sums."""
        names = []
        for domain in self.domains:
            name_file = domain.path / "name"
            label = name_file.read_text().strip() if name_file.exists() else "?"
            names.append(f"{domain.path.name}({label})")
        return {"meter": self.name, "rapl_domains": ",".join(names)}
