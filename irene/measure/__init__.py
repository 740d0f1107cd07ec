"""Measurement: trace a transformer into an IrEne tree, count FLOPs and bytes, measure energy.

* :mod:`irene.data.architectures`: paper models built from config classes (random weights; shared).
* :mod:`irene.measure.trace`: one forward pass -> tree of modules and ML primitives.
* :mod:`irene.measure.flops`: explicit FLOP and byte formulas per primitive.
* :mod:`irene.measure.settings`: protocol and meter settings (the config schema's defaults).
* :mod:`irene.measure.meters`: NVML, RAPL, their sum, simulated, replayed, null: one interface.
* :mod:`irene.measure.protocol`: isolated, counter-aligned, repeated measurement of every node.
* :mod:`irene.measure.summary`: the one-line summary of a measured configuration.
* :mod:`irene.measure.leakage`: refuse a feature that is the ground truth itself.
* :mod:`irene.measure.store`: crash-safe, resumable ``trees.jsonl`` appends.

Names are imported lazily, so ``irene.measure.settings`` (used by the Hydra schema) does not
pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MODEL_REGISTRY": "irene.data.architectures",
    "config_from_name": "irene.data.architectures",
    "model_from_name": "irene.data.architectures",
    "EnergyMeter": "irene.measure.meters",
    "DeviceCounter": "irene.measure.meters",
    "meter_for_device": "irene.measure.meters",
    "ProtocolSettings": "irene.measure.settings",
    "MeterSettings": "irene.measure.settings",
    "measure_trace": "irene.measure.protocol",
    "measure_nodes": "irene.measure.protocol",
    "append_record": "irene.measure.store",
    "has_record": "irene.measure.store",
    "Trace": "irene.measure.trace",
    "trace_model": "irene.measure.trace",
    "trace_to_record": "irene.measure.trace",
    "trace_tree": "irene.measure.trace",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'irene.measure' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
