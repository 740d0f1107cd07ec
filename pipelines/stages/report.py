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

With ``seeds`` (the value the sweep ran with: ``seeds=5``) the report reads only the runs of
that request and writes ``<preset>_k<k>.*``: every cell is the mean ± standard deviation over
seeds, a row within seed noise of its column's best is marked ``†`` (two-sided Welch t-test
over seeds on log % error, :mod:`irene.evaluate.significance`), the best is bold only when it
stands out, and the per-model table says how many standard deviations the reference's
numbers lie from ours.
Without ``seeds`` only single-seed runs count and the tables are what they always were.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any  # noqa: UP035 - OmegaConf needs typing.Any

from irene.data.io import atomic_write_text
from irene.data.tree import ERROR_COLUMNS
from irene.errors import MissingInputError, SettingsError
from irene.evaluate.significance import (
    ALPHA,
    SeedSample,
    compare_to_best,
    prediction_bound,
    prediction_z,
)
from irene.tables import MeanSd, Table, to_latex, to_markdown
from pipelines.config import seeds_request
from pipelines.paths import log, outputs_dir
from pipelines.stage import Context, Stage

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class ReportSettings:
    report: dict[str, Any] = field(default_factory=dict)  # table layout (set by the preset)
    # crossvalidate, report: repeat every cross-validation over seeds: null (one run with
    # predictor.seed), k (predictor.seed, +1, ..., +k-1) or a list of seeds; report: which runs
    seeds: Any = None


@dataclass
class _Query:
    """What the report reads runs by: the data set's identity and the experiment (``ctx``),
    the preset's ``seeds`` request."""

    ctx: Context
    seeds: Any

    @functools.cached_property
    def identity(self):
        """The data the tables are of (:func:`pipelines.data.data_identity`): runs are selected
        by their own data tags, never by the ``data`` label they were started with."""
        return self.ctx.data_identity()

    @property
    def data_name(self) -> str:
        """The device(s) the tables are labelled with and written under."""
        return self.identity.label

    @property
    def models(self) -> list[str]:
        return self.ctx.data_models

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


@dataclass
class SeededTable:
    """A table over seeds: what is shown (``display``: :class:`MeanSd` cells, with markers
    and bold decided by the significance test) and what the CSV holds (``numbers``)."""

    display: pd.DataFrame
    numbers: pd.DataFrame
    bold_cells: set[tuple[int, str]] = field(default_factory=set)
    marks: dict[tuple[int, str], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _search(q: _Query, filter_string: str) -> list:
    import mlflow

    experiment_id = q.ctx.experiment_id()
    return mlflow.search_runs(experiment_ids=[experiment_id], filter_string=filter_string,
                              output_format="list", order_by=["attributes.start_time DESC"],
                              max_results=5000)


def _latest_per_row(runs: list, rows: list[str]) -> list[tuple[tuple, object]]:
    """(row key, run) of the newest run of every distinct ``rows`` params."""
    latest, seen = [], set()
    for run in runs:  # newest first
        key = tuple(run.data.params.get(p, "") for p in rows)
        if key not in seen:
            seen.add(key)
            latest.append((key, run))
    if not latest:
        raise MissingInputError("no FINISHED crossvalidate runs found for this preset and data set")
    return latest


def runs_table(runs: list, rows: list[str], order: dict) -> pd.DataFrame:
    """One row per distinct ``rows`` params (latest run wins), columns ml / module / model."""
    import pandas as pd

    records = [{**dict(zip(rows, key, strict=True)),
                **{level: run.data.metrics.get(f"overall_{level}") for level in LEVELS}}
               for key, run in _latest_per_row(runs, rows)]
    return _ordered(pd.DataFrame.from_records(records), rows, order)


def _ordered(frame: pd.DataFrame, rows: list[str], order: dict) -> pd.DataFrame:
    """Rows sorted by the preset's ``order`` of each ``rows`` column (unknown values last,
    alphabetically), indexed by ``rows``."""

    def rank(column: str):
        wanted = list(order.get(column, []))
        return frame[column].map(lambda v: (wanted.index(v) if v in wanted else len(wanted), v))

    frame = frame.assign(**{f"_{c}": rank(c) for c in rows})
    frame = frame.sort_values([f"_{c}" for c in rows]).drop(columns=[f"_{c}" for c in rows])
    return frame.set_index(rows)


# ---------------------------------------------------------------------------- over seeds
def _seed_folds(q: _Query, run) -> pd.DataFrame:
    """The (seed, left-out model) child runs of a seeded cross-validation: columns seed
    ("" when the predictor does not use one), left_out_model and the % error per node type."""
    import pandas as pd

    children = _search(q, f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                            "and tags.stage = 'crossvalidate-fold'")
    records = [{"seed": c.data.params.get("seed", ""),
                "left_out_model": c.data.params["left_out_model"],
                **{level: c.data.metrics.get(level, math.nan) for level in LEVELS}}
               for c in children]
    frame = pd.DataFrame.from_records(records, columns=["seed", "left_out_model", *LEVELS])
    # one row per (seed, model) even if a fold run was logged twice; a stable order
    frame = frame.drop_duplicates(["seed", "left_out_model"])
    numeric = lambda column: column.str.zfill(24) if column.name == "seed" else column  # noqa: E731
    return frame.sort_values(["seed", "left_out_model"], key=numeric).reset_index(drop=True)


def _deterministic(run) -> bool:
    return run.data.tags.get("seed_dependent") == "false"


def _sample(values: pd.Series, deterministic: bool) -> SeedSample | None:
    values = values.dropna()
    return SeedSample(tuple(float(v) for v in values), deterministic) if len(values) else None


def _overall_samples(q: _Query, run) -> dict[str, SeedSample | None]:
    """Per node type, the overall % error of every seed (mean over the left-out models)."""
    if "not_applicable" in run.data.tags:
        return dict.fromkeys(LEVELS)
    folds = _seed_folds(q, run)
    per_seed = folds.groupby("seed", sort=False)[list(LEVELS)].mean()
    return {level: _sample(per_seed[level], _deterministic(run)) for level in LEVELS}


def _cell(sample: SeedSample | None) -> MeanSd:
    if not isinstance(sample, SeedSample):  # a missing cell
        return MeanSd(math.nan)
    return MeanSd(sample.mean, None if sample.deterministic else sample.sd)


def _seed_notes(runs: list, what: str) -> list[str]:
    lists = sorted({r.data.params["seeds_run"] for r in runs if "seeds_run" in r.data.params
                    and not _deterministic(r)})
    seeds = [json.loads(x) for x in lists]
    k = max((len(s) for s in seeds), default=1)
    named = "; ".join(_seed_range(s) for s in seeds) or "none"
    return [f"Mean ± sample standard deviation over k = {k} seeds (predictor.seed = {named}) "
            f"of {what}. A value without ± does not depend on the seed (fit once)."]


def _seed_range(seeds: list[int]) -> str:
    consecutive = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    return f"{seeds[0]}-{seeds[-1]}" if consecutive and len(seeds) > 2 else ", ".join(map(str, seeds))


def seeded_runs_table(q: _Query, runs: list, rows: list[str], order: dict) -> SeededTable:
    """One row per configuration, ``mean ± sd`` over seeds of the overall % error; per column,
    every row is tested against the lowest mean (Welch t-test over seeds on log % error)."""
    import pandas as pd

    latest = _latest_per_row(runs, rows)
    records = []
    for key, run in latest:
        samples = _overall_samples(q, run)
        records.append({**dict(zip(rows, key, strict=True)), **samples})
    samples = _ordered(pd.DataFrame.from_records(records), rows, order)
    display = samples.map(_cell)
    numbers = pd.DataFrame(index=samples.index)
    bold, marks = set(), {}
    for level in LEVELS:
        column = [s if isinstance(s, SeedSample) else None for s in samples[level]]
        verdict = compare_to_best(column)
        numbers[level] = [math.nan if s is None else s.mean for s in column]
        numbers[f"{level}_sd"] = [math.nan if s is None else s.sd for s in column]
        numbers[f"{level}_p"] = verdict.p if verdict else [math.nan] * len(column)
        if verdict:
            bold |= {(i, level) for i in verdict.bold}
            marks |= {(i, level): "†" for i in verdict.tied}
    numbers["seeds"] = [max((s.n for s in row if isinstance(s, SeedSample)), default=0)
                        for row in samples[list(LEVELS)].itertuples(index=False)]
    notes = _seed_notes([r for _, r in latest], "each configuration's overall % error") + [
        f"† within seed noise of the lowest mean of its column (two-sided Welch t-test over "
        f"seeds on log % error, p ≥ {ALPHA:g}); bold: the lowest mean, when no other row is "
        "within noise of it (rows with the very same seed-independent value are bold "
        "together). The CSV holds each row's p-value against the column's lowest mean (ml_p, "
        "module_p, model_p)."]
    return SeededTable(display=display, numbers=numbers, bold_cells=bold, marks=marks,
                       notes=notes)


def seeded_folds_table(q: _Query, run) -> SeededTable:
    """Per left-out model, ``mean ± sd`` over seeds, the reference's numbers and how many
    standard deviations they lie from ours (``z``)."""
    import pandas as pd

    folds = _seed_folds(q, run)
    deterministic = _deterministic(run)
    models = (q.models if q.models
              else sorted(set(folds["left_out_model"])))
    names = [m for m in models if m in set(folds["left_out_model"])]
    kept = folds[folds["left_out_model"].isin(names)]
    per_seed = kept.groupby("seed", sort=False)[list(LEVELS)].mean()
    samples = {m: {level: _sample(folds.loc[folds["left_out_model"] == m, level], deterministic)
                   for level in LEVELS} for m in names}
    samples["overall"] = {level: _sample(per_seed[level], deterministic) for level in LEVELS}
    index = pd.Index(list(samples), name="left_out_model")
    display = pd.DataFrame({level: [_cell(samples[m][level]) for m in index] for level in LEVELS},
                           index=index)
    numbers = pd.DataFrame(index=index)
    for level in LEVELS:
        numbers[level] = [samples[m][level].mean if samples[m][level] else math.nan for m in index]
        numbers[f"{level}_sd"] = [samples[m][level].sd if samples[m][level] else math.nan
                                  for m in index]
    marks: dict[tuple[int, str], str] = {}
    notes = _seed_notes([run], "each left-out model's % error (overall: the mean over models)")
    if q.data_name == "device_1":
        for i, level in enumerate(LEVELS):
            reference = [REFERENCE_DEVICE_1.get(m, (None,) * 3)[i] for m in index]
            display[f"reference {level}"] = numbers[f"reference {level}"] = reference
        n = max((s.n for row in samples.values() for s in row.values() if s), default=0)
        bound = prediction_bound(n)
        for level in LEVELS:
            z = [prediction_z(ref, samples[m][level]) if ref is not None and samples[m][level]
                 else math.nan for m, ref in zip(index, numbers[f"reference {level}"], strict=True)]
            display[f"z {level}"] = numbers[f"z {level}"] = z
            marks |= {(row, f"z {level}"): "‡" for row, value in enumerate(z)
                      if not math.isnan(value) and abs(value) > bound}
        notes.append("z = (reference − mean) / sd: no spread, no z." if math.isnan(bound) else
            f"z = (reference − mean) / sd: how many standard deviations the reference's number "
            f"lies from our mean (– : no spread). ‡ |z| > {bound:.2f}: outside the "
            f"{100 * (1 - ALPHA):g}% prediction interval of one more run of ours (t with "
            f"{n - 1} degrees of freedom, × √(1 + 1/{n})).")
    return SeededTable(display=display, numbers=numbers, marks=marks, notes=notes)


def folds_table(q: _Query, run) -> pd.DataFrame:
    """Per-left-out-model rows of one cross-validation run, with the reference's numbers."""
    import pandas as pd

    children = _search(q, f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                            "and tags.stage = 'crossvalidate-fold'")
    frame = pd.DataFrame.from_records([
        {"left_out_model": c.data.params["left_out_model"],
         **{level: c.data.metrics.get(level) for level in LEVELS}} for c in children])
    frame = frame.drop_duplicates("left_out_model").set_index("left_out_model")
    # rows in the data's model order: data.models, else the order the run cross-validated
    models = (q.models if q.models
              else json.loads(run.data.params.get("models", "[]")) or sorted(frame.index))
    frame = frame.reindex([m for m in models if m in frame.index])
    frame.loc["overall"] = frame.mean(axis=0, skipna=False)
    if q.data_name == "device_1":
        for i, level in enumerate(LEVELS):
            frame[f"reference {level}"] = [REFERENCE_DEVICE_1.get(m, (None,) * 3)[i]
                                           for m in frame.index]
    return frame


def plot(frame: pd.DataFrame, path: Path, title: str, spread: pd.DataFrame | None = None) -> Path:
    """Grouped bars of % error per configuration (log scale: levels differ by 10×); with
    ``spread`` (same shape), each bar gets ± that error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [" / ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in frame.index]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4.2))
    width = 0.8 / len(LEVELS)
    for i, level in enumerate(LEVELS):
        bars = {} if spread is None else {"yerr": spread[level].astype(float).fillna(0.0),
                                          "capsize": 2, "error_kw": {"elinewidth": 0.8}}
        ax.bar([x + (i - 1) * width for x in range(len(labels))], frame[level].astype(float),
               width, label=level, **bars)
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


def _preset_runs(q: _Query, name: str) -> list:
    """The preset's FINISHED cross-validations on this data set, newest first: those of the
    ``seeds`` request when given, else the single-seed ones only."""
    base = (f"tags.preset = '{name}' and tags.stage = 'crossvalidate' "
            f"and attributes.status = 'FINISHED'")
    request = seeds_request(q.seeds)
    if request is not None:
        return _identity_runs(q, f"{base} and params.seeds = '{request}'")
    return [r for r in _identity_runs(q, base) if "seeds" not in r.data.params]


def _identity_runs(q: _Query, base: str) -> list:
    """The runs of ``base`` on the report's data, newest first: tagged with its devices (and,
    for data that is no published device, its sha256); for a published device also the runs
    that read its published CSVs, by their ``data.sha256.<file>`` tags (runs logged before the
    ``data.device`` tag existed)."""
    from irene.data.locate import load_sources

    identity = q.identity
    found = _search(q, f"{base} and tags.`data.device` = '{identity.label}'")
    if not identity.published:
        return [r for r in found if not identity.sha256
                or r.data.tags.get("data.identity") == identity.sha256]
    if len(identity.devices) == 1:
        files = load_sources()["devices"][identity.devices[0]]
        by_files = " and ".join(f"tags.`data.sha256.{file}` = '{digest}'"
                                for file, digest in sorted(files.items()))
        seen = {r.info.run_id for r in found}
        found += [r for r in _search(q, f"{base} and {by_files}") if r.info.run_id not in seen]
    return sorted(found, key=lambda r: r.info.start_time, reverse=True)


def build_table(q: _Query, name: str, layout: dict) -> pd.DataFrame | SeededTable:
    runs = _preset_runs(q, name)
    seeded = seeds_request(q.seeds) is not None
    if layout.get("kind", "runs") == "folds":
        if not runs:
            asked = f" with seeds={seeds_request(q.seeds)}" if seeded else ""
            raise MissingInputError(f"no FINISHED crossvalidate run of preset {name!r} on "
                                    f"{q.data_name}{asked}: run its sweep first (python run.py "
                                    f"-m experiment={name})")
        return seeded_folds_table(q, runs[0]) if seeded else folds_table(q, runs[0])
    rows, order = list(layout["rows"]), dict(layout.get("order", {}))
    return seeded_runs_table(q, runs, rows, order) if seeded else runs_table(runs, rows, order)


def run(ctx: Context, settings: ReportSettings) -> ReportResult:
    name = ctx.sweep_name
    if not name:
        raise SettingsError("stage=report needs a preset: python run.py stage=report experiment=<name>")
    layout = dict(settings.report or {})
    if not ctx.tracking_enabled:
        raise SettingsError("stage=report reads MLflow runs: tracking must be enabled")
    q = _Query(ctx, settings.seeds)
    built = build_table(q, name, layout)
    title = layout.get("title", name)
    if isinstance(built, SeededTable):
        return _write_seeded(q, name, title, built)
    table = built
    # best per column: meaningful across configurations, not across left-out models
    bold_columns = [] if layout.get("kind") == "folds" else [c for c in table.columns
                                                              if str(c) in LEVELS]
    out = q.ctx.run_dir
    stable = outputs_dir() / "tables" / q.data_name
    grid = Table.from_frame(table)
    markdown = to_markdown(grid, bold_columns=bold_columns)
    paths = []
    for folder in (out, stable):
        paths += [
            atomic_write_text(folder / f"{name}.md", f"### {title}\n\n{markdown}\n"),
            atomic_write_text(folder / f"{name}.csv", grid.to_csv()),
            atomic_write_text(folder / f"{name}.tex", to_latex(grid, title, bold_columns=bold_columns)),
        ]
    paths.append(plot(table, out / f"{name}.png", title))
    (stable / f"{name}.png").write_bytes(paths[-1].read_bytes())
    _log_to_sweep(q, name, out, paths[:3] + paths[-1:])
    print(markdown)
    for path in paths[3:6] + paths[-1:]:
        print(f"table: {path}")
    return ReportResult(table=table, paths=paths)


def _write_seeded(q: _Query, name: str, title: str, table: SeededTable) -> ReportResult:
    """``<preset>_k<k>.md/.csv/.tex/.png``: the single-seed tables keep their names."""
    k = _num_seeds(q)
    stem = f"{name}_k{k}"
    title = f"{title}, mean ± sd over {k} seeds"
    out = q.ctx.run_dir
    stable = outputs_dir() / "tables" / q.data_name
    style = {"bold_cells": table.bold_cells, "marks": table.marks}
    display = Table.from_frame(table.display)
    markdown = to_markdown(display, **style)
    notes = "\n\n".join(table.notes)
    paths = []
    for folder in (out, stable):
        paths += [
            atomic_write_text(folder / f"{stem}.md", f"### {title}\n\n{markdown}\n\n{notes}\n"),
            atomic_write_text(folder / f"{stem}.csv", Table.from_frame(table.numbers).to_csv()),
            atomic_write_text(folder / f"{stem}.tex",
                              to_latex(display, title, notes=table.notes, **style)),
        ]
    means = table.numbers[[c for c in LEVELS if c in table.numbers.columns]]
    spread = table.numbers[[f"{c}_sd" for c in means.columns]].set_axis(means.columns, axis=1)
    paths.append(plot(means, out / f"{stem}.png", title, spread=spread))
    (stable / f"{stem}.png").write_bytes(paths[-1].read_bytes())
    _log_to_sweep(q, name, out, paths[:3] + paths[-1:])
    print(markdown)
    print()
    print(notes)
    for path in paths[3:6] + paths[-1:]:
        print(f"table: {path}")
    return ReportResult(table=table.numbers, paths=paths)


def _num_seeds(q: _Query) -> int:
    """k of the ``seeds`` request: the number itself, or the length of the list."""
    seeds = q.seeds
    return len(seeds) if isinstance(seeds, list | tuple) else int(seeds)


def _log_to_sweep(q: _Query, name: str, out: Path, paths: list[Path]) -> None:
    """Artifacts of the latest parent run of the preset's sweep (a new run if none)."""
    import mlflow

    parents = _search(q, f"tags.preset = '{name}' and tags.stage = 'sweep'")
    client = mlflow.MlflowClient()
    if parents:
        run_id = parents[0].info.run_id
    else:
        run_id = client.create_run(q.ctx.experiment_id(), run_name=f"report {name}",
                                   tags={"stage": "report", "preset": name}).info.run_id
        client.set_terminated(run_id)
    for path in paths:
        client.log_artifact(run_id, str(path), f"tables/{q.data_name}")
    markdown = next(p for p in paths if p.suffix == ".md").read_text()
    client.set_tag(run_id, "mlflow.note.content", f"{markdown}\nData: {q.data_name}.")
    log.info("tables logged to run %s", run_id)


STAGE = Stage("report", ReportSettings, run, not_hashed=("report",))
