"""canonicalize: drop export's runtime assertions, dead nodes and unused parameters."""
from __future__ import annotations

from dataclasses import dataclass

from xbitc.ir.graph import Graph, Op

from .base import Pass, PassContext

# Checks torch.export inserts that compute nothing the model's outputs depend on.
_ASSERTIONS = {
    "aten._assert_tensor_metadata.default",
    "aten._assert_scalar.default",
    "aten.sym_constrain_range_for_size.default",
    "aten.sym_constrain_range.default",
}


@dataclass(frozen=True)
class Canonicalize(Pass):
    name = "canonicalize"

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        nodes = [n for n in graph.nodes if n.attrs.get("target") not in _ASSERTIONS]
        live: set[str] = set()
        kept = []
        for n in reversed(nodes):  # reverse topological order: a node is live if a live node reads it
            if n.op in (Op.OUTPUT, Op.INPUT) or n.name in live:
                kept.append(n)
                live.update(n.refs())
        kept.reverse()
        used = {n.attrs["name"] for n in kept if n.op is Op.PARAM}
        if graph.step is not None:  # the decode step reads the same parameters (and its own constants)
            used |= {n.attrs["name"] for n in graph.step.nodes if n.op is Op.PARAM}
        removed = len(graph.nodes) - len(kept)
        graph.nodes = kept
        graph.params = {k: v for k, v in graph.params.items() if k in used}
        ctx.log(f"canonicalize: removed {removed} dead or assertion nodes")
        return graph
