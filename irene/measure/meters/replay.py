"""A recorded energy counter, replayed against the protocol's clock (``measure/meter=replay``).

Everything downstream of a meter (probing the tick, aligned windows, the stage) runs on a
counter recorded once on real hardware, without that hardware: ``scripts/gpu_check.sh``
records NVML's total-energy counter on the GPU (``scripts/record_counter_trace.py``), and
``tests/test_measure_replay.py`` replays such traces.

File format (``.csv``, UTF-8): lines starting with ``#`` are comments (where the trace comes
from; ``# phase: <name> <start_s> <end_s>`` marks a phase of the recording), then the header
``time_s,energy_j``, then one sample per line::

    # irene counter trace: nvml on NVIDIA H200, polled without synchronising
    # phase: idle 0.000 3.000
    time_s,energy_j
    0.000000,0.000
    0.000021,0.000
    0.061502,0.000
    0.061530,6.912

``time_s``: seconds since the first sample, strictly increasing; ``energy_j``: the counter's
value in joules, relative to the first sample, never decreasing. A sample is what one read
returned at that time: the counter holds its value between updates, so a recorder keeps the
last read before and the first read after each change (:func:`thin_samples`) and the step
function replayed is the one polled.

Replay: ``read_energy_j()`` returns the value of the last sample at or before the time
elapsed since the meter was created (plus ``offset_s``); past the last sample the trace
starts again (``loop``), its energy carrying on from where it ended.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from irene.errors import InputError, MissingInputError
from irene.measure.meters.base import EnergyMeter, MeterUnavailableError

HEADER = "time_s,energy_j"


@dataclass
class CounterTrace:
    """Samples of a cumulative energy counter.

    Attributes:
        times_s: seconds since the first sample, strictly increasing.
        energies_j: counter values in joules, relative to the first sample, never decreasing.
        comments: the ``#`` lines, without the ``#``.
    """

    times_s: list[float]
    energies_j: list[float]
    comments: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        """Seconds from the first to the last sample."""
        return self.times_s[-1] - self.times_s[0]

    def energy_at_j(self, t_s: float) -> float:
        """The value a read at ``t_s`` (seconds since the first sample) returned: the last
        sample at or before it (the first one before the trace starts)."""
        index = bisect.bisect_right(self.times_s, t_s) - 1
        return self.energies_j[max(index, 0)]

    def updates_s(self) -> list[float]:
        """Times of the first sample after each change of the counter's value."""
        return [t for t, e, previous in zip(self.times_s[1:], self.energies_j[1:], self.energies_j[:-1],
                                            strict=True) if e != previous]

    def update_period_s(self) -> float | None:
        """Median interval between the counter's updates, seconds (``None``: fewer than 3)."""
        updates = self.updates_s()
        gaps = sorted(b - a for a, b in zip(updates, updates[1:], strict=False))
        return gaps[len(gaps) // 2] if len(gaps) >= 2 else None

    def phases(self) -> dict[str, tuple[float, float]]:
        """The ``# phase: <name> <start_s> <end_s>`` comments, by name."""
        found = {}
        for comment in self.comments:
            words = comment.split()
            if len(words) == 4 and words[0] == "phase:":
                found[words[1]] = (float(words[2]), float(words[3]))
        return found

    def mean_power_w(self, start_s: float, end_s: float) -> float:
        """Mean power between two times, from the counter's values there, watts."""
        return (self.energy_at_j(end_s) - self.energy_at_j(start_s)) / (end_s - start_s)


def thin_samples(samples: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Keep the first and last sample and, around every change of value, the last sample
    before it and the first after it: the step function they describe is the same.

    Args:
        samples: ``(time_s, energy_j)`` in time order.
    """
    samples = list(samples)
    kept: list[tuple[float, float]] = []
    for i, sample in enumerate(samples):
        changed_before = i > 0 and samples[i - 1][1] != sample[1]
        changes_after = i + 1 < len(samples) and samples[i + 1][1] != sample[1]
        if i in (0, len(samples) - 1) or changed_before or changes_after:
            kept.append(sample)
    return kept


def format_trace(samples: Sequence[tuple[float, float]], comments: Sequence[str] = ()) -> str:
    """The file text of a trace: samples rebased to the first one (time to the nanosecond,
    energy to the microjoule).

    Args:
        samples: ``(time_s, energy_j)`` as read, in time order (at least two).
        comments: lines written first, each after ``# ``.
    """
    if len(samples) < 2:
        raise ValueError("a counter trace needs at least two samples")
    t0, e0 = samples[0]
    rows: list[tuple[str, str]] = []
    for t, e in samples:
        row = (f"{t - t0:.9f}", f"{e - e0:.6f}")
        if rows and row[0] == rows[-1][0]:
            rows[-1] = row  # two reads within a nanosecond: the later one's value stands
        else:
            rows.append(row)
    lines = [f"# {c}" for c in comments] + [HEADER] + [f"{t},{e}" for t, e in rows]
    return "\n".join(lines) + "\n"


def read_trace(path: str | Path) -> CounterTrace:
    """Read a counter trace file (format: this module's docstring).

    Raises:
        MissingInputError: the file is not there.
        InputError: one line naming the file, the line and the field at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such counter trace file")
    times: list[float] = []
    energies: list[float] = []
    comments: list[str] = []
    header_seen = False
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                comments.append(line[1:].strip())
                continue
            if not header_seen:
                if line.replace(" ", "") != HEADER:
                    raise InputError(f"{path}:{number}: header must be '{HEADER}', got {line[:60]!r}")
                header_seen = True
                continue
            cells = line.split(",")
            if len(cells) != 2:
                raise InputError(f"{path}:{number}: expected 2 fields (time_s,energy_j), got {len(cells)}")
            where = f"{path}:{number}"
            values = []
            for name, cell in zip(("time_s", "energy_j"), cells, strict=True):
                try:
                    value = float(cell)
                except ValueError:
                    raise InputError(f"{where}: field '{name}': not a number: {cell.strip()!r}") from None
                if not math.isfinite(value):
                    raise InputError(f"{where}: field '{name}': not finite: {cell.strip()!r}")
                values.append(value)
            t, e = values
            if times and t <= times[-1]:
                raise InputError(f"{where}: field 'time_s': {t} does not increase (previous {times[-1]})")
            if energies and e < energies[-1]:
                raise InputError(f"{where}: field 'energy_j': {e} decreases (previous {energies[-1]}); "
                                 "a cumulative counter never does")
            times.append(t)
            energies.append(e)
    if not header_seen:
        raise InputError(f"{path}: no header line '{HEADER}'")
    if len(times) < 2:
        raise InputError(f"{path}: a counter trace needs at least two samples, got {len(times)}")
    return CounterTrace([t - times[0] for t in times], [e - energies[0] for e in energies], comments)


class ReplayMeter(EnergyMeter):
    """A recorded counter replayed in the time of ``clock`` (format: the module docstring).

    Its energies describe the recording, never this machine; the trees say ``replay``.

    Args:
        path: the trace file (``.csv``).
        loop: past the last sample, start the trace again (its energy carrying on); False:
            hold the last value (the counter stops).
        offset_s: where in the trace the replay starts, seconds.
        clock: seconds; ``time.perf_counter`` by default (tests pass a virtual clock).

    Raises:
        MissingInputError, InputError: see :func:`read_trace`.
        MeterUnavailableError: the trace's counter never changes (nothing to replay).
    """

    name = "replay"

    def __init__(self, path: str | Path, loop: bool = True, offset_s: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.path = Path(path)
        self.trace = read_trace(self.path)
        if self.trace.energies_j[-1] <= 0:
            raise MeterUnavailableError(f"{self.path}: the counter never changes in this trace")
        self.loop = loop
        self.offset_s = offset_s
        self.clock = clock
        self.start_s = clock()

    @classmethod
    def available(cls, path: str | Path | None = None, **kwargs: object) -> bool:
        """True when ``path`` is a readable trace."""
        if path is None:
            return False
        try:
            read_trace(path)
        except (InputError, MissingInputError, OSError):
            return False
        return True

    def read_energy_j(self) -> float:
        """The recorded counter's value at the time elapsed since creation, in joules."""
        trace = self.trace
        t = self.clock() - self.start_s + self.offset_s
        span = trace.duration_s
        if not self.loop or t <= span:
            return trace.energy_at_j(min(t, span))
        laps, rest = divmod(t, span)
        return laps * trace.energies_j[-1] + trace.energy_at_j(rest)

    def describe(self) -> dict[str, str]:
        """Meter, trace file, its length and the first comment (where it was recorded)."""
        trace = self.trace
        return {"meter": self.name, "replay_path": str(self.path), "replay_samples": str(len(trace.times_s)),
                "replay_duration_s": f"{trace.duration_s:.3f}",
                "replay_source": trace.comments[0] if trace.comments else "unknown"}
