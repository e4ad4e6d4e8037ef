"""tune: descend the task cost on the calibration data by moving what quantization left continuous.

After `quantize`, every quantized weight is integer codes and zero points (fixed here) times one float16 scale per
group. The scales, and the model's 1-D float parameters (norm weights, biases), are trained end to end with Adam on
the objective the allocator used (kl: KL to the float model's outputs; ce; mse; or a user's callable), one
calibration batch per step. Nothing stored changes size: the artifact holds the same codes and the same number of
float16 scales, so the budget is untouched. Quantizing layer by layer (GPTQ) only sees each layer's own output
error; this sees how the errors of all layers add up at the model's output, which is what the cost measures.

The first CHECK_BATCHES calibration batches are held out of the steps (when there are enough of them) and judge
the result: if the tuned model is not better on them than the untuned one, the untuned values are kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from xbitc.ir.graph import Graph
from xbitc.ir.interp import Interpreter
from xbitc.objectives import default_objective, resolve_objective, task_loss
from xbitc.quant.format import QuantizedMatrix
from xbitc.quant.packed import PackedMatrix
from xbitc.quant.tune import TunableScales

from .base import Pass, PassContext, PassError
from .pack import stored_dtype

FLOAT_PARAMS = "float_params"  # ctx.stats key: quantize leaves the float weights it replaced here, for tune
CHECK_BATCHES = 2  # calibration batches the before/after comparison runs on


@dataclass(frozen=True)
class Tune(Pass):
    name = "tune"
    requires = frozenset({"quantized"})
    provides = frozenset({"tuned"})
    steps: int = 24
    lr: float = 0.003  # Adam step on log-scales (a relative scale change); cosine decay to 0 over the steps
    objective: str = "auto"  # as allocate's: kl for language models, mse otherwise
    norms: bool = True  # also tune 1-D float parameters (norm weights, biases)

    @property
    def needs_calibration(self) -> bool:
        return self.steps > 0

    def __post_init__(self) -> None:
        if self.steps < 0 or not self.lr > 0:
            raise PassError(f"tune needs steps >= 0 and lr > 0 (got steps={self.steps}, lr={self.lr})")
        if self.objective != "auto":
            try:  # a misspelt objective fails here, before hours of allocation and GPTQ
                resolve_objective(self.objective)
            except ValueError as err:
                raise PassError(str(err)) from None

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if any(isinstance(v, PackedMatrix) for v in graph.params.values()):
            raise PassError("tune must run before pack (it trains the scales of quantized, not yet packed, weights)")
        tuners = {n: TunableScales(v) for n, v in graph.params.items() if isinstance(v, QuantizedMatrix)}
        originals = ctx.stats.pop(FLOAT_PARAMS, None)  # this pass is their only reader
        if self.steps == 0 or not tuners:
            return graph
        if not ctx.calib_inputs:
            raise PassError("tune needs calibration inputs (--calib FILE or --calib self)")
        if not originals or not set(tuners) <= set(originals):
            raise PassError("tune needs the float weights quantize replaced; run it right after quantize")
        objective = resolve_objective(default_objective(self.objective, graph.meta.get("kind")))
        kinds = graph.meta.get("param_kinds", {})
        floats = {
            n: t.detach().float().clone().requires_grad_(True)
            for n, t in graph.params.items()
            if self.norms and isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim == 1
            and kinds.get(n, "parameter") == "parameter"
        }
        scale_params = [p for t in tuners.values() for p in t.parameters()]
        if not scale_params:  # every column dropped: nothing to tune
            return graph
        reference = Interpreter(graph, weights=_Widening({n: originals[n] for n in tuners}))
        tuned = Interpreter(graph, grad=True)
        groups = [{"params": scale_params, "lr": self.lr}]
        if floats:
            groups.append({"params": list(floats.values()), "lr": self.lr / 2})
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / self.steps)))
        batches = ctx.calib_inputs
        check = batches[:CHECK_BATCHES]
        held_out = len(batches) > 2 * CHECK_BATCHES
        if held_out:
            batches = batches[CHECK_BATCHES:]

        def install() -> None:
            for n, t in tuners.items():
                tuned.set_weight(n, t.weight())
            for n, p in floats.items():
                tuned.set_weight(n, p)

        def check_loss() -> float:
            tuned.grad = False  # the interpreter would otherwise record autograd for the norm leaves
            try:
                with torch.no_grad():
                    install()
                    return sum(float(task_loss(objective, tuned.run(*b), reference.run(*b), b)) for b in check) / len(check)
            finally:
                tuned.grad = True

        before = check_loss()
        start_scales = {n: [s.copy() for s in graph.params[n].scales] for n in tuners}
        last = float("nan")
        with torch.enable_grad():  # whatever the caller's mode: the scales are trained through the weights built here
            for step in tqdm(range(self.steps), desc="tune", leave=False, disable=not ctx.stats.get("progress", True)):
                batch = batches[step % len(batches)]
                with torch.no_grad():
                    ref = reference.run(*batch)
                install()
                loss = task_loss(objective, tuned.run(*batch), ref, batch)
                del ref
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                last = float(loss.detach())
        for t in tuners.values():
            t.commit()  # float16 scales, as stored
        with torch.no_grad():  # judge the norms as pack will store them
            for p in floats.values():
                p.copy_(p.to(stored_dtype(graph)).float())
        after = check_loss()
        finite = all(np.isfinite(s).all() for n in tuners for s in graph.params[n].scales)
        kept = finite and after < before
        if kept:
            for n, p in floats.items():
                graph.params[n] = p.detach().to(graph.params[n].dtype)
        else:  # never ship a model the tuning made worse
            for n in tuners:
                graph.params[n].scales[:] = start_scales[n]
        ctx.stats["tune"] = {"objective": objective if isinstance(objective, str) else self.objective,
                             "steps": self.steps, "loss_before": before, "loss_after": after,
                             "last_step_loss": last, "held_out": held_out, "kept": kept}
        where = "held-out" if held_out else "calibration (too few batches to hold any out)"
        ctx.log(f"tune: {self.steps} steps, {where} loss {before:.4f} -> {after:.4f}"
                + ("" if kept else " (not better: untuned scales kept)"))
        return graph


class _Widening(dict):
    """An interpreter's weight cache over the float weights quantize kept (float16): each is widened to float32 when
    a layer runs and dropped after, instead of holding a float32 copy of every weight for the whole pass."""

    def __init__(self, narrow: dict[str, torch.Tensor]):
        super().__init__()
        self.narrow = narrow

    def __contains__(self, name) -> bool:
        return name in self.narrow or super().__contains__(name)

    def __getitem__(self, name) -> torch.Tensor:
        return self.narrow[name].float() if name in self.narrow else super().__getitem__(name)
