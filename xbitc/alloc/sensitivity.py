"""How much the task cost grows when a weight is perturbed: a per-element curvature estimate from gradients.

Second order around the float model, a perturbation d of the weights raises the cost by about 1/2 d^T F d. For the
objectives below, F's diagonal is estimated from gradients sampled on the calibration data, so every number comes
from the data and the cost, not from rules about layer types:

- `kl` (default): KL(float || compressed) of the output distribution. Its Hessian at the float model is the Fisher
  information, E_y~p[g g^T] with g the gradient of log p(y); y is sampled from the float model's own outputs.
- `ce`: next-token cross-entropy on the calibration text: the empirical Fisher (labels are the text's tokens).
- `mse`: squared output error: Gauss-Newton J^T J, whose diagonal is E_r[(J^T r)^2] for r ~ N(0, I).
- `package.module:function(outputs, reference_outputs, batch) -> loss`: a user's own cost. Its gradient vanishes
  at the float model if the cost compares to the reference, so it is taken at a perturbed point (weights plus
  uniform noise of a 4-bit step); the squared gradients then weigh each weight by how much the cost reacts.

Under torchrun each process takes its share of the batches and the squared-gradient sums are added over all
processes. The samples come from one generator stream in batch order; a process steps it past the batches of the
others by drawing what they draw (the same calls on tensors of the same shape), so every batch gets the sample it
gets in one process and the result differs from one process's only in the order of the float sums.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from xbitc import distributed
from xbitc.ir.graph import Graph
from xbitc.ir.interp import Interpreter
from xbitc.objectives import OBJECTIVES, resolve_objective  # noqa: F401 (re-exported)


def _sampled_loss(objective: str | Callable, out: torch.Tensor, ref: torch.Tensor, batch: tuple, gen: torch.Generator) -> torch.Tensor:
    if callable(objective):
        return objective(out, ref, batch)
    if objective == "mse":
        return (out * torch.randn(out.shape, generator=gen)).sum()
    logits = out.reshape(-1, out.shape[-1]).float()
    if objective == "kl":
        target = torch.multinomial(torch.softmax(ref.reshape(-1, ref.shape[-1]).float(), -1), 1, generator=gen).squeeze(1)
        return F.cross_entropy(logits, target, reduction="sum")
    ids = batch[0]
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")


def _skip_draws(objective: str | Callable, shape: torch.Size, gen: torch.Generator) -> None:
    """Advance `gen` as _sampled_loss does for an output of `shape` (what it draws depends on the shape only)."""
    if objective == "mse":
        torch.randn(shape, generator=gen)
    elif objective == "kl":
        torch.multinomial(torch.ones(shape.numel() // shape[-1], shape[-1]), 1, generator=gen)


def _signature(batch: tuple) -> tuple:
    return tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else repr(t) for t in batch)


def fisher_diagonal(
    graph: Graph, names: list[str], batches: list[tuple], objective: str | Callable = "kl", seed: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-element curvature of the task cost for each named weight (same shape as the weight), averaged over
    calibration batches."""
    objective = resolve_objective(objective)
    gen = torch.Generator().manual_seed(seed)
    interp = Interpreter(graph, grad=True)
    leaves = {}
    for k, name in enumerate(names):
        w = interp.weight(name).detach()  # shares storage with the graph's tensor; nothing writes to it
        if callable(objective):  # see module docstring: a perturbed point, so a reference-matching cost has a slope
            w = perturbed(w, seed, k)
        leaves[name] = w.requires_grad_(True)
        interp.set_weight(name, leaves[name])
    reference = Interpreter(graph)
    fisher = {name: torch.zeros_like(leaves[name]) for name in names}
    # Square each weight's gradient into its sum as soon as backward has produced it and drop it: holding every
    # gradient until backward ends (autograd.grad) kept a second copy of all weights alive, the compile's peak.
    hooks = [leaves[name].register_post_accumulate_grad_hook(partial(_square_into, fisher[name])) for name in names]
    inputs = list(leaves.values())  # nothing else gets a .grad (e.g. parameters of a user objective)
    mine = set(distributed.my_share(range(len(batches))))
    draws = objective in ("kl", "mse")  # sample per batch from `gen`
    shapes: dict[tuple, torch.Size] = {}  # output shape by input shapes: what another rank's batch draws
    try:
        for i, batch in enumerate(tqdm(batches, desc="sensitivity", leave=False, disable=not progress)):
            if i not in mine:
                if draws:
                    sig = _signature(batch)
                    if sig not in shapes:  # a static graph: one forward tells the shape for all such batches
                        shapes[sig] = reference.run(*batch).shape
                    _skip_draws(objective, shapes[sig], gen)
                continue
            out = interp.run(*batch)
            if draws:
                shapes[_signature(batch)] = out.shape
            loss = _sampled_loss(objective, out, reference.run(*batch), batch, gen)  # the reference dies here
            del out
            loss.backward(inputs=inputs)
    finally:
        for h in hooks:
            h.remove()
    for name in names:
        distributed.all_reduce_sum(fisher[name])
    return {name: f / max(len(batches), 1) for name, f in fisher.items()}


def perturbed(w: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """`w` plus uniform noise of a 4-bit step of its row's range, drawn from a stream of its own (the `index`-th
    weight's under `seed`): the same whichever weights are perturbed before it (xbitc.alloc.blockwise reads them
    a block at a time)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index + 1)
    span = (w.amax(1, keepdim=True) - w.amin(1, keepdim=True)).clamp_min(1e-12) / 15
    return w + (torch.rand(w.shape, generator=gen) - 0.5) * span


def _square_into(acc: torch.Tensor, leaf: torch.Tensor) -> None:
    acc += leaf.grad ** 2
    leaf.grad = None
