"""Measurement: trace a transformer into an IrEne tree, count FLOPs and bytes, measure energy.

* :mod:`irene.data.architectures`: paper models built from config classes (random weights; shared).
* :mod:`irene.measure.trace`: one forward pass -> tree of modules and ML primitives.
* :mod:`irene.measure.flops`: explicit FLOP and byte formulas per primitive.
* :mod:`irene.measure.meters`: NVML, RAPL and null energy meters behind one interface.
* :mod:`irene.measure.protocol`: isolated, windowed, repeated measurement of every node.
* :mod:`irene.measure.store`: crash-safe, resumable ``trees.jsonl`` appends.
"""

from __future__ import annotations

from irene.data.architectures import MODEL_REGISTRY, config_from_name, model_from_name
from irene.measure.meters import EnergyMeter, make_meter
from irene.measure.protocol import ProtocolSettings, measure_trace
from irene.measure.store import append_record, has_record
from irene.measure.trace import Trace, trace_model, trace_to_record, trace_tree

__all__ = [
    "MODEL_REGISTRY",
    "EnergyMeter",
    "ProtocolSettings",
    "Trace",
    "append_record",
    "config_from_name",
    "has_record",
    "make_meter",
    "measure_trace",
    "model_from_name",
    "trace_model",
    "trace_to_record",
    "trace_tree",
]
