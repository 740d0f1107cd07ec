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
``model_run=<MLflow run id of stage=train>`` (the ``predictor`` config group only names the
kind of predictor to train, so it cannot name a trained one). ``unseen_op`` overrides the
policy for primitive types never seen in training (``error`` or a known type); nodes predicted
by a fallback are marked ``prediction_fallback: true``.

Writes into the run folder and logs to MLflow: ``predictions.jsonl``, ``totals.csv``/``.md``
(total energy per tree), ``fallback.csv`` (fallback nodes), and for the first
``explain.max_trees`` trees the explanation views (``views/<model>_<bs>x<seq>.{txt,html,png}``;
the text view is also printed). ``package=true`` also logs the predictor as an MLflow pyfunc
model and prints its URI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from irene.data.tree import Tree, read_trees, tree_key, write_trees
from irene.errors import SettingsError
from irene.explain import views as explain
from irene.explain.views import fallback_table, totals_table
from irene.predictors.static import fallback_summary, parse_shapes, predict_trees, trace_static
from irene.tables import Table, write_table
from pipelines.data import load_trees, record_input
from pipelines.models import load_predictor, unseen_policy
from pipelines.paths import log, run_dir, setup
from pipelines.tracking import Tracker, tracked_run


# --------------------------------------------------------------------------------- input
def input_trees(cfg: DictConfig, tracker: Tracker) -> tuple[list[Tree], Path | None, bool]:
    """The trees to predict, the file they came from (None when traced) and whether they
    were traced (static features only)."""
    if cfg.get("model"):
        shapes = parse_shapes(_plain(cfg.get("shapes")), cfg.batch_size, cfg.seq_len)
        convention = str(cfg.get("trace_convention") or "irene")
        log.info("tracing %s at %s (static features, %s convention)", cfg.model, shapes, convention)
        return trace_static(str(cfg.model), shapes, convention=convention), None, True
    if cfg.get("trees"):
        source = Path(cfg.trees)
        trees = read_trees(source)
        record_input(tracker, "trees", source, source="trees")
        return trees, source, False
    trees, source = load_trees(cfg, tracker, require_energy=False)
    return trees, source, False


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


# ------------------------------------------------------------------------------- outputs
def write_views(cfg: DictConfig, trees: list[Tree], directory: Path) -> list[Path]:
    """Explanation views of the first ``explain.max_trees`` trees; prints the text views."""
    ecfg = cfg.explain
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


# ------------------------------------------------------------------------------- the stage
def run(cfg: DictConfig) -> Path:
    """Returns the predictions file (``output``, default ``<run folder>/predictions.jsonl``)."""
    setup(cfg)
    folder = run_dir(cfg)
    out = Path(cfg.output) if cfg.output else folder / "predictions.jsonl"
    params = {"model_dir": str(cfg.model_dir), "model_run": str(cfg.get("model_run")),
              "model": str(cfg.get("model")), "unseen_op": unseen_policy(cfg) or ""}
    # packaging logs an MLflow model inside the run: the run must be this process's
    with tracked_run(cfg, "predict", params, background=not cfg.get("package")) as tracker:
        predictor, model_dir = load_predictor(cfg, folder / "downloaded", tracker)
        policy, model_uri = unseen_policy(cfg), None
        if cfg.get("package"):
            if not cfg.tracking.enabled:
                raise SettingsError("package=true logs an MLflow model: it needs tracking.enabled=true")
            model_uri = package(model_dir, policy, cfg.trace_convention)
        trees, source, traced = input_trees(cfg, tracker)
        tracker.log_params({"trees": str(source or "traced"), "predictor": type(predictor).__name__})
        filled, forest, fallback = predict_trees(predictor, trees, policy, static_only=traced)
        write_trees(out, filled, protect=[source] if source else [])
        by_type = fallback_summary(forest, fallback)
        log.info("predicted %d nodes of %d trees (%d with a fallback regressor: %s)",
                 forest.num_nodes, forest.num_trees, int(fallback.sum()), by_type or "none")
        tracker.log_metrics({"fallback_nodes": int(fallback.sum()), "trees": forest.num_trees})
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
        view_paths = write_views(cfg, filled, folder / "views")
        for path in artifacts:
            tracker.log_artifact(path, "predictions")
        if view_paths:
            tracker.log_artifact(folder / "views", "views")
    print(f"predictions: {out}")
    if model_uri:  # last: what `make serve MODEL=...` takes
        print(f"pyfunc model: {model_uri}  (serve it: make serve MODEL={model_uri})")
    return out
