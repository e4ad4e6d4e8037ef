"""torch.export / torch.fx graph -> xbitc IR.

Linears whose weight is a model parameter become LINEAR nodes and embeddings EMBED nodes: those are what the
compiler quantizes. Every other operator is kept as a node naming its aten operator, so the whole model still
executes in the reference interpreter.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from xbitc.ir.graph import Graph, Node, Op, Ref, TensorType
from xbitc.ir.targets import UnknownTarget, in_place_errors, target_name


class TraceError(RuntimeError):
    """The model could not be brought into the IR; the message names the operator or construct."""


_NAMED_OPS = {
    "aten.add.Tensor": Op.ADD,
    "aten.sub.Tensor": Op.SUB,
    "aten.mul.Tensor": Op.MUL,
    "aten.div.Tensor": Op.DIV,
    "aten.neg.default": Op.NEG,
    "aten.silu.default": Op.SILU,
    "aten.gelu.default": Op.GELU,
    "aten.softmax.int": Op.SOFTMAX,
    "aten._softmax.default": Op.SOFTMAX,
    "aten.matmul.default": Op.MATMUL,
    "aten.bmm.default": Op.MATMUL,
    "aten.layer_norm.default": Op.LAYERNORM,
    "aten.scaled_dot_product_attention.default": Op.ATTENTION,
    "aten.reshape.default": Op.RESHAPE,
    "aten.view.default": Op.RESHAPE,
    "aten.permute.default": Op.PERMUTE,
    "aten.transpose.int": Op.PERMUTE,
}


def _type_of(val: Any) -> TensorType | None:
    if isinstance(val, torch.Tensor):
        shape = tuple(int(s) if isinstance(s, int) or not hasattr(s, "node") else _sym(s) for s in val.shape)
        return TensorType(shape, str(val.dtype).removeprefix("torch."))
    if isinstance(val, torch.SymInt):
        return TensorType((), "sym_int")
    return None


def _sym(s: Any) -> int | str:
    try:
        return int(s)
    except (TypeError, ValueError, RuntimeError):
        return str(s)


def _convert(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return Ref(v.name)
    if isinstance(v, (list, tuple)):
        conv = [_convert(x) for x in v]
        return tuple(conv) if isinstance(v, tuple) else conv
    if isinstance(v, dict):
        return {k: _convert(x) for k, x in v.items()}
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise TraceError(f"symbolic value {v} appears as a constant argument")
    return v


def from_exported(ep: torch.export.ExportedProgram, strip_prefix: str = "", weights: dict[str, Any] | None = None) -> Graph:
    """Build the IR from an ExportedProgram; parameter names are the module's fully qualified names. `weights`
    (fully qualified name -> handle, e.g. xbitc.lazy.LazyWeight) stands in for parameters traced as fake tensors;
    names sharing a handle are one (tied) parameter."""
    sig = ep.graph_signature
    kinds = torch.export.graph_signature.InputKind
    placeholder_param: dict[str, str] = {}
    params: dict[str, torch.Tensor] = {}
    param_kinds: dict[str, str] = {}
    by_storage: dict[tuple, str] = {}  # tied weights: one tensor under two names becomes one parameter
    for spec in sig.input_specs:
        if spec.kind in (kinds.PARAMETER, kinds.BUFFER, kinds.CONSTANT_TENSOR):
            fqn = spec.target
            handle = (weights or {}).get(fqn)
            value = handle if handle is not None else ep.state_dict[fqn] if fqn in ep.state_dict else ep.constants[fqn]
            key = ("handle", id(handle)) if handle is not None else (value.data_ptr(), tuple(value.shape), value.dtype)
            if value.numel() and key in by_storage:
                placeholder_param[spec.arg.name] = by_storage[key]
                continue
            name = fqn.removeprefix(strip_prefix)
            by_storage[key] = name
            placeholder_param[spec.arg.name] = name
            param_kinds[name] = {kinds.PARAMETER: "parameter", kinds.BUFFER: "buffer"}.get(spec.kind, "constant")
            params[name] = handle if handle is not None else value.detach().clone().contiguous()
        elif spec.kind is not kinds.USER_INPUT:
            raise TraceError(f"unsupported export input kind {spec.kind.name} for {spec.arg.name}")
    for spec in sig.output_specs:
        if spec.kind.name != "USER_OUTPUT":
            raise TraceError(
                f"the model mutates state during forward ({spec.kind.name} of {spec.target}); "
                "compile it in eval mode without caches"
            )
    dynamic = _dynamic_input_sizes(ep)  # before importing: the importer's int() of a size specialises it
    graph = from_fx_graph(ep.graph, params, placeholder_param)
    _mark_dynamic_inputs(graph, dynamic)
    graph.meta["param_kinds"] = param_kinds
    return graph


def _dynamic_input_sizes(ep: torch.export.ExportedProgram) -> dict[str, dict[int, str]]:
    """Per user input, its dynamic axes and their symbols' names."""
    found: dict[str, dict[int, str]] = {}
    for n in ep.graph.nodes:
        val = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            for axis, dim in enumerate(val.shape):
                expr = getattr(getattr(dim, "node", None), "expr", None)
                if expr is not None and not getattr(expr, "is_number", False):
                    found.setdefault(n.name, {})[axis] = str(expr)
    return found


def _mark_dynamic_inputs(graph: Graph, dynamic: dict[str, dict[int, str]]) -> None:
    """Write each input's dynamic sizes into its INPUT node type as the symbol's name (str) and keep its static
    sizes as ints: the runtime refuses a call whose static sizes differ, up front (xbitc.runtime). The importer's
    types hold the traced example size for every dimension, dynamic or not (int() of a SymInt is its hint)."""
    for node in graph.inputs():
        axes = dynamic.get(node.name)
        if node.type is None or not axes:
            continue
        shape = tuple(axes.get(axis, size) for axis, size in enumerate(node.type.shape))
        node.type = type(node.type)(shape, node.type.dtype)


def from_fx_graph(graph: fx.Graph, params: dict[str, torch.Tensor], placeholder_param: dict[str, str]) -> Graph:
    is_param_node = lambda a: isinstance(a, fx.Node) and a.name in placeholder_param
    nodes: list[Node] = []
    for fn in graph.nodes:
        ty = _type_of(fn.meta.get("val"))
        if fn.op == "placeholder":
            if fn.name in placeholder_param:
                nodes.append(Node(fn.name, Op.PARAM, attrs={"name": placeholder_param[fn.name]}, type=ty))
            else:
                nodes.append(Node(fn.name, Op.INPUT, type=ty))
        elif fn.op == "output":
            outs = fn.args[0]
            outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
            single = len(outs) == 1  # export flattens a lone tensor into a 1-tuple; give it back bare
            if not all(isinstance(o, fx.Node) for o in outs):
                raise TraceError("the model's outputs must be tensors (or a tuple of tensors)")
            nodes.append(Node(fn.name, Op.OUTPUT, args=tuple(Ref(o.name) for o in outs), attrs={"single": single}))
        elif fn.op == "call_function":
            try:
                target = target_name(fn.target)
            except UnknownTarget as err:
                raise TraceError(f"cannot import operator {fn.target} (node {fn.name}): {err}") from None
            args, kwargs = fn.args, fn.kwargs
            if target == "aten.linear.default" and is_param_node(args[1]) and (len(args) < 3 or args[2] is None or is_param_node(args[2])):
                bias = _convert(args[2]) if len(args) > 2 else None
                nodes.append(Node(fn.name, Op.LINEAR, args=(_convert(args[0]), _convert(args[1]), bias), type=ty))
            elif target == "aten.embedding.default" and is_param_node(args[0]) and len(args) <= 3:
                nodes.append(Node(fn.name, Op.EMBED, args=(_convert(args[1]), _convert(args[0])), type=ty))
            else:
                op = _NAMED_OPS.get(target, Op.TORCH_OP)
                nodes.append(
                    Node(fn.name, op, args=_convert(tuple(args)), kwargs=_convert(dict(kwargs)), attrs={"target": target}, type=ty)
                )
        elif fn.op == "get_attr":
            raise TraceError(
                f"node {fn.name} reads submodule attribute {fn.target!r} (control flow or a higher-order op); "
                "xbitc imports flat aten graphs only"
            )
        else:
            raise TraceError(f"unsupported fx node kind {fn.op} ({fn.name}: {fn.target})")
    writes = in_place_errors(nodes)
    if writes:
        raise TraceError(f"{writes[0]}; xbitc compiles models whose forward leaves weights and inputs unchanged")
    return Graph(nodes=nodes, params=params, sources={fn.name: _source(fn) for fn in graph.nodes if _source(fn)})


def _source(fn: fx.Node) -> str:
    """'file:line' of the innermost frame of the model's code that made the node (export records the stack)."""
    lines = [ln.strip() for ln in str(fn.meta.get("stack_trace") or "").splitlines() if ln.strip().startswith("File ")]
    if not lines:
        return ""
    parts = lines[-1].split('"')
    line = lines[-1].split("line ")[-1].split(",")[0]
    return f"{parts[1]}:{line}" if len(parts) > 2 else ""
