"""The packed matrix product on GPUs: the GPU layout of a row-lane matrix, and its kernels written in lang.py.

Semantics are the CPU kernels' (backends/product.py): y[t, r] = sum over records of s[r] * (q[r, :] . x) - s[r] *
z[r] * sum(x), x read through the column permutation, float32 arithmetic.

Layout (`GpuMatrix`). The bytes are backends/llvm/rowlane.py `pack`'s, unchanged: every record's codes, 16 float16
scales and 16 uint8 zero points, row block (16 rows) after row block, and within a packed block of 32 columns the
words ordered [word][lane], so 16 consecutive rows read 16 consecutive u32 words. On the GPU they are one u32
buffer (WGSL has no 8-bit storage, and no float16 without the f16 extension): scales are read as u32 words and
split by half_lo / half_hi (WGSL unpack2x16float), zero points and kind-9 bytes shifted out of u32 words. Records
become *pieces* of at most 128 columns (4 blocks; a long record's pieces share its scales and zero points, which
the product is linear in), so the work of one row block splits evenly whatever the group size. A piece is 8 u32:
kind, ncols, codes, scales, zeros (offsets in u32 words from the row block's start), x (its first column in the
padded activations, in 4-float units), 0, 0; one row block's records are `stride` words. Beside them: `src`, for
every padded column the input column it reads (0xFFFFFFFF: padding to 32 columns), and `dst`, for every input
column its piece << 7 | column in piece (0xFFFFFFFF: a dropped column).

Kernels (one workgroup size, 256 threads):
  * xbitc_rows_gather: xp[t, c] = x[t, src[c]] (0 for padding and for tokens past the batch): the permutation
    applied once, and activations laid out so each piece starts on a 16-byte boundary (vec4f loads).
  * xbitc_rows_gemv / xbitc_rows_gemm: a workgroup per (row block, tile of 1 / 4 tokens). Thread t serves lanes
    4*(t%4) .. +3 of the row block (one vec4u load brings its four rows' word) and column slice t/4 of 64: slice s
    takes pieces s, s+64, ... Per piece, each code is turned into an exact float by the exponent trick (its bits
    OR-ed under a float exponent, that exponent's value subtracted: two ALU operations, no int-to-float
    conversion, which runs at a quarter of the FMA rate on NVIDIA GPUs), with the shifts and masks of
    `PackedProduct.extraction` as constants, one switch case per kind; each x vec4 feeds 16 multiply-adds (4 rows x
    4 columns) for each token. The 64 slices' partial sums meet in shared memory (a tree of 6 steps). A warp's
    loads are whole 64-byte runs of 16 lanes, so the weights stream at full width; the gemm's tile reads them once
    for 4 tokens.
  * xbitc_rows_dequant: out[t, c] = s * (q - z) for row ids[t] (a packed embedding table's lookup), columns in
    input order, zero for dropped columns and ids outside the table.

Buffers, in binding order: gather (x, src, xp); gemv / gemm (w4 = the weights as vec4u, w1 = the same buffer as
u32, pieces as vec4u, xp as vec4f, y); dequant (w1, pieces, dst, ids, out). `GpuMatrix.*_args` give each call's
parameters and workgroup counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..llvm.rowlane import pack
from ..product import PackedProduct, Rendered
from .lang import Expr, Kernel, bitcast, const, f32, half_hi, half_lo, select, u32, vec4f, vec4u
from .render import PRINTERS

THREADS = 256
LPT = 4  # lanes (rows) per thread
SLICES = THREADS // 4  # column slices per workgroup (4 threads cover a row block's 16 lanes)
PIECE_COLS = 128
GEMM_TOKENS = 4
NONE = 0xFFFFFFFF
PIECE_FIELDS = 8


def _check(p: PackedProduct) -> None:
    if p.act != "f32" or (p.lanes, p.block_cols, p.word_bits) != (16, 32, 32):
        raise ValueError("the GPU kernels are written for the f32 row-lane format: 16 lanes, 32-column blocks, "
                         f"32-bit words (got act={p.act}, {p.lanes}, {p.block_cols}, {p.word_bits})")


# ------------------------------------------------------------------------------------------------ layout


@dataclass
class GpuMatrix:
    rows: int
    inp: int
    words: np.ndarray  # u32: the row-lane buffer
    pieces: np.ndarray  # u32 [npieces, 8]
    src: np.ndarray  # u32 [xcols]
    dst: np.ndarray  # u32 [inp]
    stride: int  # u32 words per row block

    @classmethod
    def from_records(cls, records, rows: int, inp: int, perm: np.ndarray | None = None) -> GpuMatrix:
        """records as rowlane `pack` takes them, [(codes [rows, n] uint8, scales [rows] float16, zeros [rows]
        uint8, x_offset, bits)] (backends/cpu/rows.py `rowlane_records` makes them from an artifact's segments);
        stored column j reads input column perm[j] (None: j)."""
        buf, table = pack(records, rows, "f32")
        base = buf.ctypes.data
        words = buf.view("<u4") if buf.size else np.zeros(4, np.uint32)
        perm = np.arange(inp) if perm is None else np.asarray(perm)
        pieces, src, dst = [], [], np.full(max(inp, 1), NONE, dtype=np.uint32)
        for kind, ncols, codes, scales, zeros, xoff, _ in table.tolist():
            cw, sw, zw = ((v - base) // 4 for v in (codes, scales, zeros))
            for p0 in range(0, ncols, PIECE_COLS):
                n = min(PIECE_COLS, ncols - p0)
                at = cw + (p0 * 4 if kind == 9 else p0 // 32 * kind * 16)  # kind 9: 16 bytes = 4 words a column
                cols = perm[xoff + p0:xoff + p0 + n]
                dst[cols] = (len(pieces) << 7) | np.arange(n)
                pieces.append([kind, n, at, sw, zw, len(src) // 4, 0, 0])
                src += cols.tolist() + [NONE] * (-n % 32)
        return cls(rows, inp, words, np.asarray(pieces or [[0] * PIECE_FIELDS], np.uint32).reshape(-1, PIECE_FIELDS),
                   np.asarray(src or [NONE] * 4, np.uint32), dst, int(table[0, 6]) // 4 if len(table) else 0)

    @property
    def npieces(self) -> int:
        return 0 if self.pieces[0, 1] == 0 else len(self.pieces)

    @property
    def xcols(self) -> int:
        return len(self.src)

    @property
    def row_blocks(self) -> int:
        return -(-self.rows // 16)

    def xp_floats(self, tokens: int, tile: int) -> int:
        """Floats of the gathered activations for `tokens` tokens in tiles of `tile`."""
        return -(-tokens // tile) * tile * self.xcols

    def gather_args(self, tokens: int, tile: int) -> tuple[dict, tuple]:
        return ({"inp": self.inp, "xcols": self.xcols, "tokens": tokens},
                (-(-self.xcols // THREADS), -(-tokens // tile) * tile))

    def product_args(self, tokens: int, tile: int) -> tuple[dict, tuple]:
        """gemv: tile 1, gemm: GEMM_TOKENS."""
        return ({"rows": self.rows, "tokens": tokens, "xrow": self.xcols // 4, "npieces": self.npieces,
                 "stride": self.stride}, (self.row_blocks, -(-tokens // tile)))

    def dequant_args(self, tokens: int) -> tuple[dict, tuple]:
        return {"inp": self.inp, "rows": self.rows, "stride": self.stride}, (-(-self.inp // THREADS), tokens)

    @property
    def bytes(self) -> int:
        """Bytes a product call streams for the weights: what its bandwidth is measured on."""
        return self.words.nbytes


# ------------------------------------------------------------------------------------------------ kernels


def code_f32(word: Expr, how: str, o: int, bits: int, nxt: Expr | None = None) -> Expr:
    """The `bits`-bit code at bit o of `word` (continued in `nxt` for "split") as an exact f32: the code's bits
    under the exponent of 2^(23-a), minus 2^(23-a), a = where the code sits (bits 0..22 of a word need no shift)."""
    mask = (1 << bits) - 1
    at = 0
    if how == "split":
        v = ((word >> o) | (nxt << (32 - o))) & mask
    elif how == "top":
        v = word >> o
    elif o + bits <= 23:  # "low", or "shift" that fits the mantissa: mask in place
        v, at = word & (mask << o), o
    else:
        v = (word >> o) & mask
    return bitcast(v | ((150 - at) << 23), f32) - float(2 ** (23 - at))


def _byte(word: Expr, i: int) -> Expr:
    return code_f32(word, "top" if i == 3 else "shift", 8 * i, 8)


def _tokens(k: Kernel, tt: int, body) -> None:
    """body(token index) for the tile's tokens: inline for one, else a loop CUDA and Metal unroll."""
    if tt == 1:
        body(0)
        return
    with k.loop("tok", 0, tt, unroll=True) as tok:
        body(tok)


def product_kernel(p: PackedProduct, name: str, tt: int) -> Kernel:
    _check(p)
    k = Kernel(name, (THREADS,), doc=f"y = W x for a tile of {tt} token(s) per workgroup; generated by "
               "backends/gpu/packed.py from the row-lane format, do not edit.")
    w4, w1, rec = k.buffer("w4", vec4u), k.buffer("w1", u32), k.buffer("pieces", vec4u)
    xp, y = k.buffer("xp", vec4f), k.buffer("y", f32, write=True)
    rows, tokens, xrow, npieces, stride = (k.param(n, u32) for n in ("rows", "tokens", "xrow", "npieces", "stride"))
    red = k.shared("red", f32, THREADS * LPT)
    t = k.let("t", k.local_id(0))
    quad, slice_ = k.let("quad", t & 3), k.let("slice", t >> 2)
    rb = k.let("rb", k.group_id(0))
    base = k.let("base", rb * stride)
    x0 = k.let("x0", k.group_id(1) * (xrow * tt))
    acc = k.array("acc", f32, LPT * tt)

    def accumulate(q, xv_at: Expr, c: int, dot, xs) -> None:
        """dot[lane][token] += the four columns' codes q[col][lane] times their x; xs[token] += the x."""
        def body(tok):
            xv = k.let(f"xv{c}", xp[xv_at + tok * xrow])
            xs[tok] = xs[tok] + ((xv.x + xv.y) + (xv.z + xv.w))
            for i in range(LPT):
                d = dot[i * tt + tok]
                dot[i * tt + tok] = d + q[0][i] * xv.x + q[1][i] * xv.y + q[2][i] * xv.z + q[3][i] * xv.w
        _tokens(k, tt, body)

    with k.loop("pc", slice_, npieces, SLICES) as pc:
        h0, h1 = k.let("h0", rec[pc * 2]), k.let("h1", rec[pc * 2 + 1])
        n, codes, xcol = k.let("ncols", h0.y), k.let("codes", base + h0.z), k.let("xcol", x0 + h1.y)
        dot, xs = k.array("dot", f32, LPT * tt), k.array("xs", f32, tt)
        with k.switch(h0.x) as sw:
            for kind in p.kinds:
                with sw.case(kind):
                    if kind == p.bytes_kind:  # [column][16 lanes] bytes: one word is 4 lanes of one column
                        with k.loop("j", 0, n, 4) as j:
                            jw = k.let("jw", codes + j * 4 + quad)
                            b = [k.let(f"b{jj}", w1[jw + 4 * jj]) for jj in range(4)]
                            q = [[k.let(f"c{jj}_{i}", _byte(b[jj], i)) for i in range(LPT)] for jj in range(4)]
                            accumulate(q, xcol + (j >> 2), 0, dot, xs)
                        continue
                    with k.loop("cb", 0, (n + 31) >> 5) as cb:
                        blk = k.let("blk", (codes >> 2) + cb * (4 * kind))  # 16 lanes x kind words = 4*kind vec4
                        w = [k.let(f"w{i}", w4[blk + 4 * i + quad]) for i in range(kind)]
                        xb = k.let("xb", xcol + cb * 8)
                        for c in range(p.block_cols // 4):
                            q = [[None] * LPT for _ in range(4)]
                            for jj in range(4):
                                how, wi, o = p.extraction(kind, 4 * c + jj)
                                for i in range(LPT):
                                    nxt = w[wi + 1][i] if how == "split" else None
                                    q[jj][i] = k.let(f"c{4 * c + jj}_{i}", code_f32(w[wi][i], how, o, kind, nxt))
                            accumulate(q, xb + c, c, dot, xs)
        sw0, sw1 = k.let("sw0", w1[base + h0.w + quad * 2]), k.let("sw1", w1[base + h0.w + quad * 2 + 1])
        zw = k.let("zw", w1[base + h1.x + quad])
        for i in range(LPT):
            s = k.let(f"s{i}", (half_lo, half_hi)[i % 2]((sw0, sw1)[i // 2]))
            z = k.let(f"z{i}", _byte(zw, i))

            def epilogue(tok, i=i, s=s, z=z):
                acc[i * tt + tok] = acc[i * tt + tok] + s * (dot[i * tt + tok] - z * xs[tok])
            _tokens(k, tt, epilogue)

    def reduce(tok) -> None:
        for i in range(LPT):
            red[t * LPT + i] = acc[i * tt + tok]
        k.barrier()
        s = SLICES // 2
        while s:
            with k.if_(slice_ < s):
                for i in range(LPT):
                    red[t * LPT + i] = red[t * LPT + i] + red[(t + 4 * s) * LPT + i]
            k.barrier()
            s //= 2
        token = k.group_id(1) * tt + tok
        with k.if_((slice_.eq(0)) & (token < tokens)):
            for i in range(LPT):
                row = k.let(f"row{i}", rb * 16 + quad * LPT + i)
                with k.if_(row < rows):
                    y[token * rows + row] = red[quad * LPT + i]
        if tt > 1:
            k.barrier()  # slice 0 reads red before the next token's partial sums overwrite it
    _tokens(k, tt, reduce)
    return k


def gather_kernel(name: str) -> Kernel:
    k = Kernel(name, (THREADS,), doc="xp[t, c] = x[t, src[c]], 0 for padding and tokens past the batch; generated "
               "by backends/gpu/packed.py, do not edit.")
    x, src, xp = k.buffer("x", f32), k.buffer("src", u32), k.buffer("xp", f32, write=True)
    inp, xcols, tokens = (k.param(n, u32) for n in ("inp", "xcols", "tokens"))
    c, tok = k.let("c", k.global_id(0)), k.let("tok", k.group_id(1))
    with k.if_(c < xcols):
        s = k.let("s", src[c])
        v = k.var("v", 0.0)
        with k.if_((s < inp) & (tok < tokens)):
            v.set(x[tok * inp + s])
        xp[tok * xcols + c] = v
    return k


def dequant_kernel(p: PackedProduct, name: str) -> Kernel:
    _check(p)
    k = Kernel(name, (THREADS,), doc="out[t, c] = s * (q - z) of row ids[t], column c in input order; generated by "
               "backends/gpu/packed.py, do not edit.")
    w1, rec, dst = k.buffer("w1", u32), k.buffer("pieces", vec4u), k.buffer("dst", u32)
    ids, out = k.buffer("ids", u32), k.buffer("out", f32, write=True)
    inp, rows, stride = (k.param(n, u32) for n in ("inp", "rows", "stride"))
    c, tok = k.let("c", k.global_id(0)), k.let("tok", k.group_id(1))
    with k.if_(c < inp):
        row, d = k.let("row", ids[tok]), k.let("d", dst[c])
        val = k.var("val", 0.0)
        with k.if_((row < rows) & d.ne(NONE)):
            h0, h1 = k.let("h0", rec[(d >> 7) * 2]), k.let("h1", rec[(d >> 7) * 2 + 1])
            j, kind = k.let("j", d & 127), k.let("kind", h0.x)
            base, lane = k.let("base", (row >> 4) * stride), k.let("lane", row & 15)
            codes = k.let("codes", base + h0.z)
            code = k.var("code", 0)
            with k.if_(kind.eq(p.bytes_kind)):
                code.set((w1[codes + j * 4 + (lane >> 2)] >> ((lane & 3) * 8)) & 255)
            with k.else_():  # the code's bit position in its lane's stream of its block, as extraction has it
                bit = k.let("bit", (j & 31) * kind)
                at = k.let("at", codes + (j >> 5) * (kind * 16) + (bit >> 5) * 16 + lane)
                o = k.let("o", bit & 31)
                v = k.var("v", w1[at] >> o)
                with k.if_(o + kind > 32):
                    v.set(v | (w1[at + 16] << (32 - o)))
                code.set(v & ((const(1, u32) << kind) - 1))
            sw = k.let("sw", w1[base + h0.w + (lane >> 1)])
            s = select((lane & 1).eq(1), half_hi(sw), half_lo(sw))
            z = (w1[base + h1.x + (lane >> 2)] >> ((lane & 3) * 8)) & 255
            val.set(s * (code.cast(f32) - z.cast(f32)))
        out[tok * inp + c] = val
    return k


def kernels(p: PackedProduct, suffix: str = "") -> list[Kernel]:
    """gather, gemv, gemm and dequant for the product's format."""
    sfx = f"_{suffix}" if suffix else ""
    return [gather_kernel("xbitc_rows_gather" + sfx), product_kernel(p, p.function("gemv", suffix), 1),
            product_kernel(p, p.function("gemm", suffix), GEMM_TOKENS),
            dequant_kernel(p, p.function("dequant", suffix))]


@dataclass(frozen=True)
class GpuRenderer:
    """The packed product as WGSL, CUDA or Metal source (backends/product.py's Renderer)."""

    name: str  # "wgsl", "cuda" or "metal"

    def render(self, product: PackedProduct, suffix: str = "") -> Rendered:
        ks = kernels(product, suffix)
        return Rendered(self.name, PRINTERS[self.name]().render_all(ks), tuple(k.name for k in ks))
