"""One folder per run: processes started in the same second never share a run folder."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from irene.data.tree import iter_nodes, write_trees
from tests.conftest import make_tree

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_eight_runs_started_at_once_get_eight_folders_and_their_own_tables(tmp_path):
    gold = write_trees(tmp_path / "gold.jsonl", [make_tree("a"), make_tree("b", scale=2.0)])
    runs = []
    for i in range(8):  # eight predictions files, each off by its own factor
        trees = [make_tree("a"), make_tree("b", scale=2.0)]
        for tree in trees:
            for node in iter_nodes(tree["frontend_tree"]):
                node["predicted_energy"] = node["ground_truth_energy"] * (1 + (i + 1) / 100)
        runs.append(write_trees(tmp_path / f"pred{i}.jsonl", copy.deepcopy(trees)))
    env = {**os.environ, "IRENE_OUTPUTS": str(tmp_path / "outputs")}
    procs = [subprocess.Popen([sys.executable, "run.py", "stage=evaluate", "tracking=off",
                               f"data.trees={gold}", f"predictions={pred}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pred in runs]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err[-500:] for _, err in outs]
    printed = [Path(out.strip().splitlines()[-1].removeprefix("reports: ")) for out, _ in outs]
    folders = sorted((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(set(printed)) == 8 and sorted(printed) == folders
    for i, folder in enumerate(printed):  # each folder holds its own run's table
        assert f"predictions={runs[i]}" in (folder / ".hydra" / "overrides.yaml").read_text()
        table = (folder / "errors_by_node_type.csv").read_text()
        assert f"{i + 1}.0" in table, table
    assert len({(f / "errors_by_node_type.csv").read_text() for f in printed}) == 8
