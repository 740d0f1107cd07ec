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
``negative_energy``, ``is_total``); the row with ``is_total`` true is the model's root, i.e.
the total energy of that (model, batch size, sequence length). ``negative_energy`` marks a
prediction below zero: the predictor is extrapolating and the number is not an energy.

A request is checked before anything is traced (:class:`ServingLimits`): ``model`` must be a
registry name or a ``config.json`` inside an allow-listed folder (never any path on the
server), ``batch_size`` and ``seq_len`` are positive integers within the limits and
``seq_len`` within the model's position embeddings. A bad request fails with one message
naming the row and the field, and no server internals (paths, stack traces).

MLflow is imported only inside the functions that need it, so the rest of ``irene`` stays
importable without it.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from irene.data.architectures import MODEL_REGISTRY, max_positions
from irene.data.tree import FIELD_BOUNDS, Tree, iter_nodes_with_parent
from irene.errors import InputError, SettingsError, UserError, one_line
from irene.predictors.static import FALLBACK_FIELD, NEGATIVE_FIELD, predict_trees, trace_static

log = logging.getLogger(__name__)

SHAPE_COLUMNS = ("model", "batch_size", "seq_len")
NODE_COLUMNS = ("id", "parent_id", "type", "instance_type", "num_parameters", "flops",
                "mem_bytes")
OUTPUT_COLUMNS = ("model", "batch_size", "seq_len", "node_id", "scope", "parent_scope",
                  "node_type", "instance_type", "predicted_energy_j", "fallback",
                  "negative_energy", "is_total")


class RequestError(InputError):
    """A request the server refuses (its message is returned to the client as it is)."""


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
        max_nodes: node rows per request.
        model_dirs: folders whose ``config.json`` files (at any depth) may be named by
            ``model``; empty: registry names only.
    """

    max_batch_size: int = 1024
    max_seq_len: int = 8192
    max_tokens: int = 65_536
    max_rows: int = 64
    max_nodes: int = 200_000
    model_dirs: tuple[str, ...] = field(default_factory=tuple)

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
        for key in ("max_batch_size", "max_seq_len", "max_tokens", "max_rows", "max_nodes"):
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
                limits: ServingLimits | None = None) -> list[Tree]:
    """The trees an input DataFrame asks for (traced for shape rows, rebuilt for node rows),
    every row checked against ``limits`` first.

    Raises:
        RequestError: a column is missing, or a row asks for what the limits refuse.
    """
    limits = limits or ServingLimits()
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
    requests: dict[str, list[tuple[int, int]]] = {}
    for i, row in enumerate(frame[list(SHAPE_COLUMNS)].itertuples(index=False)):
        where = f"row {i}"
        model = check_model(row.model, limits, where)
        requests.setdefault(model, []).append(
            check_shape(model, row.batch_size, row.seq_len, limits, where))
    trees = []
    for model, shapes in requests.items():
        trees.extend(trace_static(model, shapes, convention=convention))
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
                         bool(node.get(NEGATIVE_FIELD, False)), parent < 0))
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
                  convention: str = "irene", limits: ServingLimits | None = None) -> pd.DataFrame:
    """Predict every node asked for by ``frame`` (see the module docstring)."""
    filled, _, _ = predict_trees(predictor, input_trees(frame, convention, limits), unseen_op,
                                 static_only=True)
    return output_frame(filled)


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
        return ServedError(f"error: {one_line(error)}", error_code=INVALID_PARAMETER_VALUE)
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

        def predict(self, context, model_input, params=None):
            unseen_op = (params or {}).get("unseen_op") or self.unseen_op
            try:
                return predict_frame(self.predictor, pd.DataFrame(model_input), unseen_op,
                                     self.convention, self.limits)
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

    columns = [ColSpec("string", "model"), ColSpec("long", "batch_size"),
               ColSpec("long", "seq_len")]
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


__all__ = ["RequestError", "ServingLimits", "input_trees", "log_pyfunc", "output_frame",
           "predict_frame", "python_model", "total_energy"]
