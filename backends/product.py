"""The packed matrix product, described once for every target, and the interface of what renders it into code.

    y[r] = sum over records g of  s_g[r] * sum_{j in g} q[r, j] * x[perm[x_offset_g + j]]
                                - s_g[r] * z_g[r] * sum_{j in g} x[perm[x_offset_g + j]]

A matrix is a list of records (one scale group of one segment of equal depth), laid out row block by row block:
`lanes` rows advance together. A record's codes in a row block are, by kind: 1..8 bits, blocks of `block_cols`
columns, each `kind` words of `word_bits` per lane (word w of lane l: bits [w*word_bits, (w+1)*word_bits) of row l's
LSB-first code stream, code k at bits k*kind .. k*kind+kind-1); kind 9, one byte per code ([ncols][lanes]). After
the codes: `lanes` float16 scales, then `lanes` uint8 zero points. A record is `record_fields` int64s.
backends/llvm/rowlane.py `pack` builds the layout (its docstring has the why); `PackedProduct` is what a renderer
reads: the constants, the code extraction of every kind, the entry points and their C parameters.

Renderers: backends/llvm/render.py (LLVM IR -> objects for x86-64 and AArch64), backends/cstyle/ (C source: the
C library's portable kernels) and backends/gpu/packed.py `GpuRenderer` (WGSL, CUDA and Metal source, written in
backends/gpu/lang.py's kernel language and printed by backends/gpu/render.py; the same record bytes as one u32
buffer, records cut into pieces of at most 128 columns).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .llvm.codegen import extraction_plan
from .llvm.rowlane import BLOCK_COLS, BYTES_KIND, LANES, REC_FIELDS, ROWS_VERSION

RECORD_FIELDS = ("kind", "ncols", "codes", "scales", "zeros", "x_offset", "stride")
assert len(RECORD_FIELDS) == REC_FIELDS
# C parameters of each entry point, by its role; the names are xbitc_rows_<role>[_<suffix>]
SIGNATURES = {
    "gemv": ("const int64_t* rec, int64_t nrec, const float* x, const int32_t* perm, float* y, "
             "int64_t rows_begin, int64_t rows_end"),
    "gemm": ("const int64_t* rec, int64_t nrec, const float* x, float* y, int64_t rows_begin, int64_t rows_end, "
             "int64_t batch, int64_t ldx, int64_t ldy"),
    "q8": ("const int64_t* rec, int64_t nrec, const float* x, const int32_t* perm, float* y, int64_t rows_begin, "
           "int64_t rows_end, int64_t batch, int64_t ldx, int64_t ldy, int8_t* scratch"),
    "dequant": "const int64_t* rec, int64_t nrec, const int32_t* perm, int64_t row, int64_t in_features, float* out",
}
ROLES = {"f32": ("gemv", "gemm"), "q8": ("q8",)}


@dataclass(frozen=True)
class PackedProduct:
    """The row-lane packed product for one activation strategy: "f32" (exact float activations) or "q8" (each
    record's x rounded to int8, absmax / 127, integer dot products)."""

    act: str = "f32"
    lanes: int = LANES
    block_cols: int = BLOCK_COLS
    word_bits: int = 32
    kinds: tuple[int, ...] = tuple(range(1, 9)) + (BYTES_KIND,)
    bytes_kind: int = BYTES_KIND
    record_fields: tuple[str, ...] = RECORD_FIELDS
    scale_dtype: str = "float16"
    zero_dtype: str = "uint8"
    perm_dtype: str = "int32"
    format_version: int = ROWS_VERSION
    extra_roles: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.act not in ROLES:
            raise ValueError(f"activation strategy {self.act!r}: one of {', '.join(ROLES)}")

    def roles(self) -> tuple[str, ...]:
        return ROLES[self.act] + self.extra_roles

    def function(self, role: str, suffix: str = "") -> str:
        return f"xbitc_rows_{role}" + (f"_{suffix}" if suffix else "")

    def functions(self, suffix: str = "") -> tuple[str, ...]:
        return tuple(self.function(r, suffix) for r in self.roles())

    def extraction(self, kind: int, k: int) -> tuple[str, int, int]:
        """How code k of a lane comes out of a kind-`kind` block's words: (how, word, bit offset), how one of
        "low" (word & mask), "top" (word >> o), "shift" ((word >> o) & mask), "split" (straddles word and word+1)."""
        how, word, offset, _ = extraction_plan(kind, self.word_bits, k, False)
        return how, word, offset

    def code_bytes(self, kind: int, ncols: int) -> int:
        """Bytes of one record's codes in one row block."""
        if kind == self.bytes_kind:
            return ncols * self.lanes
        return -(-ncols // self.block_cols) * kind * self.lanes * self.word_bits // 8


@dataclass(frozen=True)
class Rendered:
    """A renderer's output: `language` "object" (a relocatable object, bytes) or a source language ("c", ...:
    text), and the functions it defines."""

    language: str
    payload: bytes | str
    functions: tuple[str, ...]


class Renderer(Protocol):
    """Turns the description into code for one target; `suffix` goes on every function name, so several renderings
    (levels of one ISA) link into one binary."""

    name: str

    def render(self, product: PackedProduct, suffix: str = "") -> Rendered: ...
