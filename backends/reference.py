"""reference: runs packed linears by unpacking to float32 once per weight. The oracle for every other backend."""
from __future__ import annotations

from xbitc.ir.graph import Graph

from .base import Backend, Capabilities, Program


class ReferenceBackend(Backend):
    name = "reference"

    def capabilities(self) -> Capabilities:
        return Capabilities(bit_depths=tuple(range(0, 9)))

    def lower(self, graph: Graph) -> Program:
        return Program(graph)  # the interpreter dequantizes packed weights on first use and caches them
