"""Import of the published CSVs: tree structure from scopes, parameters, determinism, errors."""

from __future__ import annotations

import io
import shutil
from collections import Counter

import pytest

from irene.data import locate, published
from irene.data.published import DataFormatError, DataNotFoundError, import_device, resolve_device_dir
from irene.data.tree import iter_nodes, read_trees, validate_tree, write_trees


def _tree(trees, model, batch_size=8, seq_len=32):
    return next(t for t in trees if (t["model_name"], t["batch_size"], t["seq_len"]) ==
                (model, batch_size, seq_len))


def _by_scope(tree):
    return {n["scope"]: n for n in iter_nodes(tree["frontend_tree"])}


def test_six_paper_models_by_default(device_trees):
    models = Counter(t["model_name"] for t in device_trees)
    assert set(models) == set(published.PAPER_MODELS)
    assert "sshleifer/tiny-ctrl" not in models
    for i, tree in enumerate(device_trees):
        validate_tree(tree, f"tree {i}", require_energy=True)


def test_parents_follow_scopes(device_trees):
    bert = _by_scope(_tree(device_trees, "bert-base-uncased"))
    assert bert["root.encoder.layer.0"]["parent_name"] == "root.encoder"  # no row for the list
    assert bert["root.encoder.layer.0.attention.self"]["parent_name"] == \
        "root.encoder.layer.0.attention"
    self_attention = bert["root.encoder.layer.0.attention.self"]
    kinds = Counter(c["instance_type"] for c in self_attention["child_nodes_obj"])
    assert kinds == {"Linear": 3, "MatMul": 2, "Softmax": 1}
    assert bert["root.encoder.layer.0"]["level"] == 2
    gpt2 = _by_scope(_tree(device_trees, "gpt2"))
    assert gpt2["root.h.0"]["parent_name"] == "root"
    assert gpt2["root.ln_f"]["type"] == "ml"


def test_num_parameters_from_configs(device_trees):
    bert = _by_scope(_tree(device_trees, "bert-base-uncased"))
    assert bert["root"]["num_parameters"] == 109_482_240  # not 0 as in the reference
    assert bert["root.encoder.layer.0.attention.self.query"]["num_parameters"] == 768 * 768 + 768
    assert bert["root.encoder.layer.0.attention.self.matmul_0"]["num_parameters"] == 0
    gpt2 = _by_scope(_tree(device_trees, "gpt2"))
    assert gpt2["root"]["num_parameters"] == 124_439_808


def test_import_is_deterministic_and_round_trips(device_dir, device_trees, tmp_path):
    again = import_device(device_dir)
    path = write_trees(tmp_path / "trees.jsonl", device_trees)
    assert again == device_trees
    assert read_trees(path) == device_trees
    assert write_trees(tmp_path / "again.jsonl", again).read_bytes() == path.read_bytes()


def test_tiny_ctrl_only_when_asked(device_dir):
    trees = import_device(device_dir, models=["sshleifer/tiny-ctrl"])
    assert trees and all(t["model_name"] == "sshleifer/tiny-ctrl" for t in trees)
    relu = _by_scope(trees[0])["root.h.0.ffn.1"]  # a childless ReLU module becomes a leaf
    assert relu["type"] == "ml"


def test_bad_csv_value_names_file_line_and_field(device_dir, tmp_path):
    folder = tmp_path / "dev"
    shutil.copytree(device_dir, folder)
    path = folder / "module_level_features.csv"
    lines = path.read_text().splitlines()
    cells = lines[4].split(",")
    cells[12] = "-0.5"  # energy_mean
    lines[4] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"module_level_features\.csv:5: field 'energy_mean'"):
        import_device(folder)


def test_missing_data_explains_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("IRENE_DATA_DIR", raising=False)

    def offline(url, timeout):
        raise OSError("network unreachable")

    monkeypatch.setattr(locate.urllib.request, "urlopen", offline)
    with pytest.raises(DataNotFoundError) as error:
        resolve_device_dir(None, "device_1", datasets_dir=tmp_path / "ds")
    text = str(error.value)
    assert str(tmp_path / "ds" / "device_1") in text and "raw.githubusercontent.com" in text
    assert "IRENE_DATA_DIR" in text and "\n" not in text
    assert not (tmp_path / "ds" / "device_1" / "model_level_features.csv").exists()
    # an explicit folder never falls back to another one
    with pytest.raises(DataNotFoundError, match=r"^data.path=\S*nowhere: no such folder$"):
        resolve_device_dir(tmp_path / "nowhere", "device_1", datasets_dir=tmp_path / "ds")


def test_download_checks_sha256(tmp_path, monkeypatch):
    monkeypatch.delenv("IRENE_DATA_DIR", raising=False)
    monkeypatch.setattr(locate.urllib.request, "urlopen",
                        lambda url, timeout: io.BytesIO(b"not the published file"))
    with pytest.raises(DataNotFoundError, match="sha256"):
        resolve_device_dir(None, "device_1", datasets_dir=tmp_path)
    assert not any((tmp_path / "device_1").glob("*.csv"))


def test_download_lands_verified_files(device_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("IRENE_DATA_DIR", raising=False)

    def serve(url, timeout):
        return io.BytesIO((device_dir / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(locate.urllib.request, "urlopen", serve)
    folder = resolve_device_dir(None, "device_1", datasets_dir=tmp_path)
    assert folder == tmp_path / "device_1"
    assert published.sha256_of(folder / "ml1_level_features.csv") == \
        published.load_sources()["devices"]["device_1"]["ml1_level_features.csv"]
