"""Cross-validation repeated over seeds: the seed mapping, the shared fits, the significance
rule, the mean ± sd tables and the report built from real MLflow runs (small data)."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from scipy import stats
from sklearn.base import clone

from irene.data.tree import write_trees
from irene.errors import MissingInputError
from irene.evaluate.crossval import leave_one_model_out, seeded_leave_one_model_out
from irene.evaluate.significance import (
    SeedSample,
    compare_to_best,
    prediction_bound,
    prediction_z,
    welch_p,
)
from irene.predictors.baselines import FlatPredictor, PhysicsPredictor, SumOfChildrenPredictor
from irene.predictors.irene import IreneModel
from irene.predictors.irene_plus import IrenePlusPredictor
from irene.tables import MeanSd, Table, fold_spread, to_latex, to_markdown
from pipelines.config import register_configs, seed_list

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def quick(**params) -> IreneModel:
    return IreneModel(epochs=2, show_progress=False, **params)


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# ------------------------------------------------------------------------------ predictors
def test_fit_seeds_equals_one_fit_per_seed(small_forest):
    predictor = quick()
    shared = predictor.fit_seeds(small_forest, [1, 2])
    for seed, fitted in zip([1, 2], shared, strict=True):
        alone = clone(predictor).set_params(seed=seed).fit(small_forest)
        assert fitted.seed == seed
        np.testing.assert_array_equal(fitted.predict(small_forest), alone.predict(small_forest))
    assert not np.array_equal(shared[0].predict(small_forest), shared[1].predict(small_forest))
    assert not hasattr(predictor, "weighting_")  # the template stays unfitted


@pytest.mark.parametrize("predictor, uses", [
    (quick(), True),
    (quick(training_strategy="stepwise"), True),
    (quick(training_strategy="none"), False),
    (quick(weighting="exact_one"), False),
    (FlatPredictor(), False),
    (PhysicsPredictor(), False),
    (SumOfChildrenPredictor(), False),
    (IrenePlusPredictor(), False),
])
def test_uses_seed(predictor, uses, small_forest):
    assert predictor.uses_seed() is uses
    if "seed" in predictor.get_params() and not uses:  # the claim holds: the seed changes nothing
        a = clone(predictor).set_params(seed=1).fit(small_forest).predict(small_forest)
        b = clone(predictor).set_params(seed=2).fit(small_forest).predict(small_forest)
        np.testing.assert_array_equal(a, b)


def test_fit_seeds_refuses_a_predictor_without_a_seed(small_forest):
    with pytest.raises(ValueError, match="does not use a seed"):
        FlatPredictor().fit_seeds(small_forest, [1, 2])


# -------------------------------------------------------------------------- cross-validation
def test_first_seed_reproduces_the_single_seed_cross_validation(small_forest):
    predictor = quick()
    single = leave_one_model_out(small_forest, predictor, show_progress=False)
    seeded = seeded_leave_one_model_out(small_forest, predictor, [predictor.seed, 7])
    assert seeded.seeds == [predictor.seed, 7] and seeded.seed_dependent
    first = seeded.folds[seeded.folds["seed"] == predictor.seed].set_index("left_out_model")
    pd.testing.assert_frame_equal(first[list(single.table.columns)],
                                  single.table.drop(index="overall"), check_names=False)
    np.testing.assert_array_equal(seeded.predicted_j, single.predicted_j)
    table = seeded.table()
    per_seed = seeded.per_seed()
    assert list(per_seed.index) == [predictor.seed, 7]
    assert table.loc["overall", "model"] == pytest.approx(per_seed["model"].mean())
    assert table.loc["overall", "model_sd"] == pytest.approx(per_seed["model"].std(ddof=1))
    assert table.loc["overall", "model_sd"] > 0
    assert table.loc["overall", "ml_sd"] == 0  # the leaves do not depend on the seed


def test_seed_independent_predictor_is_fit_once(small_forest):
    calls = []
    result = seeded_leave_one_model_out(small_forest, FlatPredictor(), [1, 2, 3],
                                        on_fold=lambda seed, model, errors: calls.append(seed))
    assert not result.seed_dependent and result.seeds == [] and result.num_seeds == 1
    assert calls == [None] * 6  # one fit per fold, not three
    assert (result.table().filter(like="_sd") == 0).all().all()


def test_repeated_seeds_are_refused(small_forest):
    with pytest.raises(ValueError, match="repeats"):
        seeded_leave_one_model_out(small_forest, quick(), [1, 1])


@pytest.mark.slow
def test_parallel_folds_give_the_serial_numbers(small_forest):
    serial = seeded_leave_one_model_out(small_forest, quick(), [3, 4])
    parallel = seeded_leave_one_model_out(small_forest, quick(), [3, 4], n_jobs=2)
    pd.testing.assert_frame_equal(serial.folds, parallel.folds)


# ------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("value, expected", [
    ("3", [13370, 13371, 13372]), ("[5,1,9]", [5, 1, 9]), ("1", [13370]), ("null", None)])
def test_seed_list(value, expected):
    cfg = compose_cfg(f"seeds={value}")
    assert seed_list(cfg.seeds, cfg.predictor.seed) == expected


def test_seed_list_follows_predictor_seed():
    cfg = compose_cfg("seeds=2", "predictor.seed=1")
    assert seed_list(cfg.seeds, cfg.predictor.seed) == [1, 2]


@pytest.mark.parametrize("value, message", [
    ("0", "seeds=0: must be a number of seeds"), ("[1,1]", "repeated"),
    ("abc", "must be a number of seeds"), ("[]", "non-empty list")])
def test_bad_seeds_fail_in_one_line(value, message):
    with pytest.raises(ValueError, match=message):
        seed_list(compose_cfg(f"seeds={value}").seeds)


# ------------------------------------------------------------------------------ significance
def test_welch_p_is_scipys_welch_test_on_log_errors():
    a, b = SeedSample((7.1, 7.5, 6.9, 7.8, 7.0)), SeedSample((8.2, 8.0, 8.9, 8.4, 7.9))
    expected = stats.ttest_ind(np.log(a.values), np.log(b.values), equal_var=False).pvalue
    assert welch_p(a, b) == pytest.approx(expected, rel=1e-12)
    raw = stats.ttest_ind(a.values, b.values, equal_var=False).pvalue
    assert welch_p(a, b, log=False) == pytest.approx(raw, rel=1e-12)


def test_errors_that_span_decades_are_told_apart():
    """The free-weights row of the device-1 weighting table against the paper's config."""
    free = SeedSample((462632.93, 9023.83, 11098.44, 69386.07, 174772.55))
    paper = SeedSample((7.16, 6.99, 7.67, 7.36, 7.01))
    assert welch_p(free, paper, log=False) > 0.05  # raw scale: one seed swamps the variance
    assert welch_p(free, paper) < 1e-3


def test_welch_p_against_a_seed_independent_value_is_the_one_sample_test():
    a, c = SeedSample((7.1, 7.5, 6.9, 7.8, 7.0)), SeedSample((7.9,), deterministic=True)
    expected = stats.ttest_1samp(np.log(a.values), np.log(7.9)).pvalue
    assert welch_p(a, c) == pytest.approx(expected, rel=1e-12)
    assert welch_p(c, SeedSample((7.9,), deterministic=True)) == 1.0
    assert welch_p(c, SeedSample((8.0,), deterministic=True)) == 0.0
    assert math.isnan(welch_p(a, SeedSample((7.0,))))  # one seeded value: noise unknown


def test_best_is_bold_only_when_it_stands_out():
    clear = [SeedSample((5.0, 5.1, 4.9)), SeedSample((9.0, 9.1, 8.9)), SeedSample((20.0,), True)]
    verdict = compare_to_best(clear)
    assert verdict.best == 0 and verdict.bold == (0,) and verdict.tied == ()
    noisy = [SeedSample((5.0, 7.0, 6.0)), SeedSample((5.5, 7.5, 6.5)), SeedSample((20.0,), True)]
    verdict = compare_to_best(noisy)
    assert verdict.best == 0 and verdict.bold == () and verdict.tied == (1,)
    same = [SeedSample((0.61,), True), SeedSample((0.61, 0.61), False), SeedSample((0.69,), True)]
    verdict = compare_to_best(same)
    assert verdict.bold == (0, 1) and verdict.tied == ()  # one value, as without seeds
    assert compare_to_best([None, None]) is None


def test_prediction_interval_of_one_more_seed():
    assert prediction_bound(5) == pytest.approx(stats.t.ppf(0.975, 4) * math.sqrt(1.2))
    sample = SeedSample((7.0, 7.2, 7.4, 7.6, 7.8))
    assert prediction_z(6.74, sample) == pytest.approx((6.74 - 7.4) / sample.sd)
    assert math.isnan(prediction_z(6.74, SeedSample((7.0,), True)))


# ---------------------------------------------------------------------------------- tables
def test_mean_sd_cells_marks_and_bold():
    frame = pd.DataFrame({"ml": [MeanSd(0.69, 0.0), MeanSd(0.61)],
                          "model": [MeanSd(7.24, 0.29), MeanSd(math.nan)]},
                         index=pd.Index(["both", "resource"], name="features"))
    frame = Table.from_frame(frame)
    md = to_markdown(frame, bold_cells={(1, "ml")}, marks={(0, "model"): "†"})
    assert md.splitlines()[2:] == ["| both | 0.69 ± 0.00 | 7.24 ± 0.29† |",
                                   "| resource | **0.61** | – |"]
    tex = to_latex(frame, "t", bold_cells={(1, "ml")}, marks={(0, "model"): "†"},
                   notes=["† within noise, p ≥ 0.05"])
    assert r"7.24 $\pm$ 0.29\textsuperscript{\dag}" in tex and r"\textbf{0.61}" in tex
    assert r"\par{\footnotesize \textsuperscript{\dag} within noise, p $\geq$ 0.05}" in tex


def test_plain_tables_are_unchanged():
    frame = Table.from_frame(pd.DataFrame({"ml": [0.5, 0.25], "n": [3, 4]},
                                          index=pd.Index(["a", "b"], name="x")))
    assert fold_spread(frame) is frame
    assert to_markdown(frame, bold_columns=["ml"]) == (
        "| x | ml | n |\n|---|---|---|\n| a | 0.50 | 3 |\n| b | **0.25** | 4 |")
    assert to_latex(frame, "10% of it", bold_columns=["ml"]) == (
        "\\begin{table}[t]\n\\centering\n\\begin{tabular}{lrr}\n\\toprule\nx & ml & n \\\\\n"
        "\\midrule\na & 0.50 & 3 \\\\\nb & \\textbf{0.25} & 4 \\\\\n\\bottomrule\n"
        "\\end{tabular}\n\\caption{10\\% of it}\n\\end{table}\n")


def test_the_writers_take_only_tables():
    frame = pd.DataFrame({"ml": [0.5]}, index=pd.Index(["a"], name="x"))
    for writer in (to_markdown, fold_spread, lambda t: to_latex(t, "c")):
        with pytest.raises(TypeError, match="Table.from_frame"):
            writer(frame)


# ------------------------------------------------------------------ stage + report, MLflow
@pytest.fixture(scope="module")
def seeded_store(small_trees, mlflow_uri, tmp_path_factory):
    """Seeded cross-validations of a two-row weighting ablation and a per-model table (plus
    one single-seed run the seeded report must not read), in the session's store."""
    from pipelines.stage import run_stage

    tmp = tmp_path_factory.mktemp("seeded")
    trees = write_trees(tmp / "small.jsonl", small_trees)
    base = (f"data.trees={trees}", f"tracking.uri={mlflow_uri}", "tracking.experiment=pytest-seeds",
            "show_progress=false", "save_predictions=false", "predictor.epochs=2")
    reports = {}
    for name, extra in [("end2end", ("experiment=weighting_ablation", "strategy=end2end",
                                     "weighting=close_to_one", "seeds=3")),
                        ("none", ("experiment=weighting_ablation", "strategy=none", "seeds=3")),
                        ("single", ("experiment=weighting_ablation", "strategy=stepwise",
                                    "weighting=close_to_one")),
                        ("per_model", ("experiment=per_model", "seeds=3"))]:
        cfg = compose_cfg(*base, *extra, f"run_dir={tmp / name}")
        reports[name] = run_stage("crossvalidate", cfg)
    return {"uri": mlflow_uri, "trees": trees, "tmp": tmp, "base": base, "reports": reports}


def _runs(uri, filter_string):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["pytest-seeds"], filter_string=filter_string,
                              output_format="list", max_results=1000)


def test_seeded_stage_logs_a_child_per_seed_and_fold(seeded_store):
    uri = seeded_store["uri"]
    parents = _runs(uri, "tags.stage = 'crossvalidate' and params.seeds = '3'")
    by_strategy = {(r.data.params["strategy"], r.data.tags["preset"]): r for r in parents}
    end2end = by_strategy["end2end", "weighting_ablation"]
    children = _runs(uri, f"tags.mlflow.parentRunId = '{end2end.info.run_id}'")
    assert sorted({c.data.params["seed"] for c in children}) == ["13370", "13371", "13372"]
    assert len(children) == 3 * 6
    assert end2end.data.tags["seed_dependent"] == "true"
    assert end2end.data.params["num_seeds"] == "3"
    table = seeded_store["reports"]["end2end"].table
    assert end2end.data.metrics["overall_model"] == pytest.approx(table.loc["overall", "model"])
    assert end2end.data.metrics["overall_model_sd"] == pytest.approx(table.loc["overall", "model_sd"])
    assert "model_sd" in pd.read_csv(seeded_store["reports"]["end2end"].csv_path).columns
    none = by_strategy["none", "weighting_ablation"]
    assert none.data.tags["seed_dependent"] == "false" and none.data.params["num_seeds"] == "1"
    assert len(_runs(uri, f"tags.mlflow.parentRunId = '{none.info.run_id}'")) == 6


def test_seeded_cross_validation_is_deterministic(seeded_store):
    from pipelines.stage import run_stage

    cfg = compose_cfg(*seeded_store["base"], "tracking=off", "strategy=end2end", "seeds=3",
                      f"run_dir={seeded_store['tmp'] / 'again'}")
    again = run_stage("crossvalidate", cfg)
    first = seeded_store["reports"]["end2end"]
    assert again.csv_path.read_bytes() == first.csv_path.read_bytes()
    name = "crossvalidation_seeds.csv"
    assert (again.csv_path.parent / name).read_bytes() == (first.csv_path.parent / name).read_bytes()


def _report(store, tmp_path, name, *extra):
    from pipelines.stage import run_stage

    cfg = compose_cfg(f"tracking.uri={store['uri']}", "tracking.experiment=pytest-seeds",
                      "stage=report", f"experiment={name}", f"run_dir={tmp_path}",
                      "data.name=device_1", *extra)
    return run_stage("report", cfg)


def test_seeded_report_is_byte_identical_and_marks_noise(seeded_store, tmp_path):
    a = _report(seeded_store, tmp_path / "a", "weighting_ablation", "seeds=3")
    _report(seeded_store, tmp_path / "b", "weighting_ablation", "seeds=3")
    for suffix in ("md", "csv", "tex"):
        left = (tmp_path / "a" / f"weighting_ablation_k3.{suffix}").read_bytes()
        assert left == (tmp_path / "b" / f"weighting_ablation_k3.{suffix}").read_bytes()
    assert (tmp_path / "a" / "weighting_ablation_k3.png").stat().st_size > 1000
    assert not (tmp_path / "a" / "weighting_ablation.md").exists()  # k = 1 tables untouched
    md = (tmp_path / "a" / "weighting_ablation_k3.md").read_text()
    assert list(a.table.index) == [("none", "n/a"), ("end2end", "close_to_one")]  # not the single run
    assert "Welch t-test" in md and " ± " in md
    none_row = next(line for line in md.splitlines() if line.startswith("| none"))
    assert "±" not in none_row  # seed-independent: run once, no spread shown
    assert list(a.table["seeds"]) == [1, 3]
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[2:] for line in md.splitlines()
             if line.startswith(("| none", "| end2end"))}  # strategy -> [ml, module, model]
    # the ml column is the same leaf regressors in both rows: one value, bold in both
    assert all(c[0].startswith("**") for c in cells.values()) and a.table["ml_sd"].eq(0).all()
    for i, level in enumerate(["module", "model"], start=1):  # the rule, as the CSV's p says
        best, other = a.table[level].idxmin(), a.table[level].idxmax()
        tied = not a.table.loc[other, f"{level}_p"] < 0.05
        assert cells[other[0]][i].rstrip(" |").endswith("†") is tied
        assert cells[best[0]][i].startswith("**") is (not tied)


def test_single_seed_report_ignores_seeded_runs(seeded_store, tmp_path):
    result = _report(seeded_store, tmp_path, "weighting_ablation")
    assert list(result.table.index) == [("stepwise", "close_to_one")]
    assert list(result.table.columns) == ["ml", "module", "model"]


def test_seeded_per_model_report_says_how_far_the_reference_is(seeded_store, tmp_path):
    result = _report(seeded_store, tmp_path, "per_model", "seeds=3")
    table = result.table
    assert list(table.index)[-1] == "overall" and len(table) == 7
    overall = table.loc["overall"]
    assert overall["reference model"] == 6.74
    assert overall["z model"] == pytest.approx((6.74 - overall["model"]) / overall["model_sd"])
    md = (tmp_path / "per_model_k3.md").read_text()
    assert "prediction interval" in md and "z model" in md


def test_report_without_runs_of_the_request_says_so(seeded_store, tmp_path):
    with pytest.raises(MissingInputError, match="seeds=7"):
        _report(seeded_store, tmp_path, "per_model", "seeds=7")


def test_bad_seed_for_the_predictor_fails_as_a_failed_run(seeded_store, tmp_path):
    from pipelines.stage import run_stage

    cfg = compose_cfg(*seeded_store["base"], "seeds=[1,-2]", f"run_dir={tmp_path}",
                      "tracking.experiment=pytest-seeds-bad")
    with pytest.raises(ValueError, match=r"predictor.seed=-2"):
        run_stage("crossvalidate", cfg)
    mlflow.set_tracking_uri(seeded_store["uri"])
    failed = mlflow.search_runs(experiment_names=["pytest-seeds-bad"], output_format="list")
    assert [r.info.status for r in failed] == ["FAILED"]
