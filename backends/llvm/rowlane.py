"""The row-lane kernel: a whole mixed-depth linear in one call, vectorised over rows.

Why. Learned allocation cuts every weight matrix into segments of equal depth, and most are short: on the 3.0 bpw
SmolLM2-135M, 998 segments over 211 matrices, 642 of them under 64 columns (an outlier column at 8 bits, say), with
rows of only 576-1536 columns. The lane-interleaved gemv kernels (codegen.py) put vector lanes on columns, so every
row of every segment ends in a horizontal sum, a zero-point dot product and a store, and every segment is a call:
a decode step spent most of its kernel time in that per-row, per-segment overhead, not in arithmetic. Here lanes
are *rows*: 16 rows advance together through the columns, one broadcast x[j] feeds 16 multiply-adds, partial sums
stay vertical (no horizontal sums at all), and one call walks every segment of the matrix, whatever its depth.

    y[r] = sum_records s_g[r] * (sum_{j in g} q[r, j] x[j]) - s_g[r] z_g[r] (sum_{j in g} x[j])

Records. A record is one scale group of one segment (a multi-group segment is one record per group):
7 int64 each -- kind, ncols, codes, scales, zeros (byte addresses of the record's data in row block 0), x_offset
(the group's first column in the permuted input), stride (bytes from one row block's data to the next). `pack`
lays every record of a matrix out in one buffer, row block by row block ([codes, 16 float16 scales, 16 uint8 zero
points] of record 0, then record 1, ...), so a row block is one sequential read however many records there are.
Two code formats, chosen per record by fewer bytes (`record_kind`):

* kind 1..8 (packed, that many bits): blocks of 16 rows x 32 columns; a block is `bits` vectors of 16 x uint32, word
  w of lane l holding bits [32w, 32w+32) of row l's LSB-first stream of 32 codes (code k at bits k*b..k*b+b-1).
  Blocks of one row block follow each other along the columns; the last is zero padded. The extraction of code k is
  the same compile-time shift/mask as the interleaved kernels' (`codegen.emit_extract`).
* kind 9 (bytes): one byte per code, [rows/16][ncols][16] -- for records so narrow (e.g. 3 columns) that padding
  them to 32 would cost more bytes than one byte per code.

Functions::

    void xbitc_rows_gemv(const int64_t* rec, int64_t nrec, const float* x, const int32_t* perm, float* y,
                         int64_t rows_begin, int64_t rows_end)
    void xbitc_rows_gemm(const int64_t* rec, int64_t nrec, const float* x, float* y, int64_t rows_begin,
                         int64_t rows_end, int64_t batch, int64_t ldx, int64_t ldy)

gemv reads x through the matrix's column permutation (x[perm[j]], perm NULL = identity) while it copies x once
per call; gemm reads an x already gathered by it. y = W x (written, never read): y[r] (gemv) / y[t*ldy + r] (gemm),
rows in [rows_begin, rows_end), rows_begin a
multiple of 16, so disjoint row ranges run on different threads. gemm decodes each block's codes once per 8
columns and applies them to every token (partial sums per token in a stack buffer), so prefill does not re-extract
codes per token. Padding columns carry code 0; their x index is clamped to a valid column, so nothing past a
record's columns is read and padding contributes exactly 0.

With int8 activations (RowLaneSpec(act="q8")) one function serves any batch::

    void xbitc_rows_q8(const int64_t* rec, int64_t nrec, const float* x, const int32_t* perm, float* y,
                       int64_t rows_begin, int64_t rows_end, int64_t batch, int64_t ldx, int64_t ldy,
                       int8_t* scratch)

Its records hold the codes as bit planes (`q8_planes`, `layout_codes`); every record's x is quantized to int8 per
token into the caller's scratch (`q8_scratch_bytes`). Under q8_group_tokens(target) tokens (decode) it runs token by
token, a record visit serving two or four 16-row blocks. From that many on (prefill) a visit serves one row block and
a group of T tokens: each code word is loaded, shifted and masked once for all T (on AArch64 i8mm, token pairs go
through usmmla); the batch % T tokens left run the one-token path.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from .codegen import (F32, I8, I16, I32, I64, P, V, VOID, DotU8S8, Emitter, _hmax, ci, cvec, emit_extract,
                      extraction_plan)

ROWS_KIND = "rows"
ROWS_VERSION = 14  # of the record format and code generator: part of the cache key
REC_FIELDS = 7
BYTES_KIND = 9
LANES = 16
BLOCK_COLS = 32
# 16-row blocks one record visit serves in the q8 kernel (while that many whole blocks remain): more blocks share a
# visit's fixed work (fields, depth dispatch, table and activation loads), but at 6-8 bits their accumulators do not
# fit the registers together and the blocks run as separate passes. A/B (BENCHMARKS.md): 4 blocks are faster at 1-5
# bits (1 bit 676 -> 566 us), slower at 6-8 (7 bits, 2 threads 2071 -> 2924 us). So each call picks per matrix:
# Q8_ROW_BLOCKS_WIDE while under half its code bytes are in records of Q8_WIDE_MAX_BITS + 1 or more bits (targets
# with 512-bit VNNI only; elsewhere always Q8_ROW_BLOCKS).
Q8_ROW_BLOCKS = 2
Q8_ROW_BLOCKS_WIDE = 4
Q8_WIDE_MAX_BITS = 5
CHUNK = 8  # columns decoded at a time in gemm (8 code vectors live in registers while tokens stream by)
# Records of at most Q8_PREFETCH_MAX_BITS bits are too short (1 bit, 128 columns: 304 bytes per row block) for the
# hardware prefetcher to run far enough ahead of the kernel, so their visits prefetch their own bytes that many bytes
# on, into L2 (A/B on 4096x14336, BENCHMARKS.md: 1 bit 576 -> 389 us one thread, 498 -> 366 two; 2 bits 710 -> 587
# two; from 3 bits on it slows the kernel: 952 -> 1323 us at 3 bits, one thread).
Q8_PREFETCH_MAX_BITS = 2
Q8_PREFETCH = 2048
Q8_PLANE_ACCS = 8  # accumulators per code plane with 512-bit VNNI (see emit_kind)
LUT1_REGION = 9  # scratch per padded column of a 1-bit record on the lookup-table path: its int8 x, 8 table bytes


def uses_lut1(target) -> bool:
    """Whether the q8 kernel runs 1-bit records through lookup tables (vpermb, AVX-512 VBMI) on this target.

    At 1 bit a vpdpbusd still spends a byte lane per weight, so 1 bit cost as many instructions as 2. Instead the
    prologue builds, per 4 columns, the 16 possible sums of their int8 activations (int16: |sum| <= 508), as a
    table of low bytes and one of high bytes; each byte of the codes is a 4-bit index into its group's tables (the
    byte's position in its row's word picks the group), vpermb looks up 64 of them at once (16 rows x 16 columns),
    and vpdpbusd with ones adds a row's four sums, low bytes and high bytes apart: 12 instructions per 16 rows x 32
    columns instead of 17, and 2 accumulators instead of 8 to recombine. Exact: the same integer dot product."""
    return target.is_x86 and all(target.has(f) for f in ("avx512f", "avx512bw", "avx512vnni", "avx512vbmi"))


@dataclass(frozen=True)
class RowLaneSpec:
    unroll_accs: int = 4  # independent accumulators in gemv (hide the FMA latency)
    act: str = "f32"  # "f32": exact float activations; "q8": int8 activations per record, integer dot products
    symbol_suffix: str = ""

    def __post_init__(self) -> None:
        if self.unroll_accs < 1:
            raise ValueError("unroll_accs must be >= 1")
        if self.act not in ("f32", "q8"):
            raise ValueError(f"act must be 'f32' or 'q8', got {self.act!r}")
        if self.symbol_suffix and not (self.symbol_suffix.isascii() and self.symbol_suffix.replace("_", "").isalnum()):
            raise ValueError(f"symbol_suffix must be [A-Za-z0-9_], got {self.symbol_suffix!r}")

    @property
    def _sfx(self) -> str:
        return f"_{self.symbol_suffix}" if self.symbol_suffix else ""

    @property
    def gemv_name(self) -> str:
        return "xbitc_rows_gemv" + self._sfx

    @property
    def gemm_name(self) -> str:
        return "xbitc_rows_gemm" + self._sfx

    @property
    def q8_name(self) -> str:
        return "xbitc_rows_q8" + self._sfx

    def names(self) -> tuple[str, ...]:
        return (self.q8_name,) if self.act == "q8" else (self.gemv_name, self.gemm_name)

    def key(self) -> str:
        return (f"rows{ROWS_VERSION}_l{LANES}_w{BLOCK_COLS}_a{self.unroll_accs}_{self.act}"
                + (f"_s{self.symbol_suffix}" if self.symbol_suffix else ""))


# ------------------------------------------------------------------------------------------------ host-side layout


def record_kind(bits: int, ncols: int, act: str = "f32") -> int:
    """Packed at `bits` unless one byte per code is smaller than padding the record to whole 32-column blocks
    (f32 only: the q8 kernel always reads packed planes)."""
    if act == "q8":
        return bits
    padded = -(-ncols // BLOCK_COLS) * BLOCK_COLS
    return BYTES_KIND if ncols * 8 < padded * bits else bits


def rows_padded(rows: int) -> int:
    return -(-rows // LANES) * LANES


def q8_planes(bits: int) -> list[tuple[int, int]]:
    """(width, shift) of the bit planes a `bits`-bit code is split into for the q8 kernel: planes of 1, 2 or 4 bits
    keep every byte lane a whole number of codes, and codes <= 15 keep AVX2's pmaddubsw pair sums from saturating."""
    return {1: [(1, 0)], 2: [(2, 0)], 3: [(2, 0), (1, 2)], 4: [(4, 0)], 5: [(4, 0), (1, 4)], 6: [(4, 0), (2, 4)],
            7: [(4, 0), (2, 4), (1, 6)], 8: [(4, 0), (4, 4)]}[bits]


def layout_codes(codes: np.ndarray, kind: int, act: str = "f32") -> np.ndarray:
    """[rows, ncols] uint8 codes -> the record's flat uint8 code array (rows zero padded to 16).

    q8: per 32-column block the planes of `q8_planes(kind)` in order, a plane of width p as p words per lane in
    which byte i, bits p*s .. p*s+p-1 hold column w*32/p + 4s + i of the plane's word w: one shift and one mask give
    four consecutive columns' codes in the four bytes of every lane, what vpdpbusd / pmaddubsw multiply with four
    consecutive int8 activations."""
    codes = np.asarray(codes, dtype=np.uint8)
    rows, ncols = codes.shape
    rp = rows_padded(rows)
    if act == "q8":
        ncb = -(-ncols // BLOCK_COLS)
        buf = np.zeros((rp, ncb * BLOCK_COLS), dtype=np.uint32)
        buf[:rows, :ncols] = codes
        blocks = buf.reshape(rp, ncb, BLOCK_COLS)
        words = []
        for p, shift in q8_planes(kind):
            vals = ((blocks >> shift) & ((1 << p) - 1)).reshape(rp, ncb, p, 8 // p, 4)  # [.., w, s, i]
            sh = (np.arange(8 // p, dtype=np.uint32)[:, None] * p + 8 * np.arange(4, dtype=np.uint32)[None, :])
            words.append((vals << sh).sum(axis=(3, 4), dtype=np.uint32))  # [rp, ncb, p]
        w = np.concatenate(words, axis=2).astype("<u4")  # [rp, ncb, bits]
        out = w.reshape(rp // LANES, LANES, ncb, kind).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(out).view(np.uint8).reshape(-1)
    if kind == BYTES_KIND:
        buf = np.zeros((rp, ncols), dtype=np.uint8)
        buf[:rows] = codes
        return np.ascontiguousarray(buf.reshape(rp // LANES, LANES, ncols).transpose(0, 2, 1)).reshape(-1)
    bits = kind
    ncb = -(-ncols // BLOCK_COLS)
    buf = np.zeros((rp, ncb * BLOCK_COLS), dtype=np.uint8)
    buf[:rows, :ncols] = codes
    # bit planes: [rp, ncb, 32 codes, bits] -> LSB-first stream of 32*bits bits -> `bits` little-endian uint32 words
    planes = (buf.reshape(rp, ncb, BLOCK_COLS, 1) >> np.arange(bits, dtype=np.uint8)) & 1
    words = np.packbits(planes.reshape(rp, ncb, bits, 32), axis=-1, bitorder="little")  # [rp, ncb, bits, 4]
    # -> [row block, column block, word, lane, 4 bytes]
    out = words.reshape(rp // LANES, LANES, ncb, bits, 4).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(out).reshape(-1)


def record_bytes(kind: int, ncols: int) -> int:
    """Bytes of one record in one row block: codes, 16 float16 scales, 16 zero points."""
    codes = ncols * LANES if kind == BYTES_KIND else -(-ncols // BLOCK_COLS) * kind * LANES * 4
    return codes + 3 * LANES


def record_table(base: int, shapes: list[tuple[int, int, int]]) -> np.ndarray:
    """The int64 record table for records (kind, ncols, x_offset) laid out from byte address `base` by `pack`."""
    stride = sum(record_bytes(kind, n) for kind, n, _ in shapes)
    table, pos = [], base
    for kind, n, off in shapes:
        codes = record_bytes(kind, n) - 3 * LANES
        table.append([kind, n, pos, pos + codes, pos + codes + 2 * LANES, off, stride])
        pos += record_bytes(kind, n)
    return np.asarray(table, dtype=np.int64).reshape(-1, REC_FIELDS)


def pack(records, rows: int, act: str = "f32") -> tuple[np.ndarray, np.ndarray]:
    """records = [(codes [rows, n] uint8, scales [rows] float16, zeros [rows] uint8, x_offset, bits)] -> (one
    uint8 buffer with every record's row blocks interleaved, the int64 record table pointing into it). The buffer
    must outlive every call."""
    rp = rows_padded(rows)
    nrb = rp // LANES
    parts, shapes = [], []
    for codes, scales, zeros, off, bits in records:
        kind = record_kind(bits, codes.shape[1], act)
        sc = np.zeros(rp, dtype=np.float16)
        sc[:rows] = scales
        zp = np.zeros(rp, dtype=np.uint8)
        zp[:rows] = zeros
        parts += [layout_codes(codes, kind, act).reshape(nrb, -1), sc.view(np.uint8).reshape(nrb, 2 * LANES),
                  zp.reshape(nrb, LANES)]
        shapes.append((kind, codes.shape[1], off))
    buf = np.ascontiguousarray(np.concatenate(parts, axis=1)).reshape(-1) if parts else np.zeros(0, np.uint8)
    return buf, record_table(buf.ctypes.data, shapes)


def reference_rows(records, x: np.ndarray, rows: int) -> np.ndarray:
    """numpy oracle in float64: records = [(codes [rows, n] uint8, scales [rows], zeros [rows], x_offset)]."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    y = np.zeros((x.shape[0], rows))
    for codes, s, z, off in records:
        n = codes.shape[1]
        w = np.asarray(s, np.float64)[:, None] * (codes.astype(np.float64) - np.asarray(z, np.float64)[:, None])
        y += x[:, off:off + n] @ w.T
    return y


def q8_scratch_bytes(ncols: list[int], batch: int, bits: list[int] | None = None) -> int:
    """Scratch the q8 kernel needs for `batch` tokens: int8 x per record (padded to 32 columns), for 1-bit records
    room for their lookup tables too (for every record when `bits` is not given), + 2 floats each."""
    bits = bits if bits is not None else [1] * len(ncols)
    per = sum(-(-n // BLOCK_COLS) * BLOCK_COLS * (LUT1_REGION if b == 1 else 1) for n, b in zip(ncols, bits, strict=True))
    return batch * (per + 8 * len(ncols)) + 64


def quantize_record_x(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """A record's activations as the q8 kernel quantizes them (float32 arithmetic): d = max|x| / 127,
    xq = round_half_even(x * (127 / max|x|)) (all zero when max|x| = 0)."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.float32(np.abs(x).max()) if x.size else np.float32(0)
    d = np.float32(amax / np.float32(127.0))
    inv = np.float32(127.0) / amax if amax > 0 else np.float32(0)
    return np.clip(np.rint(x * inv), -127, 127).astype(np.int8), d


def reference_rows_q8(records, x: np.ndarray, rows: int) -> np.ndarray:
    """numpy oracle of the q8 kernel (float64 after quantizing each record's x like the kernel)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    y = np.zeros((x.shape[0], rows))
    for codes, s, z, off in records:
        n = codes.shape[1]
        w = np.asarray(s, np.float64)[:, None] * (codes.astype(np.float64) - np.asarray(z, np.float64)[:, None])
        for t in range(x.shape[0]):
            xq, d = quantize_record_x(x[t, off:off + n])
            y[t] += w @ (xq.astype(np.float64) * np.float64(d))
    return y


# ------------------------------------------------------------------------------------------------ code generation


class _Gen:
    """Shared pieces of the gemv and gemm functions."""

    def __init__(self, e: Emitter, spec: RowLaneSpec):
        self.e, self.spec = e, spec
        self.vf = V(F32, LANES)
        self.zero = cvec(F32, LANES, 0.0)
        self.lane = cvec(I64, LANES, list(range(LANES)))

    def field(self, rec, s, k, ty=None):
        b = self.e.b
        v = b.load(b.gep(rec, [b.add(b.mul(s, ci(REC_FIELDS)), ci(k))], inbounds=True), align=8)
        return b.inttoptr(v, ty) if ty is not None else v

    def x_at(self, xrow, j, n):
        """x[j] for column j of a record of n columns (j clamped: padding columns meet code 0)."""
        b = self.e.b
        j = b.select(b.icmp_signed("<", j, n), j, b.sub(n, ci(1)))
        return b.load(b.gep(xrow, [j], inbounds=True), align=4)

    def xsum(self, xrow, n):
        """sum of x[0:n] (vector loop, masked tail)."""
        e, b = self.e, self.e.b

        def body(j, acc):
            mask = b.icmp_signed("<", self.lane, e.bcast(b.sub(n, j), LANES))
            return [b.fadd(acc[0], e.masked_load_f32(b.gep(xrow, [j], inbounds=True), LANES, mask))]

        (v,) = e.loop(ci(0), n, ci(LANES), [self.zero], body, name="xs")
        return e.hsum(v)

    def packed_codes(self, crow, blk, bits, k0, k1, scaled=False):
        """Float code vectors of columns k0..k1-1 of block blk (16 rows each); `scaled`: code k as q * 2**o
        (mask-only extraction, see codegen.extraction_plan), for an x pre-scaled by 2**-o."""
        e, b = self.e, self.e.b
        wt = V(I32, LANES)
        base = b.mul(blk, ci(bits * LANES * 4))
        words = [e.load(crow, b.add(base, ci(w * LANES * 4)), wt, 4) for w in range(bits)]
        return [b.sitofp(emit_extract(e, words, bits, 32, k, scaled), self.vf) for k in range(k0, k1)]

    def byte_code(self, crow, j):
        e, b = self.e, self.e.b
        return b.uitofp(e.load(crow, b.mul(j, ci(LANES)), V(I8, LANES), 1), self.vf)

    def at_block(self, rec, s, k, blk_row):
        """Address of field k's data in row block blk_row."""
        b = self.e.b
        off = b.mul(blk_row, self.field(rec, s, 6))
        return b.inttoptr(b.add(self.field(rec, s, k), off), P(I8))

    def scale_zero(self, rec, s, blk_row):
        """(s, s*z) vectors of the record for the row block's 16 rows."""
        e, b = self.e, self.e.b
        sv = e.f16_to_f32(e.load(self.at_block(rec, s, 3, blk_row), ci(0), V(I16, LANES), 2))
        zv = b.uitofp(e.load(self.at_block(rec, s, 4, blk_row), ci(0), V(I8, LANES), 1), self.vf)
        return sv, b.fmul(sv, zv)

    def switch_kind(self, kind, emit_kind, kinds=tuple(range(1, 9)) + (BYTES_KIND,)):
        """switch (kind) { case k in kinds: emit_kind(k) }"""
        b = self.e.b
        fn = b.block.function
        done = fn.append_basic_block("kind.done")
        sw = b.switch(kind, done)
        for k in kinds:
            bb = fn.append_basic_block(f"kind{k}")
            sw.add_case(ci(k), bb)
            b.position_at_end(bb)
            emit_kind(k)
            b.branch(done)
        b.position_at_end(done)


def _x_scale_table(e: Emitter):
    """[kind][k] = 2**-o where code k of a `kind`-bit block is extracted as q * 2**o (mask only, no shift), else 1."""
    rows = [[1.0] * BLOCK_COLS]
    for bits in range(1, BYTES_KIND + 1):
        rows.append([2.0 ** extraction_plan(bits, 32, k, True)[3] if bits <= 8 else 1.0 for k in range(BLOCK_COLS)])
    ty = ir.ArrayType(ir.ArrayType(F32, BLOCK_COLS), len(rows))
    tab = ir.GlobalVariable(e.m, ty, name="xbitc_rows_xscale")
    tab.global_constant = True
    tab.linkage = "internal"
    tab.initializer = ir.Constant(ty, [ir.Constant(ty.element, r) for r in rows])
    return tab


def _gen_gemv(e: Emitter, spec: RowLaneSpec) -> ir.Function:
    """Prologue once per call: every record's x, zero padded to its code width and pre-scaled for mask-only code
    extraction, into one stack buffer, and its sum. Then per 16-row block: the records' code blocks against it."""
    g = _Gen(e, spec)
    A = spec.unroll_accs
    fn = ir.Function(e.m, ir.FunctionType(VOID, [P(I64), I64, P(F32), P(I32), P(F32), I64, I64]), name=spec.gemv_name)
    rec, nrec, x, perm, y, rb, re = fn.args
    y.add_attribute("noalias")
    b = e.b = ir.IRBuilder(fn.append_basic_block("entry"))
    acc_slot = b.alloca(g.vf, name="acc")  # the record's sum, carried out of the kind switch
    acc_slot.align = 64
    tab = _x_scale_table(e)

    def width(kind, n):  # columns the record's codes cover
        padded = b.mul(b.sdiv(b.add(n, ci(BLOCK_COLS - 1)), ci(BLOCK_COLS)), ci(BLOCK_COLS))
        return b.select(b.icmp_signed("==", kind, ci(BYTES_KIND)), n, padded)

    (total,) = e.loop(ci(0), nrec, ci(1), [ci(0)],
                      lambda s, t: [b.add(t[0], width(g.field(rec, s, 0), g.field(rec, s, 1)))], name="tot")
    xsc = b.alloca(F32, size=b.add(total, ci(LANES)), name="xsc")
    xsc.align = 64
    xsums = b.alloca(F32, size=b.add(nrec, ci(1)), name="xsums")
    xbase = b.alloca(I64, size=b.add(nrec, ci(1)), name="xbase")

    permuted = b.icmp_unsigned("!=", b.ptrtoint(perm, I64), ci(0))

    def prologue(s, base):
        kind, n = g.field(rec, s, 0), g.field(rec, s, 1)
        off = g.field(rec, s, 5)
        w = width(kind, n)

        def col(j, acc):
            jj = b.add(off, b.select(b.icmp_signed("<", j, n), j, b.sub(n, ci(1))))
            (src,) = e.if_then_values(permuted, [jj], lambda v: [b.sext(b.load(b.gep(perm, [v[0]], inbounds=True),
                                                                                align=4), I64)], name="perm")
            xj = b.load(b.gep(x, [src], inbounds=True), align=4)
            xj = b.select(b.icmp_signed("<", j, n), xj, ir.Constant(F32, 0.0))
            sc = b.load(b.gep(tab, [ci(0), kind, b.srem(j, ci(BLOCK_COLS))], inbounds=True), align=4)
            e.store(b.fmul(xj, sc), xsc, b.add(base[0], j), 4)
            return [b.fadd(acc[0], xj)]

        (xs,) = e.loop(ci(0), w, ci(1), [ir.Constant(F32, 0.0)], col, name="pro")
        e.store(xs, xsums, s, 4)
        e.store(base[0], xbase, s, 8)
        return [b.add(base[0], w)]

    e.loop(ci(0), nrec, ci(1), [ci(0)], prologue, name="pros")

    def rowblock(r, _):
        blk_row = b.sdiv(r, ci(LANES))

        def record(s, yv):
            kind, n = g.field(rec, s, 0), g.field(rec, s, 1)
            crow = g.at_block(rec, s, 2, blk_row)
            xs = b.gep(xsc, [b.load(b.gep(xbase, [s], inbounds=True), align=8)], inbounds=True)

            def xat(j):
                return e.bcast(b.load(b.gep(xs, [j], inbounds=True), align=4), LANES)

            def emit_kind(k):
                if k == BYTES_KIND:
                    nu = b.mul(b.sdiv(n, ci(A)), ci(A))

                    def cols(j, accs):
                        return [e.fmuladd(g.byte_code(crow, b.add(j, ci(u))), xat(b.add(j, ci(u))), accs[u])
                                for u in range(A)]

                    accs = e.loop(ci(0), nu, ci(A), [g.zero] * A, cols, name="bcol")
                    (a0,) = e.loop(nu, n, ci(1), [accs[0]],
                                   lambda j, a: [e.fmuladd(g.byte_code(crow, j), xat(j), a[0])], name="bcolr")
                    accs[0] = a0
                else:
                    nb = b.sdiv(b.add(n, ci(BLOCK_COLS - 1)), ci(BLOCK_COLS))

                    def block(blk, accs):
                        accs = list(accs)
                        c0 = b.mul(blk, ci(BLOCK_COLS))
                        for kk, q in enumerate(g.packed_codes(crow, blk, k, 0, BLOCK_COLS, scaled=True)):
                            accs[kk % A] = e.fmuladd(q, xat(b.add(c0, ci(kk))), accs[kk % A])
                        return accs

                    accs = e.loop(ci(0), nb, ci(1), [g.zero] * A, block, name="blk")
                tot = accs[0]
                for a in accs[1:]:
                    tot = b.fadd(tot, a)
                b.store(tot, acc_slot)

            g.switch_kind(kind, emit_kind)
            sv, szv = g.scale_zero(rec, s, blk_row)
            yv = e.fmuladd(sv, b.load(acc_slot), yv[0])
            xsum = b.load(b.gep(xsums, [s], inbounds=True), align=4)
            return [e.fmuladd(b.fneg(szv), e.bcast(xsum, LANES), yv)]

        (yv,) = e.loop(ci(0), nrec, ci(1), [g.zero], record, name="rec")
        left = b.sub(re, r)
        mask = b.icmp_signed("<", g.lane, e.bcast(left, LANES))
        e.masked_store_f32(yv, b.gep(y, [r], inbounds=True), mask)
        return []

    e.loop(rb, re, ci(LANES), [], rowblock, name="rows")
    b.ret_void()
    return fn


def _gen_gemm(e: Emitter, spec: RowLaneSpec) -> ir.Function:
    g = _Gen(e, spec)
    fn = ir.Function(e.m, ir.FunctionType(VOID, [P(I64), I64, P(F32), P(F32), I64, I64, I64, I64, I64]),
                     name=spec.gemm_name)
    rec, nrec, x, y, rb, re, batch, ldx, ldy = fn.args
    y.add_attribute("noalias")
    b = e.b = ir.IRBuilder(fn.append_basic_block("entry"))
    ybuf = b.alloca(g.vf, size=batch, name="ybuf")  # per token: y of the 16 rows
    ybuf.align = 64
    abuf = b.alloca(g.vf, size=batch, name="abuf")  # per token: the current record's sum
    abuf.align = 64
    ntr = b.mul(batch, nrec)
    xsums = b.alloca(F32, size=b.add(ntr, ci(1)), name="xsums")  # [record][token] sums of x, once per call

    def sums(i, _):
        s, t = b.sdiv(i, batch), b.srem(i, batch)
        xrow = b.gep(x, [b.add(b.mul(t, ldx), g.field(rec, s, 5))], inbounds=True)
        e.store(g.xsum(xrow, g.field(rec, s, 1)), xsums, i, 4)
        return []

    e.loop(ci(0), ntr, ci(1), [], sums, name="sums")

    def rowblock(r, _):
        blk_row = b.sdiv(r, ci(LANES))
        e.loop(ci(0), batch, ci(1), [], lambda t, _: (e.store(g.zero, ybuf, t, 64), [])[1], name="yz")

        def record(s, _):
            kind, n = g.field(rec, s, 0), g.field(rec, s, 1)
            crow = g.at_block(rec, s, 2, blk_row)
            off = g.field(rec, s, 5)
            e.loop(ci(0), batch, ci(1), [], lambda t, _: (e.store(g.zero, abuf, t, 64), [])[1], name="az")

            def apply(qs, c0, clamp=True):
                """abuf[t] += sum_i qs[i] * x[t, c0 + i] for every token (x index clamped in a partial block)."""

                def tok(t, _):
                    xrow = b.gep(x, [b.add(b.mul(t, ldx), off)], inbounds=True)
                    a = e.load(abuf, t, g.vf, 64)
                    for i, q in enumerate(qs):
                        j = b.add(c0, ci(i))
                        xj = g.x_at(xrow, j, n) if clamp else b.load(b.gep(xrow, [j], inbounds=True), align=4)
                        a = e.fmuladd(q, e.bcast(xj, LANES), a)
                    e.store(a, abuf, t, 64)
                    return []

                e.loop(ci(0), batch, ci(1), [], tok, name="tok")

            def emit_kind(k):
                if k == BYTES_KIND:
                    e.loop(ci(0), n, ci(1), [], lambda j, _: (apply([g.byte_code(crow, j)], j, False), [])[1],
                           name="bcol")
                else:
                    nfull = b.sdiv(n, ci(BLOCK_COLS))

                    def block(blk, clamp):
                        for k0 in range(0, BLOCK_COLS, CHUNK):
                            apply(g.packed_codes(crow, blk, k, k0, k0 + CHUNK), b.add(b.mul(blk, ci(BLOCK_COLS)), ci(k0)),
                                  clamp)
                        return []

                    e.loop(ci(0), nfull, ci(1), [], lambda blk, _: block(blk, False), name="blk")
                    e.if_then_values(b.icmp_signed("<", b.mul(nfull, ci(BLOCK_COLS)), n), [],
                                     lambda _: block(nfull, True), name="tailblk")

            g.switch_kind(kind, emit_kind)
            sv, szv = g.scale_zero(rec, s, blk_row)

            def flush(t, _):
                xs = b.load(b.gep(xsums, [b.add(b.mul(s, batch), t)], inbounds=True), align=4)
                yv = e.fmuladd(sv, e.load(abuf, t, g.vf, 64), e.load(ybuf, t, g.vf, 64))
                e.store(e.fmuladd(b.fneg(szv), e.bcast(xs, LANES), yv), ybuf, t, 64)
                return []

            e.loop(ci(0), batch, ci(1), [], flush, name="flush")
            return []

        e.loop(ci(0), nrec, ci(1), [], record, name="rec")
        mask = b.icmp_signed("<", g.lane, e.bcast(b.sub(re, r), LANES))

        def store(t, _):
            e.masked_store_f32(e.load(ybuf, t, g.vf, 64), b.gep(y, [b.add(b.mul(t, ldy), r)], inbounds=True), mask)
            return []

        e.loop(ci(0), batch, ci(1), [], store, name="ys")
        return []

    e.loop(rb, re, ci(LANES), [], rowblock, name="rows")
    b.ret_void()
    return fn


def _wide_vnni(target) -> bool:
    return target.is_x86 and target.has("avx512vnni") and target.has("avx512f")


class _Dot16:
    """acc (<16 x i32>, one lane per row) += dot of each lane's 4 code bytes with 4 int8 activations: one 512-bit
    vpdpbusd with AVX-512 VNNI, else two 256-bit halves through codegen.DotU8S8 (AVX-VNNI, AVX2 pmaddubsw, generic).
    Codes are at most 15 (q8_planes), so AVX2's i16 pair sums cannot saturate."""

    @staticmethod
    def is_wide(e: Emitter) -> bool:
        return _wide_vnni(e.t)

    def __init__(self, e: Emitter, acc):
        self.e, self.acc = e, acc
        self.wide = self.is_wide(e)
        if not self.wide:
            b = e.b
            self.halves = [DotU8S8(e, b.shuffle_vector(acc, acc, cvec(I32, 8, list(range(h, h + 8)))), 4)
                           for h in (0, 8)]

    def add(self, codes, x4):
        e, b = self.e, self.e.b
        if self.wide:
            v = V(I32, LANES)
            fn = e.intrinsic("llvm.x86.avx512.vpdpbusd.512", v, [v, v, v])
            self.acc = b.call(fn, [self.acc, codes, x4])
            return
        for h, d in zip((0, 8), self.halves):
            idx = cvec(I32, 8, list(range(h, h + 8)))
            d.add(b.bitcast(b.shuffle_vector(codes, codes, idx), V(I8, 32)),
                  b.bitcast(b.shuffle_vector(x4, x4, idx), V(I8, 32)))

    def value(self):
        if self.wide:
            return self.acc
        lo, hi = (d.value() for d in self.halves)
        return self.e.b.shuffle_vector(lo, hi, cvec(I32, LANES, list(range(LANES))))


def q8_group_tokens(target) -> int:
    """Tokens T the q8 kernel's prefill path serves per pass over a record's code words, one accumulator each
    (1: no prefill path, every batch runs token by token). By timings on AVX2 and instruction counts on AArch64
    (BENCHMARKS.md): 4 with AVX2 (beats 2 despite some spills of 16 ymm) and AArch64 dot products (4 accumulators of
    4 registers each); 2 on plain NEON, whose widening multiplies need more temporaries; 1 on SSE2, where the
    generic multiply, not the decoding, is the cost (no gain measured). 512-bit VNNI: 4, by register budget (not
    measured here: no such host)."""
    if target.is_x86:
        return 4 if _wide_vnni(target) or target.has("avx2") else 1
    return 4 if target.has("dotprod") else 2


def uses_usmmla(target) -> bool:
    """Whether the q8 prefill path multiplies token pairs with usmmla (AArch64 i8mm) instead of usdot per token."""
    return not target.is_x86 and target.has("i8mm")


def _plane_word(e: Emitter, crow, blk, k, wi):
    """Word wi of a k-word block: 16 lanes (rows) of 32 bits."""
    b = e.b
    return e.load(crow, b.mul(b.add(b.mul(blk, ci(k)), ci(wi)), ci(LANES * 4)), V(I32, LANES), 4)


def _low_bits_mask(p, lanes):
    """The low p bits of every byte of `lanes` 32-bit lanes."""
    return cvec(I32, lanes, int.from_bytes(bytes([(1 << p) - 1] * 4), "little"))


def _q8_plane_dots(e: Emitter, crow, k, wi0, p, xqs, nb):
    """One code plane (width p: words wi0 .. wi0+p-1 of each k-word block) of a record's 16-row block against the
    int8 activations of every token in xqs: each word is loaded, shifted and masked once and fed to every token's
    accumulator (_Dot16). Returns per token the <16 x i32> dot products of the plane's codes."""
    b = e.b
    mask = _low_bits_mask(p, LANES)

    def block(blk, accs):
        dots = [_Dot16(e, a) for a in accs]
        c0 = b.mul(blk, ci(BLOCK_COLS))
        if not e.t.is_x86:  # a 16-byte load per 16 columns; sdot / usdot take a lane of it (the indexed form)
            x16 = [[e.load(xq, b.add(c0, ci(16 * h)), V(I32, 4), 1) for h in range(2)] for xq in xqs]
        for w in range(p):
            word = _plane_word(e, crow, blk, k, wi0 + w)
            for sub in range(8 // p):
                codes = b.and_(b.lshr(word, cvec(I32, LANES, p * sub)) if sub else word, mask)
                c = w * (BLOCK_COLS // p) + 4 * sub  # the 4 columns' place in the block
                for j, xq in enumerate(xqs):
                    if e.t.is_x86:  # a broadcast load
                        x4 = e.bcast(b.load(b.bitcast(b.gep(xq, [b.add(c0, ci(c))], inbounds=True), P(I32)),
                                            align=1), LANES)
                    else:
                        x4 = b.shuffle_vector(x16[j][c // 16], x16[j][c // 16], cvec(I32, LANES, c % 16 // 4))
                    dots[j].add(codes, x4)
        return [d.value() for d in dots]

    return e.loop(ci(0), nb, ci(1), [cvec(I32, LANES, 0)] * len(xqs), block, name="gblk")


def _q8_plane_mmla(e: Emitter, crow, k, wi0, p, xqs, nb):
    """_q8_plane_dots through usmmla, tokens in pairs. usmmla multiplies a 2 x 8 matrix of unsigned bytes (two
    rows' codes) by an 8 x 2 one of signed bytes (two tokens' activations) into 2 x 2 int32: twice usdot's
    multiply-adds. A word lane holds 4 columns of one row per sub-position, sub-positions s and s+1 together 8
    consecutive columns: so each word is zipped with itself shifted down by p, [row r, row r >> p, row r+1,
    row r+1 >> p] (one shift per 4 rows and one zip per 2 rows, once per word), and each pair of sub-positions
    costs one shift and one mask per 2 rows, then one usmmla per token pair against both tokens' 8 activations.
    The 2 x 2 interleave (rows x tokens) is undone once per record visit."""
    b = e.b
    v4, v16b = V(I32, 4), V(I8, 16)
    mm = e.intrinsic("llvm.aarch64.neon.usmmla.v4i32.v16i8", v4, [v4, v16b, v16b])
    pairs = [(xqs[m], xqs[m + 1]) for m in range(0, len(xqs), 2)]
    npc = LANES // 2  # row pairs
    mask = _low_bits_mask(p, 4)

    def x8(xq, col):  # 8 int8 activations as 2 x i32
        return b.load(b.bitcast(b.gep(xq, [col], inbounds=True), P(V(I32, 2))), align=1)

    def block(blk, accs):  # accs[m * npc + c]: token pair m, rows 2c and 2c+1
        accs = list(accs)
        for w in range(p):
            word = _plane_word(e, crow, blk, k, wi0 + w)
            down = b.lshr(word, cvec(I32, LANES, p))
            zs = [b.shuffle_vector(word, down, cvec(I32, 4, [2 * c, LANES + 2 * c, 2 * c + 1, LANES + 2 * c + 1]))
                  for c in range(npc)]
            subs = []
            for s in range(0, 8 // p, 2):
                col = b.add(b.mul(blk, ci(BLOCK_COLS)), ci(w * (BLOCK_COLS // p) + 4 * s))
                subs.append((s, [b.bitcast(b.shuffle_vector(x8(xa, col), x8(xb, col), cvec(I32, 4, [0, 1, 2, 3])),
                                           v16b) for xa, xb in pairs]))
            for s, xops in subs:
                for c, z in enumerate(zs):
                    codes = b.bitcast(b.and_(b.lshr(z, cvec(I32, 4, p * s)) if s else z, mask), v16b)
                    for m, xop in enumerate(xops):
                        accs[m * npc + c] = b.call(mm, [accs[m * npc + c], codes, xop])
        return accs

    res = e.loop(ci(0), nb, ci(1), [cvec(I32, 4, 0)] * (len(pairs) * npc), block, name="mblk")
    # res[m * npc + c] = [row 2c x token 2m, row 2c x token 2m+1, row 2c+1 x token 2m, row 2c+1 x token 2m+1]
    sums = []
    for m in range(len(pairs)):
        for tk in (0, 1):
            quads = [b.shuffle_vector(res[m * npc + 2 * q], res[m * npc + 2 * q + 1],
                                      cvec(I32, 4, [tk, tk + 2, tk + 4, tk + 6])) for q in range(LANES // 4)]
            halves = [b.shuffle_vector(quads[h], quads[h + 1], cvec(I32, 8, list(range(8)))) for h in (0, 2)]
            sums.append(b.shuffle_vector(halves[0], halves[1], cvec(I32, LANES, list(range(LANES)))))
    return sums


def _gen_q8(e: Emitter, spec: RowLaneSpec) -> ir.Function:
    """Any batch. Prologue per token and record: x gathered through the permutation, zero padded to whole
    32-column blocks, quantized to int8 (d = max|x|/127) into the caller's scratch, with d and d * sum(xq). Then per
    16-row block, token and record: integer dot products of the code planes with four int8 activations at a time
    (_Dot16 / codegen.DotU8S8: vpdpbusd, pmaddubsw + pmaddwd on AVX2, sdot / usdot on AArch64), planes recombined
    by shifts, and y += s*d*dot - s*z*d*sum(xq).

    Batches of q8_group_tokens(target) = T tokens or more (prefill) go to a second, internal function: per 16-row
    block and record, whole groups of T tokens one code plane at a time (_q8_plane_dots: one word load, shift and
    mask for T dot products; _q8_plane_mmla on i8mm: usmmla on token pairs), then the remaining tokens through the
    one-token code. Smaller batches (decode) run the one-token code in this function, unchanged by the prefill
    path: same instructions, same registers."""
    g = _Gen(e, spec)
    fn = ir.Function(e.m, ir.FunctionType(VOID, [P(I64), I64, P(F32), P(I32), P(F32), I64, I64, I64, I64, I64, P(I8)]),
                     name=spec.q8_name)
    rec, nrec, x, perm, y, rb, re, batch, ldx, ldy, scratch = fn.args
    y.add_attribute("noalias")
    b = e.b = ir.IRBuilder(fn.append_basic_block("entry"))
    acc_slots = [b.alloca(V(I32, LANES), name=f"acc{i}") for i in range(max(Q8_ROW_BLOCKS, Q8_ROW_BLOCKS_WIDE))]
    for a in acc_slots:
        a.align = 64
    T = q8_group_tokens(e.t)
    mmla = uses_usmmla(e.t)
    f0 = ir.Constant(F32, 0.0)

    def width(n):
        return b.mul(b.sdiv(b.add(n, ci(BLOCK_COLS - 1)), ci(BLOCK_COLS)), ci(BLOCK_COLS))

    lut = uses_lut1(e.t)  # 1-bit records keep lookup tables after their int8 x (only emitted where they run)

    def is_one_bit(kind):
        return b.icmp_signed("==", kind, ci(1))

    xbase = b.alloca(I64, size=b.add(nrec, ci(1)), name="xbase")

    def bases(s, t):
        e.store(t[0], xbase, s, 8)
        w = width(g.field(rec, s, 1))
        if lut:
            w = b.select(is_one_bit(g.field(rec, s, 0)), b.mul(w, ci(LUT1_REGION)), w)
        return [b.add(t[0], w)]

    (total,) = e.loop(ci(0), nrec, ci(1), [ci(0)], bases, name="tot")
    fbase = b.bitcast(b.gep(scratch, [b.mul(batch, total)], inbounds=True), P(F32))  # d, then d*sum(xq)
    ntok_rec = b.mul(batch, nrec)
    permuted = b.icmp_unsigned("!=", b.ptrtoint(perm, I64), ci(0))

    stage = b.alloca(F32, size=b.add(total, ci(LANES)), name="stage")  # one record's x, gathered and padded
    stage.align = 64
    v16 = V(F32, LANES)

    def prologue_token(t, _):
        xrow = b.gep(x, [b.mul(t, ldx)], inbounds=True)

        def prologue(s, _):
            n, off = g.field(rec, s, 1), g.field(rec, s, 5)
            w = width(n)

            def gather(permute):
                def col(j, _):
                    jj = b.add(off, j)
                    src = b.sext(b.load(b.gep(perm, [jj], inbounds=True), align=4), I64) if permute else jj
                    b.store(b.load(b.gep(xrow, [src], inbounds=True), align=4), b.gep(stage, [j], inbounds=True),
                            align=4)
                    return []

                e.loop(ci(0), n, ci(1), [], col, name="gat")
                e.loop(n, w, ci(1), [], lambda j, _: (b.store(f0, b.gep(stage, [j], inbounds=True), align=4), [])[1],
                       name="pad")
                return []

            e.if_then_values(permuted, [], lambda _: gather(True), name="gp")
            e.if_then_values(b.not_(permuted), [], lambda _: gather(False), name="gi")
            (vmax,) = e.loop(ci(0), w, ci(LANES), [g.zero],
                             lambda j, a: [e.vmax(a[0], e.fabs(e.load(stage, j, v16, 64)))], name="amax")
            amax = _hmax(e, vmax)
            pos = b.fcmp_ordered(">", amax, f0)
            inv = e.bcast(b.select(pos, b.fdiv(ir.Constant(F32, 127.0), b.select(pos, amax, ir.Constant(F32, 1.0))),
                                   f0), LANES)
            xq = b.gep(scratch, [b.add(b.mul(t, total), b.load(b.gep(xbase, [s], inbounds=True), align=8))],
                       inbounds=True)

            def quant(j, acc):
                q = b.fptosi(e.rint(b.fmul(e.load(stage, j, v16, 64), inv)), V(I32, LANES))
                e.store(b.trunc(q, V(I8, LANES)), xq, j, 1)
                return [b.add(acc[0], q)]

            (isum,) = e.loop(ci(0), w, ci(LANES), [cvec(I32, LANES, 0)], quant, name="quant")
            if lut:
                e.if_then_values(is_one_bit(g.field(rec, s, 0)), [], lambda _: _lut1_tables(e, xq, w), name="lut")
            d = b.fdiv(amax, ir.Constant(F32, 127.0))
            k = b.add(b.mul(t, nrec), s)
            b.store(d, b.gep(fbase, [k], inbounds=True), align=4)
            b.store(b.fmul(d, b.sitofp(e.hsum_i32(isum), F32)), b.gep(fbase, [b.add(ntok_rec, k)], inbounds=True),
                    align=4)
            return []

        e.loop(ci(0), nrec, ci(1), [], prologue, name="pro")
        return []

    e.loop(ci(0), batch, ci(1), [], prologue_token, name="prot")

    def rowblocks(r, nblk, prefill=False):
        """nblk consecutive 16-row blocks from row r: one visit of each record serves them all, so its fields, the
        depth dispatch and the activation loads are shared (a 1-bit record of one group is only 4 x 32 columns per
        row block: alone, that per-visit work costs as much as its dot products). `prefill` (nblk = 1): tokens in
        groups of T, then the rest one at a time."""
        blk0 = b.sdiv(r, ci(LANES))
        rows = [(b.add(blk0, ci(i)), b.add(r, ci(i * LANES))) for i in range(nblk)]

        def token(t, _):
            def record(s, yv):
                kind, n = g.field(rec, s, 0), g.field(rec, s, 1)
                crows = [g.at_block(rec, s, 2, blk) for blk, _ in rows]
                xq = b.gep(scratch, [b.add(b.mul(t, total), b.load(b.gep(xbase, [s], inbounds=True), align=8))],
                           inbounds=True)
                nb = b.sdiv(width(n), ci(BLOCK_COLS))

                def emit_kind(k):
                    if k <= Q8_PREFETCH_MAX_BITS:
                        span = b.add(b.mul(nb, ci(LANES * 4 * k)), ci(3 * LANES))  # the record's bytes per row block
                        for crow in crows:
                            ahead = b.gep(crow, [ci(Q8_PREFETCH)])
                            e.loop(ci(0), span, ci(64), [],
                                   lambda o, _, a=ahead: (e.prefetch(b.gep(a, [o]), locality=2), [])[1], name="pf")
                    if k == 1 and lut:
                        return _lut1_blocks(e, crows, b.gep(xq, [width(n)], inbounds=True), nb, nblk, acc_slots)
                    planes = q8_planes(k)
                    # With 512-bit VNNI every (plane, sub-position) keeps its own accumulator and its codes are masked
                    # in place, q << p*s (at most 240 per byte: vpdpbusd sums in i32, nothing saturates), so a step
                    # is an AND and a vpdpbusd; the sums are shifted back (exactly: multiples of 2^(p*s)) at the end.
                    # Elsewhere (AVX2's i16 pair sums, 16 ymm registers) codes are shifted down to <= 15 first.
                    in_place = _Dot16.is_wide(e)
                    # accumulators per plane: sub-position s of a plane with g of them adds into accumulator s % g,
                    # its word shifted down by p*g*(s // g) first (one shift per word and s // g), so each
                    # accumulator only ever holds codes at bit p*(s % g) of their byte
                    naccs = [min(8 // p, Q8_PLANE_ACCS if in_place else 1) for p, _ in planes]
                    slots = [(pi, sub) for pi, g_ in enumerate(naccs) for sub in range(g_)]
                    # row blocks sharing one pass over the columns: as many as the accumulators leave registers for
                    # (512-bit: 32 zmm, ~20 for accumulators; else each accumulator is two ymm halves of 16 ymm)
                    share = max(1, min(nblk, (20 if in_place else 4) // len(slots)))

                    def block(blk, accs, part):
                        dots = [{slot: _Dot16(e, a) for slot, a in zip(slots, accs[i * len(slots):])}
                                for i in range(len(part))]
                        wi = 0
                        for pi, (p, _) in enumerate(planes):
                            for w in range(p):
                                words = [e.load(crows[i], b.mul(b.add(b.mul(blk, ci(k)), ci(wi)), ci(LANES * 4)),
                                                V(I32, LANES), 4) for i in part]
                                wi += 1
                                g_ = naccs[pi]
                                shifted = {}
                                for sub in range(8 // p):
                                    grp, hi = sub % g_, sub // g_
                                    byte_mask = int.from_bytes(bytes([((1 << p) - 1) << (p * grp)] * 4), "little")
                                    col = b.add(b.mul(blk, ci(BLOCK_COLS)), ci(w * (BLOCK_COLS // p) + 4 * sub))
                                    x4 = e.bcast(b.load(b.bitcast(b.gep(xq, [col], inbounds=True), P(I32)), align=1),
                                                 LANES)
                                    for i, (d, word) in enumerate(zip(dots, words)):
                                        if hi and (i, hi) not in shifted:
                                            shifted[(i, hi)] = b.lshr(word, cvec(I32, LANES, p * g_ * hi))
                                        src = shifted[(i, hi)] if hi else word
                                        d[(pi, grp)].add(b.and_(src, cvec(I32, LANES, byte_mask)), x4)
                        return [d[slot].value() for d in dots for slot in slots]

                    for p0 in range(0, nblk, share):
                        part = list(range(p0, min(nblk, p0 + share)))
                        accs = e.loop(ci(0), nb, ci(1), [cvec(I32, LANES, 0)] * (len(slots) * len(part)),
                                      lambda blk, a: block(blk, a, part), name="blk")
                        for i in part:
                            tot = None
                            for a, (pi, sub) in zip(accs[(i - p0) * len(slots):], slots):
                                p, shift = planes[pi]
                                a = b.ashr(a, cvec(I32, LANES, p * sub)) if sub else a
                                a = b.shl(a, cvec(I32, LANES, shift)) if shift else a
                                tot = a if tot is None else b.add(tot, a)
                            b.store(tot, acc_slots[i])

                g.switch_kind(kind, emit_kind, kinds=range(1, 9))
                k_ = b.add(b.mul(t, nrec), s)
                d = e.bcast(b.load(b.gep(fbase, [k_], inbounds=True), align=4), LANES)
                dsum = e.bcast(b.load(b.gep(fbase, [b.add(ntok_rec, k_)], inbounds=True), align=4), LANES)
                out = []
                for i, (blk, _) in enumerate(rows):
                    sv, szv = g.scale_zero(rec, s, blk)
                    yi = e.fmuladd(b.fmul(sv, d), b.sitofp(b.load(acc_slots[i]), g.vf), yv[i])
                    out.append(e.fmuladd(b.fneg(szv), dsum, yi))
                return out

            yv = e.loop(ci(0), nrec, ci(1), [g.zero] * nblk, record, name="rec")
            for v, (_, r_i) in zip(yv, rows):
                mask = b.icmp_signed("<", g.lane, e.bcast(b.sub(re, r_i), LANES))
                e.masked_store_f32(v, b.gep(y, [b.add(b.mul(t, ldy), r_i)], inbounds=True), mask)
            return []

        def group(t0, _):
            """T tokens on one row block: each code word is loaded, shifted and masked once and applied to every
            token's int8 activations (one accumulator per token), one code plane at a time, so that the T
            accumulators fit the registers whatever the depth."""
            toks = [b.add(t0, ci(j)) for j in range(T)]
            (blk, r0), = rows

            def record(s, yv):
                n = g.field(rec, s, 1)
                crow = g.at_block(rec, s, 2, blk)
                base = b.load(b.gep(xbase, [s], inbounds=True), align=8)
                xqs = [b.gep(scratch, [b.add(b.mul(t, total), base)], inbounds=True) for t in toks]
                nb = b.sdiv(width(n), ci(BLOCK_COLS))

                def emit_kind(k):
                    if k <= Q8_PREFETCH_MAX_BITS:
                        ahead = b.gep(crow, [ci(Q8_PREFETCH)])
                        e.loop(ci(0), b.add(b.mul(nb, ci(LANES * 4 * k)), ci(3 * LANES)), ci(64), [],
                               lambda o, _: (e.prefetch(b.gep(ahead, [o]), locality=2), [])[1], name="pf")
                    if k == 1 and lut:  # the tables are per token: no codes to share
                        for xq, slot in zip(xqs, gslots):
                            _lut1_blocks(e, [crow], b.gep(xq, [width(n)], inbounds=True), nb, 1, [slot])
                        return
                    tot, wi = None, 0
                    for p, shift in q8_planes(k):
                        sums = (_q8_plane_mmla if mmla else _q8_plane_dots)(e, crow, k, wi, p, xqs, nb)
                        sums = [b.shl(a, cvec(I32, LANES, shift)) if shift else a for a in sums]
                        tot = sums if tot is None else [b.add(u, v) for u, v in zip(tot, sums)]
                        wi += p
                    for a, slot in zip(tot, gslots):
                        b.store(a, slot)

                g.switch_kind(g.field(rec, s, 0), emit_kind, kinds=range(1, 9))
                sv, szv = g.scale_zero(rec, s, blk)  # once for all T tokens
                out = []
                for t, slot, yj in zip(toks, gslots, yv):
                    k_ = b.add(b.mul(t, nrec), s)
                    d = e.bcast(b.load(b.gep(fbase, [k_], inbounds=True), align=4), LANES)
                    dsum = e.bcast(b.load(b.gep(fbase, [b.add(ntok_rec, k_)], inbounds=True), align=4), LANES)
                    out.append(e.fmuladd(b.fneg(szv), dsum, e.fmuladd(b.fmul(sv, d), b.sitofp(b.load(slot), g.vf), yj)))
                return out

            yv = e.loop(ci(0), nrec, ci(1), [g.zero] * T, record, name="grec")
            mask = b.icmp_signed("<", g.lane, e.bcast(b.sub(re, r0), LANES))
            for t, v in zip(toks, yv):
                e.masked_store_f32(v, b.gep(y, [b.add(b.mul(t, ldy), r0)], inbounds=True), mask)
            return []

        if prefill:
            grp_end = b.mul(b.sdiv(batch, ci(T)), ci(T))
            e.loop(ci(0), grp_end, ci(T), [], group, name="grp")
            e.loop(grp_end, batch, ci(1), [], token, name="tok")
        else:
            e.loop(ci(0), batch, ci(1), [], token, name="tok")
        return []

    def decode_rows():
        # this matrix's code bytes (per row block: kind x columns) in all records and in those above Q8_WIDE_MAX_BITS
        def weigh(s, acc):
            kind = g.field(rec, s, 0)
            w = b.mul(kind, g.field(rec, s, 1))
            return [b.add(acc[0], w),
                    b.add(acc[1], b.select(b.icmp_signed(">", kind, ci(Q8_WIDE_MAX_BITS)), w, ci(0)))]

        # only with 512-bit VNNI (where it was measured, and where the accumulators of four blocks fit the registers
        # at 1-5 bits): elsewhere a third row loop would only grow the object (the SSE2 one 150 -> 420 KB)
        four_block_visits = _Dot16.is_wide(e)
        if four_block_visits:
            all_bytes, deep_bytes = e.loop(ci(0), nrec, ci(1), [ci(0), ci(0)], weigh, name="weigh")
            wide = b.icmp_signed("<", b.mul(deep_bytes, ci(2)), all_bytes)
        else:
            wide = ir.Constant(ir.IntType(1), 0)

        def whole(start, nblk):  # end of the whole runs of nblk row blocks from start
            return b.add(start, b.mul(b.sdiv(b.sub(re, start), ci(nblk * LANES)), ci(nblk * LANES)))

        # runs of Q8_ROW_BLOCKS_WIDE row blocks (if this matrix is shallow enough), then of Q8_ROW_BLOCKS, then single
        # (possibly partial) blocks: a loop whose end is its start runs no iteration
        wide_end = b.select(wide, whole(rb, Q8_ROW_BLOCKS_WIDE), rb)
        if four_block_visits:
            e.loop(rb, wide_end, ci(Q8_ROW_BLOCKS_WIDE * LANES), [], lambda r, _: rowblocks(r, Q8_ROW_BLOCKS_WIDE),
                   name="rowsw")
        pair_end = whole(wide_end, Q8_ROW_BLOCKS)
        e.loop(wide_end, pair_end, ci(Q8_ROW_BLOCKS * LANES), [], lambda r, _: rowblocks(r, Q8_ROW_BLOCKS),
               name="rowsn")
        e.loop(pair_end, re, ci(LANES), [], lambda r, _: rowblocks(r, 1), name="rows")
        return []

    if T == 1:
        decode_rows()
        b.ret_void()
        return fn
    # Prefill (batch >= T): one 16-row block per record visit and T tokens per pass over its code words (their
    # accumulators take the registers more blocks would). Its own function, so that decode's code and register
    # allocation stay what they were; it shares the prologue's scratch.
    pre = ir.Function(e.m, ir.FunctionType(VOID, [P(I64), I64, P(F32), I64, I64, I64, I64, P(I8), P(I64), I64]),
                      name=spec.q8_name + "_prefill")
    pre.linkage = "internal"
    pre.attributes.add("noinline")
    prefill = b.icmp_signed(">=", batch, ci(T))
    e.if_then_values(prefill, [], lambda _: (b.call(pre, [rec, nrec, y, rb, re, batch, ldy, scratch, xbase, total]),
                                             [])[1], name="prefill")
    e.if_then_values(b.not_(prefill), [], lambda _: decode_rows(), name="decode")
    b.ret_void()

    # the closures above read these names: rebound to the prefill function's own
    rec, nrec, y, rb, re, batch, ldy, scratch, xbase, total = pre.args
    y.add_attribute("noalias")
    b = e.b = ir.IRBuilder(pre.append_basic_block("entry"))
    acc_slots = [b.alloca(V(I32, LANES), name="acc")]  # the remainder tokens' record sums
    gslots = [b.alloca(V(I32, LANES), name=f"gacc{j}") for j in range(T)]  # a group's record sums, per token
    for a in acc_slots + gslots:
        a.align = 64
    fbase = b.bitcast(b.gep(scratch, [b.mul(batch, total)], inbounds=True), P(F32))
    ntok_rec = b.mul(batch, nrec)
    e.loop(rb, re, ci(LANES), [], lambda r, _: rowblocks(r, 1, True), name="rowsg")
    b.ret_void()
    return fn


def _lut1_tables(e: Emitter, xq, w):
    """After a 1-bit record's int8 x (w columns at xq): per 32-column block, for its columns 0-15 and 16-31 (h),
    a 64-byte table of low bytes and one of high bytes of 64 int16 sums, at xq + w + 256 blk + 128 h (+ 64).
    Sum 16i + n is that of the activations of the columns the 4 bits of n stand for in the q8 1-bit layout (byte i
    of a row's word holds column 4s + i at bit s): sum over s < 4 with bit s of n set of x[16h + 4s + i]."""
    b = e.b
    tab = b.gep(xq, [w], inbounds=True)

    def block(c, _):
        xv = b.sext(e.load(xq, b.mul(c, ci(BLOCK_COLS)), V(I8, BLOCK_COLS), 1), V(I16, BLOCK_COLS))
        for h in range(2):
            acc = None
            for s_ in range(4):
                sel = b.shuffle_vector(xv, xv, cvec(I32, 64, [16 * h + 4 * s_ + j // 16 for j in range(64)]))
                term = b.and_(sel, cvec(I16, 64, [-1 if (j % 16) >> s_ & 1 else 0 for j in range(64)]))
                acc = term if acc is None else b.add(acc, term)
            base = b.add(b.mul(c, ci(256)), ci(128 * h))
            e.store(b.trunc(acc, V(I8, 64)), tab, base, 1)
            e.store(b.trunc(b.ashr(acc, cvec(I16, 64, 8)), V(I8, 64)), tab, b.add(base, ci(64)), 1)
        return []

    e.loop(ci(0), b.sdiv(w, ci(BLOCK_COLS)), ci(1), [], block, name="tab")
    return []


def _lut1_blocks(e: Emitter, crows, tab, nb, nblk, acc_slots):
    """A 1-bit record's dot products through the tables of _lut1_tables: per 16-row block and 32 columns, each
    code byte's low and high nibble, with the byte's position i in its word as bits 4-5 (table group i), index
    vpermb into the block's low-byte and high-byte tables; vpdpbusd with ones sums a row's four group sums
    (low bytes as unsigned, high bytes as signed), and the row's dot is low + 256 * high."""
    b = e.b
    v64, v16 = V(I8, 64), V(I32, LANES)
    perm = e.intrinsic("llvm.x86.avx512.permvar.qi.512", v64, [v64, v64])
    dot = e.intrinsic("llvm.x86.avx512.vpdpbusd.512", v16, [v16, v16, v16])
    low, group, ones = cvec(I32, LANES, 0x0F0F0F0F), cvec(I32, LANES, 0x30201000), cvec(I32, LANES, 0x01010101)

    def block(blk, accs):
        tables = [e.load(tab, b.add(b.mul(blk, ci(256)), ci(64 * t)), v64, 1) for t in range(4)]
        out = []
        for i, crow in enumerate(crows):
            lo, hi = accs[2 * i], accs[2 * i + 1]
            word = e.load(crow, b.mul(blk, ci(LANES * 4)), v16, 4)
            for h, nib in enumerate((word, b.lshr(word, cvec(I32, LANES, 4)))):
                idx = b.bitcast(b.or_(b.and_(nib, low), group), v64)
                lo = b.call(dot, [lo, b.bitcast(b.call(perm, [tables[2 * h], idx]), v16), ones])
                hi = b.call(dot, [hi, ones, b.bitcast(b.call(perm, [tables[2 * h + 1], idx]), v16)])
            out += [lo, hi]
        return out

    accs = e.loop(ci(0), nb, ci(1), [cvec(I32, LANES, 0)] * (2 * nblk), block, name="lblk")
    for i, slot in enumerate(acc_slots[:nblk]):
        b.store(b.add(accs[2 * i], b.shl(accs[2 * i + 1], cvec(I32, LANES, 8))), slot)


def generate_rows_module(spec: RowLaneSpec, target) -> ir.Module:
    m = ir.Module(name=f"xbitc_{spec.key()}")
    m.triple = target.triple
    e = Emitter(m, target)
    if spec.act == "q8":
        _gen_q8(e, spec)
    else:
        _gen_gemv(e, spec)
        _gen_gemm(e, spec)
    return m
