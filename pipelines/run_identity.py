"""Run identity and resume: what makes two runs of a stage the same computation.

A run is tagged with :func:`config_hash` (everything that determines its result) and
:data:`CODE_TAG` (:func:`code_identity`: which code computed it); ``resume=true`` reuses the
latest FINISHED run with both equal (:func:`finished_run`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CODE_TAG = "irene.code"


def config_hash(cfg: DictConfig, stage: str) -> str:
    """A digest of everything that determines a run's result: the shared keys and the stage's
    own (:func:`pipelines.stage.hashed_keys`), not where it is logged nor another stage's
    settings. An unset ``seeds`` is left out, so single-seed runs keep the hash they had
    before it."""
    from pipelines.stage import hashed_keys

    container = OmegaConf.to_container(cfg, resolve=True)
    kept = {k: container[k] for k in hashed_keys(cfg, stage)
            if k in container and not (k == "seeds" and container[k] is None)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.cache
def code_identity() -> str:
    """Which code computes: the version, and in a git checkout the commit, plus a digest of
    the uncommitted changes to the code and configs (``+dirty.<sha>``). Resume reuses only
    runs of the same code: a changed predictor must not be answered by an old result."""
    from irene import __version__

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True,
                                  timeout=30).stdout.decode("utf-8", "replace")
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return __version__  # an installed package
    identity = f"{__version__}+{commit.strip()[:12]}"
    diff = git("diff", "HEAD", "--", "irene", "pipelines", "conf", "run.py")
    if diff:
        identity += f"+dirty.{hashlib.sha256(diff.encode()).hexdigest()[:12]}"
    return identity


def identity_tags(cfg: DictConfig, stage: str) -> dict[str, str]:
    """The tags by which :func:`finished_run` finds a run of ``stage`` again."""
    return {"stage": stage, "config_hash": config_hash(cfg, stage), CODE_TAG: code_identity()}


def finished_run(cfg: DictConfig, stage: str):
    """The latest FINISHED run of ``stage`` with this exact config and code
    (:func:`code_identity`), when ``resume`` is on."""
    if not (cfg.get("resume") and cfg.tracking.enabled):
        return None
    import mlflow

    from pipelines.tracking import ensure_experiment

    experiment_id = ensure_experiment(cfg)
    found = mlflow.search_runs(
        experiment_ids=[experiment_id], output_format="list", max_results=1,
        filter_string=(f"tags.stage = '{stage}' and tags.config_hash = '{config_hash(cfg, stage)}' "
                       f"and tags.`{CODE_TAG}` = '{code_identity()}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"])
    return found[0] if found else None
