"""Browse the project's MLflow store, opened on the experiment's runs table.

    python scripts/mlflow_ui.py [--store sqlite:///outputs/mlflow.db] [--experiment irene]
                                [--port 5000] [--no-browser]

``make mlflow-ui`` runs it. It starts ``mlflow server`` on 127.0.0.1, prints the address of
the experiment's runs table and opens it in a browser where one can be opened. The address
names the runs tab and MLflow's "machine learning" workflow explicitly: MLflow 3 otherwise
opens an experiment on its GenAI pages (overview, traces) and keeps the runs one click away.
Ctrl-C stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
import webbrowser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_store() -> str:
    """The store the stages log to by default: ``$MLFLOW_TRACKING_URI``, else the sqlite file
    in ``$IRENE_OUTPUTS`` (default ``outputs/``)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    outputs = Path(os.environ.get("IRENE_OUTPUTS") or ROOT / "outputs").absolute()
    return f"sqlite:///{outputs / 'mlflow.db'}"


VIEW_KEY = "irene-runs"  # the shared view of the runs table (see runs_view)
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
# columns shown first when the runs have them: the cross-validation errors and the ablation axes
METRICS_FIRST = ("overall_ml", "overall_module", "overall_model")
PARAMS_FIRST = ("stage", "predictor", "features", "strategy", "weighting", "data")


def runs_table_url(base_url: str, experiment_id: str | None, view: bool = True) -> str:
    """The address of an experiment's runs table in MLflow's UI (the UI's root without one)."""
    if experiment_id is None:
        return f"{base_url}/"
    url = f"{base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return f"{url}&viewStateShareKey={VIEW_KEY}" if view else url


def runs_view(metric_keys: set[str], param_keys: set[str], max_metrics: int = 6) -> dict:
    """The runs table's columns: MLflow shows none of the metrics until they are picked, so
    the view picks the cross-validation errors (else the first metrics by name) and the
    ablation axes. The dict is what MLflow's "Share" button stores as an experiment tag
    (``mlflow.sharedViewState.<key>``, plain JSON), which ``viewStateShareKey`` loads."""
    metrics = [k for k in METRICS_FIRST if k in metric_keys] or sorted(metric_keys)[:max_metrics]
    params = [k for k in PARAMS_FIRST if k in param_keys]
    return {"selectedColumns": [f"metrics.`{k}`" for k in metrics] + [f"params.`{k}`" for k in params]}


def prepare_experiment(store: str, name: str, max_runs: int = 1000) -> str | None:
    """The id of experiment ``name`` in ``store`` (None when no run has created it yet), with
    its runs-table view (:func:`runs_view`) stored as an experiment tag."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], max_results=max_runs)
    metric_keys = {k for run in runs for k in run.data.metrics}
    param_keys = {k for run in runs for k in run.data.params}
    client.set_experiment_tag(experiment.experiment_id, VIEW_TAG,
                              json.dumps(runs_view(metric_keys, param_keys)))
    return experiment.experiment_id


def wait_until_up(url: str, server: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow_ui: mlflow server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow_ui: mlflow server did not answer at {url} within {timeout_s:.0f} s")


def can_open_browser() -> bool:
    """A browser can be shown: a desktop session (macOS, Windows, or X11/Wayland)."""
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=default_store(), help="MLflow tracking URI")
    parser.add_argument("--experiment", default="irene", help="experiment to open (tracking.experiment)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--no-browser", action="store_true", help="only print the address")
    args = parser.parse_args(argv)

    base_url = f"http://{args.host}:{args.port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri", args.store,
                               "--host", args.host, "--port", str(args.port)])
    try:
        wait_until_up(base_url, server)
        found = prepare_experiment(args.store, args.experiment)
        url = runs_table_url(base_url, found)
        if found is None:
            print(f"no experiment {args.experiment!r} in {args.store} yet (make crossvalidate "
                  "logs the first runs)", flush=True)
        print(f"MLflow UI, runs of experiment {args.experiment!r}: {url}", flush=True)
        if not args.no_browser and can_open_browser():
            webbrowser.open(url)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
