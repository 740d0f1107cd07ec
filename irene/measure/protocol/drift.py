"""Every node of a trace: the root measured first and last, drift flagged or re-measured.

The device is first brought to a steady state (:func:`~irene.measure.protocol.settling.settle`);
the root is measured first and again last, and a change beyond ``drift_threshold`` is drift
(flagged, and with ``drift_action: remeasure`` every node is measured once more).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from irene.measure.meters.base import EnergyMeter
from irene.measure.protocol.counters import Clock, MeterSet, no_sync
from irene.measure.protocol.node import _measure_node
from irene.measure.protocol.settling import settle
from irene.measure.protocol.windows import NodeMeasurement
from irene.measure.sampler import Probe
from irene.measure.settings import ProtocolSettings
from irene.measure.trace import Trace, TraceNode

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]


@dataclass
class TraceMeasurement:
    """Every node's fields and what happened while measuring them.

    Attributes:
        fields: measured node fields per scope, for :func:`irene.measure.trace.node_to_dict`.
        report: protocol, meters, tick, steady state, device states, drift, re-measured and
            flagged nodes, time spent: the record's ``measurement`` block.
    """

    fields: dict[str, dict]
    report: dict[str, Any]


def _representatives(trace: Trace, reuse: bool) -> list[TraceNode]:
    """The nodes to measure: the first (in tree order) of each signature, or all."""
    seen: set[str] = set()
    chosen = []
    for node in trace.nodes():
        if reuse and node.signature in seen:
            continue
        seen.add(node.signature)
        chosen.append(node)
    return chosen


def _value(m: NodeMeasurement) -> float:
    return m.ground_truth_energy if m.ground_truth_energy is not None else m.times_mean


def measure_nodes(
    trace: Trace,
    meter: EnergyMeter,
    settings: ProtocolSettings,
    *,
    sync: Callable[[], None] = no_sync,
    gpu_meter: EnergyMeter | None = None,
    probes: list[Probe] | None = None,
    clock: Clock = time.perf_counter,
    on_progress: ProgressCallback | None = None,
) -> TraceMeasurement:
    """Measure every node of a trace captured with ``capture_inputs=True``.

    Args:
        trace: the traced forward pass, with captured inputs.
        meter: ground-truth meter.
        settings: protocol settings.
        sync: device synchronise.
        gpu_meter: optional GPU counter for ``gpu_energy_mean``.
        probes: extra utilisation probes.
        clock: seconds.
        on_progress: called after every node as ``(done, total, scope)``.

    Returns:
        Node fields per scope and the measurement report.
    """
    start_s = clock()
    meters = MeterSet(meter, gpu_meter)
    tick_s = meters.probe(clock, settings.tick_s) if settings.protocol == "aligned" else None
    ids = {n.scope: trace.node_id(n) for n in trace.nodes()}
    root = trace.root
    others = [n for n in _representatives(trace, settings.reuse_identical) if n is not root]
    rng = random.Random(settings.order_seed)
    plan = {"total": len(others) + 2, "done": 0}

    def measure(node: TraceNode) -> NodeMeasurement:
        result = _measure_node(node.call, meters, settings, sync=sync, clock=clock, probes=probes)
        plan["done"] += 1
        if on_progress is not None:
            on_progress(plan["done"], plan["total"], node.scope)
        log.debug("%s: %.3g s/call x %d, spread %.2f%%", node.scope, result.times_mean, result.repeats,
                  100 * result.spread)
        return result

    def one_pass() -> dict[str, NodeMeasurement]:
        order = list(others)
        if settings.shuffle:
            rng.shuffle(order)  # drift then hits random nodes, not one depth or one layer
        return {node.scope: measure(node) for node in order}

    with torch.no_grad():
        state_before = meters.device_state()
        settled = settle(root.call, meters, settings, sync=sync, clock=clock)
        state_start = meters.device_state()
        root_first = measure(root)
        results = one_pass()
        root_last = measure(root)
        drift_first = _value(root_last) / _value(root_first) - 1
        drift, passes, moved = drift_first, 1, []
        if abs(drift_first) > settings.drift_threshold and settings.drift_action == "remeasure":
            log.warning("drift: the root moved %+.1f%% between the first and the last node; "
                        "measuring every node once more", 100 * drift_first)
            plan["total"] += len(others) + 1
            again = one_pass()
            root_again = measure(root)
            moved = [ids[s] for s, m in again.items()
                     if abs(_value(m) / _value(results[s]) - 1) > settings.drift_threshold]
            results, passes = again, 2
            drift = _value(root_again) / _value(root_last) - 1
            root_final, root_parts = root_last.pooled_with(root_again), (root_last, root_again)
        else:
            root_final, root_parts = root_first.pooled_with(root_last), (root_first, root_last)
        state_end = meters.device_state()
    results[root.scope] = root_final
    if abs(drift) > settings.drift_threshold:
        log.warning("drift: the root moved %+.1f%% during the measurement (flagged in the record)",
                    100 * drift)

    fields: dict[str, dict] = {}
    by_signature = {n.signature: n.scope for n in [root, *others]}
    for node in trace.nodes():
        if node.scope in results:
            fields[node.scope] = results[node.scope].fields()
        else:
            source = by_signature[node.signature]
            fields[node.scope] = {**fields.get(source, results[source].fields()),
                                  "measurement_reused_from": ids[source]}
    spreads = {s: m.spread for s, m in results.items()}
    report: dict[str, Any] = {
        "protocol": settings.protocol,
        "meter": meter.name,
        "ground_truth_meter": "+".join(meters.ground_truth_names) or "none",
        "gpu_energy_mean_meter": meters.gpu_name,
        "tick_s": tick_s,
        "ticks_s": meters.ticks_s,
        "windows": settings.windows,
        "settle": settled.as_dict(),
        "state_before": state_before,
        "state_start": state_start,
        "state_end": state_end,
        "drift": drift,
        "drift_first_pass": drift_first,
        "drift_flagged": abs(drift) > settings.drift_threshold,
        "passes": passes,
        "moved": moved,
        # the root's pooled measurement counts both of its measurements' attempts: judge each
        "remeasured_for_spread": sorted(
            ids[s] for s, m in results.items()
            if (any(part.attempts > 1 for part in root_parts) if s == root.scope else m.attempts > 1)),
        "high_spread": sorted(ids[s] for s, v in spreads.items() if v > settings.spread_threshold),
        "nodes_measured": len(results),
        "measurements": plan["done"],
        "seconds": clock() - start_s,
    }
    return TraceMeasurement(fields=fields, report=report)


def measure_trace(trace: Trace, meter: EnergyMeter, settings: ProtocolSettings, **kwargs: Any
                  ) -> dict[str, dict]:
    """The node fields of :func:`measure_nodes` (same arguments), without the report."""
    return measure_nodes(trace, meter, settings, **kwargs).fields
