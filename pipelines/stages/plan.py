"""``stage=plan``: which k configurations of a new GPU to measure first.

    python run.py stage=plan k=4 'models=[bert-base-uncased,gpt2,llama-small]'

Traces every (model, batch size, sequence length) of the candidate grid (static features, no
GPU), predicts each node's energy with the static IrEne+ of every ``source`` device (default:
``[device_1, device_2]``), and picks k configurations with :func:`irene.shots.pick_shots`:
first those whose kinds of node (primitive types, module classes) not yet covered carry the
most energy, then the sizes farthest from those picked. Writes ``plan.csv`` / ``.md`` (one row
per pick, in order: what it adds) into the run folder, logged to MLflow; the last line printed
is the ``stage=measure configs=[...]`` command that measures them. Then ``stage=transfer``
with the measured trees as ``target`` keeps the new device's predictor (docs/transfer.md).

Defaults: the eight models of the H200 data set (``datasets/h200``), batch sizes [8, 32],
sequence lengths [64, 128, 256].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any  # noqa: UP035 - OmegaConf needs typing.Any

from irene.errors import SettingsError
from pipelines.paths import log
from pipelines.stage import Context, Stage

DEFAULT_SOURCES = ["device_1", "device_2"]
DEFAULT_MODELS = ["bert-base-uncased", "distilbert-base-uncased", "roberta-base", "gpt2",
                  "distilgpt2", "openai-gpt", "bert-large-uncased", "llama-small"]
DEFAULT_BATCH_SIZES = [8, 32]
DEFAULT_SEQ_LENS = [64, 128, 256]


@dataclass
class PlanSettings:
    source: Any = None  # a device name (device_1), a trees file, or a list of them
    models: list[str] | None = None  # models compared side by side (default: [model])
    batch_sizes: list[int] | None = None  # batch sizes (default: [batch_size])
    seq_lens: list[int] | None = None  # sequence lengths (default: [seq_len])
    k: int = 4  # plan: configurations to pick for a new GPU


def check_request(settings: PlanSettings) -> tuple[list[str], list[str], list[int], list[int], int]:
    from pipelines.stages.transfer import name_list

    sources = name_list(settings.source) or list(DEFAULT_SOURCES)
    models = [str(m) for m in (settings.models or DEFAULT_MODELS)]
    batch_sizes = [int(b) for b in (settings.batch_sizes or DEFAULT_BATCH_SIZES)]
    seq_lens = [int(s) for s in (settings.seq_lens or DEFAULT_SEQ_LENS)]
    candidates = len(models) * len(batch_sizes) * len(seq_lens)
    if not 1 <= int(settings.k) <= candidates:
        raise SettingsError(f"k={settings.k}: must be between 1 and the {candidates} candidate "
                            "configurations (models × batch_sizes × seq_lens)")
    return sources, models, batch_sizes, seq_lens, int(settings.k)


def run_name(ctx: Context, settings: PlanSettings) -> str:
    return f"plan k={settings.k}"


def run(ctx: Context, settings: PlanSettings) -> Path:
    """Returns the path of ``plan.csv``."""
    import pandas as pd

    from irene.data.forest import build_forest
    from irene.predictors.static import trace_static
    from irene.shots import node_groups, pick_shots
    from irene.tables import Table, to_markdown, write_table
    from irene.transfer import Source, geometric_mean
    from pipelines.stages.transfer import device_trees

    sources, models, batch_sizes, seq_lens, k = check_request(settings)
    params = {"source": sources, "models": models, "batch_sizes": batch_sizes,
              "seq_lens": seq_lens, "k": k}
    with ctx.tracked_run(params) as tracker:
        source_trees = [device_trees(ctx, tracker, name, "source") for name in sources]
        conventions = {str((t.get("device") or {}).get("convention") or "irene")
                       for trees in source_trees for t in trees}
        if len(conventions) > 1:
            raise SettingsError(f"source={sources}: their trees are of static-feature conventions "
                                f"{sorted(conventions)}; plan from sources of one convention")
        convention = conventions.pop()
        fitted = [Source.fit(trees) for trees in source_trees]
        shapes = [(b, s) for b in batch_sizes for s in seq_lens]
        trees = []
        for model in models:
            log.info("tracing %s at %d shapes (%s convention)", model, len(shapes), convention)
            trees.extend(trace_static(model, shapes, convention=convention))
        forest = build_forest(trees)
        energy = geometric_mean([s.predict(forest) for s in fitted])
        picked = pick_shots(forest, k, energy)
        groups = node_groups(forest)
        covered: set[str] = set()
        rows = []
        for rank, tree in enumerate(picked, start=1):
            nodes = slice(forest.offsets[tree], forest.offsets[tree + 1])
            kinds = set(groups[nodes].tolist())
            new = sorted(kinds - covered)
            covered |= kinds
            name, batch, seq = (forest.model_names[tree], int(forest.batch_sizes[tree]),
                                int(forest.seq_lens[tree]))
            rows.append({"rank": rank, "config": f"{name}@{batch}x{seq}", "model": name,
                         "batch_size": batch, "seq_len": seq,
                         "predicted_energy_j": float(energy[forest.offsets[tree]]),
                         "new_kinds": len(new), "kinds_covered": len(covered),
                         "example_new": ", ".join(new[:3])})
        frame = pd.DataFrame(rows).set_index("rank")
        paths = write_table(Table.from_frame(frame), ctx.run_dir, "plan", floatfmt=".4g")
        for path in paths:
            tracker.log_artifact(path, "plan")
        tracker.log_metrics({"candidates": forest.num_trees,
                             "kinds": int(len(set(groups.tolist()))),
                             "kinds_covered": len(covered)})
    print(f"{k} of {forest.num_trees} configurations, covering {len(covered)} of "
          f"{len(set(groups.tolist()))} kinds of node:")
    print(to_markdown(Table.from_frame(frame.drop(columns=["model", "batch_size", "seq_len"]))))
    print(f"plan: {ctx.run_dir / 'plan.csv'}")
    configs = ",".join(r["config"] for r in rows)
    print(f"python run.py stage=measure 'configs=[{configs}]'")
    return ctx.run_dir / "plan.csv"


STAGE = Stage("plan", PlanSettings, run, run_name=run_name)
