"""Round-to-nearest quantization: the baseline every other method is measured against."""
from __future__ import annotations

import numpy as np
import torch

from .format import QuantizedMatrix
from .grid import grid_params, quantize_codes
from .segments import segments, stored_order, stored_segments, stores_perm

ROWS = 1024  # output rows quantized at once


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, clip: bool = False) -> QuantizedMatrix:
    """Uniform b-bit asymmetric RTN of a [out, in] matrix, groups of `group_size` input columns."""
    w = w.detach().to(torch.float32)
    out, inp = w.shape
    (seg,) = segments([(bits, inp)], group_size)
    group_size = seg.group_size
    ngroups = -(-inp // group_size)
    # filled a slice at a time: the clipping search's temporaries stay a slice's size, not a vocabulary table's
    codes = np.empty((out, inp), np.uint8)
    scales = np.empty((out, ngroups), np.float16)
    zeros = np.empty((out, ngroups), np.uint8)
    for r0 in range(0, out, ROWS):
        rows = slice(r0, r0 + ROWS)
        for k, g0 in enumerate(range(0, inp, group_size)):
            block = w[rows, g0 : g0 + group_size]
            scale, zero = grid_params(block, bits, clip=clip)
            codes[rows, g0 : g0 + group_size] = quantize_codes(block, scale, zero, bits).numpy()
            scales[rows, k] = scale[:, 0].numpy()
            zeros[rows, k] = zero[:, 0].numpy()
    return QuantizedMatrix(shape=(out, inp), segments=[seg], codes=[codes], scales=[scales], zeros=[zeros])


def rtn_any(w: torch.Tensor, bits, group_size: int, clip: bool = False) -> QuantizedMatrix:
    """RTN at one depth, or at per-column depths (a sequence of 0..8) in the stored layout of xbitc.quant.segments:
    each segment is an RTN of its columns."""
    if isinstance(bits, (int, np.integer)):
        return rtn_quantize(w, int(bits), group_size, clip)
    depths = np.asarray(bits, dtype=np.int64)
    w = w.detach().to(torch.float32)
    out, inp = w.shape
    if depths.shape != (inp,):
        raise ValueError(f"per-column depths must have {inp} entries, got shape {depths.shape}")
    order = stored_order(depths)
    segs = stored_segments(depths, group_size)
    codes, scales, zeros = [], [], []
    for seg in segs:
        if seg.bits == 0:
            codes.append(np.zeros((out, seg.ncols), np.uint8))
            scales.append(np.zeros((out, 0), np.float16))
            zeros.append(np.zeros((out, 0), np.uint8))
        else:
            q = rtn_quantize(w[:, torch.from_numpy(order[seg.start : seg.stop])], seg.bits, seg.group_size, clip)
            codes += q.codes
            scales += q.scales
            zeros += q.zeros
    return QuantizedMatrix((out, inp), segs, codes, scales, zeros, order if stores_perm(segs, False) else None)
