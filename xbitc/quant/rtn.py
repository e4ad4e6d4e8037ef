"""Round-to-nearest quantization: the baseline every other method is measured against."""
from __future__ import annotations

import numpy as np
import torch

from .format import QuantizedMatrix, Segment
from .grid import grid_params, quantize_codes


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int) -> QuantizedMatrix:
    """Uniform b-bit asymmetric RTN of a [out, in] matrix, groups of `group_size` input columns."""
    w = w.detach().to(torch.float32)
    out, inp = w.shape
    group_size = min(group_size, inp)
    codes, scales, zeros = [], [], []
    for g0 in range(0, inp, group_size):
        block = w[:, g0 : g0 + group_size]
        scale, zero = grid_params(block, bits)
        codes.append(quantize_codes(block, scale, zero, bits))
        scales.append(scale)
        zeros.append(zero)
    seg = Segment(bits=bits, group_size=group_size, start=0, stop=inp)
    return QuantizedMatrix(
        shape=(out, inp),
        segments=[seg],
        codes=[torch.cat(codes, 1).numpy().astype(np.uint8)],
        scales=[torch.cat(scales, 1).numpy().astype(np.float16)],
        zeros=[torch.cat(zeros, 1).numpy().astype(np.uint8)],
    )


def rtn_any(w: torch.Tensor, bits, group_size: int) -> QuantizedMatrix:
    """RTN at one depth, or at per-column depths (a sequence of 0..8): GPTQ with an identity Hessian compensates
    nothing between columns, which is exactly RTN with the columns grouped into segments of equal depth."""
    if isinstance(bits, (int, np.integer)):
        return rtn_quantize(w, int(bits), group_size)
    from .gptq import gptq_quantize

    return gptq_quantize(w.float(), torch.eye(w.shape[1]), np.asarray(bits, dtype=np.int64), group_size, damp=0.0, act_order=False)
