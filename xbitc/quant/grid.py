"""The uniform asymmetric grid every quantizer here shares.

A group of weights w (one output row, `group_size` consecutive columns) is stored as b-bit codes q with one float16
scale s and one integer zero point z in [0, 2**b): w ~ s * (q - z). The scale is rounded to float16 *before* codes are
chosen, so what a quantizer measures is exactly what the artifact will reproduce.
"""
from __future__ import annotations

import torch


def grid_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-representable, held in float32) and zero point per row of a [rows, group] block.

    The range always contains 0 so that the zero point is an exact code (GPTQ's convention).
    """
    maxq = (1 << bits) - 1
    lo = torch.clamp(w.min(dim=1, keepdim=True).values, max=0.0)
    hi = torch.clamp(w.max(dim=1, keepdim=True).values, min=0.0)
    span = hi - lo
    scale = torch.where(span > 0, span / maxq, torch.ones_like(span))
    scale = scale.to(torch.float16).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # float16 underflow guard
    zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)
