"""Which configurations of a new GPU to measure first (irene.shots, stage=plan), and measuring
several configurations in one job (stage=measure configs=[...])."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from irene.data.forest import build_forest
from irene.data.tree import iter_nodes, write_trees
from irene.shots import node_groups, pick_shots
from tests.conftest import make_tree

ROOT = Path(__file__).resolve().parents[1]


def _renamed(tree, instance_type: str, new: str):
    tree = copy.deepcopy(tree)
    for node in iter_nodes(tree["frontend_tree"]):
        if node["instance_type"] == instance_type:
            node["instance_type"] = new
    return tree


def test_the_configuration_with_the_most_uncovered_energy_comes_first():
    plain = make_tree("a", scale=1.0)
    other = _renamed(make_tree("b", scale=1.0), "Block", "OtherBlock")  # a new module class
    forest = build_forest([plain, plain | {"seq_len": 8}, other])
    energy = np.nan_to_num(forest.gold_j)
    picked = pick_shots(forest, 2, energy)
    # a and b have the same share of energy, but after a, only b brings a new kind
    assert len(picked) == 2 and forest.model_names[picked[1]] == "b"
    assert set(node_groups(forest)) >= {"module:OtherBlock", "ml:linear", "model:ToyModel"}


def test_once_every_kind_is_covered_the_sizes_spread():
    trees = [make_tree("a", seq_len=s, scale=s) for s in (1, 2, 4, 8, 16, 32, 64)]
    forest = build_forest(trees)
    energy = np.nan_to_num(forest.gold_j)
    picked = pick_shots(forest, 3, energy)
    sizes = sorted(int(forest.seq_lens[t]) for t in picked)
    # the first is the median size (all cover the same kinds); then the two extremes
    assert sizes == [1, 8, 64]
    assert pick_shots(forest, 3, energy) == picked  # deterministic
    assert pick_shots(forest, 0, energy) == []
    assert len(pick_shots(forest, 50, energy)) == len(trees)


def test_picks_come_only_from_the_pool():
    trees = [make_tree(m, seq_len=s, scale=s) for m in ("a", "b") for s in (1, 4)]
    forest = build_forest(trees)
    pool = np.asarray([2, 3])
    assert set(pick_shots(forest, 2, np.nan_to_num(forest.gold_j), pool)) == {2, 3}


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "run.py", "tracking=off", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "IRENE_OUTPUTS": str(tmp_path / "out")})


@pytest.mark.slow
def test_plan_prints_the_measure_command_of_its_picks(tmp_path, small_trees):
    source = write_trees(tmp_path / "source.jsonl", small_trees)
    out = _cli(tmp_path, "stage=plan", f"source={source}", "k=3",
               "models=[tiny/bert,tiny/gpt2,tiny/llama]", "batch_sizes=[2]", "seq_lens=[8,16]")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("python run.py stage=measure 'configs=[")
    configs = lines[-1].split("configs=[")[1].rstrip("]'").split(",")
    plan = Path(lines[-2].removeprefix("plan: "))
    rows = list(csv.DictReader(plan.open()))
    assert [r["config"] for r in rows] == configs and len(configs) == 3
    # three architectures, one shape each: every pick brings new kinds of node
    assert len({c.split("@")[0] for c in configs}) == 3
    assert all(int(r["new_kinds"]) > 0 for r in rows)
    assert int(rows[-1]["kinds_covered"]) > int(rows[0]["kinds_covered"])


@pytest.mark.parametrize(("args", "line"), [
    (["k=0"], "error: k=0: must be between 1 and the 48 candidate configurations "
              "(models × batch_sizes × seq_lens)"),
    (["batch_sizes=[0]"], "error: batch_sizes=[0]: item 0 must be in [1, 65536]"),
])
def test_plan_refuses_nonsense_in_one_line(tmp_path, args, line):
    out = _cli(tmp_path, "stage=plan", *args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == line


@pytest.mark.parametrize(("args", "line"), [
    (["configs=[tiny/bert@2x8,tiny/gpt2@2]"],
     "error: configs[1]='tiny/gpt2@2': expected <model>@<batch_size>x<seq_len> with both at "
     "least 1, e.g. bert-base-uncased@8x128"),
    (["configs=[tiny/bert@0x8]"],
     "error: configs[0]='tiny/bert@0x8': expected <model>@<batch_size>x<seq_len> with both at "
     "least 1, e.g. bert-base-uncased@8x128"),
    (["configs=[tiny/bert@2x8]", "model=tiny/gpt2"],
     "error: model=tiny/gpt2 and configs=[...] both name what to measure: give one of them"),
])
def test_measure_checks_every_config_before_measuring(tmp_path, args, line):
    out = _cli(tmp_path, "stage=measure", "measure.measure=false", *args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == line
    assert not (tmp_path / "out" / "measured").exists()


@pytest.mark.slow
def test_measure_traces_every_config_in_turn_and_resumes(tmp_path):
    output = tmp_path / "trees.jsonl"
    args = ["stage=measure", "measure.measure=false", f"measure.output={output}",
            "configs=[tiny/bert@2x8,tiny/gpt2@2x16]"]
    out = _cli(tmp_path, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"trees: {output}"
    keys = [(t["model_name"], t["batch_size"], t["seq_len"])
            for t in map(__import__("json").loads, output.read_text().splitlines())]
    assert keys == [("tiny/bert", 2, 8), ("tiny/gpt2", 2, 16)]
    before = output.read_bytes()
    again = _cli(tmp_path, *args)
    assert again.returncode == 0 and output.read_bytes() == before
    assert again.stderr.count("already") >= 2 or again.stdout.count("already") >= 2


@pytest.mark.slow
def test_the_new_gpu_preset_holds_what_plan_picks_with_its_defaults(tmp_path, device_dir):
    from omegaconf import OmegaConf

    second = device_dir.parent / "device_2"
    if not (second / "model_level_features.csv").is_file():
        pytest.fail(f"device 2's published CSVs not found beside device 1 ({second})")
    both = tmp_path / "data"
    both.mkdir()
    (both / "device_1").symlink_to(device_dir.resolve())
    (both / "device_2").symlink_to(second.resolve())
    out = subprocess.run([sys.executable, "run.py", "tracking=off", "stage=plan"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "IRENE_OUTPUTS": str(tmp_path / "out"),
                              "IRENE_DATA_DIR": str(both)})
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout.strip().splitlines()[-1].split("configs=[")[1].rstrip("]'").split(",")
    preset = OmegaConf.load(ROOT / "conf" / "experiment" / "new_gpu.yaml")
    assert preset.stage == "measure" and list(preset.configs) == printed
