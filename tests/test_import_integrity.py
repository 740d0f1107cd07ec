"""Input that cannot exhaust memory or change silently (irene/data/integrity.py).

Every check holds on both published devices and on the H200 trees (no false refusal), and
refuses each corruption in one line naming the file and the rows. The corrupted inputs are
copies, in ``tmp_path``, of device 1 cut to one model at a few shapes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from irene.data import integrity
from irene.data.integrity import DEFAULT_MAX_FILE_MB, IntegrityError, check_input_file
from irene.data.locate import DataNotFoundError, locate_device
from irene.data.published import CSV_FILES, csv_name, import_device
from irene.data.tree import iter_nodes, read_trees, write_trees
from irene.errors import InputError, MissingInputError, SettingsError
from tests.conftest import H200_TREES

MODEL = "distilgpt2"
SHAPES = ("8.0,32.0,", "8.0,64.0,", "16.0,32.0,")


def _cut(source: Path, target: Path, model: str = MODEL, shapes=SHAPES) -> Path:
    """The rows of ``model`` at ``shapes``, bytes of every kept line unchanged."""
    target.mkdir(parents=True, exist_ok=True)
    for level in CSV_FILES:
        lines = (source / csv_name(level)).read_text().splitlines(keepends=True)
        kept = [lines[0]] + [line for line in lines[1:] if line.startswith(shapes)
                             and line.rstrip("\n").endswith("," + model)]
        (target / csv_name(level)).write_text("".join(kept))
    return target


@pytest.fixture
def small(device_dir, tmp_path) -> Path:
    return _cut(device_dir, tmp_path / "dev")


def _lines(folder: Path, level: str) -> list[str]:
    return (folder / csv_name(level)).read_text().splitlines(keepends=True)


def _write(folder: Path, level: str, lines: list[str]) -> Path:
    path = folder / csv_name(level)
    path.write_text("".join(lines))
    return path


def _refusal(folder: Path, models: list[str] | None = None) -> str:
    with pytest.raises(InputError) as caught:
        import_device(folder, models=models)
    text = str(caught.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------ no false refusal
@pytest.mark.slow  # whole devices (seconds each)
def test_both_published_devices_and_the_h200_trees_pass_every_check(device_dir, tmp_path):
    device_2 = device_dir.parent / "device_2"
    assert (device_2 / "model_level_features.csv").is_file(), (
        f"device 2's published CSVs belong next to device 1's: {device_2}")
    for folder, count in ((device_dir, 193), (device_2, 224)):
        trees = import_device(folder, models=None)  # every model, tiny-ctrl included
        assert len(trees) == count
        path = write_trees(tmp_path / f"{folder.name}.jsonl", trees)
        assert len(read_trees(path, require_energy=True)) == count  # the trees-file checks
    assert len(read_trees(H200_TREES, require_energy=True)) == 8


@pytest.mark.slow  # whole devices (seconds each)
def test_the_published_conventions_the_checks_allow(device_dir):
    """What the checks must not call a corruption: the ml2 twin rows, a cell without a model
    row (device 1), the GPU energy within 10 % of the ground truth (the H200's counter)."""
    ml2 = _lines(device_dir, "ml2")
    assert ml2[1] == ml2[2]  # an attention's second MatMul repeats the first's row
    h200 = [json.loads(line) for line in H200_TREES.read_text().splitlines()]
    ratios = [n["gpu_energy_mean"] / n["ground_truth_energy"]
              for t in h200 for n in iter_nodes(t["frontend_tree"])]
    assert max(ratios) < integrity.INVERTED_MARGIN and sum(r > 1 for r in ratios) > 50


# ------------------------------------------------------------------ exact duplicates
def test_every_ml2_row_appended_again_is_refused(small):
    lines = _lines(small, "ml2")
    path = _write(small, "ml2", lines + lines[1:])
    n = len(lines) - 1
    assert _refusal(small) == (
        f"{path}:{n + 2}: an exact duplicate of line 2 ({MODEL} (8, 32) h.0.attn:MatMul) (only "
        "an ml2 row may repeat once, right after itself: an attention's two MatMuls); duplicate "
        f"rows: lines {n + 2}, {n + 3}, {n + 4} and {n - 3} more")


@pytest.mark.slow  # whole devices (seconds each)
def test_a_third_copy_of_an_ml2_twin_and_a_copy_of_a_row_of_another_model(device_dir, tmp_path):
    folder = _cut(device_dir, tmp_path / "dev")
    lines = _lines(folder, "ml2")
    assert lines[1] == lines[2]
    path = _write(folder, "ml2", lines[:2] + [lines[1]] + lines[2:])
    assert _refusal(folder).startswith(f"{path}:4: an exact duplicate of line 2 ")
    # a model not asked for is checked too: its duplicated module row is refused
    both = _cut(device_dir, tmp_path / "two", "sshleifer/tiny-ctrl")
    for level in CSV_FILES:
        _write(both, level, _lines(both, level) + _lines(folder, level)[1:])
    module = _lines(both, "module")
    path = _write(both, "module", module + [module[1]])
    with pytest.raises(IntegrityError, match=rf"^{path}:{len(module) + 1}: an exact duplicate "
                                             r"of line 2 \(sshleifer/tiny-ctrl \(8, 32\) "):
        import_device(both, models=[MODEL])


# ------------------------------------------------------------------ orphan model rows
@pytest.mark.parametrize("field", ["model_name", "level_name"])
def test_a_model_row_renamed_to_a_path_is_refused(small, field):
    """Before: the cell without its model row was skipped with a warning, exit 0."""
    lines = _lines(small, "model")
    cells = lines[1].rstrip("\n").split(",")
    cells[-1 if field == "model_name" else -2] = "/tmp/models/x"
    lines[1] = ",".join(cells) + "\n"
    path = _write(small, "model", lines)
    assert _refusal(small, [MODEL]) == (
        f"{path}:2: field {field!r}: the model row '/tmp/models/x' (8, 32) matches no row of the "
        "module, ml1 or ml2 files at that shape (a model row names the model its other rows "
        "measure)")


# ------------------------------------------------------------- structure across shapes
def test_ten_ml1_rows_deleted_in_one_shape_are_refused(small):
    lines = _lines(small, "ml1")
    first = [i for i, line in enumerate(lines) if line.startswith(SHAPES[0])]
    path = _write(small, "ml1", [line for i, line in enumerate(lines) if i not in first[:10]])
    reference = next(i for i, line in enumerate(lines) if line.startswith(SHAPES[1]))
    scope = lines[first[0]].split(",")[13]
    assert _refusal(small) == (
        f"{path}: {MODEL} (8, 32) lacks 10 row(s) that the 2 shapes of its model that agree "
        f"have (first: {scope!r}, line {reference + 1 - 10} at (8, 64)); one model's trees "
        "have one structure at every shape")


def test_a_shape_with_a_row_the_others_lack_is_named_by_its_line(small):
    lines = _lines(small, "ml1")
    gone = lines[-1].split(",")[13]  # a row of the last shape, (16, 32)
    kept = [line for line in lines if line.split(",")[13] != gone or line.startswith(SHAPES[0])]
    path = _write(small, "ml1", kept)
    line = next(i for i, text in enumerate(kept, start=1) if text.split(",")[13] == gone)
    assert _refusal(small) == (
        f"{path}:{line}: {MODEL} (8, 32) has 1 row(s) more than the 2 shapes of its model that "
        f"agree (first: {gone!r}, compare (8, 64)); one model's trees have one structure at "
        "every shape")


def test_trees_of_one_model_that_differ_are_refused_in_a_measured_data_set(small, tmp_path):
    trees = import_device(small, models=None)
    leaf = trees[1]["frontend_tree"]["child_nodes_obj"][0]["child_nodes_obj"]
    removed = leaf.pop()
    path = write_trees(tmp_path / "t.jsonl", trees)
    with pytest.raises(IntegrityError) as caught:
        read_trees(path, require_energy=True)
    assert str(caught.value) == (
        f"{path}:2: {MODEL} (8, 64) lacks 1 node(s) (first: {removed['scope']!r}) than the 2 "
        "tree(s) of its model that agree (line 1, (8, 32)); one model's trees have one "
        "structure at every shape")
    assert len(read_trees(path)) == 3  # predicted trees: no measured structure to keep


# --------------------------------------------------------------------- inverted physics
def test_energy_columns_swapped_in_the_header_are_refused(small):
    lines = _lines(small, "ml1")
    lines[0] = lines[0].replace("gpu_energy_mean,energy_mean", "energy_mean,gpu_energy_mean")
    path = _write(small, "ml1", lines)
    n = len(lines) - 1
    assert _refusal(small) == (
        f"{path}: field 'gpu_energy_mean' is above 'energy_mean' (the measured energy) by more "
        f"than 10% in {n} of {n} rows (lines 2, 3, 4 and {n - 3} more): a GPU's own counter "
        "cannot exceed the whole measured energy; are the two columns swapped in the header?")


def test_a_few_inverted_rows_are_measurements_not_a_swap(small):
    lines = _lines(small, "module")
    for i in range(1, len(lines) // 3):  # a third of the rows
        cells = lines[i].split(",")
        cells[11], cells[12] = cells[12], cells[11]
        lines[i] = ",".join(cells)
    _write(small, "module", lines)
    assert len(import_device(small, models=None)) == 3


def test_swapped_energies_in_a_trees_file_are_refused(small, tmp_path):
    trees = import_device(small, models=None)
    for tree in trees:
        for node in iter_nodes(tree["frontend_tree"]):
            node["gpu_energy_mean"], node["ground_truth_energy"] = (
                node["ground_truth_energy"], node["gpu_energy_mean"])
    path = write_trees(tmp_path / "t.jsonl", trees)
    with pytest.raises(IntegrityError, match=rf"^{path}: field 'gpu_energy_mean' is above "
                                             r"'ground_truth_energy' by more than 10% in \d+ of "
                                             r"\d+ nodes \(lines 1, 2, 3\): "):
        read_trees(path)


# ------------------------------------------------------------------------ the file itself
def test_a_header_only_csv_is_refused_by_name(small):
    path = _write(small, "ml2", _lines(small, "ml2")[:1])
    assert _refusal(small) == (f"{path}:2: no rows after the header (a device's file holds one "
                               "row per node it measured)")


def test_a_folder_or_a_link_loop_in_place_of_a_csv_says_so(small, tmp_path):
    path = small / csv_name("ml1")
    path.unlink()
    path.mkdir()
    with pytest.raises(DataNotFoundError, match=r": ml1_level_features.csv is a folder, not a "
                                                r"file \(a device folder holds "):
        locate_device(small, datasets_dir=tmp_path / "ds", download=False)
    path.rmdir()
    os.symlink(path, path)  # a link to itself
    with pytest.raises(DataNotFoundError, match=r": ml1_level_features.csv is a symbolic link "
                                                r"that loops \(a device folder holds "):
        locate_device(small, datasets_dir=tmp_path / "ds", download=False)
    with pytest.raises(InputError, match=r"a symbolic link that loops .*; expected a trees file$"):
        read_trees(path)
    with pytest.raises(InputError, match=rf"^{tmp_path}: a folder, not a trees file$"):
        read_trees(tmp_path)
    with pytest.raises(MissingInputError, match="^trees file not found: "):
        read_trees(tmp_path / "none.jsonl")


def test_a_2_gb_sparse_file_is_refused_in_one_line_before_any_read(small, tmp_path, monkeypatch):
    big = tmp_path / "big.jsonl"
    with big.open("wb") as handle:
        handle.truncate(2 * 2**30)  # sparse: no disk space used
    limit = f"{DEFAULT_MAX_FILE_MB:g}"
    message = (f": 2048.0 MB (2147483648 bytes), larger than the {limit} MB limit on an input "
               "file; data.max_file_mb=<MB> raises it (memory grows about 3 MB per MB read)")

    def no_read(*args, **kwargs):
        raise AssertionError("the file was opened")

    start = time.perf_counter()
    monkeypatch.setattr(Path, "open", no_read)
    with pytest.raises(InputError) as caught:
        read_trees(big)
    assert str(caught.value) == f"{big}{message}"
    monkeypatch.undo()
    csv = small / csv_name("ml1")
    csv.unlink()
    os.rename(big, csv)
    assert _refusal(small) == f"{csv}{message}"
    assert time.perf_counter() - start < 10


def test_the_limit_is_a_setting(small, tmp_path):
    path = small / csv_name("ml1")
    size = path.stat().st_size
    with pytest.raises(InputError, match=r"larger than the 0.01 MB limit"):
        import_device(small, models=None, max_mb=0.01)
    assert check_input_file(path, "CSV file", size / 2**20) == size  # at the limit: read
    trees = write_trees(tmp_path / "t.jsonl", import_device(small, models=None))
    with pytest.raises(InputError, match=r"larger than the 0.001 MB limit"):
        read_trees(trees, max_mb=0.001)
    assert len(read_trees(trees, max_mb=100)) == 3


def test_the_setting_is_checked_and_reaches_the_reader(tmp_path, small):
    from hydra import compose, initialize_config_dir

    import run as cli
    from pipelines.config import check_settings, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(Path(cli.__file__).parent / "conf"),
                               version_base="1.3"):
        cfg = compose("config", overrides=["data.max_file_mb=0"])
        assert cfg.data.max_file_mb == 0
        with pytest.raises(SettingsError, match=r"^data.max_file_mb=0.0: must be in \(0, inf\]$"):
            check_settings(cfg)
        cfg = compose("config", overrides=["data.max_file_mb=0.001", f"data.trees={tmp_path}/t"])
    from pipelines.data import load_trees
    from pipelines.tracking import NullTracker

    (tmp_path / "t").write_text("x" * 4096)
    with pytest.raises(InputError, match=r"larger than the 0.001 MB limit"):
        load_trees(cfg, NullTracker())


def test_locating_a_device_refuses_an_oversize_csv_before_hashing_it(small, tmp_path,
                                                                    monkeypatch):
    from irene.data import locate

    csv = small / csv_name("ml2")
    csv.unlink()
    with csv.open("wb") as handle:
        handle.truncate(2 * 2**30)

    def no_hash(path):
        raise AssertionError(f"{path} was hashed")

    monkeypatch.setattr(locate, "sha256_of", no_hash)
    with pytest.raises(InputError, match=rf"^{csv}: 2048.0 MB \(2147483648 bytes\), larger than "
                                         r"the 256 MB limit on an input file; "):
        locate_device(small, datasets_dir=tmp_path / "ds", download=False)
    with pytest.raises(InputError, match=r"larger than the 1000 MB limit"):
        locate_device(small, datasets_dir=tmp_path / "ds", download=False, max_mb=1000)
