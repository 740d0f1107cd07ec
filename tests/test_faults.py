"""Faults injected into whole runs: a full disk gives one line and exit code 2, and leaves no
half-written file, no half-made run folder, and its inputs as they were."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from irene.data.tree import write_trees

ROOT = Path(__file__).resolve().parents[1]
FULL = "error: no space left on the device"


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (root only: CI runs as root)."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"cannot mount a tmpfs in CI: {out.stderr.strip()}")
            pytest.skip(f"cannot mount a tmpfs here (needs root): {out.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(outputs: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", "tracking=off", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "IRENE_OUTPUTS": str(outputs)})


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_disk_too_full_for_hydras_own_files_leaves_no_run_folder(small_disk, tmp_path,
                                                                    small_trees):
    trees = write_trees(tmp_path / "in.jsonl", small_trees[:2])
    before = _digest(trees)
    disk = small_disk("4k")  # one page: .hydra/config.yaml fits, hydra.yaml does not
    out = _run(disk, "stage=featurize", f"data.trees={trees}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"{FULL}: free some space, or write elsewhere (IRENE_OUTPUTS=<folder>, "
        "hydra.run.dir=<folder>)"]
    assert _files(disk) == []  # Hydra's half-written run folder is gone
    assert _digest(trees) == before


@pytest.mark.slow
def test_a_disk_too_full_for_the_outputs_names_the_file_and_leaves_nothing_partial(
        small_disk, tmp_path, small_trees):
    trees = write_trees(tmp_path / "in.jsonl", small_trees)
    before = _digest(trees)
    disk = small_disk("64k")  # Hydra's files fit, the featurized trees (megabytes) do not
    out = _run(disk, "stage=featurize", f"data.trees={trees}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"{FULL} writing {disk}"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    leftovers = [p for p in _files(disk) if p.suffix in (".tmp", ".jsonl", ".csv")]
    assert leftovers == []  # atomic writes: no half-written output, no temporary file
    assert _digest(trees) == before
