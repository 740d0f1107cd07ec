"""Stages composed from the real Hydra config, logging to a real MLflow (sqlite) store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from irene.data.tree import iter_nodes, read_trees, write_trees
from pipelines.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture()
def trees_file(small_trees, tmp_path):
    return write_trees(tmp_path / "small.jsonl", small_trees)


def stage_cfg(stage, trees_file, mlflow_uri, tmp_path, *extra):
    return compose_cfg(f"stage={stage}", f"data.trees={trees_file}",
                       f"tracking.uri={mlflow_uri}", f"run_dir={tmp_path / stage}",
                       "tracking.experiment=pytest", "show_progress=false", *extra)


def runs(mlflow_uri, filter_string=""):
    mlflow.set_tracking_uri(mlflow_uri)
    return mlflow.search_runs(experiment_names=["pytest"], filter_string=filter_string,
                              output_format="list")


@pytest.mark.parametrize("group", ["data", "features", "strategy", "weighting", "predictor",
                                   "tracking", "measure"])
def test_every_option_of_every_group_composes(group):
    options = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    assert options
    for option in options:
        cfg = compose_cfg(f"{group}={option}")
        assert cfg[group] is not None


def test_bad_option_fails_at_start_with_the_valid_ones():
    with pytest.raises(MissingConfigException) as error:
        compose_cfg("strategy=end3end")
    assert "end2end" in str(error.value.options) or "end2end" in str(error.value)
    with pytest.raises(Exception, match="pth"):
        compose_cfg("data.pth=x")


def test_crossvalidate_stage_logs_parent_and_fold_runs(trees_file, mlflow_uri, tmp_path, capsys):
    from pipelines.stage import run_stage

    report = run_stage("crossvalidate", stage_cfg("crossvalidate", trees_file, mlflow_uri, tmp_path))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"crossvalidation table: {report.csv_path}"
    header = report.csv_path.read_text().splitlines()[0]
    assert header == "left_out_model,ml,module,model"
    parent = [r for r in runs(mlflow_uri, "tags.stage = 'crossvalidate'")][0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["strategy"] == "end2end"
    assert parent.data.params["weighting"] == "close_to_one"
    assert parent.data.metrics["overall_model"] == pytest.approx(report.table.loc["overall", "model"])
    children = runs(mlflow_uri, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "report")}
    assert "report/crossvalidation.csv" in artifacts


def test_train_predict_evaluate_chain(trees_file, mlflow_uri, tmp_path):
    from pipelines.stage import run_stage

    model_dir = run_stage("train", stage_cfg("train", trees_file, mlflow_uri, tmp_path))
    predictions = run_stage("predict", stage_cfg("predict", trees_file, mlflow_uri, tmp_path,
                                        f"model_dir={model_dir}"))
    predicted = read_trees(predictions)
    assert all("predicted_energy" in n for t in predicted for n in iter_nodes(t["frontend_tree"]))
    assert all("predicted_energy" not in n for t in read_trees(trees_file)
               for n in iter_nodes(t["frontend_tree"]))
    summary = run_stage("evaluate", stage_cfg("evaluate", trees_file, mlflow_uri, tmp_path,
                                     f"predictions={predictions}"))
    assert set(summary) == {"ml", "module", "model"}
    assert summary["ml"] < 5  # in-sample leaf regressors are close


def test_failing_stage_marks_its_run_failed_and_keeps_the_input(trees_file, mlflow_uri, tmp_path):
    from pipelines.stage import run_stage

    model_dir = run_stage("train", stage_cfg("train", trees_file, mlflow_uri, tmp_path))
    before = trees_file.read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite input"):
        run_stage("predict", stage_cfg("predict", trees_file, mlflow_uri, tmp_path,
                              f"model_dir={model_dir}", f"output={trees_file}"))
    assert trees_file.read_bytes() == before
    failed = runs(mlflow_uri, "tags.stage = 'predict' and attributes.status = 'FAILED'")
    assert failed
    assert runs(mlflow_uri)  # the store is still usable


@pytest.mark.slow
def test_cli_crossvalidate_prints_the_table_path_last(trees_file, mlflow_uri, tmp_path):
    out = subprocess.run(
        [sys.executable, "run.py", "stage=crossvalidate", f"data.trees={trees_file}",
         f"tracking.uri={mlflow_uri}", "tracking.experiment=pytest-cli", "show_progress=false",
         f"hydra.run.dir={tmp_path / 'cli'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    last = out.stdout.strip().splitlines()[-1]
    assert last == f"crossvalidation table: {tmp_path / 'cli' / 'crossvalidation.csv'}"
    assert Path(last.split(": ", 1)[1]).is_file()


@pytest.mark.slow
def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "cut.jsonl"
    bad.write_text('{"model_name": "x", "batch_size": 1, "seq_len"\n')
    out = subprocess.run(
        [sys.executable, "run.py", "stage=evaluate", f"trees={bad}", f"predictions={bad}",
         "tracking=off", f"hydra.run.dir={tmp_path / 'cli'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {bad}:1: invalid JSON (Expecting ':' delimiter")
    assert errors[0].endswith("is the file truncated?")
    assert "Traceback" not in out.stderr


def test_resume_of_a_not_applicable_job_skips_it_again(trees_file, mlflow_uri, tmp_path):
    """A preset job that did not apply (physics on static features) FINISHED without a table;
    re-running the preset resumes it as skipped instead of failing on the missing table."""
    from pipelines.stage import run_stage

    cfg = stage_cfg("crossvalidate", trees_file, mlflow_uri, tmp_path, "predictor=physics",
                    "features=model_specs", "skip_not_applicable=true", "resume=true")
    first = run_stage("crossvalidate", cfg)
    assert first.table is None and first.csv_path is None
    again = run_stage("crossvalidate", cfg)
    assert again.table is None and again.csv_path is None
    skipped = runs(mlflow_uri, "tags.stage = 'crossvalidate' and tags.not_applicable != ''")
    assert len(skipped) == 1  # the second run resumed: no new run


@pytest.mark.parametrize(("overrides", "message"), [
    (["strategy=nonsense"], "strategy=nonsense: no such option; choose from ['end2end', 'none', "
                            "'stepwise', 'unstructured']"),
    (["-m", "predictor=irene,flatt"], "predictor=flatt: no such option; choose from"),
    (["+features=bothh"], "features=bothh: no such option"),
    (["strategy=end2end", "predictor=irene_plus", "predictor.epochs=3", "hydra/launcher=joblib",
      "weighting=choice(free)", "data=null"], None),
])
def test_a_group_option_that_does_not_exist_is_one_line(overrides, message):
    from pipelines.config import bad_group_option

    found = bad_group_option(overrides, ROOT / "conf")
    assert found == message if message is None else found.startswith(message)


@pytest.mark.slow
def test_cli_unknown_group_option_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "run.py", "stage=crossvalidate", "strategy=nonsense"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: strategy=nonsense: no such option; choose from ['end2end', 'none', 'stepwise', "
        "'unstructured']"]


@pytest.mark.slow
def test_a_hydra_mode_override_still_makes_a_sweep(tmp_path):
    """hydra.mode=MULTIRUN on the command line sweeps, as -m does: two jobs."""
    out = subprocess.run([sys.executable, "run.py", "hydra.mode=MULTIRUN", "stage=report",
                          "tracking=off", "data=device_1,device_2",
                          f"hydra.sweep.dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "#0 : " in out.stdout + out.stderr and "#1 : " in out.stdout + out.stderr, out.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "message"), [
    ("tracking.background=maybe", "error: Error merging override tracking.background=maybe: "
                                  "Value 'maybe' is not a valid bool (type str)"),
    ("predictor.lr=abc", "error: Error merging override predictor.lr=abc: Value 'abc' of type "
                         "'str' could not be converted to Float"),
    ("data.pth=x", "error: Could not override 'data.pth'. To append to your config use "
                   "+data.pth=x: Key 'pth' not in 'DataConfig'"),
    ("seeds=[1,2", "error: seeds=[1,2: no viable alternative at input '[1,2'"),
])
def test_cli_setting_hydra_cannot_apply_is_one_line_and_exit_2(setting, message):
    out = subprocess.run([sys.executable, "run.py", "stage=crossvalidate", setting], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr


def test_cv_together_trains_the_folds_together_to_the_same_table_and_is_refused_with_seeds(
        trees_file, mlflow_uri, tmp_path, monkeypatch):
    from irene.errors import SettingsError
    from irene.predictors.irene import IreneModel
    from pipelines.stage import run_stage

    calls = []
    fit_folds = IreneModel.fit_folds
    monkeypatch.setattr(IreneModel, "fit_folds",
                        lambda self, *a, **k: calls.append(1) or fit_folds(self, *a, **k))

    apart = run_stage("crossvalidate", stage_cfg("crossvalidate", trees_file, mlflow_uri,
                                                 tmp_path / "apart", "predictor.epochs=2"))
    together = run_stage("crossvalidate", stage_cfg("crossvalidate", trees_file, mlflow_uri,
                                                    tmp_path / "together", "predictor.epochs=2",
                                                    "cv_together=true"))
    # equal to rounding (one shared expansion and one product per tree for every fold)
    assert together.table.round(2).equals(apart.table.round(2))
    assert len(calls) == 1  # the folds were trained together, once
    with pytest.raises(SettingsError, match="cv_together=true trains one cross-validation's "
                                            "folds together; with seeds, leave it unset"):
        run_stage("crossvalidate", stage_cfg("crossvalidate", trees_file, mlflow_uri,
                                             tmp_path / "seeds", "cv_together=true", "seeds=2"))


def test_many_models_fold_by_fold_suggest_cv_together(trees_file, mlflow_uri, tmp_path,
                                                      monkeypatch, caplog):
    import pipelines.stages.crossvalidate as crossvalidate
    from pipelines.stage import run_stage

    monkeypatch.setattr(crossvalidate, "TOGETHER_HINT_MODELS", 6)  # device 1 has 6 models
    hint = "cv_together=true trains the folds together"
    for name, overrides in [("apart", []), ("stepwise", ["strategy=stepwise"]),
                            ("together", ["cv_together=true"])]:
        caplog.clear()
        with caplog.at_level("INFO"):
            run_stage("crossvalidate", stage_cfg("crossvalidate", trees_file, mlflow_uri,
                                                 tmp_path / name, "predictor.epochs=1",
                                                 *overrides))
        # only where the folds could train together and do not yet (stepwise cannot)
        assert (hint in caplog.text) == (name == "apart"), name
