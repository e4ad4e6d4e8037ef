"""`CpuBackend`: a backend that is one entry of the CPU target table (targets.py) put together with the
target-neutral CPU pieces: lowering keeps the reference interpreter for every op except PACKED_LINEAR, whose
`linear_impl` is a `CpuLinears` for the host (linears.py: row-lane kernels by default, threads from threads.py), and
`emit` writes `kernels/` into the artifact (emit.py: one object per activation strategy and level of the family,
plus the C header). A backend for another ISA is a subclass naming its family (backends/x86.py, backends/arm.py)."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from xbitc.ir.graph import Graph

from ..base import Backend, BackendUnavailable, Capabilities, Program
from .emit import emit_kernels
from .linears import CpuLinears
from .targets import CpuFamily


class CpuBackendUnavailable(BackendUnavailable):
    """A CPU backend was asked to execute on a host of another ISA."""


class CpuBackend(Backend):
    family: CpuFamily  # what it emits objects for and which hosts run it
    unavailable = CpuBackendUnavailable

    def capabilities(self) -> Capabilities:
        return Capabilities(bit_depths=tuple(range(1, 9)), group_sizes="any", layouts=("lsb-rows",),
                            executes_here=self.family.runs_here())

    def lower(self, graph: Graph) -> Program:
        if not self.family.runs_here():
            raise self.unavailable(
                f"the {self.name} backend can't execute on this {platform.machine() or 'unknown'} host: it runs "
                f"JIT-compiled {self.family.name} kernels. Use --backend reference (or runtime.load(path, "
                "backend='reference')) here."
            )
        from ..llvm import host_target

        return Program(graph, CpuLinears(graph, host_target()))

    def emit(self, graph: Graph, folder: Path) -> dict[str, Any]:
        # there are no backend options yet: a CPU backend always ships its kernels
        return emit_kernels(graph, folder, self.family)
