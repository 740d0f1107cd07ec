"""``stage=whatif``: several architectures or sizes side by side, predicted from static features.

``python run.py stage=whatif models=[bert-base-uncased,distilbert-base-uncased,bert-large-uncased]
batch_sizes=[8,16,32] seq_lens=[64,128,256] model_dir=<trained static predictor>`` traces every
(model, batch size, sequence length), predicts it with a predictor trained on static features
(``features=model_specs``) and writes into the run folder, logged to MLflow:

* ``whatif.csv`` / ``whatif.md``: one row per (model, batch size, seq len) with the total
  predicted energy (J), the energy per token (mJ) and the number of fallback nodes;
* ``whatif_energy.csv`` / ``.md``: the same energies pivoted, models side by side;
* ``whatif.png``: energy vs sequence length, one panel per batch size, one line per model;
* ``whatif_predictions.jsonl``: every predicted tree (per-node breakdown).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from irene.errors import SettingsError
from pipelines.models import unseen_policy
from pipelines.paths import log
from pipelines.stage import Context, ModelInput, Stage, TrainedPredictor

if TYPE_CHECKING:
    import pandas as pd

    from irene.data.tree import Tree


@dataclass
class WhatifSettings(ModelInput, TrainedPredictor):
    models: list[str] | None = None  # models compared side by side (default: [model])
    batch_sizes: list[int] | None = None  # batch sizes (default: [batch_size])
    seq_lens: list[int] | None = None  # sequence lengths (default: [seq_len])


def grid(settings: WhatifSettings) -> tuple[list[str], list[int], list[int]]:
    """Models, batch sizes and sequence lengths of the comparison."""
    models = list(settings.models or ([settings.model] if settings.model else []))
    if not models:
        raise SettingsError("stage=whatif needs models=[name,...] (or model=<name>)")
    batch_sizes = [int(b) for b in (settings.batch_sizes or [settings.batch_size])]
    seq_lens = [int(s) for s in (settings.seq_lens or [settings.seq_len])]
    return [str(m) for m in models], batch_sizes, seq_lens


def comparison_table(trees: list[Tree]) -> pd.DataFrame:
    """One row per tree: total predicted energy, per token, fallback count."""
    from irene.explain.views import totals_table

    table = totals_table(trees).reset_index()
    table["energy_per_token_mj"] = (1e3 * table["predicted_energy_j"]
                                    / (table["batch_size"] * table["seq_len"]))
    table = table.drop(columns=[c for c in ("nodes",) if c in table.columns])
    return table.set_index("model")


def pivot_energy(table: pd.DataFrame) -> pd.DataFrame:
    """Total energy (J) with one column per model, rows (batch_size, seq_len)."""
    frame = table.reset_index().pivot_table(index=["batch_size", "seq_len"], columns="model",
                                            values="predicted_energy_j", sort=False)
    frame.columns.name = None
    frame.index = [f"{b}x{s}" for b, s in frame.index]
    frame.index.name = "batch x seq"
    return frame


def plot(table: pd.DataFrame, path: Path) -> Path:
    """Energy vs sequence length: one panel per batch size, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = table.reset_index()
    batch_sizes = sorted(frame["batch_size"].unique())
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(4.5 * len(batch_sizes), 3.8),
                             sharey=True, squeeze=False)
    for ax, batch_size in zip(axes[0], batch_sizes, strict=True):
        for model, rows in frame[frame["batch_size"] == batch_size].groupby("model", sort=False):
            rows = rows.sort_values("seq_len")
            ax.plot(rows["seq_len"], rows["predicted_energy_j"], marker="o", label=model)
            marked = rows[rows["fallback_nodes"] > 0]
            ax.scatter(marked["seq_len"], marked["predicted_energy_j"], s=80,
                       facecolors="none", edgecolors="red", linewidths=1)
        ax.set_title(f"batch size {batch_size}")
        ax.set_xlabel("sequence length")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("predicted energy per forward pass (J)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("static IrEne prediction (red ring: tree has fallback-predicted nodes)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(ctx: Context, settings: WhatifSettings) -> Path:
    """Returns the comparison table (``<run folder>/whatif.csv``)."""
    from irene.data.tree import write_trees
    from irene.predictors.static import predict_trees, trace_static
    from irene.tables import Table, write_table

    folder = ctx.run_dir
    models, batch_sizes, seq_lens = grid(settings)
    params = {"models": models, "batch_sizes": batch_sizes, "seq_lens": seq_lens,
              "model_dir": str(settings.model_dir), "model_run": str(settings.model_run),
              "unseen_op": str(settings.unseen_op), "device": str(settings.device)}
    with ctx.tracked_run(params) as tracker:
        predictor, _ = ctx.trained_predictor(folder / "downloaded", tracker,
                                             model_dir=settings.model_dir,
                                             model_run=settings.model_run, traced=True,
                                             device=settings.device)
        tracker.log_params({"predictor": type(predictor).__name__})
        shapes = [(b, s) for b in batch_sizes for s in seq_lens]
        filled: list[Tree] = []
        for model in models:
            log.info("tracing %s at %d shapes", model, len(shapes))
            traced = trace_static(model, shapes, convention=settings.convention_for(predictor))
            trees, _, _ = predict_trees(predictor, traced, unseen_policy(settings.unseen_op),
                                        static_only=True)
            filled.extend(trees)
        table = comparison_table(filled)
        print(table.to_string(float_format=lambda v: f"{v:.4g}"))
        paths = [*write_table(Table.from_frame(table), folder, "whatif", floatfmt=".4g"),
                 *write_table(Table.from_frame(pivot_energy(table)), folder, "whatif_energy", floatfmt=".4g"),
                 plot(table, folder / "whatif.png"),
                 write_trees(folder / "whatif_predictions.jsonl", filled)]
        for path in paths:
            tracker.log_artifact(path, "whatif")
    print(f"what-if table: {folder / 'whatif.csv'}")
    return folder / "whatif.csv"


STAGE = Stage("whatif", WhatifSettings, run)
