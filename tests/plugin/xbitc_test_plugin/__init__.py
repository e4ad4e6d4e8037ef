"""A third-party pass and backend, as a plugin author would publish them."""
from __future__ import annotations

from dataclasses import dataclass

from xbitc.backends.base import Backend, Program
from xbitc.ir.graph import LINEAR_OPS
from xbitc.passes.base import Pass


@dataclass(frozen=True)
class CountLinears(Pass):
    """Records how many linear nodes the graph has (and refuses graphs with fewer than `at_least`)."""

    name = "count-linears"
    at_least: int = 0

    def run(self, graph, ctx):
        n = sum(1 for node in graph.nodes if node.op in LINEAR_OPS)
        if n < self.at_least:
            raise ValueError(f"expected at least {self.at_least} linears, found {n}")
        graph.meta["linear_count"] = n
        return graph


class TracedReferenceBackend(Backend):
    """The reference semantics, but packed linears go through this backend's own code and are counted."""

    name = "traced-reference"
    calls = 0

    def lower(self, graph):
        import torch.nn.functional as F

        def linear(x, packed, bias, name):
            TracedReferenceBackend.calls += 1
            return F.linear(x, packed.dequantize(), bias)

        return Program(graph, linear)
