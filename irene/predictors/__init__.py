"""Predictors: scikit-learn estimators over a :class:`~irene.data.forest.Forest`.

* :class:`~irene.predictors.irene.IreneModel` (``irene``): the paper's model;
* :class:`~irene.predictors.irene_plus.IrenePlusPredictor` (``irene_plus``);
* the baselines of :mod:`irene.predictors.baselines` (``physics``, ``flat``, ``sum_of_children``).

Every one is built by ``hydra.utils.instantiate`` from ``conf/predictor/<name>.yaml`` and
read back from disk by :func:`load`.
"""

from irene.predictors.base import NotApplicableError, NotFittedError, Predictor, load
from irene.predictors.baselines import FlatPredictor, PhysicsPredictor, SumOfChildrenPredictor
from irene.predictors.irene import IreneModel
from irene.predictors.irene_plus import IrenePlusPredictor


def classes() -> dict[str, type[Predictor]]:
    """Every predictor class of this package that a config can build, by its name (``irene``,
    ``flat``, ...): not :class:`~irene.predictors.device.DevicePredictor`, which only
    ``stage=transfer`` fits."""
    found, todo = {}, list(Predictor.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        if cls.name and cls.__module__.startswith(__name__) and cls.configurable:
            found[cls.name] = cls
    return dict(sorted(found.items()))


__all__ = ["classes", "FlatPredictor", "IreneModel", "IrenePlusPredictor", "NotApplicableError",
           "NotFittedError", "PhysicsPredictor", "Predictor", "SumOfChildrenPredictor", "load"]
