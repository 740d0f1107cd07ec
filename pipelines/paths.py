"""Where the pipeline writes, and the per-process runtime set-up of every stage.

``outputs/`` is located here and nowhere else: ``$IRENE_OUTPUTS`` if set, else ``outputs/``
in the current folder. The Hydra config reads it through the ``${outputs:}`` resolver
(registered by :func:`pipelines.config.register_configs`), so run folders, sweep folders,
the MLflow store, caches, measured trees and tables all move together.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger("irene")


def outputs_dir() -> Path:
    """The folder of run folders, the MLflow store, caches and tables."""
    return Path(os.environ.get("IRENE_OUTPUTS") or Path.cwd() / "outputs").absolute()


def datasets_dir() -> Path:
    """Where downloaded device data land (``datasets/<device>/`` next to ``outputs/``)."""
    return outputs_dir().parent / "datasets"


def run_dir(cfg: DictConfig) -> Path:
    """The folder this stage writes into: ``cfg.run_dir``, else Hydra's run folder."""
    explicit = cfg.get("run_dir")
    if explicit:
        path = Path(explicit)
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            path = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:  # not under @hydra.main (e.g. a test): a fresh folder
            stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
            path = outputs_dir() / "runs" / f"{stamp}_{cfg.stage}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def setup(cfg: DictConfig) -> None:
    """Check the settings (one line naming the first bad one), then set the logging format
    and thread count, once per stage."""
    from pipelines.config import check_settings

    check_settings(cfg)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s",
                        datefmt="%H:%M:%S")
    threads = int(cfg.get("threads") or 0)
    if not threads and (cfg.get("stage") != "measure" or _parallel_launcher()):
        # the predictors' arithmetic is on small matrices: more BLAS threads only spin against
        # the tracking worker and the jobs running side by side (measured: one thread is as
        # fast as two for a cross-validation). Measuring keeps the libraries' default, unless
        # measurements run side by side.
        threads = 1
    if threads:
        from irene.threads import limit_threads

        limit_threads(threads)


def _parallel_launcher() -> bool:
    """Whether this job runs under a launcher that runs jobs in parallel on this machine."""
    try:
        from hydra.core.hydra_config import HydraConfig

        target = str(HydraConfig.get().launcher.get("_target_", ""))
    except (ValueError, ImportError):
        return False
    return "Joblib" in target or "Submitit" in target
