"""The uniform asymmetric grid every quantizer here shares.

A group of weights w (one output row, `group_size` consecutive columns) is stored as b-bit codes q with one float16
scale s and one integer zero point z in [0, 2**b): w ~ s * (q - z). The scale is rounded to float16 *before* codes are
chosen, so what a quantizer measures is exactly what the artifact will reproduce.

Clipping: the full range [min, max] wastes levels on rare large weights; below 4 bits a range shrunk towards 0 gives a
smaller error for the rest. `grid_params(..., clip=True)` searches shrink factors per row and keeps the one with the
least squared error (weighted per column when the quantizer knows how much each column matters, e.g. GPTQ's Hessian
diagonal), as in the GPTQ reference code's MSE grid. The format is unchanged: clipping only picks scale and zero.
"""
from __future__ import annotations

import torch

SHRINKS = torch.linspace(1.0, 0.55, 10)  # fractions of the full range tried by the clipping search


def _range_grid(lo: torch.Tensor, hi: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    span = hi - lo
    scale = torch.where(span > 0, span / maxq, torch.ones_like(span))
    scale = scale.to(torch.float16).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # float16 underflow guard
    zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def grid_params(
    w: torch.Tensor, bits: int, clip: bool = False, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-representable, held in float32) and zero point per row of a [rows, group] block.

    The range always contains 0 so that the zero point is an exact code (GPTQ's convention). With `clip`, the range
    is shrunk by the factor in SHRINKS that minimises sum_j weight_j (w_j - dequant_j)^2 for each row.
    """
    maxq = (1 << bits) - 1
    lo = torch.clamp(w.min(dim=1, keepdim=True).values, max=0.0)
    hi = torch.clamp(w.max(dim=1, keepdim=True).values, min=0.0)
    if not clip:
        return _range_grid(lo, hi, maxq)
    best_scale, best_zero = _range_grid(lo, hi, maxq)
    best_err = _error(w, best_scale, best_zero, maxq, weight)
    for p in SHRINKS[1:].tolist():
        scale, zero = _range_grid(lo * p, hi * p, maxq)
        err = _error(w, scale, zero, maxq, weight)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _error(w, scale, zero, maxq, weight) -> torch.Tensor:
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    d = (scale * (q - zero) - w) ** 2
    if weight is not None:
        d = d * weight
    return d.sum(1, keepdim=True)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)
