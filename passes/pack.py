"""pack: bit-pack every QuantizedMatrix into the artifact layout and store float parameters at their dtype.

QLINEAR nodes become PACKED_LINEAR (what backends lower to kernels). Float *parameters* are stored at the
model's float dtype (float16 by default, counted in the budget); buffers such as rotary frequencies keep theirs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from xbitc.ir.graph import Graph, Op
from xbitc.quant.format import QuantizedMatrix
from xbitc.quant.packed import PackedMatrix
from xbitc.spill import Spill, in_scratch, page_out

from .base import Pass, PassContext

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Pack(Pass):
    name = "pack"
    provides = frozenset({"packed"})

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        dtype = stored_dtype(graph)
        kinds = graph.meta.get("param_kinds", {})
        spill = None  # what a block-wise compile left in its scratch file (xbitc.streaming) goes back there packed
        for name, value in list(graph.params.items()):
            if isinstance(value, QuantizedMatrix):
                packed = PackedMatrix.from_quantized(value)
                if any(in_scratch(c) for c in value.codes):
                    spill = spill or Spill(ctx.stats.get("scratch"))
                    packed = spill.packed(packed)
                    for a in [*value.codes, *value.zeros]:
                        page_out(a)
                graph.params[name] = packed
            elif isinstance(value, torch.Tensor) and value.is_floating_point() and kinds.get(name, "parameter") == "parameter":
                stored = value.to(dtype)
                if in_scratch(value):
                    spill = spill or Spill(ctx.stats.get("scratch"))
                    stored = spill.tensor(stored)
                graph.params[name] = stored
        if spill is not None:
            spill.close()
        for n in graph.nodes:
            if n.op is Op.QLINEAR:
                n.op = Op.PACKED_LINEAR
        return graph


def stored_dtype(graph: Graph) -> torch.dtype:
    """The dtype float parameters are stored at (the model's `float_dtype`, float16 by default)."""
    return DTYPES[graph.meta.get("float_dtype", "float16")]
