"""Resource utilisation sampled in a background thread while a measurement window runs."""

from __future__ import annotations

import threading

import psutil

from irene.measure.meters.base import Probe  # named readings, e.g. {"gpu": 97.0, "gpu_clk": 1410.0}

__all__ = ["Probe", "UtilisationSampler", "host_probe"]


def host_probe() -> dict[str, float]:
    """CPU utilisation since the previous call and host memory in use, both in percent."""
    return {"cpu": psutil.cpu_percent(interval=None), "mem": psutil.virtual_memory().percent}


class UtilisationSampler:
    """Samples probes every ``interval_s`` between :meth:`start` and :meth:`stop`.

    The samples of all windows accumulate; :meth:`means` averages them per field. One sample
    is always taken at :meth:`stop`, so a window shorter than the interval still has one.

    Args:
        probes: callables returning readings; the host probe (cpu, mem) is always included.
        interval_s: seconds between samples.
    """

    def __init__(self, probes: list[Probe] | None = None, interval_s: float = 0.1) -> None:
        self.probes = [host_probe, *(probes or [])]
        self.interval_s = interval_s
        self.samples: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        for probe in self.probes:
            for key, value in probe().items():
                self.samples.setdefault(key, []).append(float(value))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> None:
        """Start sampling (primes psutil's CPU counter so the first sample covers the window)."""
        psutil.cpu_percent(interval=None)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="irene-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and take a last sample."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()

    def means(self) -> dict[str, float]:
        """Mean of every sampled field over all windows so far."""
        return {k: sum(v) / len(v) for k, v in self.samples.items() if v}
