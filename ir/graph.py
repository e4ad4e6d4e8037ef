"""The graph: an ordered SSA list of nodes; parameters live by name in `graph.params`.

Every node's semantics is its op; ops the compiler understands (linears, embeddings, norms, ...) are named in `Op`,
and everything else is a TORCH_OP naming the aten operator that executes it, so any traced model still runs.
Parameters are plain float tensors until quantization replaces them with a `QuantizedMatrix` and packing with a
`PackedMatrix`; nodes refer to them by name, so tied weights (one matrix used by the embedding and the output layer)
stay one stored tensor.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Iterator


class Op(str, enum.Enum):
    INPUT = "input"
    PARAM = "param"
    OUTPUT = "output"
    LINEAR = "linear"  # y = x W^T + b, W a float parameter
    QLINEAR = "qlinear"  # W a QuantizedMatrix (codes not yet packed)
    PACKED_LINEAR = "packed_linear"  # W a PackedMatrix: what backends lower to kernels
    EMBED = "embed"  # rows of a (possibly quantized) table
    MATMUL = "matmul"
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    NEG = "neg"
    SILU = "silu"
    GELU = "gelu"
    SOFTMAX = "softmax"
    RMSNORM = "rmsnorm"
    LAYERNORM = "layernorm"
    ATTENTION = "attention"
    RESHAPE = "reshape"
    PERMUTE = "permute"
    TORCH_OP = "torch_op"  # any other aten / python operator, executed by name
    FUSED = "fused"  # made when a Program is built (ir/fuse.py): attrs["kernel"] names a function in ir.fuse.KERNELS


LINEAR_OPS = frozenset({Op.LINEAR, Op.QLINEAR, Op.PACKED_LINEAR})
WEIGHTED_OPS = LINEAR_OPS | {Op.EMBED}
ELEMENTWISE_OPS = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG, Op.SILU, Op.GELU})
# Ops whose semantics is the aten operator recorded in attrs["target"].
TARGET_OPS = ELEMENTWISE_OPS | {Op.MATMUL, Op.SOFTMAX, Op.LAYERNORM, Op.ATTENTION, Op.RESHAPE, Op.PERMUTE, Op.TORCH_OP}


@dataclass(frozen=True)
class Ref:
    """A use of another node's value inside args."""

    name: str


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int | str, ...]  # str entries are symbolic sizes, e.g. "s0"
    dtype: str

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"


@dataclass
class Node:
    name: str
    op: Op
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    type: TensorType | None = None

    def refs(self) -> Iterator[str]:
        """Names of the nodes this node reads, in argument order."""
        yield from _refs(self.args)
        yield from _refs(tuple(self.kwargs.values()))


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, Ref):
        yield value.name
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _refs(v)


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)  # name -> torch.Tensor | QuantizedMatrix | PackedMatrix
    meta: dict[str, Any] = field(default_factory=dict)
    # a language model's cached decode step over the same parameters (xbitc.stepgraph), stored beside the graph
    step: Graph | None = None
    # node -> "file:line" of the model code that made it, as tracing saw it (for messages; never stored)
    sources: dict[str, str] = field(default_factory=dict, repr=False)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def inputs(self) -> list[Node]:
        return [n for n in self.nodes if n.op is Op.INPUT]

    def output(self) -> Node:
        return next(n for n in self.nodes if n.op is Op.OUTPUT)

    def find(self, *ops: Op) -> list[Node]:
        return [n for n in self.nodes if n.op in ops]

    def param_of(self, node: Node, index: int = 1) -> str:
        """Name of the parameter that argument `index` of a weighted node reads."""
        ref = node.args[index]
        return self.node(ref.name).attrs["name"]

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for r in n.refs():
                out.setdefault(r, []).append(n)
        return out

    def source_param_count(self) -> int:
        return int(self.meta.get("source_param_count", 0))
