"""Tree format: validation messages name file, line, node and field; writes are atomic."""

from __future__ import annotations

import json

import pytest

from irene.data.tree import TreeFormatError, iter_nodes, read_trees, write_trees
from tests.conftest import make_tree


def write_lines(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def test_round_trip_is_identical(tmp_path):
    trees = [make_tree(), make_tree(model="other", scale=2.0)]
    path = write_trees(tmp_path / "t.jsonl", trees)
    assert read_trees(path) == trees


def _broken(mutate):
    tree = make_tree()
    mutate(tree)
    return tree


@pytest.mark.parametrize(
    ("mutate", "field", "message"),
    [
        (lambda t: t.pop("seq_len"), "seq_len", "missing"),
        (lambda t: t["frontend_tree"]["child_nodes_obj"][0].pop("type"), "type", "missing"),
        (lambda t: t["frontend_tree"].__setitem__("ground_truth_energy", float("nan")),
         "ground_truth_energy", "finite positive"),
        (lambda t: t["frontend_tree"].__setitem__("ground_truth_energy", -1.0),
         "ground_truth_energy", "finite positive"),
        (lambda t: t["frontend_tree"]["child_nodes_obj"][1].__setitem__("id", "toy/2x4/root"),
         "id", "duplicate"),
        (lambda t: t["frontend_tree"]["child_nodes_obj"][1].__setitem__("type", "module"),
         "type", "a leaf must be an 'ml' node"),
        (lambda t: t["frontend_tree"].__setitem__("flops", "many"), "flops", "finite number"),
        (lambda t: t.__setitem__("batch_size", 2.5), "batch_size", "positive integer"),
        (lambda t: t.__setitem__("device", {"id": ""}), "device", "'id' must be a non-empty"),
        (lambda t: t.__setitem__("device", "device_1"), "device", "must be a JSON object"),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path, mutate, field, message):
    path = write_lines(tmp_path / "bad.jsonl", [make_tree(model="ok"), _broken(mutate)])
    with pytest.raises(TreeFormatError) as error:
        read_trees(path)
    text = str(error.value)
    assert text.startswith(f"{path}:2:")
    assert f"field {field!r}" in text and message in text
    assert "\n" not in text


def test_a_line_with_a_device_block_is_valid_and_one_without_is_too(tmp_path):
    from irene.data.provenance import device_block

    block = device_block("h200", kind="measured", meter="nvml", convention="physical",
                         gpu={"name": "NVIDIA H200", "memory_mib": 143771})
    tree = {**make_tree(model="a"), "device": block}
    path = write_lines(tmp_path / "d.jsonl", [tree, make_tree(model="b")])
    first, second = read_trees(path, require_energy=True)
    assert first["device"] == block and "device" not in second


def test_truncated_json(tmp_path):
    line = json.dumps(make_tree())
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(make_tree(model="a")) + "\n" + line[: len(line) // 2] + "\n")
    with pytest.raises(TreeFormatError, match=r"cut\.jsonl:2: invalid JSON.*truncated"):
        read_trees(path)


def test_duplicate_ids_across_lines(tmp_path):
    other = make_tree(batch_size=3)
    other["frontend_tree"]["id"] = make_tree()["frontend_tree"]["id"]
    path = write_lines(tmp_path / "dup.jsonl", [make_tree(), other])
    with pytest.raises(TreeFormatError, match=r"dup\.jsonl:2: .*duplicate node id"):
        read_trees(path)


def test_second_tree_of_the_same_shape_is_refused(tmp_path):
    path = write_lines(tmp_path / "dup.jsonl", [make_tree(), make_tree(model="b"), make_tree()])
    with pytest.raises(TreeFormatError) as error:
        read_trees(path)
    assert str(error.value) == (f"{path}:3: field 'model_name': a second tree for "
                                "('toy', 2, 4) (the first is on line 1)")


def test_energy_required_only_when_asked(tmp_path):
    tree = make_tree()
    for node in iter_nodes(tree["frontend_tree"]):
        node.pop("ground_truth_energy")
    path = write_lines(tmp_path / "unmeasured.jsonl", [tree])
    assert read_trees(path)  # fine for prediction
    with pytest.raises(TreeFormatError, match="ground_truth_energy.*missing"):
        read_trees(path, require_energy=True)


def test_write_never_overwrites_input_and_leaves_no_temp_file(tmp_path):
    source = write_trees(tmp_path / "in.jsonl", [make_tree()])
    before = source.read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite input"):
        write_trees(source, [make_tree(model="x")], protect=[source])
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_blank_line_between_trees_is_skipped_not_the_end_of_the_file(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(make_tree()) + "\n\n  \n" + json.dumps(make_tree(model="b")) + "\n")
    assert [t["model_name"] for t in read_trees(path)] == ["toy", "b"]


def test_validate_tree_needs_no_energy_unless_asked_and_takes_finite_predictions():
    from irene.data.tree import validate_tree

    tree = make_tree()
    for node in iter_nodes(tree["frontend_tree"]):
        node.pop("ground_truth_energy")
        node["predicted_energy"] = 0.5  # a finite prediction is valid
    validate_tree(tree, "t.jsonl:1")  # the default: energy not required
    with pytest.raises(TreeFormatError, match="ground_truth_energy"):
        validate_tree(tree, "t.jsonl:1", require_energy=True)
    tree["frontend_tree"]["predicted_energy"] = float("inf")
    with pytest.raises(TreeFormatError, match="predicted_energy.*finite"):
        validate_tree(tree, "t.jsonl:1")
