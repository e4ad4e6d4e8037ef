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
