"""Faults injected into whole runs of ``python run.py``, as a user starts them: kills at random
points, oversize files and each corrupted-CSV case of the import's integrity checks.

Every case asserts the one ``error:`` line, the exit code, that the inputs are unchanged
(sha256), that no output file is half-written, and what the MLflow store holds afterwards.
The inputs are device 1 cut to two models at two shapes (tests/test_import_integrity.py).
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest

from irene.data.published import CSV_FILES, csv_name, import_device
from irene.data.tree import write_trees
from irene.errors import InputError
from tests.test_import_integrity import _cut

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("distilgpt2", "gpt2")
SHAPES = ("8.0,32.0,", "8.0,64.0,")
EXPERIMENT = "faults"


def _sha(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _runs(uri: str) -> dict[str, str]:
    client = mlflow.MlflowClient(uri)
    return {r.info.run_id: r.info.status for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], max_results=5000)}


def _start(world: dict, *args: str) -> subprocess.Popen:
    env = {**os.environ, "IRENE_OUTPUTS": str(world["outputs"]), "OMP_NUM_THREADS": "1"}
    env.pop("IRENE_DATA_DIR", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "run.py", f"tracking.uri={world['uri']}",
                             f"tracking.experiment={EXPERIMENT}", "show_progress=false", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its worker: the same group


def _featurize(world: dict, device: Path | None = None, *extra: str) -> subprocess.Popen:
    """``stage=featurize`` of a device folder (None: of the trees file)."""
    data = f"data.path={device}" if device else f"data.trees={world['trees']}"
    return _start(world, "stage=featurize", data, f"data.models=[{','.join(MODELS)}]", *extra)


def _error_lines(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:], stderr[-3000:]  # one line, the last
    return errors


@pytest.fixture(scope="module")
def world(device_dir, tmp_path_factory):
    """Inputs (a cut device, its trees) and an outputs folder whose store holds one
    FINISHED featurize run; ``seconds``: how long that clean run took."""
    base = tmp_path_factory.mktemp("faults")
    device = base / "inputs" / "device"
    for model in MODELS:
        cut = _cut(device_dir, base / "cut" / model, model, SHAPES)
        for level in CSV_FILES:
            lines = (cut / csv_name(level)).read_text().splitlines(keepends=True)
            target = device / csv_name(level)
            device.mkdir(parents=True, exist_ok=True)
            old = target.read_text().splitlines(keepends=True) if target.exists() else lines[:1]
            target.write_text("".join(old + lines[1:]))
    trees = write_trees(base / "inputs" / "trees.jsonl", import_device(device, list(MODELS)))
    outputs = base / "outputs"
    world = {"base": base, "inputs": base / "inputs", "device": device, "trees": trees,
             "outputs": outputs, "uri": f"sqlite:///{outputs / 'mlflow.db'}"}
    start = time.monotonic()
    clean = _featurize(world)
    out, err = clean.communicate(timeout=300)
    assert clean.returncode == 0, err[-3000:]
    world["seconds"] = time.monotonic() - start
    assert set(_runs(world["uri"]).values()) == {"FINISHED"}
    return world


# --------------------------------------------------------------- no half-written file
def _complete(path: Path) -> None:
    """A written output parses in full (a torn write would not)."""
    if path.suffix == ".jsonl":
        text = path.read_text()
        assert text.endswith("\n"), path
        for line in text.splitlines():
            json.loads(line)
    elif path.suffix == ".csv":
        text = path.read_text()
        assert text.endswith("\n"), path
        rows = list(csv.reader(text.splitlines()))
        assert rows and all(len(row) == len(rows[0]) for row in rows), path
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".npz":
        with np.load(path) as arrays:
            for name in arrays.files:
                arrays[name]
    elif path.name.endswith(".validated"):
        assert path.read_text().endswith("\n"), path


def _outputs_complete(outputs: Path, *, temporary_allowed: bool) -> list[Path]:
    """Check every output the project writes (run folders and the import cache; Hydra's
    ``.hydra/`` files and the run's log are Hydra's and logging's); returns leftover
    temporary files of an atomic write (possible only when the process was SIGKILLed)."""
    leftovers = []
    for path in sorted(outputs.rglob("*")):
        if not path.is_file() or ".hydra" in path.parts or "mlartifacts" in path.parts:
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            leftovers.append(path)
            continue
        _complete(path)
    assert temporary_allowed or not leftovers, leftovers
    return leftovers


# ------------------------------------------------------------------- kills at random
@pytest.mark.slow
def test_kills_at_random_points_leave_inputs_outputs_and_the_store_whole(world):
    """SIGTERM and SIGKILL a featurize at seeded random delays within the time a whole run
    takes (start-up, reading, computing, writing); the next run closes what a kill left
    RUNNING."""
    rng = random.Random(20)
    inputs = _sha(world["inputs"])
    results = []
    for kind in (signal.SIGTERM, signal.SIGKILL):
        delay = rng.uniform(0.3, 0.5 * world["seconds"])  # the first run also made the store
        for _ in range(4):
            process = _featurize(world)
            time.sleep(delay)
            process.send_signal(kind)
            out, err = process.communicate(timeout=120)
            results.append((kind.name, round(delay, 2), process.returncode))
            if process.returncode != 0:
                break
            delay *= rng.uniform(0.3, 0.7)  # it finished first (a quieter machine): earlier
        if kind == signal.SIGTERM:
            assert process.returncode == 143, (results, err[-3000:])
            (line,) = _error_lines(err)
            assert line.startswith("error: terminated by SIGTERM"), line
        else:
            assert process.returncode == -signal.SIGKILL, (results, err[-3000:])
        assert _sha(world["inputs"]) == inputs
        _outputs_complete(world["outputs"], temporary_allowed=kind == signal.SIGKILL)
    # and once inside its MLflow run: nobody is left to close it
    dead = _kill_inside_its_run(world)
    assert _runs(world["uri"])[dead] == "RUNNING"
    _outputs_complete(world["outputs"], temporary_allowed=True)

    after = _featurize(world)  # the next run: its stale-run check closes the dead runs
    out, err = after.communicate(timeout=300)
    assert after.returncode == 0, err[-3000:]
    _outputs_complete(world["outputs"], temporary_allowed=True)
    statuses = _runs(world["uri"])
    assert "RUNNING" not in statuses.values(), (results, statuses)
    assert set(statuses.values()) <= {"FINISHED", "KILLED"}, (results, statuses)
    closed = mlflow.MlflowClient(world["uri"]).get_run(dead)
    assert closed.info.status == "KILLED" and "stale-run check" in closed.data.tags[
        "irene.closed_by"]
    assert _sha(world["inputs"]) == inputs


def _kill_inside_its_run(world: dict, attempts: int = 5) -> str:
    """SIGKILL a featurize (and its tracking worker) while its MLflow run is RUNNING; returns
    the run id. The process group is stopped (SIGSTOP) before each look at the store, so a
    quick stage cannot finish between the look and the kill. The first try logs through the
    tracking worker, whose run can open and close between two looks on a quiet machine; the
    next ones log from the stage's own process, whose run stays open while it imports the
    CSVs and writes its outputs."""
    client = mlflow.MlflowClient(world["uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for attempt in range(attempts):
        before = _runs(world["uri"])
        process = (_featurize(world) if attempt == 0 else
                   _featurize(world, world["device"], "tracking.background=false"))
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            os.killpg(process.pid, signal.SIGSTOP)
            try:
                new = [r.info.run_id for r in client.search_runs(
                    [experiment], filter_string="attributes.status = 'RUNNING'")
                       if r.info.run_id not in before]
            except Exception:  # noqa: BLE001 - stopped inside a write: the store is locked
                new = []
            if new:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate(timeout=60)
                return new[0]
            os.killpg(process.pid, signal.SIGCONT)
        process.communicate(timeout=120)  # finished between two looks: again
    raise AssertionError("never caught a featurize inside its run")


@pytest.mark.slow
def test_sigterm_during_report_is_one_line_and_exit_143(world):
    """The report stage is held inside its run (the store's lock is taken here), then
    terminated at a seeded random moment."""
    lock_path = Path(world["uri"].removeprefix("sqlite:///") + ".lock")
    before = _runs(world["uri"])
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        process = _start(world, "stage=report", "experiment=per_model")
        stage = psutil.Process(process.pid)
        deadline = time.monotonic() + 120
        while str(lock_path) not in [f.path for f in stage.open_files()]:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the report never reached the store"
            time.sleep(0.05)
        time.sleep(random.Random(143).uniform(0.05, 1.0))
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    assert _error_lines(err) == ["error: terminated by SIGTERM; a tracked run is marked KILLED"]
    after = _runs(world["uri"])
    assert {k: v for k, v in after.items() if k in before} == before
    assert "RUNNING" not in after.values()


# ------------------------------------------------------------- bad inputs, one line each
def _corrupt(world: dict, name: str, edit) -> Path:
    folder = world["base"] / "bad" / name
    shutil.copytree(world["device"], folder)
    edit(folder)
    return folder


def _lines(folder: Path, level: str) -> list[str]:
    return (folder / csv_name(level)).read_text().splitlines(keepends=True)


def _put(folder: Path, level: str, lines: list[str]) -> None:
    (folder / csv_name(level)).write_text("".join(lines))


def _append_ml2(folder: Path) -> None:
    lines = _lines(folder, "ml2")
    _put(folder, "ml2", lines + lines[1:])


def _rename_model_row(folder: Path) -> None:
    lines = _lines(folder, "model")
    lines[1] = lines[1].replace(f",{MODELS[0]},{MODELS[0]}", ",/srv/models/x,/srv/models/x")
    _put(folder, "model", lines)


def _delete_ten_ml1(folder: Path) -> None:
    lines = _lines(folder, "ml1")
    _put(folder, "ml1", lines[:1] + lines[11:])


def _swap_energies(folder: Path) -> None:
    lines = _lines(folder, "ml1")
    lines[0] = lines[0].replace("gpu_energy_mean,energy_mean", "energy_mean,gpu_energy_mean")
    _put(folder, "ml1", lines)


def _sparse(path: Path) -> None:
    path.unlink(missing_ok=True)
    with path.open("wb") as handle:
        handle.truncate(2 * 2**30)  # 2 GB, no disk space used


def _expected(folder: Path) -> str:
    """The import's own one-line message for the folder (what run.py must print)."""
    with pytest.raises(InputError) as caught:
        import_device(folder, list(MODELS))
    return f"error: {caught.value}"


CORRUPTIONS = {
    "ml2-appended-again": _append_ml2,
    "model-row-renamed-to-a-path": _rename_model_row,
    "ten-ml1-rows-deleted": _delete_ten_ml1,
    "energy-columns-swapped": _swap_energies,
}


@pytest.mark.slow
def test_each_bad_input_through_run_py_is_one_line_exit_2_and_changes_nothing(world):
    """Started together (each is a few seconds of start-up); the store and the outputs
    before are compared with after."""
    inputs_before = _sha(world["inputs"])
    runs_before = _runs(world["uri"])
    outputs_before = {k: v for k, v in _sha(world["outputs"]).items()
                      if not k.startswith(("mlflow.db", "mlartifacts"))}
    cases = {name: _corrupt(world, name, edit) for name, edit in CORRUPTIONS.items()}
    expected = {name: _expected(folder) for name, folder in cases.items()}
    first = next(world["device"] / csv_name(level) for level in CSV_FILES
                 if (world["device"] / csv_name(level)).stat().st_size > 0.01 * 2**20)
    size = first.stat().st_size
    expected["csv-over-the-limit"] = (
        f"error: {first}: {size / 2**20:.3g} MB ({size} bytes), larger than the 0.01 MB limit "
        "on an input file; data.max_file_mb=<MB> raises it (memory grows about 3 MB per MB read)")
    big_trees = world["base"] / "bad" / "trees.jsonl"
    _sparse(big_trees)  # the 2 GB CSV: tests/test_import_integrity.py (the same check)
    expected["2-gb-trees-file"] = (
        f"error: {big_trees}: 2048.0 MB (2147483648 bytes), larger than the 256 MB limit on an "
        "input file; data.max_file_mb=<MB> raises it (memory grows about 3 MB per MB read)")
    bad_before = _sha(world["base"] / "bad")

    started = {name: _featurize(world, path) for name, path in cases.items()}
    started["csv-over-the-limit"] = _featurize(world, world["device"], "data.max_file_mb=0.01")
    started["2-gb-trees-file"] = _start(world, "stage=featurize", f"data.trees={big_trees}")
    for name, process in started.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2, (name, err[-3000:])
        assert _error_lines(err) == [expected[name]], name

    assert _sha(world["inputs"]) == inputs_before
    assert _sha(world["base"] / "bad") == bad_before
    outputs_after = _sha(world["outputs"])
    assert {k: outputs_after.get(k) for k in outputs_before} == outputs_before
    new = [k for k in outputs_after if k not in outputs_before
           and not k.startswith(("mlflow.db", "mlartifacts"))]
    assert all(k.startswith("runs/") and (k.endswith("run.log") or "/.hydra/" in k)
               for k in new), new  # only Hydra's record of each attempt
    runs_after = _runs(world["uri"])
    assert {k: v for k, v in runs_after.items() if k in runs_before} == runs_before
    assert {v for k, v in runs_after.items() if k not in runs_before} <= {"FAILED"}
