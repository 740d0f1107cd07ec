"""The run folder Hydra is about to create, known before Hydra writes into it.

Hydra creates a single run's folder and writes ``.hydra/*.yaml`` and its log there before the
stage starts. When one of those writes fails (a full disk), Hydra has already forgotten its
config; :class:`RunFolderCallback` (a Hydra callback, listed in ``conf/config.yaml``) records
the folder when the run starts, so ``run.py`` can remove what Hydra left half-written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

_STARTED: list[Path] = []  # the folder of this process's single run, once Hydra starts it


class RunFolderCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _STARTED[:] = [Path(str(config.hydra.run.dir)).absolute()]


def remove_if_only_hydras(job_name: str = "run") -> Path | None:
    """Remove the started run folder when it holds only what Hydra writes before a stage
    starts (``.hydra/``, ``<job>.log``); returns the folder removed, else None."""
    if not _STARTED:
        return None
    folder = _STARTED[0]
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {".hydra", f"{job_name}.log"}:
        shutil.rmtree(folder, ignore_errors=True)
        return folder
    return None
