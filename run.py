"""Entry point: ``python run.py stage=<name> [group=option ...]`` (add ``-m`` for a sweep)."""

from __future__ import annotations

import importlib

import hydra
from omegaconf import DictConfig

from pipelines.config import register_configs

STAGES = ("featurize", "train", "predict", "evaluate", "crossvalidate", "diagnose", "measure", "report",
          "whatif")

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    if cfg.stage not in STAGES:
        raise SystemExit(f"unknown stage {cfg.stage!r}: choose from {', '.join(STAGES)}")
    importlib.import_module(f"pipelines.{cfg.stage}").run(cfg)


if __name__ == "__main__":
    main()
