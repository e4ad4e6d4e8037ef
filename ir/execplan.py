"""The execution plan of a core graph at given input shapes: what a device runtime (WebGPU; CUDA and Metal alike)
needs before it launches anything, derived from the op table's shape rules without running a kernel.

For every node: its shape and element type, and how it comes to be --

* `host`: a size (`dim`, `scalar_*`) computed on the host; operands that name it get the number;
* `alias`: the same elements in the same order as a contiguous operand (`reshape`, `squeeze`, `unsqueeze`): no
  launch, the operand's buffer under a new shape;
* `launch`: a kernel writes a fresh contiguous buffer. View ops that reorder or repeat elements (`transpose`,
  `permute`, `expand`, `slice`, `select`, a `reshape` of a strided operand) launch one strided copy each, described
  by `Launch.view` (the source's element offset and strides): kernels then only ever read contiguous operands, as
  the C library's do.

Element types on the device: float32, int32 (the graph's int64: token ids, positions and gather indices, all far
below 2^31; WGSL has no 64-bit integers) and bool (stored as 32-bit words where a language has no 1-byte storage).
Buffers: first fit over lifetimes in one arena, `ALIGN`-byte offsets (WebGPU's minimum storage offset alignment),
aliases extending their source's lifetime; graph outputs live to the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .core import CORE_OPS, _axis
from .coregraph import CoreGraph
from .graph import Ref

ALIGN = 256
DTYPE_BYTES = {"float32": 4, "int32": 4, "bool": 4}
_KIND = {"bool": 0, "int32": 1, "float32": 2}
_BY_KIND = {v: k for k, v in _KIND.items()}
TO_FLOAT = {"exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "erf", "silu", "gelu", "softmax", "mean",
            "rmsnorm", "layernorm", "rope", "attention", "div"}
COMPARE = {"eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not"}
REORDER = {"transpose", "permute", "expand", "slice", "select"}
ALIASES = {"reshape", "squeeze", "unsqueeze"}
HOST = {"dim", "scalar_add", "scalar_sub", "scalar_mul", "scalar_floordiv"}


class PlanError(ValueError):
    """The graph cannot be planned at these shapes: the message names the node."""


@dataclass
class Value:
    """A node's result: a host number (`scalar`) or a device tensor (`shape`, `dtype`, `buffer` id)."""

    name: str
    scalar: int | float | None = None
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    buffer: int = -1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Launch:
    """One kernel: `op` of the node `node` on `operands` (Values, host numbers, None, or lists of them), writing
    `out`. For a reordering view op, `view` = (element offset, strides) of the source that out[i...] reads."""

    node: str
    op: str
    operands: list
    attrs: dict[str, Any]
    out: Value
    view: tuple[int, tuple[int, ...]] | None = None


@dataclass
class Buffer:
    bytes: int
    offset: int = 0  # in the arena
    first: int = 0  # launch index that writes it (-1: before the first: inputs, params)
    last: int = 0  # last launch index that reads it
    role: str = "temp"  # "input" | "param" | "temp"


@dataclass
class Plan:
    values: dict[str, Value]
    launches: list[Launch]
    buffers: list[Buffer]
    outputs: list[Value]
    arena_bytes: int = 0
    inputs: list[Value] = field(default_factory=list)
    params: dict[str, Value] = field(default_factory=dict)  # parameter name -> its value


def device_dtype(dtype: str) -> str:
    return {"int64": "int32", "int32": "int32", "float32": "float32", "bool": "bool"}.get(dtype, dtype)


def _promote(*dtypes: str) -> str:
    return _BY_KIND[max(_KIND[d] for d in dtypes)]


def _scalar_kind(v: Any) -> str:
    return "bool" if isinstance(v, bool) else "int32" if isinstance(v, int) else "float32"


def _result_dtype(op: str, args: list, attrs: dict) -> str:
    """torch's result dtype for the op (ir/core.py's references), in device types."""
    tensors = [a.dtype for a in args if isinstance(a, Value) and a.scalar is None]
    if op in ("cast", "arange", "full"):
        return device_dtype(attrs.get("dtype", "int64"))
    if op in COMPARE:
        return "bool"
    if op in ("embed", "linear", "matmul", "conv2d"):
        return "float32"
    if op == "gather":
        return args[0].dtype
    if op == "concat":
        return _promote(*[a.dtype for a in args[0]])
    if op == "where":
        kinds = [a.dtype if isinstance(a, Value) and a.scalar is None else _scalar_kind(_host(a)) for a in args[1:]]
        return _promote(*kinds)
    if op in TO_FLOAT:
        return "float32"
    if op == "pow":
        return "float32" if tensors[0] == "float32" or not float(attrs["exponent"]).is_integer() else "int32"
    if op == "sum":
        return "int32" if tensors[0] == "bool" else tensors[0]
    if len(args) == 2:  # binary arithmetic: tensors promote; a Python number only lifts the kind (ir/core.py)
        kind = _promote(*tensors)
        for a in args:
            if not (isinstance(a, Value) and a.scalar is None):
                number = _scalar_kind(_host(a))
                if number == "float32" or (number == "int32" and kind == "bool"):
                    kind = _promote(kind, number)
        return kind
    return tensors[0]  # unary ops keep their operand's type (neg, abs, relu)


def _param_dtype(stored: Any) -> str:
    """Parameters live on the device as float32 (whatever float type the model stored), int32 or bool."""
    dtype = getattr(stored, "dtype", None)
    if dtype is None or getattr(dtype, "is_floating_point", True):
        return "float32"
    return "bool" if str(dtype) == "torch.bool" else "int32"


def _host(v: Any) -> Any:
    return v.scalar if isinstance(v, Value) else v


def _shape_view(v: Any) -> Any:
    """What a shape rule sees: a tensor's shape, a host number's value, lists elementwise."""
    if isinstance(v, Value):
        return v.shape if v.scalar is None else v.scalar
    if isinstance(v, (list, tuple)):
        return [_shape_view(x) for x in v]
    return v


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _view(op: str, src: Value, args: list, attrs: dict, out_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """(offset, strides) into the contiguous `src` whose elements out[i...] are, for a reordering op."""
    st = contiguous_strides(src.shape)
    rank = len(src.shape)
    if op == "transpose":
        s = list(st)
        a, b = _axis(attrs["dim0"], rank), _axis(attrs["dim1"], rank)
        s[a], s[b] = s[b], s[a]
        return 0, tuple(s)
    if op == "permute":
        return 0, tuple(st[_axis(d, rank)] for d in attrs["dims"])
    if op == "expand":
        lead = len(out_shape) - rank
        return 0, tuple(0 if i < lead or src.shape[i - lead] == 1 and out_shape[i] != 1 else st[i - lead]
                        for i in range(len(out_shape)))
    if op == "slice":
        d = _axis(attrs["dim"], rank)
        start, _, step = slice(_host(args[1]), _host(args[2]), attrs.get("step", 1)).indices(src.shape[d])
        s = list(st)
        s[d] *= step
        return start * st[d], tuple(s)
    if op == "select":
        d = _axis(attrs["dim"], rank)
        index = attrs["index"] % src.shape[d] if src.shape[d] else 0
        return index * st[d], st[:d] + st[d + 1:]
    raise AssertionError(op)


def _resolve(v: Any, values: dict[str, Value]) -> Any:
    if isinstance(v, Ref):
        return values[v.name]
    if isinstance(v, (list, tuple)):
        return [_resolve(x, values) for x in v]
    return v


def plan(graph: CoreGraph, inputs: list[tuple[tuple[int, ...], str]], param_shapes: dict[str, tuple] | None = None,
         packed: set[str] | None = None) -> Plan:
    """The plan for inputs of these (shape, dtype). `param_shapes`: each parameter's shape (default: the graph's
    stored tensors' shapes; a packed matrix's [out, in]); `packed`: parameter names held packed (matrices read by
    the packed kernels, no float buffer)."""
    from xbitc.quant.packed import PackedMatrix

    values: dict[str, Value] = {}
    launches: list[Launch] = []
    buffers: list[Buffer] = []
    plan_inputs: list[Value] = []
    params: dict[str, Value] = {}
    feed = iter(inputs)

    def new_buffer(v: Value, role: str, first: int) -> Value:
        v.buffer = len(buffers)
        buffers.append(Buffer(max(v.numel, 1) * DTYPE_BYTES[v.dtype], first=first, last=first, role=role))
        return v

    def read(v: Any, at: int) -> None:
        if isinstance(v, Value) and v.buffer >= 0:
            buffers[v.buffer].last = max(buffers[v.buffer].last, at)
        elif isinstance(v, list):
            for x in v:
                read(x, at)

    outputs: list[Value] = []
    for node in graph.nodes:
        if node.op == "input":
            try:
                shape, dtype = next(feed)
            except StopIteration:
                raise PlanError(f"input {node.name}: the graph takes more inputs than given") from None
            v = new_buffer(Value(node.name, shape=tuple(shape), dtype=device_dtype(dtype)), "input", -1)
            plan_inputs.append(v)
        elif node.op == "param":
            name = node.attrs["name"]
            stored = graph.params[name]
            shape = (param_shapes or {}).get(name)
            if shape is None:
                shape = tuple(stored.shape)  # a packed matrix's shape is [out, in] too
            v = Value(node.name, shape=tuple(shape), dtype=_param_dtype(stored))
            if not isinstance(stored, PackedMatrix) and name not in (packed or set()):
                new_buffer(v, "param", -1)
            params[name] = v
        elif node.op == "output":
            outputs = [_resolve(a, values) for a in node.args]
            for o in outputs:
                read(o, len(launches))
            values[node.name] = outputs[0]
            continue
        else:
            v = _plan_node(node, _resolve(list(node.args), values), launches, new_buffer, read)
        values[node.name] = v
    for o in outputs:  # outputs are read after the last launch
        if isinstance(o, Value) and o.buffer >= 0:
            buffers[o.buffer].last = len(launches)
    p = Plan(values, launches, buffers, outputs, inputs=plan_inputs, params=params)
    p.arena_bytes = _place([b for b in buffers if b.role == "temp"])
    return p


def _plan_node(node, args: list, launches: list[Launch], new_buffer, read) -> Value:
    op = CORE_OPS.get(node.op)
    if op is None:
        raise PlanError(f"node {node.name}: {node.op!r} is not a core op")
    try:
        shape = op.shape(*[_shape_view(a) for a in args], **node.attrs)
    except Exception as err:
        raise PlanError(f"node {node.name} ({node.op}): its shape rule fails at these shapes ({err})") from None
    if node.op in HOST:
        scalars = [_host(a) for a in args]
        value = args[0].shape[_axis(node.attrs["axis"], len(args[0].shape))] if node.op == "dim" \
            else op.reference(*scalars)
        return Value(node.name, scalar=value)
    shape = tuple(int(s) for s in shape)
    dtype = _result_dtype(node.op, args, node.attrs)
    src = args[0] if args else None
    if node.op in ALIASES:  # every device value is contiguous, so these are a new shape over the same buffer
        return Value(node.name, shape=shape, dtype=src.dtype, buffer=src.buffer)
    out = new_buffer(Value(node.name, shape=shape, dtype=src.dtype if node.op in REORDER else dtype), "temp",
                     len(launches))
    view = _view(node.op, src, args, node.attrs, shape) if node.op in REORDER else None
    read(args, len(launches))
    launches.append(Launch(node.name, node.op, args, dict(node.attrs), out, view))
    return out


def _place(buffers: list[Buffer]) -> int:
    """First fit: each buffer (in order of first write) at the lowest ALIGN-aligned offset free over its lifetime;
    the arena's size."""
    placed: list[Buffer] = []
    top = 0
    for b in sorted(buffers, key=lambda b: (b.first, -b.bytes)):
        live = sorted((p for p in placed if p.first <= b.last and b.first <= p.last), key=lambda p: p.offset)
        offset = 0
        for p in live:
            if offset + b.bytes <= p.offset:
                break
            offset = max(offset, -(-(p.offset + p.bytes) // ALIGN) * ALIGN)
        b.offset = offset
        placed.append(b)
        top = max(top, offset + b.bytes)
    return top
