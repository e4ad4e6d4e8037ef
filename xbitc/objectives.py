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
KL_CHUNK_ROWS = 64  # tokens whose [vocab] distributions are materialised at once


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
    if objective == "kl":
        return kl_per_token(out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1]))
    ids = batch[0]
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]).float(), ids[:, 1:].reshape(-1))


def kl_per_token(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(ref) || softmax(logits)) for [tokens, vocab] logits; differentiable in `logits`.

    Equal to F.kl_div(log_softmax(logits), log_softmax(ref), log_target=True, reduction="batchmean"), but computed
    KL_CHUNK_ROWS tokens at a time with the gradient softmax(logits) - softmax(ref) recomputed in backward: autograd
    through the plain formula keeps ~5 [tokens, vocab] float32 copies alive (a 512-token window of a 49K vocabulary:
    0.5 GB), at the point where the model's saved activations already peak."""
    return _ChunkedKL.apply(logits, ref_logits.detach())


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, ref)
        total = 0.0  # float64
        for i in range(0, logits.shape[0], KL_CHUNK_ROWS):
            lp = F.log_softmax(logits[i : i + KL_CHUNK_ROWS].float(), -1)
            lr = F.log_softmax(ref[i : i + KL_CHUNK_ROWS].float(), -1)
            total += float((lr.exp() * (lr - lp)).sum(dtype=torch.float64))
        return torch.tensor(total / max(logits.shape[0], 1), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, ref = ctx.saved_tensors
        out = torch.empty(logits.shape, dtype=torch.float32)
        scale = grad.float() / max(logits.shape[0], 1)
        for i in range(0, logits.shape[0], KL_CHUNK_ROWS):
            rows = slice(i, i + KL_CHUNK_ROWS)
            torch.sub(torch.softmax(logits[rows].float(), -1), torch.softmax(ref[rows].float(), -1), out=out[rows])
            out[rows] *= scale
        return out.to(logits.dtype), None
