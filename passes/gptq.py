"""Sequential GPTQ over the whole graph: every linear is quantized from the inputs it receives when all the linears
before it are already quantized (the paper's protocol), in one pass over the calibration data.

One interpreter generator per calibration batch runs in lock-step: each stops before every linear and hands over its
input; once all batches stand at the same linear, its Hessian H = 2/N sum x x^T is formed, the weight is quantized,
and the batches continue through the now-quantized layer. Memory is the live activations of the batches plus one
[in, in] Hessian; no layer inputs are cached on disk, and no model-specific block structure is assumed.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from xbitc.ir.graph import Graph
from xbitc.ir.interp import Interpreter
from xbitc.quant.format import QuantizedMatrix
from xbitc.quant.gptq import gptq_quantize
from xbitc.quant.rtn import rtn_any

from .base import PassContext, PassError


def quantize_gptq(
    graph: Graph, ctx: PassContext, plan: dict, damp: float = 0.01, act_order: bool = True, clip: bool = True,
    depth_order: str = "ascending",
) -> None:
    if not ctx.calib_inputs:
        raise PassError("GPTQ needs calibration inputs (--calib FILE or --calib self)")
    interp = Interpreter(graph)
    steps = [interp.steps(*batch) for batch in ctx.calib_inputs]
    items = [next(s) for s in steps]
    pending = set(plan)
    cached = None  # (input node name, its Hessian)
    bar = tqdm(total=len(plan), desc="quantize gptq", leave=False, disable=not ctx.stats.get("progress", True))
    while pending and items[0][0] == "linear":
        node = items[0][1]
        if any(it[1] is not node for it in items):
            raise PassError("calibration batches took different paths through the graph; GPTQ needs a static graph")
        name = interp.param_name(node)
        if name in pending:
            source = node.args[0].name
            if cached is None or cached[0] != source:  # q/k/v (gate/up) read the same input: one Hessian
                width = int(graph.params[name].shape[1])
                hessian = torch.zeros(width, width, dtype=torch.float64)
                tokens = 0
                for it in items:
                    x = it[2].reshape(-1, it[2].shape[-1]).float()
                    hessian += (x.T @ x).double()  # float32 products per batch, float64 sum across batches
                    tokens += x.shape[0]
                hessian *= 2.0 / tokens
                cached = (source, hessian)
            hessian = cached[1]
            cfg = plan[name]
            w = graph.params[name]
            graph.params[name] = gptq_quantize(
                w.float(), hessian.float(), depths(cfg["bits"]), cfg["group"] or w.shape[1], damp=damp, act_order=act_order,
                clip=clip, depth_order=depth_order,
            )
            interp.forget(name)
            pending.discard(name)
            bar.update(1)
        if not pending:
            break  # every planned weight is done: skip the rest of the forward (the logits are not needed)
        items = [s.send(None) for s in steps]
    for s in steps:
        s.close()
    # Tables only read by embeddings never pass through a linear; their inputs are one-hot, so RTN is GPTQ here.
    for name in sorted(pending):
        cfg = plan[name]
        w = graph.params[name]
        graph.params[name] = rtn_any(w, cfg["bits"], cfg["group"] or w.shape[1], clip=clip)
        bar.update(1)
    bar.close()
    assert all(isinstance(graph.params[n], QuantizedMatrix) for n in plan)



def depths(bits):
    """A plan's depth: one int for the whole tensor, or a list of per-column depths."""
    return bits if isinstance(bits, int) else np.asarray(bits, dtype=np.int64)
