"""``stage=predict``: predict every node's energy and explain where it goes.

Three inputs, in this order of precedence:

* ``model=<name or config.json>``: trace the model (static features, no energy meter) at
  ``batch_size`` x ``seq_len``, or at every pair of ``shapes=[[8,128],[16,256]]``; the trained
  predictor must use static features only (``features=model_specs``); the tracer follows
  ``trace_convention`` (default ``irene``: the published trees' ``mem_bytes`` and leaves,
  right for a predictor trained on the published data; ``physical`` for one trained on trees
  measured by ``stage=measure`` with its default convention);
* ``trees=<file>``: predict those trees;
* otherwise the configured data set.

The trained predictor comes from ``model_dir=<folder of stage=train>`` or
``model_run=<MLflow run id of stage=train>``, or ``device=<id>``: the newest predictor
``stage=transfer`` kept for that device, which also sets the tracer's convention to that of
the device's measured trees (the ``predictor`` config group only names the kind of
predictor to train, so it cannot name a trained one). ``unseen_op`` overrides the
policy for primitive types never seen in training (``error`` or a known type); nodes predicted
by a fallback are marked ``prediction_fallback: true``.

Writes into the run folder and logs to MLflow: ``predictions.jsonl``, ``totals.csv``/``.md``
(total energy per tree), ``fallback.csv`` (fallback nodes), and for the first
``explain.max_trees`` trees the explanation views (``views/<model>_<bs>x<seq>.{txt,html,png}``;
the text view is also printed). ``package=true`` also logs the predictor as an MLflow pyfunc
model and prints its URI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from irene.errors import SettingsError
from pipelines.models import unseen_policy
from pipelines.paths import log
from pipelines.stage import Context, ModelInput, Stage, TrainedPredictor

if TYPE_CHECKING:
    from irene.data.tree import Tree
    from pipelines.tracking import Tracker


@dataclass
class ExplainConfig:
    max_depth: int = 6  # tree levels drawn in the HTML / PNG icicle
    source: str = "auto"  # energy explained: auto (predicted, else measured) | predicted | measured
    max_trees: int = 4  # trees explained (HTML, PNG, text): the first N predicted
    views: bool = True  # write the explanation views at all


@dataclass
class PredictSettings(ModelInput, TrainedPredictor):
    shapes: list[list[int]] | None = None  # [[batch_size, seq_len], ...] instead of one pair
    trees: str | None = None  # predict/evaluate: input trees (default: the data set)
    output: str | None = None  # predict: output file (default: run folder)
    explain: ExplainConfig = field(default_factory=ExplainConfig)  # explanation views
    package: bool = False  # also log the predictor as an MLflow pyfunc model


# --------------------------------------------------------------------------------- input
def input_trees(ctx: Context, settings: PredictSettings, tracker: Tracker,
                convention: str | None = None) -> tuple[list[Tree], Path | None, bool]:
    """The trees to predict, the file they came from (None when traced) and whether they
    were traced (static features only)."""
    from irene.data.tree import read_trees
    from irene.predictors.static import parse_shapes, trace_static
    from pipelines.data import read_identified, record_input

    if settings.model:
        shapes = parse_shapes(settings.shapes, settings.batch_size, settings.seq_len)
        convention = str(convention or settings.trace_convention or "irene")
        log.info("tracing %s at %s (static features, %s convention)", settings.model, shapes,
                 convention)
        return trace_static(str(settings.model), shapes, convention=convention), None, True
    if settings.trees:
        source = Path(settings.trees)
        trees = read_trees(source)
        digest = record_input(tracker, "trees", source, source="trees")
        # each line keeps (or gets) its device: the predictions say which device they are for
        return read_identified(trees, source, digest, ctx.data_name, tracker, "trees"), source, False
    trees, source = ctx.load_trees(tracker, require_energy=False)
    return trees, source, False


# ------------------------------------------------------------------------------- outputs
def write_views(ecfg: ExplainConfig, trees: list[Tree], directory: Path) -> list[Path]:
    """Explanation views of the first ``explain.max_trees`` trees; prints the text views."""
    from irene.explain import views as explain

    if not ecfg.views:
        return []
    paths = []
    explained = trees[: max(int(ecfg.max_trees), 0)]
    for tree in explained:
        views = explain.write_views(tree, directory, explain.view_stem(tree),
                                    source=str(ecfg.source), max_depth=int(ecfg.max_depth))
        print(views["text"].read_text())
        paths.extend(views.values())
    if len(explained) < len(trees):
        print(f"explained {len(explained)} of {len(trees)} trees (the first ones); "
              f"explain.max_trees={len(trees)} explains all of them")
    return paths


def package(model_dir: Path, unseen_op: str | None, trace_convention: str) -> str:
    """Log the predictor as an MLflow pyfunc model in the active run; returns its URI."""
    from irene.serving import log_pyfunc

    info = log_pyfunc(model_dir, unseen_op=unseen_op, trace_convention=trace_convention)
    return info.model_uri


def out_of_range_counts(trees: list[Tree]) -> dict:
    """Nodes with features outside the predictor's training range, and the count per feature."""
    from irene.data.tree import iter_nodes
    from irene.predictors.static import OUT_OF_RANGE_FIELD

    nodes, features = 0, {}
    for tree in trees:
        for node in iter_nodes(tree["frontend_tree"]):
            names = node.get(OUT_OF_RANGE_FIELD)
            if names:
                nodes += 1
                for name in names:
                    features[name] = features.get(name, 0) + 1
    return {"nodes": nodes, "features": dict(sorted(features.items()))}


# ------------------------------------------------------------------------------- the stage
def run(ctx: Context, settings: PredictSettings) -> Path:
    """Returns the predictions file (``output``, default ``<run folder>/predictions.jsonl``)."""
    from irene.data.tree import tree_key, write_trees
    from irene.explain.views import fallback_table, totals_table
    from irene.predictors.static import fallback_summary, predict_trees
    from irene.tables import Table, write_table

    folder = ctx.run_dir
    out = Path(settings.output) if settings.output else folder / "predictions.jsonl"
    policy = unseen_policy(settings.unseen_op)
    params = {"model_dir": str(settings.model_dir), "model_run": str(settings.model_run),
              "model": str(settings.model), "unseen_op": policy or "",
              "device": str(settings.device)}
    # packaging logs an MLflow model inside the run: the run must be this process's
    with ctx.tracked_run(params, background=not settings.package) as tracker:
        predictor, model_dir = ctx.trained_predictor(
            folder / "downloaded", tracker, model_dir=settings.model_dir,
            model_run=settings.model_run, traced=bool(settings.model), device=settings.device)
        model_uri = None
        if settings.package:
            if not ctx.tracking_enabled:
                raise SettingsError("package=true logs an MLflow model: it needs tracking.enabled=true")
            model_uri = package(model_dir, policy, settings.convention_for(predictor))
        trees, source, traced = input_trees(ctx, settings, tracker,
                                            settings.convention_for(predictor))
        tracker.log_params({"trees": str(source or "traced"), "predictor": type(predictor).__name__})
        filled, forest, fallback = predict_trees(predictor, trees, policy, static_only=traced)
        write_trees(out, filled, protect=[source] if source else [])
        by_type = fallback_summary(forest, fallback)
        outside = out_of_range_counts(filled)
        log.info("predicted %d nodes of %d trees (%d with a fallback regressor: %s; %d with "
                 "features outside the training range: %s)", forest.num_nodes,
                 forest.num_trees, int(fallback.sum()), by_type or "none",
                 outside["nodes"], outside["features"] or "none")
        tracker.log_metrics({"fallback_nodes": int(fallback.sum()), "trees": forest.num_trees,
                             "out_of_range_nodes": outside["nodes"]})
        if by_type:
            tracker.log_params({"fallback_types": by_type})
        totals = totals_table(filled)
        if traced:
            for tree in filled:
                _, batch_size, seq_len = tree_key(tree)
                tracker.log_metrics({f"energy_j.{batch_size}x{seq_len}":
                             tree["frontend_tree"]["predicted_energy"]})
        artifacts = [out, *write_table(Table.from_frame(totals), folder, "totals", floatfmt=".4g")]
        fallback_path = folder / "fallback.csv"
        fallback_table(filled).to_csv(fallback_path, index=False)
        artifacts.append(fallback_path)
        view_paths = write_views(settings.explain, filled, folder / "views")
        for path in artifacts:
            tracker.log_artifact(path, "predictions")
        if view_paths:
            tracker.log_artifact(folder / "views", "views")
    print(f"predictions: {out}")
    if model_uri:  # last: what `make serve MODEL=...` takes
        print(f"pyfunc model: {model_uri}  (serve it: make serve MODEL={model_uri})")
    return out


STAGE = Stage("predict", PredictSettings, run, not_hashed=("output",))
