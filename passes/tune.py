"""tune: descend the task cost on the calibration data by moving what quantization left continuous.

After `quantize`, every quantized weight is integer codes and zero points (fixed here) times one float16 scale per
group. The scales, and the model's 1-D float parameters (norm weights, biases), are trained end to end with Adam on
the objective the allocator used (kl: KL to the float model's outputs; ce; mse; or a user's callable), one
calibration batch per step. Nothing stored changes size: the artifact holds the same codes and the same number of
float16 scales, so the budget is untouched. Quantizing layer by layer (GPTQ) only sees each layer's own output
error; this sees how the errors of all layers add up at the model's output, which is what the cost measures.

The first CHECK_BATCHES calibration batches are held out of the steps (when there are enough of them) and judge
the result at `checks` checkpoints spread over the steps: the best checkpoint is kept (the untuned values if none
beats them), and two checkpoints in a row without a new best end the tuning early -- with little calibration text
the steps soon fit the batches rather than the task, and further steps only cost time.

On a model larger than memory (a folder's weights still in their files, xbitc.streaming) the steps are the same ops
on the same values: the float reference reads each weight from its shard when a layer needs it, and the activations
autograd keeps for a step's backward wait in a scratch file of their own (xbitc.quant.tune.rebuilt_when_saved), as
does the scales' training state (TunableScales' spill, stepped a matrix at a time by ScaleAdam), so memory holds one
matrix (its build, gradient and state) and a window's logits, not the model.

Under torchrun every process runs the same steps: each step reads one calibration window and starts from the
previous step's values, so the steps cannot be split without changing the result. The held-out batches are split
across the processes (their losses summed over all), and at the end every rank takes rank 0's scales and float
parameters, so all hold the same graph whatever their thread counts did to the last bits.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils._pytree import tree_map
from tqdm import tqdm

from xbitc import distributed, heap
from xbitc.lazy import LazyWeight
from xbitc.ir.graph import Graph
from xbitc.ir.interp import Interpreter
from xbitc.objectives import default_objective, resolve_objective, task_loss
from xbitc.quant.format import QuantizedMatrix
from xbitc.quant.packed import PackedMatrix
from xbitc.quant.tune import SPILL_BYTES, ScaleAdam, TunableScales, rebuilt_when_saved
from xbitc.spill import Spill, page_out

from .base import Pass, PassContext, PassError, option
from .pack import stored_dtype

FLOAT_PARAMS = "float_params"  # ctx.stats key: quantize leaves the float weights it replaced here, for tune
CHECK_BATCHES = 2  # calibration batches the before/after comparison runs on
NGRAM = 8  # tokens in a row that identify a passage of text
MAX_REPEATED_TEXT = 0.5  # above this share of held-out n-grams seen in training, the held-out batches judge nothing


@dataclass(frozen=True)
class Tune(Pass):
    name = "tune"
    requires = frozenset({"quantized"})
    provides = frozenset({"tuned"})
    steps: int = option(24, 0)
    # Adam step on log-scales (a relative scale change), cosine decay to 0 over the steps (larger: BENCHMARKS.md)
    lr: float = option(0.003, above=0.0)
    objective: str = "auto"  # as allocate's: kl for language models, mse otherwise
    norms: bool = True  # also tune 1-D float parameters (norm weights, biases)
    checks: int = option(4, 1)  # held-out checkpoints over the steps: the best is kept; two without progress stop early

    @property
    def needs_calibration(self) -> bool:
        return self.steps > 0

    def __post_init__(self) -> None:
        if self.steps < 0 or not self.lr > 0 or self.checks < 1:
            raise PassError(f"tune needs steps >= 0, lr > 0 and checks >= 1 (got steps={self.steps}, lr={self.lr}, "
                            f"checks={self.checks})")
        if self.objective != "auto":
            try:  # a misspelt objective fails here, before hours of allocation and GPTQ
                resolve_objective(self.objective)
            except ValueError as err:
                raise PassError(str(err)) from None

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if any(isinstance(v, PackedMatrix) for v in graph.params.values()):
            raise PassError("tune must run before pack (it trains the scales of quantized, not yet packed, weights)")
        quantized = {n: v for n, v in graph.params.items() if isinstance(v, QuantizedMatrix)}
        originals = ctx.stats.pop(FLOAT_PARAMS, None)  # this pass is their only reader
        if self.steps == 0 or not quantized:
            return graph
        if not ctx.calib_inputs:
            raise PassError("tune needs calibration inputs (--calib FILE or --calib self)")
        if not originals or not set(quantized) <= set(originals):
            raise PassError("tune needs the float weights quantize replaced; run it right after quantize")
        batches = ctx.calib_inputs
        check = batches[:CHECK_BATCHES]
        held_out = len(batches) > 2 * CHECK_BATCHES
        if held_out:
            batches = batches[CHECK_BATCHES:]
            repeated = repeated_text(check, batches)
            if repeated > MAX_REPEATED_TEXT:
                ctx.stats["tune"] = {"steps": 0, "kept": False, "skipped": f"{repeated:.0%} of held-out text repeated"}
                ctx.log(f"tune: skipped: {repeated:.0%} of the held-out calibration windows' text is also in the "
                        "training windows, so nothing could judge the tuning (the calibration text is too short for "
                        "the windows asked for; give a longer --calib file)")
                return graph
        # weights still in their files (a model larger than memory, xbitc.streaming): the reference reads them at
        # each use, the activations autograd keeps for each step's backward wait in a scratch file, and so does the
        # scales' training state, a matrix's at a time in memory
        streamed = any(isinstance(v, LazyWeight) for v in originals.values())
        state = Spill(ctx.stats.get("scratch")) if streamed else None
        tuners = {n: TunableScales(q, state) for n, q in quantized.items()}
        objective = resolve_objective(default_objective(self.objective, graph.meta.get("kind")))
        kinds = graph.meta.get("param_kinds", {})
        floats = {
            n: t.detach().float().clone().requires_grad_(True)
            for n, t in graph.params.items()
            if self.norms and isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim == 1
            and kinds.get(n, "parameter") == "parameter"
        }
        if not any(t.parameters() for t in tuners.values()):  # every column dropped: nothing to tune
            return graph
        reference = Interpreter(graph, weights=_OnRead({n: _reader(originals[n]) for n in tuners}))
        tuned = Interpreter(graph, grad=True, weights=_OnRead({n: t.weight_as_stored for n, t in tuners.items()}))
        scales_opt = ScaleAdam(tuners.values(), self.lr)
        floats_opt = torch.optim.Adam(floats.values(), lr=self.lr / 2) if floats else None
        dtype = stored_dtype(graph)

        def install(stored: bool = False) -> None:
            for n, p in floats.items():  # judged as pack will store the norms
                tuned.set_weight(n, p.detach().to(dtype).float() if stored else p)

        my_check = distributed.my_share(check)  # every rank judges its share of the held-out batches
        held_refs: list = []  # the float model's outputs on them: the same at every checkpoint

        def check_loss() -> float:
            tuned.grad = False  # the interpreter would otherwise record autograd for the norm leaves
            try:
                with torch.no_grad():
                    if not held_refs:
                        held_refs.extend(tree_map(_Compact.of, reference.run(*b)) for b in my_check)
                    install(stored=True)
                    total = sum(float(task_loss(objective, tuned.run(*b), tree_map(_Compact.widen, r), b))
                                for b, r in zip(my_check, held_refs))
                    return distributed.sum_over_ranks(float(total)) / len(check)
            finally:
                tuned.grad = True

        def snapshot() -> dict:
            keep = np.copy if state is None else _kept_in(state)
            return {"scales": {n: [keep(s) for s in graph.params[n].scales] for n in tuners},
                    "floats": {n: p.detach().to(dtype) for n, p in floats.items()}}

        before = check_loss()
        start = best = snapshot()
        best_loss, history, since_best = before, [before], 0
        every = max(1, -(-self.steps // self.checks))
        last = float("nan")
        steps_run = 0
        # on a model larger than memory, a step's activations leave for disk as the forward goes: each from its own
        # mapping, returned when freed (the heap, which would serve them, keeps most of them resident)
        with torch.enable_grad(), heap.mapped_above(SPILL_BYTES) if streamed else nullcontext():
            for step in tqdm(range(self.steps), desc="tune", leave=False, disable=not ctx.stats.get("progress", True)):
                batch = batches[step % len(batches)]
                with torch.no_grad():
                    ref = reference.run(*batch)
                install()
                scales_opt.zero_grad()
                if floats_opt is not None:
                    floats_opt.zero_grad(set_to_none=True)
                spill = Spill(ctx.stats.get("scratch")) if streamed else None
                with rebuilt_when_saved(spill):  # layers keep a note to rebuild their weight, not the float32 matrix
                    loss = task_loss(objective, tuned.run(*batch), ref, batch)
                    del ref
                    loss.backward()
                if spill is not None:
                    spill.close()  # the step's activations are read and gone: the file goes with its last map
                    heap.release()  # and what held them goes back to the system, not into the next step's peak
                decay = 0.5 * (1 + math.cos(math.pi * step / self.steps))  # the rate's cosine to 0 over the steps
                scales_opt.step(lr_factor=decay)
                if floats_opt is not None:
                    for group in floats_opt.param_groups:
                        group["lr"] = self.lr / 2 * decay
                    floats_opt.step()
                last = float(loss.detach())
                steps_run = step + 1
                if steps_run % every and steps_run != self.steps:
                    continue
                for t in tuners.values():
                    t.commit()  # float16 scales, as stored
                history.append(check_loss())
                if math.isfinite(history[-1]) and history[-1] < best_loss:
                    best, best_loss, since_best = snapshot(), history[-1], 0
                else:
                    since_best += 1
                    if held_out and since_best >= 2:
                        break  # two checks in a row without a new best: the steps fit the batches, not the task
        kept = best is not start
        for n in tuners:  # the best checkpoint (the untuned values if none beat them)
            graph.params[n].scales[:] = best["scales"][n]
        if kept:
            for n, p in best["floats"].items():
                graph.params[n] = p.to(graph.params[n].dtype)
        if state is not None:
            state.close()  # the state's maps keep what they hold (the best scales among it) until they are gone
        distributed.sync_from_main([s for n in sorted(tuners) for s in graph.params[n].scales]
                                   + [graph.params[n] for n in sorted(floats)])
        after = best_loss
        ctx.stats["tune"] = {"objective": objective if isinstance(objective, str) else self.objective,
                             "steps": steps_run, "loss_before": before, "loss_after": after, "checks": history,
                             "last_step_loss": last, "held_out": held_out, "kept": kept}
        where = "held-out" if held_out else "calibration (too few batches to hold any out)"
        ctx.log(f"tune: {steps_run} of {self.steps} steps, {where} loss {before:.4f} -> {after:.4f}"
                + ("" if kept else " (not better: untuned scales kept)"))
        return graph


def _kept_in(spill: Spill) -> Callable[[np.ndarray], np.ndarray]:
    def keep(a: np.ndarray) -> np.ndarray:
        kept = spill.array(a)
        page_out(kept)
        return kept
    return keep


def _reader(original: torch.Tensor | LazyWeight) -> Callable[[], torch.Tensor]:
    return original.load if isinstance(original, LazyWeight) else original.float


class _OnRead(dict):
    """An interpreter's weight cache whose named entries are made afresh each time a layer reads them and never
    kept: the reference's float16 weights widened to float32, the tuned model's matrices built from their codes
    (differentiable in the scales). Either way no float32 copy of every weight is held for the whole pass."""

    def __init__(self, make: dict[str, Callable[[], torch.Tensor]]):
        super().__init__()
        self.make = make

    def __contains__(self, name) -> bool:
        return name in self.make or super().__contains__(name)

    def __getitem__(self, name) -> torch.Tensor:
        return self.make[name]() if name in self.make else super().__getitem__(name)


class _Compact:
    """A float32 output kept as float16 while it waits for the next checkpoint (two 512-token windows of a 49K
    vocabulary: 0.1 GB instead of 0.2, at the pass's memory peak); float16's 11-bit significand moves a logit of
    magnitude 16..32 by at most 2^-7, the same for every checkpoint it judges. Anything float16 cannot hold stays."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    @staticmethod
    def of(t):
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
            half = t.half()
            if torch.isfinite(half).all() or not torch.isfinite(t).all():
                return _Compact(half)
        return t

    @staticmethod
    def widen(t):
        return t.t.float() if isinstance(t, _Compact) else t


def repeated_text(check: list[tuple], train: list[tuple]) -> float:
    """Share of the held-out batches' token NGRAMs that also occur in the training batches (0 for inputs that are
    not integer token ids). Windows cut at random offsets from a text shorter than all of them together overlap: a
    'held-out' window is then mostly training text, and tuning that overfits looks like progress on it."""
    def grams(batches):
        out = set()
        for b in batches:
            ids = b[0]
            if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.ndim != 2:
                return None
            for row in ids.tolist():
                out.update(tuple(row[i : i + NGRAM]) for i in range(len(row) - NGRAM + 1))
        return out

    held, seen = grams(check), grams(train)
    if not held or seen is None:
        return 0.0
    return len(held & seen) / len(held)
