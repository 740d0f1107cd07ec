"""Per-node overhead of the aligned protocol on CPU, and the projected time of the paper's grid.

A fast fake meter (``SimulatedMeter`` with 1 ms ticks) stands in for hardware, so almost all
of a node's time is the protocol's own: warm-up and calibration calls, waiting for the first
counter update, the sampler thread, the counter reads between chunks and the bookkeeping.
Two workloads: a no-op callable (the protocol alone) and the 22 distinct nodes of
``tiny/bert`` at 2 x 8 (real modules, CPU).

The projection for an H200 (100 ms counter) adds to each node what the counter imposes:
the windows (``windows`` x ``window_ticks`` ticks), half a tick on average waiting for the
first update, and per configuration the tick probe and the steady state.

    python scripts/benchmark_measure_overhead.py
"""

from __future__ import annotations

import argparse
import statistics

import torch

from irene.data.architectures import model_from_name
from irene.measure.meters import SimulatedMeter
from irene.measure.protocol import measure_callable
from irene.measure.settings import ProtocolSettings, SimulatedMeterSettings
from irene.measure.trace import trace_model

# distinct nodes (reuse_identical) of the paper's six models at 8 x 128 (data/h200/trees.jsonl)
PAPER_DISTINCT_NODES = {"bert-base-uncased": 23, "distilbert-base-uncased": 16, "roberta-base": 23,
                        "gpt2": 15, "distilgpt2": 15, "openai-gpt": 15}
PAPER_SHAPES = 28  # batch 8, 16, 24, 32 x seq 32...256 (device 1 of the published data)


def per_node(fn, settings: ProtocolSettings, meter: SimulatedMeter, repeats: int) -> dict[str, float]:
    """Mean seconds per node: total, inside windows, outside; per-chunk read + bookkeeping."""
    totals, inside, gaps = [], [], []
    for _ in range(repeats):
        m = measure_callable(fn, meter, settings)
        totals.append(m.measuring_s)
        inside.append(sum(w.duration_s for w in m.windows))
        chunks = sum(w.calls for w in m.windows) / max(m.chunk, 1)
        gaps.append(sum(w.duration_s - w.busy_s for w in m.windows) / chunks)
    return {"total_s": statistics.fmean(totals), "windows_s": statistics.fmean(inside),
            "outside_s": statistics.fmean(totals) - statistics.fmean(inside),
            "per_chunk_s": statistics.fmean(gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="measurements per no-op node")
    parser.add_argument("--tick-s", type=float, default=0.001, help="tick of the fast fake meter")
    parser.add_argument("--h200-tick-s", type=float, default=0.1, help="NVML tick on an H200")
    args = parser.parse_args()
    torch.set_num_threads(1)
    defaults = ProtocolSettings()
    fast = ProtocolSettings(tick_s=args.tick_s, max_remeasure=0, sample_interval_s=0.1)
    meter = SimulatedMeter(SimulatedMeterSettings(tick_s=args.tick_s, noise=0.0))
    align_wait_s = args.tick_s / 2

    noop = per_node(lambda: None, fast, meter, args.repeats)
    trace = trace_model(model_from_name("tiny/bert"), 2, 8, "tiny/bert", capture_inputs=True)
    seen, nodes = set(), []
    for node in trace.nodes():
        if node.signature not in seen:
            seen.add(node.signature)
            nodes.append(node)
    with torch.no_grad():
        rows = [per_node(node.call, fast, meter, 1) for node in nodes]
    tiny = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}

    print(f"CPU: {torch.get_num_threads()} torch thread, fake meter with {1000 * args.tick_s:g} ms ticks; "
          f"defaults {defaults.windows} windows x {defaults.window_ticks} ticks, chunks of "
          f"{1000 * defaults.chunk_s:g} ms, {defaults.warmup} warm-up calls\n")
    print("| workload | per node, total ms | in windows ms | outside windows ms | of which waiting for "
          "the first update ms | protocol overhead ms | read + bookkeeping per chunk us |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    workloads = ((f"no-op callable ({args.repeats} nodes)", noop),
                 (f"tiny/bert 2x8 ({len(nodes)} nodes)", tiny))
    for label, r in workloads:
        print(f"| {label} | {1000 * r['total_s']:.1f} | {1000 * r['windows_s']:.1f} | "
              f"{1000 * r['outside_s']:.1f} | {1000 * align_wait_s:.1f} | "
              f"{1000 * (r['outside_s'] - align_wait_s):.1f} | {1e6 * r['per_chunk_s']:.1f} |")

    # ------------------------------------------------------------------ projection, H200
    tick = args.h200_tick_s
    overhead_s = tiny["outside_s"] - align_wait_s  # CPU-side cost per node beyond the wait
    windows_s = defaults.windows * defaults.window_ticks * tick
    node_s = windows_s + tick / 2 + overhead_s
    probe_s = 4.5 * tick  # five updates: four and a half ticks on average
    settle_s = defaults.settle_min_s + 2 * defaults.window_ticks * tick  # >= 1 s and 3 settled windows
    bert = PAPER_DISTINCT_NODES["bert-base-uncased"] + 1  # + the root's second measurement
    per_bert = bert * node_s + probe_s + settle_s
    per_shape = sum(n + 1 for n in PAPER_DISTINCT_NODES.values()) * node_s + len(PAPER_DISTINCT_NODES) * (
        probe_s + settle_s)
    print(f"""
projection on an H200 (NVML tick {1000 * tick:g} ms), per node:
  windows        {defaults.windows} x {defaults.window_ticks} ticks x {tick:g} s = {windows_s:.3f} s
  first update   tick / 2 on average       = {tick / 2:.3f} s
  protocol       measured above (tiny/bert) = {overhead_s:.3f} s
  node           = {node_s:.3f} s
per configuration: tick probe ~4.5 ticks = {probe_s:.2f} s, steady state >= {defaults.settle_min_s:g} s
  plus three settled {defaults.window_ticks}-tick windows ~ {settle_s:.2f} s
bert-base 8x128: ({PAPER_DISTINCT_NODES['bert-base-uncased']} distinct nodes + root again) = {bert} x \
{node_s:.3f} + {probe_s:.2f} + {settle_s:.2f} = {per_bert:.1f} s (target <= 20 s)
paper grid: {sum(PAPER_DISTINCT_NODES.values())} distinct nodes + 6 roots per shape x {node_s:.3f} s + 6 x \
({probe_s:.2f} + {settle_s:.2f}) s = {per_shape:.0f} s per shape; x {PAPER_SHAPES} shapes = \
{PAPER_SHAPES * per_shape / 60:.0f} min
  (without model build and tracing, spread re-measurements or drift passes; calls longer than
  {1000 * defaults.window_ticks * tick / defaults.min_chunks:g} ms get windows of {defaults.min_chunks} \
calls, rounded up to whole ticks)""")


if __name__ == "__main__":
    main()
