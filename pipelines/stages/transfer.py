"""``stage=transfer``: a new device from k of its measurements (a learning curve).

    python run.py stage=transfer source=device_1 target=device_2 'shots=[0,1,2,4,8,16]' draws=5

``source`` is a device (or a list of devices), ``target`` a device or a trees file; devices are
found by the usual rule (``$IRENE_DATA_DIR`` holding ``device_1/`` and ``device_2/``, the
project's ``datasets/``, or a download). For each target model left out and each k, ``draws``
times: k configurations of the target's other models are drawn, every method is fitted on
the source(s) and those k, and the left-out model's target trees are predicted
(:func:`irene.transfer.learning_curve`). Outputs, in the run folder:

* ``transfer.csv`` / ``.md`` / ``.tex``: the default method (``methods[0]``), one row per k:
  ``shots``, ``ml``, ``module``, ``model`` (mean % error) and their ``_sd`` over draws;
* ``transfer_methods.csv`` / ``.md``: every method, the target's own leave-one-model-out
  (``target_lomo``, the ceiling) included;
* ``transfer.png``: error against k per node level, with its spread;
* ``model/``: with ``keep_model=true`` (default) and a default method that corrects a source
  (``type_scale``, ``level_scale``), the target's predictor fitted on all the sources' trees and
  *every* target tree given (:class:`irene.predictors.device.DevicePredictor`); logged as the
  artifact ``model`` and tagged ``transfer.device=<target id>``, so
  ``stage=predict model=<any model> device=<target id>`` finds it.

MLflow: the stage's run, and one child run per method with its errors logged per k (step).
The last line printed is the path of ``transfer.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any  # noqa: UP035 - OmegaConf needs typing.Any

from irene.data.tree import ERROR_COLUMNS
from irene.errors import SettingsError
from pipelines.paths import log
from pipelines.stage import Context, Stage

if TYPE_CHECKING:
    from irene.data.tree import Tree
    from pipelines.tracking import Tracker

COLUMNS = ["shots", *ERROR_COLUMNS, *(f"{c}_sd" for c in ERROR_COLUMNS)]


@dataclass
class TransferSettings:
    source: Any = None  # a device name (device_1), a trees file, or a list of them
    target: str | None = None  # a device name or a trees file of the new device
    shots: list[Any] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16])  # k ('all' too)
    draws: int = 5  # draws of k configurations per k (k = 0 and 'all': one)
    draw_seed: int = 0  # seed of the draws
    # methods compared (irene/transfer.py METHODS), the first one is the default
    methods: list[str] = field(default_factory=lambda: ["type_scale", "level_scale", "target_only"])
    # keep the target's predictor (sources + every target tree, the default method) for
    # `stage=predict device=<target id>`; false: the learning curve only
    keep_model: bool = True


def name_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def device_trees(ctx: Context, tracker: Tracker, name: str, role: str) -> list[Tree]:
    """The trees of a device (its published CSVs, located as for ``data=``) or of a trees file."""
    from irene.data.tree import read_trees
    from pipelines.data import read_identified, record_input

    path = Path(name)
    if path.suffix == ".jsonl" or path.is_file():
        if not path.is_file():
            raise SettingsError(f"{role}={name}: no such trees file")
        digest = record_input(tracker, role, path, source=role)  # and <role>.device
        return read_identified(read_trees(path, require_energy=True), path, digest, None,
                               tracker, role)
    return ctx.for_device(name).load_trees(tracker)[0]


def run_name(ctx: Context, settings: TransferSettings) -> str:
    return f"transfer {'+'.join(name_list(settings.source))} -> {settings.target}"


def check_request(settings: TransferSettings
                  ) -> tuple[list[str], str, list[int | str], int, list[str]]:
    sources, target = name_list(settings.source), settings.target
    if not sources or not target:
        raise SettingsError("stage=transfer needs source=<device or [devices]> and "
                            "target=<device or trees file>, e.g. source=device_1 target=device_2")
    if str(target) in sources:
        raise SettingsError(f"target={target} is also a source: choose another device")
    shots = list(settings.shots)
    bad = [k for k in shots if not (k == "all" or (isinstance(k, int) and k >= 0))]
    if not shots or bad:
        raise SettingsError(f"shots={shots}: must be a non-empty list of counts >= 0 (or 'all')")
    if int(settings.draws) < 1:
        raise SettingsError(f"draws={settings.draws}: must be at least 1")
    return sources, str(target), shots, int(settings.draws), name_list(settings.methods)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """Error against k per node level (one panel each), a line per method with its sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from irene.data.io import atomic_write_bytes

    fig, axes = plt.subplots(1, len(ERROR_COLUMNS), figsize=(4.2 * len(ERROR_COLUMNS), 3.6))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for axis, level in zip(axes, ERROR_COLUMNS, strict=True):
        for method in methods:
            points = [r for r in rows if r["method"] == method and isinstance(r["shots"], int)]
            if points:
                axis.errorbar([r["shots"] for r in points], [r[level] for r in points],
                              yerr=[r[f"{level}_sd"] for r in points], marker="o", capsize=3,
                              label=method, linestyle="-" if method == methods[0] else "--")
            ceiling = [r[level] for r in rows if r["method"] == method and r["shots"] == "all"]
            if ceiling and not points:
                axis.axhline(ceiling[0], color="grey", linestyle=":", label=f"{method} (all)")
        axis.set_title(level)
        axis.set_xlabel("k (measured configurations of the target)")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mean abs % error (left-out model)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


#: Default methods that correct a source device, so can be kept as a device's predictor.
KEEPABLE = ("type_scale", "level_scale")
#: The MLflow tag naming the device a transfer run's kept predictor is for.
DEVICE_TAG = "transfer.device"


@dataclass
class KeptModel:
    path: Path
    device_id: str


def keep_model(source_trees: list[list[Tree]], target_trees: list[Tree], sources: list[str],
               method: str, folder: Path, tracker: Tracker) -> KeptModel:
    """Fit the target's predictor on all source trees and every target tree; save and log it."""
    from irene.data.forest import build_forest
    from irene.data.provenance import device_ids
    from irene.predictors.device import DevicePredictor

    ids = device_ids(target_trees)
    if len(ids) != 1:
        raise SettingsError(f"target: its trees are of several devices {list(ids)}; a kept "
                            "predictor is for one device (keep_model=false for the curve only)")
    conventions = {str((t.get("device") or {}).get("convention") or "physical")
                   for t in target_trees}
    convention = conventions.pop() if len(conventions) == 1 else "physical"
    source_ids = ["+".join(device_ids(trees)) for trees in source_trees]
    log.info("fitting %s's predictor on %s and all %d target trees", ids[0], "+".join(sources),
             len(target_trees))
    predictor = DevicePredictor(device=ids[0], method=method, convention=convention,
                                sources=source_ids)
    predictor.fit_transfer([build_forest(trees) for trees in source_trees],
                           build_forest(target_trees))
    predictor.save(folder)
    tracker.log_artifact(folder, "model")
    tracker.set_tags({DEVICE_TAG: ids[0]})
    return KeptModel(folder, ids[0])


def run(ctx: Context, settings: TransferSettings) -> Path:
    """Returns the path of ``transfer.csv``."""
    import pandas as pd

    from irene.tables import Table, to_latex, write_table
    from irene.transfer import learning_curve, methods_by_name

    sources, target, shots, draws, names = check_request(settings)
    methods = methods_by_name(names)  # an unknown name fails here, before any data is read
    out = ctx.run_dir
    params = {"source": sources, "target": target, "shots": shots, "draws": draws,
              "methods": names, "draw_seed": int(settings.draw_seed)}
    with ctx.tracked_run(params) as tracker:
        source_trees = [device_trees(ctx, tracker, name, "source") for name in sources]
        target_trees = device_trees(ctx, tracker, target, "target")
        if "calibrated_pool" in names:  # one predictor fitted on source and target trees
            from irene.data.provenance import check_one_convention

            check_one_convention(dict(zip([*sources, target], [*source_trees, target_trees],
                                          strict=True)), f"methods={names}: calibrated_pool",
                                 "or leave calibrated_pool out (the other methods fit each "
                                 "device apart: a source's convention differing from the "
                                 "target's is learnt by the correction)")
        log.info("transfer %s -> %s: shots %s, %d draws, methods %s", sources, target, shots,
                 draws, names)
        rows = learning_curve(source_trees if len(source_trees) > 1 else source_trees[0],
                              target_trees, shots=shots, draws=draws, seed=int(settings.draw_seed),
                              methods=methods)
        frame = pd.DataFrame(rows)
        default = frame[frame["method"] == names[0]][COLUMNS].set_index("shots")
        table = Table.from_frame(default)
        paths = write_table(table, out, "transfer")
        title = f"{' + '.join(sources)} -> {target}: {names[0]}, {draws} draws"
        paths.append(Path(out / "transfer.tex"))
        from irene.data.io import atomic_write_text

        atomic_write_text(paths[-1], to_latex(table, f"Transfer {title} (mean abs % error)") + "\n")
        every = frame.set_index(["method", "shots"])[[c for c in frame.columns
                                                      if c not in ("method", "shots")]]
        paths += write_table(Table.from_frame(every), out, "transfer_methods")
        paths.append(plot(rows, out / "transfer.png", title))
        for path in paths:
            tracker.log_artifact(path, "report")
        for method in frame["method"].unique():
            with tracker.child_run("transfer-method", f"method {method}", {"method": method}) as child:
                for row in (r for r in rows if r["method"] == method):
                    step = row["shots"] if isinstance(row["shots"], int) else max(
                        [k for k in shots if isinstance(k, int)], default=0) + 1
                    child.log_metrics({c: row[c] for c in ERROR_COLUMNS}, step=step)
        tracker.log_metrics({f"k{k}_{c}": float(default.loc[k, c]) for k in default.index
                             if isinstance(k, int) for c in ERROR_COLUMNS})
        model_dir = None
        if settings.keep_model and names[0] in KEEPABLE:
            model_dir = keep_model(source_trees, target_trees, sources, names[0], out / "model",
                                   tracker)
    print(f"Transfer {title}: mean % error on the left-out model")
    from irene.tables import fold_spread, to_markdown

    print(to_markdown(fold_spread(table)))
    if model_dir is not None:
        print(f"predictor for {model_dir.device_id}: {model_dir.path}  (stage=predict "
              f"model=<name> device={model_dir.device_id})")
    print(f"transfer table: {out / 'transfer.csv'}")
    return out / "transfer.csv"


STAGE = Stage("transfer", TransferSettings, run, run_name=run_name)
