"""Sequential GPTQ over the whole graph: every linear is quantized from the inputs it receives when all the linears
before it are already quantized (the paper's protocol), in one pass over the calibration data.

One interpreter generator per calibration batch runs in lock-step: each stops before every linear and hands over its
input; once all batches stand at the same linear, its Hessian H = 2/N sum x x^T is formed, the weight is quantized,
and the batches continue through the now-quantized layer. Memory is the live activations of the batches plus one
[in, in] Hessian; no layer inputs are cached on disk, and no model-specific block structure is assumed. The linears
that read the same input (q/k/v, gate/up) share one Hessian and are quantized together when the first is reached.
A graph whose weights are still in their files (xbitc.lazy) is quantized the same way one layer block at a time
(xbitc.streaming), which gives the same matrices.

Under torchrun each process drives its share of the batches; each Hessian's sum and token count are added over all
processes, the linears of a shared input are quantized on different ranks (the i-th on rank i % N) and sent to every
rank (xbitc.distributed), and all continue through the same quantized layers.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from xbitc import distributed, lazy
from xbitc.ir.graph import LINEAR_OPS, Graph
from xbitc.ir.interp import Interpreter
from xbitc.quant.format import QuantizedMatrix
from xbitc.quant.gptq import BLOCK_ROWS, gptq_quantize
from xbitc.quant.packed import PackedMatrix
from xbitc.quant.rtn import rtn_any

from .base import PassContext, PassError
from .calibrate import too_few_batches


def quantize_gptq(
    graph: Graph, ctx: PassContext, plan: dict, damp: float = 0.01, act_order: bool = True, clip: bool = True,
    depth_order: str = "ascending", pack: bool = True,
) -> None:
    """`pack`: a lazy graph's finished weights go to the scratch file packed (nothing changes them after), else as
    QuantizedMatrix for a tune pass to train their scales."""
    if not ctx.calib_inputs:
        raise PassError("GPTQ needs calibration inputs (--calib FILE or --calib self)")
    batches = distributed.my_share(ctx.calib_inputs)
    if not batches:
        raise PassError(too_few_batches(len(ctx.calib_inputs)))
    options = {"damp": damp, "act_order": act_order, "clip": clip, "depth_order": depth_order}
    bar = tqdm(total=len(plan), desc="quantize gptq", leave=False, disable=not ctx.stats.get("progress", True))
    if lazy.is_lazy(graph):  # weights still in their files: one layer block at a time (xbitc.streaming)
        from xbitc import streaming

        streaming.quantize_blocks(graph, batches, plan, options, bar, ctx.stats.get("scratch"), pack)
    else:
        pending, _ = sequential(graph, batches, plan, options, bar)
        rtn_rest(graph, sorted(pending), plan, clip, bar)
    bar.close()
    assert all(isinstance(graph.params[n], (QuantizedMatrix, PackedMatrix)) for n in plan)


def sequential(graph: Graph, batches: list[tuple], plan: dict, options: dict, bar: tqdm,
               outputs: bool = False) -> tuple[set[str], list | None]:
    """GPTQ the weights of `plan` that `graph`'s linears read, in execution order, from `batches` (this rank's)
    driven in lock-step. Returns the planned weights of the graph no linear read, and with `outputs` each batch's
    output of the quantized graph (without, the run stops once the last planned weight is done)."""
    interp = Interpreter(graph)
    readers: dict[str, list[str]] = {}  # input node -> the weights of the linears reading it, in graph order
    for n in graph.nodes:
        if n.op in LINEAR_OPS and interp.param_name(n) not in readers.setdefault(n.args[0].name, []):
            readers[n.args[0].name].append(interp.param_name(n))
    steps = [interp.steps(*batch) for batch in batches]
    items = [next(s) for s in steps]
    pending = set(plan) & set(graph.params)
    while items[0][0] == "linear":
        node = items[0][1]
        if any(it[1] is not node for it in items):
            raise PassError("calibration batches took different paths through the graph; GPTQ needs a static graph")
        if interp.param_name(node) in pending:
            group = [n for n in readers[node.args[0].name] if n in pending]
            hessian = _hessian([it[2] for it in items], int(graph.params[group[0]].shape[1])).float()

            def quantize(name: str) -> QuantizedMatrix:
                cfg, w = plan[name], graph.params[name]
                return gptq_quantize(w.float(), hessian, depths(cfg["bits"]), cfg["group"] or w.shape[1], **options)

            done = distributed.map_matrices(group, quantize)
            for name in group:
                graph.params[name] = done[name]
                interp.forget(name)
                pending.discard(name)
                bar.update(1)
        if not pending and not outputs:
            break  # every planned weight is done: skip the rest of the forward (the logits are not needed)
        items = [s.send(None) for s in steps]
    for s in steps:
        s.close()
    return pending, [it[1] for it in items] if outputs else None


def rtn_rest(graph: Graph, names: list[str], plan: dict, clip: bool, bar: tqdm) -> None:
    """Tables only read by embeddings never pass through a linear; their inputs are one-hot, so RTN is GPTQ here."""
    done = distributed.map_matrices(names, lambda n: rtn_any(graph.params[n], plan[n]["bits"],
                                                             plan[n]["group"] or graph.params[n].shape[1], clip=clip))
    for name in names:
        graph.params[name] = done[name]
        bar.update(1)


def _hessian(inputs: list[torch.Tensor], width: int) -> torch.Tensor:
    """H = 2/N sum x x^T over the tokens of every rank's batches: float32 products per batch, summed in float64.
    H is symmetric, so only the blocks on and above the diagonal are multiplied (58-70% of the products for this
    project's widths) and the rest mirrored once at the end. Each product is made and added a block of rows at a
    time, so no [width, width] temporary exists beside the sum (adding a float32 matrix to a float64 one makes a
    float64 copy of it first)."""
    hessian = torch.zeros(width, width, dtype=torch.float64)
    tokens = 0
    for x in inputs:
        x = x.reshape(-1, x.shape[-1]).float()
        for r0 in range(0, width, BLOCK_ROWS):
            r1 = min(r0 + BLOCK_ROWS, width)
            hessian[r0:r1, r0:] += x[:, r0:r1].T @ x[:, r0:]
        tokens += x.shape[0]
    for r0 in range(BLOCK_ROWS, width, BLOCK_ROWS):  # the lower blocks from the upper ones
        hessian[r0:r0 + BLOCK_ROWS, :r0] = hessian[:r0, r0:r0 + BLOCK_ROWS].T
    distributed.all_reduce_sum(hessian)
    hessian *= 2.0 / distributed.sum_over_ranks(tokens)
    return hessian


def depths(bits):
    """A plan's depth: one int for the whole tensor, or a list of per-column depths."""
    return bits if isinstance(bits, int) else np.asarray(bits, dtype=np.int64)
