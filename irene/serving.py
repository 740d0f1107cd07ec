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
``is_total``); the row with ``is_total`` true is the model's root, i.e. the total energy of
that (model, batch size, sequence length).

MLflow is imported only inside the functions that need it, so the rest of ``irene`` stays
importable without it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from irene.data.tree import Tree, iter_nodes_with_parent
from irene.predictors.static import FALLBACK_FIELD, predict_trees, trace_static

SHAPE_COLUMNS = ("model", "batch_size", "seq_len")
NODE_COLUMNS = ("id", "parent_id", "type", "instance_type", "num_parameters", "flops",
                "mem_bytes")
OUTPUT_COLUMNS = ("model", "batch_size", "seq_len", "node_id", "scope", "parent_scope",
                  "node_type", "instance_type", "predicted_energy_j", "fallback", "is_total")
ARTIFACT_KEY = "predictor"  # the predictor folder among the pyfunc model's artifacts
CODE_FILE = "irene_pyfunc_model.py"
# The models-from-code file: executed by MLflow when it loads the model.
MODEL_CODE = '''"""IrEne energy predictor as an MLflow pyfunc model (written by irene.serving)."""
import mlflow

from irene.serving import python_model

mlflow.models.set_model(python_model())
'''


# ---------------------------------------------------------------------------- the tables
def input_trees(frame: pd.DataFrame, convention: str = "irene") -> list[Tree]:
    """The trees an input DataFrame asks for (traced for shape rows, rebuilt for node rows).

    Raises:
        ValueError: a required column is missing.
    """
    missing = [c for c in SHAPE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"input lacks columns {missing}: give {list(SHAPE_COLUMNS)} per row, "
                         f"plus {list(NODE_COLUMNS)} for node rows")
    if "id" in frame.columns and frame["id"].notna().any():
        return trees_from_node_rows(frame)
    trees = []
    for model, group in frame.groupby("model", sort=False):
        shapes = list(zip(group["batch_size"].astype(int), group["seq_len"].astype(int),
                          strict=True))
        trees.extend(trace_static(str(model), shapes, convention=convention))
    return trees


def trees_from_node_rows(frame: pd.DataFrame) -> list[Tree]:
    """Rebuild trees from node rows (parents before children within each tree)."""
    missing = [c for c in NODE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"node rows lack columns {missing}")
    trees = []
    for (model, batch_size, seq_len), group in frame.groupby(list(SHAPE_COLUMNS), sort=False):
        nodes: dict[str, dict[str, Any]] = {}
        root = None
        for row in group.itertuples(index=False):
            node = {"id": str(row.id), "scope": str(getattr(row, "scope", None) or row.id),
                    "parent_name": None, "level": 0, "instance_type": str(row.instance_type),
                    "type": str(row.type), "num_parameters": float(row.num_parameters),
                    "flops": float(row.flops), "mem_bytes": float(row.mem_bytes),
                    "child_nodes_obj": [], "child_nodes": []}
            parent_id = row.parent_id if isinstance(row.parent_id, str) else ""
            if parent_id:
                if parent_id not in nodes:
                    raise ValueError(f"node {row.id!r}: parent {parent_id!r} not given before it")
                parent = nodes[parent_id]
                node["parent_name"], node["level"] = parent["scope"], parent["level"] + 1
                parent["child_nodes_obj"].append(node)
                parent["child_nodes"].append(node["scope"])
            elif root is None:
                root = node
            else:
                raise ValueError(f"{model} {batch_size}x{seq_len}: more than one root node")
            nodes[node["id"]] = node
        if root is None:
            raise ValueError(f"{model} {batch_size}x{seq_len}: no root (empty parent_id)")
        trees.append({"model_name": str(model), "batch_size": int(batch_size),
                      "seq_len": int(seq_len), "frontend_tree": root})
    return trees


def output_frame(trees: list[Tree]) -> pd.DataFrame:
    """One row per node of predicted trees (:data:`OUTPUT_COLUMNS`)."""
    rows = []
    for tree in trees:
        for node, parent, _ in iter_nodes_with_parent(tree["frontend_tree"]):
            rows.append((tree["model_name"], int(tree["batch_size"]), int(tree["seq_len"]),
                         node["id"], node["scope"], node.get("parent_name") or "",
                         node["type"], node["instance_type"], float(node["predicted_energy"]),
                         bool(node.get(FALLBACK_FIELD, False)), parent < 0))
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
                  convention: str = "irene") -> pd.DataFrame:
    """Predict every node asked for by ``frame`` (see the module docstring)."""
    filled, _, _ = predict_trees(predictor, input_trees(frame, convention), unseen_op,
                                 static_only=True)
    return output_frame(filled)


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

        def predict(self, context, model_input, params=None):
            unseen_op = (params or {}).get("unseen_op") or self.unseen_op
            return predict_frame(self.predictor, pd.DataFrame(model_input), unseen_op,
                                 self.convention)

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
               registered_model_name: str | None = None):
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

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` loads it with ``mlflow.pyfunc.load_model``).
    """
    import mlflow

    from irene import predictors

    predictor = predictors.load(model_dir)
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
            model_config={"unseen_op": unseen_op or "", "trace_convention": trace_convention},
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


__all__ = ["input_trees", "log_pyfunc", "output_frame", "predict_frame", "python_model",
           "total_energy"]
