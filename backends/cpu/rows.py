"""One packed matrix as row-lane records (backends/llvm/rowlane.py), run by one kernel call per matrix and token
batch: lanes over rows, every segment, depth and scale group a record of one buffer, the permutation gathered inside
the kernel. What the CPU backends run by default (`$XBITC_X86_LINEAR=rows`)."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from xbitc.quant.pack import row_bytes as canonical_row_bytes
from xbitc.quant.packed import PackedSegment

from ..llvm import Target, compile_kernel
from ..llvm.layout import unpack_fast
from ..llvm.rowlane import ROWS_KIND, RowLaneSpec, q8_scratch_bytes
from ..llvm.rowlane import pack as rowlane_pack
from . import log_once

GEMM_STACK_BYTES = 256 << 10  # stack the row-lane gemm may use per call (threads have 8 MiB here; see gemm_run)


def rows_kernel(target: Target, act: str) -> Any:
    """The host's row-lane kernel for activations `act`, or None where LLVM cannot build it."""
    try:
        return compile_kernel(RowLaneSpec(act=act), target, kinds=(ROWS_KIND,))
    except Exception as err:  # then every segment runs on its own lane-interleaved kernel
        log_once(("rows",), logging.WARNING, f"{target.triple.split('-')[0]}: no row-lane kernel "
                 f"({type(err).__name__}: {err}); segments run one lane-interleaved kernel call each")
        return None


def rowlane_records(pss: list[PackedSegment], out: int) -> list[tuple]:
    """The records of `rowlane.pack` for a matrix's live segments: one per scale group of each segment."""
    records = []
    for ps in pss:
        seg = ps.seg
        raw = np.asarray(ps.codes, dtype=np.uint8).reshape(out, canonical_row_bytes(seg.ncols, seg.bits))
        codes = unpack_fast(raw, seg.bits, seg.ncols)
        scales = np.asarray(ps.scales, dtype=np.float16).reshape(out, seg.ngroups)
        zeros = unpack_fast(np.asarray(ps.zeros, dtype=np.uint8).reshape(out, -1), seg.bits, seg.ngroups)
        for g in range(seg.ngroups):
            c0, c1 = g * seg.group_size, min(seg.ncols, (g + 1) * seg.group_size)
            records.append((codes[:, c0:c1], scales[:, g], zeros[:, g], seg.start + c0, seg.bits))
    return records


class RowLaneMatrix:
    """The whole matrix as row-lane records: one kernel call per matrix and token batch, vectorised over rows, every
    segment and depth inside it."""

    def __init__(self, pss: list[PackedSegment], out: int, inp: int, perm: torch.Tensor | None, kernel: Any,
                 act: str):
        records = rowlane_records(pss, out)
        self.act = act
        self.buf, self.table = rowlane_pack(records, out, act)
        self.table_ptr = self.table.ctypes.data  # ~1 us per .ctypes lookup: taken once, not on every call
        self.nrec, self.out, self.inp = len(records), out, inp
        if act == "q8":
            self.q8 = kernel.rows_q8
            self.scratch_per_token = q8_scratch_bytes([r[0].shape[1] for r in records], 1, [r[4] for r in records]) - 64
        else:
            self.gemv, self.gemm = kernel.rows_gemv, kernel.rows_gemm
        # the kernels read int32 indices; gemm's gather (index_select) takes the matrix's int64 tensor
        self.perm32 = None if perm is None else perm.numpy().astype(np.int32)
        self.perm_ptr = None if perm is None else self.perm32.ctypes.data
        self.perm_t = perm

    def prepare(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """What the kernel reads: x itself, or for the f32 gemm x [T, in] gathered by the permutation."""
        if T == 1 or self.act == "q8" or self.perm_t is None:
            return x
        return x.view(T, self.inp).index_select(1, self.perm_t)

    def run(self, xin: torch.Tensor, y: torch.Tensor, T: int, rb: int, re: int) -> None:
        if self.act == "q8":
            scratch = torch.empty(self.scratch_bytes(T), dtype=torch.uint8)
            self.q8(*self.q8_args(xin, y, T, rb, re, scratch.data_ptr()))
        elif T == 1:
            self.gemv(*self.gemv_args(xin, y, rb, re))
        else:
            self.gemm_run(xin.view(T, self.inp), y, rb, re)

    def scratch_bytes(self, T: int) -> int:
        """q8 scratch of one call (int8 x, lookup tables, d per record), rounded so the next one stays 64-byte
        aligned."""
        return -(-(T * self.scratch_per_token + 64) // 64) * 64

    def q8_args(self, xin: torch.Tensor, y: torch.Tensor, T: int, rb: int, re: int, scratch: int) -> tuple:
        return (self.table_ptr, self.nrec, xin.data_ptr(), self.perm_ptr, y.data_ptr(), rb, re, T, self.inp, self.out,
                scratch)

    def gemv_args(self, x: torch.Tensor, y: torch.Tensor, rb: int, re: int) -> tuple:
        """One token, x unpermuted (the kernel gathers by the permutation as it copies x)."""
        return self.table_ptr, self.nrec, x.data_ptr(), self.perm_ptr, y.data_ptr(), rb, re

    def jobs(self, xin: torch.Tensor, y: torch.Tensor, T: int, ranges: list[tuple[int, int]]):
        """(kernel, arguments) per row range for the spinning pool — q8 any batch, each range with its own
        scratch, or the f32 gemv — and what must stay alive while they run. Not the f32 gemm (chunked over tokens:
        `gemm_run`)."""
        if self.act == "q8":
            step = self.scratch_bytes(T)
            scratch = torch.empty(len(ranges) * step, dtype=torch.uint8)
            base = scratch.data_ptr()
            return [(self.q8, self.q8_args(xin, y, T, rb, re, base + i * step)) for i, (rb, re) in enumerate(ranges)], \
                scratch
        assert T == 1, "the f32 gemm runs through gemm_run"
        return [(self.gemv, self.gemv_args(xin, y, rb, re)) for rb, re in ranges], None

    def gemm_run(self, xp: torch.Tensor, y: torch.Tensor, rb: int, re: int) -> None:
        """Several tokens, xp the permuted input [T, in]; y [..., out] contiguous. The kernel keeps per-token sums
        on the stack (~4*nrec + 128 bytes a token), so long batches go in chunks that stay well inside a thread's
        stack."""
        T, inp = xp.shape
        out = y.shape[-1]
        chunk = max(1, GEMM_STACK_BYTES // (4 * self.nrec + 128))
        xa, ya = xp.data_ptr(), y.data_ptr()
        for t0 in range(0, T, chunk):
            n = min(chunk, T - t0)
            self.gemm(self.table_ptr, self.nrec, xa + 4 * t0 * inp, ya + 4 * t0 * out, rb, re, n, inp, out)

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes + self.table.nbytes)
