"""stage=transfer: the learning curve of a new device from k of its measurements, end to end."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from irene.data.tree import iter_nodes, write_trees

ROOT = Path(__file__).resolve().parents[1]


def _scaled(trees, factor_by_type):
    """The same trees on a 'device' whose energies differ by node type."""
    out = copy.deepcopy(trees)
    for tree in out:
        for node in iter_nodes(tree["frontend_tree"]):
            node["ground_truth_energy"] *= factor_by_type[node["type"]]
    return out


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "run.py", "stage=transfer", "tracking=off", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "IRENE_OUTPUTS": str(tmp_path / "out")})


@pytest.mark.slow
def test_transfer_writes_the_default_methods_curve_and_one_shot_recovers_a_scaled_device(
        tmp_path, small_trees):
    source = write_trees(tmp_path / "source.jsonl", small_trees)
    target = write_trees(tmp_path / "target.jsonl",
                         _scaled(small_trees, {"ml": 1.5, "module": 1.5, "model": 1.5}))
    out = _cli(tmp_path, f"source={source}", f"target={target}", "shots=[0,1]", "draws=2")
    assert out.returncode == 0, out.stderr[-3000:]
    path = Path(out.stdout.strip().splitlines()[-1].removeprefix("transfer table: "))
    assert path.name == "transfer.csv" and path.is_file()
    rows = list(csv.DictReader(path.open()))
    assert [r["shots"] for r in rows] == ["0", "1"]
    assert list(rows[0]) == ["shots", "ml", "module", "model", "ml_sd", "module_sd", "model_sd"]
    # k = 0 is the source predictor as it is: every energy is off by the factor 1.5 (a third)
    assert float(rows[0]["model"]) == pytest.approx(100 / 3, abs=8)
    # one measured configuration tells the scale: the error drops to the source's own level
    assert float(rows[1]["model"]) < 10 and float(rows[1]["module"]) < 15
    methods = {r["method"] for r in csv.DictReader((path.parent / "transfer_methods.csv").open())}
    assert methods == {"type_scale", "level_scale", "target_only", "target_lomo"}
    for name in ("transfer.md", "transfer.tex", "transfer.png"):
        assert (path.parent / name).stat().st_size > 0


@pytest.mark.parametrize(("args", "line"), [
    (["source=device_1"], "error: stage=transfer needs source=<device or [devices]> and "
                          "target=<device or trees file>"),
    (["source=device_1", "target=device_1"], "error: target=device_1 is also a source"),
    (["source=device_1", "target=device_2", "shots=[-1]"], "error: shots=[-1]: must be"),
    (["source=device_1", "target=device_2", "methods=[nope]"], "error: transfer methods ['nope']"),
    (["source=device_1", "target=/nowhere/x.jsonl"], "error: target=/nowhere/x.jsonl: no such"),
])
def test_transfer_requests_that_cannot_run_are_one_line(tmp_path, args, line):
    out = _cli(tmp_path, *args)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), out.stderr[-2000:]
