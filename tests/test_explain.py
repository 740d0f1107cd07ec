"""Explanation views: top-N text tree, icicle boxes with explicit unattributed remainders,
a self-contained HTML chart that renders in headless Chromium, and the PNG."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess

import numpy as np
import pytest

from irene.data.tree import iter_nodes
from irene.explain import views as explain


@pytest.fixture(scope="session")
def measured_bert(device_trees):
    return next(t for t in device_trees if t["model_name"] == "bert-base-uncased"
                and (t["batch_size"], t["seq_len"]) == (8, 128))


@pytest.fixture()
def negative_tree(measured_bert):
    """A 'prediction' whose root is below the sum of its children (negative remainder)."""
    tree = copy.deepcopy(measured_bert)
    for node in iter_nodes(tree["frontend_tree"]):
        node["predicted_energy"] = node["ground_truth_energy"]
    tree["frontend_tree"]["predicted_energy"] *= 0.5
    tree["frontend_tree"]["child_nodes_obj"][1]["child_nodes_obj"][0]["prediction_fallback"] = True
    return tree


def test_node_frame_unattributed_is_parent_minus_children(measured_bert):
    frame = explain.node_frame(measured_bert)
    assert frame.attrs["source"] == "measured"
    root = frame.iloc[0]
    children = frame[frame["parent"] == 0]["energy_j"].sum()
    assert root["unattributed_j"] == pytest.approx(root["energy_j"] - children)
    assert root["share"] == 1.0
    assert (frame.loc[frame["node_type"] == "ml", "unattributed_j"] == 0).all()


def test_tree_text_groups_identical_siblings_and_hides_nothing(negative_tree):
    text = explain.tree_text(negative_tree)
    lines = text.splitlines()
    assert lines[0].startswith("bert-base-uncased 8x128: predicted")
    assert "(measured 14.25 J)" in lines[0]
    assert lines[1].startswith("root (BertModel)") and "100.0%" in lines[1]
    assert "unattributed -" in lines[1]  # the halved root is below its children
    layers = [line for line in lines if "(BertLayer)" in line]
    assert len(layers) == 1 and "layer.0-11 ×12" in layers[0], layers  # one line for 12 layers
    frame = explain.node_frame(negative_tree)
    total = frame.loc[frame["instance_type"] == "BertLayer", "energy_j"].sum()
    assert f"{total:.4g} J" in layers[0]  # the group's line holds all twelve layers' energy
    assert len(lines) < 60  # fits a screen
    assert any(line.lstrip("│ ").startswith(("├─", "└─")) for line in lines)
    assert "1 fallback leaves" in text
    shallow = explain.tree_text(negative_tree, max_depth=1)
    assert "nodes below (explain.max_depth=2 shows them)" in shallow


def test_icicle_boxes_never_need_negative_areas(negative_tree):
    rows = explain.icicle_rows(negative_tree)
    assert (rows["value"] >= 0).all()
    sums = rows[rows["parent_id"] != ""].groupby("parent_id")["value"].sum()
    values = rows.set_index("id")["value"]
    assert (values[sums.index] >= sums * (1 - 1e-12)).all()  # plotly's branchvalues="total"
    root = rows.iloc[0]
    assert root["energy_j"] == pytest.approx(negative_tree["frontend_tree"]["predicted_energy"])
    assert root["value"] > root["energy_j"]  # drawn at Σ children
    assert "children exceed the parent" in root["hover"]
    unattributed = rows[rows["label"] == explain.UNATTRIBUTED]
    assert len(unattributed) > 10 and (unattributed["value"] > 0).all()
    assert explain.FALLBACK_COLOR in set(rows["color"])


def test_html_is_self_contained_and_png_is_drawn(negative_tree, tmp_path):
    paths = explain.write_views(negative_tree, tmp_path, explain.view_stem(negative_tree))
    html = paths["html"].read_text()
    assert _external_scripts(html) == []  # offline: no <script src=...>
    assert "Plotly.newPlot" in html and len(html) > 1_000_000  # plotly.js embedded
    assert _non_white_fraction(paths["png"]) > 0.3


def _external_scripts(html: str) -> list[str]:
    from html.parser import HTMLParser

    found: list[str] = []

    class Scripts(HTMLParser):  # script bodies are CDATA: strings inside JS are not tags
        def handle_starttag(self, tag, attrs):
            if tag == "script" and dict(attrs).get("src"):
                found.append(dict(attrs)["src"])

    Scripts().feed(html)
    return found


def _non_white_fraction(png) -> float:
    import matplotlib.image

    image = matplotlib.image.imread(str(png))[..., :3]
    return float(np.mean(image.min(axis=-1) < 0.95))


def _distinct_colors(png) -> int:
    import matplotlib.image

    image = (matplotlib.image.imread(str(png))[..., :3] * 255).astype(np.uint8)
    return len(np.unique(image.reshape(-1, 3), axis=0))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(html, png, tmp_path) -> None:
    """Headless Chromium, offline: no network, no first-run, its own profile folder."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI (apt-get install chromium)")
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,800",
                    f"--screenshot={png}", html.as_uri()],
                   check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize("which", ["predicted", "negative"])
def test_html_renders_a_chart_in_headless_chromium(which, negative_tree, device_trees,
                                                   small_trees, tmp_path):
    if which == "predicted":  # bert-base at (8, 128), traced and predicted statically
        from irene import predictors
        from irene.data.forest import build_forest
        from irene.predictors.static import predict_trees, trace_static

        model = predictors.IrenePlusPredictor(feature_sets=["model_specs"], leaf_degrees=[1]).fit(
            build_forest(small_trees))
        tree = predict_trees(model, trace_static("bert-base-uncased", [(8, 128)]))[0][0]
    else:
        tree = negative_tree
    html = explain.write_html(tree, tmp_path / "chart.html")
    png = tmp_path / "screenshot.png"
    screenshot(html, png, tmp_path)
    if os.environ.get("IRENE_KEEP_SCREENSHOT"):
        shutil.copy(png, os.environ["IRENE_KEEP_SCREENSHOT"].replace(".png", f"_{which}.png"))
    # a blank page (e.g. plotly refusing inconsistent values) is white with a title only
    assert _non_white_fraction(png) > 0.5
    assert _distinct_colors(png) > 8
