"""Trace one forward pass of a transformer into an IrEne tree.

The tree's root is the model; inner nodes are the ``nn.Module`` calls (without pure containers
such as ``Sequential`` and without dropout); leaves (type ``"ml"``) are the modules without
submodules (``Linear``, HF ``Conv1D``, ``LayerNorm``, RMS norms, ``Embedding``, activation
modules) and the functional ops named in :data:`irene.measure.flops.LEAF_OPS` (``matmul``,
``softmax``, ``scaled_dot_product_attention``...) when a non-leaf module calls them directly.

Every torch call is seen through a ``TorchFunctionMode`` while forward pre/post hooks keep
track of the module being executed, so every op's FLOPs and bytes are charged to the module
that ran it: a parent's totals are its children's plus its own direct ops (residual adds,
masking, scaling, functional activations), work that no child accounts for.

Two conventions for the static features (:data:`CONVENTIONS`):

* ``"physical"`` (default): a node's ``mem_bytes`` is the bytes read + written by its ops;
  activation modules are leaves.
* ``"irene"``: the convention of the published IrEne trees, so that traced trees are
  comparable with them: leaves of the published primitive types
  (:data:`irene.measure.flops.IRENE_LEAF_TYPES`) get the published ``mem_bytes`` formulas,
  other leaves keep their physical bytes, and the activation modules of
  :data:`FOLDED_ACTIVATIONS` (plain functions in the 2020 code) are not nodes: their ops are
  their parent's own work. FLOPs are the same in both conventions.

Static features follow from shapes alone, so a model built on the ``meta`` device (no weights,
no activations: :func:`irene.data.architectures.model_from_name` with ``device="meta"``) is
traced in seconds with memory independent of its size and of the input's shape. A value that a
forward pass reads in a branch (Transformers' causal masks ask whether the position ids hold
packed sequences) cannot come from a meta tensor: the tracer computes it on the CPU from the
ops that made it, which depend only on the input ids and shapes (:class:`_MetaValues`), so the
branch goes the way it goes on real tensors and the tree equals the real trace's. Measuring
needs real tensors; on a real device :func:`trace_model` first estimates the activations
from a meta trace and refuses, in one line, a shape that cannot fit in free memory.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from irene.data import architectures
from irene.data.architectures import model_from_name
from irene.data.tree import FEATURE_FIELDS
from irene.errors import SettingsError, UserError
from irene.measure.flops import LEAF_OPS, OpCost, irene_leaf_bytes, is_known_op, op_cost, op_name

__all__ = [
    "CONVENTIONS",
    "FOLDED_ACTIVATIONS",
    "MetaTraceError",
    "Trace",
    "TraceNode",
    "check_convention",
    "check_activations_fit",
    "estimate_activation_bytes",
    "model_from_name",
    "node_to_dict",
    "random_input_ids",
    "trace_model",
    "trace_tree",
]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

CONVENTIONS = ("physical", "irene")
# Activation modules folded into their parent under convention="irene": the GELU family, a
# plain function in the code that produced the published trees. Activations without a
# published counterpart (SiLU, ReLU, RMS norms...) stay leaves.
FOLDED_ACTIVATIONS = frozenset(
    {
        "GELU",
        "GELUActivation",
        "NewGELUActivation",
        "FastGELUActivation",
        "QuickGELUActivation",
        "GELUTanh",
        "AccurateGELUActivation",
        "ClippedGELUActivation",
        "PytorchGELUTanh",
    }
)
# Embeddings whose ids the 2020 code expanded to the whole batch (DistilBERT built
# ``position_ids`` as (batch, seq); transformers now passes (1, seq)): (model class, name).
_BATCH_EXPANDED_IDS = frozenset({("DistilBertModel", "position_embeddings")})
# Functional ops whose MatMul leaf follows the published convention (operands a, b).
_IRENE_MATMUL_OPS = frozenset({"matmul", "bmm"})


@dataclass
class TraceNode:
    """One node of a traced forward pass.

    Attributes:
        scope: dotted path from ``"root"``; unique within the trace.
        parent: the calling node (``None`` for the root).
        level: depth in the tree, root = 0.
        instance_type: class name of the module, or the op's type (``"MatMul"``...).
        type: ``"model"``, ``"module"`` or ``"ml"``.
        num_parameters: parameters of the module (0 for functional ops).
        module: the module that was called (``None`` for functional ops).
        func: the functional op that was called (``None`` for modules).
        args: positional inputs of the call, captured for isolated replay (or ``None``).
        kwargs: keyword inputs of the call, captured for isolated replay (or ``None``).
        own: cost of the ops executed directly by this node (not by a child).
        children: child nodes in call order.
        signature: shapes of inputs and parameters; equal signatures mean identical work.
    """

    scope: str
    parent: TraceNode | None
    level: int
    instance_type: str
    type: str
    num_parameters: int = 0
    module: nn.Module | None = None
    func: Callable[..., Any] | None = None
    args: tuple | None = None
    kwargs: dict | None = None
    own: OpCost = field(default_factory=OpCost)
    children: list[TraceNode] = field(default_factory=list)
    signature: str = ""
    static_name: str = ""

    def total(self) -> OpCost:
        """Cost of this node's own ops plus all its descendants' (FLOPs and bytes)."""
        cost = OpCost(self.own.flops, self.own.matmul_flops, self.own.bytes)
        for child in self.children:
            cost += child.total()
        return cost

    def walk(self) -> Iterator[TraceNode]:
        """This node and all its descendants, depth first, parents before children."""
        yield self
        for child in self.children:
            yield from child.walk()

    def call(self) -> Any:
        """Re-run this node once, in isolation, on its captured inputs."""
        if self.args is None:
            raise RuntimeError(f"{self.scope}: inputs were not captured (capture_inputs=False)")
        target = self.module if self.module is not None else self.func
        return target(*self.args, **self.kwargs)


@dataclass
class Trace:
    """A traced forward pass.

    Attributes:
        model_name: name recorded in the tree.
        batch_size: batch size of the traced input.
        seq_len: sequence length of the traced input.
        root: the root node (the model).
        unknown_ops: names of ops seen without a cost formula (counted as 0 FLOPs/bytes).
        convention: convention of the static features, one of :data:`CONVENTIONS`.
    """

    model_name: str
    batch_size: int
    seq_len: int
    root: TraceNode
    unknown_ops: set[str] = field(default_factory=set)
    convention: str = "physical"

    def nodes(self) -> list[TraceNode]:
        """All nodes, parents before children."""
        return list(self.root.walk())

    def node_id(self, node: TraceNode) -> str:
        """Deterministic, unique node id: ``model/bsxseq/scope``."""
        return f"{self.model_name}/{self.batch_size}x{self.seq_len}/{node.scope}"


def _is_leaf_module(module: nn.Module) -> bool:
    return not any(not isinstance(m, _DROPOUTS) for m in module.children())


def _shape_signature(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"T{tuple(obj.shape)}{str(obj.dtype)[6:]}"
    if isinstance(obj, (list, tuple)):
        return "(" + ",".join(_shape_signature(o) for o in obj) + ")"
    if isinstance(obj, dict):
        return "{" + ",".join(f"{k}:{_shape_signature(v)}" for k, v in sorted(obj.items())) + "}"
    if isinstance(obj, (int, float, str, bool, type(None))):
        return repr(obj)
    return type(obj).__name__


def _signature(instance_type: str, module: nn.Module | None, args: tuple, kwargs: dict) -> str:
    params = ""
    if module is not None:
        params = ",".join(f"{n}{tuple(p.shape)}" for n, p in module.named_parameters())
    return f"{instance_type}|{_shape_signature(args)}|{_shape_signature(kwargs)}|{params}"


class MetaTraceError(UserError, RuntimeError):
    """A forward pass on the ``meta`` device needs a value that shapes alone do not give."""


# Values computed on the CPU for one read of a meta trace: at most this many bytes, so memory
# stays bounded whatever the shape. The causal masks' packed-sequence check computes four
# batch x seq_len tensors (int64 and bool): 1.6 MiB at 64 x 1024; refused past ~10M tokens.
MAX_META_VALUE_BYTES = 256 << 20
_Recipe = tuple  # (tensor, func, args, kwargs, path into func's output) or (tensor, None, value)


class _MetaValues:
    """The recipe of every meta tensor a traced forward pass makes, to compute its value on
    the CPU when a branch reads it (``bool(t)``, ``t.item()``...): the op that raised on meta
    is run again on the CPU values of its inputs, each recomputed from its own recipe.

    Tensors without a recipe (weights, buffers) and tensors changed in place have no value:
    a read that needs one raises :class:`MetaTraceError`.
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.recipes: dict[int, _Recipe] = {}
        self.mutated: set[int] = set()
        self.computed_bytes = 0  # bytes of the values computed for the current read

    def constant(self, tensor: torch.Tensor, value: Any) -> None:
        """``tensor`` (meta) stands for ``value`` (CPU)."""
        self.recipes[id(tensor)] = (tensor, None, value)

    def record(self, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
        """Remember how ``out``'s meta tensors were made, or that an op changed one in place."""
        name = getattr(func, "__name__", "")
        target = kwargs.get("out")
        if isinstance(target, torch.Tensor):
            self.mutated.add(id(target))
        inplace = name == "__setitem__" or (name.startswith("__i") and name.endswith("__")) or (
            name.endswith("_") and not name.startswith("_"))
        if inplace and args and isinstance(args[0], torch.Tensor):
            self.mutated.add(id(args[0]))
            return
        for path, tensor in _tensor_paths(out):
            if tensor.is_meta and id(tensor) not in self.recipes:
                self.recipes[id(tensor)] = (tensor, func, args, kwargs, path)

    def compute(self, func: Callable[..., Any], args: tuple, kwargs: dict, error: Exception) -> Any:
        """Run ``func`` on the CPU values of its meta inputs; tensor results come back as meta
        tensors whose values are remembered."""
        memo: dict[int, Any] = {}
        self.computed_bytes = 0
        try:
            real_args, real_kwargs = self._real(args, memo), self._real(kwargs, memo)
        except MetaTraceError as unresolved:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise MetaTraceError(f"{self.model_name}: cannot trace on the meta device: a branch "
                                 f"reads the value of a tensor ({op_name(func)}: {first}), and "
                                 f"{unresolved}") from error
        out = func(*real_args, **real_kwargs)
        return self._to_meta(out)

    def _to_meta(self, out: Any) -> Any:
        if isinstance(out, torch.Tensor):
            meta = out.to("meta")
            self.constant(meta, out)
            return meta
        if isinstance(out, (list, tuple)) and any(isinstance(o, torch.Tensor) for o in out):
            items = [self._to_meta(o) for o in out]
            return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
        return out

    def _real(self, obj: Any, memo: dict[int, Any]) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._value(obj, memo) if obj.is_meta else obj
        if isinstance(obj, torch.device):
            return torch.device("cpu") if obj.type == "meta" else obj
        if isinstance(obj, str) and obj == "meta":
            return "cpu"
        if isinstance(obj, (list, tuple)):
            items = [self._real(o, memo) for o in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        if isinstance(obj, dict):
            return {k: self._real(v, memo) for k, v in obj.items()}
        return obj

    def _value(self, tensor: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
        key = id(tensor)
        if key in memo:
            return memo[key]
        recipe = self.recipes.get(key)
        if key in self.mutated or recipe is None:
            what = "changed in place" if key in self.mutated else "a weight, buffer or input"
            raise MetaTraceError(f"it depends on a tensor of shape {tuple(tensor.shape)} that is "
                                 f"{what}; trace on a real device (stage=measure)")
        if recipe[1] is None:
            value = recipe[2]
        else:
            # checked before computing, from the meta tensor's shape (a view counts in full)
            self.computed_bytes += tensor.numel() * tensor.element_size()
            if self.computed_bytes > MAX_META_VALUE_BYTES:
                raise MetaTraceError(f"the values it depends on exceed {MAX_META_VALUE_BYTES >> 20} "
                                     "MiB; use a smaller batch_size or seq_len")
            _, func, args, kwargs, path = recipe
            value = func(*self._real(args, memo), **self._real(kwargs, memo))
            for index in path:
                value = value[index]
        memo[key] = value
        return value


def _tensor_paths(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, (list, tuple)):
        for index, item in enumerate(obj):
            yield from _tensor_paths(item, (*path, index))


def _has_meta(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.is_meta
    if isinstance(obj, (list, tuple)):
        return any(_has_meta(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_meta(o) for o in obj.values())
    return False


class _Recorder(TorchFunctionMode):
    """Builds the tree: module hooks push/pop nodes, the mode charges every op."""

    def __init__(
        self,
        model: nn.Module,
        capture_inputs: bool,
        convention: str = "physical",
        batch_size: int = 1,
        values: _MetaValues | None = None,
    ) -> None:
        super().__init__()
        self.values = values  # on the meta device: how to compute a value a branch reads
        self.capture_inputs = capture_inputs
        self.irene = convention == "irene"
        self.batch_size = batch_size
        self.names: dict[int, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(module), []).append(name)
        self.root = TraceNode(
            "root",
            None,
            0,
            type(model).__name__,
            "model",
            sum(p.numel() for p in model.parameters()),
            module=model,
        )
        self.stack: list[TraceNode] = []
        self.scopes: set[str] = set()
        self.op_counts: dict[tuple[str, str], int] = {}
        self.unknown_ops: set[str] = set()
        self.active = False

    # --- module hooks -------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.active = False
        try:
            if self.irene and self.stack and type(module).__name__ in FOLDED_ACTIVATIONS:
                self.stack.append(self.stack[-1])  # folded: its ops are the parent's own work
                return
            if module is self.root.module and not self.stack:
                node = self.root
            else:
                node = self._module_node(module)
            self._capture(node, module, args, kwargs)
            self.stack.append(node)
        finally:
            self.active = True

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.active = False
        node = self.stack.pop()
        if self.irene and node.module is module and node.type == "ml":
            self._irene_module_bytes(node, args, output)
        self.active = bool(self.stack)

    def _irene_module_bytes(self, node: TraceNode, args: tuple, output: Any) -> None:
        weight = getattr(node.module, "weight", None)
        nbytes = irene_leaf_bytes(node.instance_type, tuple(args), output, weight)
        if nbytes is None:
            return
        local = node.static_name.rsplit(".", 1)[-1]
        ids = args[0] if args else None
        if (
            (self.root.instance_type, local) in _BATCH_EXPANDED_IDS
            and isinstance(ids, torch.Tensor)
            and ids.dim() > 1
            and ids.shape[0] == 1
        ):
            nbytes *= self.batch_size
        node.own.bytes = nbytes

    def _module_node(self, module: nn.Module) -> TraceNode:
        parent = self.stack[-1]
        names = self.names.get(id(module), [""])
        prefix = parent.static_name + "." if parent.static_name else ""
        local = next((n[len(prefix) :] for n in names if n.startswith(prefix) and n != prefix), None)
        if local is not None:
            scope, static = f"{parent.scope}.{local}", prefix + local
        else:  # a shared module called from elsewhere (e.g. tied embeddings)
            scope, static = f"root.{names[0]}", names[0]
        leaf = _is_leaf_module(module)
        node = TraceNode(
            self._unique(scope),
            parent,
            parent.level + 1,
            type(module).__name__,
            "ml" if leaf else "module",
            sum(p.numel() for p in module.parameters()),
            module=module,
            static_name=static,
        )
        parent.children.append(node)
        return node

    def _unique(self, scope: str) -> str:
        candidate = scope
        for k in itertools.count(1):
            if candidate not in self.scopes:
                break
            candidate = f"{scope}_call{k}"
        self.scopes.add(candidate)
        return candidate

    def _capture(self, node: TraceNode, target: Any, args: tuple, kwargs: dict) -> None:
        kind = node.instance_type
        if node.func is not None:
            kind += ":" + op_name(node.func)
        node.signature = _signature(kind, node.module, args, kwargs)
        if self.capture_inputs:
            node.args, node.kwargs = tuple(args), dict(kwargs)

    # --- torch function mode -------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as error:
            if self.values is None or not (_has_meta(args) or _has_meta(kwargs)):
                raise
            out = self.values.compute(func, args, kwargs, error)  # a value read on meta
        if self.values is not None:
            self.values.record(func, args, kwargs, out)
        if self.active and self.stack:
            self._charge(func, args, kwargs, out)
        return out

    def _charge(self, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
        current = self.stack[-1]
        cost = op_cost(func, args, kwargs, out)
        name = op_name(func)
        if not is_known_op(func):
            self.unknown_ops.add(name)
        if name not in LEAF_OPS or current.type == "ml":
            current.own += cost
            return
        if self.irene:
            cost = self._irene_op_cost(name, cost, args, kwargs, out)
        index = self.op_counts.get((current.scope, name), 0)
        self.op_counts[(current.scope, name)] = index + 1
        node = TraceNode(
            self._unique(f"{current.scope}.{name}_{index}"),
            current,
            current.level + 1,
            LEAF_OPS[name],
            "ml",
            0,
            func=func,
            own=cost,
        )
        self._capture(node, func, args, kwargs)
        current.children.append(node)

    @staticmethod
    def _irene_op_cost(name: str, cost: OpCost, args: tuple, kwargs: dict, out: Any) -> OpCost:
        instance_type = LEAF_OPS[name]
        if instance_type == "MatMul" and name not in _IRENE_MATMUL_OPS:
            return cost
        weight = kwargs.get("weight", args[1] if len(args) > 1 else None) if name == "linear" else None
        nbytes = irene_leaf_bytes(instance_type, tuple(args), out, weight)
        if nbytes is not None:
            cost.bytes = nbytes
        return cost


def random_input_ids(
    vocab_size: int, batch_size: int, seq_len: int, device: str | torch.device = "cpu", seed: int = 0
) -> torch.Tensor:
    """Random token ids of shape ``(batch_size, seq_len)``, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    return ids.to(device)


def _fix_childless_modules(node: TraceNode) -> None:
    # A module whose submodules were never called did its work itself: it is a primitive.
    for child in node.children:
        _fix_childless_modules(child)
    if node.type == "module" and not node.children:
        node.type = "ml"


def trace_model(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    model_name: str,
    *,
    capture_inputs: bool = False,
    seed: int = 0,
    convention: str = "physical",
    check_memory: bool = True,
) -> Trace:
    """Run one forward pass on random token ids and record its tree.

    On the ``meta`` device nothing is allocated and no id is drawn (see the module's
    docstring); the tree equals the one traced on real tensors. On a real device the
    activations are first estimated from shapes (:func:`check_activations_fit`).

    Args:
        model: a base transformer model (see :func:`model_from_name`), in eval mode.
        batch_size: batch size of the input.
        seq_len: sequence length of the input.
        model_name: name written in the tree and its node ids.
        capture_inputs: keep every call's inputs (references, not copies) so that each node
            can be re-run in isolation by the measurement protocol.
        seed: seed of the random input ids.
        convention: ``"physical"`` (bytes read + written) or ``"irene"`` (the published
            trees' ``mem_bytes`` and leaf structure); see :data:`CONVENTIONS`.
        check_memory: on a real device, refuse a shape whose activations cannot fit.

    Returns:
        The trace; its nodes carry the per-op costs and, if asked, the captured inputs.

    Raises:
        ValueError: an unknown convention.
        SettingsError: the activations would not fit in the device's free memory.
        MetaTraceError: on ``meta``, a branch reads a value shapes do not give.
    """
    check_convention(convention)
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    values = None
    if device.type == "meta":
        # no ids are drawn: their values are computed only if a branch reads them
        values = _MetaValues(f"{model_name} {batch_size}x{seq_len}")
        ids = torch.empty((batch_size, seq_len), dtype=torch.long, device="meta")
        values.recipes[id(ids)] = (ids, random_input_ids,
                                   (model.config.vocab_size, batch_size, seq_len, "cpu", seed), {}, ())
    else:
        if check_memory:
            check_activations_fit(model, batch_size, seq_len, model_name,
                                  capture_inputs=capture_inputs, convention=convention)
        ids = random_input_ids(model.config.vocab_size, batch_size, seq_len, device, seed)
    recorder = _Recorder(model, capture_inputs, convention, batch_size, values)
    handles = []
    for module in model.modules():
        if isinstance(module, _CONTAINERS + _DROPOUTS):
            continue
        handles.append(module.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(recorder.post_hook, with_kwargs=True))
    try:
        with torch.no_grad(), recorder:
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    _fix_childless_modules(recorder.root)
    return Trace(model_name, batch_size, seq_len, recorder.root, recorder.unknown_ops, convention)


def _meta_twin(model: nn.Module) -> nn.Module | None:
    """The same architecture on the meta device (no weights): a Transformers model rebuilt
    from its config; ``None`` for any other module."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    with torch.device("meta"):
        twin = type(model)(copy.deepcopy(model.config))
    return twin.eval()


def estimate_activation_bytes(
    model: nn.Module, batch_size: int, seq_len: int, *, capture_inputs: bool,
    convention: str = "physical",
) -> int | None:
    """Bytes of activations a traced forward pass of ``model`` holds, from shapes alone.

    A meta twin of ``model`` is traced (seconds, no memory). With ``capture_inputs`` every
    node's inputs stay referenced until the node is measured, so the estimate is the sum of
    the distinct tensors the nodes take (weights excluded) plus the largest of them, the
    output of the op working on it; without, three times the largest tensor (an op's input,
    its output and a mask of the same size). An estimate, not a bound: the allocator's
    caching and fragmentation come on top.

    Returns:
        The bytes; ``None`` when ``model`` is neither on meta nor a Transformers model (no
        twin can be built) or a branch of its forward pass needs values (:class:`MetaTraceError`).
    """
    twin = model if next(model.parameters()).is_meta else _meta_twin(model)
    if twin is None:
        return None
    try:
        trace = trace_model(twin, batch_size, seq_len, "estimate", capture_inputs=True,
                            convention=convention)
    except MetaTraceError:
        return None
    weights = {id(t) for t in itertools.chain(twin.parameters(), twin.buffers())}
    sizes: dict[int, int] = {}
    for node in trace.nodes():
        for tensor in _tensors_of((node.args, node.kwargs)):
            if id(tensor) not in weights:
                sizes[id(tensor)] = tensor.numel() * tensor.element_size()
    largest = max(sizes.values(), default=0)
    return sum(sizes.values()) + largest if capture_inputs else 3 * largest


def _tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors_of(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_of(item)


# Peak RSS of real CPU traces with captured inputs grew 14 % (bert-base 8x128) and 26 % (gpt2
# 4x256) beyond estimate_activation_bytes (allocator caching, temporaries): the check asks for more.
ACTIVATION_HEADROOM = 1.3


def check_activations_fit(
    model: nn.Module, batch_size: int, seq_len: int, model_name: str, *, capture_inputs: bool,
    convention: str = "physical",
) -> int | None:
    """The activation bytes of tracing ``model`` (:func:`estimate_activation_bytes` times
    :data:`ACTIVATION_HEADROOM`), if they fit in its device's free memory; ``None`` (nothing
    checked) when there is no estimate.

    Raises:
        SettingsError: in one line, when they do not.
    """
    device = next(model.parameters()).device
    estimate = estimate_activation_bytes(model, batch_size, seq_len, capture_inputs=capture_inputs,
                                         convention=convention)
    if estimate is None:  # no meta trace (e.g. a value branch too large): the hidden states alone
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            return None
        estimate = batch_size * seq_len * hidden * next(model.parameters()).element_size()
    need = int(estimate * ACTIVATION_HEADROOM)
    free = architectures.device_free_bytes(device)
    if need > free:
        raise SettingsError(
            f"{model_name} {batch_size}x{seq_len}: its activations need about {need / 2**30:.1f} GiB "
            f"(estimated from shapes{', every node input kept for measuring' if capture_inputs else ''})"
            f" but {device} has {free / 2**30:.1f} GiB free; use a smaller batch_size or seq_len")
    return need


def check_convention(convention: str) -> str:
    """``convention`` if it is one of :data:`CONVENTIONS`.

    Raises:
        ValueError: naming the known conventions.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")
    return convention


_MIB = 2**20


def node_to_dict(trace: Trace, node: TraceNode, measured: dict[str, dict] | None = None) -> dict:
    """The IrEne JSON form of a node and its subtree.

    Args:
        trace: the trace the node belongs to (for ids).
        node: the node.
        measured: optional measured fields per scope (``cpu``, ``mem``, ``gpu``...,
            ``times_mean``, ``gpu_energy_mean``, ``ground_truth_energy``,
            ``measurement_reused_from``); fields that were not measured stay absent.

    Returns:
        The node dict with the fields in the published order.
    """
    total = node.total()
    out: dict[str, Any] = {
        "id": trace.node_id(node),
        "scope": node.scope,
        "parent_name": node.parent.scope if node.parent is not None else None,
        "level": node.level,
        "instance_type": node.instance_type,
        "type": node.type,
        "num_parameters": int(node.num_parameters),
        "flops": total.flops / 1e6,
        "mem_bytes": total.bytes / _MIB,
    }
    values = (measured or {}).get(node.scope, {})
    # the measured fields, in the format's order (FEATURE_FIELDS after the static three)
    for key in (*FEATURE_FIELDS[3:], "ground_truth_energy", "energy_std_j", "measurement_reused_from"):
        if values.get(key) is not None:
            out[key] = values[key]
    out["child_nodes_obj"] = [node_to_dict(trace, c, measured) for c in node.children]
    out["child_nodes"] = [c.scope for c in node.children]
    return out


def trace_to_record(trace: Trace, measured: dict[str, dict] | None = None) -> dict:
    """One ``trees.jsonl`` line: model name, batch size, sequence length and the tree."""
    return {
        "model_name": trace.model_name,
        "batch_size": trace.batch_size,
        "seq_len": trace.seq_len,
        "frontend_tree": node_to_dict(trace, trace.root, measured),
    }


def trace_tree(
    model: nn.Module, batch_size: int, seq_len: int, model_name: str, convention: str = "physical"
) -> dict:
    """Trace one forward pass and return its IrEne record with static features only.

    Args:
        model: the model to trace (e.g. from :func:`model_from_name`).
        batch_size: batch size of the random input.
        seq_len: sequence length of the random input.
        model_name: name written in the record.
        convention: ``"physical"`` or ``"irene"``, see :func:`trace_model`.

    Returns:
        ``{"model_name", "batch_size", "seq_len", "frontend_tree"}``; nodes carry
        ``num_parameters``, ``flops`` (MFLOP) and ``mem_bytes`` (MiB) but no measurements.
    """
    return trace_to_record(trace_model(model, batch_size, seq_len, model_name, convention=convention))
