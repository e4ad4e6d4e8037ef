"""quantize: replace planned weights with QuantizedMatrix values (RTN here; GPTQ in its own module).

Reads the per-tensor configuration that `plan` (or a later allocator) left in ctx.stats["plan"]
(name -> {"bits": int or per-column depths, "group": int}). Linears become
QLINEAR nodes; embedding tables keep their EMBED node and are dequantized on lookup.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from xbitc.ir.graph import Graph, Op
from xbitc.quant.format import QuantizedMatrix
from xbitc.quant.rtn import rtn_any

from .base import Pass, PassContext, PassError
from .tune import FLOAT_PARAMS

METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class Quantize(Pass):
    name = "quantize"
    requires = frozenset({"planned"})
    provides = frozenset({"quantized"})
    method: str = "rtn"
    damp: float = 0.01  # GPTQ: relative dampening of the Hessian diagonal
    act_order: bool = True  # GPTQ: process columns by decreasing Hessian diagonal
    clip: bool = True  # search each group's range for the least squared error (xbitc.quant.grid)

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if self.method not in METHODS:
            raise PassError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        plan = ctx.stats.get("plan") or {}
        # the float weights about to be replaced: `tune` compares against them (pack drops them)
        ctx.stats[FLOAT_PARAMS] = {name: compact(graph.params[name]) for name in plan}
        if self.method == "gptq":
            from .gptq import quantize_gptq

            quantize_gptq(graph, ctx, plan, damp=self.damp, act_order=self.act_order, clip=self.clip)
        else:
            for name in tqdm(list(plan), desc="quantize rtn", leave=False, disable=not ctx.stats.get("progress", True)):
                cfg = plan[name]
                w = graph.params[name]
                graph.params[name] = rtn_any(w, cfg["bits"], cfg["group"] or w.shape[1], clip=self.clip)
        mark_quantized_linears(graph)
        return graph


def compact(w: torch.Tensor) -> torch.Tensor:
    """`w` in the narrowest float dtype that holds it exactly (float32 weights read from float16 or bfloat16
    checkpoints take half the memory while the compile keeps them)."""
    for dtype in (torch.float16, torch.bfloat16):
        narrow = w.to(dtype)
        if torch.equal(narrow.to(w.dtype), w):
            return narrow
    return w


def mark_quantized_linears(graph: Graph) -> None:
    by_name = graph.by_name()
    for n in graph.nodes:
        if n.op is Op.LINEAR and isinstance(graph.params[by_name[n.args[1].name].attrs["name"]], QuantizedMatrix):
            n.op = Op.QLINEAR
