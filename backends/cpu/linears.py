"""`CpuLinears`: the `linear_impl` of a graph lowered by a CPU backend. Every packed matrix read by a PACKED_LINEAR
node is prepared once at lower time (cached per weight name) and each call runs it through the generated kernels.

By default (`$XBITC_X86_LINEAR=rows`) a matrix is one `RowLaneMatrix` (rows.py: one kernel call over the whole
matrix, `$XBITC_X86_ACT=q8` for int8 activations); `segments` runs one `InterleavedSegment` per segment
(segments.py): x [..., in] float32 is flattened to [T, in] (a view), gathered once by the permutation into
contiguous per-segment blocks (no copy for unpermuted single-segment weights), and each segment's kernel runs over
its column slice into the same y; 0-bit segments are skipped; bias is added at the end. One token uses the gemv
kernels, several the gemm kernels. Rows are split into ranges over threads.py's pools.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np
import torch

from xbitc.ir.graph import Graph, Op
from xbitc.quant.packed import PackedMatrix

from ..llvm import Target
from ..llvm.pool import PoolClosed
from . import env_choice, threads
from .rows import RowLaneMatrix, rows_kernel
from .segments import InterleavedSegment, KernelPlan
from .threads import get_pool, get_spin, num_threads, row_ranges  # bound once: ~200 calls a decode step

LINEAR_KERNELS = ("rows", "segments")
ACTIVATIONS = ("f32", "q8")


def linear_kernels() -> str:
    """How packed linears run: "rows" (default: the row-lane kernel, one call per matrix) or "segments" (one
    lane-interleaved kernel call per segment); `$XBITC_X86_LINEAR` picks, read when a model is lowered."""
    return env_choice("XBITC_X86_LINEAR", LINEAR_KERNELS)


def activations() -> str:
    """Activations of the row-lane kernel: "f32" (default, exact: equals the reference within float32 rounding) or
    "q8" (each record's x rounded to int8, integer dot products: ~1.6-2.5x the arithmetic throughput, llama.cpp's
    trade); `$XBITC_X86_ACT` picks, read when a model is lowered."""
    return env_choice("XBITC_X86_ACT", ACTIVATIONS)


class _Linear:
    """One packed matrix, prepared: a row-lane matrix, or its segments where the row-lane kernel is not used."""

    def __init__(self, pm: PackedMatrix, target: Target):
        self.out, self.inp = pm.shape
        self.perm = None if pm.perm is None else torch.from_numpy(np.asarray(pm.perm, dtype=np.int64))
        live = [ps for ps in pm.segments if ps.seg.bits and ps.seg.ncols]
        act = activations()
        kernel = rows_kernel(target, act) if live and linear_kernels() == "rows" else None
        self.rows = RowLaneMatrix(live, self.out, self.inp, self.perm, kernel, act) if kernel is not None else None
        self.segs = [] if self.rows is not None else [InterleavedSegment(ps, self.out, target) for ps in live]
        self.whole = self.perm is None and len(self.segs) == 1 and self.segs[0].ncols == self.inp
        self.active_cols = sum(ps.seg.ncols for ps in live)
        self.spin = self.rows is not None and threads.pool_kind() == "spin"

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

        if num_threads() == 1:
            work(0, self.out)
            return y
        spin = get_spin() if self.spin and (T == 1 or rows.act == "q8") else None
        # ranges for this pool's size (set_num_threads may replace the pool meanwhile: then one thread does it all)
        ranges = row_ranges(self.out, self.out * self.active_cols * T,
                            threads=spin.workers + 1 if spin is not None else None,
                            min_macs=threads.MIN_SPIN_TASK_MACS if spin is not None else threads.MIN_TASK_MACS)
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
        futs = [get_pool().submit(work, rb, re) for rb, re in ranges[1:]]
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


class CpuLinears:
    """The `linear_impl` of a lowered graph: prepared packed weights by name, run through the kernels JIT-compiled
    for `target` (the host)."""

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
