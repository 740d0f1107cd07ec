"""The GPU check's steps without a GPU: its summary tool in-process, the script in --dry-run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import H200_TREES

ROOT = Path(__file__).resolve().parents[1]

H200 = H200_TREES


def _summary(monkeypatch, capsys, *argv: str) -> tuple[int, list[str]]:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import measure_summary
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(sys, "argv", ["measure_summary.py", *argv])
    status = measure_summary.main()
    return status, capsys.readouterr().out.strip().splitlines()


def test_summary_compare_and_check(monkeypatch, capsys):
    if not H200.is_file():
        pytest.skip(f"H200 trees not found at {H200}")
    status, lines = _summary(monkeypatch, capsys, str(H200), "--compare", str(H200),
                             "--check", "bert-base-uncased", "8", "128")
    assert lines[0].startswith("bert-base-uncased 8x128: 23/226 nodes measured, root 3.819 J")
    assert any(x.startswith("bert-base-uncased 8x128 measured twice: root +0.00%") for x in lines)
    # measured with the former protocol: no time recorded, a 4 % median spread: both fail
    assert lines[-3].startswith("FAIL") and lines[-2].startswith("FAIL") and lines[-1].startswith("PASS")
    assert status == 1
    status, _ = _summary(monkeypatch, capsys, str(H200), "--check", "bert-base-uncased", "8", "128",
                         "--informational")
    assert status == 0


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The whole script on CPU with a simulated counter: grid, repeat, summary, trees last."""
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    script = ROOT / "scripts" / "gpu_check.sh"
    out = subprocess.run(["bash", str(script), "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == f"trees: {tmp_path / 'trees.jsonl'} {tmp_path / 'repeat.jsonl'}"
    summary = lines[lines.index(next(x for x in lines if x.startswith("== gpu_check: summary"))) + 1:]
    assert [x.split(":")[0] for x in summary[:2]] == ["tiny/gpt2 2x4", "tiny/gpt2 2x8"]
    assert summary[1].startswith("tiny/gpt2 2x8: 14/30 nodes measured, root ")
    assert any(x.startswith("tiny/gpt2 2x8 measured twice: root ") for x in summary)
    assert sum(x.startswith(("PASS", "FAIL")) for x in summary) == 3
    assert (tmp_path / "hydra" / "grid").is_dir()  # Hydra wrote into --out, not the checkout
    # step 4: the raw counter, in the replay meter's format, replayable through the protocol
    assert any(x.startswith(f"counter trace: {tmp_path / 'counter_trace.csv'}: ") for x in lines)
    assert not any("counter trace FAILED" in x for x in lines)
    from irene.measure.meters.replay import read_trace
    from tests.test_measure_replay import test_a_recorded_trace_replays_through_the_protocol

    trace = read_trace(tmp_path / "counter_trace.csv")
    assert "SIMULATED" in trace.comments[0] and set(trace.phases()) == {"idle", "load"}
    assert trace.update_period_s() == pytest.approx(0.01, rel=0.1)  # the dry run's 10 ms ticks
    test_a_recorded_trace_replays_through_the_protocol(tmp_path / "counter_trace.csv")
