"""xbitc's graph IR: typed nodes, weights by name beside the graph, verifier, printer, JSON form, interpreter."""
from .graph import Graph, Node, Op, Ref, TensorType
from .verify import VerifyError, verify

__all__ = ["Graph", "Node", "Op", "Ref", "TensorType", "VerifyError", "verify"]
