"""One segment of a packed matrix run by its own lane-interleaved kernel (`$XBITC_X86_LINEAR=segments`), and the
choice of that kernel (`kernel_plan`).

At lower time each segment of nonzero depth gets its codes repacked from the canonical "lsb-rows" stream into the
kernel layout, its zero points unpacked to uint8 [out, ngroups] and its scales made a contiguous float16 array; its
(bits, group, layout) kernel is compiled or fetched from the disk cache (gemv and gemm, so nothing compiles at call
time). At call time the first executed segment of a matrix writes y (`gemv` / `gemm`), the others accumulate
(`*_acc`).

Group sizes. The fast (lane-interleaved) kernels need `G % lanes == 0` and `G | block` or `block | G`. For other
group sizes (e.g. per-channel groups of 576 or 160 columns) the segment is run exactly by a fast kernel at the
largest group size G' dividing G that the layouts support (G' = gcd(G, block), scales and zero points repeated
G/G' times in memory: same arithmetic, more scale reads); failing that by the llvm package's canonical-layout
kernel (scalar, ~30x slower); failing that (LLVM could not build the kernel) by the reference float path
(dequantize once, matmul). Each fallback is logged once per (bits, group).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from xbitc.quant.pack import row_bytes as canonical_row_bytes
from xbitc.quant.packed import PackedSegment

from ..llvm import KernelSpec, Target, compile_kernel, get_layout
from ..llvm.layout import dequantize_reference, interleave_codes, repack, unpack_fast
from . import log_once

# Kernel configuration of the CPU backends: 4-row x 4-token gemm register tiles. Measured on SmolLM2 shapes (3-bit,
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
    wide = target.is_x86 and target.has("avx512f")  # as llvm's default_spec: 512-bit lanes where they exist
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


class InterleavedSegment:
    """One segment of nonzero depth, ready to run: kernel-layout codes and pointers, or a float fallback."""

    __slots__ = ("start", "stop", "ncols", "kcols", "bits", "plan", "kernel", "codes", "scales", "zeros",
                 "ptrs", "weight", "fns")

    def __init__(self, ps: PackedSegment, out: int, target: Target):
        seg = ps.seg
        arch = target.triple.split("-")[0]  # names the target in fallback messages
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
            log_once(("reference", seg.bits, seg.group_size), logging.WARNING,
                     f"{arch}: no kernel for {seg.bits}-bit group {seg.group_size} ({type(err).__name__}: {err}); "
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
            log_once(("regrouped", seg.bits, seg.group_size), logging.INFO,
                     f"{arch}: group {seg.group_size} has no interleaved kernel; {seg.bits}-bit segments run the "
                     f"{plan.spec.layout} kernel at group {plan.kernel_group} (scales repeated {r}x, exact)")
        elif plan.how == "canonical":
            log_once(("canonical", seg.bits, seg.group_size), logging.WARNING,
                     f"{arch}: group {seg.group_size} has no interleaved kernel; {seg.bits}-bit segments run the "
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
        self.ptrs = (self.codes.ctypes.data, self.scales.ctypes.data, self.zeros.ctypes.data)
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
