"""A small language for GPU compute kernels, built from Python and printed as WGSL, CUDA or Metal (render.py).

A `Kernel` holds everything one compute entry point needs: its storage buffers, its uniform scalar parameters, its
workgroup-shared arrays, its workgroup size and a body of statements. The body is built by calling the kernel's
methods in program order; `with` blocks open loops, branches and switch cases. Expressions are typed trees built
with Python operators, so Python code *generates* the kernel: a Python `for` unrolls, a Python `if` specialises.

    k = Kernel("scale_rows", workgroup=(256,))
    x = k.buffer("x", f32)                    # read-only storage buffer (binding 0)
    y = k.buffer("y", f32, write=True)        # read-write storage buffer (binding 1)
    n, s = k.param("n", u32), k.param("s", f32)
    i = k.let("i", k.global_id(0))            # immutable local
    with k.if_(i < n):
        y[i] = x[i] * s                       # a store is a statement

Types. f32, i32, u32 and bool everywhere; f16 where the target has it (WGSL only with the shader-f16 extension, which
the printer must be told about); vec4f / vec4u, four-component vectors, for wide loads and stores only (read a
component with `.x` .. `.w` or `v[0]`, build one with `vec4(a, b, c, d)`; no arithmetic on vectors: CUDA's float4
has none). No 64-bit type exists: WGSL has none, so indices are u32 (or i32) everywhere.

Expressions. `+ - * / %` on numbers of one type; `& | ^ ~` on integers (on bool: and, or, not-equal, not);
`<< >>` with an integer on the left and a u32 amount below 32 (C leaves larger amounts undefined); `< <= > >=`
and `a.eq(b)`, `a.ne(b)` (not `==`: expressions stay hashable) give bool. Python numbers take the other operand's
type. Operands of different types are an error at build time, never a silent conversion: WGSL converts nothing,
so the rule keeps the three printed languages computing the same thing. `x.cast(T)` converts a value, `bitcast`
reinterprets 32 bits (u32 <-> f32 <-> i32). Math, a closed set: exp, log, sqrt, rsqrt, tanh, sin, cos, floor,
ceil, abs (`abs(x)`), minimum, maximum, select(cond, a, b) (both sides evaluated), and half_lo / half_hi: the two
float16 halves of a u32 as f32 (WGSL's unpack2x16float: how float16 data is read without the f16 extension).
Math functions take f32 (abs, minimum and maximum integers too); compute on f16 by casting.

Memory. `k.buffer(name, T, write=False)`: storage buffers, bound in declaration order (WGSL @binding(i), Metal
[[buffer(i)]], CUDA the i-th pointer argument); one GPU buffer may be bound twice to read it as two types (u32 words
and vec4u quads, say), but a written buffer must alias nothing. `k.param(name, T)`: a 4-byte scalar (u32, i32,
f32) of the kernel's uniform parameter struct (WGSL: a uniform buffer after the storage buffers; Metal: a constant
struct after the buffers; CUDA: a struct passed by value); `Kernel.pack_params` makes its bytes, the same on every
target. `k.shared(name, T, n)`: a workgroup-shared array (uninitialised: write before reading, then `k.barrier()`).
`k.array(name, T, n)`: a private array, zeroed where declared. `mem[i]` loads (the load happens where the expression
is used: pin a value with `k.let` before a store to the same place), `mem[i] = v` stores.

Control. `k.var(name, init)` mutable local (`v.set(e)` assigns), `k.let(name, e)` immutable; `with k.loop(name,
start, end, step=1, unroll=False) as i` (i from start while i < end, end read every iteration; `unroll` asks
CUDA/Metal compilers to unroll it fully); `with k.if_(c)`, then optionally `with k.else_()`; `with k.switch(e) as
sw` and `with sw.case(1, 2)` / `with sw.default()` (no fall-through; `break_` in a case leaves the switch, as in
C and WGSL); `k.break_()`, `k.continue_()` (not inside a switch: WGSL forbids it), `k.return_()`, `k.barrier()`
(workgroup memory; every thread of the workgroup must reach it: keep barriers out of branches and loops whose
condition differs between threads, which WGSL also checks), `k.comment(text)`.

Threads. `k.global_id(d)`, `k.local_id(d)`, `k.group_id(d)`, `k.num_groups(d)` (d in 0..2) and `k.local_index()`
(the flat index in the workgroup), all u32. The workgroup size is a constant of the kernel: the host dispatches
workgroups of exactly that shape (WebGPU's default limits: 256 threads, 16 KiB of shared memory, 65535 workgroups
per grid dimension).

Names are checked (identifiers, not words of any of the three languages: a clash gets a trailing `_`) and made
unique among the names visible in a scope, so generator code can reuse `w0` in sibling blocks. A local used after
its block closed is an error at build time.
"""
from __future__ import annotations

import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------------ types


@dataclass(frozen=True)
class DType:
    name: str
    kind: str  # "float", "int", "uint" or "bool"
    bytes: int
    count: int = 1  # vector components

    def __repr__(self) -> str:
        return self.name

    @property
    def scalar(self) -> DType:
        return {"float": f32, "uint": u32, "int": i32}[self.kind] if self.count > 1 else self

    @property
    def numeric(self) -> bool:
        return self.kind != "bool" and self.count == 1

    @property
    def integer(self) -> bool:
        return self.kind in ("int", "uint") and self.count == 1


f32 = DType("f32", "float", 4)
f16 = DType("f16", "float", 2)
i32 = DType("i32", "int", 4)
u32 = DType("u32", "uint", 4)
boolean = DType("bool", "bool", 4)
vec4f = DType("vec4f", "float", 16, 4)
vec4u = DType("vec4u", "uint", 16, 4)
DTYPES = {t.name: t for t in (f32, f16, i32, u32, boolean, vec4f, vec4u)}

# Words of WGSL, C++, CUDA and the Metal Shading Language, and the printers' own names (`prm`, the builtins).
RESERVED = frozenset("""
alias array atomic bitcast bool break case const const_assert continue continuing default diagnostic discard do
else enable false fn for f16 f32 i32 u32 if let loop mat2x2 mat3x3 mat4x4 override private ptr requires return
sampler storage struct switch true uniform var vec2 vec3 vec4 while workgroup function read write read_write
auto char class constant device double enum extern float goto half inline int kernel long namespace new operator
register restrict short signed sizeof static template this thread threadgroup typedef typename union unsigned
using void volatile uint uint2 uint3 uint4 float2 float3 float4 half2 int2 int3 int4 main min max abs select exp
log sqrt rsqrt tanh sin cos floor ceil fabs as_type metal
prm gid lid wid nwg lix threadIdx blockIdx blockDim gridDim warpSize
""".split())


def _check_name(name: str) -> str:
    if not (name.isascii() and name.isidentifier()) or name.startswith("_"):
        raise ValueError(f"name {name!r}: an ASCII identifier not starting with '_'")
    return name + "_" if name in RESERVED else name


# ------------------------------------------------------------------------------------------------ expressions


class Expr:
    """A typed expression tree. `op` names the node (const, var, param, builtin, load, unary, binary, call, cast,
    bitcast, select, comp, vector, unpack); `args` are child expressions, `arg` the node's own datum."""

    __slots__ = ("op", "dtype", "args", "arg")

    def __init__(self, op: str, dtype: DType, args: tuple = (), arg=None):
        self.op, self.dtype, self.args, self.arg = op, dtype, args, arg

    def __repr__(self) -> str:
        return f"Expr({self.op}, {self.dtype}, {self.arg!r}, {self.args!r})"

    # arithmetic
    def __add__(self, o): return _binary("+", self, o)
    def __radd__(self, o): return _binary("+", o, self)
    def __sub__(self, o): return _binary("-", self, o)
    def __rsub__(self, o): return _binary("-", o, self)
    def __mul__(self, o): return _binary("*", self, o)
    def __rmul__(self, o): return _binary("*", o, self)
    def __truediv__(self, o): return _binary("/", self, o)
    def __rtruediv__(self, o): return _binary("/", o, self)
    def __floordiv__(self, o): return _binary("/", self, o, integer=True)
    def __rfloordiv__(self, o): return _binary("/", o, self, integer=True)
    def __mod__(self, o): return _binary("%", self, o)
    def __rmod__(self, o): return _binary("%", o, self)
    # bits and logic
    def __and__(self, o): return _binary("&", self, o)
    def __rand__(self, o): return _binary("&", o, self)
    def __or__(self, o): return _binary("|", self, o)
    def __ror__(self, o): return _binary("|", o, self)
    def __xor__(self, o): return _binary("^", self, o)
    def __rxor__(self, o): return _binary("^", o, self)
    def __lshift__(self, o): return _shift("<<", self, o)
    def __rshift__(self, o): return _shift(">>", self, o)
    # comparisons
    def __lt__(self, o): return _binary("<", self, o)
    def __le__(self, o): return _binary("<=", self, o)
    def __gt__(self, o): return _binary(">", self, o)
    def __ge__(self, o): return _binary(">=", self, o)
    def eq(self, o): return _binary("==", self, o)
    def ne(self, o): return _binary("!=", self, o)

    def __neg__(self):
        if not self.numeric or self.dtype.kind == "uint":
            raise TypeError(f"negation of a {self.dtype}")
        return Expr("unary", self.dtype, (self,), "-")

    def __invert__(self):
        if not (self.dtype.integer or self.dtype is boolean):
            raise TypeError(f"~ of a {self.dtype}")
        return Expr("unary", self.dtype, (self,), "~" if self.dtype.integer else "!")

    def __abs__(self):
        return _call("abs", self)

    def __bool__(self):
        raise TypeError("a kernel expression has no Python truth value: use k.if_(...) or select(...)")

    __hash__ = object.__hash__

    @property
    def numeric(self) -> bool:
        return self.dtype.numeric

    def cast(self, dtype: DType) -> Expr:
        if dtype.count > 1 or self.dtype.count > 1:
            raise TypeError("vectors do not cast; build one with vec4(...) from cast components")
        return self if dtype == self.dtype else Expr("cast", dtype, (self,))

    # vector components
    def __getitem__(self, i: int) -> Expr:
        if self.dtype.count == 1 or not isinstance(i, int) or not 0 <= i < self.dtype.count:
            raise TypeError(f"component {i!r} of a {self.dtype}: a constant index of a vector")
        return Expr("comp", self.dtype.scalar, (self,), i)

    x = property(lambda self: self[0])
    y = property(lambda self: self[1])
    z = property(lambda self: self[2])
    w = property(lambda self: self[3])


class Var(Expr):
    """A named local: `let` (immutable) or `var` (mutable, `set`)."""

    __slots__ = ("kernel", "mutable", "scope")

    def __init__(self, kernel: Kernel, name: str, dtype: DType, mutable: bool, scope: list):
        super().__init__("var", dtype, (), name)
        self.kernel, self.mutable, self.scope = kernel, mutable, scope

    def set(self, value) -> None:
        if not self.mutable:
            raise TypeError(f"{self.arg} is immutable (made with let); make it with var to assign")
        self.kernel._emit(Assign(self, _lift(value, self.dtype, "assignment")))


def const(value, dtype: DType) -> Expr:
    """A literal of `dtype` (Python bool, int or float; f32 non-finite values allowed)."""
    if dtype is boolean:
        return Expr("const", dtype, (), bool(value))
    if dtype.count > 1:
        raise TypeError("vector literals: vec4(...) of scalars")
    if dtype.kind == "float":
        return Expr("const", dtype, (), float(value))
    if isinstance(value, float) and not value.is_integer():
        raise TypeError(f"{value} is not a {dtype} value")
    v = int(value)
    lo, hi = (0, 2**32) if dtype.kind == "uint" else (-(2**31), 2**31)
    if not lo <= v < hi:
        raise ValueError(f"{v} is out of range for {dtype}")
    return Expr("const", dtype, (), v)


def _lift(v, dtype: DType, what: str) -> Expr:
    """v as an expression of `dtype`: Python numbers become literals, expressions must already be of that type."""
    if isinstance(v, Expr):
        if v.dtype != dtype:
            raise TypeError(f"{what}: {v.dtype} where {dtype} is needed (cast explicitly)")
        return v
    if isinstance(v, bool) != (dtype is boolean):
        raise TypeError(f"{what}: {v!r} where {dtype} is needed")
    if isinstance(v, float) and dtype.kind != "float":
        raise TypeError(f"{what}: float literal {v!r} in a {dtype} expression")
    if not isinstance(v, (int, float)):
        raise TypeError(f"{what}: {type(v).__name__} is not a kernel value")
    return const(v, dtype)


def _pair(op: str, a, b) -> tuple[Expr, Expr]:
    if not isinstance(a, Expr) and not isinstance(b, Expr):
        raise TypeError(f"{op} of two Python values")
    dtype = a.dtype if isinstance(a, Expr) else b.dtype
    return _lift(a, dtype, op), _lift(b, dtype, op)


def _is(e: Expr, value) -> bool:
    return e.op == "const" and e.arg == value


def _binary(op: str, a, b, integer: bool = False) -> Expr:
    a, b = _pair(op, a, b)
    t = a.dtype
    if op in ("&", "|", "^"):
        if not (t.integer or t is boolean):
            raise TypeError(f"{op} of {t}")
    elif op in ("==", "!="):
        if t.count > 1:
            raise TypeError(f"{op} of vectors")
    elif not t.numeric:
        raise TypeError(f"{op} of {t}")
    if integer and not t.integer:
        raise TypeError(f"// of {t}: use / for floats")
    if op in ("<", "<=", ">", ">=", "==", "!="):
        return Expr("binary", boolean, (a, b), op)
    # integer identities keep unrolled index arithmetic readable (floats keep their -0.0 rules)
    if t.integer:
        if op in ("+", "|", "^") and _is(a, 0):
            return b
        if op in ("+", "-", "|", "^") and _is(b, 0):
            return a
        if op == "*" and (_is(a, 1) or _is(b, 1)):
            return b if _is(a, 1) else a
        if op == "*" and (_is(a, 0) or _is(b, 0)):
            return const(0, t)
        if op == "/" and _is(b, 1):
            return a
    return Expr("binary", t, (a, b), op)


def _shift(op: str, a, b) -> Expr:
    if not isinstance(a, Expr) or not a.dtype.integer:
        raise TypeError(f"{op}: an integer expression on the left")
    if isinstance(b, int) and not 0 <= b < 32:
        raise ValueError(f"shift by {b}: amounts are 0..31")
    b = _lift(b, u32, f"shift amount of {op}")
    return a if _is(b, 0) else Expr("binary", a.dtype, (a, b), op)


MATH = {  # name: (arguments, whether integers are allowed)
    "exp": (1, False), "log": (1, False), "sqrt": (1, False), "rsqrt": (1, False), "tanh": (1, False),
    "sin": (1, False), "cos": (1, False), "floor": (1, False), "ceil": (1, False), "abs": (1, True),
    "min": (2, True), "max": (2, True),
}


def _call(fn: str, *args) -> Expr:
    n, ints = MATH[fn]
    es = _pair(fn, *args) if n == 2 else (args[0],)
    if not isinstance(es[0], Expr):
        raise TypeError(f"{fn} of a Python value")
    t = es[0].dtype
    if not (t is f32 or (ints and t.integer)) or (fn == "abs" and t is u32):
        raise TypeError(f"{fn} of {t}" + ("" if ints else ": math functions take f32 (cast f16 first)"))
    return Expr("call", t, tuple(es), fn)


def exp(x): return _call("exp", x)
def log(x): return _call("log", x)
def sqrt(x): return _call("sqrt", x)
def rsqrt(x): return _call("rsqrt", x)
def tanh(x): return _call("tanh", x)
def sin(x): return _call("sin", x)
def cos(x): return _call("cos", x)
def floor(x): return _call("floor", x)
def ceil(x): return _call("ceil", x)
def minimum(a, b): return _call("min", a, b)
def maximum(a, b): return _call("max", a, b)


def select(cond, a, b) -> Expr:
    """cond ? a : b (both evaluated)."""
    cond = _lift(cond, boolean, "select condition")
    a, b = _pair("select", a, b)
    return Expr("select", a.dtype, (cond, a, b))


def bitcast(x: Expr, dtype: DType) -> Expr:
    """The 32 bits of x read as `dtype` (u32, i32, f32)."""
    if x.dtype not in (u32, i32, f32) or dtype not in (u32, i32, f32):
        raise TypeError(f"bitcast {x.dtype} -> {dtype}: 32-bit scalars only")
    return x if x.dtype == dtype else Expr("bitcast", dtype, (x,))


def half_lo(w) -> Expr:
    """The float16 in bits 0..15 of u32 w, as f32."""
    return Expr("unpack", f32, (_lift(w, u32, "half_lo"),), 0)


def half_hi(w) -> Expr:
    """The float16 in bits 16..31 of u32 w, as f32."""
    return Expr("unpack", f32, (_lift(w, u32, "half_hi"),), 1)


def vec4(a, b, c, d) -> Expr:
    """A vec4f (f32 components) or vec4u (u32 components)."""
    es = [e for e in (a, b, c, d) if isinstance(e, Expr)]
    t = es[0].dtype if es else (f32 if any(isinstance(v, float) for v in (a, b, c, d)) else u32)
    if t not in (f32, u32):
        raise TypeError(f"vec4 of {t}: f32 or u32 components")
    return Expr("vector", vec4f if t is f32 else vec4u, tuple(_lift(v, t, "vec4") for v in (a, b, c, d)))


# ------------------------------------------------------------------------------------------------ memory


class Memory:
    """A storage buffer, a workgroup-shared array or a private array: index it to load, assign an index to store."""

    def __init__(self, kernel: Kernel, name: str, dtype: DType, space: str, write: bool, size: int | None,
                 binding: int | None = None, scope: list | None = None):
        self.kernel, self.name, self.dtype, self.space = kernel, name, dtype, space
        self.write, self.size, self.binding, self.scope = write, size, binding, scope

    def _index(self, i) -> Expr:
        if isinstance(i, Expr):
            if not i.dtype.integer:
                raise TypeError(f"index of {self.name}: {i.dtype}, not u32 / i32")
            return i
        if isinstance(i, int) and i >= 0 and (self.size is None or i < self.size):
            return const(i, u32)
        raise IndexError(f"index {i!r} of {self.name}")

    def __getitem__(self, i) -> Expr:
        return Expr("load", self.dtype, (self._index(i),), self)

    def __setitem__(self, i, value) -> None:
        if not self.write:
            raise TypeError(f"{self.name} is read-only (declare it with write=True)")
        self.kernel._emit(Store(self, self._index(i), _lift(value, self.dtype, f"store to {self.name}")))


# ------------------------------------------------------------------------------------------------ statements


@dataclass(eq=False)
class Decl:
    var: Var
    init: Expr


@dataclass(eq=False)
class ArrayDecl:
    mem: Memory


@dataclass(eq=False)
class Assign:
    var: Var
    value: Expr


@dataclass(eq=False)
class Store:
    mem: Memory
    index: Expr
    value: Expr


@dataclass(eq=False)
class For:
    var: Var
    start: Expr
    end: Expr
    step: Expr
    body: list
    unroll: bool


@dataclass(eq=False)
class If:
    cond: Expr
    then: list
    other: list | None = None


@dataclass(eq=False)
class Switch:
    value: Expr
    cases: list  # [(values, body)]
    default: list | None = None


@dataclass(eq=False)
class Simple:
    what: str  # "barrier", "break", "continue", "return"


@dataclass(eq=False)
class Comment:
    text: str


class _SwitchBuilder:
    def __init__(self, kernel: Kernel, stmt: Switch):
        self.kernel, self.stmt = kernel, stmt

    @contextmanager
    def case(self, *values):
        seen = {v for vs, _ in self.stmt.cases for v in vs}
        lits = tuple(_lift(v, self.stmt.value.dtype, "case").arg for v in values)
        if not lits or seen & set(lits):
            raise ValueError(f"case {values}: at least one value, none seen before")
        body: list = []
        self.stmt.cases.append((lits, body))
        with self.kernel._block(body, "case"):
            yield

    @contextmanager
    def default(self):
        if self.stmt.default is not None:
            raise ValueError("a second default")
        self.stmt.default = []
        with self.kernel._block(self.stmt.default, "case"):
            yield


# ------------------------------------------------------------------------------------------------ the kernel

BUILTINS = ("global_id", "local_id", "group_id", "num_groups", "local_index")


class Kernel:
    """One compute entry point: buffers, parameters, shared arrays, workgroup size and body (see the module
    docstring)."""

    def __init__(self, name: str, workgroup: tuple[int, ...] = (64,), doc: str = ""):
        self.name = _check_name(name)
        if self.name != name:
            raise ValueError(f"kernel name {name!r} is a reserved word")
        wg = tuple(workgroup) + (1,) * (3 - len(workgroup))
        if len(wg) != 3 or any(not isinstance(v, int) or v < 1 for v in wg) or math.prod(wg) > 1024:
            raise ValueError(f"workgroup {workgroup}: 1-3 positive sizes, at most 1024 threads")
        self.workgroup, self.doc = wg, doc
        self.buffers: list[Memory] = []
        self.params: list[tuple[str, DType]] = []
        self.shared_arrays: list[Memory] = []
        self.body: list = []
        self.builtins: set[str] = set()
        self.features: set[str] = set()  # "f16" (the type), "unpack" (half_lo / half_hi)
        self._stack: list[tuple[list, set, list, str]] = [(self.body, {name}, [], "body")]  # block, names, vars
        self._dead: set[int] = set()

    # ---- declarations
    def _name(self, name: str) -> str:
        base = _check_name(name)
        taken = set().union(*(names for _, names, _, _ in self._stack))
        out, n = base, 0
        while out in taken:
            n += 1
            out = f"{base}_{n}"
        self._stack[-1][1].add(out)
        return out

    def _global_name(self, name: str, what: str) -> str:
        if len(self._stack) != 1:
            raise ValueError(f"{what} {name!r}: declare buffers, parameters and shared arrays at the top level")
        out = _check_name(name)
        if out in self._stack[0][1]:
            raise ValueError(f"{what} {name!r}: the name is taken")
        self._stack[0][1].add(out)
        return out

    def buffer(self, name: str, dtype: DType, write: bool = False) -> Memory:
        self._use(dtype)
        if dtype is boolean:
            raise TypeError("bool has no storage layout: store u32")
        m = Memory(self, self._global_name(name, "buffer"), dtype, "storage", write, None, len(self.buffers))
        self.buffers.append(m)
        return m

    def param(self, name: str, dtype: DType) -> Expr:
        if dtype not in (u32, i32, f32):
            raise TypeError(f"parameter {name}: u32, i32 or f32")
        n = self._global_name(name, "parameter")
        self.params.append((n, dtype))
        return Expr("param", dtype, (), n)

    def shared(self, name: str, dtype: DType, size: int) -> Memory:
        self._use(dtype)
        if dtype is boolean or size < 1:
            raise ValueError(f"shared {name}: a positive size of a storable type")
        m = Memory(self, self._global_name(name, "shared array"), dtype, "shared", True, size)
        self.shared_arrays.append(m)
        return m

    def array(self, name: str, dtype: DType, size: int) -> Memory:
        """A private array, zero-initialised where declared."""
        self._use(dtype)
        if size < 1:
            raise ValueError(f"array {name}: a positive size")
        m = Memory(self, self._name(name), dtype, "private", True, size, scope=self._stack[-1][2])
        self._stack[-1][2].append(m)
        self._emit(ArrayDecl(m))
        return m

    def pack_params(self, **values) -> bytes:
        """The parameter struct's bytes (4 per field, padded to 16 for WGSL's uniform layout)."""
        names = [n for n, _ in self.params]
        if set(values) != set(names):
            raise ValueError(f"{self.name} takes parameters {names}, got {sorted(values)}")
        fmt = {"u32": "<I", "i32": "<i", "f32": "<f"}
        raw = b"".join(struct.pack(fmt[t.name], values[n]) for n, t in self.params)
        return raw + bytes(-len(raw) % 16)

    def interface(self) -> dict:
        """How a host calls this kernel, as JSON-able data: its workgroup size, storage buffers in binding order
        (the parameter struct, when there is one, is the binding after them) and the struct's fields with their byte
        offsets in `pack_params`' layout."""
        return {"name": self.name, "workgroup": list(self.workgroup),
                "buffers": [{"name": m.name, "type": m.dtype.name, "write": m.write} for m in self.buffers],
                "params": [{"name": n, "type": t.name, "offset": 4 * i} for i, (n, t) in enumerate(self.params)],
                "params_bytes": len(self.pack_params(**{n: 0 for n, _ in self.params})) if self.params else 0}

    @property
    def shared_bytes(self) -> int:
        return sum(m.dtype.bytes * m.size for m in self.shared_arrays)

    def _use(self, dtype: DType) -> None:
        if dtype is f16:
            self.features.add("f16")

    # ---- threads
    def _builtin(self, which: str, axis: int = 0) -> Expr:
        if axis not in (0, 1, 2):
            raise ValueError(f"{which}({axis}): axis 0, 1 or 2")
        self.builtins.add(which)
        return Expr("builtin", u32, (), (which, axis))

    def global_id(self, axis: int = 0) -> Expr: return self._builtin("global_id", axis)
    def local_id(self, axis: int = 0) -> Expr: return self._builtin("local_id", axis)
    def group_id(self, axis: int = 0) -> Expr: return self._builtin("group_id", axis)
    def num_groups(self, axis: int = 0) -> Expr: return self._builtin("num_groups", axis)
    def local_index(self) -> Expr: return self._builtin("local_index")

    # ---- statements
    def _emit(self, stmt) -> None:
        if isinstance(stmt, Store) and id(stmt.mem) in self._dead:
            raise ValueError(f"{self.name}: {stmt.mem.name} is used outside the block that declared it")
        for e in _exprs(stmt):
            self._check_live(e)
        self._stack[-1][0].append(stmt)

    def _check_live(self, e: Expr) -> None:
        todo = [e]
        while todo:
            e = todo.pop()
            if (e.op == "var" and id(e) in self._dead) or (e.op == "load" and id(e.arg) in self._dead):
                name = e.arg if e.op == "var" else e.arg.name
                raise ValueError(f"{self.name}: {name} is used outside the block that declared it")
            if e.op == "unpack":
                self.features.add("unpack")
            todo.extend(e.args)

    @contextmanager
    def _block(self, body: list, what: str):
        self._stack.append((body, set(), [], what))
        try:
            yield
        finally:
            _, _, made, _ = self._stack.pop()
            self._dead.update(id(v) for v in made)

    def _local(self, name: str, init, dtype: DType | None, mutable: bool) -> Var:
        if init is None:
            if dtype is None or dtype.count > 1:
                raise TypeError(f"{name}: give an initial value (or a scalar type, for zero)")
            init = False if dtype is boolean else 0
        if dtype is None:
            dtype = (init.dtype if isinstance(init, Expr) else boolean if isinstance(init, bool)
                     else f32 if isinstance(init, float) else u32)
        self._use(dtype)
        init = _lift(init, dtype, f"initial value of {name}")
        v = Var(self, self._name(name), dtype, mutable, self._stack[-1][2])
        self._emit(Decl(v, init))
        self._stack[-1][2].append(v)
        return v

    def var(self, name: str, init=None, dtype: DType | None = None) -> Var:
        """A mutable local (initialised to `init`, default zero); its type is dtype, else init's (a Python int
        makes a u32, a float an f32)."""
        return self._local(name, init, dtype, True)

    def let(self, name: str, value, dtype: DType | None = None) -> Var:
        """An immutable local holding `value` as evaluated here."""
        return self._local(name, value, dtype, False)

    @contextmanager
    def loop(self, name: str, start, end, step=1, unroll: bool = False):
        ref = next((v for v in (start, end, step) if isinstance(v, Expr)), None)
        dtype = ref.dtype if ref is not None else u32
        if not dtype.integer:
            raise TypeError(f"loop {name}: an integer counter")
        if isinstance(step, int) and step < 1:
            raise ValueError(f"loop {name}: a positive step")
        start, end, step = (_lift(v, dtype, f"loop {name}") for v in (start, end, step))
        body: list = []
        with self._block(body, "loop"):
            var = Var(self, self._name(name), dtype, False, self._stack[-1][2])
            self._stack[-1][2].append(var)
            stmt = For(var, start, end, step, body, unroll)
            for e in (start, end, step):
                self._check_live(e)
            self._stack[-2][0].append(stmt)
            yield var

    @contextmanager
    def if_(self, cond):
        stmt = If(_lift(cond, boolean, "if condition"), [])
        self._emit(stmt)
        with self._block(stmt.then, "if"):
            yield

    @contextmanager
    def else_(self):
        block = self._stack[-1][0]
        if not block or not isinstance(block[-1], If) or block[-1].other is not None:
            raise ValueError("else_ must follow an if_ block directly")
        block[-1].other = []
        with self._block(block[-1].other, "else"):
            yield

    @contextmanager
    def switch(self, value):
        if not isinstance(value, Expr) or not value.dtype.integer:
            raise TypeError("switch on an integer expression")
        stmt = Switch(value, [])
        self._emit(stmt)
        yield _SwitchBuilder(self, stmt)

    def barrier(self) -> None:
        self._emit(Simple("barrier"))

    def break_(self) -> None:
        self._jump("break", ("loop", "case"))

    def continue_(self) -> None:
        if any(w == "case" for *_, w in self._stack):
            raise ValueError("continue inside a switch case: WGSL forbids it")
        self._jump("continue", ("loop",))

    def return_(self) -> None:
        self._emit(Simple("return"))

    def _jump(self, what: str, inside: tuple[str, ...]) -> None:
        if not any(w in inside for *_, w in self._stack):
            raise ValueError(f"{what} outside a loop")
        self._emit(Simple(what))

    def comment(self, text: str) -> None:
        self._emit(Comment(" ".join(text.split())))


def _exprs(stmt) -> list[Expr]:
    if isinstance(stmt, Decl):
        return [stmt.init]
    if isinstance(stmt, Assign):
        return [stmt.var, stmt.value]
    if isinstance(stmt, Store):
        return [stmt.index, stmt.value]
    if isinstance(stmt, (If, Switch)):
        return [stmt.cond if isinstance(stmt, If) else stmt.value]
    return []
