"""Settings of a measurement: the protocol and the meter, with their only defaults.

Plain dataclasses without torch, so the Hydra schema of the ``measure`` group
(``pipelines/config.py``) inherits them: a default lives here and nowhere else, a typo or a
wrong type fails when the config is composed, and :meth:`ProtocolSettings.validate` /
:meth:`MeterSettings.validate` reject out-of-range values with one line naming the field and
its valid range before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from irene import errors

PROTOCOLS = ("aligned", "fixed")
DRIFT_ACTIONS = ("flag", "remeasure")


# An out-of-range setting; the message is one line: ``measure.<field>: must be ..., got ...``.
SettingsError = errors.SettingsError


def _check(ok: bool, name: str, rule: str, value: object, prefix: str) -> None:
    if not ok:
        raise SettingsError(f"{prefix}{name}: must be {rule}, got {value!r}")


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class ProtocolSettings:
    """How every node is measured (see docs/measure.md, "Protocol")."""

    protocol: str = "aligned"  # aligned: windows of whole counter ticks | fixed: the former timed windows
    min_window_s: float = 0.2  # shortest energy window, seconds (fixed: >= 1 s on a 100 ms counter)
    windows: int = 3  # windows per node; their spread is recorded as energy_std_j
    window_ticks: int = 2  # aligned: counter updates a window spans, at least
    chunk_s: float = 0.002  # aligned: seconds of calls between two counter reads
    min_chunks: int = 10  # aligned: a window spans at least this many chunks (or ticks, if shorter)
    tick_s: float | None = None  # counter update period, seconds; null: probed at start
    warmup: int = 3  # calls before calibration (allocator, kernel selection, caches)
    reuse_identical: bool = True  # identical nodes (type, input and parameter shapes) share one measurement
    sample_interval_s: float = 0.1  # seconds between utilisation samples
    max_repeats: int = 10_000_000  # upper bound on calls per window
    settle_min_s: float = 1.0  # steady state: run the whole model at least this long (0: no settling)
    settle_max_s: float = 30.0  # steady state: give up (and flag it) after this long
    settle_tolerance: float = 0.02  # steady state: last 3 windows' power and time within this relative range
    spread_threshold: float = 0.05  # re-measure a node whose window spread (std / mean) exceeds this
    max_remeasure: int = 2  # re-measurements per node for spread; still above: flagged
    drift_threshold: float = 0.03  # root re-measured at the end: relative change above this is drift
    drift_action: str = "remeasure"  # on drift: flag | remeasure (one more pass over every node)
    shuffle: bool = True  # measure nodes in a random order (root first and last), so drift is not depth
    order_seed: int = 0  # seed of that order

    def validate(self, prefix: str = "measure.") -> ProtocolSettings:
        """Check every range; raise :class:`SettingsError` naming the first bad field.

        Returns:
            ``self``, so that ``settings = ProtocolSettings(...).validate()`` reads naturally.
        """
        _check(self.protocol in PROTOCOLS, "protocol", f"one of {', '.join(PROTOCOLS)}", self.protocol,
               prefix)
        for name in ("min_window_s", "chunk_s", "sample_interval_s", "settle_tolerance",
                     "spread_threshold", "drift_threshold"):
            value = getattr(self, name)
            _check(_number(value) and value > 0, name, "a number > 0", value, prefix)
        for name, low in (("windows", 1), ("window_ticks", 1), ("min_chunks", 1), ("warmup", 0),
                          ("max_repeats", 1), ("max_remeasure", 0)):
            value = getattr(self, name)
            _check(_int(value) and value >= low, name, f"an integer >= {low}", value, prefix)
        _check(self.tick_s is None or (_number(self.tick_s) and self.tick_s > 0), "tick_s",
               "null (probe the meter) or a number > 0", self.tick_s, prefix)
        _check(_number(self.settle_min_s) and self.settle_min_s >= 0, "settle_min_s", "a number >= 0",
               self.settle_min_s, prefix)
        _check(_number(self.settle_max_s) and self.settle_max_s >= self.settle_min_s, "settle_max_s",
               f"a number >= settle_min_s ({self.settle_min_s})", self.settle_max_s, prefix)
        _check(self.drift_action in DRIFT_ACTIONS, "drift_action", f"one of {', '.join(DRIFT_ACTIONS)}",
               self.drift_action, prefix)
        return self


@dataclass
class SimulatedMeterSettings:
    """A simulated energy counter (``measure/meter=simulated``, whose YAML repeats these
    defaults): tests, benchmarks, the protocol's proof."""

    tick_s: float = 0.1  # counter update period, seconds (0: a continuous counter)
    power_w: float = 300.0  # mean power, watts
    noise: float = 0.02  # relative standard deviation of the power over each noise_interval_s
    noise_interval_s: float = 0.01  # seconds over which the power noise is constant
    resolution_j: float = 0.001  # counter resolution, joules (NVML: 1 mJ; 0: exact)
    seed: int = 0  # seed of the noise and of the tick phase
    # when the counter updates: regular (every tick_s) | h200 (gaps as measured on an H200:
    # median tick_s, from 0.3 to 1.25 tick_s under load)
    tick_timing: str = "regular"

    def validate(self, prefix: str = "measure.meter.") -> SimulatedMeterSettings:
        """Check every range; raise :class:`SettingsError` naming the first bad field."""
        for name, rule in (("tick_s", ">= 0"), ("power_w", "> 0"), ("noise", ">= 0"),
                           ("noise_interval_s", "> 0"), ("resolution_j", ">= 0")):
            value = getattr(self, name)
            ok = _number(value) and (value > 0 if rule == "> 0" else value >= 0)
            _check(ok, name, f"a number {rule}", value, prefix)
        _check(self.tick_timing in ("regular", "h200"), "tick_timing", "regular or h200",
               self.tick_timing, prefix)
        return self


@dataclass
class MeterSettings:
    """Which energy meter gives the ground truth (see docs/measure.md, "Meters and features")."""

    # the meter's config: a conf/measure/meter/<name>.yaml (its _target_ and arguments), chosen
    # with measure/meter=<name> (default: auto, in the measure option's defaults list)
    meter: Any = None
    gpu_index: int = 0  # GPU of device=cuda and of the NVML meter (its YAML reads this key)

    def validate(self, prefix: str = "measure.") -> MeterSettings:
        """Check every range; raise :class:`SettingsError` naming the first bad field."""
        _check(_int(self.gpu_index) and self.gpu_index >= 0, "gpu_index", "an integer >= 0",
               self.gpu_index, prefix)
        return self
