"""Record a meter's raw counter samples (time, energy) into a trace the replay meter reads.

    python scripts/record_counter_trace.py --out trace.csv [--idle-s 3] [--load-s 3] [overrides]

The meter is built as ``stage=measure`` builds it, from the same config and overrides (e.g.
``measure.device=cuda measure/meter=nvml measure.meter.synchronize=false``, or, without
hardware, ``measure.device=cpu measure/meter=simulated``). The counter is read as fast as
possible, first for ``--idle-s`` seconds with the device idle, then for ``--load-s`` seconds
while square matrix products run on the device (on a GPU the products are queued and the
counter is read while they run; on the CPU between products). Only the reads around each
change of the counter's value are kept (the replayed step function is the same), and the
file says where it comes from (format: ``irene/measure/meters/replay.py``). Written
atomically; prints one line with the samples kept, the update period seen and the powers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from pipelines.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["stage=measure", *overrides])


class Recorder:
    """Reads a meter as fast as it can; keeps the reads around each change of value."""

    def __init__(self, meter, clock=time.perf_counter) -> None:
        self.meter, self.clock = meter, clock
        self.kept: list[tuple[float, float]] = []
        self.last: tuple[float, float] | None = None
        self.reads = 0

    def read(self) -> None:
        sample = (self.clock(), self.meter.read_energy_j())
        self.reads += 1
        if self.last is None or sample[1] != self.last[1]:
            if self.last is not None and (not self.kept or self.kept[-1] is not self.last):
                self.kept.append(self.last)  # the last read before the change
            self.kept.append(sample)
        self.last = sample

    def finish(self) -> list[tuple[float, float]]:
        if self.last is not None and (not self.kept or self.kept[-1] is not self.last):
            self.kept.append(self.last)
        return self.kept

    def poll_for(self, seconds: float, busy=None) -> tuple[float, float]:
        """Read for ``seconds`` (``busy()``: True while queued work still runs; called
        between reads, it may queue more). Returns the phase's (start, end) clock times."""
        start = self.clock()
        while self.clock() - start < seconds:
            if busy is not None:
                busy()
            self.read()
        return start, self.clock()


def decimate(samples: list[tuple[float, float]], max_samples: int) -> list[tuple[float, float]]:
    """At most about ``max_samples``: a counter that changes at every read keeps one sample per
    ``duration / max_samples`` (the step function then approximated at that spacing)."""
    if len(samples) <= max_samples:
        return samples
    spacing_s = (samples[-1][0] - samples[0][0]) / max_samples
    kept = [samples[0]]
    for sample in samples[1:-1]:
        if sample[0] - kept[-1][0] >= spacing_s:
            kept.append(sample)
    return [*kept, samples[-1]]


def matmul_load(device: str, size: int):
    """A callable that keeps the device busy with ``size``-square matrix products."""
    import torch

    on_gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    if not on_gpu:
        return lambda: torch.mm(a, b)  # synchronous: the counter is read between products
    pending: list = []

    def busy() -> None:
        # keep a few batches queued; the counter is read while they run (no synchronise)
        while pending and pending[0].query():
            pending.pop(0)
        while len(pending) < 3:
            for _ in range(8):
                torch.mm(a, b)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(a.device))  # the stream the products run on
            pending.append(event)

    return busy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the trace file to write (.csv)")
    parser.add_argument("--idle-s", type=float, default=3.0, help="seconds read with the device idle")
    parser.add_argument("--load-s", type=float, default=3.0, help="seconds read under matrix products")
    parser.add_argument("--size", type=int, default=0,
                        help="matrix size (default: 8192 on a GPU, 256 on the CPU)")
    parser.add_argument("--label", default="",
                        help="added to the first comment (e.g. 'simulated, for tests')")
    parser.add_argument("--max-samples", type=int, default=20000,
                        help="at most about this many samples in the file (see decimate)")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for stage=measure")
    args = parser.parse_args(argv)

    import torch

    from irene.data.io import atomic_write_text
    from irene.measure.meters.replay import format_trace
    from irene.measure.runner import resolve_device
    from pipelines.stages.measure import build_meter, measure_settings

    settings = measure_settings(_compose(args.overrides))
    device = resolve_device(settings.device, settings.gpu_index)
    meter = build_meter(settings, device)
    if not meter.measures_energy:
        print(f"record_counter_trace: meter {meter.name} measures no energy: nothing to record",
              file=sys.stderr)
        return 2
    size = args.size or (8192 if device.startswith("cuda") else 256)
    load = matmul_load(device, size)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    recorder = Recorder(meter)
    try:
        idle = recorder.poll_for(args.idle_s)
        loaded = recorder.poll_for(args.load_s, busy=load)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        samples = decimate(recorder.finish(), args.max_samples)
        info = meter.describe()
    finally:
        meter.close()
    t0 = samples[0][0]
    source = ", ".join(f"{k}={v}" for k, v in info.items())
    comments = [f"irene counter trace{': ' + args.label if args.label else ''}; {source}",
                f"device: {device}; load: {size}x{size} matrix products; reads: {recorder.reads} "
                f"in {samples[-1][0] - t0:.3f} s, kept: the reads around each change of value"
                + (f" (decimated to {len(samples)})" if len(recorder.kept) > len(samples) else ""),
                f"phase: idle {max(0.0, idle[0] - t0):.3f} {idle[1] - t0:.3f}",
                f"phase: load {loaded[0] - t0:.3f} {loaded[1] - t0:.3f}"]
    atomic_write_text(args.out, format_trace(samples, comments))

    from irene.measure.meters.replay import read_trace

    trace = read_trace(args.out)
    phases = trace.phases()
    powers = {name: trace.mean_power_w(*span) for name, span in phases.items()}
    period = trace.update_period_s()
    updates = trace.updates_s()
    gaps = [b - a for a, b in zip(updates, updates[1:], strict=False)]
    print(f"counter trace: {args.out}: {len(trace.times_s)} samples of {recorder.reads} reads, "
          f"update period {period if period is None else f'{period * 1000:.1f} ms'} "
          f"(spread {statistics.pstdev(gaps) * 1000 if len(gaps) > 1 else 0:.1f} ms), "
          + ", ".join(f"{name} {power:.1f} W" for name, power in powers.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
