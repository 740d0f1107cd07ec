"""Every bad data input gets one line naming file, line and field (issue 21, item 3).

Trees files (:mod:`irene.data.tree`), the published CSVs (:mod:`irene.data.published`) and the
rule that finds them (:mod:`irene.data.locate`), each checked with its exact message. The CSV
cases run on one cell of one model cut from the published device-1 files (milliseconds).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import shutil
from pathlib import Path

import pytest

# torch and transformers (the import's parameter counts) once, at collection: a mutation run
# forks every mutant's tests from the collected process (scripts/mutation.py)
import irene.data.architectures  # noqa: F401
from irene.data import locate
from irene.data.locate import (
    DataLocation,
    DataNotFoundError,
    download_device,
    load_sources,
    locate_device,
    published_device,
    resolve_device_dir,
    sha256_of,
)
from irene.data.published import CSV_COLUMNS, CSV_FILES, DataFormatError, csv_name, import_device
from irene.data.tree import (
    FIELD_BOUNDS,
    MAX_SHAPE,
    MissingInputError,
    TreeFormatError,
    dumps_trees,
    iter_nodes,
    iter_nodes_with_parent,
    read_trees,
    tree_key,
    validate_tree,
    value_problem,
    write_trees,
)
from irene.errors import InputError
from tests.conftest import make_tree

MODEL = "distilgpt2"
CELL = "8.0,32.0,"


# ================================================================================ trees files
def _lines(path: Path, trees: list) -> Path:
    path.write_text("".join(json.dumps(t) + "\n" for t in trees))
    return path


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(TreeFormatError) as caught:
        read_trees(path, **kwargs)
    text = str(caught.value)
    assert "\n" not in text
    return text


def _node(tree: dict, scope: str) -> dict:
    return next(n for n in iter_nodes(tree["frontend_tree"]) if n["scope"] == scope)


def _set(scope: str, field: str, value):
    def edit(tree: dict) -> None:
        _node(tree, scope)[field] = value

    return edit


TREE_CASES = [
    # (edit of a valid tree, the message after "<file>:2: ")
    (
        _set("root", "type", "module"),
        "node 'root': field 'type': the root must be of type 'model', got 'module'",
    ),
    (
        _set("root.norm", "child_nodes_obj", [make_tree(model="x")["frontend_tree"]["child_nodes_obj"][1]]),
        "node 'root.norm': field 'child_nodes_obj': an 'ml' node must be a leaf",
    ),
    (
        _set("root.block", "type", "layer"),
        "node 'root.block': field 'type': must be one of ['model', 'module', 'ml'], got 'layer'",
    ),
    (
        _set("root.block", "child_nodes_obj", {"a": 1}),
        "node 'root.block': field 'child_nodes_obj': must be a list",
    ),
    (
        _set("root.block", "child_nodes_obj", [1]),
        "field 'child_nodes_obj': every child must be a JSON object",
    ),
    (
        _set("root.norm", "type", "module"),
        "node 'root.norm': field 'type': a leaf must be an 'ml' node, got 'module'",
    ),
    (_set("root.norm", "id", ""), "node 'root.norm': field 'id': must be a non-empty string, got ''"),
    (_set("root.norm", "id", 7), "node 'root.norm': field 'id': must be a non-empty string, got 7"),
    (_set("root.norm", "scope", ""), "node '': field 'scope': must be a non-empty string, got ''"),
    (
        _set("root.norm", "instance_type", None),
        "node 'root.norm': field 'instance_type': must be a non-empty string, got None",
    ),
    (
        _set("root.norm", "level", True),
        "node 'root.norm': field 'level': must be a whole number >= 0, got True",
    ),
    (_set("root.norm", "level", -1), "node 'root.norm': field 'level': must be a whole number >= 0, got -1"),
    (
        _set("root.norm", "level", 1.5),
        "node 'root.norm': field 'level': must be a whole number >= 0, got 1.5",
    ),
    (_set("root.norm", "flops", True), "node 'root.norm': field 'flops': must be a finite number, got True"),
    (_set("root.norm", "gpu", 100.5), "node 'root.norm': field 'gpu': must be in [0, 100] %, got 100.5"),
    (
        _set("root.norm", "times_mean", -0.1),
        "node 'root.norm': field 'times_mean': must be in [0, 1e+06] s, got -0.1",
    ),
    (
        _set("root.norm", "ground_truth_energy", 0.0),
        "node 'root.norm': field 'ground_truth_energy': must be a finite positive number, got 0.0",
    ),
    (
        _set("root.norm", "ground_truth_energy", False),
        "node 'root.norm': field 'ground_truth_energy': must be a finite positive number, got False",
    ),
    (
        _set("root.norm", "predicted_energy", float("nan")),
        "node 'root.norm': field 'predicted_energy': must be a finite number, got nan",
    ),
    (
        _set("root.norm", "predicted_energy", True),
        "node 'root.norm': field 'predicted_energy': must be a finite number, got True",
    ),
    (
        _set("root.norm", "predicted_energy", "1.0"),
        "node 'root.norm': field 'predicted_energy': must be a finite number, got '1.0'",
    ),
    (lambda t: t.__setitem__("batch_size", True), "field 'batch_size': must be a finite number, got True"),
    (lambda t: t.__setitem__("seq_len", 0), "field 'seq_len': must be a positive integer, got 0"),
    (
        lambda t: t.__setitem__("seq_len", MAX_SHAPE + 1),
        f"field 'seq_len': must be a positive integer, got {MAX_SHAPE + 1}",
    ),
    (lambda t: t.__setitem__("model_name", ""), "field 'model_name': must be a non-empty string, got ''"),
    (lambda t: t.__setitem__("model_name", 3), "field 'model_name': must be a non-empty string, got 3"),
    (lambda t: t.__setitem__("frontend_tree", []), "field 'frontend_tree': must be a JSON object"),
    (lambda t: t.pop("frontend_tree"), "field 'frontend_tree': missing"),
    (lambda t: t["frontend_tree"].pop("child_nodes_obj"), "node 'root': field 'child_nodes_obj': missing"),
    (lambda t: _node(t, "root.norm").pop("scope"), "node 'toy/2x4/root.norm': field 'scope': missing"),
]


@pytest.mark.parametrize(("edit", "message"), TREE_CASES)
def test_a_bad_tree_gets_one_line_naming_file_line_node_and_field(tmp_path, edit, message):
    tree = make_tree()
    edit(tree)
    path = _lines(tmp_path / "bad.jsonl", [make_tree(model="ok"), tree])
    assert _error(path) == f"{path}:2: {message}"


def test_a_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n")
    assert _error(path) == f"{path}:1: expected a JSON object, got list"


def test_an_empty_trees_file_and_one_of_blank_lines(tmp_path):
    for text in ("", "\n  \n\n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(text)
        assert _error(path) == f"{path}: no trees in file"


def test_a_binary_file_and_deeply_nested_json(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(make_tree()).encode() + b"\n\xff\xfe\n")
    assert _error(path) == f"{path}:2: not UTF-8 text (byte 1); is this a trees jsonl file?"
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    assert _error(deep) == f"{deep}:1: JSON nested too deeply"


def test_invalid_json_says_where(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"model_name": "a')  # the last line, cut
    assert _error(path) == (
        f"{path}:1: invalid JSON (Unterminated string starting at character 16); is the file truncated?"
    )


def test_a_missing_trees_file(tmp_path):
    with pytest.raises(MissingInputError, match=r"^trees file not found: .*nowhere\.jsonl$"):
        read_trees(tmp_path / "nowhere.jsonl")


def test_energy_is_required_only_when_asked(tmp_path):
    tree = make_tree()
    _node(tree, "root.norm").pop("ground_truth_energy")
    path = _lines(tmp_path / "t.jsonl", [tree])
    assert read_trees(path)[0] == tree
    assert _error(path, require_energy=True) == (
        f"{path}:1: node 'root.norm': field 'ground_truth_energy': missing (a measured energy is "
        "required here)"
    )
    _node(tree, "root.norm")["ground_truth_energy"] = None  # null: not measured
    assert read_trees(_lines(tmp_path / "n.jsonl", [tree]))[0] == tree


def test_null_features_are_allowed_and_unchecked_when_not_validating(tmp_path):
    tree = make_tree()
    _node(tree, "root.norm")["gpu"] = None
    assert read_trees(_lines(tmp_path / "t.jsonl", [tree])) == [tree]
    broken = make_tree()
    broken["frontend_tree"]["type"] = "module"
    assert read_trees(_lines(tmp_path / "b.jsonl", [broken, broken]), validate=False) == [broken, broken]


def test_a_second_tree_of_one_shape_but_not_a_fractional_shape(tmp_path):
    path = _lines(tmp_path / "d.jsonl", [make_tree(), make_tree(model="b"), make_tree()])
    assert _error(path) == (
        f"{path}:3: field 'model_name': a second tree for ('toy', 2, 4) (the first is on line 1)"
    )
    half = make_tree(batch_size=2)
    half["batch_size"] = 2.5  # not the shape (toy, 2, 4) again: a bad batch size
    path = _lines(tmp_path / "h.jsonl", [make_tree(), half])
    assert _error(path) == f"{path}:2: field 'batch_size': must be a positive integer, got 2.5"
    flag = make_tree()
    flag["batch_size"] = True
    path = _lines(tmp_path / "f.jsonl", [make_tree(batch_size=1), flag])
    assert _error(path) == f"{path}:2: field 'batch_size': must be a finite number, got True"


def test_duplicate_ids_are_found_across_lines(tmp_path):
    other = make_tree(batch_size=3)
    other["frontend_tree"]["id"] = "toy/2x4/root"
    path = _lines(tmp_path / "dup.jsonl", [make_tree(), other])
    assert _error(path) == f"{path}:2: node 'root': field 'id': duplicate node id 'toy/2x4/root'"


@pytest.mark.parametrize("field", sorted(FIELD_BOUNDS))
def test_value_bounds_are_inclusive_and_exact(field):
    low, high, unit = FIELD_BOUNDS[field]
    if field == "ground_truth_energy":
        assert value_problem(field, low) == f"must be a finite positive number, got {low!r}"
        assert value_problem(field, 1e-12) is None
    else:
        assert value_problem(field, low) is None
    assert value_problem(field, high) is None
    above = high * 1.5
    assert value_problem(field, above) == f"must be in [{low:g}, {high:g}] {unit}, got {above!r}"
    assert value_problem(field, -1.0) is not None
    assert value_problem(field, math.inf) is not None and value_problem(field, "1") is not None


def test_shape_bounds():
    for field in ("batch_size", "seq_len"):
        assert value_problem(field, 1) is None and value_problem(field, MAX_SHAPE) is None
        assert value_problem(field, 8.0) is None
        for bad in (0, -3, 1.5, MAX_SHAPE + 1):
            assert value_problem(field, bad) == f"must be a positive integer, got {bad!r}"
        assert value_problem(field, False) == "must be a finite number, got False"


def test_walks_serialisation_and_keys(tmp_path):
    tree = make_tree()
    order = [n["scope"] for n in iter_nodes(tree["frontend_tree"])]
    assert order == ["root", "root.block", "root.block.linear", "root.block.matmul_0", "root.norm"]
    walked = [
        (n["scope"], parent, depth) for n, parent, depth in iter_nodes_with_parent(tree["frontend_tree"])
    ]
    assert walked == [
        ("root", -1, 0),
        ("root.block", 0, 1),
        ("root.block.linear", 1, 2),
        ("root.block.matmul_0", 1, 2),
        ("root.norm", 0, 1),
    ]
    text = dumps_trees([tree, make_tree(model="b")])
    assert text.count("\n") == 2 and text.startswith('{"model_name": "toy", "batch_size": 2, ')
    assert json.loads(text.splitlines()[1])["model_name"] == "b"
    assert tree_key({"model_name": "m", "batch_size": 8.0, "seq_len": 32.0}) == ("m", 8, 32)
    path = write_trees(tmp_path / "t.jsonl", [tree])
    assert path.read_text() == dumps_trees([tree])
    validate_tree(tree, "here", require_energy=True)  # a valid tree passes


# ============================================================================== published CSVs
@pytest.fixture(scope="module")
def one_cell(device_dir, tmp_path_factory) -> Path:
    """distilgpt2 at batch 8, sequence 32: its rows of the four published files."""
    folder = tmp_path_factory.mktemp("one-cell")
    for level in CSV_FILES:
        lines = (device_dir / csv_name(level)).read_text().splitlines(keepends=True)
        kept = [lines[0]] + [
            line for line in lines[1:] if line.startswith(CELL) and line.rstrip().endswith("," + MODEL)
        ]
        (folder / csv_name(level)).write_text("".join(kept))
    return folder


@pytest.fixture
def cell(one_cell, tmp_path) -> Path:
    folder = tmp_path / "device"
    shutil.copytree(one_cell, folder)
    return folder


def _edit(folder: Path, level: str, row: int, column: str, value: str) -> Path:
    path = folder / csv_name(level)
    rows = list(csv.reader(path.read_text().splitlines()))
    rows[row + 1][rows[0].index(column)] = value
    with path.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    return path


def _rows(folder: Path, level: str) -> list[list[str]]:
    return list(csv.reader((folder / csv_name(level)).read_text().splitlines()))


def _import_error(folder: Path) -> str:
    with pytest.raises(DataFormatError) as caught:
        import_device(folder, models=None)
    text = str(caught.value)
    assert "\n" not in text
    return text


def test_the_cell_imports(cell):
    (tree,) = import_device(cell, models=[MODEL])
    assert tree_key(tree) == (MODEL, 8, 32)
    validate_tree(tree, "cell", require_energy=True)
    nodes = list(iter_nodes(tree["frontend_tree"]))
    assert len(nodes) == sum(len(_rows(cell, level)) - 1 for level in CSV_FILES)
    root = tree["frontend_tree"]
    model_row = dict(zip(*_rows(cell, "model")[:2], strict=True))
    assert root["ground_truth_energy"] == float(model_row["energy_mean"])
    assert root["flops"] == float(model_row["flops"]) and root["id"] == f"{MODEL}/8x32/root"
    assert root["instance_type"] == "GPT2Model" and root["parent_name"] is None
    matmul = _node(tree, "root.h.0.attn.matmul_0")
    assert (matmul["type"], matmul["num_parameters"], matmul["parent_name"], matmul["level"]) == (
        "ml",
        0,
        "root.h.0.attn",
        3,
    )
    assert _node(tree, "root.h.0.attn.matmul_1")["instance_type"] == "MatMul"
    assert root["child_nodes"] == [c["scope"] for c in root["child_nodes_obj"]]


CSV_CASES = [
    # (file, data row, column, new value, message after "<file>:<line>: ")
    ("module", 0, "energy_mean", "abc", "field 'energy_mean': must be a finite positive number, got 'abc'"),
    (
        "module",
        1,
        "energy_mean",
        "",
        "field 'energy_mean': must be a finite positive number, got an empty cell (or NaN)",
    ),
    (
        "module",
        1,
        "energy_mean",
        "nan",
        "field 'energy_mean': must be a finite positive number, got an empty cell (or NaN)",
    ),
    ("model", 0, "energy_mean", "inf", "field 'energy_mean': must be a finite positive number, got inf"),
    ("model", 0, "energy_mean", "0", "field 'energy_mean': must be a finite positive number, got 0"),
    ("ml1", 2, "flops", "abc", "field 'flops': must be a finite number, got 'abc'"),
    ("ml1", 2, "flops", "", "field 'flops': must be a finite number, got an empty cell (or NaN)"),
    ("ml1", 2, "gpu", "True", "field 'gpu': must be a finite number, got 'True'"),
    ("ml1", 2, "gpu", "101", "field 'gpu': must be in [0, 100] %, got 101"),
    ("ml1", 2, "flops", str(2**53), "field 'flops': must be in [0, 1e+15] MFLOP, got 9007199254740992.0"),
    ("ml1", 2, "flops", str(2**52 + 1), f"field 'flops': must be in [0, 1e+15] MFLOP, got {2**52 + 1}"),
    ("ml2", 0, "times_mean", "-1e-3", "field 'times_mean': must be in [0, 1e+06] s, got -0.001"),
    ("model", 0, "batch_size", "8.5", "field 'batch_size': must be a positive integer, got 8.5"),
    ("model", 0, "seq_len", "0", "field 'seq_len': must be a positive integer, got 0"),
    ("model", 0, "seq_len", str(2**31), f"field 'seq_len': must be a positive integer, got {2**31}"),
    ("module", 0, "level_name", "", "field 'level_name': empty"),
    ("module", 0, "level_name", "   ", "field 'level_name': empty"),
    ("model", 0, "model_name", "", "field 'model_name': empty"),
    (
        "module",
        0,
        "level_name",
        "h.0.attn",
        "field 'level_name': expected '<module scope>:<class name>', got 'h.0.attn'",
    ),
    (
        "ml1",
        0,
        "level_name",
        ":Linear",
        "field 'level_name': expected '<module scope>:<class name>', got ':Linear'",
    ),
    (
        "ml2",
        0,
        "level_name",
        "h.0.attn:",
        "field 'level_name': expected '<module scope>:<class name>', got 'h.0.attn:'",
    ),
    (  # the class is after the last colon: the scope keeps the others
        "module",
        0,
        "level_name",
        "h.0:GPT2Block:x",
        f"field 'level_name': scope 'h.0:GPT2Block' is not a module of {MODEL} in this transformers version",
    ),
    (
        "module",
        0,
        "level_name",
        "h.99.attn:Attention",
        f"field 'level_name': scope 'h.99.attn' is not a module of {MODEL} in this transformers version",
    ),
    (
        "ml2",
        0,
        "level_name",
        "nowhere:MatMul",
        f"field 'level_name': scope 'nowhere' is not a module of {MODEL} in this transformers version",
    ),
]


@pytest.mark.parametrize(("level", "row", "column", "value", "message"), CSV_CASES)
def test_a_bad_csv_cell_gets_one_line_naming_file_line_and_field(cell, level, row, column, value, message):
    path = _edit(cell, level, row, column, value)
    assert _import_error(cell) == f"{path}:{row + 2}: {message}"


def test_an_unknown_model_name_names_its_first_row(cell):
    with pytest.raises(DataFormatError, match=r"models \['gpt2'\] not in the data; it has \['distilgpt2'\]$"):
        import_device(cell, models=["gpt2"])
    path = _edit(cell, "ml2", 0, "model_name", "gpt3")
    text = _import_error(cell)
    assert text.startswith(
        f"{path}:2: field 'model_name': 'gpt3' is not an architecture this version "
        "knows (irene/data/architectures.py); known: "
    )
    from irene.data.architectures import MODEL_REGISTRY

    assert text.endswith("known: " + ", ".join(sorted(MODEL_REGISTRY))) and MODEL in text


def test_an_ml2_row_under_an_ml1_leaf_is_refused(cell):
    rows = _rows(cell, "ml1")
    leaf = rows[1][rows[0].index("level_name")].split(":")[0]
    path = _edit(cell, "ml2", 0, "level_name", f"{leaf}:MatMul")
    assert _import_error(cell) == (
        f"{path}:2: field 'level_name': scope {leaf!r} is an ml1 row (a leaf, "
        f"ml1_level_features.csv:2); it cannot hold MatMul"
    )


def test_a_second_row_for_one_scope_and_for_the_model(cell):
    path = cell / csv_name("module")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines + [lines[1]]))
    scope = lines[1].split(",")[13].split(":")[0]
    assert _import_error(cell) == (
        f"{path}:{len(lines) + 1}: field 'level_name': a second row for scope {scope!r} of {MODEL} "
        "(8, 32) (the first is module_level_features.csv:2)"
    )
    path.write_text("".join(lines))
    model = cell / csv_name("model")
    model_lines = model.read_text().splitlines(keepends=True)
    model.write_text("".join(model_lines + [model_lines[1]]))
    assert _import_error(cell) == (
        f"{model}:3: field 'level_name': a second row for {MODEL} (8, 32) (the first is line 2)"
    )


def test_a_cell_without_a_model_row_is_skipped_with_a_warning(cell, caplog):
    for level in ("module", "ml1", "ml2"):  # a second cell, (8, 16), without its model row
        path = cell / csv_name(level)
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines + [line.replace("8.0,32.0,", "8.0,16.0,", 1)
                                         for line in lines[1:]]))
    with caplog.at_level(logging.WARNING, logger="irene.data.published"):  # (8, 16) comes first
        assert [tree_key(t) for t in import_device(cell, models=None)] == [(MODEL, 8, 32)]
    assert f"{cell}: {MODEL} at batch 8, seq 16 has no model row; skipped" in caplog.messages


def test_a_third_op_of_one_scope_gets_the_next_number(cell):
    path = cell / csv_name("ml2")
    lines = path.read_text().splitlines(keepends=True)
    third = lines[1].split(",")
    assert third[13] == "h.0.attn:MatMul" and lines[2] == lines[1]
    third[10] = repr(float(third[10]) * 1.01)  # not a copy: a third MatMul of its own
    path.write_text("".join(lines[:3] + [",".join(third)] + lines[3:]))
    (tree,) = import_device(cell, models=None)
    attn = _node(tree, "root.h.0.attn")
    assert [c["scope"] for c in attn["child_nodes_obj"] if c["instance_type"] == "MatMul"] == [
        f"root.h.0.attn.matmul_{k}" for k in range(3)]
    assert _node(tree, "root.h.0.attn.matmul_2")["times_mean"] == float(third[10])


def test_a_missing_or_folder_csv_is_named_by_the_import(cell):
    path = cell / csv_name("ml1")
    path.unlink()
    with pytest.raises(MissingInputError) as caught:
        import_device(cell, models=None)
    assert str(caught.value) == f"CSV file not found: {path}"
    path.mkdir()
    with pytest.raises(InputError) as caught:
        import_device(cell, models=None)
    assert str(caught.value) == f"{path}: a folder, not a CSV file"


def test_level_names_that_look_like_numbers_stay_text(cell):
    path = cell / csv_name("ml2")
    rows = _rows(cell, "ml2")
    for row in rows[1:]:  # the whole column: pandas would read it as numbers
        row[rows[0].index("level_name")] = "12"
    with path.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    assert _import_error(cell) == (
        f"{path}:2: field 'level_name': expected '<module scope>:<class name>', got '12'")


def test_a_parser_error_without_text_is_named_by_its_kind(cell, monkeypatch):
    import pandas as pd

    def fail(*args, **kwargs):
        raise pd.errors.ParserError("")

    monkeypatch.setattr(pd, "read_csv", fail)
    assert _import_error(cell) == f"{cell / csv_name('model')}: not a readable CSV file (ParserError)"


def test_file_level_problems(cell):
    path = cell / csv_name("ml1")
    header = path.read_text().splitlines()[0]
    path.write_text(header.replace("gpu_clk,", "") + "\n")
    assert _import_error(cell) == f"{path}:1: field 'gpu_clk': column missing"
    path.write_text("")
    assert _import_error(cell) == f"{path}:1: empty file; expected the header {','.join(CSV_COLUMNS)}"
    path.write_bytes(b"batch_size\n\xff\xfe\x00\n")
    assert _import_error(cell) == f"{path}: not UTF-8 text (byte 12); is this a CSV file?"
    path.write_text(header + '\n"8.0,32.0\n')
    import pandas as pd

    with pytest.raises(pd.errors.ParserError) as parser_error:
        pd.read_csv(path)
    first = str(parser_error.value).strip().splitlines()[0]
    assert _import_error(cell) == f"{path}: not a readable CSV file ({first})"


def test_the_import_gives_every_tree_the_device_its_files_say(cell, tmp_path, device_dir,
                                                               monkeypatch):
    digests = {csv_name(level): sha256_of(cell / csv_name(level)) for level in CSV_FILES}
    (tree,) = import_device(cell, models=None)  # no published device's files, no name
    assert tree["device"]["id"] == "unknown"
    assert tree["device"]["source"] == {"kind": "unknown", "sha256": digests}
    assert list(tree)[-1] == "device" and tree["frontend_tree"]["id"] == f"{MODEL}/8x32/root"
    (tree,) = import_device(cell, models=None, device="lab_gpu")
    assert tree["device"]["id"] == "lab_gpu" and tree["device"]["source"]["kind"] == "declared"
    _fake_sources(tmp_path, device_dir, monkeypatch, device_x=digests)
    (tree,) = import_device(cell, models=None, device="device_1")
    assert tree["device"] == {
        "id": "device_x", "gpu": dict.fromkeys(("name", "memory_mib", "driver", "cuda",
                                                "power_limit_w")),
        "meter": None, "convention": "irene", "source": {"kind": "published", "sha256": digests}}
    validate_tree(tree, "cell", require_energy=True)


def test_shapes_written_as_floats_become_integers(cell):
    (tree,) = import_device(cell, models=None)
    assert isinstance(tree["batch_size"], int) and isinstance(tree["seq_len"], int)
    assert tree["frontend_tree"]["id"] == f"{MODEL}/8x32/root"


# ============================================================================ finding the files
def _fake_sources(tmp_path: Path, device_dir: Path, monkeypatch, **devices) -> None:
    """A ``published.json`` that knows device_1 (its real checksums) and ``devices``."""
    real = load_sources()
    sources = {**real, "devices": {**real["devices"], **devices}}
    path = tmp_path / "sources.json"
    path.write_text(json.dumps(sources))
    monkeypatch.setattr(locate, "load_sources", lambda p=path: json.loads(p.read_text()))


def test_a_folder_with_only_one_published_file_is_not_that_device(device_dir, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(device_dir, folder)
    assert published_device(folder) == "device_1"
    for level in CSV_FILES[1:]:  # every file but the model level's edited
        path = folder / csv_name(level)
        path.write_bytes(path.read_bytes() + b"\n")
    assert sha256_of(folder / csv_name("model")) == load_sources()["devices"]["device_1"][csv_name("model")]
    assert published_device(folder) is None
    (folder / csv_name("ml2")).unlink()
    assert published_device(folder) is None


def test_only_one_edited_file_is_enough_to_refuse(device_dir, tmp_path):
    folder = tmp_path / "one-edited"
    shutil.copytree(device_dir, folder)
    path = folder / csv_name("ml2")
    path.write_bytes(path.read_bytes() + b"\n")
    assert published_device(folder) is None


def test_a_device_without_checksums_matches_no_folder(device_dir, tmp_path, monkeypatch):
    _fake_sources(tmp_path, device_dir, monkeypatch, device_9={})
    assert published_device(device_dir) == "device_1"
    _fake_sources(tmp_path, device_dir, monkeypatch, device_1={})
    assert published_device(device_dir) is None


def test_sha256_of_reads_in_blocks(tmp_path):
    path = tmp_path / "big.bin"
    data = bytes(range(256)) * 9000  # over one 1 MiB block
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()


def _no_network(monkeypatch) -> list[str]:
    asked: list[str] = []

    def refuse(url, timeout):
        asked.append(url)
        raise OSError("network disabled")

    monkeypatch.setattr(locate.urllib.request, "urlopen", refuse)
    return asked


def test_the_rule_data_path_first(device_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("IRENE_DATA_DIR", str(tmp_path / "elsewhere"))
    located = locate_device(device_dir, "device_2", datasets_dir=tmp_path / "ds")
    assert located == DataLocation(
        device_dir,
        "data.path",
        {csv_name(level): sha256_of(device_dir / csv_name(level)) for level in CSV_FILES},
    )
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(device_dir / csv_name("model"), partial)
    with pytest.raises(DataNotFoundError) as caught:
        locate_device(partial, datasets_dir=tmp_path / "ds")
    assert str(caught.value) == (
        f"data.path={partial}: module_level_features.csv is missing (a device folder holds "
        "model_level_features.csv, module_level_features.csv, ml1_level_features.csv, "
        "ml2_level_features.csv)"
    )


@pytest.mark.parametrize("layout", ["parent", "named", "content"])
def test_the_rule_irene_data_dir_for_the_device_it_names(device_dir, tmp_path, monkeypatch, layout):
    _no_network(monkeypatch)
    if layout == "parent":
        env, expected = tmp_path / "root", tmp_path / "root" / "device_1"
        shutil.copytree(device_dir, expected)
    elif layout == "named":
        env = expected = tmp_path / "device_1"
        shutil.copytree(device_dir, env)
    else:
        env = expected = tmp_path / "anything"
        shutil.copytree(device_dir, env)
    monkeypatch.setenv("IRENE_DATA_DIR", str(env))
    located = locate_device(None, "device_1", datasets_dir=tmp_path / "ds")
    assert (located.folder, located.source) == (expected, "$IRENE_DATA_DIR")
    assert resolve_device_dir(None, "device_1", datasets_dir=tmp_path / "ds") == expected


def test_irene_data_dir_naming_the_device_but_missing_a_file(device_dir, tmp_path, monkeypatch):
    folder = tmp_path / "device_1"
    folder.mkdir()
    shutil.copy(device_dir / csv_name("model"), folder)
    monkeypatch.setenv("IRENE_DATA_DIR", str(folder))
    with pytest.raises(DataNotFoundError) as caught:
        locate_device(None, "device_1", datasets_dir=tmp_path / "ds")
    assert str(caught.value) == (
        f"$IRENE_DATA_DIR={folder}: module_level_features.csv is missing (a device folder holds "
        "model_level_features.csv, module_level_features.csv, ml1_level_features.csv, "
        "ml2_level_features.csv)"
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("device_1", "is the folder of device_1"),
        ("copy", "holds the published device_1 files"),
        ("other", "is not named device_2 and has no device_2/ folder"),
    ],
)
def test_irene_data_dir_of_another_device_is_skipped_and_said(
    device_dir, tmp_path, monkeypatch, caplog, name, reason
):
    asked = _no_network(monkeypatch)
    caplog.set_level(logging.INFO, logger="irene.data.locate")
    env = tmp_path / name
    if name != "copy":
        env.mkdir()
    else:
        shutil.copytree(device_dir, env)
    monkeypatch.setenv("IRENE_DATA_DIR", str(env))
    datasets = tmp_path / "ds"
    with pytest.raises(DataNotFoundError) as caught:
        locate_device(None, "device_2", datasets_dir=datasets)
    sources = load_sources()
    assert str(caught.value) == (
        f"published data for device_2 not found. Looked in: $IRENE_DATA_DIR={env} skipped: it "
        f"{reason}; project datasets folder: {datasets / 'device_2'}; download: could not download "
        f"{sources['base_url']}/device_2/model_level_features.csv: network disabled. Provide a "
        "folder with model_level_features.csv, module_level_features.csv, ml1_level_features.csv, "
        "ml2_level_features.csv via data.path=..., or $IRENE_DATA_DIR=<folder holding device_2/>, "
        f"or put them in {datasets / 'device_2'} (public URLs and sha256 in {locate.SOURCES_FILE})."
    )
    assert asked == [f"{sources['base_url']}/device_2/model_level_features.csv"]
    assert not (datasets / "device_2").exists()  # nothing kept of a failed download
    assert caplog.messages[0] == f"$IRENE_DATA_DIR={env} skipped: it {reason}"


def test_the_rule_datasets_then_no_download_when_told(device_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("IRENE_DATA_DIR", raising=False)
    asked = _no_network(monkeypatch)
    datasets = tmp_path / "ds"
    shutil.copytree(device_dir, datasets / "device_1")
    located = locate_device(None, "device_1", datasets_dir=datasets)
    assert (located.folder, located.source) == (datasets / "device_1", "datasets")
    with pytest.raises(DataNotFoundError) as caught:
        locate_device(None, "device_2", datasets_dir=datasets, download=False)
    assert str(caught.value).startswith(
        f"published data for device_2 not found. Looked in: project datasets folder: "
        f"{datasets / 'device_2'}. Provide"
    )
    assert asked == []


def test_download_lands_checked_files_and_removes_partial_ones(device_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("IRENE_DATA_DIR", raising=False)
    served: list[str] = []

    def serve(url, timeout):
        served.append(url)
        assert timeout == 30.0
        return io.BytesIO((device_dir / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(locate.urllib.request, "urlopen", serve)
    located = locate_device(None, "device_1", datasets_dir=tmp_path / "ds")
    assert (located.folder, located.source) == (tmp_path / "ds" / "device_1", "download")
    assert sorted(p.name for p in located.folder.iterdir()) == sorted(csv_name(lv) for lv in CSV_FILES)
    assert len(served) == 4 and served[0].endswith("/device_1/model_level_features.csv")

    def corrupt(url, timeout):
        return io.BytesIO(b"not it")

    monkeypatch.setattr(locate.urllib.request, "urlopen", corrupt)
    target = tmp_path / "again"
    with pytest.raises(DataNotFoundError) as caught:
        download_device("device_1", target)
    url = f"{load_sources()['base_url']}/device_1/model_level_features.csv"
    assert str(caught.value) == (
        f"{url}: sha256 {hashlib.sha256(b'not it').hexdigest()} does not match "
        f"the published {load_sources()['devices']['device_1'][csv_name('model')]}"
    )
    assert list(target.iterdir()) == []  # the partial file is removed


def test_download_of_an_unknown_device_and_of_one_without_checksums(
    device_dir, tmp_path, monkeypatch, caplog
):
    with pytest.raises(DataNotFoundError) as caught:
        download_device("device_x", tmp_path)
    known = sorted(load_sources()["devices"])
    assert str(caught.value) == f"no public source known for device 'device_x'; known: {known}"
    _fake_sources(tmp_path, device_dir, monkeypatch, device_9={})
    monkeypatch.setattr(locate.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"x,y\n"))
    with caplog.at_level(logging.WARNING, logger="irene.data.locate"):
        assert download_device("device_9", tmp_path / "d9") == tmp_path / "d9"
    assert (tmp_path / "d9" / csv_name("ml2")).read_bytes() == b"x,y\n"
    assert ("no published checksum for model_level_features.csv; its content is not verified"
            in caplog.messages)
    assert not list((tmp_path / "d9").glob(".*.part"))


def test_parent_positions_in_a_deep_tree():
    def node(scope, *children):
        return {"scope": scope, "child_nodes_obj": list(children)}

    root = node("r", node("a", node("b", node("c"), node("d")), node("e")), node("f", node("g")))
    walked = [(n["scope"], parent, depth) for n, parent, depth in iter_nodes_with_parent(root)]
    assert walked == [("r", -1, 0), ("a", 0, 1), ("b", 1, 2), ("c", 2, 3), ("d", 2, 3), ("e", 1, 2),
                      ("f", 0, 1), ("g", 6, 2)]


def test_download_logs_each_url(device_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(locate.urllib.request, "urlopen",
                        lambda url, timeout: io.BytesIO((device_dir / url.rsplit("/", 1)[1]).read_bytes()))
    with caplog.at_level(logging.INFO, logger="irene.data.locate"):
        download_device("device_1", tmp_path / "d1")
    base = load_sources()["base_url"]
    for level in CSV_FILES:
        assert f"downloading {base}/device_1/{csv_name(level)}" in caplog.messages


def test_the_default_device_and_the_size_limit_in_every_branch(device_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("IRENE_DATA_DIR", raising=False)
    _no_network(monkeypatch)
    datasets = tmp_path / "ds"
    shutil.copytree(device_dir, datasets / "device_1")
    located = locate_device(None, datasets_dir=datasets)  # device_1 by default
    assert (located.folder, located.source) == (datasets / "device_1", "datasets")
    path = datasets / "device_1" / csv_name("model")
    size = path.stat().st_size
    limit = (size - 1) / 2**20  # one byte under the first file
    message = f" MB ({size} bytes), larger than the {limit:g} MB limit on an input file; "
    with pytest.raises(InputError) as caught:
        locate_device(None, datasets_dir=datasets, max_mb=limit)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)
    monkeypatch.setenv("IRENE_DATA_DIR", str(datasets))  # the folder holding device_1/
    assert locate_device(None, datasets_dir=tmp_path / "none").source == "$IRENE_DATA_DIR"
    with pytest.raises(InputError) as caught:
        locate_device(None, datasets_dir=tmp_path / "none", max_mb=limit)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_irene_data_dir_missing_only_its_last_file(device_dir, tmp_path, monkeypatch):
    folder = tmp_path / "device_1"
    shutil.copytree(device_dir, folder)
    (folder / csv_name("ml2")).unlink()
    monkeypatch.setenv("IRENE_DATA_DIR", str(folder))
    with pytest.raises(DataNotFoundError) as caught:
        locate_device(None, datasets_dir=tmp_path / "ds")
    assert str(caught.value).startswith(
        f"$IRENE_DATA_DIR={folder}: ml2_level_features.csv is missing (a device folder holds ")


def test_resolve_device_dir_downloads_by_default_and_keeps_the_path(device_dir, tmp_path,
                                                                    monkeypatch):
    monkeypatch.delenv("IRENE_DATA_DIR", raising=False)
    monkeypatch.setattr(locate.urllib.request, "urlopen",
                        lambda url, timeout: io.BytesIO((device_dir / url.rsplit("/", 1)[1]).read_bytes()))
    datasets = tmp_path / "ds"
    assert resolve_device_dir(None, "device_1", datasets_dir=datasets) == datasets / "device_1"
    assert published_device(datasets / "device_1") == "device_1"
    assert resolve_device_dir(device_dir, "device_2", datasets_dir=datasets) == device_dir


def test_data_path_that_is_not_a_folder_and_the_default_device(device_dir, tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError) as caught:
        locate_device(tmp_path / "nowhere", datasets_dir=tmp_path / "ds")
    assert str(caught.value) == f"data.path={tmp_path / 'nowhere'}: no such folder"
    monkeypatch.delenv("IRENE_DATA_DIR", raising=False)
    _no_network(monkeypatch)
    shutil.copytree(device_dir, tmp_path / "ds" / "device_1")
    assert resolve_device_dir(None, datasets_dir=tmp_path / "ds") == tmp_path / "ds" / "device_1"
    with pytest.raises(DataNotFoundError):
        resolve_device_dir(None, "device_2", datasets_dir=tmp_path / "ds", download=False)


def test_a_module_left_without_children_becomes_a_leaf(cell):
    for level in ("ml1", "ml2", "module"):
        path = cell / csv_name(level)
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if ",h.0.mlp." not in line))
    (tree,) = import_device(cell, models=None)
    mlp = _node(tree, "root.h.0.mlp")
    assert mlp["type"] == "ml" and mlp["child_nodes_obj"] == []
    assert _node(tree, "root.h.1.mlp")["type"] == "module"
    validate_tree(tree, "cell")


def test_every_node_has_the_tree_format_fields_and_the_root_its_parameter_count(cell):
    from irene.data.architectures import parameter_counts

    (tree,) = import_device(cell, models=None)
    root = tree["frontend_tree"]
    assert root["num_parameters"] == parameter_counts(MODEL)[""] > 80_000_000
    fields = {"id", "scope", "parent_name", "level", "instance_type", "type", "num_parameters",
              "flops", "mem_bytes", "cpu", "mem", "gpu", "gpu_mem", "gpu_clk", "gpu_mem_clk", "times_mean",
              "gpu_energy_mean", "ground_truth_energy", "child_nodes_obj", "child_nodes"}
    for node in iter_nodes(root):
        assert set(node) == fields
    counts = parameter_counts(MODEL)
    for scope in ("h.0.attn", "h.0.attn.c_attn", "ln_f"):  # a module, an ml1 leaf, a norm
        assert _node(tree, f"root.{scope}")["num_parameters"] == counts[scope] > 0


def test_a_numeric_model_name_stays_a_name(cell):
    path = _edit(cell, "model", 0, "model_name", "123")
    text = _import_error(cell)
    assert text.startswith(f"{path}:2: field 'model_name': '123' is not an architecture this version knows")


def test_trees_follow_the_order_of_the_models_given(device_dir, tmp_path):
    keep = {("distilgpt2", "8.0,64.0,"), ("distilgpt2", "16.0,32.0"), ("openai-gpt", "8.0,32.0,")}
    for level in CSV_FILES:
        lines = (device_dir / csv_name(level)).read_text().splitlines(keepends=True)
        kept = [lines[0]] + [line for line in lines[1:]
                             if (line.rstrip().rsplit(",", 1)[1], line[:9]) in keep]
        (tmp_path / csv_name(level)).write_text("".join(kept))
    trees = import_device(tmp_path, models=["openai-gpt", "distilgpt2"])
    assert [tree_key(t) for t in trees] == [("openai-gpt", 8, 32), ("distilgpt2", 8, 64),
                                            ("distilgpt2", 16, 32)]  # batch size, then length
