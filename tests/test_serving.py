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
    many = pd.concat([_frame()] * 17, ignore_index=True)
    assert _request_error(predictor, many) == "17 rows: at most 16 shapes per request"


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


# ----------------------------------------------------------------- bounded work, clean errors
def test_a_request_stops_between_rows_once_its_time_is_spent(pyfunc_model, monkeypatch):
    from irene import serving
    from irene.serving import Deadline, RequestTimeoutError

    _, predictor = pyfunc_model
    traced = []
    real = serving.trace_static

    def slow_trace(model, shapes, **kwargs):
        traced.append(shapes)
        time.sleep(0.3)
        return real(model, shapes, **kwargs)

    monkeypatch.setattr(serving, "trace_static", slow_trace)
    rows = pd.DataFrame({"model": ["tiny/bert"] * 10, "batch_size": [1] * 10,
                         "seq_len": list(range(8, 18))})
    with pytest.raises(RequestTimeoutError, match=r"more than 0\.5 s and was stopped"):
        predict_frame(predictor, rows, deadline=Deadline(0.5))
    assert 1 <= len(traced) <= 3  # stopped, not the 10 rows
    traced.clear()
    same = pd.DataFrame({"model": ["tiny/bert"] * 3, "batch_size": [2] * 3, "seq_len": [8] * 3})
    served = predict_frame(predictor, same)
    assert len(traced) == 1 and served["is_total"].sum() == 3  # identical rows traced once


def test_compute_slots_refuse_beyond_their_size_at_once():
    from irene.serving import ComputeSlots, ServerBusyError

    slots = ComputeSlots(2)
    with slots, slots:
        start = time.monotonic()
        with pytest.raises(ServerBusyError, match="computing 2 requests already"), slots:
            pass
        assert time.monotonic() - start < 0.1 and slots.busy == 2
    assert slots.busy == 0 and slots.peak == 2
    with slots:  # free again
        pass


def test_mlflow_error_bodies_become_one_line():
    from irene.serving import ServingLimits, clean_error_body

    limits = ServingLimits()
    csv_error = json.dumps({"error_code": "BAD_REQUEST", "message": "Failed to parse input as a "
                            "Pandas DataFrame. ... Error: 'x'", "stack_trace": "Traceback (most "
                            "recent call last):\n  File \"/srv/mlflow/x.py\""}).encode()
    body = json.loads(clean_error_body(400, csv_error, limits))
    assert body == {"error_code": "BAD_REQUEST", "message": "error: the body is not a CSV table: "
                    "give a header line model,batch_size,seq_len and one line per shape"}
    echoed = json.dumps({"error_code": "BAD_REQUEST", "message": "Failed to predict data "
                         "'   model\n0 /srv/secret'. \nError: ..."}).encode()
    assert "secret" not in clean_error_body(400, echoed, limits).decode()
    ours = json.dumps({"error_code": "INVALID_PARAMETER_VALUE",
                       "message": "error: row 0: field 'seq_len': bad"}).encode()
    assert json.loads(clean_error_body(400, ours, limits))["message"] == (
        "error: row 0: field 'seq_len': bad")
    timeout = json.loads(clean_error_body(504, b"Request processing time exceeded limit", limits))
    assert timeout["error_code"] == "DEADLINE_EXCEEDED" and "\n" not in timeout["message"]


SERVER_TIMEOUT_S = 4


@pytest.fixture(scope="module")
def irene_server(pyfunc_model, mlflow_uri, tmp_path_factory):
    """``python -m irene.serving`` on 127.0.0.1 with a short MLflow timeout."""
    import psutil

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri,
           "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(SERVER_TIMEOUT_S)}
    log_path = tmp_path_factory.mktemp("irene_server") / "serve.log"
    log = log_path.open("w")
    server = subprocess.Popen([sys.executable, "-m", "irene.serving", "-m",
                               pyfunc_model[0].model_uri, "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5):
                break
        except OSError:
            time.sleep(0.5)
    assert server.poll() is None, log_path.read_text()[-3000:]
    _post(url, _rows_body([("tiny/bert", 1, 8)]))  # the first trace imports the tracer
    yield url, psutil.Process(server.pid)
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, {"not json": text.decode(errors="replace")}


def _rows_body(rows) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["model", "batch_size", "seq_len"],
                                           "data": [list(r) for r in rows]}}).encode()


def test_bad_bodies_get_one_line_400_without_stack_trace(irene_server):
    url, _ = irene_server
    cases = [
        (b'model,batch_size\n"tiny/bert,1\n2,3,4,5\n', "text/csv", "not a CSV table"),
        (b'{"dataframe_split": {"columns": ["model"', "application/json", "not valid JSON"),
        (_rows_body([]).replace(b"batch_size", b"size"), "application/json", "lacks columns"),
        (_rows_body([("tiny/bert", 150_000_000, 8)]), "application/json",
         "field 'batch_size': must be an integer in [1, 1024]"),
    ]
    for body, content_type, expected in cases:
        status, answer = _post(url, body, content_type)
        assert status == 400, answer
        assert set(answer) == {"error_code", "message"} and expected in answer["message"]
        assert "\n" not in answer["message"] and "Traceback" not in answer["message"]
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(10**9))  # refused before the body is read
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and b"larger than" in response.read()
    connection.close()


def test_concurrent_requests_are_bounded_and_ping_answers(irene_server):
    from concurrent.futures import ThreadPoolExecutor

    url, _ = irene_server
    body = _rows_body([("bert-base-uncased", 1, 64 + i) for i in range(3)])
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_post, url, body) for _ in range(8)]
        start = time.monotonic()
        with urllib.request.urlopen(f"{url}/ping", timeout=30) as response:
            assert response.status == 200
        ping_s = time.monotonic() - start
        answers = [f.result() for f in futures]
    statuses = sorted(status for status, _ in answers)
    # at most 2 compute (200, or 504 on a slow machine); the others are refused at once
    assert set(statuses) <= {200, 503, 504} and 1 <= len(statuses) - statuses.count(503) <= 4, \
        statuses
    busy = [a for s, a in answers if s == 503]
    assert busy[0] == {"error_code": "TEMPORARILY_UNAVAILABLE", "message": (
        "error: the server is computing 2 requests already: retry later")}
    assert ping_s < 10


def test_a_timed_out_request_stops_computing(irene_server):
    url, process = irene_server
    rows = [("bert-large-uncased", 1, 512 - i) for i in range(16)]  # far more than 4 s of work
    for _ in range(30):  # a request of an earlier test may still finish its row
        start = time.monotonic()
        status, answer = _post(url, _rows_body(rows))
        if status != 503:
            break
        time.sleep(0.5)
    assert status == 504 and answer["error_code"] == "DEADLINE_EXCEEDED", answer
    assert time.monotonic() - start < SERVER_TIMEOUT_S + 5
    time.sleep(4)  # the row being traced at the deadline ends, then nothing more
    before = sum(process.cpu_times()[:2])
    time.sleep(2)
    assert sum(process.cpu_times()[:2]) - before < 0.3  # seconds of CPU in 2 s: idle


def test_nodes_outside_the_training_range_are_named(pyfunc_model):
    _, predictor = pyfunc_model
    # a tiny model: hidden size 32 against the published models' 768, far below every range
    served = predict_frame(predictor, _frame())
    outside = served[served["out_of_range"] != ""]
    assert len(outside) > 0
    assert set(",".join(outside["out_of_range"]).split(",")) <= set(predictor.features_)
    inside = predict_frame(predictor, _frame("bert-base-uncased", 8, 32))
    assert (inside["out_of_range"] == "").all()  # a configuration it was fitted on
