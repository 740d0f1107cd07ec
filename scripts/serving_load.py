"""Load test of the served predictor (``python -m irene.serving``) on 127.0.0.1.

Packages a small predictor (trained on ``$IRENE_DATA_DIR``'s trees) into a temporary MLflow
store unless ``--model-uri`` is given, serves it, and reports as JSON:

* ``bad_bodies``: status and body of bad requests (bad CSV, bad JSON, wrong columns, a huge
  shape, a wrong content type): each must be one line without ``stack_trace``;
* ``timeout``: a request whose rows take longer than the server's timeout: its answer, and
  the server's CPU use (percent of one core, sampled every 0.5 s) before, during and after;
* ``load``: ``--concurrency`` requests at once, each ``max_rows`` distinct rows at the largest
  allowed shape (``batch_size × seq_len = max_tokens``) of ``--model``: their statuses, the peak
  RSS of the server's process tree (psutil, every 50 ms) and the ``/ping`` latencies meanwhile;
* ``load_node_rows``: the same with the largest node-row request (``max_nodes`` rows within
  ``max_body_bytes``; MLflow parses a body into a DataFrame before the model is called).

Usage: ``IRENE_DATA_DIR=... .venv/bin/python scripts/serving_load.py [--out report.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def package(store: Path) -> str:
    """A small predictor logged as a pyfunc model in a new sqlite store: its model URI."""
    import mlflow

    from irene import predictors
    from irene.data.forest import build_forest
    from irene.data.published import import_device
    from irene.serving import log_pyfunc

    trees = [t for t in import_device(os.environ["IRENE_DATA_DIR"])
             if (t["batch_size"], t["seq_len"]) in {(8, 32), (16, 128)}]
    model_dir = store / "predictor"
    predictors.IrenePlusPredictor(feature_sets=["model_specs"], leaf_degrees=[1]).fit(
        build_forest(trees)).save(model_dir)
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "serving_load", artifact_location=(store / "artifacts").as_uri()))
    with mlflow.start_run():
        return log_pyfunc(model_dir).model_uri


def post(url: str, body: bytes, content_type: str = "application/json",
         timeout: float = 300) -> tuple[int, str, float]:
    start = time.monotonic()
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(), time.monotonic() - start
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), time.monotonic() - start


def frame_body(rows: list[tuple[str, int, int]]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["model", "batch_size", "seq_len"],
                                           "data": [list(r) for r in rows]}}).encode()


def largest_rows(model: str, count: int, max_tokens: int, max_seq: int) -> list:
    """``count`` distinct shapes of ``batch_size × seq_len ≈ max_tokens`` (none deduplicated)."""
    rows = []
    for i in range(count):
        seq_len = max_seq - i
        rows.append((model, min(1024, max_tokens // seq_len), seq_len))
    return rows


class Sampler(threading.Thread):
    """RSS of the server's process tree and CPU of its process, every ``period`` s."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.period = period
        self.samples: list[tuple[float, int, float]] = []  # (time, rss bytes, cpu seconds)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in tree)
                cpu = sum(sum(p.cpu_times()[:2]) for p in tree)
            except psutil.Error:
                break
            self.samples.append((time.monotonic(), rss, cpu))
            time.sleep(self.period)

    def cpu_percent(self, start: float, end: float) -> float:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return float("nan")
        return 100 * (inside[-1][2] - inside[0][2]) / (inside[-1][0] - inside[0][0])

    def peak_rss(self, start: float = 0, end: float = float("inf")) -> int:
        return max((s[1] for s in self.samples if start <= s[0] <= end), default=0)


class Pinger(threading.Thread):
    def __init__(self, url: str, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.url, self.period = url, period
        self.latencies: list[float] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=10) as response:
                    response.read()
                self.latencies.append(time.monotonic() - start)
            except OSError:
                self.failures += 1
            time.sleep(self.period)


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("server did not start")


def bad_bodies(url: str) -> dict:
    cases = {
        "bad_csv": (b'model,batch_size\n"tiny/bert,1\n2,3,4,5\n', "text/csv"),
        "empty_csv": (b"", "text/csv"),
        "bad_json": (b'{"dataframe_split": {"columns": ["model"', "application/json"),
        "wrong_columns": (json.dumps({"dataframe_split": {"columns": ["name", "b"],
                                                          "data": [["gpt2", 1]]}}).encode(),
                          "application/json"),
        "wrong_type": (json.dumps({"dataframe_split": {
            "columns": ["model", "batch_size", "seq_len"],
            "data": [["gpt2", "many", 8]]}}).encode(), "application/json"),
        "huge_shape": (frame_body([("gpt2", 65536, 1024)]), "application/json"),
        "content_type": (b"model,batch_size,seq_len\n", "text/plain"),
    }
    out = {}
    for name, (body, content_type) in cases.items():
        status, text, _ = post(url, body, content_type)
        out[name] = {"status": status, "body": text,
                     "clean": "stack_trace" not in text and "Traceback" not in text
                     and "\n" not in json.loads(text).get("message", "\n")}
    return out


def timeout_check(url: str, sampler: Sampler, model: str, rows: int, max_seq: int) -> dict:
    body = frame_body([(model, 1, max_seq - i) for i in range(rows)])
    time.sleep(2)
    idle_start = time.monotonic()
    time.sleep(3)
    before = sampler.cpu_percent(idle_start, time.monotonic())
    start = time.monotonic()
    status, text, elapsed = post(url, body)
    answered = time.monotonic()
    during = sampler.cpu_percent(start, answered)
    after = []
    for _ in range(10):  # 0.5 s windows after the answer
        window = time.monotonic()
        time.sleep(0.5)
        after.append(round(sampler.cpu_percent(window, time.monotonic()), 1))
    return {"status": status, "body": text[:300], "seconds": round(elapsed, 2),
            "cpu_percent_idle_before": round(before, 1), "cpu_percent_during": round(during, 1),
            "cpu_percent_after_each_0.5s": after}


def load(url: str, sampler: Sampler, pinger_url: str, concurrency: int, rows: list) -> dict:
    """``concurrency`` identical requests of shape ``rows`` at once (see :func:`load_bodies`)."""
    return {"rows_per_request": len(rows), "first_row": rows[0],
            **load_bodies(url, sampler, concurrency, frame_body(rows), pinger_url)}


def node_rows_body(model: str, max_body_bytes: int, max_nodes: int) -> tuple[bytes, int]:
    """Node rows of traced trees of ``model`` (distinct batch sizes), at most ``max_nodes`` in
    at most ``max_body_bytes``: the largest node-row request served. Returns (body, rows)."""
    from irene.predictors.static import trace_static
    from irene.serving import node_rows

    one = node_rows(trace_static(model, [(1, 8)], convention="irene"))
    columns = list(one.columns)
    per_tree = len(json.dumps(one.values.tolist()))
    trees = max(1, min(int(0.97 * max_body_bytes) // per_tree, max_nodes // len(one)))
    data = []
    for k in range(trees):
        data.extend(one.assign(batch_size=k + 1).values.tolist())
    body = json.dumps({"dataframe_split": {"columns": columns, "data": data}}).encode()
    while len(body) > max_body_bytes:  # drop whole trees until it fits
        data = data[:len(data) - len(one)]
        body = json.dumps({"dataframe_split": {"columns": columns, "data": data}}).encode()
    return body, len(data)


def load_bodies(url: str, sampler: Sampler, concurrency: int, body: bytes,
                pinger_url: str | None = None) -> dict:
    """``concurrency`` requests of ``body`` at once, ``/ping`` polled throughout: the answers'
    status counts, the server's peak RSS and the ping latencies."""
    pinger = Pinger(pinger_url or url)
    start = time.monotonic()
    pinger.start()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: post(url, body), range(concurrency)))
    time.sleep(2)
    pinger.stop.set()
    pinger.join()
    statuses: dict[str, int] = {}
    for status, _, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    lat = sorted(pinger.latencies)
    return {"requests": concurrency, "body_mb": round(len(body) / 2**20, 2),
            "statuses": statuses,
            "error_bodies": sorted({t[:200] for s, t, _ in results if s != 200}),
            "seconds_max": round(max(r[2] for r in results), 2),
            "peak_rss_mb": round(sampler.peak_rss(start) / 2**20, 1),
            "pings": len(lat), "ping_failures": pinger.failures,
            "ping_ms_median": round(1000 * lat[len(lat) // 2], 1) if lat else None,
            "ping_ms_max": round(1000 * lat[-1], 1) if lat else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", help="serve this model instead of packaging one")
    parser.add_argument("--model", default="bert-large-uncased",
                        help="architecture of the load requests (the registry's slowest trace)")
    parser.add_argument("--max-seq", type=int, default=512, help="its position embeddings")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--timeout", type=int, default=60,
                        help="MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT of the server")
    parser.add_argument("--timeout-check", type=int, default=10,
                        help="a second server with this timeout runs the timeout check")
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args()

    from irene.serving import ServingLimits

    limits = ServingLimits()
    report: dict = {"limits": limits.to_config(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="irene-load-") as tmp:
        store = Path(tmp)
        model_uri = args.model_uri or package(store)
        for phase, timeout in (("main", args.timeout), ("timeout", args.timeout_check)):
            port = 0
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            url = f"http://127.0.0.1:{port}"
            env = {**os.environ, "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(timeout),
                   "MLFLOW_TRACKING_URI": os.environ.get(
                       "MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")}
            log = (store / f"{phase}.log").open("w")
            server = subprocess.Popen([sys.executable, "-m", "irene.serving", "-m", model_uri,
                                       "--host", "127.0.0.1", "--port", str(port)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                wait_ready(url, server)
                sampler = Sampler(server.pid)
                sampler.start()
                time.sleep(1)
                if phase == "main":
                    report["idle_rss_mb"] = round(sampler.peak_rss() / 2**20, 1)
                    report["bad_bodies"] = bad_bodies(url)
                    post(url, frame_body([(args.model, 1, 8)]))  # warm the tracer
                    rows = largest_rows(args.model, limits.max_rows, limits.max_tokens,
                                        args.max_seq)
                    single = post(url, frame_body(rows))
                    report["one_largest_request"] = {"status": single[0],
                                                     "seconds": round(single[2], 2)}
                    report["load"] = load(url, sampler, url, args.concurrency, rows)
                    body, count = node_rows_body(args.model, limits.max_body_bytes,
                                                 limits.max_nodes)
                    report["load_node_rows"] = {"rows_per_request": count, **load_bodies(
                        url, sampler, args.concurrency, body)}
                    report["server_timeout_s"] = timeout
                    report["peak_rss_mb_whole_run"] = round(sampler.peak_rss() / 2**20, 1)
                else:
                    post(url, frame_body([(args.model, 1, 8)]))
                    report["timeout"] = {"server_timeout_s": timeout, **timeout_check(
                        url, sampler, args.model, limits.max_rows, args.max_seq)}
                    if report["timeout"]["status"] != 504:
                        report["timeout"]["note"] = ("finished within the timeout: use a "
                                                     "shorter --timeout-check for this model")
                report[f"server_alive_after_{phase}"] = server.poll() is None
                sampler.stop.set()
            finally:
                server.terminate()
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
                log.close()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        out = Path(args.out)
        partial = out.with_suffix(out.suffix + ".partial")
        partial.write_text(text + "\n")
        partial.replace(out)


if __name__ == "__main__":
    main()
