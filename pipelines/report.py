"""``stage=report``: paper tables from the finished runs of a sweep preset, read from MLflow.

    python run.py stage=report experiment=<preset>

The preset (``conf/experiment/<preset>.yaml``) names the sweep (``sweep_name``) and the
layout (``report``):

* ``kind: runs``  — one row per configuration: the ``rows`` params, overall % error columns;
* ``kind: folds`` — one row per left-out model of the latest run, next to the reference's.

Runs are found with ``search_runs`` by their ``preset`` tag, never from output folders; for each
row the latest FINISHED run counts (so a resumed sweep reports its newest results). Tables are
written as markdown and LaTeX (best value per column in bold) and CSV, plus a PNG plot, into
the run folder and ``outputs/tables/<data>/``, and logged to the sweep's parent run. The same
runs give byte-identical tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from irene.data.io import atomic_write_text
from irene.data.tree import ERROR_COLUMNS
from irene.errors import MissingInputError, SettingsError
from irene.tables import to_latex, to_markdown
from pipelines.paths import log, outputs_dir, run_dir, setup
from pipelines.tracking import ensure_experiment

LEVELS = ERROR_COLUMNS
# The reference implementation's published cross-validation report (device 1, its README).
REFERENCE_DEVICE_1 = {
    "roberta-base": (0.71, 5.49, 6.91),
    "gpt2": (0.63, 14.92, 4.88),
    "distilbert-base-uncased": (0.60, 6.04, 19.01),
    "openai-gpt": (0.92, 14.01, 2.96),
    "distilgpt2": (0.64, 14.78, 2.75),
    "bert-base-uncased": (0.70, 5.45, 3.93),
    "overall": (0.70, 10.12, 6.74),
}


@dataclass
class ReportResult:
    table: pd.DataFrame
    paths: list[Path]


def _search(cfg: DictConfig, filter_string: str) -> list:
    import mlflow

    experiment_id = ensure_experiment(cfg)
    return mlflow.search_runs(experiment_ids=[experiment_id], filter_string=filter_string,
                              output_format="list", order_by=["attributes.start_time DESC"],
                              max_results=5000)


def runs_table(runs: list, rows: list[str], order: dict) -> pd.DataFrame:
    """One row per distinct ``rows`` params (latest run wins), columns ml / module / model."""
    records, seen = [], set()
    for run in runs:  # newest first
        key = tuple(run.data.params.get(p, "") for p in rows)
        if key in seen:
            continue
        seen.add(key)
        metrics = run.data.metrics
        records.append({**dict(zip(rows, key, strict=True)),
                        **{level: metrics.get(f"overall_{level}") for level in LEVELS}})
    if not records:
        raise MissingInputError("no FINISHED crossvalidate runs found for this preset and data set")
    frame = pd.DataFrame.from_records(records)

    def rank(column: str):
        wanted = list(order.get(column, []))
        return frame[column].map(lambda v: (wanted.index(v) if v in wanted else len(wanted), v))

    frame = frame.assign(**{f"_{c}": rank(c) for c in rows})
    frame = frame.sort_values([f"_{c}" for c in rows]).drop(columns=[f"_{c}" for c in rows])
    return frame.set_index(rows)


def folds_table(cfg: DictConfig, run) -> pd.DataFrame:
    """Per-left-out-model rows of one cross-validation run, with the reference's numbers."""
    children = _search(cfg, f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                            "and tags.stage = 'crossvalidate-fold'")
    frame = pd.DataFrame.from_records([
        {"left_out_model": c.data.params["left_out_model"],
         **{level: c.data.metrics.get(level) for level in LEVELS}} for c in children])
    frame = frame.drop_duplicates("left_out_model").set_index("left_out_model")
    # rows in the data's model order: data.models, else the order the run cross-validated
    models = (OmegaConf.to_container(cfg.data.models) if cfg.data.models
              else json.loads(run.data.params.get("models", "[]")) or sorted(frame.index))
    frame = frame.reindex([m for m in models if m in frame.index])
    frame.loc["overall"] = frame.mean(axis=0, skipna=False)
    if cfg.data.name == "device_1":
        for i, level in enumerate(LEVELS):
            frame[f"reference {level}"] = [REFERENCE_DEVICE_1.get(m, (None,) * 3)[i]
                                           for m in frame.index]
    return frame


def plot(frame: pd.DataFrame, path: Path, title: str) -> Path:
    """Grouped bars of % error per configuration (log scale: levels differ by 10×)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [" / ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in frame.index]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4.2))
    width = 0.8 / len(LEVELS)
    for i, level in enumerate(LEVELS):
        ax.bar([x + (i - 1) * width for x in range(len(labels))], frame[level].astype(float),
               width, label=level)
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("mean absolute % error (log)")
    ax.set_title(title, fontsize=10)
    ax.legend(title="node type", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
    return path


def build_table(cfg: DictConfig, name: str, layout: dict) -> pd.DataFrame:
    base = (f"tags.preset = '{name}' and tags.stage = 'crossvalidate' "
            f"and attributes.status = 'FINISHED' and params.data = '{cfg.data.name}'")
    runs = _search(cfg, base)
    if layout.get("kind", "runs") == "folds":
        if not runs:
            raise MissingInputError(f"no FINISHED crossvalidate run of preset {name!r} on "
                                    f"{cfg.data.name}: run its sweep first (python run.py -m "
                                    f"experiment={name})")
        return folds_table(cfg, runs[0])
    return runs_table(runs, list(layout["rows"]), dict(layout.get("order", {})))


def run(cfg: DictConfig) -> ReportResult:
    setup(cfg)
    name = cfg.get("sweep_name")
    if not name:
        raise SettingsError("stage=report needs a preset: python run.py stage=report experiment=<name>")
    layout = OmegaConf.to_container(cfg.report, resolve=True) if cfg.report else {}
    if not cfg.tracking.enabled:
        raise SettingsError("stage=report reads MLflow runs: tracking must be enabled")
    table = build_table(cfg, name, layout)
    title = layout.get("title", name)
    # best per column: meaningful across configurations, not across left-out models
    bold_columns = [] if layout.get("kind") == "folds" else [c for c in table.columns
                                                              if str(c) in LEVELS]
    out = run_dir(cfg)
    stable = outputs_dir() / "tables" / cfg.data.name
    markdown = to_markdown(table, bold_columns=bold_columns)
    paths = []
    for folder in (out, stable):
        paths += [
            atomic_write_text(folder / f"{name}.md", f"### {title}\n\n{markdown}\n"),
            atomic_write_text(folder / f"{name}.csv", table.to_csv(float_format="%.4f")),
            atomic_write_text(folder / f"{name}.tex", to_latex(table, title, bold_columns=bold_columns)),
        ]
    paths.append(plot(table, out / f"{name}.png", title))
    (stable / f"{name}.png").write_bytes(paths[-1].read_bytes())
    _log_to_sweep(cfg, name, out, paths[:3] + paths[-1:])
    print(markdown)
    for path in paths[3:6] + paths[-1:]:
        print(f"table: {path}")
    return ReportResult(table=table, paths=paths)


def _log_to_sweep(cfg: DictConfig, name: str, out: Path, paths: list[Path]) -> None:
    """Artifacts of the latest parent run of the preset's sweep (a new run if none)."""
    import mlflow

    parents = _search(cfg, f"tags.preset = '{name}' and tags.stage = 'sweep'")
    client = mlflow.MlflowClient()
    if parents:
        run_id = parents[0].info.run_id
    else:
        run_id = client.create_run(ensure_experiment(cfg), run_name=f"report {name}",
                                   tags={"stage": "report", "preset": name}).info.run_id
        client.set_terminated(run_id)
    for path in paths:
        client.log_artifact(run_id, str(path), f"tables/{cfg.data.name}")
    markdown = next(p for p in paths if p.suffix == ".md").read_text()
    client.set_tag(run_id, "mlflow.note.content", f"{markdown}\nData: {cfg.data.name}.")
    log.info("tables logged to run %s", run_id)
