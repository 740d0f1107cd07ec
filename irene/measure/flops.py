"""Explicit FLOP and byte counts for the torch operations a transformer forward pass calls.

Every count is a formula of the operands' shapes, written out per primitive below, so that a
reader can check it by hand. Conventions (they follow the published IrEne data, so that
features of newly measured trees are comparable with the published ones):

* A multiply-add counts as 2 FLOPs. ``matmul``-like work (linear, conv1d/addmm, matmul, bmm,
  einsum, the two products inside scaled-dot-product attention) is ``2 * M * K * N``; it is
  also reported separately as ``matmul_flops``.
* A bias add, residual add, scaling, masking or any other elementwise arithmetic op costs
  1 FLOP per output element.
* ``softmax``: 5 FLOPs per element (max, subtract, exp, sum, divide).
* ``layer_norm``: 8 FLOPs per element (mean, subtract, square, variance sum, add eps and
  rsqrt amortised, normalise, scale, shift) -- the published data's constant.
* ``rms_norm``: 4 FLOPs per element (square, mean, normalise, scale).
* ``tanh`` and ``sigmoid``: 4 FLOPs per element; ``gelu``: 6 (erf form) or 8 (tanh form);
  ``silu``: 5; ``relu``: 1. A module computing GELU from elementary ops (``NewGELU``) is
  the sum of those ops.
* Reductions (sum, mean, max, var, ...) cost 1 FLOP per input element.
* ``embedding`` is a gather: 0 FLOPs.
* Views, shape queries, dtype/device queries and indexing views cost nothing; copies
  (``contiguous``, ``to``, ``cat``, ...) cost 0 FLOPs but move bytes.

Bytes are "bytes read + bytes written": the sum of the sizes of the tensor operands and of the
tensor results of every op that is not a view. Embedding reads only the gathered rows, not
the whole table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

# Ops that never move data or compute (views, metadata, shape arithmetic).
_FREE_OPS = frozenset(
    {
        "view",
        "reshape",
        "transpose",
        "permute",
        "t",
        "expand",
        "expand_as",
        "unsqueeze",
        "squeeze",
        "flatten",
        "unflatten",
        "size",
        "dim",
        "numel",
        "get",
        "getitem",
        "split",
        "chunk",
        "unbind",
        "narrow",
        "select",
        "slice",
        "as_strided",
        "view_as",
        "detach",
        "requires_grad_",
        "is_floating_point",
        "is_complex",
        "element_size",
        "stride",
        "storage_offset",
        "is_contiguous",
        "data_ptr",
        "len",
        "iter",
        "dropout",
        "identity",
        "item",
        "tolist",
        "hash",
        "format",
        "repr",
        "nelement",
        "ndimension",
        "get_device",
        "type",
        "movedim",
        "moveaxis",
        "swapaxes",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
        "is_nonzero",
        "is_inference",
        "has_names",
        "align_to",
        "refine_names",
        "setitem",
    }
)

# Ops that copy or create data: 0 FLOPs, bytes of operands + results.
_COPY_OPS = frozenset(
    {
        "contiguous",
        "to",
        "float",
        "half",
        "bfloat16",
        "double",
        "type_as",
        "clone",
        "cat",
        "stack",
        "repeat",
        "repeat_interleave",
        "copy",
        "index_select",
        "gather",
        "take",
        "masked_select",
        "tril",
        "triu",
        "flip",
        "roll",
        "pad",
        "ones_like",
        "zeros_like",
        "full_like",
        "empty_like",
        "new_ones",
        "new_zeros",
        "new_full",
        "new_empty",
        "new_tensor",
        "fill",
        "zero",
        "arange",
        "ones",
        "zeros",
        "full",
        "empty",
        "tensor",
        "as_tensor",
        "cpu",
        "cuda",
        "long",
        "int",
        "bool",
        "scatter",
        "index_put",
        "diagonal",
        "one_hot",
        "broadcast_to",
        "embedding",
    }
)

# Elementwise ops: FLOPs per output element.
_ELEMENTWISE_FLOPS = {
    **dict.fromkeys(
        [
            "add",
            "sub",
            "mul",
            "div",
            "true_divide",
            "floor_divide",
            "truediv",
            "floordiv",
            "neg",
            "pow",
            "sqrt",
            "rsqrt",
            "exp",
            "log",
            "log1p",
            "expm1",
            "abs",
            "erf",
            "reciprocal",
            "clamp",
            "clamp_min",
            "clamp_max",
            "clip",
            "maximum",
            "minimum",
            "masked_fill",
            "where",
            "eq",
            "ne",
            "lt",
            "le",
            "gt",
            "ge",
            "logical_not",
            "logical_and",
            "logical_or",
            "and",
            "or",
            "xor",
            "invert",
            "sign",
            "square",
            "relu",
            "relu6",
            "threshold",
            "hardtanh",
            "leaky_relu",
            "sin",
            "cos",
            "mod",
            "remainder",
            "fmod",
            "floor",
            "ceil",
            "round",
            "trunc",
            "addcmul",
            "addcdiv",
            "diff",
            "lerp",
            "isinf",
            "isnan",
            "isfinite",
            "nan_to_num",
            "rsub",
            "sub_",
            "bitwise_and",
            "bitwise_or",
            "bitwise_not",
            "lshift",
            "rshift",
        ],
        1,
    ),
    "tanh": 4,
    "sigmoid": 4,
    "silu": 5,
    "mish": 6,
    "softplus": 4,
    "elu": 4,
    "selu": 4,
    "hardswish": 4,
    "hardsigmoid": 3,
    "quick_gelu": 5,
}

_REDUCTION_OPS = frozenset(
    {
        "sum",
        "mean",
        "max",
        "min",
        "amax",
        "amin",
        "var",
        "std",
        "prod",
        "norm",
        "all",
        "any",
        "argmax",
        "argmin",
        "logsumexp",
        "cumsum",
        "cumprod",
        "count_nonzero",
        "var_mean",
        "std_mean",
    }
)

# Functional ops that become their own leaf node when called directly inside a module.
LEAF_OPS: dict[str, str] = {
    "matmul": "MatMul",
    "bmm": "MatMul",
    "baddbmm": "MatMul",
    "einsum": "Einsum",
    "softmax": "Softmax",
    "scaled_dot_product_attention": "ScaledDotProductAttention",
    "linear": "Linear",
    "layer_norm": "LayerNorm",
    "embedding": "Embedding",
}

_REVERSED = {
    "radd": "add",
    "rsub": "sub",
    "rmul": "mul",
    "rtruediv": "div",
    "rdiv": "div",
    "rpow": "pow",
    "rmatmul": "matmul",
    "rfloordiv": "floordiv",
    "rand": "and",
    "ror": "or",
    "rxor": "xor",
    "rmod": "mod",
}
_INPLACE = {
    "iadd": "add",
    "isub": "sub",
    "imul": "mul",
    "itruediv": "div",
    "idiv": "div",
    "ipow": "pow",
    "imatmul": "matmul",
    "iand": "and",
    "ior": "or",
    "ixor": "xor",
}


@dataclass
class OpCost:
    """Cost of one op call.

    Attributes:
        flops: floating point operations (FLOPs, not MFLOP; a multiply-add is 2).
        matmul_flops: the part of ``flops`` spent in matrix products (``2 * M * K * N``).
        bytes: bytes read plus bytes written by the op (bytes, not MiB).
    """

    flops: float = 0.0
    matmul_flops: float = 0.0
    bytes: float = 0.0

    def __iadd__(self, other: OpCost) -> OpCost:
        self.flops += other.flops
        self.matmul_flops += other.matmul_flops
        self.bytes += other.bytes
        return self


def op_name(func: Callable[..., Any]) -> str:
    """Normalised name of a torch function, method or operator.

    ``Tensor.__radd__`` -> ``add``, ``Tensor.add_`` -> ``add``, ``F.softmax`` -> ``softmax``.
    """
    name = getattr(func, "__name__", None) or type(func).__name__
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        name = _REVERSED.get(name, _INPLACE.get(name, name))
    elif name.endswith("_") and not name.startswith("_") and name != "requires_grad_":
        name = name[:-1]
    return name.lstrip("_")


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def tensor_bytes(obj: Any) -> int:
    """Total size in bytes of all tensors in a (nested) argument structure."""
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _numel(obj: Any) -> int:
    return sum(t.numel() for t in _tensors(obj))


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _io_bytes(args: tuple, kwargs: dict, out: Any) -> int:
    return tensor_bytes(args) + tensor_bytes(kwargs) + tensor_bytes(out)


def linear_cost(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> OpCost:
    """``y = x W^T + b``: ``2 * rows * in * out`` plus ``rows * out`` for the bias."""
    out_features, in_features = weight.shape[0], weight.shape[-1]
    rows = x.numel() // in_features
    mm = 2 * rows * in_features * out_features
    flops = mm + (rows * out_features if bias is not None else 0)
    nbytes = tensor_bytes([x, weight, bias]) + rows * out_features * x.element_size()
    return OpCost(flops, mm, nbytes)


def matmul_cost(a: torch.Tensor, out: torch.Tensor, *, add_bias: bool = False) -> OpCost:
    """``matmul``/``bmm``/``addmm``: every output element is a K-long dot product.

    FLOPs = ``2 * K * numel(out)`` (+ ``numel(out)`` when a bias/input is added, as in
    ``addmm``/``baddbmm``). K is the last dimension of the first operand.
    """
    k = a.shape[-1]
    mm = 2 * k * out.numel()
    return OpCost(mm + (out.numel() if add_bias else 0), mm, 0)


def einsum_cost(equation: str, operands: list[torch.Tensor]) -> OpCost:
    """Contraction of two operands: ``2 * prod(size of every distinct index)``."""
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for letters, tensor in zip(inputs, operands, strict=False):
        for letter, size in zip(letters.replace("...", ""), tensor.shape[-len(letters) :], strict=False):
            sizes[letter] = size
    total = math.prod(sizes.values()) if sizes else 0
    factor = 2 if len(operands) > 1 else 1
    return OpCost(factor * total, factor * total if len(operands) > 1 else 0, 0)


def sdpa_cost(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> OpCost:
    """Scaled dot-product attention on ``q: (..., L, E)``, ``k: (..., S, E)``, ``v: (..., S, Ev)``.

    ``QK^T``: ``2 * B * L * S * E``; scaling: ``B * L * S``; mask add (if a mask is given):
    ``B * L * S``; softmax: ``5 * B * L * S``; ``PV``: ``2 * B * L * S * Ev``. ``B`` is the
    product of the (broadcast) batch dimensions of ``q``.
    """
    length, e = q.shape[-2], q.shape[-1]
    s, ev = k.shape[-2], v.shape[-1]
    batch = q.numel() // (length * e)
    scores = batch * length * s
    mm = 2 * scores * e + 2 * scores * ev
    flops = mm + scores + (scores if mask is not None else 0) + 5 * scores
    return OpCost(flops, mm, 0)


def op_cost(func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> OpCost:
    """FLOPs and bytes of one torch call, from its operands and result.

    Args:
        func: the torch function, method or operator that was called.
        args: positional arguments of the call.
        kwargs: keyword arguments of the call.
        out: the call's result.

    Returns:
        The op's cost; unknown ops and non-tensor results cost nothing.
    """
    name = op_name(func)
    out_numel = _numel(out)
    if name in _FREE_OPS or not any(True for _ in _tensors(out)):
        return OpCost()
    io = _io_bytes(args, kwargs, out)
    if name == "linear":
        weight = _arg(args, kwargs, 1, "weight")
        cost = linear_cost(args[0], weight, _arg(args, kwargs, 2, "bias"))
        return cost
    if name in ("matmul", "mm", "bmm"):
        cost = matmul_cost(args[0], out)
    elif name in ("addmm", "baddbmm", "addbmm"):
        cost = matmul_cost(_arg(args, kwargs, 1, "mat1" if name == "addmm" else "batch1"), out, add_bias=True)
    elif name == "einsum":
        operands = list(args[1:]) if len(args) > 1 else list(kwargs.get("operands", ()))
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        cost = einsum_cost(args[0], operands)
    elif name == "scaled_dot_product_attention":
        cost = sdpa_cost(
            args[0],
            _arg(args, kwargs, 1, "key"),
            _arg(args, kwargs, 2, "value"),
            _arg(args, kwargs, 3, "attn_mask"),
        )
    elif name == "embedding":
        # A gather reads the index tensor and the selected rows and writes the rows.
        return OpCost(0, 0, tensor_bytes(args[0]) + 2 * tensor_bytes(out))
    elif name in ("softmax", "log_softmax"):
        cost = OpCost(5 * out_numel)
    elif name == "layer_norm":
        cost = OpCost(8 * out_numel)
    elif name == "rms_norm":
        cost = OpCost(4 * out_numel)
    elif name == "gelu":
        approximate = _arg(args, kwargs, 1, "approximate", "none")
        cost = OpCost((8 if approximate == "tanh" else 6) * out_numel)
    elif name in _ELEMENTWISE_FLOPS:
        cost = OpCost(_ELEMENTWISE_FLOPS[name] * out_numel)
    elif name in _REDUCTION_OPS:
        cost = OpCost(_numel(args[:1]) if args else 0)
    elif name in _COPY_OPS:
        cost = OpCost()
    else:
        return OpCost()
    cost.bytes = io
    return cost


_FORMULA_OPS = frozenset(
    {
        "linear",
        "matmul",
        "mm",
        "bmm",
        "addmm",
        "baddbmm",
        "addbmm",
        "einsum",
        "scaled_dot_product_attention",
        "embedding",
        "softmax",
        "log_softmax",
        "layer_norm",
        "rms_norm",
        "gelu",
    }
)


def is_known_op(func: Callable[..., Any]) -> bool:
    """Whether ``op_cost`` has an explicit formula (or an explicit zero) for this op."""
    name = op_name(func)
    return (
        name in _FREE_OPS
        or name in _COPY_OPS
        or name in _ELEMENTWISE_FLOPS
        or name in _REDUCTION_OPS
        or name in _FORMULA_OPS
    )


# ------------------------------------------------------------------ the published convention
# Primitive types whose ``mem_bytes`` follows the published IrEne data under
# ``convention="irene"`` (decoded from device 1's CSVs; see docs/measure.md).
IRENE_LEAF_TYPES = frozenset({"Linear", "Conv1D", "LayerNorm", "Embedding", "Tanh", "MatMul", "Softmax"})


def irene_linear_bytes(x: torch.Tensor, weight: torch.Tensor, *, conv1d: bool = False) -> int:
    """Published ``mem_bytes`` of a ``Linear`` (``weight: [out, in]``) or HF ``Conv1D``
    (``weight: [in, out]``) on input ``x``; the bias is never counted.

    * ``Linear`` on an input of more than 2 dims (``B x S x in``): ``B·W + N·(in + 3·out)·e``,
      as if the weight were broadcast to every batch element of a batched matmul;
    * ``Linear`` on a 2-D input and ``Conv1D`` (a 2-D ``addmm``): ``W + N·(in + out)·e``;

    with ``W = in·out·e`` the weight's bytes, ``N`` the input rows (tokens, ``B·S``), ``B`` the
    product of the dims before the last two, and ``e`` the element size (4 bytes in float32).
    """
    if conv1d:
        in_features, out_features = weight.shape[0], weight.shape[1]
    else:
        in_features, out_features = weight.shape[-1], weight.shape[0]
    weight_bytes = in_features * out_features * weight.element_size()
    rows = x.numel() // in_features
    element_bytes = x.element_size()
    if x.dim() > 2 and not conv1d:
        batches = rows // x.shape[-2]
        return batches * weight_bytes + rows * (in_features + 3 * out_features) * element_bytes
    return weight_bytes + rows * (in_features + out_features) * element_bytes


def irene_elementwise_bytes(out: torch.Tensor, factor: int) -> int:
    """``factor · bytes(out)``: LayerNorm 4, Softmax 3, Tanh 1 in the published data."""
    return factor * out.numel() * out.element_size()


def irene_embedding_bytes(ids: torch.Tensor, out: torch.Tensor) -> int:
    """Published ``mem_bytes`` of an embedding lookup: ``bytes(out) + bytes(ids)``."""
    return tensor_bytes(out) + tensor_bytes(ids)


def irene_matmul_bytes(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> int:
    """Published ``mem_bytes`` of an attention ``matmul``: ``bytes(a) + bytes(b) + bytes(out)``."""
    return tensor_bytes(a) + tensor_bytes(b) + tensor_bytes(out)


_IRENE_FACTORS = {"LayerNorm": 4, "Softmax": 3, "Tanh": 1}


def irene_leaf_bytes(
    instance_type: str, inputs: tuple, out: Any, weight: torch.Tensor | None = None
) -> int | None:
    """``mem_bytes`` (bytes) of a leaf of a published primitive type, in the published convention.

    Args:
        instance_type: the leaf's type (``"Linear"``, ``"MatMul"``...).
        inputs: the leaf's positional inputs (module call or functional op).
        out: its output.
        weight: the weight of a ``Linear``/``Conv1D`` (from the module or the ``linear`` call).

    Returns:
        The bytes, or ``None`` when the type is not in :data:`IRENE_LEAF_TYPES` or the call
        does not have the expected tensors (the caller then keeps the physical bytes).
    """
    result = out[0] if isinstance(out, (tuple, list)) and out else out
    if instance_type not in IRENE_LEAF_TYPES or not isinstance(result, torch.Tensor) or not inputs:
        return None
    first = inputs[0]
    if not isinstance(first, torch.Tensor):
        return None
    if instance_type in ("Linear", "Conv1D"):
        if weight is None:
            return None
        return irene_linear_bytes(first, weight, conv1d=instance_type == "Conv1D")
    if instance_type == "Embedding":
        return irene_embedding_bytes(first, result)
    if instance_type == "MatMul":
        if len(inputs) < 2 or not isinstance(inputs[1], torch.Tensor):
            return None
        return irene_matmul_bytes(first, inputs[1], result)
    return irene_elementwise_bytes(result, _IRENE_FACTORS[instance_type])
