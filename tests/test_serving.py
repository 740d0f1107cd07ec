"""The predictor as an MLflow pyfunc model: round trip equals in-process, served over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from irene import predictors
from irene.data.forest import build_forest
from irene.predictors.static import trace_static
from irene.serving import node_rows, predict_frame, total_energy


@pytest.fixture(scope="module")
def pyfunc_model(small_trees, mlflow_uri, tmp_path_factory):
    import mlflow

    from irene.serving import log_pyfunc

    model_dir = tmp_path_factory.mktemp("pyfunc") / "model"
    predictor = predictors.IrenePlusPredictor(feature_sets=["model_specs"], leaf_degrees=[1]).fit(
        build_forest(small_trees))
    predictor.save(model_dir)
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "pytest_serving", artifact_location=(model_dir.parent / "artifacts").as_uri()))
    with mlflow.start_run():
        info = log_pyfunc(model_dir)
    return info, predictors.load(model_dir)


QUERY = pd.DataFrame({"model": ["tiny/bert", "tiny/bert", "tiny/llama"],
                      "batch_size": [2, 4, 2], "seq_len": [8, 8, 16]})


def test_pyfunc_round_trip_equals_in_process(pyfunc_model):
    import mlflow

    info, predictor = pyfunc_model
    assert info.signature is not None and info.signature.outputs is not None
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    served = loaded.predict(QUERY)
    local = predict_frame(predictor, QUERY)
    pd.testing.assert_frame_equal(served.reset_index(drop=True), local)
    totals = total_energy(served)
    assert len(totals) == 3 and (totals["predicted_energy_j"] > 0).all()
    llama = served[served["model"] == "tiny/llama"]
    assert llama["fallback"].any() and not llama.loc[llama["instance_type"] == "Linear",
                                                      "fallback"].any()
    # per-node input gives the same answer as tracing
    by_nodes = loaded.predict(node_rows(trace_static("tiny/bert", [(2, 8)], convention="irene")))
    first = served[(served["model"] == "tiny/bert") & (served["batch_size"] == 2)]
    assert by_nodes["predicted_energy_j"].tolist() == pytest.approx(
        first["predicted_energy_j"].tolist())


def test_pyfunc_unseen_op_param_refuses_unseen_types(pyfunc_model):
    import mlflow

    loaded = mlflow.pyfunc.load_model(pyfunc_model[0].model_uri)
    with pytest.raises(Exception, match="never seen in training"):
        loaded.predict(QUERY, params={"unseen_op": "error"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_models_serve_answers_on_localhost(pyfunc_model, mlflow_uri, tmp_path):
    info, predictor = pyfunc_model
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    # the server is started with `bash -c "exec uvicorn ..."`: the venv must be on PATH
    path = f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "PATH": path}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", info.model_uri,
                               "--env-manager", "local", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        query = QUERY.iloc[:1]
        body = json.dumps({"dataframe_split": query.to_dict(orient="split")}).encode()
        answer = None
        deadline = time.time() + 90
        while time.time() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                                 data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                time.sleep(0.5)
        assert answer is not None, (tmp_path / "serve.log").read_text()[-3000:]
        served = pd.DataFrame(answer["predictions"])
        local = predict_frame(predictor, query)
        assert served["predicted_energy_j"].tolist() == pytest.approx(
            local["predicted_energy_j"].tolist())
        assert served["is_total"].sum() == 1
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
