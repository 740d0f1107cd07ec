"""Static prediction: trace a model nobody measured, predict every node, mark fallbacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from irene import predictors
from irene.data.forest import build_forest
from irene.data.tree import iter_nodes, read_trees, validate_tree
from irene.predictors.static import (
    FALLBACK_FIELD,
    STATIC_FEATURES,
    parse_shapes,
    predict_trees,
    require_static,
    trace_static,
)
from pipelines.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
register_configs()


@pytest.fixture(scope="session")
def static_predictor(small_trees):
    """IrEne+ on static features with power-law leaves (sane extrapolation)."""
    return predictors.IrenePlusPredictor(feature_sets=["model_specs"], leaf_degrees=[1]).fit(
        build_forest(small_trees))


@pytest.fixture(scope="session")
def static_model_dir(static_predictor, tmp_path_factory):
    return static_predictor.save(tmp_path_factory.mktemp("static") / "model")


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_traced_bert_large_is_predicted_per_node_with_marked_fallbacks(static_predictor):
    trees = trace_static("bert-large-uncased", [(8, 128)])
    filled, forest, fallback = predict_trees(static_predictor, trees, static_only=True)
    nodes = list(iter_nodes(filled[0]["frontend_tree"]))
    assert all(np.isfinite(n["predicted_energy"]) for n in nodes)
    marked = [n for n in nodes if n.get(FALLBACK_FIELD)]
    # GELUActivation is absent from the published data: the only fallback, all 24 marked
    assert {n["instance_type"] for n in marked} == {"GELUActivation"}
    assert len(marked) == 24 == int(fallback.sum())
    validate_tree(filled[0], "bert-large")
    root = filled[0]["frontend_tree"]["predicted_energy"]
    base = predict_trees(static_predictor, trace_static("bert-base-uncased", [(8, 128)]))[0]
    assert root > 2 * base[0]["frontend_tree"]["predicted_energy"]  # 3x the parameters


def test_error_policy_names_the_unseen_types_and_a_named_fallback_is_used(static_predictor):
    trees = trace_static("tiny/llama", [(2, 8)])
    with pytest.raises(ValueError, match="never seen in training") as error:
        predict_trees(static_predictor, trees, "error")
    assert "silu" in str(error.value) and "unseen_op" in str(error.value)
    with pytest.raises(ValueError, match="not a primitive type the predictor knows"):
        predict_trees(static_predictor, trees, "NoSuchOp")
    filled, forest, fallback = predict_trees(static_predictor, trees, "LayerNorm")
    types = set(forest.instance_type[fallback])
    assert {"LlamaRMSNorm", "SiLUActivation"} <= types
    assert "Linear" not in types


def test_a_predictor_on_measured_features_is_refused_naming_them(small_trees):
    model = predictors.IrenePlusPredictor().fit(
        build_forest(small_trees))
    with pytest.raises(ValueError, match="times_mean") as error:
        require_static(model)
    assert "features=model_specs" in str(error.value)
    assert set(STATIC_FEATURES) == {"num_parameters", "input_size", "batch_size", "seq_len",
                                    "flops", "mem_bytes"}


def test_shapes_parse_and_reject_bad_pairs():
    assert parse_shapes(None, 8, 128) == [(8, 128)]
    assert parse_shapes([[8, 128], [16, 256]], 1, 1) == [(8, 128), (16, 256)]
    with pytest.raises(ValueError, match="batch_size, seq_len"):
        parse_shapes([[8, 128, 3]], 1, 1)


def test_stage_predict_traces_every_shape_and_logs_views(static_model_dir, mlflow_uri,
                                                         tmp_path, capsys):
    import mlflow

    from pipelines.stage import run_stage

    # the physical convention keeps transformers 5's GELUActivation leaves: unseen primitives
    cfg = compose_cfg("stage=predict", "model=bert-base-uncased", "shapes=[[8,128],[16,64]]",
                      f"model_dir={static_model_dir}", f"tracking.uri={mlflow_uri}",
                      "tracking.experiment=pytest_predict", f"run_dir={tmp_path}",
                      "trace_convention=physical")
    out = run_stage("predict", cfg)
    trees = read_trees(out)
    assert [(t["batch_size"], t["seq_len"]) for t in trees] == [(8, 128), (16, 64)]
    printed = capsys.readouterr().out
    assert "bert-base-uncased 8x128: predicted" in printed and "fallback leaves" in printed
    for stem in ("bert-base-uncased_8x128", "bert-base-uncased_16x64"):
        for ext in ("txt", "html", "png"):
            assert (tmp_path / "views" / f"{stem}.{ext}").stat().st_size > 0
    run = mlflow.search_runs(experiment_names=["pytest_predict"], output_format="list")[0]
    client = mlflow.MlflowClient(mlflow_uri)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "views")}
    assert "views/bert-base-uncased_8x128.html" in logged
    assert run.data.metrics["fallback_nodes"] == 24
    assert "GELUActivation" in run.data.params["fallback_types"]


def test_stage_predict_irene_convention_has_the_published_leaves(static_model_dir, tmp_path):
    from irene.data.tree import iter_nodes
    from pipelines.stage import run_stage

    cfg = compose_cfg("stage=predict", "model=bert-base-uncased", f"model_dir={static_model_dir}",
                      "tracking=off", f"run_dir={tmp_path}", "explain.views=false")
    tree = read_trees(run_stage("predict", cfg))[0]
    kinds = {n["instance_type"] for n in iter_nodes(tree["frontend_tree"]) if n["type"] == "ml"}
    assert kinds == {"Embedding", "LayerNorm", "Linear", "MatMul", "Softmax", "Tanh"}
    assert not any(n.get("prediction_fallback") for n in iter_nodes(tree["frontend_tree"]))


def test_stage_predict_reads_the_predictor_from_a_train_run_and_packages_it(
        static_model_dir, mlflow_uri, tmp_path, capsys):
    import mlflow
    import mlflow.pyfunc
    import pandas as pd

    from pipelines.stage import run_stage

    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "pytest_predict_run", artifact_location=(tmp_path / "artifacts").as_uri()))
    with mlflow.start_run() as run:  # what stage=train logs: the folder as artifact "model"
        mlflow.log_artifacts(str(static_model_dir), "model")
    cfg = compose_cfg("stage=predict", "model=tiny/bert", f"model_run={run.info.run_id}",
                      f"tracking.uri={mlflow_uri}", "tracking.experiment=pytest_predict_run",
                      f"run_dir={tmp_path}", "explain.views=false", "batch_size=2", "seq_len=8",
                      "package=true")
    out = run_stage("predict", cfg)
    assert read_trees(out)[0]["frontend_tree"]["predicted_energy"] > 0
    assert not (tmp_path / "views").exists()
    uri = capsys.readouterr().out.split("pyfunc model: ")[1].split()[0]
    assert uri.startswith("models:/")
    assert mlflow.pyfunc.load_model(uri).predict(
        pd.DataFrame({"model": ["tiny/bert"], "batch_size": [2], "seq_len": [8]}))["is_total"].sum() == 1


def test_stage_predict_without_a_predictor_trains_the_static_one_once(small_trees, tmp_path,
                                                                       caplog):
    import logging

    from irene.data.tree import write_trees
    from pipelines.stage import run_stage

    trees = write_trees(tmp_path / "small.jsonl", small_trees)
    base = ("stage=predict", "model=tiny/bert", "tracking.enabled=false", f"data.trees={trees}",
            "explain.views=false", "batch_size=2", "seq_len=8")
    with caplog.at_level(logging.INFO, logger="irene"):
        first = run_stage("predict", compose_cfg(*base, f"run_dir={tmp_path / 'a'}"))
        second = run_stage("predict", compose_cfg(*base, f"run_dir={tmp_path / 'b'}"))
    said = [r.getMessage() for r in caplog.records if "no model_dir/model_run given" in r.getMessage()]
    assert len(said) == 2 and "training the static IrEne+" in said[0] and "earlier" in said[1], said
    energy = [read_trees(p)[0]["frontend_tree"]["predicted_energy"] for p in (first, second)]
    assert energy[0] == energy[1] > 0
    with pytest.raises(ValueError, match="model_dir=.*model_run="):
        run_stage("predict", compose_cfg("stage=predict", "tracking.enabled=false", f"data.trees={trees}",
                                f"run_dir={tmp_path / 'c'}", "model_dir=null"))


def test_stage_whatif_writes_a_comparison_table_and_plot(static_model_dir, tmp_path):
    import pandas as pd

    from pipelines.stage import run_stage

    cfg = compose_cfg("stage=whatif", "models=[bert-base-uncased,distilbert-base-uncased]",
                      "batch_sizes=[8,16]", "seq_lens=[64,128]", f"model_dir={static_model_dir}",
                      "tracking.enabled=false", f"run_dir={tmp_path}")
    table = pd.read_csv(run_stage("whatif", cfg))
    assert len(table) == 2 * 2 * 2
    energy = table.set_index(["model", "batch_size", "seq_len"])["predicted_energy_j"]
    # distilbert has half of bert-base's layers: less energy at every shape
    for b in (8, 16):
        for s in (64, 128):
            assert energy["distilbert-base-uncased", b, s] < energy["bert-base-uncased", b, s]
        assert energy["bert-base-uncased", b, 128] > energy["bert-base-uncased", b, 64]
    assert (tmp_path / "whatif.png").stat().st_size > 10_000
    assert "bert-base-uncased" in (tmp_path / "whatif_energy.md").read_text()
