"""Shared fixtures: the published device-1 data (read from $IRENE_DATA_DIR, never copied into
the project), small synthetic trees, and one MLflow store per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the trees this project measured on an H200 with stage=measure (shipped in datasets/h200)
H200_TREES = ROOT / "datasets" / "h200" / "trees.jsonl"


def _device_dir() -> Path | None:
    """Device 1's folder: $IRENE_DATA_DIR itself, or its ``device_1/``."""
    root = os.environ.get("IRENE_DATA_DIR")
    if not root:
        return None
    for candidate in (Path(root), Path(root) / "device_1"):
        if (candidate / "model_level_features.csv").is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def device_dir() -> Path:
    path = _device_dir()
    if path is None:
        pytest.fail("published data not found: set IRENE_DATA_DIR to device 1's folder "
                    "(or to a folder holding device_1/)")
    return path


@pytest.fixture(scope="session")
def device_trees(device_dir):
    from irene.data.published import import_device

    return import_device(device_dir)


@pytest.fixture(scope="session")
def device_forest(device_trees):
    from irene.data.forest import build_forest

    return build_forest(device_trees)


@pytest.fixture(scope="session")
def small_trees(device_trees):
    """Two (batch, seq) cells per model: enough for every code path, fast."""
    keep = {(8, 32), (16, 128)}
    return [t for t in device_trees if (t["batch_size"], t["seq_len"]) in keep]


@pytest.fixture(scope="session")
def small_forest(small_trees):
    from irene.data.forest import build_forest

    return build_forest(small_trees)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite store for the session, created once (schema creation is slow)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{path}"
    mlflow.set_tracking_uri(uri)
    mlflow.search_experiments()  # creates the schema
    return uri


def make_tree(model: str = "toy", batch_size: int = 2, seq_len: int = 4, scale: float = 1.0):
    """A small valid tree: root -> (block -> linear, matmul), layernorm."""

    def node(scope, parent, level, cls, kind, energy, children=(), **features):
        base = {"num_parameters": 10, "flops": 1.0 * scale, "mem_bytes": 0.5, "cpu": 1.0,
                "mem": 2.0, "gpu": 3.0, "gpu_mem": 4.0, "gpu_clk": 5.0, "gpu_mem_clk": 6.0,
                "times_mean": 0.001 * scale, "gpu_energy_mean": 0.5 * energy}
        base.update(features)
        return {"id": f"{model}/{batch_size}x{seq_len}/{scope}", "scope": scope,
                "parent_name": parent, "level": level, "instance_type": cls, "type": kind,
                **base, "ground_truth_energy": energy, "child_nodes_obj": list(children),
                "child_nodes": [c["scope"] for c in children]}

    linear = node("root.block.linear", "root.block", 2, "Linear", "ml", 1.0 * scale)
    matmul = node("root.block.matmul_0", "root.block", 2, "MatMul", "ml", 0.5 * scale)
    block = node("root.block", "root", 1, "Block", "module", 2.0 * scale, [linear, matmul])
    norm = node("root.norm", "root", 1, "LayerNorm", "ml", 0.25 * scale)
    root = node("root", None, 0, "ToyModel", "model", 3.0 * scale, [block, norm])
    return {"model_name": model, "batch_size": batch_size, "seq_len": seq_len,
            "frontend_tree": root}


# Everything the stages write by default (run folders, MLflow store, caches, tables) goes to
# a temporary folder, never into the checkout; set before any stage computes a path.
os.environ["IRENE_OUTPUTS"] = tempfile.mkdtemp(prefix="irene-test-outputs-")

# ------------------------------------------------------------------ the checkout stays clean
_IGNORED_NOISE = (".venv/", ".ruff_cache/", ".pytest_cache/", "__pycache__/", ".egg-info/")


def _untracked_and_ignored() -> set[str] | None:
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--ignored", "--porcelain", "--untracked-files=all"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (e.g. an sdist): nothing to compare
    paths = {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if not any(noise in p for noise in _IGNORED_NOISE)}


def pytest_sessionstart(session):
    session.config._files_before = _untracked_and_ignored()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_files_before", None)
    after = _untracked_and_ignored()
    if before is None or after is None:
        return
    new = sorted(after - before)
    if new:  # a test wrote into the checkout: that fails the run
        print(f"\nerror: the tests wrote into the checkout: {new[:10]}")
        session.exitstatus = 1



# A skip that hides a broken guard (the project's own code does not import, the published data
# are missing) is a failure: see tests/skips.py.
from tests.skips import pytest_runtest_makereport  # noqa: E402, F401
