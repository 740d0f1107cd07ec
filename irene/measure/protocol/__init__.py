"""The measurement protocol: every node of a traced forward pass, re-run in isolation.

Two protocols (``ProtocolSettings.protocol``):

* ``aligned`` (default): the meter's update period ("tick") is probed once; a node runs in
  chunks of about ``chunk_s`` of calls with a device synchronise and a counter read after
  each chunk. A window opens at a counter update and closes at the update that ends its
  ``window_ticks`` ticks; the calls between the two updates are counted (interpolated within
  the chunk that saw the update), so the window's energy is exact to the counter's resolution
  and the per-call energy is exact up to where in one chunk the update fell. Windows are
  contiguous: one update closes a window and opens the next. The per-call energy of a node
  is the windows' total energy over their total calls.
* ``fixed``: the former protocol: windows of at least ``min_window_s`` of calibrated repeats,
  read at arbitrary times, so each read can be up to one tick stale.

Around the nodes (:func:`measure_nodes`): the device is first brought to a steady state by
running the whole model until its power and time per call settle; the root is measured
first and again last, and a change beyond ``drift_threshold`` is drift (flagged, and with
``drift_action: remeasure`` every node is measured once more); a node whose window spread
exceeds ``spread_threshold`` is re-measured. A machine without a meter gets times and
utilisation only: ``ground_truth_energy`` stays absent.

Files: :mod:`.counters` (reading and probing the counters), :mod:`.windows` (the aligned
protocol), :mod:`.fixed` (the fixed protocol), :mod:`.node` (one node, re-measured for its
spread), :mod:`.settling` (the steady state), :mod:`.drift` (a whole trace, drift).
"""

from __future__ import annotations

from irene.measure.protocol.counters import Clock, MeterSet, device_sync, no_sync, probe_tick_s
from irene.measure.protocol.drift import ProgressCallback, TraceMeasurement, measure_nodes, measure_trace
from irene.measure.protocol.fixed import calibrate_repeats
from irene.measure.protocol.node import measure_callable
from irene.measure.protocol.settling import SettleReport, settle
from irene.measure.protocol.windows import MAX_READ_SHARE, NodeMeasurement, Window
from irene.measure.settings import ProtocolSettings

__all__ = [
    "MAX_READ_SHARE",
    "Clock",
    "MeterSet",
    "NodeMeasurement",
    "ProgressCallback",
    "ProtocolSettings",
    "SettleReport",
    "TraceMeasurement",
    "Window",
    "calibrate_repeats",
    "device_sync",
    "measure_callable",
    "measure_nodes",
    "measure_trace",
    "no_sync",
    "probe_tick_s",
    "settle",
]
