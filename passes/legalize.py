"""legalize: a traced (and usually packed) graph -> a CoreGraph naming only core ops (ir/core.py).

Native targets implement the core ops and nothing else, so this is where a model either becomes deployable or is
refused, with every node it cannot lower named (node, operator, source line where tracing recorded one).

  1. `ir/fuse.simplify` forwards no-ops, merges common subexpressions and recognises RMSNorm, rotary embedding and
     grouped-query attention by their exact op sequences.
  2. Attention masks that depend only on sizes (not on any input's values) are recognised by what they compute:
     the mask subgraph is evaluated at several probe sizes and compared with causal and sliding-window masks; a
     match becomes attention{causal, window} and the subgraph (aranges, index, cumsum, ...) disappears. Masks that
     read data (an encoder's padding mask) are lowered op by op, as are float masks (T5's position bias), which
     attention adds to its scores.
  3. Every remaining node maps to core ops by the table `_LOWER` (argument normalisation per aten operator).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from xbitc.ir.core import causal_mask
from xbitc.ir.coregraph import CoreGraph, CoreNode
from xbitc.ir.fuse import simplify
from xbitc.ir.graph import LINEAR_OPS, Graph, Node, Op, Ref, _refs
from xbitc.ir.interp import Interpreter


class LegalizeError(ValueError):
    """Nodes outside the core op set; `.unsupported` lists (node, operator, source)."""

    def __init__(self, unsupported: list[tuple[str, str, str]]):
        self.unsupported = unsupported
        shown = "; ".join(f"%{n} ({op}{', ' + src if src else ''})" for n, op, src in unsupported[:5])
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        super().__init__(f"{len(unsupported)} node(s) have no core-op lowering: {shown}{more}")


@dataclass
class _Ctx:
    by_name: dict[str, Node]
    out: list[CoreNode]
    alias: dict[str, Any]  # traced node name -> the Ref (or literal) that now stands for its value

    def ref(self, v: Any) -> Any:
        if isinstance(v, Ref):
            return self.alias.get(v.name, v)
        if isinstance(v, (list, tuple)):
            return type(v)(self.ref(x) for x in v)
        return v

    def emit(self, name: str, op: str, *args: Any, **attrs: Any) -> Ref:
        self.out.append(CoreNode(name, op, tuple(self.ref(a) for a in args), attrs))
        return Ref(name)


# ------------------------------------------------------------------------------------------ mask recognition


def _data_dependent(nodes: list[Node]) -> set[str]:
    """Nodes whose values depend on an input's values (not only on sizes)."""
    dep: set[str] = set()
    for n in nodes:
        if n.op is Op.INPUT:
            dep.add(n.name)
        elif n.attrs.get("target") == "aten.sym_size.int":
            continue
        elif any(r in dep for r in n.refs()):
            dep.add(n.name)
    return dep


def _ancestors(name: str, by_name: dict[str, Node]) -> list[str]:
    seen, stack = set(), [name]
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        stack.extend(by_name[cur].refs())
    return [n for n in by_name if n in seen]  # graph order


def _evaluate(name: str, g: Graph, sizes: dict[str, int], values: dict[str, torch.Tensor] | None = None) -> Any:
    """The value of node `name` with inputs of the given symbolic sizes: `values` where given, else zeros. The
    interpreter runs the node's ancestors only (an INPUT is kept for every input, so inputs bind by position)."""
    by_name = g.by_name()
    keep = set(_ancestors(name, by_name)) | {n.name for n in g.inputs()}
    nodes = [n for n in g.nodes if n.name in keep] + [Node("__value", Op.OUTPUT, (Ref(name),), attrs={"single": True})]
    xs = [(values or {}).get(n.name, torch.zeros([sizes[d] if isinstance(d, str) else d for d in n.type.shape],
                                                 dtype=getattr(torch, n.type.dtype))) for n in g.inputs()]
    return Interpreter(Graph(nodes=nodes, params=g.params))(*xs)


def _mask_windows(mask_node: str, g: Graph) -> list[int]:
    """Integer literals in the mask's subgraph: where a sliding window's width would be written."""
    by_name = g.by_name()
    found = set()
    for nm in _ancestors(mask_node, by_name):
        for v in itertools.chain(by_name[nm].args, by_name[nm].kwargs.values()):
            if isinstance(v, int) and not isinstance(v, bool) and v > 1:
                found.add(v)
    return sorted(found)


def _probes(mask_node: str, g: Graph, longest: int) -> list[dict[str, int]]:
    """Size assignments to evaluate a mask at: the symbols that set its last two axes (query and key lengths) at
    short lengths and past `longest`, together and one at a time; other symbols (batch) small."""
    symbols = sorted({d for n in g.inputs() if n.type for d in n.type.shape if isinstance(d, str)})
    base = {s: 3 + 2 * i for i, s in enumerate(symbols)}
    axes = lambda sizes: tuple(_evaluate(mask_node, g, sizes).shape[-2:])
    first = axes(base)
    relevant = [s for s in symbols if axes({**base, s: base[s] + 1}) != first]
    probes = []
    for long in (5, 9, longest):
        probes.append({**base, **{s: long + i for i, s in enumerate(relevant)}})
        probes += [{**base, **{t: 2 for t in relevant}, s: long} for s in relevant if len(relevant) > 1]
    return probes


def recognise_mask(mask_node: str, g: Graph) -> int | None:
    """The sliding window (0: none) of the causal mask node `mask_node` computes, or None if it is not one.
    Probes reach past every candidate window (the integer literals of the mask's subgraph)."""
    candidates = [0] + _mask_windows(mask_node, g)
    try:
        probes = _probes(mask_node, g, max(candidates) + 3)
        masks = [_evaluate(mask_node, g, sizes) for sizes in probes]
    except Exception:  # noqa: BLE001 - not evaluable from sizes alone: not a recognisable mask
        return None
    if not all(isinstance(m, torch.Tensor) and m.dtype is torch.bool and m.dim() >= 2 for m in masks):
        return None
    if max(m.shape[-1] for m in masks) <= max(candidates):  # sizes fixed at trace time: windows indistinguishable
        return None
    for window in candidates:
        if all(torch.equal(m, causal_mask(m.shape[-2], m.shape[-1], window).expand_as(m)) for m in masks):
            return window
    return None


def recognise_padding(mask_node: str, g: Graph) -> str | None:
    """The input whose values are a key-padding mask [B, T] (nonzero = attend) that `mask_node` broadcasts to
    [B, 1, S, T], or None. Checked with random 0/1 masks at two sizes, every other input zero."""
    inputs = [n for n in g.inputs() if n.type and len(n.type.shape) == 2 and n.type.dtype in ("int64", "int32", "bool")]
    symbols = sorted({d for n in g.inputs() if n.type for d in n.type.shape if isinstance(d, str)})
    gen = torch.Generator().manual_seed(0)
    for cand in inputs:
        ok = True
        for b, t in ((2, 7), (3, 11)):
            sizes = dict(zip(symbols, (b, t) * len(symbols)))
            shape = [sizes.get(d, d) for d in cand.type.shape]
            pad = torch.randint(0, 2, shape, generator=gen)
            pad[:, 0] = 1  # every row attends somewhere
            try:
                m = _evaluate(mask_node, g, sizes, {cand.name: pad.to(getattr(torch, cand.type.dtype))})
            except Exception:  # noqa: BLE001 - not evaluable at these sizes: not this input
                ok = False
                break
            want = pad.bool()[:, None, None, :]
            if not isinstance(m, torch.Tensor) or m.dtype is not torch.bool or m.dim() != 4 or not torch.equal(m, want.expand_as(m)):
                ok = False
                break
        if ok:
            return cand.name
    return None


def _recognised_masks(g: Graph, dep: set[str]) -> dict[str, Any]:
    """attention node -> window (int) for masks that are causal (sliding-window) masks, or -> the input name (str)
    for key-padding masks read from an input."""
    found: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    for n in g.nodes:
        mask = _mask_arg(n)
        if not isinstance(mask, Ref):
            continue
        if mask.name not in cache:
            cache[mask.name] = recognise_mask(mask.name, g) if mask.name not in dep else recognise_padding(mask.name, g)
        if cache[mask.name] is not None:
            found[n.name] = cache[mask.name]
    return found


def _needed(g: Graph, masks: dict[str, Any]) -> set[str]:
    """Nodes the outputs need once recognised masks are replaced by attention attributes."""
    by_name = g.by_name()
    needed, stack = set(), [g.nodes[-1].name]
    while stack:
        cur = stack.pop()
        if cur in needed:
            continue
        needed.add(cur)
        n = by_name[cur]
        skip = _mask_arg(n).name if cur in masks else None
        stack.extend(r for r in n.refs() if r != skip)
    return needed


# ------------------------------------------------------------------------------------------ op lowering


def _lower_aten(c: _Ctx, n: Node, target: str, args: tuple, kw: dict) -> Any:
    """Core nodes for one aten operator call; returns what stands for its value, or raises KeyError."""
    name = n.name
    packet = target.split(".")[1] if target.startswith("aten.") else target
    if packet in _IDENTITY or (packet == "to" and _same_dtype(c, n, args)) or (packet == "dropout" and not _training(args, kw)):
        return c.ref(args[0])
    if packet in _UNARY_MAP:
        return c.emit(name, _UNARY_MAP[packet], args[0])
    if packet in _BINARY_MAP and "alpha" not in kw:
        return c.emit(name, _BINARY_MAP[packet], args[0], args[1])
    rule = _RULES.get(target) or _RULES.get(packet)
    if rule is None:
        raise KeyError(target)
    return rule(c, name, args, kw)


def _same_dtype(c: _Ctx, n: Node, args: tuple) -> bool:
    src = c.by_name.get(args[0].name) if isinstance(args[0], Ref) else None
    return bool(src and src.type and n.type and src.type.dtype == n.type.dtype)


def _training(args: tuple, kw: dict) -> bool:
    return bool(kw.get("train", args[2] if len(args) > 2 else False))


def _dtype(d: Any) -> str:
    return str(d).removeprefix("torch.")


def _cast_or_same(c: _Ctx, name: str, args: tuple, kw: dict) -> Any:
    dtype = kw.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
    return c.emit(name, "cast", args[0], dtype=_dtype(dtype)) if dtype is not None else c.ref(args[0])


def _flatten(c: _Ctx, name: str, args: tuple, kw: dict) -> Any:
    x, start, end = args[0], (args[1] if len(args) > 1 else 0), (args[2] if len(args) > 2 else -1)
    rank = len(c.by_name[x.name].type.shape)
    start, end = start % rank, end % rank
    dims = [c.emit(f"{name}__d{i}", "dim", x, axis=i) for i in range(rank)]
    merged = dims[start]
    for i in range(start + 1, end + 1):
        merged = c.emit(f"{name}__m{i}", "scalar_mul", merged, dims[i])
    return c.emit(name, "reshape", x, [*dims[:start], merged, *dims[end + 1:]])


def _split_parts(c: _Ctx, name: str, args: tuple, kw: dict) -> Any:
    """split/chunk: the parts are made when `getitem` picks them (a tuple value has no core form)."""
    return ("split", name, args, kw)


def _getitem(c: _Ctx, name: str, args: tuple, kw: dict) -> Any:
    parts, index = c.ref(args[0]), args[1]
    if not (isinstance(parts, tuple) and parts and parts[0] == "split"):
        raise KeyError("operator.getitem")
    _, src_name, sargs, skw = parts
    x = sargs[0]
    dim = skw.get("dim", sargs[2] if len(sargs) > 2 else 0)
    size = c.by_name[x.name].type.shape[dim]
    step = -(-size // sargs[1]) if c.by_name[src_name].attrs["target"].startswith("aten.chunk") else sargs[1]
    if not isinstance(step, int) or not isinstance(size, int):
        raise KeyError("aten.split with symbolic sizes")
    return c.emit(name, "slice", x, index * step, min(size, (index + 1) * step), dim=dim, step=1)


def _slice(c: _Ctx, name: str, args: tuple, kw: dict) -> Any:
    x, dim = args[0], (args[1] if len(args) > 1 else 0)
    start = args[2] if len(args) > 2 and args[2] is not None else 0
    stop = args[3] if len(args) > 3 and args[3] is not None else (1 << 62)
    step = args[4] if len(args) > 4 else 1
    return c.emit(name, "slice", x, start, stop, dim=dim, step=step)


def _dims(c: _Ctx, name: str, x: Any) -> list[Ref]:
    """`dim` nodes for every axis of traced value `x` (sizes known at run time only)."""
    return [c.emit(f"{name}__d{i}", "dim", x, axis=i) for i in range(len(c.by_name[x.name].type.shape))]


def _full_like(c: _Ctx, name: str, args: tuple, kw: dict) -> Any:
    dtype = kw.get("dtype") or getattr(torch, c.by_name[args[0].name].type.dtype)
    return c.emit(name, "full", _dims(c, name, args[0]), value=args[1], dtype=_dtype(dtype))


def _new_ones(c: _Ctx, name: str, args: tuple, kw: dict) -> Any:
    dtype = kw.get("dtype") or getattr(torch, c.by_name[args[0].name].type.dtype)
    return c.emit(name, "full", list(args[1]), value=1, dtype=_dtype(dtype))


def _add_inplace(c: _Ctx, name: str, args: tuple, kw: dict) -> Any:
    """add_ as add; the operand's name then stands for the sum, so readers after the mutation see it."""
    if "alpha" in kw or not isinstance(args[0], Ref):
        raise KeyError("aten.add_ with alpha or of a non-tensor")
    out = c.emit(name, "add", args[0], args[1])
    c.alias[args[0].name] = out
    return out


def _index(c: _Ctx, name: str, args: tuple, kw: dict) -> Any:
    """x[i0, ..., ik-1] with integer index tensors for the leading k axes (numpy advanced indexing): x viewed as
    [rows, rest] (rows: the leading k axes), the indices' broadcast linear row index picks rows with `gather`;
    negative indices count from the end."""
    x, indices = args[0], list(args[1])
    if not indices or not all(isinstance(i, Ref) and c.by_name[i.name].type.dtype == "int64" for i in indices):
        raise KeyError("aten.index with None, bool or int32 indices")
    sizes, k = _dims(c, name, x), len(indices)
    row, rows = None, 1  # the row index over axes j.. and how many rows those axes hold
    for j in reversed(range(k)):
        neg = c.emit(f"{name}__neg{j}", "lt", indices[j], 0)
        i = c.emit(f"{name}__i{j}", "where", neg, c.emit(f"{name}__wrap{j}", "add", indices[j], sizes[j]), indices[j])
        row = i if row is None else c.emit(f"{name}__row{j}", "add", c.emit(f"{name}__mul{j}", "mul", i, rows), row)
        rows = sizes[j] if rows == 1 else c.emit(f"{name}__rows{j}", "scalar_mul", sizes[j], rows)
    rest = 1
    for j in range(k, len(sizes)):
        rest = sizes[j] if rest == 1 else c.emit(f"{name}__rest{j}", "scalar_mul", rest, sizes[j])
    table = c.emit(f"{name}__table", "reshape", x, [rows, rest])
    flat = c.emit(f"{name}__flat", "unsqueeze", c.emit(f"{name}__row", "reshape", row, [-1]), dim=1)
    picked = c.emit(f"{name}__pick", "gather", table, c.emit(f"{name}__at", "expand", flat, [-1, rest]), dim=0)
    rank = max(len(c.by_name[i.name].type.shape) for i in indices)
    shape = [c.emit(f"{name}__rd{a}", "dim", row, axis=a) for a in range(rank)]
    return c.emit(name, "reshape", picked, shape + sizes[k:])


def _attention(c: _Ctx, name: str, q: Any, k: Any, v: Any, mask: Any, kw: dict, masks: dict[str, Any]) -> Any:
    causal, window = bool(kw.get("is_causal", False)), 0
    found = masks.get(name)
    if isinstance(found, int):
        causal, window, mask = True, found, None
    elif isinstance(found, str):  # key padding [B, T] from an input -> [B, 1, 1, T]
        pad = c.emit(f"{name}__pad", "ne", Ref(found), 0)
        mask = c.emit(f"{name}__mask", "unsqueeze", c.emit(f"{name}__pad1", "unsqueeze", pad, dim=1), dim=1)
    attrs = {"scale": kw.get("scale"), "causal": causal, "window": window}
    return c.emit(name, "attention", q, k, v, mask, **attrs)


def _mask_arg(n: Node) -> Any:
    """The attention mask operand of an attention node (sdpa or the fused GQA form), else None."""
    if n.op is Op.FUSED and n.attrs.get("kernel") == "gqa_attention":
        return n.args[7] if len(n.args) > 7 else n.kwargs.get("attn_mask")
    if n.attrs.get("target") == "aten.scaled_dot_product_attention.default":
        return n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
    return None


_IDENTITY = {"alias", "detach", "detach_", "contiguous", "clone", "lift_fresh_copy", "_assert_tensor_metadata"}
_UNARY_MAP = {p: p for p in ("neg", "abs", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "erf",
                             "relu", "silu", "logical_not")} | {"bitwise_not": "logical_not"}
_BINARY_MAP = {p: p for p in ("add", "sub", "mul", "div", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
                              "logical_and", "logical_or")} | {"__and__": "logical_and", "bitwise_and": "logical_and",
                                                                "__or__": "logical_or", "bitwise_or": "logical_or"}
_RULES: dict[str, Callable[[_Ctx, str, tuple, dict], Any]] = {
    "sym_size": lambda c, n, a, k: c.emit(n, "dim", a[0], axis=a[1]),
    "operator.add": lambda c, n, a, k: c.emit(n, "scalar_add", a[0], a[1]),
    "operator.sub": lambda c, n, a, k: c.emit(n, "scalar_sub", a[0], a[1]),
    "operator.mul": lambda c, n, a, k: c.emit(n, "scalar_mul", a[0], a[1]),
    "operator.floordiv": lambda c, n, a, k: c.emit(n, "scalar_floordiv", a[0], a[1]),
    "operator.getitem": _getitem,
    "split": _split_parts, "chunk": _split_parts,
    "view": lambda c, n, a, k: c.emit(n, "reshape", a[0], list(a[1])),
    "reshape": lambda c, n, a, k: c.emit(n, "reshape", a[0], list(a[1])),
    "_unsafe_view": lambda c, n, a, k: c.emit(n, "reshape", a[0], list(a[1])),
    "expand": lambda c, n, a, k: c.emit(n, "expand", a[0], list(a[1])),
    "permute": lambda c, n, a, k: c.emit(n, "permute", a[0], dims=list(a[1])),
    "transpose": lambda c, n, a, k: c.emit(n, "transpose", a[0], dim0=a[1], dim1=a[2]),
    "t": lambda c, n, a, k: c.emit(n, "transpose", a[0], dim0=0, dim1=1),
    "unsqueeze": lambda c, n, a, k: c.emit(n, "unsqueeze", a[0], dim=a[1]),
    "squeeze": lambda c, n, a, k: c.emit(n, "squeeze", a[0], dim=a[1]),
    "select": lambda c, n, a, k: c.emit(n, "select", a[0], dim=a[1], index=a[2]),
    "slice": _slice,
    "cat": lambda c, n, a, k: c.emit(n, "concat", list(a[0]), dim=a[1] if len(a) > 1 else k.get("dim", 0)),
    "flatten": _flatten,
    "to": _cast_or_same, "_to_copy": _cast_or_same,
    "type_as": lambda c, n, a, k: c.emit(n, "cast", a[0], dtype=c.by_name[n].type.dtype),
    "pow": lambda c, n, a, k: c.emit(n, "pow", a[0], exponent=a[1]),
    "mean": lambda c, n, a, k: c.emit(n, "mean", a[0], dims=list(a[1]), keepdim=bool(a[2] if len(a) > 2 else k.get("keepdim", False))),
    "sum": lambda c, n, a, k: c.emit(n, "sum", a[0], dims=list(a[1]), keepdim=bool(a[2] if len(a) > 2 else k.get("keepdim", False))),
    "softmax": lambda c, n, a, k: c.emit(n, "softmax", a[0], dim=a[1]),
    "_softmax": lambda c, n, a, k: c.emit(n, "softmax", a[0], dim=a[1]),
    "gelu": lambda c, n, a, k: c.emit(n, "gelu", a[0], approximate=k.get("approximate", "none")),
    "where": lambda c, n, a, k: c.emit(n, "where", a[0], a[1], a[2]),
    "matmul": lambda c, n, a, k: c.emit(n, "matmul", a[0], a[1]),
    "bmm": lambda c, n, a, k: c.emit(n, "matmul", a[0], a[1]),
    "mm": lambda c, n, a, k: c.emit(n, "matmul", a[0], a[1]),
    "addmm": lambda c, n, a, k: c.emit(n, "add", c.emit(n + "__mm", "matmul", a[1], a[2]), a[0]),
    "gather": lambda c, n, a, k: c.emit(n, "gather", a[0], a[2], dim=a[1]),
    # x[i, j] with index tensors (T5's padding mask reads its [B, T] input this way)
    "index": _index,
    "full_like": _full_like,  # sizes of the operand, read at run time
    "new_ones": _new_ones,  # the sizes given, the operand's dtype unless one is named
    "aten.min.other": lambda c, n, a, k: c.emit(n, "minimum", a[0], a[1]),  # min(a, b), not the reduction min.dim
    "add_": _add_inplace,  # out of place: the sum takes the operand's name for later readers
    "arange": lambda c, n, a, k: c.emit(n, "arange", a[0], dtype=_dtype(k.get("dtype") or torch.int64)),
    "layer_norm": lambda c, n, a, k: c.emit(n, "layernorm", a[0], a[2] if len(a) > 2 else None,
                                            a[3] if len(a) > 3 else None, eps=a[4] if len(a) > 4 else 1e-5),
    "conv2d": lambda c, n, a, k: c.emit(n, "conv2d", a[0], a[1], a[2] if len(a) > 2 else None,
                                        stride=tuple(a[3]) if len(a) > 3 else (1, 1),
                                        padding=tuple(a[4]) if len(a) > 4 else (0, 0)),
}


def legalize(graph: Graph) -> CoreGraph:
    """Lower `graph` into core ops; raise LegalizeError naming every node that has no lowering."""
    g = simplify(graph)
    masks = _recognised_masks(g, _data_dependent(g.nodes))
    needed = _needed(g, masks)
    c = _Ctx(g.by_name(), [], {})
    unsupported: list[tuple[str, str, str]] = []
    for n in g.nodes:
        if n.name not in needed and n.op is not Op.INPUT:
            continue
        args, kw = n.args, dict(n.kwargs)
        try:
            value = _lower_node(c, n, args, kw, masks)
        except (KeyError, IndexError, TypeError, AttributeError):
            target = n.attrs.get("target") or n.attrs.get("kernel") or n.op.value
            unsupported.append((n.name, str(target), graph.sources.get(n.name, "")))
            continue
        if value is not None and not (isinstance(value, Ref) and value.name == n.name):
            c.alias[n.name] = value
    if unsupported:
        raise LegalizeError(unsupported)
    return CoreGraph(_live(c.out), graph.params)


def _lower_node(c: _Ctx, n: Node, args: tuple, kw: dict, masks: dict[str, Any]) -> Any:
    if n.op is Op.INPUT:
        c.out.append(CoreNode(n.name, "input", attrs={"type": n.type}))
        return None
    if n.op is Op.PARAM:
        c.out.append(CoreNode(n.name, "param", attrs={"name": n.attrs["name"]}))
        return None
    if n.op is Op.OUTPUT:
        c.out.append(CoreNode(n.name, "output", tuple(c.ref(a) for a in args), {"single": n.attrs.get("single", len(args) == 1)}))
        return None
    if n.op in LINEAR_OPS:
        bias = args[2] if len(args) > 2 else None
        return c.emit(n.name, "linear", args[0], args[1], bias)
    if n.op is Op.EMBED:
        return c.emit(n.name, "embed", args[0], args[1])
    if n.op is Op.RMSNORM:
        return c.emit(n.name, "rmsnorm", args[0], args[1], eps=n.attrs["eps"])
    if n.op is Op.FUSED:
        kernel = n.attrs["kernel"]
        if kernel == "rope":
            return c.emit(n.name, "rope", args[0], args[1], args[2])
        if kernel == "rope_sin":
            return None  # only the fused rope reads it, and core rope does not
        if kernel == "gqa_attention":
            q, k, _, _, v, _, _, *rest = args
            return _attention(c, n.name, q, k, v, rest[0] if rest else kw.pop("attn_mask", None), kw, masks)
        if kernel == "repeat_kv":
            x, sizes, shape = args
            u = c.emit(n.name + "__u", "unsqueeze", x, dim=2)
            return c.emit(n.name, "reshape", c.emit(n.name + "__e", "expand", u, list(sizes)), list(shape))
        return _lower_aten(c, n, kernel, args, kw)
    target = n.attrs["target"]
    if target == "aten.scaled_dot_product_attention.default":
        mask = args[3] if len(args) > 3 else kw.get("attn_mask")
        if (args[4] if len(args) > 4 else kw.get("dropout_p", 0.0)) or kw.get("enable_gqa"):
            raise KeyError(target)
        return _attention(c, n.name, args[0], args[1], args[2], mask, kw, masks)
    return _lower_aten(c, n, target, args, kw)


def _live(nodes: list[CoreNode]) -> list[CoreNode]:
    """Drop nodes nothing reads (the recognised mask's subgraph, sizes only it used)."""
    used: set[str] = set()
    keep = []
    for n in reversed(nodes):
        if n.op in ("output", "input") or n.name in used:
            keep.append(n)
            used.update(_refs(n.args))
    return list(reversed(keep))
