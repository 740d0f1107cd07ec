"""The predictor as an MLflow pyfunc model: round trip equals in-process, served over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
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
        # a request beyond the limits: one message, HTTP 400, nothing of the server inside
        huge = query.assign(batch_size=150_000_000)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"dataframe_split": huge.to_dict(orient="split")}).encode(),
            headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
        body = json.loads(refused.value.read())
        assert body["message"] == ("error: row 0: field 'batch_size': must be an integer in "
                                   "[1, 1024], got 150000000")
        assert "stack_trace" not in body and "Traceback" not in json.dumps(body)
        assert server.poll() is None  # still serving
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


# ------------------------------------------------------------------------- bad requests
def _request_error(predictor, frame, limits=None) -> str:
    from irene.serving import RequestError

    with pytest.raises(RequestError) as error:
        predict_frame(predictor, frame, limits=limits)
    assert "\n" not in str(error.value)
    return str(error.value)


def _frame(model="tiny/bert", batch_size=2, seq_len=8):
    return pd.DataFrame({"model": [model], "batch_size": [batch_size], "seq_len": [seq_len]})


def test_requests_beyond_the_limits_are_refused_before_tracing(pyfunc_model, monkeypatch):
    from irene import serving
    from irene.serving import ServingLimits

    _, predictor = pyfunc_model
    monkeypatch.setattr(serving, "trace_static", lambda *a, **k: pytest.fail("traced"))
    assert _request_error(predictor, _frame(batch_size=150_000_000)) == (
        "row 0: field 'batch_size': must be an integer in [1, 1024], got 150000000")
    assert _request_error(predictor, _frame(batch_size=50_000_000.0)) == (
        "row 0: field 'batch_size': must be an integer in [1, 1024], got 50000000.0")
    assert _request_error(predictor, _frame(batch_size=-3)).endswith("got -3")
    assert _request_error(predictor, _frame(batch_size=2.5)).endswith("got 2.5")
    assert _request_error(predictor, _frame(seq_len=65)) == (
        "row 0: field 'seq_len': must be an integer in [1, 64], got 65")  # tiny/bert's positions
    assert _request_error(predictor, _frame("bert-base-uncased", 1024, 512),
                          ServingLimits(max_tokens=4096)) == (
        "row 0: batch_size × seq_len = 524288: at most 4096 tokens per row")
    many = pd.concat([_frame()] * 65, ignore_index=True)
    assert _request_error(predictor, many) == "65 rows: at most 64 shapes per request"


def test_only_registry_models_and_allow_listed_configs_are_served(pyfunc_model, tmp_path):
    from irene.data.architectures import MODEL_REGISTRY
    from irene.serving import ServingLimits

    _, predictor = pyfunc_model
    known = ", ".join(sorted(MODEL_REGISTRY))
    secret = tmp_path / "elsewhere" / "config.json"
    secret.parent.mkdir()
    allowed = tmp_path / "served"
    (allowed / "mine").mkdir(parents=True)
    from irene.data.architectures import config_from_name

    config_from_name("tiny/bert").to_json_file(allowed / "mine" / "config.json")
    config_from_name("tiny/bert").to_json_file(secret)
    for name in (str(secret), "/etc/passwd", str(allowed / "mine" / ".." / ".." / "elsewhere")):
        assert _request_error(predictor, _frame(name)) == (
            f"row 0: field 'model': {name!r} is not a served model; use one of {known}")
    limits = ServingLimits(model_dirs=(str(allowed),))
    escaped = str(allowed / "mine" / ".." / ".." / "elsewhere")
    assert _request_error(predictor, _frame(escaped), limits).startswith(
        f"row 0: field 'model': {escaped!r} is not a served model")
    served = predict_frame(predictor, _frame(str(allowed / "mine")), limits=limits)
    assert served["is_total"].sum() == 1 and np.isfinite(served["predicted_energy_j"]).all()


def test_bad_node_rows_are_refused(pyfunc_model):
    _, predictor = pyfunc_model
    rows = node_rows(trace_static("tiny/bert", [(2, 8)], convention="irene"))
    bad = rows.copy()
    bad.loc[3, "flops"] = -1.0
    assert _request_error(predictor, bad) == (
        f"node {bad.loc[3, 'id']!r}: field 'flops': must be a number in [0, 1e+15] MFLOP, got -1.0")
    bad = rows.copy()
    bad.loc[2, "parent_id"] = "nobody"
    assert _request_error(predictor, bad) == (
        f"node {bad.loc[2, 'id']!r}: parent 'nobody' not given before it")
    bad = rows.copy()
    bad["batch_size"] = 10**9
    assert _request_error(predictor, bad).endswith(
        "field 'batch_size': must be an integer in [1, 1024], got 1000000000")


def test_served_errors_are_one_line_without_internals(pyfunc_model):
    import mlflow
    from mlflow.exceptions import MlflowException

    loaded = mlflow.pyfunc.load_model(pyfunc_model[0].model_uri)
    with pytest.raises(MlflowException) as error:
        loaded.predict(_frame(batch_size=150_000_000))
    body = json.loads(error.value.serialize_as_json())
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and body["message"] == (
        "error: row 0: field 'batch_size': must be an integer in [1, 1024], got 150000000")
    assert set(body) <= {"error_code", "message", "error_class", "sqlstate"}  # no stack trace
    error.value.message = "Failed to predict data '<the whole request>'. \nError: ..."
    assert error.value.message.startswith("error: row 0")  # the server's rewrite is refused

    from irene.serving import served_error

    internal = json.loads(served_error(ZeroDivisionError("/srv/secret.py line 3")).serialize_as_json())
    assert internal["error_code"] == "INTERNAL_ERROR" and internal["message"] == (
        "error: the server could not predict this request (see its log)")
    assert "secret" not in json.dumps(internal)


def test_negative_energies_are_marked(pyfunc_model):
    from irene.predictors.static import STATIC_FEATURES

    class Extrapolating:
        features_ = list(STATIC_FEATURES)

        def predict(self, forest, *, return_fallback=False):
            import numpy as np

            pred = np.where(forest.is_leaf, -0.5, 1.0)
            return (pred, np.zeros(forest.num_nodes, dtype=bool)) if return_fallback else pred

    served = predict_frame(Extrapolating(), _frame())
    np.testing.assert_array_equal(served["negative_energy"], served["predicted_energy_j"] < 0)
    assert served["negative_energy"].any() and not served["negative_energy"].all()
