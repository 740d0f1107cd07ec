"""Numbers in the docs come from runs: every generated table block of README.md and docs/*.md
is checked against what the code computes now.

Tolerance: the tables print two decimals, so a recomputed value must round to the printed
one (|printed − computed| ≤ 0.005), or, for a value so large that float rounding reaches the
second decimal (the exploding `free` weights: 462632.93 % error), agree to 1e-7 relative. The
per-model table is recomputed whole; of every other table the first and the last row (a full
recomputation is `make docs`, ~6 minutes).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import update_docs  # noqa: E402

TOLERANCE = 0.005
RELATIVE_TOLERANCE = 1e-7
# the overrides that make one row of each preset's table (its `report.rows` params)
ROW_OVERRIDES = {
    "feature_strategy_ablation": lambda f, s: [f"features={f}", f"strategy={s}", "weighting=paper"],
    "weighting_ablation": lambda s, w: [f"strategy={s}", f"weighting={'exact_one' if w == 'n/a' else w}"],
    "predictors": lambda p, f: [f"predictor={p}", f"features={f}"],
}


def blocks() -> list[tuple[Path, str, list[list[str]]]]:
    found = []
    for path in update_docs.documents():
        for match in update_docs.BLOCK.finditer(path.read_text()):
            rows = [[cell.strip().strip("*") for cell in line.strip("|").split("|")]
                    for line in match.group("body").splitlines() if line.startswith("|")]
            found.append((path, match.group("name"), rows))
    return found


def test_the_docs_have_generated_tables_and_the_update_fills_them(tmp_path):
    names = {name for _, name, _ in blocks()}
    assert "device_1/per_model" in names and len(names) >= 4, names
    (tmp_path / "device_1").mkdir()
    (tmp_path / "device_1" / "t.md").write_text("### title\n\n| a | b |\n|---|---|\n| x | 1.00 |\n")
    text = "before\n<!-- table: device_1/t -->\nold\n<!-- end table -->\nafter\n"
    assert update_docs.update(text, tmp_path) == (
        "before\n<!-- table: device_1/t -->\n| a | b |\n|---|---|\n| x | 1.00 |\n<!-- end table -->\nafter\n")


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipelines.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=["show_progress=false", *overrides])


def overall(device_forest, *overrides: str) -> dict[str, float]:
    from irene.evaluate.crossval import leave_one_model_out
    from pipelines.config import build_predictor

    predictor = build_predictor(compose(*overrides), show_progress=False)
    return leave_one_model_out(device_forest, predictor, show_progress=False).table


def close(printed: str, computed: float) -> bool:
    difference = abs(float(printed) - computed)
    return difference <= TOLERANCE or difference <= RELATIVE_TOLERANCE * abs(computed)


@pytest.mark.slow
def test_every_generated_number_is_what_the_code_computes(device_forest):
    from pipelines.stages.report import REFERENCE_DEVICE_1

    checked = 0
    for path, name, rows in blocks():
        device, preset = name.split("/")
        assert device == "device_1", f"{path}: only device-1 tables can be checked here"
        header, body = rows[0], rows[2:]
        if preset == "whatif":
            checked += check_whatif(path, header, body, device_forest)
            continue
        levels = [header.index(level) for level in ("ml", "module", "model")]
        if preset == "per_model":
            table = overall(device_forest)
            for row in body:
                for column, level in zip(levels, ("ml", "module", "model"), strict=True):
                    assert close(row[column], table.loc[row[0], level]), (path, row, level)
                reference = REFERENCE_DEVICE_1.get(row[0])
                if reference:
                    assert [float(v) for v in row[4:7]] == list(reference), (path, row)
                checked += 1
            continue
        keys = len(header) - 3
        for row in (body[0], body[-1]):
            if row[keys] == "–":  # a predictor that does not apply to these features
                continue
            table = overall(device_forest, *ROW_OVERRIDES[preset](*row[:keys]))
            for column, level in zip(levels, ("ml", "module", "model"), strict=True):
                value = table.loc["overall", level]
                assert close(row[column], value), f"{path}: {name} {row}: {level} is {value:.4f}"
            checked += 1
    assert checked >= 6 + 3


def check_whatif(path: Path, header: list[str], body: list[list[str]], device_forest) -> int:
    """The what-if table: the default static predictor's totals, 4 significant digits."""
    from irene.predictors.irene_plus import IrenePlusPredictor
    from irene.predictors.static import predict_trees, trace_static

    predictor = IrenePlusPredictor(feature_sets=["model_specs"]).fit(device_forest)
    for row in (body[0], body[-1]):
        batch, seq = map(int, row[0].split("x"))
        for model, printed in zip(header[1:], row[1:], strict=True):
            tree = predict_trees(predictor, trace_static(model, [(batch, seq)], convention="irene"))[0][0]
            value = tree["frontend_tree"]["predicted_energy"]
            assert format(value, ".4g") == printed, f"{path}: whatif {model} {row[0]}: {value:.4g}"
    return 2


def test_no_prose_number_is_copied_from_a_table():
    """The README quotes no result outside its generated blocks (they would go stale)."""
    text = update_docs.BLOCK.sub("", (ROOT / "README.md").read_text())
    quoted = re.findall(r"(?<!≥ )\b\d+\.\d\d\b", text)  # not a version (Python ≥ 3.11)
    assert not quoted, f"numbers outside generated tables in README.md: {quoted}"
