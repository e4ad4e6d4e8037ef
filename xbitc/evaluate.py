"""Language-model quality measures on a token stream: perplexity, KL to the float model, top-1 agreement.

All use non-overlapping windows of `window` tokens over the first `max_tokens` tokens (the GPTQ protocol);
every window scores its tokens 1..window-1 given their prefix inside the window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

Logits = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LMScores:
    perplexity: float
    kl: float | None  # mean KL(float || compressed) per token, nats
    top1_agree: float | None  # fraction of tokens where both models' argmax agree
    top1_acc: float  # fraction of tokens where the argmax is the next token
    tokens: int

    def as_row(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def windows(ids: torch.Tensor, window: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    if window < 2:
        raise ValueError(f"a window of {window} tokens scores nothing; use 2 or more")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens {max_tokens} must be 1 or more (None: the whole text)")
    ids = ids[:max_tokens] if max_tokens else ids
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    return [ids[i * window : (i + 1) * window].unsqueeze(0) for i in range(n)]


@torch.no_grad()
def score(
    model: Logits, ids: torch.Tensor, window: int, max_tokens: int | None = None, reference: Logits | None = None,
    progress: bool = True,
) -> LMScores:
    nll = kl = agree = correct = 0.0
    count = 0
    for w in tqdm(windows(ids, window, max_tokens), desc="evaluate", leave=False, disable=not progress):
        logits = model(w)[0, :-1].float()
        target = w[0, 1:]
        logp = F.log_softmax(logits, -1)
        nll += float(F.nll_loss(logp, target, reduction="sum"))
        correct += float((logits.argmax(-1) == target).sum())
        if reference is not None:
            ref_logp = F.log_softmax(reference(w)[0, :-1].float(), -1)
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            agree += float((ref_logp.argmax(-1) == logits.argmax(-1)).sum())
        count += len(target)
    return LMScores(
        perplexity=math.exp(nll / count),
        kl=kl / count if reference is not None else None,
        top1_agree=agree / count if reference is not None else None,
        top1_acc=correct / count,
        tokens=count,
    )
