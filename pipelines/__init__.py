"""Pipeline stages: plain functions of the composed Hydra config (``run(cfg)``), callable
from tests; ``run.py`` is the thin Hydra entry that dispatches to them."""
