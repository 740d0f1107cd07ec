"""``stage=crossvalidate``: leave-one-model-out cross-validation, one MLflow parent run and a
child run per fold; writes ``crossvalidation.csv`` (columns left_out_model, ml, module, model).

On a data set of several devices (``data.devices=[device_1,device_2]``, or a trees file of
several) ``cv_group`` says what a fold leaves out (:func:`irene.evaluate.crossval.cv_folds`):
``model`` (the default) one model on one device, named ``<device>:<model>``, trained on the
other models of every device (the left-out model's trees on the other devices stay out: they
share its static features); ``device`` one device, trained on the others (column
``left_out_device``). On one device's data ``cv_group=model`` is the plain leave-one-model-out.
``seeds`` repeat the plain leave-one-model-out only.

With ``seeds`` (``seeds=5`` or ``seeds=[1,2,3]``) every fold is fit once per seed (the seed
set as the predictor's ``seed``): one child run per seed and fold, the parent's metrics the
mean over seeds (``overall_model``) and the standard deviation over seeds
(``overall_model_sd``); ``crossvalidation.csv`` gains the ``<type>_sd`` columns and
``crossvalidation_seeds.csv`` holds every (seed, fold). A predictor whose result does not
depend on a seed is fit once and says so (tag ``seed_dependent=false``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any  # noqa: UP035 - OmegaConf needs typing.Any

from irene.data.tree import ERROR_COLUMNS
from irene.tables import Table
from pipelines.config import seed_list, seeds_request
from pipelines.paths import log
from pipelines.stage import Context, Stage, predictor_run_name

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from pipelines.tracking import Tracker


@dataclass
class CrossValidateSettings:
    # crossvalidate, report: repeat every cross-validation over seeds: null (one run with
    # predictor.seed), k (predictor.seed, +1, ..., +k-1) or a list of seeds; report: which runs
    seeds: Any = None
    cv_jobs: int = 1  # crossvalidate with seeds: folds fitted in parallel processes (-1: all cores)
    save_predictions: bool = False  # also write the out-of-fold predicted trees (14 MB)
    skip_not_applicable: bool = False  # a predictor that cannot use these features: skip, not fail
    cv_group: str = "model"  # what a fold leaves out: model (on each device) | device
    # crossvalidate: train IrEne's folds together (one shared expansion, one product per tree
    # for all folds: about 10x faster at 96 models; equal to fold by fold to rounding only, which
    # end-to-end training amplifies into the 2nd decimal on device 2; docs/performance.md)
    cv_together: bool = False


# from this many models the fold-by-fold log suggests cv_together (24 synthetic models: 4x)
TOGETHER_HINT_MODELS = 24


@dataclass
class CrossValidationReport:
    """What a cross-validation wrote; ``table`` (a pandas frame, built when first asked for):
    rows: left-out models + "overall"; columns: ml, module, model (None when skipped)."""

    result: Table | None
    csv_path: Path | None  # None when the predictor does not apply (skip_not_applicable)
    predictions_path: Path | None  # out-of-fold predicted trees (save_predictions=true)

    @cached_property
    def table(self) -> pd.DataFrame | None:
        return None if self.result is None else self.result.to_frame()


def _resumed(ctx: Context, out: Path) -> CrossValidationReport | None:
    """The report of an identical, already FINISHED run (``resume=true``), else None."""
    previous = ctx.finished_run()
    if previous is None:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = previous.info.run_id
    if "not_applicable" in previous.data.tags:  # skipped then: nothing to read, skipped again
        log.warning("resume: identical config FINISHED in run %s as not applicable (%s); "
                    "skipping", run_id, previous.data.tags["not_applicable"])
        return CrossValidationReport(result=None, csv_path=None, predictions_path=None)
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="report/crossvalidation.csv", dst_path=str(out))
    except MlflowException as error:
        log.warning("resume: run %s has no readable crossvalidation.csv (%s); running again",
                    run_id, str(error).splitlines()[0])
        return None
    log.info("resume: identical config already FINISHED in run %s; skipping", run_id)
    import pandas as pd

    table = Table.from_frame(pd.read_csv(path, index_col=0))  # left_out_model or _device
    print(f"crossvalidation table: {path}")
    return CrossValidationReport(result=table, csv_path=Path(path), predictions_path=None)


@dataclass
class _SeededTable:
    table: Table  # means over seeds, then the <type>_sd columns
    predicted_j: np.ndarray  # out-of-fold predictions of the first seed


def _seeded(settings: CrossValidateSettings, tracker: Tracker, out: Path, forest, predictor,
            seeds: list[int]) -> _SeededTable:
    """Leave-one-model-out once per seed: a child run per (seed, fold), the seeds' table."""
    def on_fold(seed: int | None, left_out: str, errors: dict[str, float]) -> None:
        log.info("seed %-6s left out %-24s ml %.2f  module %.2f  model %.2f", seed, left_out,
                 *(errors.get(t, float("nan")) for t in ERROR_COLUMNS))
        params = {"left_out_model": left_out} | ({} if seed is None else {"seed": seed})
        name = f"fold {left_out}" + ("" if seed is None else f" seed {seed}")
        with tracker.child_run("crossvalidate-fold", name, params) as fold:
            fold.log_metrics(errors)

    from irene.data.io import atomic_write_text
    from irene.evaluate.crossval import SeededCrossValidationResult, seeded_leave_one_model_out

    result: SeededCrossValidationResult = seeded_leave_one_model_out(
        forest, predictor, seeds, n_jobs=int(settings.cv_jobs), on_fold=on_fold)
    if not result.seed_dependent:
        log.info("predictor %r does not depend on a seed with these settings: fit once, "
                 "spread 0 (not %d identical times)", predictor.name, len(seeds))
    tracker.set_tags({"seed_dependent": str(result.seed_dependent).lower()})
    tracker.log_params({"num_seeds": result.num_seeds, "seeds_run": result.seeds})
    seeds_csv = atomic_write_text(out / "crossvalidation_seeds.csv",
                                  result.folds.to_csv(index=False, float_format="%.4f"))
    tracker.log_artifact(seeds_csv, "report")
    return _SeededTable(table=Table.from_frame(result.table()), predicted_j=result.predicted_j)


def run(ctx: Context, settings: CrossValidateSettings) -> CrossValidationReport:
    from irene.data.forest import fill_predictions
    from irene.data.tree import write_trees
    from irene.errors import SettingsError
    from irene.evaluate.crossval import cross_validate
    from irene.predictors.base import NotApplicableError, clone
    from irene.tables import fold_spread, to_markdown, write_table

    out = ctx.run_dir
    resumed = _resumed(ctx, out)
    if resumed is not None:
        return resumed
    request = seeds_request(settings.seeds)
    group = str(settings.cv_group)
    params = (ctx.run_params() | ({} if request is None else {"seeds": request})
              | ({} if group == "model" else {"cv_group": group}))
    with ctx.tracked_run(params) as tracker:
        # a bad hyperparameter or seed fails here, before any data is read, as a FAILED run
        predictor = ctx.build_predictor(show_progress=False)
        seeds = seed_list(settings.seeds, ctx.predictor_seed)
        if seeds is not None and settings.cv_together:
            raise SettingsError("cv_together=true trains one cross-validation's folds together; "
                                "with seeds, leave it unset")
        if seeds is not None and predictor.uses_seed():
            for seed in seeds:
                clone(predictor).set_params(seed=seed).validate_params()
        data = ctx.load_forest(tracker)
        forest = data.forest
        devices = forest.device_names()
        if seeds is not None and (group != "model" or len(devices) > 1):
            raise SettingsError(f"seeds={request}: repeats the leave-one-model-out of one "
                                f"device only (this data set: {'+'.join(devices)}, "
                                f"cv_group={group}); leave seeds unset")
        models = list(dict.fromkeys(forest.model_names))
        what = "device" if group == "device" else "model"
        log.info("leave-one-%s-out over %d models on %s, %d trees, %d nodes", what, len(models),
                 "+".join(devices), forest.num_trees, forest.num_nodes)
        tracker.log_params({"models": models, "num_trees": forest.num_trees})
        if (len(models) >= TOGETHER_HINT_MODELS and not settings.cv_together and seeds is None
                and group == "model" and len(devices) == 1
                and getattr(predictor, "trains_folds_together", lambda: False)()):
            log.info("%d models fitted fold by fold; cv_together=true trains the folds together, "
                     "several times faster at this size (equal to rounding: docs/performance.md)",
                     len(models))

        def on_fold(left_out: str, errors: dict[str, float], predictor: object) -> None:
            log.info("left out %-24s ml %.2f  module %.2f  model %.2f", left_out,
                     *(errors.get(t, float("nan")) for t in ERROR_COLUMNS))
            with tracker.child_run("crossvalidate-fold", f"fold {left_out}",
                                   {f"left_out_{what}": left_out}) as fold:
                fold.log_metrics(errors)

        try:
            if seeds is None:
                result = cross_validate(forest, predictor, group,
                                        show_progress=ctx.show_progress, on_fold=on_fold,
                                        together=settings.cv_together)
            else:
                result = _seeded(settings, tracker, out, forest, predictor, seeds)
        except NotApplicableError as error:
            if not settings.skip_not_applicable:
                raise
            log.warning("not applicable, skipped: %s", error)
            tracker.set_tags({"not_applicable": str(error)[:500]})
            return CrossValidationReport(result=None, csv_path=None, predictions_path=None)
        table = result.grid if seeds is None else result.table
        csv_path = out / "crossvalidation.csv"
        write_table(table, out, "crossvalidation")
        overall = result.overall() if seeds is None else table.row("overall")
        tracker.log_metrics({f"overall_{k}": v for k, v in overall.items()})
        tracker.log_artifact(csv_path, "report")
        tracker.log_artifact(out / "crossvalidation.md", "report")
        predictions = None
        if settings.save_predictions:
            predictions = write_trees(out / "predictions.jsonl",
                                      fill_predictions(data.trees(), forest, result.predicted_j),
                                      protect=[data.source])
            tracker.log_artifact(predictions, "predictions")
    print(f"Percentage error - leave-one-{what}-out cross-validation")
    print(to_markdown(fold_spread(table)))
    print(f"crossvalidation table: {csv_path}")
    return CrossValidationReport(result=table, csv_path=csv_path, predictions_path=predictions)


STAGE = Stage("crossvalidate", CrossValidateSettings, run,
              not_hashed=("cv_jobs", "skip_not_applicable"), run_name=predictor_run_name("cv"))
