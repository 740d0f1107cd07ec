"""Entry point: ``python run.py stage=<name> [group=option ...]`` (add ``-m`` for a sweep)."""

from __future__ import annotations

import importlib
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from irene.data.published import DataFormatError, DataNotFoundError
from irene.data.tree import TreeFormatError
from pipelines.config import register_configs

STAGES = ("featurize", "train", "predict", "evaluate", "crossvalidate", "diagnose", "measure", "report",
          "whatif")
# bad input: one line, no traceback (a single run; a sweep's jobs report their own failures)
INPUT_ERRORS = (DataFormatError, DataNotFoundError, TreeFormatError, FileNotFoundError)

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    if cfg.stage not in STAGES:
        raise SystemExit(f"unknown stage {cfg.stage!r}: choose from {', '.join(STAGES)}")
    try:
        importlib.import_module(f"pipelines.{cfg.stage}").run(cfg)
    except INPUT_ERRORS as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
