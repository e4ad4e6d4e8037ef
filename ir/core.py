"""The core op set: the closed list of operators every deployment target implements, in one table.

A traced graph names ~60 aten operators per model family; a native target (the C library, NEON, CUDA, Metal,
WGSL) cannot implement aten. `passes/legalize.py` lowers a traced graph into a `CoreGraph` whose nodes name only
the ops below. Each entry holds everything an op means: its operands and attributes, its shape rule (what a target
evaluates at run time to size its output: sizes are only known then) and its reference implementation (torch; the
oracle every target is tested against). Operands are tensors, Python scalars, other nodes' values (`Ref`) or lists
of them; attributes are plain data.

Semantics that are not obvious from the name:
  - broadcasting binary ops follow numpy rules; a scalar operand takes the tensor's dtype unless it is of a higher
    kind (a float with an integer tensor: both float32), as Python numbers do in torch;
  - `rope(x, cos, sin)` is x*cos + rotate_half(x)*sin with rotate_half(x) = cat(-x[..., h:], x[..., :h]), h = d/2;
  - `attention(q [B,Hq,S,D], k [B,Hk,T,D], v [B,Hk,T,Dv], mask?)`: softmax(q kᵀ·scale + bias) v, query head h
    reading key head h // (Hq/Hk); query i sits at position T-S+i (keys before it come from a cache). `causal`
    allows keys at positions <= the query's, `window` W > 0 further only the last W of them, `mask` (broadcast to
    [B,Hq,S,T]) allows where true if bool (a key-padding mask is [B,1,1,T]) and is added to the scores if float
    (T5's position bias); a fully masked row gives zeros, as torch's scaled_dot_product_attention does (no model
    asks for one);
  - `mean` / `sum` over an empty dims list reduce every axis, as torch does;
  - `slice(x; dim, start, stop, step)` clamps start/stop into [0, size] like Python slicing;
  - `dim(x; axis)` and the `scalar_*` ops compute sizes (int64) that reshape, expand, slice and arange read.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .interp import rmsnorm

Shape = tuple[int, ...]


@dataclass(frozen=True)
class CoreOp:
    name: str
    operands: str  # documentation: names, '?' optional, '*' a list
    attrs: tuple[str, ...]
    shape: Callable[..., Any]  # (operand shapes or scalar values, **attrs) -> output shape (None: a scalar)
    reference: Callable[..., Any]  # (operand values, **attrs) -> value
    doc: str


# ------------------------------------------------------------------------------------------ shape rule helpers


def shape_operand(v: Any) -> Any:
    """What a shape rule sees of an operand: a tensor's shape, a list's elements likewise, a scalar's value."""
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, (list, tuple)):
        return [shape_operand(x) for x in v]
    return v


def broadcast(*shapes: Any) -> Shape:
    shapes = tuple(s if isinstance(s, tuple) else () for s in shapes)  # a scalar operand broadcasts as 0-d
    out: list[int] = []
    for dims in zip(*(((1,) * (max(map(len, shapes)) - len(s)) + tuple(s)) for s in shapes)):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _axis(d: int, rank: int) -> int:
    if not -rank <= d < max(rank, 1):
        raise ValueError(f"axis {d} out of range for rank {rank}")
    return d % max(rank, 1)


def _reduce(s: Shape, dims: list[int], keepdim: bool) -> Shape:
    axes = {_axis(d, len(s)) for d in dims} if dims else set(range(len(s)))
    return tuple(1 if i in axes else n for i, n in enumerate(s) if keepdim or i not in axes)


def _reshape(s: Shape, shape: list[int]) -> Shape:
    total = math.prod(s)
    known = math.prod(n for n in shape if n != -1)
    out = tuple(total // known if n == -1 else n for n in shape)
    if math.prod(out) != total:
        raise ValueError(f"cannot reshape {s} to {shape}")
    return out


def _expand(s: Shape, shape: list[int]) -> Shape:
    lead = len(shape) - len(s)
    return tuple(s[i - lead] if n == -1 else n for i, n in enumerate(shape))


def _slice(s: Shape, dim: int, start: int, stop: int, step: int) -> Shape:
    d = _axis(dim, len(s))
    return s[:d] + (len(range(*slice(start, stop, step).indices(s[d]))),) + s[d + 1:]


def _concat(shapes: list[Shape], dim: int) -> Shape:
    shapes = [s for s in shapes if s != (0,)]  # torch skips empty 1-D operands
    d = _axis(dim, len(shapes[0]))
    return shapes[0][:d] + (sum(s[d] for s in shapes),) + shapes[0][d + 1:]


def _permute(s: Shape, dims: list[int]) -> Shape:
    return tuple(s[_axis(d, len(s))] for d in dims)


def _transpose(s: Shape, dim0: int, dim1: int) -> Shape:
    order = list(range(len(s)))
    a, b = _axis(dim0, len(s)), _axis(dim1, len(s))
    order[a], order[b] = order[b], order[a]
    return _permute(s, order)


def _matmul(a: Shape, b: Shape) -> Shape:
    if len(b) == 1:
        return a[:-1]
    return broadcast(a[:-2], b[:-2]) + (a[-2], b[-1])


# ------------------------------------------------------------------------------------------ reference helpers


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin


def causal_mask(S: int, T: int, window: int = 0, causal: bool = True) -> torch.Tensor:
    """[S, T] bool: which of T keys each of S queries (at positions T-S..T-1) may attend to."""
    qpos = torch.arange(T - S, T).unsqueeze(-1)
    kpos = torch.arange(T).unsqueeze(0)
    allowed = kpos <= qpos if causal else torch.ones(S, T, dtype=torch.bool)
    return allowed & (kpos > qpos - window) if window else allowed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
              scale: float | None = None, causal: bool = False, window: int = 0) -> torch.Tensor:
    if causal or window:
        allowed = causal_mask(q.shape[-2], k.shape[-2], window, causal)
        mask = allowed if mask is None else mask & allowed
    gqa = q.shape[-3] != k.shape[-3]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _to_list(v: Any) -> list:
    return [int(x) for x in v]


_UNARY = {
    "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "erf": torch.erf,
    "relu": torch.relu, "silu": F.silu, "logical_not": torch.logical_not,
}
_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "maximum": torch.maximum,
    "minimum": torch.minimum, "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt,
    "ge": torch.ge, "logical_and": torch.logical_and, "logical_or": torch.logical_or,
}
_SCALAR = {"scalar_add": operator.add, "scalar_sub": operator.sub, "scalar_mul": operator.mul,
           "scalar_floordiv": operator.floordiv}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
           "int32": torch.int32, "bool": torch.bool}


def _with_scalar(t: torch.Tensor, value: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A tensor and a Python number as two tensors of torch's result type for them: the number takes the tensor's
    dtype unless it is of a higher kind (a float with an integer tensor: float32; an int with a bool tensor: int64)."""
    if isinstance(value, float) and not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.float32)
    elif isinstance(value, int) and not isinstance(value, bool) and t.dtype is torch.bool:
        t = t.to(torch.int64)
    return t, torch.tensor(value, dtype=t.dtype)


def _binary(fn: Callable) -> Callable:
    def run(a: Any, b: Any) -> torch.Tensor:
        if not isinstance(a, torch.Tensor):
            b, a = _with_scalar(b, a)
        elif not isinstance(b, torch.Tensor):
            a, b = _with_scalar(a, b)
        return fn(a, b)
    return run


def _table() -> dict[str, CoreOp]:
    ops = [
        CoreOp("embed", "ids, table", (), lambda ids, t: ids + t[1:], lambda ids, t: F.embedding(ids, t),
               "rows of table [V, D] at ids (int64): ids.shape + [D]"),
        CoreOp("linear", "x, weight, bias?", (), lambda x, w, b=None: x[:-1] + (w[0],),
               lambda x, w, b=None: F.linear(x, w, b), "x Wᵀ + b; W [N, K] float or packed (the target's kernel)"),
        CoreOp("matmul", "a, b", (), _matmul, torch.matmul, "batched matrix product (numpy matmul rules)"),
        CoreOp("conv2d", "x, weight, bias?", ("stride", "padding"),
               lambda x, w, b=None, stride=(1, 1), padding=(0, 0): (x[0], w[0]) + tuple(
                   (x[2 + i] + 2 * padding[i] - w[2 + i]) // stride[i] + 1 for i in range(2)),
               lambda x, w, b=None, stride=(1, 1), padding=(0, 0): F.conv2d(x, w, b, stride, padding),
               "2-D convolution, NCHW (vision patch embeddings)"),
        CoreOp("rmsnorm", "x, weight", ("eps",), lambda x, w, eps: x, lambda x, w, eps: rmsnorm(x, w, eps),
               "x / sqrt(mean(x², -1) + eps) * weight, computed in float32"),
        CoreOp("layernorm", "x, weight?, bias?", ("eps",), lambda x, w=None, b=None, eps=1e-5: x,
               lambda x, w=None, b=None, eps=1e-5: F.layer_norm(x, x.shape[-1:], w, b, eps),
               "(x - mean) / sqrt(var + eps) * weight + bias over the last axis"),
        CoreOp("rope", "x, cos, sin", (), lambda x, c, s: broadcast(x, c, s), rope, "rotary embedding, half rotation"),
        CoreOp("attention", "q, k, v, mask?", ("scale", "causal", "window"),
               lambda q, k, v, m=None, **a: q[:-1] + (v[-1],), attention, "scaled dot-product attention (see above)"),
        CoreOp("softmax", "x", ("dim",), lambda x, dim: x, lambda x, dim: torch.softmax(x, dim), "softmax along dim"),
        CoreOp("gelu", "x", ("approximate",), lambda x, approximate="none": x,
               lambda x, approximate="none": F.gelu(x, approximate=approximate), "GELU, exact (erf) or tanh"),
        CoreOp("pow", "x", ("exponent",), lambda x, exponent: x, lambda x, exponent: torch.pow(x, exponent),
               "x ** exponent (a scalar)"),
        CoreOp("where", "cond, a, b", (), lambda c, a, b: broadcast(c, a, b),
               lambda c, a, b: torch.where(c, a, b), "a where cond else b"),
        CoreOp("mean", "x", ("dims", "keepdim"), lambda x, dims, keepdim=False: _reduce(x, dims, keepdim),
               lambda x, dims, keepdim=False: x.mean(dims, keepdim), "mean over dims"),
        CoreOp("sum", "x", ("dims", "keepdim"), lambda x, dims, keepdim=False: _reduce(x, dims, keepdim),
               lambda x, dims, keepdim=False: x.sum(dims, keepdim), "sum over dims"),
        CoreOp("reshape", "x, shape*", (), lambda x, shape: _reshape(x, _to_list(shape)),
               lambda x, shape: x.reshape(_to_list(shape)), "the same elements in row-major order, new shape"),
        CoreOp("expand", "x, shape*", (), lambda x, shape: _expand(x, _to_list(shape)),
               lambda x, shape: x.expand(_to_list(shape)), "broadcast to shape (-1 keeps a size)"),
        CoreOp("transpose", "x", ("dim0", "dim1"), _transpose, lambda x, dim0, dim1: x.transpose(dim0, dim1),
               "swap two axes"),
        CoreOp("permute", "x", ("dims",), _permute, lambda x, dims: x.permute(dims), "reorder axes"),
        CoreOp("unsqueeze", "x", ("dim",), lambda x, dim: (x[:_axis(dim, len(x) + 1)] + (1,) + x[_axis(dim, len(x) + 1):]),
               lambda x, dim: x.unsqueeze(dim), "insert a size-1 axis"),
        CoreOp("squeeze", "x", ("dim",), lambda x, dim: x[:_axis(dim, len(x))] + x[_axis(dim, len(x)) + 1:]
               if x[_axis(dim, len(x))] == 1 else x, lambda x, dim: x.squeeze(dim), "drop a size-1 axis"),
        CoreOp("slice", "x, start, stop", ("dim", "step"), lambda x, start, stop, dim, step=1: _slice(x, dim, start, stop, step),
               lambda x, start, stop, dim, step=1: x[(slice(None),) * _axis(dim, x.dim()) + (slice(start, stop, step),)],
               "elements start:stop:step along dim (Python slicing)"),
        CoreOp("select", "x", ("dim", "index"), lambda x, dim, index: x[:_axis(dim, len(x))] + x[_axis(dim, len(x)) + 1:],
               lambda x, dim, index: x.select(dim, index), "one index along dim, which disappears"),
        CoreOp("concat", "xs*", ("dim",), lambda xs, dim: _concat(xs, dim), lambda xs, dim: torch.cat(xs, dim),
               "join along dim (empty 1-D operands skipped)"),
        CoreOp("cast", "x", ("dtype",), lambda x, dtype: x, lambda x, dtype: x.to(_DTYPES[dtype]), "convert dtype"),
        CoreOp("arange", "end", ("dtype",), lambda end, dtype="int64": (int(end),),
               lambda end, dtype="int64": torch.arange(int(end), dtype=_DTYPES[dtype]), "0, 1, ..., end-1"),
        CoreOp("full", "shape*", ("value", "dtype"), lambda shape, value, dtype: tuple(_to_list(shape)),
               lambda shape, value, dtype: torch.full(_to_list(shape), value, dtype=_DTYPES[dtype]),
               "a tensor filled with value"),
        CoreOp("gather", "x, index", ("dim",), lambda x, index, dim: index,
               lambda x, index, dim: torch.gather(x, dim, index), "out[i][j] = x[i][index[i][j]] along dim (int64 index)"),
        CoreOp("dim", "x", ("axis",), lambda x, axis: None, lambda x, axis: x.shape[axis], "a size of x (a scalar)"),
    ]
    for name, fn in _UNARY.items():
        ops.append(CoreOp(name, "x", (), lambda x: x, fn, f"elementwise {name}"))
    for name, fn in _BINARY.items():
        ops.append(CoreOp(name, "a, b", (), lambda a, b: broadcast(a, b), _binary(fn),
                          f"elementwise {name} with broadcasting"))
    for name, fn in _SCALAR.items():
        ops.append(CoreOp(name, "a, b", (), lambda a, b: None, fn, f"size arithmetic: {fn.__name__}"))
    return {op.name: op for op in ops}


CORE_OPS: dict[str, CoreOp] = _table()


def markdown() -> str:
    """The table as docs/core-ops.md shows it (tests/test_legalize.py keeps the two equal)."""
    head = __doc__.split("\n\n", 1)[1].strip()
    rows = ["| op | operands | attributes | meaning |", "|---|---|---|---|"]
    rows += [f"| `{op.name}` | {op.operands} | {', '.join(op.attrs) or '-'} | {op.doc} |" for op in CORE_OPS.values()]
    return ("# Core ops\n\nGenerated from `ir/core.py` (`python -m xbitc.ir.core > docs/core-ops.md`); shape rules and "
            "reference implementations are the code there.\n\n" + head + "\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    print(markdown(), end="")
