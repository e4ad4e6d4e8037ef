"""quantize: replace planned weights with QuantizedMatrix values (RTN here; GPTQ in its own module).

Reads the per-tensor configuration that `plan` (or a later allocator) left in ctx.stats["plan"]
(name -> {"bits": int or per-column depths, "group": int}). Linears become
QLINEAR nodes; embedding tables keep their EMBED node and are dequantized on lookup.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from xbitc import distributed
from xbitc.lazy import LazyWeight
from xbitc.ir.graph import Graph, Op
from xbitc.quant.format import QuantizedMatrix
from xbitc.quant.gptq import DEPTH_ORDERS
from xbitc.quant.rtn import rtn_any

from .base import Pass, PassContext, PassError, option
from .tune import FLOAT_PARAMS, Tune

METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class Quantize(Pass):
    name = "quantize"
    requires = frozenset({"planned"})
    provides = frozenset({"quantized"})
    method: str = "rtn"
    damp: float = option(0.01, 0.0, 1.0)  # GPTQ: relative dampening of the Hessian diagonal
    act_order: bool = True  # GPTQ: process columns by decreasing Hessian diagonal
    clip: bool = True  # search each group's range for the least squared error (xbitc.quant.grid)
    order: str = "ascending"  # GPTQ: depth order of the columns (xbitc.quant.gptq.DEPTH_ORDERS); see README

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PassError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.order not in DEPTH_ORDERS:
            raise PassError(f"unknown column order {self.order!r}; choose one of {', '.join(DEPTH_ORDERS)}")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        plan = ctx.stats.get("plan") or {}
        tuned = any(isinstance(p, Tune) and p.steps > 0 for p in ctx.pipeline)
        if tuned:
            # the float weights about to be replaced: `tune` compares against them (and drops them)
            ctx.stats[FLOAT_PARAMS] = {name: compact(graph.params[name]) for name in plan}
        if self.method == "gptq":
            from .gptq import quantize_gptq

            quantize_gptq(graph, ctx, plan, damp=self.damp, act_order=self.act_order, clip=self.clip,
                          depth_order=self.order, pack=not tuned)
        else:
            names = list(plan)  # under torchrun each rank quantizes its share and sends it to the others
            bar = tqdm(total=len(distributed.my_share(names)), desc="quantize rtn", leave=False,
                       disable=not ctx.stats.get("progress", True))

            def quantize(name: str) -> QuantizedMatrix:
                cfg, w = plan[name], graph.params[name]
                bar.update(1)
                return rtn_any(w, cfg["bits"], cfg["group"] or w.shape[1], clip=self.clip)

            graph.params.update(distributed.map_matrices(names, quantize))
            bar.close()
        mark_quantized_linears(graph)
        return graph


def compact(w: torch.Tensor | LazyWeight) -> torch.Tensor | LazyWeight:
    """`w` as kept for the tuner's reference: float16 unless that loses range (|w| > 65504). Rounding to float16 moves a
    normal weight by at most 2^-11 of itself (and one below 2^-14 by less than 2^-24), orders of magnitude under the
    quantization error the tuner corrects, and halves what the compile holds (float32 copies were its peak). A weight
    still in its file stays there: the tuner reads it again at each use."""
    if isinstance(w, LazyWeight) or not w.is_floating_point() or w.dtype == torch.float16:
        return w
    narrow = w.to(torch.float16)
    return narrow if bool(torch.isfinite(narrow).all()) else w


def mark_quantized_linears(graph: Graph) -> None:
    by_name = graph.by_name()
    for n in graph.nodes:
        if n.op is Op.LINEAR and isinstance(graph.params[by_name[n.args[1].name].attrs["name"]], QuantizedMatrix):
            n.op = Op.QLINEAR
