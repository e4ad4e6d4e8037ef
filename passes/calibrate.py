"""calibrate: run calibration batches through the float graph and record each linear's input statistics.

Records, per weight, the Hessian proxy H = 2/N * sum x x^T over all N calibration tokens (float32 per batch,
float64 across batches, stored float32) and the token count. Batches stream through one at a time, so memory is one batch's activations
plus the [in, in] matrices. Under torchrun each process runs its share of the batches and the sums and counts are
added over all processes before normalising (xbitc.distributed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from xbitc import distributed
from xbitc.ir.graph import Graph
from xbitc.ir.interp import Interpreter

from .base import Pass, PassContext, PassError


@dataclass(frozen=True)
class Calibrate(Pass):
    name = "calibrate"
    provides = frozenset({"calibrated"})

    needs_calibration = True

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if not ctx.calib_inputs:
            raise PassError("calibrate needs calibration inputs (--calib FILE or --calib self)")
        interp = Interpreter(graph)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def hook(node, x):
            name = interp.param_name(node)
            flat = x.reshape(-1, x.shape[-1]).float()
            sums[name] = sums.get(name, 0) + (flat.T @ flat).double()  # float32 per batch, float64 across
            counts[name] = counts.get(name, 0) + flat.shape[0]

        batches = distributed.my_share(ctx.calib_inputs)
        if not batches:
            raise PassError(too_few_batches(len(ctx.calib_inputs)))
        for batch in tqdm(batches, desc="calibrate", leave=False, disable=not ctx.stats.get("progress", True)):
            interp.run(*batch, hook=hook)
        for name in sums:  # every rank ran the same graph, so the names come in the same order
            distributed.all_reduce_sum(sums[name])
            counts[name] = distributed.sum_over_ranks(counts[name])
        ctx.stats["hessian"] = {k: (2.0 / counts[k] * s).float() for k, s in sums.items()}
        ctx.stats["calib_tokens"] = max(counts.values(), default=0)
        return graph


def too_few_batches(n: int) -> str:
    return (f"{n} calibration batches for {distributed.world_size()} processes: every process needs one; give "
            f"--calib-windows {distributed.world_size()} or more, or start fewer processes")
