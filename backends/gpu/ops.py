"""The core ops (docs/core-ops.md) as lang.py kernels: elementwise ops, casts, views, constructors, concat, gather,
embed, reductions, softmax, norms and rope (the matrix products, attention and convolution are in ops_nn.py;
launches.py maps a planned launch onto both).

Every function here turns one planned launch (ir/execplan.py `Launch`) into `Call`s: a kernel, what to bind to its
storage buffers (plan `Value`s, parts of a packed matrix, or scratch), its uniform parameters and its grid. Sizes,
strides and offsets are uniform parameters, so one pipeline serves every call of the same op, element types and
rank; kernels are built once per such key (lru_cache) and a runtime caches their pipelines.

Element types on the device: float32 (f32), int32 (i32: the graph's int64) and bool (u32 0/1: no storage type is
narrower than 32 bits in WGSL). Computation follows ir/core.py's references: numpy broadcasting (each operand's
broadcast strides are parameters: dims of size 1 step 0), torch's type promotion with Python numbers, division
always in float, comparisons in the promoted type, logical ops on `x != 0`.

Every storage buffer is declared read_write, also those a kernel only reads: a runtime binds sub-ranges of one arena
buffer, and WebGPU refuses a buffer bound read-only and writable in one dispatch. Sub-ranges that are alive together
never overlap (the plan's first fit), so this changes nothing a kernel computes.

Where results are not bit-exact with torch: GPU exp/log/tanh are a few float32 ulps off (lavapipe: exp 2e-6
relative at |x| = 30); erf (WGSL has none) is a Taylor series below |x| = 1 and Numerical Recipes' erfc fit (fractional
error 1.2e-7) above: 1.7e-7 absolute at worst on lavapipe over [-10, 10] (torch's float32 erf: 3e-8); sums run as
per-thread partial sums and a tree, not in torch's order.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from .lang import (Expr, Kernel, bitcast, const, exp, f32, i32, maximum, minimum, rsqrt, select, sqrt, tanh, u32)
from . import lang

WG = 256  # threads of the elementwise kernels
ROW_WG = 64  # threads of the one-row-per-workgroup kernels (norms, softmax, wide reductions)
MAX_GROUPS = 65535  # workgroups per grid dimension (WebGPU's default limit)
MAX_RANK = 6  # after merging dims that step alike: far above what models reach (5)
STORE = {"float32": f32, "int32": i32, "bool": u32}  # storage / uniform type of each element type
SUFFIX = {"float32": "f", "int32": "i", "bool": "b"}


class GpuOpError(ValueError):
    """A launch these kernels cannot run (the message names the node)."""


@dataclass(frozen=True)
class Packed:
    """A part of a packed matrix's GPU layout (backends/gpu/packed.py `GpuMatrix`): words, pieces, src or dst."""

    param: str
    part: str


@dataclass(frozen=True)
class Scratch:
    """Bytes of the runtime's scratch buffer (offsets 256-aligned), alive for one launch's calls only."""

    offset: int
    nbytes: int


@dataclass
class Call:
    kernel: Kernel
    bind: list  # per storage buffer, in declaration order: a plan Value, Packed or Scratch
    params: dict[str, Any]
    groups: tuple[int, int, int]


class Env:
    """What the op functions ask of the runtime that will bind their calls."""

    def matrix(self, value: Any) -> tuple[str, Any] | None:
        """(parameter name, GpuMatrix) when `value` is a packed parameter, else None (a float tensor)."""
        return None

    def in_arena(self, value: Any) -> bool:
        """Whether `value` lives in the temporaries' arena (a kernel that reads it read-only cannot write there)."""
        return True


# ------------------------------------------------------------------------------------------------ host helpers


def grid(groups: int) -> tuple[int, int, int]:
    """`groups` workgroups as a 2-D grid within the per-dimension limit; kernels flatten it back (`flat_group`)."""
    gx = max(1, min(groups, MAX_GROUPS))
    gy = -(-groups // gx)
    if gy > MAX_GROUPS:
        raise GpuOpError(f"{groups} workgroups exceed the grid's {MAX_GROUPS}^2")
    return gx, max(gy, 1), 1


def contiguous(shape) -> list[int]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return out[::-1]


def bstrides(shape, out_shape) -> list[int]:
    """Strides of a contiguous tensor of `shape` read at the broadcast `out_shape` (size-1 dims step 0)."""
    st = contiguous(shape)
    lead = len(out_shape) - len(shape)
    return [0 if i < lead or shape[i - lead] == 1 else st[i - lead] for i in range(len(out_shape))]


def collapse(shape, strides: list[list[int]], keep_last: bool = False) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dims that every operand steps through alike and drop size-1 dims: fewer divisions per
    element, and most elementwise calls become rank 1. `keep_last` keeps the last dim apart (rope needs it)."""
    dims = [(n, [s[i] for s in strides]) for i, n in enumerate(shape)]
    last = dims.pop() if keep_last and dims else None
    dims = [d for d in dims if d[0] != 1]
    merged: list = []
    for n, st in dims:
        if merged and all(p == s * n for p, s in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    if last is not None:
        merged.append(last)
    if not merged:
        merged = [(1, [0] * len(strides))]
    return [n for n, _ in merged], [[st[j] for _, st in merged] for j in range(len(strides))]


def numel(shape) -> int:
    return math.prod(shape)


def is_tensor(v: Any) -> bool:
    return getattr(v, "scalar", 0) is None  # a plan Value holding a device tensor


def host(v: Any) -> Any:
    """A host number: a Python literal or a host Value's."""
    return v.scalar if hasattr(v, "scalar") else v


def kind_of(v: Any) -> str:
    if is_tensor(v):
        return v.dtype
    v = host(v)
    return "bool" if isinstance(v, bool) else "int32" if isinstance(v, int) else "float32"


_RANK = {"bool": 0, "int32": 1, "float32": 2}


def promote(kinds: list[tuple[str, bool]]) -> str:
    """torch's result type of a binary op from its operands' (kind, is a tensor) (ir/core.py `_with_scalar`):
    tensors promote; a Python number raises the kind only (a float with an integer tensor gives float32, an int
    with a bool tensor int)."""
    kind = max([k for k, t in kinds if t] or ["bool"], key=_RANK.get)
    for k, t in kinds:
        if not t and (k == "float32" or (k == "int32" and kind == "bool")):
            kind = max((kind, k), key=_RANK.get)
    return kind


def scalar_param(v: Any, kind: str) -> Any:
    """A host number as the uniform of `kind` (bool as u32)."""
    v = host(v)
    return float(v) if kind == "float32" else int(v) if kind == "int32" else int(bool(v))


# ------------------------------------------------------------------------------------------------ kernel helpers


def flat_thread(k: Kernel, wg: int = WG) -> Expr:
    """The thread's index over a `grid` of 1-D workgroups of `wg` threads."""
    return k.let("i", k.global_id(0) + k.global_id(1) * (k.num_groups(0) * wg))


def flat_group(k: Kernel) -> Expr:
    return k.let("g", k.group_id(0) + k.group_id(1) * k.num_groups(0))


def coords(k: Kernel, i: Expr, dims: list[Expr], prefix: str = "c") -> list[Expr]:
    """Row-major coordinates of flat index i over a shape whose sizes after the first are `dims`."""
    out: list[Expr] = [i] * (len(dims) + 1)
    rem = i
    for j in range(len(dims), 0, -1):
        out[j] = k.let(f"{prefix}{j}", rem % dims[j - 1])
        rem = k.let(f"{prefix}q{j}", rem / dims[j - 1]) if j > 1 else rem / dims[j - 1]
    out[0] = rem if len(dims) else i
    return out


def dot(cs: list[Expr], strides: list[Expr], base: Expr | None = None) -> Expr:
    e = base
    for c, s in zip(cs, strides):
        e = c * s if e is None else e + c * s
    return e


def convert(e: Expr, src: str, dst: str) -> Expr:
    """A loaded value (its storage type for `src`) as the computation type of `dst`."""
    if src == dst:
        return e.ne(0) if src == "bool" else e
    if dst == "bool":
        return e.ne(0.0) if src == "float32" else e.ne(0)
    return e.cast(STORE[dst])  # a bool's u32 0/1 converts as the number it is


def as_stored(e: Expr, kind: str) -> Expr:
    """A computed value of `kind` in its storage type (bool -> u32 0/1)."""
    return select(e, const(1, u32), const(0, u32)) if kind == "bool" else e


def is_nan(x: Expr) -> Expr:
    """Bit test: drivers may fold x != x away under their fast-math rules."""
    return (bitcast(x, u32) & 0x7FFFFFFF) > 0x7F800000


NAN = float("nan")


def tree(k: Kernel, red, t: Expr, n: int, combine: Callable[[Expr, Expr], Expr]) -> Expr:
    """Reduce red[0..n) (written, barrier not yet reached) to red[0]; every thread gets it. Leaves a barrier after
    the read, so red can be written again."""
    k.barrier()
    s = n // 2
    while s:
        with k.if_(t < s):
            red[t] = combine(red[t], red[t + s])
        k.barrier()
        s //= 2
    out = k.let("total", red[0])
    k.barrier()
    return out


def erf(k: Kernel, x: Expr) -> Expr:
    """erf in float32: Taylor series below |x| = 1 (terms to x^23), 1 - erfc above with Numerical Recipes' erfcc fit
    (fractional error 1.2e-7); 1.7e-7 absolute at worst, measured against math.erf (float32 rounding near |x| = 1
    dominates)."""
    s = k.let("es", x * x)
    taylor = [(-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(12)]  # erf = 2/sqrt(pi) x sum c_n x^2n
    series = const(taylor[-1], f32)
    for c in reversed(taylor[:-1]):
        series = series * s + c
    small = k.let("esmall", x * series * (2 / math.sqrt(math.pi)))
    z = k.let("ez", abs(x))
    t = k.let("et", 1.0 / (z * 0.5 + 1.0))
    poly = const(0.17087277, f32)
    for c in (-0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196, 1.00002368,
              -1.26551223):
        poly = t * poly + c
    big = k.let("ebig", 1.0 - t * exp(poly - z * z))
    return select(z < 1.0, small, select(x < 0.0, -big, big))


# ------------------------------------------------------------------------------------------------ elementwise

def _compute_kind(op: str, operands: list[tuple[str, bool]], out_kind: str) -> str:
    """The type an elementwise op computes in: float for division and the transcendental ops, the promoted type
    for comparisons (their result is bool), bool for logical ops, else the result's."""
    if op == "div" or op in UNARY_FLOAT or op == "gelu":
        return "float32"
    if op in COMPARE:
        return promote(operands)
    if op in ("logical_and", "logical_or", "logical_not"):
        return "bool"
    return out_kind


UNARY_FLOAT = {"exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "erf", "silu"}
COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}


def _unary(k: Kernel, op: str, x: Expr, kind: str, attrs: tuple) -> Expr:
    if op == "neg":
        return -x
    if op == "abs":
        return abs(x)
    if op == "relu":
        return select(x < 0.0, 0.0, x) if kind == "float32" else maximum(x, 0)  # NaN stays NaN
    if op == "logical_not":
        return ~x
    if op in ("sin", "cos", "exp", "log", "sqrt", "rsqrt", "tanh"):
        return getattr(lang, op)(x)
    if op == "sigmoid":
        return 1.0 / (1.0 + exp(-x))
    if op == "silu":
        return x / (1.0 + exp(-x))
    if op == "erf":
        return erf(k, x)
    if op == "gelu":
        if dict(attrs)["approximate"] == "tanh":
            inner = (x + (x * x * x) * 0.044715) * 0.7978845608028654
            return x * 0.5 * (1.0 + tanh(inner))
        return x * 0.5 * (1.0 + erf(k, x * 0.7071067811865476))
    if op == "pow":
        return _pow(k, x, dict(attrs)["exponent"], kind)
    raise AssertionError(op)


def _pow(k: Kernel, x: Expr, e: float, kind: str) -> Expr:
    """x ** e: integer exponents by repeated squaring (exact for integers, as torch's fast paths for 2 and 3 are
    for floats; a few roundings otherwise), square roots by sqrt, other exponents as exp(e log x) (a negative base
    to a fractional power is NaN)."""
    if float(e).is_integer():
        n, acc, base = abs(int(e)), None, x
        while n:
            if n & 1:
                acc = base if acc is None else k.let("pw", acc * base)
            n >>= 1
            if n:
                base = k.let("pb", base * base)
        acc = acc if acc is not None else (const(1.0, f32) if kind == "float32" else const(1, i32))
        return 1.0 / acc if e < 0 else acc
    if e == 0.5:
        return sqrt(x)
    if e == -0.5:
        return rsqrt(x)
    r = k.let("pr", exp(lang.log(abs(x)) * float(e)))
    return select(x < 0.0, NAN, select(x.eq(0.0), 0.0 if e > 0 else float("inf"), r))


def _binary(op: str, a: Expr, b: Expr, kind: str) -> Expr:
    if kind == "bool" and op in ("add", "mul", "maximum", "minimum"):  # torch's bool arithmetic saturates
        return a | b if op in ("add", "maximum") else a & b
    if op in ("add", "sub", "mul", "div"):
        return {"add": a + b, "sub": a - b, "mul": a * b, "div": a / b}[op]
    if op in ("maximum", "minimum"):
        r = maximum(a, b) if op == "maximum" else minimum(a, b)
        return select(is_nan(a) | is_nan(b), NAN, r) if kind == "float32" else r
    if op in COMPARE:
        if kind == "bool":  # bool compares as integers
            a, b = a.cast(u32), b.cast(u32)
        return {"eq": a.eq(b), "ne": a.ne(b), "lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[op]
    if op == "logical_and":
        return a & b
    if op == "logical_or":
        return a | b
    raise AssertionError(op)


@lru_cache(maxsize=None)
def map_kernel(op: str, kinds: tuple, tensors: tuple, out_kind: str, rank: int, out_strided: bool = False,
               attrs: tuple = ()) -> Kernel:
    """out[i] = op(operands at i) over a rank-`rank` iteration shape: each tensor operand is read at its own offset
    and strides (broadcasting: stride 0; views: any), each scalar operand is a uniform. `kinds`: the operands'
    element types; the result is written contiguously, or at `out` offset + strides for concat's pieces.
    op "copy" converts operand 0 to out_kind (cast, views, concat), "arange" writes i, "full" a uniform."""
    key = "_".join([op, *(SUFFIX[k] + ("" if t else "s") for k, t in zip(kinds, tensors)), SUFFIX[out_kind],
                    f"r{rank}"] + (["ostr"] if out_strided else []))
    k = Kernel(key + "".join("_" + re.sub(r"[^A-Za-z0-9]", "_", str(v)) for _, v in attrs), (WG,),
               doc=f"{op}: elementwise over a rank-{rank} shape (backends/gpu/ops.py)")
    bufs = [k.buffer(f"a{j}", STORE[kd], write=True) if t else None for j, (kd, t) in enumerate(zip(kinds, tensors))]
    out = k.buffer("out", STORE[out_kind], write=True)
    n = k.param("n", u32)
    dims = [k.param(f"d{j}", u32) for j in range(1, rank)]
    offs, strides, scalars = {}, {}, {}
    for j, t in enumerate(tensors):
        if t:
            offs[j] = k.param(f"a{j}_o", u32)
            strides[j] = [k.param(f"a{j}_s{d}", u32) for d in range(rank)]
        else:
            scalars[j] = k.param(f"a{j}_v", STORE[kinds[j]])
    if out_strided:
        o_off = k.param("o_o", u32)
        o_st = [k.param(f"o_s{d}", u32) for d in range(rank)]
    value = None
    if op == "full":
        value = k.param("value", STORE[out_kind])
    i = flat_thread(k)
    with k.if_(i < n):
        cs = coords(k, i, dims) if rank > 1 else [i]
        loaded = []
        for j in range(len(kinds)):
            if tensors[j]:
                loaded.append(k.let(f"v{j}", bufs[j][dot(cs, strides[j], offs[j])]))
            else:
                loaded.append(scalars[j])
        if op == "copy":
            if kinds[0] == out_kind:
                r = loaded[0]  # storage to storage: no conversion (bools stay 0/1 words)
            else:
                r = as_stored(convert(loaded[0], kinds[0], out_kind), out_kind)
        elif op == "arange":
            r = i if out_kind == "bool" else i.cast(STORE[out_kind])
        elif op == "full":
            r = value
        elif op == "where":
            ct = out_kind
            a = convert(loaded[1], kinds[1], ct)
            b = convert(loaded[2], kinds[2], ct)
            r = as_stored(select(convert(loaded[0], kinds[0], "bool"), a, b), ct)
        elif len(kinds) == 2:
            ct = _compute_kind(op, list(zip(kinds, tensors)), out_kind)
            a, b = (convert(v, kd, ct) for v, kd in zip(loaded, kinds))
            r = as_stored(_binary(op, a, b, ct), out_kind)
        else:
            ct = _compute_kind(op, [(kinds[0], True)], out_kind)
            r = as_stored(_unary(k, op, convert(loaded[0], kinds[0], ct), ct, attrs), out_kind)
        out[dot(cs, o_st, o_off) if out_strided else i] = r
    return k


def map_call(op: str, operands: list, out, attrs: tuple = (), views: dict | None = None,
             out_view: tuple | None = None, shape: tuple | None = None) -> list[Call]:
    """The call computing `op` elementwise over `shape` (default: out's). Tensor operands broadcast to it unless
    `views` gives their (offset, strides); `out_view` = (offset, strides) writes out strided (concat)."""
    shape = tuple(out.shape if shape is None else shape)
    if numel(shape) == 0:
        return []
    views = views or {}
    tens = [j for j, v in enumerate(operands) if is_tensor(v)]
    offsets = [views[j][0] if j in views else 0 for j in tens]
    st = [list(views[j][1]) if j in views else bstrides(operands[j].shape, shape) for j in tens]
    if out_view is not None:
        st.append(list(out_view[1]))
    dims, st = collapse(shape, st)
    rank = len(dims)
    if rank > MAX_RANK:
        raise GpuOpError(f"{out.name} ({op}): rank {rank} after merging dims, above {MAX_RANK}")
    kinds = tuple(kind_of(v) for v in operands)
    tensors = tuple(is_tensor(v) for v in operands)
    k = map_kernel(op, kinds, tensors, out.dtype, rank, out_view is not None, attrs)
    params: dict[str, Any] = {"n": numel(shape)}
    params.update({f"d{j}": dims[j] for j in range(1, rank)})
    for j, off, s in zip(tens, offsets, st):
        params[f"a{j}_o"] = off
        params.update({f"a{j}_s{d}": s[d] for d in range(rank)})
    for j, v in enumerate(operands):
        if not tensors[j]:
            params[f"a{j}_v"] = scalar_param(v, kinds[j])
    if out_view is not None:
        params["o_o"] = out_view[0]
        params.update({f"o_s{d}": st[-1][d] for d in range(rank)})
    return [Call(k, [operands[j] for j in tens] + [out], params, grid(-(-numel(shape) // WG)))]


def _attrs(launch, *names) -> tuple:
    return tuple((n, launch.attrs[n]) for n in names)


def elementwise(launch, env: Env) -> list[Call]:
    op, args = launch.op, launch.operands
    if op in ("gelu", "pow"):
        return map_call(op, args[:1], launch.out, _attrs(launch, "approximate" if op == "gelu" else "exponent"))
    return map_call(op, args, launch.out)


def view_copy(launch, env: Env) -> list[Call]:
    """transpose / permute / expand / slice / select: one strided read of the contiguous source."""
    return map_call("copy", launch.operands[:1], launch.out, views={0: launch.view})


def cast(launch, env: Env) -> list[Call]:
    return map_call("copy", launch.operands[:1], launch.out)


def arange(launch, env: Env) -> list[Call]:
    return map_call("arange", [], launch.out)


def full(launch, env: Env) -> list[Call]:
    calls = map_call("full", [], launch.out)
    for c in calls:
        c.params["value"] = scalar_param(launch.attrs["value"], launch.out.dtype)
    return calls


def concat(launch, env: Env) -> list[Call]:
    """One strided copy per operand into its place along dim (empty 1-D operands skipped, as torch does)."""
    out = launch.out
    parts = [v for v in launch.operands[0] if tuple(v.shape) != (0,)]
    if not parts:
        return []
    d = launch.attrs["dim"] % len(out.shape)
    ost = contiguous(out.shape)
    calls, at = [], 0
    for v in parts:
        calls += map_call("copy", [v], out, shape=v.shape, out_view=(at * ost[d], ost))
        at += v.shape[d]
    return calls


@lru_cache(maxsize=None)
def gather_kernel(kind: str, rank: int) -> Kernel:
    k = Kernel(f"gather_{SUFFIX[kind]}_r{rank}", (WG,), doc="out = x at index along dim (torch.gather); an index "
               "outside x gives 0")
    x, idx = k.buffer("x", STORE[kind], write=True), k.buffer("idx", i32, write=True)
    out = k.buffer("out", STORE[kind], write=True)
    n, size, dstride = k.param("n", u32), k.param("size", u32), k.param("dstride", u32)
    dims = [k.param(f"d{j}", u32) for j in range(1, rank)]
    xs = [k.param(f"s{j}", u32) for j in range(rank)]
    i = flat_thread(k)
    with k.if_(i < n):
        cs = coords(k, i, dims) if rank > 1 else [i]
        at = k.let("at", idx[i])
        v = k.var("v", const(0, STORE[kind]))
        with k.if_((at >= 0) & (at.cast(u32) < size)):
            v.set(x[dot(cs, xs) + at.cast(u32) * dstride])
        out[i] = v
    return k


def gather(launch, env: Env) -> list[Call]:
    x, index = launch.operands[0], launch.operands[1]
    out = launch.out
    if numel(out.shape) == 0:
        return []
    rank = len(out.shape)
    d = launch.attrs["dim"] % max(rank, 1)
    xs = contiguous(x.shape)
    walk = [0 if j == d else s for j, s in enumerate(xs)]  # the index supplies the position along dim
    params = {"n": numel(out.shape), "size": x.shape[d] if rank else 1, "dstride": xs[d] if rank else 0}
    params.update({f"d{j}": out.shape[j] for j in range(1, rank)})
    params.update({f"s{j}": walk[j] for j in range(rank)})
    return [Call(gather_kernel(x.dtype, max(rank, 1)), [x, index, out], params, grid(-(-params["n"] // WG)))]


@lru_cache(maxsize=None)
def embed_kernel() -> Kernel:
    k = Kernel("embed_f", (WG,), doc="rows of a float table [V, D] at ids; an id outside the table gives zeros")
    ids, table = k.buffer("ids", i32, write=True), k.buffer("table", f32, write=True)
    out = k.buffer("out", f32, write=True)
    n, D, V = k.param("n", u32), k.param("D", u32), k.param("V", u32)
    i = flat_thread(k)
    with k.if_(i < n):
        row = k.let("row", ids[i / D])
        v = k.var("v", 0.0)
        with k.if_((row >= 0) & (row.cast(u32) < V)):
            v.set(table[row.cast(u32) * D + i % D])
        out[i] = v
    return k


@lru_cache(maxsize=None)
def copy_words_kernel() -> Kernel:
    k = Kernel("copy_words", (WG,), doc="dst[i] = src[i] (32-bit words)")
    src, dst, n = k.buffer("src", u32, write=True), k.buffer("dst", u32, write=True), k.param("n", u32)
    i = flat_thread(k)
    with k.if_(i < n):
        dst[i] = src[i]
    return k


def embed(launch, env: Env) -> list[Call]:
    """Rows of a float table, or of a packed one through the packed layout's row read (packed.py's dequant)."""
    ids, table = launch.operands[0], launch.operands[1]
    out = launch.out
    tokens = numel(ids.shape)
    if numel(out.shape) == 0:
        return []
    packed = env.matrix(table)
    if packed is None:
        D = table.shape[1]
        return [Call(embed_kernel(), [ids, table, out], {"n": tokens * D, "D": D, "V": table.shape[0]},
                     grid(-(-tokens * D // WG)))]
    name, m = packed
    calls, ids_at = [], ids
    if env.in_arena(ids):  # dequant reads ids read-only while writing out: both in the arena is refused
        ids_at = Scratch(0, tokens * 4)
        calls.append(Call(copy_words_kernel(), [ids, ids_at], {"n": tokens}, grid(-(-tokens // WG))))
    params, groups = m.dequant_args(tokens)
    bind = [Packed(name, "words"), Packed(name, "pieces"), Packed(name, "dst"), ids_at, out]
    calls.append(Call(packed_kernels()[3], bind, params, pad3(groups)))
    return calls


def pad3(groups) -> tuple[int, int, int]:
    groups = tuple(groups) + (1,) * (3 - len(groups))
    if max(groups) > MAX_GROUPS:
        raise GpuOpError(f"grid {groups} exceeds {MAX_GROUPS} workgroups in a dimension")
    return groups


@lru_cache(maxsize=None)
def packed_kernels() -> list[Kernel]:
    """gather, gemv, gemm and dequant of the f32 row-lane format (backends/gpu/packed.py)."""
    from ..product import PackedProduct
    from .packed import kernels

    return kernels(PackedProduct("f32"))


# ------------------------------------------------------------------------------------------------ reductions


@lru_cache(maxsize=None)
def reduce_kernel(in_kind: str, out_kind: str, mean: bool, krank: int, rrank: int, wide: bool) -> Kernel:
    """sum / mean: out[o] = the sum over the reduced dims of x at o's kept coordinates. `wide`: a workgroup per
    output (partial sums per thread, then a tree), else a thread per output (short reductions)."""
    name = f"{'mean' if mean else 'sum'}_{SUFFIX[in_kind]}{SUFFIX[out_kind]}_k{krank}r{rrank}{'w' if wide else ''}"
    k = Kernel(name, (ROW_WG if wide else WG,), doc="sum / mean over dims (backends/gpu/ops.py)")
    x, out = k.buffer("x", STORE[in_kind], write=True), k.buffer("out", STORE[out_kind], write=True)
    nout, count = k.param("nout", u32), k.param("count", u32)
    kd = [k.param(f"kd{j}", u32) for j in range(1, krank)]
    ks = [k.param(f"ks{j}", u32) for j in range(krank)]
    rd = [k.param(f"rd{j}", u32) for j in range(1, rrank)]
    rs = [k.param(f"rs{j}", u32) for j in range(rrank)]
    acc_t = STORE[out_kind]
    red = k.shared("red", acc_t, ROW_WG) if wide else None
    o = flat_group(k) if wide else flat_thread(k)
    t = k.local_id(0)

    def body(lo, step):
        base = k.let("base", dot(coords(k, o, kd, "k"), ks))
        acc = k.var("acc", const(0, acc_t))
        with k.loop("j", lo, count, step) as j:
            v = x[dot(coords(k, j, rd, "r"), rs, base)]
            acc.set(acc + (v.cast(acc_t) if in_kind != out_kind else v))
        return acc

    if wide:
        with k.if_(o < nout):  # uniform: the whole workgroup takes one output
            acc = body(t, ROW_WG)
            red[t] = acc
            total = tree(k, red, t, ROW_WG, lambda a, b: a + b)
            with k.if_(t.eq(0)):
                out[o] = total / count.cast(f32) if mean else total
    else:
        with k.if_(o < nout):
            acc = body(0, 1)
            out[o] = acc / count.cast(f32) if mean else acc
    return k


def reduce(launch, env: Env) -> list[Call]:
    x, out = launch.operands[0], launch.out
    if numel(out.shape) == 0:
        return []
    rank = len(x.shape)
    dims = {d % rank for d in launch.attrs["dims"]} if launch.attrs["dims"] and rank else set(range(rank))
    xs = contiguous(x.shape)
    keep = [j for j in range(rank) if j not in dims]
    kept, ks = collapse([x.shape[j] for j in keep], [[xs[j] for j in keep]])
    red, rs = collapse([x.shape[j] for j in sorted(dims)], [[xs[j] for j in sorted(dims)]])
    count = numel([x.shape[j] for j in dims])
    nout = numel(out.shape)
    wide = count >= 64
    mean = launch.op == "mean"
    k = reduce_kernel(x.dtype, out.dtype, mean, len(kept), len(red), wide)
    params = {"nout": nout, "count": count}
    params.update({f"kd{j}": kept[j] for j in range(1, len(kept))})
    params.update({f"ks{j}": ks[0][j] for j in range(len(kept))})
    params.update({f"rd{j}": red[j] for j in range(1, len(red))})
    params.update({f"rs{j}": rs[0][j] for j in range(len(red))})
    return [Call(k, [x, out], params, grid(nout if wide else -(-nout // WG)))]


# ------------------------------------------------------------------------------------------------ rows: softmax, norms


def _row_sum(k: Kernel, red, t, n, value: Callable[[Expr], Expr]) -> Expr:
    acc = k.var("acc", 0.0)
    with k.loop("j", t, n, ROW_WG) as j:
        acc.set(acc + value(j))
    red[t] = acc
    return tree(k, red, t, ROW_WG, lambda a, b: a + b)


@lru_cache(maxsize=None)
def softmax_kernel() -> Kernel:
    k = Kernel("softmax_f", (ROW_WG,), doc="softmax along a dim of n elements `inner` apart: a workgroup per row")
    x, out = k.buffer("x", f32, write=True), k.buffer("out", f32, write=True)
    rows, n, inner = k.param("rows", u32), k.param("n", u32), k.param("inner", u32)
    red = k.shared("red", f32, ROW_WG)
    r, t = flat_group(k), k.local_id(0)
    with k.if_(r < rows):
        base = k.let("base", (r / inner) * n * inner + r % inner)
        m = k.var("m", -3.4028234663852886e38)
        with k.loop("j", t, n, ROW_WG) as j:
            m.set(maximum(m, x[base + j * inner]))
        red[t] = m
        mx = tree(k, red, t, ROW_WG, maximum)
        total = _row_sum(k, red, t, n, lambda j: exp(x[base + j * inner] - mx))
        inv = k.let("inv", 1.0 / total)
        with k.loop("j", t, n, ROW_WG) as j:
            out[base + j * inner] = exp(x[base + j * inner] - mx) * inv
    return k


def softmax(launch, env: Env) -> list[Call]:
    x = launch.operands[0]
    if numel(x.shape) == 0:
        return []
    rank = len(x.shape)
    d = launch.attrs["dim"] % max(rank, 1)
    n = x.shape[d] if rank else 1
    inner = numel(x.shape[d + 1:]) if rank else 1
    rows = numel(x.shape) // n
    return [Call(softmax_kernel(), [x, launch.out], {"rows": rows, "n": n, "inner": inner}, grid(rows))]


@lru_cache(maxsize=None)
def norm_kernel(kind: str, weight: bool, bias: bool) -> Kernel:
    """rmsnorm (x * rsqrt(mean(x*x) + eps) * w) or layernorm ((x - mean) * rsqrt(var + eps) * w + b) over rows of
    D: a workgroup per row."""
    name = f"{kind}_f" + ("w" if weight else "") + ("b" if bias else "")
    k = Kernel(name, (ROW_WG,), doc=f"{kind} over the last axis, a workgroup per row")
    x = k.buffer("x", f32, write=True)
    w = k.buffer("w", f32, write=True) if weight else None
    b = k.buffer("b", f32, write=True) if bias else None
    out = k.buffer("out", f32, write=True)
    rows, D, eps = k.param("rows", u32), k.param("D", u32), k.param("eps", f32)
    red = k.shared("red", f32, ROW_WG)
    r, t = flat_group(k), k.local_id(0)
    with k.if_(r < rows):
        base = k.let("base", r * D)
        Df = D.cast(f32)
        if kind == "rmsnorm":
            ss = _row_sum(k, red, t, D, lambda j: x[base + j] * x[base + j])
            inv = k.let("inv", rsqrt(ss / Df + eps))
            with k.loop("j", t, D, ROW_WG) as j:
                out[base + j] = x[base + j] * inv * w[j]
        else:
            mean = k.let("mean", _row_sum(k, red, t, D, lambda j: x[base + j]) / Df)
            var = _row_sum(k, red, t, D, lambda j: (x[base + j] - mean) * (x[base + j] - mean))
            inv = k.let("inv", rsqrt(var / Df + eps))
            with k.loop("j", t, D, ROW_WG) as j:
                y = (x[base + j] - mean) * inv
                y = y * w[j] if weight else y
                out[base + j] = y + b[j] if bias else y
    return k


def norm(launch, env: Env) -> list[Call]:
    x = launch.operands[0]
    ops = [v for v in launch.operands[1:3] if v is not None] if launch.op == "layernorm" else [launch.operands[1]]
    D = x.shape[-1] if x.shape else 1
    rows = numel(x.shape) // D if D else 0
    if rows == 0:
        return []
    has = [len(launch.operands) > j and launch.operands[j] is not None for j in (1, 2)]
    k = norm_kernel(launch.op, True, False) if launch.op == "rmsnorm" else norm_kernel("layernorm", *has)
    return [Call(k, [x, *ops, launch.out], {"rows": rows, "D": D, "eps": float(launch.attrs["eps"])}, grid(rows))]


# ------------------------------------------------------------------------------------------------ rope


@lru_cache(maxsize=None)
def rope_kernel(rank: int) -> Kernel:
    k = Kernel(f"rope_f_r{rank}", (WG,), doc="x*cos + rotate_half(x)*sin, cos/sin broadcast (half rotation)")
    x, c, s = (k.buffer(nm, f32, write=True) for nm in ("x", "cs", "sn"))
    out = k.buffer("out", f32, write=True)
    n, half = k.param("n", u32), k.param("hd", u32)
    dims = [k.param(f"d{j}", u32) for j in range(1, rank)]
    st = {nm: [k.param(f"{nm}_s{j}", u32) for j in range(rank)] for nm in ("x", "c", "s")}
    i = flat_thread(k)
    with k.if_(i < n):
        cs = coords(k, i, dims)
        xo = k.let("xo", dot(cs, st["x"]))
        lo = k.let("lo", cs[-1] < half)
        partner = k.let("partner", x[select(lo, xo + half, xo - half)])  # x's last dim steps 1: it is full
        rot = select(lo, -partner, partner)
        out[i] = x[xo] * c[dot(cs, st["c"])] + rot * s[dot(cs, st["s"])]
    return k


def rope(launch, env: Env) -> list[Call]:
    x, c, s = launch.operands[:3]
    shape = launch.out.shape
    if numel(shape) == 0:
        return []
    dims, st = collapse(shape, [bstrides(v.shape, shape) for v in (x, c, s)], keep_last=True)
    rank = len(dims)
    params = {"n": numel(shape), "hd": shape[-1] // 2}
    params.update({f"d{j}": dims[j] for j in range(1, rank)})
    for nm, strides in zip("xcs", st):
        params.update({f"{nm}_s{j}": strides[j] for j in range(rank)})
    return [Call(rope_kernel(rank), [x, c, s, launch.out], params, grid(-(-numel(shape) // WG)))]
