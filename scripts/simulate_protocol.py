"""Accuracy of the measurement protocols on a simulated 100 ms energy counter (no hardware).

The real protocol code (``irene.measure.protocol.measure_callable``) runs against
``irene.measure.meters.SimulatedDevice``: a virtual clock, a callable of known duration and
power (so the true energy per call is known), and a counter that publishes the energy
integral only every ``tick_s``, at millijoule resolution, like NVML's on an H200. Each case is
measured by

* ``aligned``: the new protocol with its defaults (3 windows of 2 ticks);
* ``fixed, equal time``: the former protocol with its windows sized so that it spends the same
  virtual time per node as ``aligned`` did on the same case;
* ``fixed, 1.0 s``: the former protocol as run on the H200 (3 windows of 1.0 s).

Re-measurement for spread is off in all three, so the time spent is the protocol's own; the
aligned protocol's tick is probed once per simulated device, before its node is timed (the
stage probes once per configuration).

    python scripts/simulate_protocol.py --seeds 20
"""

from __future__ import annotations

import argparse
import statistics
import time

from irene.measure.meters import SimulatedDevice
from irene.measure.protocol import measure_callable, probe_tick_s
from irene.measure.settings import ProtocolSettings, SimulatedMeterSettings

# Per-call durations of bert-base's nodes at 8 x 128 on an H200, roughly: a small op, a
# Linear, an encoder layer, the whole model (6.95 ms for roberta-base in data/h200).
CALLS_S = (20e-6, 200e-6, 1e-3, 7e-3)


def run_case(protocol: str, call_s: float, seed: int, args: argparse.Namespace, *,
             min_window_s: float | None = None, exact: bool = False) -> tuple[float, float, float]:
    """(relative error, virtual seconds spent, window spread) of one simulated node.

    ``exact``: no power noise and no call jitter, so the only error is the protocol's own.
    """
    counter = SimulatedMeterSettings(tick_s=args.tick_s, noise=0.0 if exact else args.noise,
                                     noise_interval_s=args.noise_interval_s, seed=seed)
    device = SimulatedDevice(counter, call_s, args.power_w, call_jitter=0.0 if exact else args.jitter,
                             read_s=args.read_s, gap_power_w=args.gap_power_w)
    if protocol == "aligned":
        # the tick is probed once per configuration, not per node: probe, then time the node
        settings = ProtocolSettings(max_remeasure=0, sample_interval_s=10.0,
                                    tick_s=probe_tick_s(device.meter, device.clock))
    else:
        settings = ProtocolSettings(protocol="fixed", min_window_s=min_window_s, max_remeasure=0,
                                    sample_interval_s=10.0)
    start = device.clock()
    result = measure_callable(device.call, device.meter, settings, clock=device.clock)
    spent = device.clock() - start
    return result.ground_truth_energy / device.energy_per_call_j - 1, spent, result.spread


def summarize(label: str, rows: list[tuple[float, float, float]]) -> str:
    errors = sorted(abs(e) for e, _, _ in rows)
    p95 = errors[min(len(errors) - 1, round(0.95 * (len(errors) - 1)))]
    within = sum(e <= 0.01 for e in errors) / len(errors)
    return (f"| {label} | {statistics.fmean(t for _, t, _ in rows):.2f} | "
            f"{100 * statistics.median(errors):.2f} | {100 * p95:.2f} | {100 * errors[-1]:.2f} | "
            f"{100 * within:.0f} | {100 * statistics.median(s for _, _, s in rows):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="simulated nodes per call duration")
    parser.add_argument("--tick-s", type=float, default=0.1, help="counter update period")
    parser.add_argument("--power-w", type=float, default=300.0, help="power while a call runs")
    parser.add_argument("--gap-power-w", type=float, default=None,
                        help="power during counter reads (default: the call power)")
    parser.add_argument("--noise", type=float, default=0.02, help="relative power noise per interval")
    parser.add_argument("--noise-interval-s", type=float, default=0.01, help="noise interval")
    parser.add_argument("--jitter", type=float, default=0.02, help="relative jitter of a call's duration")
    parser.add_argument("--read-s", type=float, default=20e-6, help="cost of one counter read")
    args = parser.parse_args()
    wall = time.perf_counter()
    print(f"simulated counter: tick {args.tick_s * 1000:g} ms, 1 mJ resolution; power {args.power_w:g} W "
          f"(reads at {args.gap_power_w or args.power_w:g} W), noise {100 * args.noise:g} % per "
          f"{1000 * args.noise_interval_s:g} ms, call jitter {100 * args.jitter:g} %, counter read "
          f"{1e6 * args.read_s:g} us; {args.seeds} seeds x {len(CALLS_S)} call durations "
          f"({', '.join(f'{1e3 * c:g} ms' for c in CALLS_S)})")
    header = ("| protocol | s per node | median abs error % | p95 abs error % | max abs error % | "
              "within 1 % (% of nodes) | median window spread % |\n|---|---:|---:|---:|---:|---:|---:|")
    for exact, title in ((False, "with power noise and call jitter"),
                         (True, "no noise, no jitter: the protocols' own error")):
        new, equal, h200 = [], [], []
        for call_s in CALLS_S:
            for seed in range(args.seeds):
                error, spent, spread = run_case("aligned", call_s, seed, args, exact=exact)
                new.append((error, spent, spread))
                equal.append(run_case("fixed", call_s, seed, args, min_window_s=spent / 3 / 1.1, exact=exact))
                h200.append(run_case("fixed", call_s, seed, args, min_window_s=1.0, exact=exact))
        print(f"\n{title}\n")
        print(header)
        print(summarize("aligned (3 windows x 2 ticks)", new))
        print(summarize("fixed, equal time", equal))
        print(summarize("fixed, 3 x 1.0 s (as run on the H200)", h200))
    print(f"\n({time.perf_counter() - wall:.1f} s of wall time)")


if __name__ == "__main__":
    main()
