"""Registry of predictors: anything with ``fit(forest) -> self``,
``predict(forest, return_fallback=False)`` (one energy in joules per node; with
``return_fallback`` also the mask of leaves predicted by a fallback regressor),
``save(dir)`` writing a ``config.json`` with a ``predictor`` field, and ``load(dir)``.

``predictor=<name>`` in the Hydra config picks one; ``options`` carries the predictor's own
settings beside the shared IrEne hyperparameters.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from irene.model import IreneConfig, IreneModel

Builder = Callable[[IreneConfig, dict[str, Any]], Any]
_REGISTRY: dict[str, tuple[Builder, type]] = {}


def register(name: str, cls: type, builder: Builder | None = None) -> None:
    """Make ``predictor=name`` build ``builder(config, options)`` (default ``cls(config)``);
    ``cls.load(dir)`` must read back what ``save`` wrote."""
    _REGISTRY[name] = (builder or (lambda config, options: cls(config)), cls)


def names() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, config: IreneConfig, options: dict[str, Any] | None = None):
    if name not in _REGISTRY:
        raise ValueError(f"unknown predictor {name!r}: choose from {names()}")
    return _REGISTRY[name][0](config, dict(options or {}))


def load(directory: str | Path):
    """Load any registered predictor from the folder its ``save`` wrote."""
    meta = json.loads((Path(directory) / "config.json").read_text())
    name = meta.get("predictor", "irene")
    if name not in _REGISTRY:
        raise ValueError(f"{directory}/config.json: field 'predictor': unknown {name!r}, "
                         f"known: {names()}")
    return _REGISTRY[name][1].load(directory)


register("irene", IreneModel)

# Baselines and the improved predictor (irene/baselines.py, irene/plus.py); their options
# come from ``predictor.options`` as keyword arguments.
from irene.baselines import FlatPredictor, PhysicsPredictor, SumOfChildrenPredictor  # noqa: E402
from irene.plus import IrenePlusPredictor  # noqa: E402

register("physics", PhysicsPredictor, lambda config, options: PhysicsPredictor(config, **options))
register("flat", FlatPredictor, lambda config, options: FlatPredictor(config, **options))
register("sum_of_children", SumOfChildrenPredictor,
         lambda config, options: SumOfChildrenPredictor(config, **options))
register("irene_plus", IrenePlusPredictor,
         lambda config, options: IrenePlusPredictor(config, **options))
