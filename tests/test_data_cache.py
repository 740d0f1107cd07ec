"""The import cache of a device: validated once, then read as arrays; changed bytes are
validated again, never trusted."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from irene.data import tree as tree_module
from irene.data.forest import build_forest, load_forest, save_forest
from irene.data.io import _umask
from irene.data.published import CSV_FILES, csv_name
from irene.data.tree import TreeFormatError
from pipelines import data as data_module
from pipelines.config import register_configs
from pipelines.tracking import NullTracker
from tests.conftest import ROOT

register_configs()


def assert_same_forest(left, right):
    for field in dataclasses.fields(left):
        a, b = getattr(left, field.name), getattr(right, field.name)
        assert type(a) is type(b), field.name
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype, field.name
            np.testing.assert_array_equal(a, b, err_msg=field.name)
            if a.dtype == object:
                assert {type(v) for v in a} == {type(v) for v in b} == {str}, field.name
        else:
            assert a == b, field.name


def test_a_saved_forest_loads_equal_types_included(small_trees, tmp_path):
    forest = build_forest(small_trees)
    path = save_forest(forest, tmp_path / "f.npz")
    assert_same_forest(load_forest(path), forest)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # not the temp file's 0600


@pytest.fixture()
def small_device(device_dir, tmp_path):
    """Device 1 cut to one (batch, seq) cell: a device folder that imports in a second."""
    folder = tmp_path / "device_small"
    folder.mkdir()
    for level in CSV_FILES:
        frame = pd.read_csv(device_dir / csv_name(level))
        frame[(frame.batch_size == 8) & (frame.seq_len == 32)].to_csv(
            folder / csv_name(level), index=False)
    return folder


def _cfg(folder):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"data.path={folder}", "tracking=off",
                                            "data.models=[bert-base-uncased,gpt2]"])


def test_the_second_load_reads_arrays_and_equals_the_first(small_device, tmp_path, monkeypatch):
    monkeypatch.setenv("IRENE_OUTPUTS", str(tmp_path / "outputs"))
    cfg = _cfg(small_device)
    first = data_module.load_forest(cfg, NullTracker())
    cache = first.source
    assert cache.name.endswith(".jsonl") and cache.with_name(cache.name + ".validated").is_file()
    assert len(list(cache.parent.glob("*.forest.npz"))) == 1

    def no_parsing(*args, **kwargs):
        raise AssertionError("the cached forest should be read without parsing trees")

    monkeypatch.setattr(data_module, "read_trees", no_parsing)
    second = data_module.load_forest(cfg, NullTracker())
    assert_same_forest(second.forest, first.forest)
    assert_same_forest(second.forest, build_forest(first.trees()))
    monkeypatch.undo()
    monkeypatch.setenv("IRENE_OUTPUTS", str(tmp_path / "outputs"))
    assert second.trees() == first.trees()  # the trees, read only when asked for


def test_changed_cache_bytes_are_validated_again(small_device, tmp_path, monkeypatch):
    monkeypatch.setenv("IRENE_OUTPUTS", str(tmp_path / "outputs"))
    cfg = _cfg(small_device)
    cache = data_module.load_forest(cfg, NullTracker()).source
    lines = cache.read_text().splitlines()
    lines[1] = lines[1].replace('"ground_truth_energy": ', '"ground_truth_energy": -', 1)
    cache.write_text("\n".join(lines) + "\n")
    with pytest.raises(TreeFormatError, match=rf"{cache.name}:2: .*ground_truth_energy"):
        data_module.load_forest(cfg, NullTracker())
    with pytest.raises(TreeFormatError, match=rf"{cache.name}:2: "):
        data_module.load_trees(cfg, NullTracker())


def test_a_marker_of_another_version_is_not_trusted(small_device, tmp_path, monkeypatch):
    monkeypatch.setenv("IRENE_OUTPUTS", str(tmp_path / "outputs"))
    cfg = _cfg(small_device)
    cache = data_module.load_forest(cfg, NullTracker()).source
    marker = cache.with_name(cache.name + ".validated")
    marker.write_text(marker.read_text().replace(" irene ", " irene 0.0.0-other "))
    calls = []
    validate = tree_module.validate_tree
    monkeypatch.setattr(tree_module, "validate_tree",
                        lambda *a, **k: calls.append(1) or validate(*a, **k))
    data_module.load_trees(cfg, NullTracker())
    assert calls  # validated again, and the marker rewritten for this version
    calls.clear()
    data_module.load_trees(cfg, NullTracker())
    assert not calls
