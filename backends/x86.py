"""x86: packed linears run through the generated LLVM kernels (backends/llvm) on x86-64 hosts.

Lowering (`X86Backend.lower`) keeps the reference interpreter for every op except PACKED_LINEAR, whose
`linear_impl` is an `X86Linears`. By default (`$XBITC_X86_LINEAR=rows`) every packed matrix is laid out once for
the row-lane kernel (llvm/rowlane.py: all segments and scale groups as records of one buffer) and each call is one
kernel call over the whole matrix (lanes over rows, the permutation gathered inside, `$XBITC_X86_ACT=q8` for int8
activations). `XBITC_X86_LINEAR=segments` runs the per-segment lane-interleaved kernels instead, as follows:

* at lower time, every PackedMatrix read by a PACKED_LINEAR node is prepared once (cached per weight name): each
  segment of nonzero depth gets its codes repacked from the canonical "lsb-rows" stream into the kernel layout,
  its zero points unpacked to uint8 [out, ngroups] and its scales made a contiguous float16 array; the host kernel
  of its (bits, group, layout) is compiled or fetched from the disk cache (gemv and gemm, so nothing compiles at
  call time). The layout is chosen per segment by `kernel_plan` (least row padding: il8w32 for 576-column rows,
  il16w32 on AVX-512 hosts for multiples of 512 columns);
* at call time, x [..., in] float32 is flattened to [T, in] (a view); each segment's columns are gathered by the
  permutation (each input column is gathered exactly once, straight into a contiguous per-segment block; no copy
  for unpermuted single-segment weights), then every segment's kernel runs over its column slice into the same y:
  the first executed segment writes (`gemv` / `gemm`), the others accumulate (`*_acc`); 0-bit segments are
  skipped; bias is added at the end. One token uses the gemv kernels, several the gemm kernels.
* rows are split into ranges run concurrently on a module-level thread pool (ctypes drops the GIL); the calling
  thread runs the first range. A range is at least `MIN_TASK_MACS` multiply-adds, so small matrices stay on one
  thread (waking a worker costs ~25-80 us, more than a SmolLM2-sized gemv takes). Where nothing else spins (see
  `pool_kind`) the row-lane kernel's ranges go to native spinning workers instead (llvm/pool.py, ~10 us).

Group sizes. The fast (lane-interleaved) kernels need `G % lanes == 0` and `G | block` or `block | G`. For other
group sizes (e.g. per-channel groups of 576 or 160 columns) the segment is run exactly by a fast kernel at the
largest group size G' dividing G that the layouts support (G' = gcd(G, block), scales and zero points repeated
G/G' times in memory: same arithmetic, more scale reads); failing that by the llvm package's canonical-layout
kernel (scalar, ~30x slower); failing that (LLVM could not build the kernel) by the reference float path
(dequantize once, matmul). Each fallback is logged once per (bits, group) on the `xbitc.backends.x86` logger.

`emit` writes `kernels/` into the artifact: the row-lane kernels (what the runtime calls: any depth, whole
matrices; records built by `llvm.rowlane.pack`) as one relocatable ELF object per activation strategy (f32, q8)
and x86-64 level (baseline x86-64 / SSE2, x86-64-v3 / AVX2+FMA+F16C, x86-64-v4 / AVX-512), symbols suffixed with
the level so all of them link into one binary, plus the C header `kernels/xbitc_kernels.h` (see `header_text`).
Objects come from the kernel disk cache when they were emitted before. ~280 KB in all, whatever the model: 0.017
bits per weight of SmolLM2-135M, counted (the planners reserve them before choosing depths, see
`Backend.emitted`), and dominant for toy models.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import threading
from functools import partial
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xbitc.ir.graph import LINEAR_OPS, Graph, Op
from xbitc.quant.pack import row_bytes as canonical_row_bytes
from xbitc.quant.packed import PackedMatrix, PackedSegment

from .base import Backend, BackendUnavailable, Capabilities, Program
from .llvm import GENERATOR_VERSION, KernelSpec, Target, compile_kernel, emit_object, get_layout
from .llvm.layout import dequantize_reference, interleave_codes, repack, unpack_fast
from .llvm.pool import PoolClosed, SpinPool
from .llvm.rowlane import ROWS_KIND, ROWS_VERSION, RowLaneSpec, q8_scratch_bytes
from .llvm.rowlane import pack as rowlane_pack

log = logging.getLogger("xbitc.backends.x86")

ABI_VERSION = 1  # of the emitted kernels' C interface (argument list and meaning); bump on any change
MIN_TASK_MACS = 1 << 20  # multiply-adds per thread task at least (~50 us of gemv work) on the Python pool
MIN_SPIN_TASK_MACS = 1 << 18  # the same on the spinning pool (~10 us to hand a range to a spinning worker)
ROW_ALIGN = 16  # row ranges start on multiples of this (gemv rows go in pairs, the column kernel's in 16s)
EMIT_TRIPLE = "x86_64-unknown-linux-gnu"
_V3 = "+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+lzcnt,+movbe"
_V4 = _V3 + ",+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512cd"
# (suffix, LLVM cpu, features): the x86-64 micro-architecture levels the artifact carries objects for
EMIT_TARGETS = (
    ("x86_64", "x86-64", ""),
    ("avx2", "x86-64-v3", _V3),
    ("avx512", "x86-64-v4", _V4),
)
HEADER = "xbitc_kernels.h"


class X86BackendUnavailable(BackendUnavailable):
    """The x86 backend was asked to execute on a host that is not x86-64."""


def is_x86_host() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "x64")


# ------------------------------------------------------------------------------------------------ thread pool

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_spin: SpinPool | None = None
POOLS = ("auto", "python", "spin")


def _default_threads() -> int:
    env = os.environ.get("XBITC_NUM_THREADS", "")
    if env.strip().isdigit():
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_num_threads = _default_threads()


def _forget_pools_after_fork() -> None:
    """A forked child inherits the pool objects but not their threads: it builds its own on first use."""
    global _pool, _spin, _pool_lock
    _pool, _spin, _pool_lock = None, None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


def num_threads() -> int:
    """Threads the packed linears use (the caller's thread included)."""
    return _num_threads


def set_num_threads(n: int) -> None:
    """Resize the module's thread pools (default: the cores this process may run on, or $XBITC_NUM_THREADS)."""
    global _num_threads, _pool, _spin
    n = max(1, int(n))
    with _pool_lock:
        if n != _num_threads:
            if _pool is not None:
                _pool.shutdown(wait=True)
                _pool = None
            if _spin:  # (False: it could not be built; try again at the new size)
                _spin.close()
            _spin = None
        _num_threads = n


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_num_threads, thread_name_prefix="xbitc-x86")
        return _pool


def pool_kind() -> str:
    """How row ranges reach other cores: "python" (a ThreadPoolExecutor, ~50 us to wake a worker on this VM, so
    only ranges of >= MIN_TASK_MACS are split off) or "spin" (llvm/pool.py's native workers poll for work and start
    a range in ~10 us, so ranges of >= MIN_SPIN_TASK_MACS are; they spin a few ms after each call, then sleep between
    polls). `$XBITC_X86_POOL` picks; "auto" (default) takes "spin" unless PyTorch's own OpenMP threads busy-wait
    beside it (torch uses more than one thread and OMP_WAIT_POLICY is not PASSIVE): two kinds of spinning workers
    oversubscribe the cores (SmolLM2 decode at two threads: 12.6 ms a step with the Python pool, 120 ms with
    spinning workers beside active OpenMP; with OMP_WAIT_POLICY=PASSIVE, which the `xbitc` command sets, 16.1-17.1
    ms with the Python pool and 12.7-12.9 ms spinning). Read when a model is lowered."""
    kind = _env_choice("XBITC_X86_POOL", POOLS)
    if kind != "auto":
        return kind
    passive = os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"
    return "spin" if passive or torch.get_num_threads() == 1 else "python"


def _get_spin() -> SpinPool | None:
    """The spinning pool of `_num_threads - 1` workers, or None where it cannot be built (then the Python pool)."""
    global _spin
    with _pool_lock:
        if _spin is None:
            try:
                _spin = SpinPool(_num_threads - 1)
            except Exception as err:  # noqa: BLE001 - any LLVM / threading failure: fall back, once
                _log_once(("spin",), logging.WARNING, f"x86: no spinning pool ({type(err).__name__}: {err}); "
                          "row ranges go to a Python thread pool")
                _spin = False
        return _spin or None


LINEAR_KERNELS = ("rows", "segments")


def linear_kernels() -> str:
    """How packed linears run: "rows" (default: the row-lane kernel, one call per matrix) or "segments" (one
    lane-interleaved kernel call per segment); `$XBITC_X86_LINEAR` picks, read when a model is lowered."""
    return _env_choice("XBITC_X86_LINEAR", LINEAR_KERNELS)


def _env_choice(var: str, choices: tuple[str, ...]) -> str:
    """$var if set (one of `choices`), else the first choice."""
    choice = os.environ.get(var, "").strip() or choices[0]
    if choice not in choices:
        raise ValueError(f"{var}={choice!r}: expected one of {', '.join(choices)}")
    return choice


ACTIVATIONS = ("f32", "q8")
GEMM_STACK_BYTES = 256 << 10  # stack the row-lane gemm may use per call (threads have 8 MiB here; see gemm_run)


def activations() -> str:
    """Activations of the row-lane kernel: "f32" (default, exact: equals the reference within float32 rounding) or
    "q8" (each record's x rounded to int8, integer dot products: ~1.6-2.5x the arithmetic throughput, llama.cpp's
    trade); `$XBITC_X86_ACT` picks, read when a model is lowered."""
    return _env_choice("XBITC_X86_ACT", ACTIVATIONS)


def row_ranges(rows: int, macs: int, threads: int | None = None, min_macs: int | None = None) -> list[tuple[int, int]]:
    """Split [0, rows) into at most `threads` ranges of >= min_macs (default MIN_TASK_MACS) work each, starts
    aligned to ROW_ALIGN."""
    threads = _num_threads if threads is None else threads
    n = min(threads, macs // (MIN_TASK_MACS if min_macs is None else min_macs), -(-rows // ROW_ALIGN))
    if n <= 1:
        return [(0, rows)]
    per = -(-(-(-rows // n)) // ROW_ALIGN) * ROW_ALIGN
    return [(b, min(rows, b + per)) for b in range(0, rows, per)]


# ------------------------------------------------------------------------------------------------ kernel choice


# Kernel configuration of this backend: 4-row x 4-token gemm register tiles. Measured on SmolLM2 shapes (3-bit,
# g128, T = 20 / 128 tokens, 1 thread): 20-40% more GMAC/s than the llvm package's default 2 x 4 tile; 6 x 4 and
# 4 x 3 were not better overall. The gemv kernels do not depend on it.
SPEC_KW = {"gemm_rows": 4, "gemm_tokens": 4}


@dataclass(frozen=True)
class KernelPlan:
    """How a segment of (bits, group, ncols) runs: `spec` at `kernel_group` (== group unless regrouped); `how` is
    'interleaved' (fast kernel at the group itself), 'regrouped' (fast kernel at a divisor of the group, scales
    repeated) or 'canonical' (scalar kernel on the canonical stream)."""

    bits: int
    group: int
    spec: KernelSpec
    how: str

    @property
    def kernel_group(self) -> int:
        return self.spec.group_size


# Relative time per padded column of a layout's gemv (il8w8's 8-column lane words take ~1.4x il8w32's per column on
# full rows, measured at 2-4 bits on 576x1536 and 1536x576; on 100-column segments its 64-column blocks pad 2x less
# and it ran 1.2-1.5x faster). A layout is picked by padded columns times this factor.
COLUMN_COST = {"il8w8": 1.4}


def kernel_plan(bits: int, group: int, target: Target, ncols: int | None = None) -> KernelPlan:
    """The kernel for a segment. Among the interleaved layouts the target has (il16w32 with AVX-512, il8w32, il8w8)
    that handle the group, natively or at a divisor G' = gcd(group, block), pick the one with the least padded row
    cost (a row is padded to whole blocks: 576 columns take 768 in il8w32 but 1024 in il16w32, and il8w32 measured
    20-25% faster on such rows; see COLUMN_COST), then native before regrouped, then the larger group, then the
    first listed. None: canonical."""
    wide = target.is_x86 and target.has("avx512f")
    layouts = (["il16w32"] if wide else []) + ["il8w32", "il8w8"]
    best = None
    for pref, name in enumerate(layouts):
        lay = get_layout(name)
        g = group if lay.supports_group(group) else math.gcd(group, lay.block_cols)
        if g % lay.lanes or not lay.supports_group(g):
            continue
        padded = lay.nblocks(ncols) * lay.block_cols if ncols else 0
        score = (padded * COLUMN_COST.get(name, 1.0), g != group, -g, pref)
        if best is None or score < best[0]:
            best = (score, name, g)
    if best is None:
        return KernelPlan(bits, group, KernelSpec(bits, group, layout="canonical", **SPEC_KW), "canonical")
    _, name, g = best
    return KernelPlan(bits, group, KernelSpec(bits, g, layout=name, **SPEC_KW), "interleaved" if g == group else "regrouped")


_logged: set = set()


def _log_once(key: Any, level: int, msg: str) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


# ------------------------------------------------------------------------------------------------ prepared weights


class _Segment:
    """One segment of nonzero depth, ready to run: kernel-layout codes and pointers, or a float fallback."""

    __slots__ = ("start", "stop", "ncols", "kcols", "bits", "plan", "kernel", "codes", "scales", "zeros",
                 "ptrs", "weight", "fns")

    def __init__(self, ps: PackedSegment, out: int, target: Target):
        seg = ps.seg
        self.start, self.stop, self.ncols, self.bits = seg.start, seg.stop, seg.ncols, seg.bits
        self.plan = plan = kernel_plan(seg.bits, seg.group_size, target, seg.ncols)
        self.kcols = seg.ncols  # columns the kernel sees
        if plan.how == "canonical" and seg.group_size >= seg.ncols:
            # One group spans the whole (narrow) segment, e.g. 11 columns at one depth: zero-pad it to the next
            # group width an interleaved kernel has. Padded columns meet zero inputs, so they add nothing.
            for width in (8, 16, 32, 64, 128, 256, 512, 1024):
                wide = kernel_plan(seg.bits, width, target, width)
                if width >= seg.ncols and wide.how == "interleaved":
                    self.plan, plan, self.kcols = wide, wide, width
                    break
        ng = seg.ngroups
        scales = np.ascontiguousarray(ps.scales, dtype=np.float16).reshape(out, ng)
        zeros = unpack_fast(np.asarray(ps.zeros, dtype=np.uint8).reshape(out, -1), seg.bits, ng)
        self.kernel = self.weight = None
        try:
            self.kernel = compile_kernel(plan.spec, target, kinds=("gemv", "gemm"))
        except Exception as err:  # LLVM could not build it: run this segment as the reference does
            _log_once(("reference", seg.bits, seg.group_size), logging.WARNING,
                      f"x86: no kernel for {seg.bits}-bit group {seg.group_size} ({type(err).__name__}: {err}); "
                      "these segments run on the reference float path (dequantized once)")
            self.kcols = seg.ncols
            w = dequantize_reference(ps.codes, scales, zeros, seg.bits, seg.ncols, seg.group_size)
            self.weight = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
            self.codes = self.scales = self.zeros = None
            self.ptrs = ()
            self.fns = ()
            return
        if plan.how == "regrouped":
            r = seg.group_size // plan.kernel_group
            ng2 = -(-seg.ncols // plan.kernel_group)
            scales = np.ascontiguousarray(np.repeat(scales, r, axis=1)[:, :ng2])
            zeros = np.ascontiguousarray(np.repeat(zeros, r, axis=1)[:, :ng2])
            _log_once(("regrouped", seg.bits, seg.group_size), logging.INFO,
                      f"x86: group {seg.group_size} has no interleaved kernel; {seg.bits}-bit segments run the "
                      f"{plan.spec.layout} kernel at group {plan.kernel_group} (scales repeated {r}x, exact)")
        elif plan.how == "canonical":
            _log_once(("canonical", seg.bits, seg.group_size), logging.WARNING,
                      f"x86: group {seg.group_size} has no interleaved kernel; {seg.bits}-bit segments run the "
                      "canonical-layout LLVM kernel (scalar, ~30x slower)")
        if self.kcols > seg.ncols:
            raw = np.asarray(ps.codes, dtype=np.uint8).reshape(out, canonical_row_bytes(seg.ncols, seg.bits))
            codes = np.zeros((out, self.kcols), dtype=np.uint8)
            codes[:, : seg.ncols] = unpack_fast(raw, seg.bits, seg.ncols)
            self.codes = interleave_codes(codes, seg.bits, plan.spec.layout)
        else:
            self.codes = repack(ps.codes, seg.bits, out, seg.ncols, plan.kernel_group, plan.spec.layout)
        self.scales = scales.view(np.uint16)
        self.zeros = np.ascontiguousarray(zeros, dtype=np.uint8)
        self.ptrs = (_ptr(self.codes), _ptr(self.scales), _ptr(self.zeros))
        k = self.kernel
        self.fns = (k.gemv, k.gemv_acc, k.gemm, k.gemm_acc)

    def gather(self, xp: torch.Tensor, whole: bool) -> torch.Tensor:
        """This segment's columns of xp [T, in] (the input already permuted) as a contiguous [T, kcols]."""
        if whole:
            return xp
        xs = xp[:, self.start:self.stop]
        if self.kcols > self.ncols:  # zero-padded narrow segment
            pad = torch.zeros(xp.shape[0], self.kcols, dtype=torch.float32)
            pad[:, : self.ncols] = xs
            return pad
        return xs.contiguous()  # a view (no copy) when T == 1

    def run(self, xs: torch.Tensor, y: torch.Tensor, rb: int, re: int, accumulate: bool) -> None:
        T, out = y.shape
        if self.weight is not None:
            part = xs @ self.weight[rb:re].T
            if accumulate:
                y[:, rb:re] += part
            else:
                y[:, rb:re] = part
            return
        if T == 1:
            self.fns[1 if accumulate else 0](*self.ptrs, xs.data_ptr(), y.data_ptr(), rb, re, self.kcols)
        else:
            self.fns[3 if accumulate else 2](*self.ptrs, xs.data_ptr(), y.data_ptr(), rb, re, self.kcols, T, out)

    @property
    def nbytes(self) -> int:
        if self.weight is not None:
            return int(self.weight.nbytes)
        return int(self.codes.nbytes + self.scales.nbytes + self.zeros.nbytes)


class _RowLane:
    """The whole matrix as row-lane records (backends/llvm/rowlane.py): one kernel call per matrix and token batch,
    vectorised over rows, every segment and depth inside it."""

    def __init__(self, pss: list[PackedSegment], out: int, inp: int, perm: torch.Tensor | None, kernel: Any,
                 act: str):
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
        self.act = act
        self.buf, self.table = rowlane_pack(records, out, act)
        self.table_ptr = _ptr(self.table)  # ~1 us per .ctypes lookup: taken once, not on every call
        self.nrec, self.out, self.inp = len(records), out, inp
        if act == "q8":
            self.q8 = kernel.rows_q8
            self.scratch_per_token = q8_scratch_bytes([r[0].shape[1] for r in records], 1, [r[4] for r in records]) - 64
        else:
            self.gemv, self.gemm = kernel.rows_gemv, kernel.rows_gemm
        # the kernels read int32 indices; gemm's gather (index_select) takes the matrix's int64 tensor
        self.perm32 = None if perm is None else perm.numpy().astype(np.int32)
        self.perm_ptr = None if perm is None else _ptr(self.perm32)
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


def _rows_kernel(target: Target, act: str) -> Any:
    try:
        return compile_kernel(RowLaneSpec(act=act), target, kinds=(ROWS_KIND,))
    except Exception as err:  # then every segment runs on its own lane-interleaved kernel
        _log_once(("rows",), logging.WARNING, f"x86: no row-lane kernel ({type(err).__name__}: {err}); "
                  "segments run one lane-interleaved kernel call each")
        return None


class _Linear:
    def __init__(self, pm: PackedMatrix, target: Target):
        self.out, self.inp = pm.shape
        self.perm = None if pm.perm is None else torch.from_numpy(np.asarray(pm.perm, dtype=np.int64))
        live = [ps for ps in pm.segments if ps.seg.bits and ps.seg.ncols]
        act = activations()
        kernel = _rows_kernel(target, act) if live and linear_kernels() == "rows" else None
        self.rows = _RowLane(live, self.out, self.inp, self.perm, kernel, act) if kernel is not None else None
        self.segs = [] if self.rows is not None else [_Segment(ps, self.out, target) for ps in live]
        self.whole = self.perm is None and len(self.segs) == 1 and self.segs[0].ncols == self.inp
        self.active_cols = sum(ps.seg.ncols for ps in live)
        self.spin = self.rows is not None and pool_kind() == "spin"

    def __call__(self, x: torch.Tensor, lead: tuple = ()) -> torch.Tensor:
        """x: contiguous float32 [*lead, in] -> new float32 [*lead, out] (lead defaults to x's leading dims)."""
        lead = tuple(lead) or tuple(x.shape[:-1])
        T = math.prod(lead)
        segs, rows = self.segs, self.rows
        if (not segs and rows is None) or T == 0:
            return torch.zeros(*lead, self.out, dtype=torch.float32)
        y = torch.empty(*lead, self.out, dtype=torch.float32)
        if rows is not None:
            xin = rows.prepare(x, T)
            work = partial(rows.run, xin, y, T)
        else:
            x2, y2 = x.view(T, self.inp), y.view(T, self.out)
            # one gather by the permutation; segments read contiguous column ranges of it
            xp = x2 if self.perm is None else x2.index_select(1, self.perm)
            xs = [s.gather(xp, self.whole) for s in segs]

            def work(rb: int, re: int) -> None:
                for i, (s, xi) in enumerate(zip(segs, xs)):
                    s.run(xi, y2, rb, re, i > 0)

        if _num_threads == 1:
            work(0, self.out)
            return y
        spin = _get_spin() if self.spin and (T == 1 or rows.act == "q8") else None
        # ranges for this pool's size (set_num_threads may replace the pool meanwhile: then one thread does it all)
        ranges = row_ranges(self.out, self.out * self.active_cols * T,
                            threads=spin.workers + 1 if spin is not None else None,
                            min_macs=MIN_SPIN_TASK_MACS if spin is not None else MIN_TASK_MACS)
        if len(ranges) == 1:
            work(0, self.out)
            return y
        if spin is not None:
            jobs, keep = rows.jobs(xin, y, T, ranges)
            try:
                spin.run(jobs)
            except PoolClosed:
                work(0, self.out)
            del keep  # the scratch lived until every range finished
            return y
        futs = [_get_pool().submit(work, rb, re) for rb, re in ranges[1:]]
        try:
            work(*ranges[0])
        finally:
            for f in futs:  # wait for all before anything can free x / y
                f.exception()
        for f in futs:
            f.result()
        return y

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segs) + (self.rows.nbytes if self.rows is not None else 0)


class X86Linears:
    """The `linear_impl` of a lowered graph: prepared packed weights by name, run through the JIT kernels."""

    def __init__(self, graph: Graph, target: Target):
        self.target = target
        self.linears: dict[str, _Linear] = {}
        by_name = graph.by_name()
        names = []
        for n in graph.nodes:
            if n.op is Op.PACKED_LINEAR:
                name = by_name[n.args[1].name].attrs["name"]
                if name not in names:
                    names.append(name)
        for name in names:
            pm = graph.params[name]
            if isinstance(pm, PackedMatrix):
                self.linears[name] = _Linear(pm, target)

    def plans(self) -> dict[str, list[KernelPlan]]:
        return {n: [s.plan for s in lin.segs] for n, lin in self.linears.items()}

    @property
    def nbytes(self) -> int:
        return sum(lin.nbytes for lin in self.linears.values())

    def __call__(self, x: torch.Tensor, packed: Any, bias: torch.Tensor | None, name: str) -> torch.Tensor:
        lin = self.linears.get(name)
        if lin is None:  # a weight that was not in the graph at lower time (e.g. replaced since)
            lin = self.linears[name] = _Linear(packed, self.target)
        shape = x.shape
        if shape[-1] != lin.inp:
            raise ValueError(f"{name}: input has {shape[-1]} features, the weight {lin.inp}")
        xf = x
        if xf.dtype != torch.float32 or not xf.is_contiguous() or xf.device.type != "cpu":
            xf = xf.to(device="cpu", dtype=torch.float32).contiguous()
        # a decode step makes ~200 of these calls: y is allocated in its final shape and x is passed as it is
        # (contiguous [..., in] is [T, in] in memory), no reshape / view round trips
        y = lin(xf, shape[:-1])
        if bias is not None:
            y += bias
        return y if x.dtype == torch.float32 else y.to(x.dtype)


# ------------------------------------------------------------------------------------------------ emission


def header_text(rows: list[dict]) -> str:
    """The C header declaring every emitted row-lane kernel (the manifest note's entries)."""
    lines = [
        "/* xbitc generated kernels: packed b-bit matrix-vector / matrix-matrix products. Generated file. */",
        "#ifndef XBITC_KERNELS_H",
        "#define XBITC_KERNELS_H",
        "",
        "#include <stdint.h>",
        "",
        f"#define XBITC_KERNELS_ABI_VERSION {ABI_VERSION}",
        f'#define XBITC_KERNELS_GENERATOR "{GENERATOR_VERSION}"',
        f"#define XBITC_ROWS_FORMAT {ROWS_VERSION}",
        "",
        "/*",
        " * Row-lane kernels, what the xbitc Python runtime runs: one call computes a whole packed matrix, every",
        " * segment and depth. y[r] = sum over records of s[r]*(sum_j q[r][j]*x[j]) - s[r]*z[r]*(sum_j x[j]) for rows r",
        " * in [rows_begin, rows_end), rows_begin a multiple of 16; y is written, never read. Disjoint row ranges may run",
        " * on different threads (q8: each with its own scratch).",
        " *   rec   nrec records of 7 int64: kind (1..8 bits packed, 9 one byte per code), ncols, address of the",
        " *         codes, the 16 float16 scales and the 16 uint8 zero points of row block 0, x_offset, stride (bytes",
        " *         between consecutive 16-row blocks). A record is one scale group of one segment.",
        " *   x     float32 input; perm int32 [in] column permutation (NULL = identity): column x_offset + j of a",
        " *         record reads x[perm[x_offset + j]]. gemm reads x already permuted, token t at x + t*ldx, and writes",
        " *         y + t*ldy.",
        " * Codes of a 16-row block, kind b in 1..8, f32: per 32-column block b uint32 words per row (lane l = row l),",
        " * word w holding bits 32w..32w+31 of the row's LSB-first stream of 32 codes; kind 9: [ncols][16] bytes.",
        " * q8 (int8 activations rounded per record as absmax/127, any batch; scratch >= batch*(sum of the records'",
        " * ncols rounded up to 32) + 8*batch*nrec + 64 bytes): codes as bit planes of 1/2/4 bits (3 = 2+1, 5 = 4+1,",
        " * 6 = 4+2, 7 = 4+2+1, 8 = 4+4; a plane of width p is p words per row in which byte i, bits p*s.. hold",
        " * column w*32/p + 4s + i of word w); kinds 1..8 only.",
        " * xbitc.backends.llvm.rowlane.pack builds rec and the buffer from an artifact's segments (weights.safetensors).",
        " * Objects: ELF x86-64 (" + EMIT_TRIPLE + "), position independent, no external references; suffix x86_64 =",
        " * baseline (SSE2), avx2 = x86-64-v3 (AVX2, FMA, F16C), avx512 = x86-64-v4 (AVX-512 F/BW/VL/DQ/CD). Pick one at",
        " * run time, e.g. with __builtin_cpu_supports(\"avx512f\") / (\"avx2\") && (\"fma\").",
        " */",
        "",
        "#ifdef __cplusplus",
        'extern "C" {',
        "#endif",
        "",
        "static inline int xbitc_kernels_abi_version(void) { return XBITC_KERNELS_ABI_VERSION; }",
        "",
    ]
    args = {
        "q8": ("const int64_t* rec, int64_t nrec, const float* x, const int32_t* perm, float* y, int64_t rows_begin, "
               "int64_t rows_end, int64_t batch, int64_t ldx, int64_t ldy, int8_t* scratch"),
        "gemv": ("const int64_t* rec, int64_t nrec, const float* x, const int32_t* perm, float* y, "
                 "int64_t rows_begin, int64_t rows_end"),
        "gemm": ("const int64_t* rec, int64_t nrec, const float* x, float* y, int64_t rows_begin, int64_t rows_end, "
                 "int64_t batch, int64_t ldx, int64_t ldy"),
    }
    for r in rows:
        lines.append(f"/* {r['act']} activations, target {r['target']} ({r['cpu']}), in {r['file']} */")
        for fn in r["functions"]:
            lines.append(f"void {fn}({args[fn.split('_')[2]]});")
        lines.append("")
    lines += ["#ifdef __cplusplus", "}", "#endif", "", "#endif /* XBITC_KERNELS_H */", ""]
    return "\n".join(lines)


def emit_kernels(graph: Graph, folder: Path) -> dict[str, Any]:
    """Write kernels/ (the row-lane objects for every x86-64 level and activation strategy + the C header) when
    the graph has linears; return the manifest note. What is written does not depend on the quantization plan (the
    row-lane kernels take any depth and group), so the size planners count it exactly before they choose depths."""
    if not any(n.op in LINEAR_OPS for n in graph.nodes):
        return {}
    kdir = Path(folder) / "kernels"
    kdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for suffix, cpu, features in EMIT_TARGETS:
        for act in ACTIVATIONS:
            spec = RowLaneSpec(act=act, symbol_suffix=suffix)
            obj = emit_object(EMIT_TRIPLE, cpu, features, spec=spec, use_disk_cache=True)
            base = f"xbitc_rows_{act}_{suffix}"
            (kdir / f"{base}.o").write_bytes(obj)
            rows.append({"name": base, "act": act, "target": suffix, "cpu": cpu, "file": f"kernels/{base}.o",
                         "bytes": len(obj), "functions": list(spec.names())})
    header = header_text(rows)
    (kdir / HEADER).write_text(header)
    return {
        "kernels": {
            "abi_version": ABI_VERSION,
            "generator": GENERATOR_VERSION,
            "rows_format": ROWS_VERSION,
            "triple": EMIT_TRIPLE,
            "header": f"kernels/{HEADER}",
            "bytes": sum(r["bytes"] for r in rows) + len(header.encode()),
            "rows": rows,
        }
    }


# ------------------------------------------------------------------------------------------------ the backend


class X86Backend(Backend):
    name = "x86"

    def capabilities(self) -> Capabilities:
        return Capabilities(bit_depths=tuple(range(1, 9)), group_sizes="any", layouts=("lsb-rows",),
                            executes_here=is_x86_host())

    def lower(self, graph: Graph) -> Program:
        if not is_x86_host():
            raise X86BackendUnavailable(
                f"the x86 backend can't execute on this {platform.machine() or 'unknown'} host: it runs JIT-compiled "
                "x86-64 kernels. Use --backend reference (or runtime.load(path, backend='reference')) here."
            )
        from .llvm import host_target

        return Program(graph, X86Linears(graph, host_target()))

    def emit(self, graph: Graph, folder: Path) -> dict[str, Any]:
        # there are no backend options yet: the x86 backend always ships its kernels
        return emit_kernels(graph, folder)


__all__ = ["X86Backend", "X86Linears", "X86BackendUnavailable", "KernelPlan", "kernel_plan", "set_num_threads",
           "num_threads", "row_ranges", "emit_kernels", "header_text", "is_x86_host", "ABI_VERSION"]
