"""A predictor for one device built from other devices' measurements and a few of its own.

:class:`DevicePredictor` is what ``stage=transfer`` keeps for its target device: the static
IrEne+ of every source device (fitted on all of that device's trees) and, per source, the
correction learned from the target's measured trees (``irene.transfer``'s methods,
``type_scale`` by default). It predicts every node of any traced model on the target: each
source's corrected prediction, combined by their geometric mean. ``stage=predict device=<id>``
finds the newest one kept for that device; ``model_dir=<run folder>/model`` reads it like any
other trained predictor.

It is fitted by :meth:`DevicePredictor.fit_transfer` (sources and target apart), not by
``fit(forest)``: one forest cannot say which trees are the target's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from irene.data.forest import Forest
from irene.errors import InputError, SettingsError
from irene.predictors.base import OneOf, Predictor

#: Fitted attributes of the corrections that hold learned group scales.
_SCALE_FIELDS = ("leaf_scales_", "inner_scales_", "leaves_path_scales_", "scales_")


class DevicePredictor(Predictor):
    """Source devices' static predictors, each corrected to the target device.

    Args:
        device: the target device's id (as in its trees' ``device.id``).
        method: the correction (``irene.transfer.METHODS``: ``type_scale``, ``level_scale``).
        convention: the static-feature convention of the target's trees, so of the traced
            trees it predicts (``irene`` or ``physical``).
        sources: the source devices' ids, in the order of the fitted parts.
    """

    name = "device"
    configurable = False  # fitted by stage=transfer (fit_transfer), never from a config
    constraints = {"method": OneOf(("type_scale", "level_scale")),
                   "convention": OneOf(("irene", "physical"))}

    def __init__(self, device: str = "unknown", method: str = "type_scale",
                 convention: str = "irene", sources: Sequence[str] = ()):
        self.device = device
        self.method = method
        self.convention = convention
        self.sources = sources

    # ------------------------------------------------------------------------ fitting
    def fit(self, forest: Forest) -> DevicePredictor:
        raise SettingsError("a device predictor is fitted from source devices and the target's "
                            "measured trees: DevicePredictor.fit_transfer(sources, target), as "
                            "stage=transfer does")

    def fit_transfer(self, sources: Sequence[Forest], target: Forest) -> DevicePredictor:
        """Fit the static IrEne+ of every source forest, then its correction on ``target``
        (the target device's measured trees)."""
        from irene.transfer import Source, methods_by_name

        self.validate_params()
        if not sources:
            raise SettingsError("a device predictor needs at least one source device")
        if len(self.sources) not in (0, len(sources)):
            raise SettingsError(f"sources names {len(self.sources)} devices, got {len(sources)} "
                                "source forests")
        if not np.any(~np.isnan(target.gold_j)):
            raise InputError("the target's trees have no measured energy to learn a correction from")
        factory = methods_by_name([self.method])[self.method]
        self.static_, self.corrections_ = [], []
        for forest in sources:
            source = Source.fit(forest)
            correction = factory().fit(source, target)
            self.static_.append(source.predictor)
            self.corrections_.append(correction)
        self.features_ = list(self.static_[0].features_)
        self.leaf_models_ = dict(self.static_[0].leaf_models_)
        from irene.predictors.ranges import fit_ranges

        self.ranges_ = fit_ranges([*sources, target], self.features_)
        return self

    # ---------------------------------------------------------------------- prediction
    def predict(self, forest: Forest, *, return_fallback: bool = False):
        """Every node's energy (J) on the target device, in forest order."""
        self.check_fitted()
        from irene.transfer import geometric_mean

        corrected, fallback = [], np.zeros(forest.num_nodes, dtype=bool)
        for static, correction in zip(self.static_, self.corrections_, strict=True):
            pred, used_fallback = static.predict(forest, return_fallback=True)
            fallback |= np.asarray(used_fallback, dtype=bool)
            corrected.append(correction.predict(forest,
                                                source_pred=np.asarray(pred, dtype=np.float64)))
        pred = geometric_mean(corrected)
        return (pred, fallback) if return_fallback else pred

    # --------------------------------------------------------------------- persistence
    def _get_state(self) -> dict[str, Any]:
        return {"static": [{"params": s.get_params(deep=False), "state": s._get_state()}
                           for s in self.static_],
                "corrections": [_correction_state(c) for c in self.corrections_]}

    def _set_state(self, state: dict[str, Any]) -> None:
        from irene.predictors.irene_plus import IrenePlusPredictor

        self.static_ = []
        for part in state["static"]:
            static = IrenePlusPredictor(**part["params"])
            static._set_state(part["state"])
            self.static_.append(static)
        self.corrections_ = [_correction_from_state(c) for c in state["corrections"]]
        if len(self.static_) != len(self.corrections_) or not self.static_:
            raise ValueError("one correction per source predictor is needed")
        self.features_ = list(self.static_[0].features_)
        self.leaf_models_ = dict(self.static_[0].leaf_models_)


def _correction_state(correction) -> dict[str, Any]:
    """A fitted correction as JSON-able values: its class, its settings, its group scales."""
    from dataclasses import asdict

    settings = {k: v for k, v in vars(correction).items()
                if not k.endswith("_") and not k.startswith("_")}
    scales = {}
    for name in _SCALE_FIELDS:
        if hasattr(correction, name):
            fitted = asdict(getattr(correction, name))
            fitted["group_"] = [[lv, g, a] for (lv, g), a in fitted["group_"].items()]
            scales[name] = fitted
    return {"class": type(correction).__name__, "settings": settings, "scales": scales}


def _correction_from_state(state: dict[str, Any]):
    from irene import transfer

    cls = getattr(transfer, str(state["class"]), None)
    if not (isinstance(cls, type) and issubclass(cls, transfer.Correction)):
        raise ValueError(f"unknown correction {state['class']!r}")
    correction = cls(**state["settings"])
    for name, fitted in state["scales"].items():
        if name not in _SCALE_FIELDS:
            raise ValueError(f"unknown fitted field {name!r}")
        group = {(str(lv), str(g)): float(a) for lv, g, a in fitted["group_"]}
        setattr(correction, name, transfer.GroupScales(
            level_={str(k): float(v) for k, v in fitted["level_"].items()}, group_=group,
            slope_=float(fitted["slope_"]), center_=float(fitted["center_"])))
    correction.source_ = None  # predictions always pass the source's energies
    return correction
