"""Task costs shared by the allocator (which needs their curvature) and the scale tuner (which descends them).

- `kl` (default for language models): KL(float || compressed) of the next-token distribution, per token.
- `ce`: next-token cross-entropy on the calibration text, per token.
- `mse` (default otherwise): mean squared error of the outputs against the float model's.
- `package.module:function(outputs, reference_outputs, batch) -> loss`: a user's own cost.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F

OBJECTIVES = ("kl", "ce", "mse")


def resolve_objective(objective: str) -> str | Callable:
    if objective in OBJECTIVES:
        return objective
    module, _, fn = objective.partition(":")
    if not fn:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)} nor package.module:function")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import objective {objective!r}: {err}") from None


def default_objective(objective: str, kind: str | None) -> str:
    """`auto` means kl for causal language models and mse for everything else."""
    if objective == "auto":
        return "kl" if kind == "causal-lm" else "mse"
    return objective


def task_loss(objective: str | Callable, out: torch.Tensor, ref: torch.Tensor, batch: tuple) -> torch.Tensor:
    """The cost itself (not a sample of its gradient): what fine-tuning on calibration data minimises."""
    if callable(objective):
        return objective(out, ref, batch)
    if objective == "mse":
        return F.mse_loss(out.float(), ref.float())
    logits = out.reshape(-1, out.shape[-1]).float()
    if objective == "kl":
        target = F.log_softmax(ref.reshape(-1, ref.shape[-1]).float(), -1)
        return F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="batchmean")
    ids = batch[0]
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]).float(), ids[:, 1:].reshape(-1))
