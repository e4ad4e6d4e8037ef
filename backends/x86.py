"""x86: packed linears run through the generated LLVM kernels (backends/llvm) on x86-64 hosts.

The x86 backend is the x86-64 entry of the CPU target table (cpu/targets.py) put together with the target-neutral
CPU pieces (backends/cpu): lowering keeps the reference interpreter for every op except PACKED_LINEAR, whose
`linear_impl` is a `CpuLinears` for the host (cpu/linears.py: row-lane kernels by default, threads from
cpu/threads.py); `emit` writes `kernels/` into the artifact (cpu/emit.py): the row-lane kernels as one ELF object per
activation strategy (f32, q8) and x86-64 level (baseline x86-64 / SSE2, x86-64-v3 / AVX2+FMA+F16C, x86-64-v4 /
AVX-512), plus the C header `kernels/xbitc_kernels.h`.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from xbitc.ir.graph import Graph

from .base import Backend, BackendUnavailable, Capabilities, Program
from .cpu.emit import emit_kernels
from .cpu.linears import CpuLinears
from .cpu.targets import X86_64


class X86BackendUnavailable(BackendUnavailable):
    """The x86 backend was asked to execute on a host that is not x86-64."""


def is_x86_host() -> bool:
    return X86_64.runs_here()


class X86Backend(Backend):
    name = "x86"
    family = X86_64  # what it emits objects for and which hosts run it

    def capabilities(self) -> Capabilities:
        return Capabilities(bit_depths=tuple(range(1, 9)), group_sizes="any", layouts=("lsb-rows",),
                            executes_here=self.family.runs_here())

    def lower(self, graph: Graph) -> Program:
        if not self.family.runs_here():
            raise X86BackendUnavailable(
                f"the x86 backend can't execute on this {platform.machine() or 'unknown'} host: it runs JIT-compiled "
                "x86-64 kernels. Use --backend reference (or runtime.load(path, backend='reference')) here."
            )
        from .llvm import host_target

        return Program(graph, CpuLinears(graph, host_target()))

    def emit(self, graph: Graph, folder: Path) -> dict[str, Any]:
        # there are no backend options yet: the x86 backend always ships its kernels
        return emit_kernels(graph, folder, self.family)


__all__ = ["X86Backend", "X86BackendUnavailable", "is_x86_host"]
