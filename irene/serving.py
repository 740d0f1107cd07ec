"""A trained predictor as an MLflow pyfunc model (models-from-code), and the tables it serves.

Input: a DataFrame in one of two forms.

* **shape rows**: columns ``model`` (a registry name or a ``config.json`` path, as
  :func:`irene.data.architectures.model_from_name` takes), ``batch_size``, ``seq_len``; every row
  is traced (static features, no meter) and predicted.
* **node rows**: one row per node of already traced trees: ``model``, ``batch_size``,
  ``seq_len``, ``id``, ``parent_id`` (empty for the root), ``type`` (model | module | ml),
  ``instance_type``, ``num_parameters``, ``flops`` (MFLOP), ``mem_bytes`` (MiB), optional
  ``scope``; parents before children.

Output: one row per node (``model``, ``batch_size``, ``seq_len``, ``node_id``, ``scope``,
``parent_scope``, ``node_type``, ``instance_type``, ``predicted_energy_j``, ``fallback``,
``negative_energy``, ``out_of_range``, ``is_total``); the row with ``is_total`` true is the
model's root, i.e. the total energy of that (model, batch size, sequence length).
``negative_energy`` marks a prediction below zero: the predictor is extrapolating and the
number is not an energy. ``out_of_range`` names the node's features outside the range the
predictor was fitted on (comma-separated; empty when inside).

A request is checked before anything is traced (:class:`ServingLimits`): ``model`` must be a
registry name or a ``config.json`` inside an allow-listed folder (never any path on the
server), ``batch_size`` and ``seq_len`` are positive integers within the limits and
``seq_len`` within the model's position embeddings. A bad request fails with one message
naming the row and the field, and no server internals (paths, stack traces).

A request's work is bounded: at most ``max_concurrent`` requests compute at once in one server
process (one more is refused at once with HTTP 503, so no request waits in a queue), and a
request that computes past its time budget (``max_seconds``, or MLflow's
``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` when shorter) stops between two rows and answers
504. ``python -m irene.serving -m models:/<id>`` serves the model with MLflow's own scoring app
behind :func:`clean_errors`, which also turns MLflow's own error bodies (bad CSV or JSON, a
wrong content type, its timeout) into one line without a stack trace (``mlflow models serve``
attaches ``stack_trace`` to a CSV it cannot parse, and no setting of MLflow 3.17 turns it off).

MLflow is imported only inside the functions that need it, so the rest of ``irene`` stays
importable without it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from irene.data.architectures import MODEL_REGISTRY, max_positions
from irene.data.tree import FIELD_BOUNDS, Tree, iter_nodes_with_parent
from irene.errors import InputError, SettingsError, UserError, one_line
from irene.predictors.static import (
    FALLBACK_FIELD,
    NEGATIVE_FIELD,
    OUT_OF_RANGE_FIELD,
    predict_trees,
    trace_static,
)

log = logging.getLogger(__name__)

SHAPE_COLUMNS = ("model", "batch_size", "seq_len")
NODE_COLUMNS = ("id", "parent_id", "type", "instance_type", "num_parameters", "flops",
                "mem_bytes")
OUTPUT_COLUMNS = ("model", "batch_size", "seq_len", "node_id", "scope", "parent_scope",
                  "node_type", "instance_type", "predicted_energy_j", "fallback",
                  "negative_energy", "out_of_range", "is_total")


class RequestError(InputError):
    """A request the server refuses (its message is returned to the client as it is)."""

    error_code = "INVALID_PARAMETER_VALUE"  # HTTP 400


class ServerBusyError(RequestError):
    """``max_concurrent`` requests are already computing: retry later (HTTP 503)."""

    error_code = "TEMPORARILY_UNAVAILABLE"


class RequestTimeoutError(RequestError):
    """The request's time budget ran out; its work stopped (HTTP 504)."""

    error_code = "DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class ServingLimits:
    """What one request may ask for (``model_config["limits"]`` of the logged model).

    Attributes:
        max_batch_size: inputs per forward pass.
        max_seq_len: tokens per input (also at most the model's position embeddings).
        max_tokens: ``batch_size × seq_len`` of one row. Rows are traced on the ``meta``
            device, so a row's memory does not grow with its shape or model size (the
            values a branch reads, a few integers per token, are computed on the CPU).
        max_rows: shape rows per request.
        max_nodes: node rows per request (16 trees of bert-large, the registry's largest,
            are 6688).
        model_dirs: folders whose ``config.json`` files (at any depth) may be named by
            ``model``; empty: registry names only.
        max_seconds: time budget of one request; the work stops between two rows (one row
            is one trace, at most about 2 s for the registry's largest model) once it is spent.
            MLflow's ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` (default 60 s) caps it too.
        max_concurrent: requests computing at once in one server process; one more is
            refused at once (HTTP 503). With ``max_rows`` this bounds the process's memory.
        max_body_bytes: largest request body :func:`clean_errors` lets through (HTTP 413):
            MLflow reads and parses a body before the model sees it, so this bounds that work
            (``max_nodes`` node rows of JSON are about 2 MB).
    """

    max_batch_size: int = 1024
    max_seq_len: int = 8192
    max_tokens: int = 65_536
    max_rows: int = 16
    max_nodes: int = 8192
    model_dirs: tuple[str, ...] = field(default_factory=tuple)
    max_seconds: int = 50
    max_concurrent: int = 2
    max_body_bytes: int = 2 * 2**20

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> ServingLimits:
        """Limits from a JSON-able dict (unknown keys are an error)."""
        values = dict(config or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise SettingsError(f"serving limits: unknown keys {unknown}; known: "
                                f"{sorted(cls.__dataclass_fields__)}")
        if "model_dirs" in values:
            values["model_dirs"] = tuple(str(d) for d in values["model_dirs"] or ())
        limits = cls(**values)
        for key in ("max_batch_size", "max_seq_len", "max_tokens", "max_rows", "max_nodes",
                    "max_seconds", "max_concurrent", "max_body_bytes"):
            value = getattr(limits, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"serving limits: {key}={value!r}: must be a positive integer")
        return limits

    def to_config(self) -> dict[str, Any]:
        return {**asdict(self), "model_dirs": list(self.model_dirs)}


def check_model(name: Any, limits: ServingLimits, where: str) -> str:
    """``name`` if it is a registry name or a ``config.json`` inside an allowed folder."""
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}: field 'model': must be a model name, got {name!r}")
    if name in MODEL_REGISTRY:
        return name
    if limits.model_dirs:
        path = Path(name)
        if path.name != "config.json":
            path = path / "config.json"
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            resolved = None
        for folder in limits.model_dirs:
            if resolved is not None and resolved.is_relative_to(Path(folder).resolve()):
                return str(resolved)
    allowed = " or a config.json in an allowed folder" if limits.model_dirs else ""
    raise RequestError(f"{where}: field 'model': {name!r} is not a served model; use one of "
                       f"{', '.join(sorted(MODEL_REGISTRY))}{allowed}")


def _check_int(value: Any, field_name: str, high: int, where: str) -> int:
    number = value.item() if hasattr(value, "item") else value
    if (isinstance(number, bool) or not isinstance(number, int | float)
            or not math.isfinite(number) or int(number) != number or not 1 <= number <= high):
        raise RequestError(f"{where}: field {field_name!r}: must be an integer in [1, {high}], "
                           f"got {number!r}")
    return int(number)


def check_shape(model: str, batch_size: Any, seq_len: Any, limits: ServingLimits,
                where: str) -> tuple[int, int]:
    """``(batch_size, seq_len)`` as integers within the limits and the model's positions."""
    batch_size = _check_int(batch_size, "batch_size", limits.max_batch_size, where)
    longest = max_positions(model)
    high = limits.max_seq_len if longest is None else min(limits.max_seq_len, longest)
    seq_len = _check_int(seq_len, "seq_len", high, where)
    if batch_size * seq_len > limits.max_tokens:
        raise RequestError(f"{where}: batch_size × seq_len = {batch_size * seq_len}: at most "
                           f"{limits.max_tokens} tokens per row")
    return batch_size, seq_len


class Deadline:
    """A request's time budget: :meth:`check` raises :class:`RequestTimeoutError` once spent."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def check(self) -> None:
        if self.end is not None and time.monotonic() > self.end:
            raise RequestTimeoutError(f"the request took more than {self.seconds:g} s and was "
                                      "stopped: ask for fewer rows per request")


def server_timeout() -> float | None:
    """MLflow's scoring-server timeout (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``), if set."""
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    try:
        value = float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


ARTIFACT_KEY = "predictor"  # the predictor folder among the pyfunc model's artifacts
CODE_FILE = "irene_pyfunc_model.py"
# The models-from-code file: executed by MLflow when it loads the model.
MODEL_CODE = '''"""IrEne energy predictor as an MLflow pyfunc model (written by irene.serving)."""
import mlflow

from irene.serving import python_model

mlflow.models.set_model(python_model())
'''


# ---------------------------------------------------------------------------- the tables
def input_trees(frame: pd.DataFrame, convention: str = "irene",
                limits: ServingLimits | None = None,
                deadline: Deadline | None = None) -> list[Tree]:
    """The trees an input DataFrame asks for (traced for shape rows, rebuilt for node rows),
    every row checked against ``limits`` first; identical rows are traced once.

    Raises:
        RequestError: a column is missing, or a row asks for what the limits refuse.
        RequestTimeoutError: ``deadline`` passed (checked before each trace).
    """
    limits = limits or ServingLimits()
    deadline = deadline or Deadline(None)
    if not isinstance(frame, pd.DataFrame):
        raise RequestError("input must be a table with columns "
                           f"{list(SHAPE_COLUMNS)} (JSON dataframe_split/records, or CSV)")
    missing = [c for c in SHAPE_COLUMNS if c not in frame.columns]
    if missing:
        raise RequestError(f"input lacks columns {missing}: give {list(SHAPE_COLUMNS)} per row, "
                           f"plus {list(NODE_COLUMNS)} for node rows")
    if "id" in frame.columns and frame["id"].notna().any():
        return trees_from_node_rows(frame, limits)
    if len(frame) > limits.max_rows:
        raise RequestError(f"{len(frame)} rows: at most {limits.max_rows} shapes per request")
    if frame.empty:
        raise RequestError("no rows: give one row per (model, batch_size, seq_len)")
    rows = []
    for i, row in enumerate(frame[list(SHAPE_COLUMNS)].itertuples(index=False)):
        where = f"row {i}"
        model = check_model(row.model, limits, where)
        rows.append((model, *check_shape(model, row.batch_size, row.seq_len, limits, where)))
    traced: dict[tuple[str, int, int], Tree] = {}
    trees = []
    for model, batch_size, seq_len in rows:
        key = (model, batch_size, seq_len)
        if key not in traced:
            deadline.check()
            traced[key] = trace_static(model, [(batch_size, seq_len)], convention=convention)[0]
            trees.append(traced[key])
        else:  # prediction writes into the tree: a copy per row
            trees.append(copy.deepcopy(traced[key]))
    return trees


def _node_number(row: Any, name: str, where: str) -> float:
    value = getattr(row, name)
    value = value.item() if hasattr(value, "item") else value
    low, high, unit = FIELD_BOUNDS[name]
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or not low <= value <= high):
        raise RequestError(f"{where}: field {name!r}: must be a number in [{low:g}, {high:g}] "
                           f"{unit}, got {value!r}")
    return float(value)


def trees_from_node_rows(frame: pd.DataFrame, limits: ServingLimits | None = None) -> list[Tree]:
    """Rebuild trees from node rows (parents before children within each tree)."""
    limits = limits or ServingLimits()
    missing = [c for c in NODE_COLUMNS if c not in frame.columns]
    if missing:
        raise RequestError(f"node rows lack columns {missing}")
    if len(frame) > limits.max_nodes:
        raise RequestError(f"{len(frame)} node rows: at most {limits.max_nodes} per request")
    trees = []
    for (model, batch_size, seq_len), group in frame.groupby(list(SHAPE_COLUMNS), sort=False):
        where = f"node rows of {model} {batch_size}x{seq_len}"
        if not isinstance(model, str) or not model:
            raise RequestError(f"{where}: field 'model': must be a name, got {model!r}")
        batch_size = _check_int(batch_size, "batch_size", limits.max_batch_size, where)
        seq_len = _check_int(seq_len, "seq_len", limits.max_seq_len, where)
        nodes: dict[str, dict[str, Any]] = {}
        root = None
        for row in group.itertuples(index=False):
            at = f"node {row.id!r}"
            if str(row.type) not in ("model", "module", "ml"):
                raise RequestError(f"{at}: field 'type': choose from ['model', 'module', 'ml'], "
                                   f"got {row.type!r}")
            node = {"id": str(row.id), "scope": str(getattr(row, "scope", None) or row.id),
                    "parent_name": None, "level": 0, "instance_type": str(row.instance_type),
                    "type": str(row.type),
                    **{name: _node_number(row, name, at)
                       for name in ("num_parameters", "flops", "mem_bytes")},
                    "child_nodes_obj": [], "child_nodes": []}
            if node["id"] in nodes:
                raise RequestError(f"{at}: field 'id': given twice")
            parent_id = row.parent_id if isinstance(row.parent_id, str) else ""
            if parent_id:
                if parent_id not in nodes:
                    raise RequestError(f"{at}: parent {parent_id!r} not given before it")
                parent = nodes[parent_id]
                node["parent_name"], node["level"] = parent["scope"], parent["level"] + 1
                parent["child_nodes_obj"].append(node)
                parent["child_nodes"].append(node["scope"])
            elif root is None:
                root = node
            else:
                raise RequestError(f"{where}: more than one root node")
            nodes[node["id"]] = node
        if root is None:
            raise RequestError(f"{where}: no root (empty parent_id)")
        tree = {"model_name": str(model), "batch_size": batch_size, "seq_len": seq_len,
                "frontend_tree": root}
        _check_tree_shape(tree, where)
        trees.append(tree)
    return trees


def _check_tree_shape(tree: Tree, where: str) -> None:
    """A leaf must be an ``ml`` node and an ``ml`` node a leaf (as in any trees file)."""
    from irene.data.tree import TreeFormatError, validate_tree

    try:
        validate_tree(tree, where)
    except TreeFormatError as error:
        raise RequestError(str(error)) from None


def output_frame(trees: list[Tree]) -> pd.DataFrame:
    """One row per node of predicted trees (:data:`OUTPUT_COLUMNS`)."""
    rows = []
    for tree in trees:
        for node, parent, _ in iter_nodes_with_parent(tree["frontend_tree"]):
            rows.append((tree["model_name"], int(tree["batch_size"]), int(tree["seq_len"]),
                         node["id"], node["scope"], node.get("parent_name") or "",
                         node["type"], node["instance_type"], float(node["predicted_energy"]),
                         bool(node.get(FALLBACK_FIELD, False)),
                         bool(node.get(NEGATIVE_FIELD, False)),
                         ",".join(node.get(OUT_OF_RANGE_FIELD) or ()), parent < 0))
    return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def node_rows(trees: list[Tree]) -> pd.DataFrame:
    """Traced trees as node-row input (the inverse of :func:`trees_from_node_rows`)."""
    rows = []
    for tree in trees:
        ids: list[str] = []
        for node, parent, _ in iter_nodes_with_parent(tree["frontend_tree"]):
            ids.append(node["id"])
            rows.append({"model": tree["model_name"], "batch_size": int(tree["batch_size"]),
                         "seq_len": int(tree["seq_len"]), "id": node["id"],
                         "parent_id": "" if parent < 0 else ids[parent],
                         "scope": node["scope"], "type": node["type"],
                         "instance_type": node["instance_type"],
                         **{f: float(node.get(f) or 0.0) for f in NODE_COLUMNS[4:]}})
    return pd.DataFrame(rows)


def predict_frame(predictor, frame: pd.DataFrame, unseen_op: str | None = None,
                  convention: str = "irene", limits: ServingLimits | None = None,
                  deadline: Deadline | None = None) -> pd.DataFrame:
    """Predict every node asked for by ``frame`` (see the module docstring)."""
    deadline = deadline or Deadline(None)
    trees = input_trees(frame, convention, limits, deadline)
    deadline.check()
    filled, _, _ = predict_trees(predictor, trees, unseen_op, static_only=True)
    deadline.check()
    return output_frame(filled)


class ComputeSlots:
    """At most ``size`` requests compute at once; one more is refused at once (never queued:
    MLflow runs each request in a thread of a small pool, and a request waiting there would
    still start computing after its client was answered 504)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self.busy = 0
        self.peak = 0  # most requests computing at once since start

    def __enter__(self) -> ComputeSlots:
        if not self._slots.acquire(blocking=False):
            raise ServerBusyError(f"the server is computing {self.size} requests already: "
                                  "retry later")
        with self._lock:
            self.busy += 1
            self.peak = max(self.peak, self.busy)
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.busy -= 1
        self._slots.release()


def served_error(error: BaseException):
    """The MLflow exception a request gets for ``error``: a user error's own one line as a
    bad request, anything else a generic message (details only in the server's log)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

    class ServedError(MlflowException):
        """Keeps its message: MLflow's scoring server would prefix the whole request to it."""

        @property
        def message(self) -> str:
            return self._irene_message

        @message.setter
        def message(self, value: str) -> None:
            if not hasattr(self, "_irene_message"):
                self._irene_message = value

    if isinstance(error, UserError):
        from mlflow.protos import databricks_pb2

        code = getattr(databricks_pb2, getattr(error, "error_code", ""), INVALID_PARAMETER_VALUE)
        return ServedError(f"error: {one_line(error)}", error_code=code)
    log.error("prediction failed", exc_info=error)
    return ServedError("error: the server could not predict this request (see its log)",
                       error_code=INTERNAL_ERROR)


# ------------------------------------------------------------------------------- pyfunc
def python_model():
    """The pyfunc model object (a ``mlflow.pyfunc.PythonModel``); used by the code file."""
    import mlflow.pyfunc

    class IrenePyfuncModel(mlflow.pyfunc.PythonModel):
        """Loads the predictor folder from the artifacts; predicts per node."""

        def load_context(self, context) -> None:
            from irene import predictors

            self.predictor = predictors.load(context.artifacts[ARTIFACT_KEY])
            config = context.model_config or {}
            self.unseen_op = config.get("unseen_op") or None
            self.convention = config.get("trace_convention") or "irene"
            self.limits = ServingLimits.from_config(config.get("limits"))
            self.slots = ComputeSlots(self.limits.max_concurrent)

        def predict(self, context, model_input, params=None):
            unseen_op = (params or {}).get("unseen_op") or self.unseen_op
            budget = [t for t in (self.limits.max_seconds, server_timeout()) if t]
            try:
                if not isinstance(model_input, pd.DataFrame):
                    model_input = pd.DataFrame(model_input)
                with self.slots:
                    return predict_frame(self.predictor, model_input, unseen_op,
                                         self.convention, self.limits,
                                         Deadline(min(budget) if budget else None))
            except Exception as error:
                raise served_error(error) from None

    return IrenePyfuncModel()


def example_input(model: str = "tiny/bert") -> pd.DataFrame:
    """The logged input example: two shapes of one model."""
    return pd.DataFrame({"model": [model, model], "batch_size": [1, 2], "seq_len": [8, 16]})


def signature(example: pd.DataFrame, example_output: pd.DataFrame | None):
    """Input schema: the shape columns (required) and node columns (optional); output schema
    from the example's prediction; one optional param ``unseen_op``."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    # optional for MLflow: a missing column reaches the model, which names it in one line
    columns = [ColSpec("string", "model", required=False),
               ColSpec("long", "batch_size", required=False),
               ColSpec("long", "seq_len", required=False)]
    columns += [ColSpec("string", name, required=False)
                for name in ("id", "parent_id", "scope", "type", "instance_type")]
    columns += [ColSpec("double", name, required=False) for name in NODE_COLUMNS[4:]]
    outputs = None if example_output is None else infer_signature(example, example_output).outputs
    params = ParamSchema([ParamSpec("unseen_op", "string", "")])
    return ModelSignature(inputs=Schema(columns), outputs=outputs, params=params)


def log_pyfunc(model_dir: str | Path, name: str = "irene_predictor", *,
               unseen_op: str | None = None, trace_convention: str = "irene",
               example_model: str = "tiny/bert",
               registered_model_name: str | None = None,
               limits: ServingLimits | dict | None = None):
    """Log a trained predictor folder as an MLflow pyfunc model (models-from-code).

    Args:
        model_dir: folder written by ``stage=train`` (``predictors.load`` reads it).
        name: the logged model's name.
        unseen_op: default policy for unseen primitive types (see
            :func:`irene.predictors.static.predict_with_policy`); a request can override it with the
            ``unseen_op`` param.
        trace_convention: static-feature convention used when shape rows are traced on the
            server (``irene`` for a predictor trained on the published data).
        example_model: model of the input example (traced when the signature is made).
        registered_model_name: also register the model under this name.
        limits: what one request may ask for (:class:`ServingLimits`; default its defaults).

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` loads it with ``mlflow.pyfunc.load_model``).
    """
    import mlflow

    from irene import predictors

    predictor = predictors.load(model_dir)
    limits = limits if isinstance(limits, ServingLimits) else ServingLimits.from_config(limits)
    example = example_input(example_model)
    try:
        example_output = predict_frame(predictor, example, unseen_op, trace_convention)
    except ValueError:  # e.g. the policy refuses the example's primitives: no output schema
        example_output = None
    with tempfile.TemporaryDirectory() as tmp:
        code_path = Path(tmp) / CODE_FILE
        code_path.write_text(MODEL_CODE)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(code_path),
            artifacts={ARTIFACT_KEY: str(Path(model_dir).resolve())},
            model_config={"unseen_op": unseen_op or "", "trace_convention": trace_convention,
                          "limits": limits.to_config()},
            input_example=example, signature=signature(example, example_output),
            registered_model_name=registered_model_name,
            pip_requirements=_requirements())


def _requirements() -> list[str]:
    """The serving environment's packages (``irene`` itself must be installed there)."""
    from importlib import metadata

    names = ("mlflow", "numpy", "pandas", "torch", "transformers", "irene-pipeline")
    out = []
    for name in names:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def total_energy(frame: pd.DataFrame) -> pd.DataFrame:
    """Total predicted energy per (model, batch size, sequence length) of an output frame."""
    totals = frame[frame["is_total"]]
    return totals[["model", "batch_size", "seq_len", "predicted_energy_j"]].reset_index(drop=True)


# ------------------------------------------------------------------------------ server
# MLflow's own error bodies, by the start of their message, as one line for the client.
MLFLOW_ERRORS = (
    ("Failed to parse input as a Pandas DataFrame", "the body is not a CSV table: give a header "
     "line model,batch_size,seq_len and one line per shape"),
    ("Ensure that input is a valid UTF-8", "the body is not UTF-8 text"),
    ("Ensure that input is a valid JSON", "the body is not valid JSON: give "
     '{"dataframe_split": {"columns": [...], "data": [...]}} or {"dataframe_records": [...]}'),
    ("Data is not compatible with model signature", "a column has the wrong type: model is "
     "text, batch_size and seq_len are integers"),
    ("Failed to predict data", "the input does not match the model's signature: columns model "
     "(text), batch_size and seq_len (integers)"),
)
GENERIC_ERRORS = {
    400: "the body is not a table of model, batch_size, seq_len rows (see docs/predict.md)",
    404: "no such endpoint: POST /invocations, GET /ping, /health or /version",
    405: "no such endpoint: POST /invocations, GET /ping, /health or /version",
    411: "give the body's Content-Length",
    413: "the body is larger than {max_body_bytes} bytes",
    415: "Content-Type must be application/json or text/csv (UTF-8)",
    504: "the request took longer than the server's timeout and was stopped",
}
CODES = {404: "ENDPOINT_NOT_FOUND", 405: "ENDPOINT_NOT_FOUND", 413: "REQUEST_LIMIT_EXCEEDED",
         503: "TEMPORARILY_UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def clean_error_body(status: int, body: bytes, limits: ServingLimits) -> bytes:
    """One-line JSON ``{"error_code", "message"}`` for an error response of the scoring app:
    the model's own ``error: ...`` message is kept, MLflow's are replaced by a fixed line;
    nothing else (``stack_trace``, the echoed request) goes out."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    parsed = parsed if isinstance(parsed, dict) else {}
    message = parsed.get("message") if isinstance(parsed.get("message"), str) else ""
    code = parsed.get("error_code") if isinstance(parsed.get("error_code"), str) else None
    if not (message.startswith("error: ") and "\n" not in message):
        told = message.removeprefix("Invalid input. ")
        fixed = next((text for start, text in MLFLOW_ERRORS if told.startswith(start)), None)
        if fixed is None and status in GENERIC_ERRORS:
            fixed = GENERIC_ERRORS[status]
        elif fixed is None:
            fixed = ("the server could not answer this request" if status >= 500
                     else GENERIC_ERRORS[400])
        message = "error: " + fixed.replace("{max_body_bytes}", str(limits.max_body_bytes))
    fallback = CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")
    code = code if code and code.isupper() and len(code) < 64 else fallback
    return json.dumps({"error_code": code, "message": message}).encode()


def clean_errors(app, limits: ServingLimits | None = None):
    """An ASGI app around MLflow's scoring ``app``: a body over ``limits.max_body_bytes`` (or
    without a Content-Length) is refused before it is read, and every error response's body
    becomes :func:`clean_error_body`'s one line."""
    limits = limits or ServingLimits()

    async def send_error(send, status: int) -> None:
        body = clean_error_body(status, b"", limits)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        if scope["method"] == "POST":
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            if length is None or not length.isdigit():
                return await send_error(send, 411)
            if int(length) > limits.max_body_bytes:
                return await send_error(send, 413)
        start: dict = {}
        chunks: list[bytes] = []

        async def filtered_send(message):
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    start["pass"] = True
                    return await send(message)
                start.update(message)
                return None
            if start.get("pass") or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return None
            body = clean_error_body(start["status"], b"".join(chunks), limits)
            headers = [(k, v) for k, v in start.get("headers", [])
                       if k.lower() not in (b"content-length", b"content-type")]
            await send({"type": "http.response.start", "status": start["status"],
                        "headers": [*headers, (b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        return await app(scope, receive, filtered_send)

    return wrapped


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5001) -> None:
    """Serve ``model_uri`` with MLflow's scoring app (what ``mlflow models serve`` runs: the
    same ``/invocations``, ``/ping``, formats and ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``)
    behind :func:`clean_errors`, in this one process."""
    import mlflow.pyfunc
    import uvicorn
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(model_uri)
    limits = ServingLimits.from_config((model.model_config or {}).get("limits"))
    uvicorn.run(clean_errors(scoring_server.init(model), limits), host=host, port=port,
                workers=1, log_level="warning")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m irene.serving", description=serve.__doc__)
    parser.add_argument("-m", "--model-uri", required=True, help="models:/<id> (stage=predict "
                        "package=true prints it) or a model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    serve(args.model_uri, args.host, args.port)


if __name__ == "__main__":
    main()


__all__ = ["RequestError", "RequestTimeoutError", "ServerBusyError", "ServingLimits",
           "clean_errors", "input_trees", "log_pyfunc", "output_frame",
           "predict_frame", "python_model", "total_energy"]
