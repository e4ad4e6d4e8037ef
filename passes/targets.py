"""Which parameters the compiler quantizes, and what role each plays (linear, embedding, output layer)."""
from __future__ import annotations

from xbitc.ir.graph import LINEAR_OPS, Graph, Op


def weight_roles(graph: Graph) -> dict[str, str]:
    """Map quantizable parameter name -> 'linear' | 'embedding' | 'output'.

    The output layer is the last linear of a language model; a weight read by an EMBED node is an embedding, even
    when the output layer shares it (tied weights are one tensor and are quantized once).
    """
    by_name = graph.by_name()
    roles: dict[str, str] = {}
    linears = [n for n in graph.nodes if n.op in LINEAR_OPS]
    for n in linears:
        roles[by_name[n.args[1].name].attrs["name"]] = "linear"
    if graph.meta.get("kind") == "causal-lm" and linears:
        roles[by_name[linears[-1].args[1].name].attrs["name"]] = "output"
    for n in graph.find(Op.EMBED):
        roles[by_name[n.args[1].name].attrs["name"]] = "embedding"
    return roles


def quantizable(graph: Graph, include_embeddings: bool) -> dict[str, str]:
    roles = weight_roles(graph)
    return {k: r for k, r in roles.items() if include_embeddings or r == "linear"}
