"""calibrate: run calibration batches through the float graph and record each linear's input statistics.

Records, per weight, the Hessian proxy H = 2/N * sum x x^T over all N calibration tokens (float32 per batch,
float64 across batches, stored float32) and the token count. Batches stream through one at a time, so memory is one batch's activations
plus the [in, in] matrices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

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

        for batch in tqdm(ctx.calib_inputs, desc="calibrate", leave=False, disable=not ctx.stats.get("progress", True)):
            interp.run(*batch, hook=hook)
        ctx.stats["hessian"] = {k: (2.0 / counts[k] * s).float() for k, s in sums.items()}
        ctx.stats["calib_tokens"] = max(counts.values(), default=0)
        return graph
