"""LLVM IR generator for packed b-bit linear kernels (gemv and batched gemm).

Every module built by `generate_module(spec, target)` defines four C-ABI functions::

    void xbitc_gemv_b{b}_g{G}    (const uint8_t* codes, const uint16_t* scales_f16, const uint8_t* zeros,
                                  const float* x, float* y, int64 rows_begin, int64 rows_end, int64 in_features)
    void xbitc_gemv_b{b}_g{G}_acc(... same ...)                        # y[r] += instead of y[r] =
    void xbitc_gemm_b{b}_g{G}    (codes, scales_f16, zeros, const float* x, float* y, int64 rows_begin,
                                  int64 rows_end, int64 in_features, int64 batch, int64 ldy)
    void xbitc_gemm_b{b}_g{G}_acc(... same ...)

gemv: ``y[r] = sum_j s[r, j/G] * (q[r, j] - z[r, j/G]) * x[j]`` for r in [rows_begin, rows_end).
gemm: x is [batch, in_features] row-major, ``y[t*ldy + r]`` gets row r of token t.
codes are in the kernel layout of `spec.layout` (see layout.py, produced by `repack`), scales / zeros are the
canonical [rows, ngroups] float16 / uint8 arrays; row r of codes starts at ``r * layout.row_bytes(in_features)``.

Strategies (``spec.act``):

* ``"f32"`` (default, exact up to float32 summation order). Per group the kernel uses
  ``sum_j s*(q_j - z)*x_j = s*(sum_j q_j*x_j) - s*z*(sum_j x_j)``: the inner loop is only code extraction, int->float
  and an FMA with x (3 instructions per 8 weights); the zero-point term is one short dot product per row over the
  groups with the per-group sums of x. A second trick removes the shift from most extractions: a code at bit offset o
  of its word is taken as ``word & (mask << o)`` = ``q * 2**o`` (exact in float32) and multiplied with a copy of x
  pre-scaled by ``2**-o`` (exact power-of-two scaling). Both the scaled x and the group sums are built once per call
  in a prologue, per column tile of `col_tile` columns kept on the stack (default 16384 columns = 64 KiB), so the
  stack use is bounded and the padded tail needs no masking in the inner loop.
* ``"q8"`` (layout il32w8). x is quantized per weight group to int8 (d = max|x|/127, round half even) in the
  prologue and the inner loop is an integer u8 x s8 dot product: ``vpdpbusd`` with AVX-512 VNNI / AVX-VNNI,
  ``pmaddubsw`` with i16 partial sums widened by ``pmaddwd`` only every few steps on AVX2, generic widening IR
  elsewhere; flushed per group as ``s*d*sum(q*xq) - s*z*sum(d*xq)``. Not exact: it equals
  `layout.reference_gemv_q8`, i.e. W applied to the int8-rounded activations. gemm always uses float x.

Structure of the gemv: tile loop (x prologue) -> rows, `rows_per_iter` at a time (sharing the x loads; rows past
the range are computed on a clamped row and not stored) -> superblocks of max(block, group) columns, each block fully
unrolled (W k-steps with compile-time shifts), groups flushed with one FMA by the broadcast scale. Every block issues
software prefetches `prefetch` bytes ahead on each row's code stream (into L2): that, not arithmetic, is what lets a
single core stream weights at DRAM speed (measured: 1.5-2x on 4096x14336). gemm: rows `gemm_rows` at a time, each
block decoded once to float (s*(q-z)) into a stack buffer and reused for every token, `gemm_rows x gemm_tokens`
register tile.

Everything is generic LLVM vector IR (`<8 x float>`, `<8 x i32>`, `llvm.fmuladd`, `llvm.masked.load`,
`llvm.prefetch`) except the q8 x86 dot-product intrinsics, so the same modules compile for x86-64 (SSE2..AVX-512)
and aarch64 NEON. float16 scales use `fpext half` where the target converts natively (F16C, AVX-512, aarch64) and an
exact integer routine elsewhere, so no object needs a runtime library call.
"""
from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from .layout import Layout, get_layout

GENERATOR_VERSION = "4"

I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
F16 = ir.HalfType()
F32 = ir.FloatType()
VOID = ir.VoidType()


def P(t):
    return ir.PointerType(t)


def V(t, n):
    return ir.VectorType(t, n)


# --------------------------------------------------------------------------------------------------------------
# Specs and targets
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    triple: str
    cpu: str = ""
    features: str = ""

    def has(self, feature: str) -> bool:
        return f"+{feature}" in self.features.split(",")

    @property
    def is_x86(self) -> bool:
        return self.triple.startswith(("x86_64", "i386", "i686"))

    @property
    def has_f16_convert(self) -> bool:
        """Whether `fpext half` lowers to an instruction (else we convert with integer ops)."""
        if self.is_x86:
            return self.has("f16c") or self.has("avx512f")
        return True


@dataclass(frozen=True)
class KernelSpec:
    bits: int
    group_size: int
    layout: str = "il8w32"
    act: str = "f32"  # "f32" | "q8"
    rows_per_iter: int = 2  # rows processed together in the gemv inner loop (share the x loads)
    accs: int = 2  # independent accumulators per group in the f32 gemv inner loop
    col_tile: int = 16384  # columns per prologue tile (rounded up to a whole superblock); stack: 4*col_tile bytes
    gemm_tokens: int = 4  # tokens per register tile in gemm
    gemm_rows: int = 2  # rows per register tile in gemm (gemm_rows * gemm_tokens accumulators)
    prefetch: int = 16384  # software prefetch distance in bytes along each row's code stream (0: off)
    prefetch_locality: int = 2  # llvm.prefetch locality: 3 = all levels (prefetcht0), 2 = L2 (prefetcht1)
    symbol_suffix: str = ""  # appended to the exported names ("xbitc_gemv_b4_g128_avx2"): per-target objects link together

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        lay = get_layout(self.layout)
        if not lay.supports_group(self.group_size):
            raise ValueError(f"layout {lay.name} does not support group_size {self.group_size}")
        if self.act not in ("f32", "q8"):
            raise ValueError(f"act must be 'f32' or 'q8', got {self.act!r}")
        if self.act == "q8" and lay.name != "il32w8":
            raise ValueError("act='q8' needs layout il32w8")
        if min(self.rows_per_iter, self.accs, self.gemm_tokens, self.gemm_rows) < 1:
            raise ValueError("rows_per_iter, accs, gemm_tokens and gemm_rows must be >= 1")
        if self.symbol_suffix and not (self.symbol_suffix.isascii() and self.symbol_suffix.replace("_", "").isalnum()):
            raise ValueError(f"symbol_suffix must be [A-Za-z0-9_], got {self.symbol_suffix!r}")

    @property
    def lay(self) -> Layout:
        return get_layout(self.layout)

    @property
    def superblock(self) -> int:
        lay = self.lay
        return max(lay.block_cols, self.group_size) if lay.interleaved else self.group_size

    @property
    def tile(self) -> int:
        sb = self.superblock
        return max(sb, -(-self.col_tile // sb) * sb)

    @property
    def _sfx(self) -> str:
        return f"_{self.symbol_suffix}" if self.symbol_suffix else ""

    @property
    def gemv_name(self) -> str:
        return f"xbitc_gemv_b{self.bits}_g{self.group_size}{self._sfx}"

    @property
    def gemm_name(self) -> str:
        return f"xbitc_gemm_b{self.bits}_g{self.group_size}{self._sfx}"

    def key(self) -> str:
        return (
            f"b{self.bits}_g{self.group_size}_{self.layout}_{self.act}_r{self.rows_per_iter}_a{self.accs}"
            f"_t{self.col_tile}_k{self.gemm_tokens}x{self.gemm_rows}_p{self.prefetch}l{self.prefetch_locality}"
            + (f"_s{self.symbol_suffix}" if self.symbol_suffix else "")  # empty suffix: keys (and caches) unchanged
        )


def default_spec(bits: int, group_size: int, target: Target | None = None, **kw) -> KernelSpec:
    """The exact (f32) configuration measured fastest for `target` that supports this group size: il16w32 where
    the target has AVX-512, il8w32 otherwise, the canonical layout for group sizes the interleaved kernels lack."""
    layout = "canonical"
    wide = target is not None and target.is_x86 and target.has("avx512f")
    for cand in (["il16w32"] if wide else []) + ["il8w32"]:
        if get_layout(cand).supports_group(group_size):
            layout = cand
            break
    return KernelSpec(bits, group_size, layout=layout, **kw)


# --------------------------------------------------------------------------------------------------------------
# IR helpers
# --------------------------------------------------------------------------------------------------------------


def ci(v: int, t=I64):
    return ir.Constant(t, v)


def cvec(t, n, vals):
    if not isinstance(vals, (list, tuple)):
        vals = [vals] * n
    return ir.Constant(V(t, n), list(vals))


class Emitter:
    """A thin layer over ir.IRBuilder: intrinsics, vector helpers and counted loops."""

    def __init__(self, module: ir.Module, target: Target):
        self.m = module
        self.t = target
        self.b: ir.IRBuilder | None = None

    # ---- intrinsics ---------------------------------------------------------------------------------------
    def intrinsic(self, name: str, ret, args):
        if name in self.m.globals:
            return self.m.globals[name]
        return ir.Function(self.m, ir.FunctionType(ret, args), name=name)

    def fmuladd(self, a, b, c):
        ty = a.type
        n = ty.count if isinstance(ty, ir.VectorType) else 1
        name = f"llvm.fmuladd.v{n}f32" if n > 1 else "llvm.fmuladd.f32"
        return self.b.call(self.intrinsic(name, ty, [ty, ty, ty]), [a, b, c])

    def masked_load_f32(self, ptr, n, mask):
        vt = V(F32, n)
        fn = self.intrinsic(f"llvm.masked.load.v{n}f32.p0", vt, [P(vt), I32, V(I1, n), vt])
        return self.b.call(fn, [self.b.bitcast(ptr, P(vt)), ci(4, I32), mask, cvec(F32, n, 0.0)])

    def masked_store_f32(self, val, ptr, mask):
        n = val.type.count
        vt = V(F32, n)
        fn = self.intrinsic(f"llvm.masked.store.v{n}f32.p0", VOID, [vt, P(vt), I32, V(I1, n)])
        self.b.call(fn, [val, self.b.bitcast(ptr, P(vt)), ci(4, I32), mask])

    def prefetch(self, ptr, locality=3):
        """Read prefetch (never faults, so it may run past the end of the array)."""
        fn = self.intrinsic("llvm.prefetch.p0", VOID, [P(I8), I32, I32, I32])
        self.b.call(fn, [ptr, ci(0, I32), ci(locality, I32), ci(1, I32)])

    def rint(self, v):
        n = v.type.count
        return self.b.call(self.intrinsic(f"llvm.rint.v{n}f32", v.type, [v.type]), [v])

    def fabs(self, v):
        n = v.type.count
        return self.b.call(self.intrinsic(f"llvm.fabs.v{n}f32", v.type, [v.type]), [v])

    def vmax(self, a, c):
        n = a.type.count
        return self.b.call(self.intrinsic(f"llvm.maxnum.v{n}f32", a.type, [a.type, a.type]), [a, c])

    # ---- vectors ------------------------------------------------------------------------------------------
    def bcast(self, s, n):
        b = self.b
        v = b.insert_element(ir.Constant(V(s.type, n), ir.Undefined), s, ci(0, I32))
        return b.shuffle_vector(v, ir.Constant(V(s.type, n), ir.Undefined), cvec(I32, n, 0))

    def hsum(self, v):
        """Horizontal float sum by halving (a fixed tree: pairs lanes i and i+n/2)."""
        b = self.b
        n = v.type.count
        while n > 1:
            h = n // 2
            lo = b.shuffle_vector(v, v, cvec(I32, h, list(range(h))))
            hi = b.shuffle_vector(v, v, cvec(I32, h, list(range(h, n))))
            v = b.fadd(lo, hi)
            n = h
        return b.extract_element(v, ci(0, I32))

    def hsum_i32(self, v):
        b = self.b
        n = v.type.count
        while n > 1:
            h = n // 2
            lo = b.shuffle_vector(v, v, cvec(I32, h, list(range(h))))
            hi = b.shuffle_vector(v, v, cvec(I32, h, list(range(h, n))))
            v = b.add(lo, hi)
            n = h
        return b.extract_element(v, ci(0, I32))

    def f16_to_f32(self, h):
        """uint16 bits (scalar or vector) of float16 -> float32."""
        b = self.b
        vec = isinstance(h.type, ir.VectorType)
        n = h.type.count if vec else 1
        if self.t.has_f16_convert:
            ht = V(F16, n) if vec else F16
            return b.fpext(b.bitcast(h, ht), V(F32, n) if vec else F32)
        # integer route (x86 without F16C): exact for normal, subnormal and zero halves
        it = V(I32, n) if vec else I32
        ft = V(F32, n) if vec else F32

        def c(v, t=I32):
            return cvec(t, n, v) if vec else ir.Constant(t, v)

        w = b.zext(h, it)
        sign = b.shl(b.and_(w, c(0x8000)), c(16))
        mag = b.shl(b.and_(w, c(0x7FFF)), c(13))
        f = b.fmul(b.bitcast(mag, ft), c(2.0**112, F32))
        return b.bitcast(b.or_(b.bitcast(f, it), sign), ft)

    def load(self, base, index, ty, align):
        """Load a `ty` from byte/element pointer `base` + `index` elements of base's pointee."""
        b = self.b
        p = b.gep(base, [index], inbounds=True)
        if p.type.pointee != ty:
            p = b.bitcast(p, P(ty))
        return b.load(p, align=align)

    def store(self, val, base, index, align):
        b = self.b
        p = b.gep(base, [index], inbounds=True)
        if p.type.pointee != val.type:
            p = b.bitcast(p, P(val.type))
        b.store(val, p, align=align)

    # ---- control flow -------------------------------------------------------------------------------------
    def loop(self, start, stop, step, carried, body, name="l"):
        """for (i = start; i < stop; i += step) carried = body(i, carried); returns the final carried values.

        `carried` is a list of initial values; `body(i, vals)` emits the body and returns the new values.
        """
        b = self.b
        pre = b.block
        fn = pre.function
        head = fn.append_basic_block(name + ".head")
        body_bb = fn.append_basic_block(name + ".body")
        exit_bb = fn.append_basic_block(name + ".exit")
        b.branch(head)
        b.position_at_end(head)
        i = b.phi(I64, name + ".i")
        i.add_incoming(start, pre)
        phis = []
        for k, v in enumerate(carried):
            p = b.phi(v.type, f"{name}.c{k}")
            p.add_incoming(v, pre)
            phis.append(p)
        b.cbranch(b.icmp_signed("<", i, stop), body_bb, exit_bb)
        b.position_at_end(body_bb)
        new = body(i, list(phis))
        nxt = b.add(i, step)
        end = b.block
        b.branch(head)
        i.add_incoming(nxt, end)
        for p, v in zip(phis, new):
            p.add_incoming(v, end)
        b.position_at_end(exit_bb)
        return list(phis)

    def if_then_values(self, cond, vals, then_body, name="if"):
        """vals' = cond ? then_body(vals) : vals (with phis)."""
        b = self.b
        pre = b.block
        fn = pre.function
        then_bb = fn.append_basic_block(name + ".then")
        join = fn.append_basic_block(name + ".join")
        b.cbranch(cond, then_bb, join)
        b.position_at_end(then_bb)
        new = then_body(list(vals))
        then_end = b.block
        b.branch(join)
        b.position_at_end(join)
        out = []
        for v, nv in zip(vals, new):
            p = b.phi(v.type)
            p.add_incoming(v, pre)
            p.add_incoming(nv, then_end)
            out.append(p)
        return out


# --------------------------------------------------------------------------------------------------------------
# Code extraction from lane-interleaved words
# --------------------------------------------------------------------------------------------------------------


def extraction_plan(bits: int, word_bits: int, k: int, scaled: bool):
    """How to pull code k of a lane out of its `bits` words.

    Returns (kind, word_index, offset, x_scale_exponent):
      kind "mask":  word & (mask << o)          value q * 2**o   (only when scaled and o + bits < word_bits)
      kind "low":   word & mask                 (o == 0)
      kind "top":   word >> o                   (o + bits == word_bits)
      kind "shift": (word >> o) & mask
      kind "split": ((word >> o) | (next << (W - o))) & mask    (straddles two words)
    """
    p = k * bits
    wi, o = divmod(p, word_bits)
    if o + bits > word_bits:
        return "split", wi, o, 0
    if o + bits == word_bits:
        return ("top" if o else "low"), wi, o, 0
    if o == 0:
        return "low", wi, 0, 0
    if scaled:  # o + bits < word_bits: q * 2**o < 2**31 stays a positive int32, exact in float32
        return "mask", wi, o, -o
    return "shift", wi, o, 0


def emit_extract(e: Emitter, words, bits, word_bits, k, scaled):
    b = e.b
    n = words[0].type.count
    it = words[0].type.element
    kind, wi, o, _ = extraction_plan(bits, word_bits, k, scaled)
    mask = (1 << bits) - 1
    w = words[wi]
    if kind == "low":
        return w if bits == word_bits else b.and_(w, cvec(it, n, mask))
    if kind == "top":
        return b.lshr(w, cvec(it, n, o))
    if kind == "mask":
        return b.and_(w, cvec(it, n, mask << o))
    if kind == "shift":
        return b.and_(b.lshr(w, cvec(it, n, o)), cvec(it, n, mask))
    lo = b.lshr(w, cvec(it, n, o))
    hi = b.shl(words[wi + 1], cvec(it, n, word_bits - o))
    return b.and_(b.or_(lo, hi), cvec(it, n, mask))


def to_float(e: Emitter, c):
    """Non-negative integer vector -> float vector (sitofp is the cheap conversion on x86)."""
    b = e.b
    n = c.type.count
    if c.type.element.width < 32:
        c = b.zext(c, V(I32, n))
    return b.sitofp(c, V(F32, n))


# --------------------------------------------------------------------------------------------------------------
# Module generation
# --------------------------------------------------------------------------------------------------------------


def _declare(m: ir.Module, name: str, gemm: bool, linkage: str = "external"):
    args = [P(I8), P(I16), P(I8), P(F32), P(F32), I64, I64, I64]
    if gemm:
        args += [I64, I64]
    fn = ir.Function(m, ir.FunctionType(VOID, args + ([I1] if linkage == "internal" else [])), name=name)
    fn.linkage = linkage
    for k in (0, 1, 2, 3, 4):
        fn.args[k].add_attribute("noalias")
    return fn


def _wrapper(m: ir.Module, name: str, impl, gemm: bool, acc: bool):
    fn = _declare(m, name, gemm)
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    b.call(impl, list(fn.args) + [ir.Constant(I1, int(acc))])
    b.ret_void()


KINDS = ("gemv", "gemm")


def symbol_names(spec: KernelSpec, kind: str) -> tuple[str, str]:
    base = spec.gemv_name if kind == "gemv" else spec.gemm_name
    return base, base + "_acc"


def generate_module(spec: KernelSpec, target: Target, kinds=KINDS) -> ir.Module:
    """IR module with the requested kernel kinds ("gemv": gemv + gemv_acc, "gemm": gemm + gemm_acc)."""
    m = ir.Module(name=f"xbitc_{spec.key()}")
    m.triple = target.triple
    e = Emitter(m, target)
    lay = spec.lay
    impls = []
    for kind in kinds:
        if kind == "gemv":
            impls.append((_gen_gemv_il(e, spec) if lay.interleaved else _gen_gemv_canonical(e, spec), False))
        elif kind == "gemm":
            impls.append((_gen_gemm(e, spec), True))
        else:
            raise ValueError(f"unknown kernel kind {kind!r}")
    for impl, is_gemm in impls:
        name = spec.gemm_name if is_gemm else spec.gemv_name
        impl.attributes.add("noinline")
        _wrapper(m, name, impl, is_gemm, acc=False)
        _wrapper(m, name + "_acc", impl, is_gemm, acc=True)
    return m


def _store_y(e: Emitter, y, idx, val, overwrite):
    """y[idx] = overwrite ? val : y[idx] + val (y is not read when overwriting)."""
    b = e.b
    p = b.gep(y, [idx], inbounds=True)

    def add_old(vals):
        return [b.fadd(b.load(p, align=4), vals[0])]

    (v,) = e.if_then_values(b.not_(overwrite), [val], add_old, name="yacc")
    b.store(v, p, align=4)


# ---------------------------------------------------------------------------------------- gemv (interleaved)


class DotU8S8:
    """Integer dot-product accumulator: acc (<8 x i32>) += u8 codes (<32 x i8>) x s8 activations (<32 x i8>).

    * AVX-512 VNNI / AVX-VNNI: one ``vpdpbusd`` per step.
    * AVX2: ``pmaddubsw`` gives 16 i16 pair sums; those are added up in i16 for as many steps as cannot overflow
      (pair sum <= 2 * qmax * 127) and only then widened with ``pmaddwd(., 1)`` into the i32 accumulator. 8-bit
      codes are split into nibbles (pair sums would saturate pmaddubsw) and recombined as lo + 16 * hi.
    * AArch64 with dot products: ``sdot`` (or ``usdot`` with i8mm) on each 16-byte half, the same four-byte groups
      per i32 lane as vpdpbusd; sdot reads codes as signed, so 8-bit codes go in as nibbles (lo + 16 * hi). An
      activation vector that repeats one 32-bit lane of a register becomes the indexed form (``sdot v.4s, c.16b,
      x.4b[i]``).
    * anything else: generic widening multiply (LLVM picks the instructions).

    One accumulator is one token's. The row-lane q8 kernel's prefill path (rowlane._q8_plane_dots) feeds the same
    masked codes to one accumulator per token of a group; on i8mm it uses ``usmmla`` on token pairs instead
    (rowlane._q8_plane_mmla), not this class.
    """

    def __init__(self, e: Emitter, acc, bits: int):
        self.e, self.acc, self.bits = e, acc, bits
        t = e.t
        if t.is_x86 and ((t.has("avx512vnni") and t.has("avx512vl")) or t.has("avxvnni")):
            self.mode = "vnni"
        elif t.is_x86 and t.has("avx2"):
            self.mode = "avx2"
        elif t.triple.startswith(("aarch64", "arm64")) and t.has("dotprod"):
            self.mode = "usdot" if t.has("i8mm") else "sdot"
        else:
            self.mode = "generic"
        qmax = 15 if bits == 8 else (1 << bits) - 1
        self.max_pending = max(1, 32767 // (2 * qmax * 127))
        self.pending: list = []  # i16 partial sums (one, or lo/hi for 8-bit codes)
        self.count = 0

    def add(self, u8, s8):
        e, b = self.e, self.e.b
        v8i = V(I32, 8)
        if self.mode == "vnni":
            fn = e.intrinsic("llvm.x86.avx512.vpdpbusd.256", v8i, [v8i, v8i, v8i])
            self.acc = b.call(fn, [self.acc, b.bitcast(u8, v8i), b.bitcast(s8, v8i)])
        elif self.mode == "avx2":
            v32, v16 = V(I8, 32), V(I16, 16)
            pm = e.intrinsic("llvm.x86.avx2.pmadd.ub.sw", v16, [v32, v32])
            if self.bits == 8:
                lo = b.and_(u8, cvec(I8, 32, 15))
                hi = b.lshr(u8, cvec(I8, 32, 4))
                parts = [b.call(pm, [lo, s8]), b.call(pm, [hi, s8])]
            else:
                parts = [b.call(pm, [u8, s8])]
            self.pending = parts if not self.pending else [b.add(p, q) for p, q in zip(self.pending, parts)]
            self.count += 1
            if self.count >= self.max_pending:
                self.flush()
        elif self.mode in ("sdot", "usdot"):
            v16b, v4i = V(I8, 16), V(I32, 4)
            fn = e.intrinsic(f"llvm.aarch64.neon.{self.mode}.v4i32.v16i8", v4i, [v4i, v16b, v16b])

            def half(v, k, n):
                return b.shuffle_vector(v, v, cvec(I32, n, list(range(k * n, k * n + n))))

            def dot(acc, codes):
                return [b.call(fn, [half(acc, k, 4), half(codes, k, 16), half(s8, k, 16)]) for k in (0, 1)]

            if self.mode == "sdot" and self.bits == 8:  # codes >= 128 would read as negative
                lo = dot(self.acc, b.and_(u8, cvec(I8, 32, 15)))
                hi = dot(cvec(I32, 8, 0), b.lshr(u8, cvec(I8, 32, 4)))
                parts = [b.add(x, b.shl(y, cvec(I32, 4, 4))) for x, y in zip(lo, hi)]
            else:
                parts = dot(self.acc, u8)
            self.acc = b.shuffle_vector(parts[0], parts[1], cvec(I32, 8, list(range(8))))
        else:
            v16 = V(I16, 32)
            prod = b.mul(b.zext(u8, v16), b.sext(s8, v16))  # |q*x| <= 255*127 fits i16
            ev = b.sext(b.shuffle_vector(prod, prod, cvec(I32, 16, list(range(0, 32, 2)))), V(I32, 16))
            od = b.sext(b.shuffle_vector(prod, prod, cvec(I32, 16, list(range(1, 32, 2)))), V(I32, 16))
            sm = b.add(ev, od)
            lo = b.shuffle_vector(sm, sm, cvec(I32, 8, list(range(0, 16, 2))))
            hi = b.shuffle_vector(sm, sm, cvec(I32, 8, list(range(1, 16, 2))))
            self.acc = b.add(self.acc, b.add(lo, hi))

    def flush(self):
        if not self.pending:
            return
        e, b = self.e, self.e.b
        v16, v8i = V(I16, 16), V(I32, 8)
        pw = e.intrinsic("llvm.x86.avx2.pmadd.wd", v8i, [v16, v16])
        w = b.call(pw, [self.pending[0], cvec(I16, 16, 1)])
        if len(self.pending) == 2:
            w = b.add(w, b.call(pw, [self.pending[1], cvec(I16, 16, 16)]))
        self.acc = b.add(self.acc, w)
        self.pending, self.count = [], 0

    def value(self):
        self.flush()
        return self.acc


def _hmax(e: Emitter, v):
    b = e.b
    n = v.type.count
    while n > 1:
        h = n // 2
        lo = b.shuffle_vector(v, v, cvec(I32, h, list(range(h))))
        hi = b.shuffle_vector(v, v, cvec(I32, h, list(range(h, n))))
        v = e.vmax(lo, hi)
        n = h
    return b.extract_element(v, ci(0, I32))


def _gen_gemv_il(e: Emitter, spec: KernelSpec):
    """gemv over a lane-interleaved layout; act f32 (float x, FMA) or q8 (int8 x, integer dot products)."""
    lay = spec.lay
    L, W, B = lay.lanes, lay.word_bits, lay.block_cols
    bits, G = spec.bits, spec.group_size
    BB = lay.block_bytes(bits)
    T = spec.tile
    SB = spec.superblock
    KG = G // L  # k-steps per group
    q8 = spec.act == "q8"
    scaled = W == 32 and not q8
    wt = V(ir.IntType(W), L)
    vf = V(F32, L)
    zero_f = cvec(F32, L, 0.0)
    acc_zero = cvec(I32, 8, 0) if q8 else zero_f
    nacc = 1 if q8 else spec.accs
    R = spec.rows_per_iter
    yt = V(F32, 8) if q8 else vf
    y_zero = cvec(F32, 8, 0.0) if q8 else zero_f

    # x scale per k-step within a block (f32 path: the code at offset o is read as q * 2**o)
    kscale = [2.0 ** extraction_plan(bits, W, k, scaled)[3] for k in range(W)]
    scale_tab = ir.GlobalVariable(e.m, ir.ArrayType(F32, W), name=f"xbitc_kscale_b{bits}_w{W}")
    scale_tab.global_constant = True
    scale_tab.linkage = "internal"
    scale_tab.initializer = ir.Constant(ir.ArrayType(F32, W), kscale)

    fn = _declare(e.m, spec.gemv_name + "_impl", gemm=False, linkage="internal")
    codes, scales, zeros, x, y, rb, re, n, accflag = fn.args
    b = e.b = ir.IRBuilder(fn.append_basic_block("entry"))
    xbuf = b.alloca(I8 if q8 else F32, size=ci(T), name="xbuf")  # prepared x tile (zero padded)
    xbuf.align = 64
    ng_tile_max = -(-T // G) + 1
    xg = b.alloca(F32, size=ci(ng_tile_max), name="xgsum")  # per-group sums of (prepared) x
    dg = b.alloca(F32, size=ci(ng_tile_max), name="dg") if q8 else None  # q8: activation scale per group

    ng = b.sdiv(b.add(n, ci(G - 1)), ci(G))
    nb_row = b.sdiv(b.add(n, ci(B - 1)), ci(B))
    row_stride = b.mul(nb_row, ci(BB))
    lane_l = cvec(I64, L, list(range(L)))
    lane8 = cvec(I64, 8, list(range(8)))

    def tile_body(t0, _):
        tc = b.select(b.icmp_signed("<", b.sub(n, t0), ci(T)), b.sub(n, t0), ci(T))
        g0 = b.sdiv(t0, ci(G))
        ng_tile = b.sdiv(b.add(tc, ci(G - 1)), ci(G))
        # groups the padded tile covers (padding groups get zero x and zero sums)
        ng_pad = b.sdiv(b.add(b.mul(b.sdiv(b.add(tc, ci(B - 1)), ci(B)), ci(B)), ci(G - 1)), ci(G))

        if not q8:

            def pro_group(gl, _):
                c0 = b.mul(gl, ci(G))

                def kstep(kk, acc):
                    c = b.add(c0, b.mul(kk, ci(L)))  # column within tile
                    mask = b.icmp_signed("<", lane_l, e.bcast(b.sub(tc, c), L))
                    xv = e.masked_load_f32(b.gep(x, [b.add(t0, c)], inbounds=True), L, mask)
                    ks = b.srem(b.sdiv(c, ci(L)), ci(W))
                    sc = b.load(b.gep(scale_tab, [ci(0), ks], inbounds=True), align=4)
                    e.store(b.fmul(xv, e.bcast(sc, L)), xbuf, c, 32)
                    return [b.fadd(acc[0], xv)]

                (s,) = e.loop(ci(0), ci(KG), ci(1), [zero_f], kstep, name="prok")
                e.store(e.hsum(s), xg, gl, 4)
                return []

        else:

            def pro_group(gl, _):
                c0 = b.mul(gl, ci(G))

                def xload(kk):
                    c = b.add(c0, b.mul(kk, ci(8)))
                    mask = b.icmp_signed("<", lane8, e.bcast(b.sub(tc, c), 8))
                    return c, e.masked_load_f32(b.gep(x, [b.add(t0, c)], inbounds=True), 8, mask)

                (amax,) = e.loop(ci(0), ci(G // 8), ci(1), [cvec(F32, 8, 0.0)],
                                 lambda kk, a: [e.vmax(a[0], e.fabs(xload(kk)[1]))], name="proa")
                amax = _hmax(e, amax)
                pos = b.fcmp_ordered(">", amax, ir.Constant(F32, 0.0))
                d = b.fdiv(amax, ir.Constant(F32, 127.0))
                inv = b.select(pos, b.fdiv(ir.Constant(F32, 127.0), b.select(pos, amax, ir.Constant(F32, 1.0))),
                               ir.Constant(F32, 0.0))
                invv = e.bcast(inv, 8)

                def quant(kk, acc):
                    c, xv = xload(kk)
                    qi = b.fptosi(e.rint(b.fmul(xv, invv)), V(I32, 8))
                    e.store(b.trunc(qi, V(I8, 8)), xbuf, c, 8)
                    return [b.add(acc[0], qi)]

                (isum,) = e.loop(ci(0), ci(G // 8), ci(1), [cvec(I32, 8, 0)], quant, name="proq")
                e.store(d, dg, gl, 4)
                e.store(b.fmul(b.sitofp(e.hsum_i32(isum), F32), d), xg, gl, 4)
                return []

        e.loop(ci(0), ng_pad, ci(1), [], pro_group, name="pro")

        nsb = b.sdiv(b.add(tc, ci(SB - 1)), ci(SB))
        overwrite = b.and_(b.icmp_signed("==", t0, ci(0)), b.not_(accflag))
        last_row = b.sub(re, ci(1))

        def rows_body(r, _):
            # rows past the range are computed on a clamped (valid) row and not stored
            rows = [b.select(b.icmp_signed("<", b.add(r, ci(i)), re), b.add(r, ci(i)), last_row) if i else r
                    for i in range(R)]
            tile_off = b.mul(b.sdiv(t0, ci(B)), ci(BB))
            rowp = [b.gep(codes, [b.add(b.mul(ri, row_stride), tile_off)], inbounds=True) for ri in rows]
            srow = [b.gep(scales, [b.mul(ri, ng)], inbounds=True) for ri in rows]

            def flush(Q, yacc, gl):
                # padding groups (past ng) have Q == 0; clamp their scale index to a valid one
                g = b.add(g0, gl)
                g = b.select(b.icmp_signed("<", g, ng), g, b.sub(ng, ci(1)))
                d = b.load(b.gep(dg, [gl], inbounds=True), align=4) if q8 else None
                out = []
                for i in range(R):
                    s = e.f16_to_f32(b.load(b.gep(srow[i], [g], inbounds=True), align=2))
                    if q8:
                        out.append(e.fmuladd(b.sitofp(Q[i][0], yt), e.bcast(b.fmul(s, d), 8), yacc[i]))
                    else:
                        q = Q[i][0]
                        for a in range(1, nacc):
                            q = b.fadd(q, Q[i][a])
                        out.append(e.fmuladd(q, e.bcast(s, L), yacc[i]))
                return out

            def block(blk, Q, yacc, gl_base):
                """All W k-steps of one block; flushes groups when gl_base is given (G <= B)."""
                boff = b.mul(blk, ci(BB))
                if spec.prefetch:
                    for i in range(R):
                        for line in range(0, BB, 64):
                            e.prefetch(b.gep(rowp[i], [b.add(boff, ci(spec.prefetch + line))]),
                                       spec.prefetch_locality)
                words = [[e.load(rowp[i], b.add(boff, ci(wi * L * W // 8)), wt, 1) for wi in range(bits)]
                         for i in range(R)]
                dots = [DotU8S8(e, Q[i][0], bits) for i in range(R)] if q8 else None
                for k in range(W):
                    xv = e.load(xbuf, b.add(b.mul(blk, ci(B)), ci(k * L)), wt if q8 else vf, 32)
                    for i in range(R):
                        c = emit_extract(e, words[i], bits, W, k, scaled)
                        a = k % nacc
                        if q8:
                            dots[i].add(c, xv)
                        else:
                            Q[i][a] = e.fmuladd(to_float(e, c), xv, Q[i][a])
                    if gl_base is not None and (k + 1) % KG == 0:
                        if q8:
                            Q = [[d.value()] for d in dots]
                        yacc = flush(Q, yacc, b.add(gl_base, ci(k // KG)))
                        Q = [[acc_zero] * nacc for _ in range(R)]
                        if q8:
                            dots = [DotU8S8(e, acc_zero, bits) for _ in range(R)]
                if q8:
                    Q = [[d.value()] for d in dots]
                return Q, yacc

            if G <= B:

                def sb_body(sb, yacc):
                    Q = [[acc_zero] * nacc for _ in range(R)]
                    return block(sb, Q, yacc, b.mul(sb, ci(B // G)))[1]

            else:

                def sb_body(sb, yacc):
                    left = b.sdiv(b.add(b.sub(tc, b.mul(sb, ci(G))), ci(B - 1)), ci(B))
                    nblk = b.select(b.icmp_signed("<", left, ci(G // B)), left, ci(G // B))
                    first = b.mul(sb, ci(G // B))

                    def inner(j, Qflat):
                        Q = [Qflat[i * nacc:(i + 1) * nacc] for i in range(R)]
                        Q, _ = block(b.add(first, j), Q, [], None)
                        return [q for row in Q for q in row]

                    Qflat = e.loop(ci(0), nblk, ci(1), [acc_zero] * (R * nacc), inner, name="blk")
                    return flush([Qflat[i * nacc:(i + 1) * nacc] for i in range(R)], yacc, sb)

            yacc = e.loop(ci(0), nsb, ci(1), [y_zero] * R, sb_body, name="sb")

            # zero-point term per row: corr = sum_g s_g * z_g * xg_g
            nv = b.mul(b.sdiv(ng_tile, ci(8)), ci(8))
            for i in range(R):
                zrow = b.gep(zeros, [b.mul(rows[i], ng)], inbounds=True)

                def corr_vec(g, cv, i=i, zrow=zrow):
                    gg = b.add(g0, g)
                    s = e.f16_to_f32(e.load(srow[i], gg, V(I16, 8), 2))
                    z = to_float(e, e.load(zrow, gg, V(I8, 8), 1))
                    return [e.fmuladd(b.fmul(s, z), e.load(xg, g, V(F32, 8), 4), cv[0])]

                (cv,) = e.loop(ci(0), nv, ci(8), [cvec(F32, 8, 0.0)], corr_vec, name="corrv")

                def corr_scalar(g, cs, i=i, zrow=zrow):
                    gg = b.add(g0, g)
                    s = e.f16_to_f32(b.load(b.gep(srow[i], [gg], inbounds=True), align=2))
                    z = b.uitofp(b.load(b.gep(zrow, [gg], inbounds=True), align=1), F32)
                    return [e.fmuladd(b.fmul(s, z), b.load(b.gep(xg, [g], inbounds=True), align=4), cs[0])]

                (cs,) = e.loop(nv, ng_tile, ci(1), [ir.Constant(F32, 0.0)], corr_scalar, name="corrs")
                val = b.fsub(e.hsum(yacc[i]), b.fadd(e.hsum(cv), cs))
                if i == 0:
                    _store_y(e, y, r, val, overwrite)
                else:
                    e.if_then_values(b.icmp_signed("<", b.add(r, ci(i)), re), [],
                                     lambda _, i=i, val=val: (_store_y(e, y, b.add(r, ci(i)), val, overwrite), [])[1],
                                     name="rowok")
            return []

        e.loop(rb, re, ci(R), [], rows_body, name="rows")
        return []

    # in_features == 0: the tile loop never runs, but y = W x = 0 must still be written
    def empty(_):
        e.loop(rb, re, ci(1), [], lambda r, _: (e.store(ir.Constant(F32, 0.0), y, r, 4), [])[1], name="zero")
        return []

    e.if_then_values(b.and_(b.icmp_signed("<=", n, ci(0)), b.not_(accflag)), [], empty, name="n0")
    e.loop(ci(0), n, ci(T), [], tile_body, name="tile")
    b.ret_void()
    return fn


# ---------------------------------------------------------------------------------------- canonical fallback


def _emit_canonical_code(e: Emitter, rowp, j, bits, row_bytes):
    """Code j of a canonical LSB-first row stream (scalar; never reads past the row)."""
    b = e.b
    if bits == 8:
        return b.zext(b.load(b.gep(rowp, [j], inbounds=True), align=1), I32)
    p = b.mul(j, ci(bits))
    byte = b.lshr(p, ci(3))
    off = b.trunc(b.and_(p, ci(7)), I32)
    lo = b.zext(b.load(b.gep(rowp, [byte], inbounds=True), align=1), I32)
    nxt = b.add(byte, ci(1))
    nxt_ok = b.icmp_signed("<", nxt, row_bytes)
    hi = b.zext(b.load(b.gep(rowp, [b.select(nxt_ok, nxt, byte)], inbounds=True), align=1), I32)
    hi = b.select(nxt_ok, hi, ir.Constant(I32, 0))
    word = b.or_(lo, b.shl(hi, ir.Constant(I32, 8)))
    return b.and_(b.lshr(word, off), ir.Constant(I32, (1 << bits) - 1))


def _gen_gemv_canonical(e: Emitter, spec: KernelSpec):
    bits, G = spec.bits, spec.group_size
    fn = _declare(e.m, spec.gemv_name + "_impl", gemm=False, linkage="internal")
    codes, scales, zeros, x, y, rb, re, n, accflag = fn.args
    b = e.b = ir.IRBuilder(fn.append_basic_block("entry"))
    ng = b.sdiv(b.add(n, ci(G - 1)), ci(G))
    rbytes = b.sdiv(b.add(b.mul(n, ci(bits)), ci(7)), ci(8))

    def row(r, _):
        rowp = b.gep(codes, [b.mul(r, rbytes)], inbounds=True)

        def group(g, acc):
            s = e.f16_to_f32(b.load(b.gep(scales, [b.add(b.mul(r, ng), g)], inbounds=True), align=2))
            z = b.uitofp(b.load(b.gep(zeros, [b.add(b.mul(r, ng), g)], inbounds=True), align=1), F32)
            j0 = b.mul(g, ci(G))
            j1 = b.select(b.icmp_signed("<", b.add(j0, ci(G)), n), b.add(j0, ci(G)), n)

            def col(j, a):
                q = b.sitofp(_emit_canonical_code(e, rowp, j, bits, rbytes), F32)
                w = b.fmul(s, b.fsub(q, z))
                return [e.fmuladd(w, b.load(b.gep(x, [j], inbounds=True), align=4), a[0])]

            return e.loop(j0, j1, ci(1), acc, col, name="col")

        (acc,) = e.loop(ci(0), ng, ci(1), [ir.Constant(F32, 0.0)], group, name="grp")
        _store_y(e, y, r, acc, b.not_(accflag))
        return []

    e.loop(rb, re, ci(1), [], row, name="rows")
    b.ret_void()
    return fn


# ---------------------------------------------------------------------------------------- gemm


def _gen_gemm(e: Emitter, spec: KernelSpec):
    """Batched product: per row, decode a block of weights to float once, reuse it for every token."""
    lay = spec.lay
    bits, G = spec.bits, spec.group_size
    fn = _declare(e.m, spec.gemm_name + "_impl", gemm=True, linkage="internal")
    codes, scales, zeros, x, y, rb, re, n, batch, ldy, accflag = fn.args
    b = e.b = ir.IRBuilder(fn.append_basic_block("entry"))
    ng = b.sdiv(b.add(n, ci(G - 1)), ci(G))

    if not lay.interleaved:
        # canonical: decode one row to a float buffer (tile of TC columns), then dot with every token
        TC = 4096
        wbuf = b.alloca(F32, size=ci(TC), name="wrow")
        accs = b.alloca(F32, size=batch, name="acc")
        rbytes = b.sdiv(b.add(b.mul(n, ci(bits)), ci(7)), ci(8))

        def row(r, _):
            rowp = b.gep(codes, [b.mul(r, rbytes)], inbounds=True)
            e.loop(ci(0), batch, ci(1), [], lambda t, _: (e.store(ir.Constant(F32, 0.0), accs, t, 4), [])[1])

            def tile(c0, _):
                cend = b.select(b.icmp_signed("<", b.add(c0, ci(TC)), n), b.add(c0, ci(TC)), n)

                def dec(j, _):
                    g = b.add(b.mul(r, ng), b.sdiv(j, ci(G)))
                    s = e.f16_to_f32(b.load(b.gep(scales, [g], inbounds=True), align=2))
                    z = b.uitofp(b.load(b.gep(zeros, [g], inbounds=True), align=1), F32)
                    q = b.sitofp(_emit_canonical_code(e, rowp, j, bits, rbytes), F32)
                    e.store(b.fmul(s, b.fsub(q, z)), wbuf, b.sub(j, c0), 4)
                    return []

                e.loop(c0, cend, ci(1), [], dec, name="dec")

                def tok(t, _):
                    xrow = b.gep(x, [b.mul(t, n)], inbounds=True)

                    def dot(j, a):
                        w = b.load(b.gep(wbuf, [b.sub(j, c0)], inbounds=True), align=4)
                        return [e.fmuladd(w, b.load(b.gep(xrow, [j], inbounds=True), align=4), a[0])]

                    (a,) = e.loop(c0, cend, ci(1), [ir.Constant(F32, 0.0)], dot, name="dot")
                    p = b.gep(accs, [t], inbounds=True)
                    b.store(b.fadd(b.load(p, align=4), a), p, align=4)
                    return []

                e.loop(ci(0), batch, ci(1), [], tok, name="tok")
                return []

            e.loop(ci(0), n, ci(TC), [], tile, name="ctile")

            def out(t, _):
                v = b.load(b.gep(accs, [t], inbounds=True), align=4)
                _store_y(e, y, b.add(b.mul(t, ldy), r), v, b.not_(accflag))
                return []

            e.loop(ci(0), batch, ci(1), [], out, name="out")
            return []

        e.loop(rb, re, ci(1), [], row, name="rows")
        b.ret_void()
        return fn

    L, W, B = lay.lanes, lay.word_bits, lay.block_cols
    BB = lay.block_bytes(bits)
    wt = V(ir.IntType(W), L)
    # decode / accumulate in 8-wide float vectors regardless of the layout's lane count
    VL = 8
    sub = L // VL  # 8-wide pieces per k-step
    vf = V(F32, VL)
    zero_v = cvec(F32, VL, 0.0)
    nvec = W * sub  # float vectors per decoded block
    RB = spec.gemm_rows  # rows per register tile
    TB = spec.gemm_tokens  # tokens per register tile
    U = 2  # vectors per iteration of the (rolled) dot-product loop
    wbuf = b.alloca(vf, size=ci(RB * nvec), name="wblk")  # decoded weights of RB rows x one block
    wbuf.align = 32
    accs = b.alloca(vf, size=b.mul(batch, ci(RB)), name="acc")  # per (token, row) lane partial sums
    accs.align = 32
    nb_row = b.sdiv(b.add(n, ci(B - 1)), ci(B))
    nfull = b.sdiv(n, ci(B))
    row_stride = b.mul(nb_row, ci(BB))
    lane_idx = cvec(I64, VL, list(range(VL)))
    last_tok = b.sub(batch, ci(1))
    last_row = b.sub(re, ci(1))

    def rowtile(r, _):
        # rows past the range are computed on a clamped row and never stored
        e.loop(ci(0), b.mul(batch, ci(RB)), ci(1), [], lambda t, _: (e.store(zero_v, accs, t, 32), [])[1],
               name="zacc")

        def decode(blk):
            """wbuf[i] = s * (q - z) for the block's columns of row i (padding columns decode to finite junk and
            meet x == 0). A runtime loop over the RB rows keeps the unrolled code (and compile time) small."""

            def one_row(i, _):
                ri = b.add(r, i)
                ri = b.select(b.icmp_signed("<", ri, re), ri, last_row)
                rowp = b.gep(codes, [b.mul(ri, row_stride)], inbounds=True)
                srow = b.gep(scales, [b.mul(ri, ng)], inbounds=True)
                zrow = b.gep(zeros, [b.mul(ri, ng)], inbounds=True)
                words = [e.load(rowp, b.add(b.mul(blk, ci(BB)), ci(wi * L * W // 8)), wt, 1) for wi in range(bits)]
                wrow = b.mul(i, ci(nvec))
                cache = {}
                for k in range(W):
                    gsel = k // (G // L) if G <= B else 0
                    if gsel not in cache:
                        g = b.add(b.mul(blk, ci(B // G)), ci(gsel)) if G <= B else b.sdiv(blk, ci(G // B))
                        g = b.select(b.icmp_signed("<", g, ng), g, b.sub(ng, ci(1)))
                        s = e.f16_to_f32(b.load(b.gep(srow, [g], inbounds=True), align=2))
                        z = b.uitofp(b.load(b.gep(zrow, [g], inbounds=True), align=1), F32)
                        cache[gsel] = (e.bcast(s, VL), e.bcast(b.fneg(b.fmul(s, z)), VL))
                    sv, nzv = cache[gsel]
                    c = emit_extract(e, words, bits, W, k, scaled=False)
                    for p in range(sub):
                        cp = c if sub == 1 else b.shuffle_vector(c, c, cvec(I32, VL, list(range(p * VL, p * VL + VL))))
                        e.store(e.fmuladd(to_float(e, cp), sv, nzv), wbuf, b.add(wrow, ci(k * sub + p)), 32)
                return []

            e.loop(ci(0), ci(RB), ci(1), [], one_row, name="dec")

        def dot_tokens(col0, tail):
            def tokens(t, _):
                # TB tokens x RB rows of accumulators; tokens past the batch are clamped to the last one: they
                # recompute and store the identical value, so the result is unaffected
                toks = [b.select(b.icmp_signed("<", b.add(t, ci(u)), batch), b.add(t, ci(u)), last_tok) if u else t
                        for u in range(TB)]
                xrow = [b.gep(x, [b.add(b.mul(tk, n), col0)], inbounds=True) for tk in toks]
                aidx = [[b.add(b.mul(tk, ci(RB)), ci(i)) for tk in toks] for i in range(RB)]
                init = [e.load(accs, aidx[i][u], vf, 32) for i in range(RB) for u in range(TB)]

                def vloop(v0, a):
                    a = list(a)
                    for dv in range(U):
                        v = b.add(v0, ci(dv))
                        ws = [e.load(wbuf, b.add(v, ci(i * nvec)), vf, 32) for i in range(RB)]
                        if tail:
                            left = b.sub(b.sub(n, col0), b.mul(v, ci(VL)))
                            mask = b.icmp_signed("<", lane_idx, e.bcast(left, VL))
                        for u in range(TB):
                            p = b.gep(xrow[u], [b.mul(v, ci(VL))], inbounds=True)
                            xv = e.masked_load_f32(p, VL, mask) if tail else e.load(p, ci(0), vf, 4)
                            for i in range(RB):
                                a[i * TB + u] = e.fmuladd(ws[i], xv, a[i * TB + u])
                    return a

                a = e.loop(ci(0), ci(nvec), ci(U), init, vloop, name="dotv")
                for i in range(RB):
                    for u in range(TB):
                        e.store(a[i * TB + u], accs, aidx[i][u], 32)
                return []

            e.loop(ci(0), batch, ci(TB), [], tokens, name="tok")

        def full_block(blk, _):
            decode(blk)
            dot_tokens(b.mul(blk, ci(B)), False)
            return []

        e.loop(ci(0), nfull, ci(1), [], full_block, name="blk")

        def tail_block(_):
            decode(nfull)
            dot_tokens(b.mul(nfull, ci(B)), True)
            return []

        e.if_then_values(b.icmp_signed("<", nfull, nb_row), [], tail_block, name="tail")

        def out(t, _):
            for i in range(RB):
                v = e.hsum(e.load(accs, b.add(b.mul(t, ci(RB)), ci(i)), vf, 32))
                if i == 0:
                    _store_y(e, y, b.add(b.mul(t, ldy), r), v, b.not_(accflag))
                else:
                    e.if_then_values(
                        b.icmp_signed("<", b.add(r, ci(i)), re), [],
                        lambda _, i=i, v=v: (_store_y(e, y, b.add(b.mul(t, ldy), b.add(r, ci(i))), v,
                                                      b.not_(accflag)), [])[1], name="rowok")
            return []

        e.loop(ci(0), batch, ci(1), [], out, name="out")
        return []

    e.loop(rb, re, ci(RB), [], rowtile, name="rows")
    b.ret_void()
    return fn
