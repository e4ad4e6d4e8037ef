"""Round-to-nearest quantization: the baseline every other method is measured against."""
from __future__ import annotations

import numpy as np
import torch

from .format import QuantizedMatrix, Segment
from .grid import grid_params, quantize_codes


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, clip: bool = False) -> QuantizedMatrix:
    """Uniform b-bit asymmetric RTN of a [out, in] matrix, groups of `group_size` input columns."""
    w = w.detach().to(torch.float32)
    out, inp = w.shape
    group_size = min(group_size, inp)
    codes, scales, zeros = [], [], []
    for g0 in range(0, inp, group_size):
        block = w[:, g0 : g0 + group_size]
        scale, zero = grid_params(block, bits, clip=clip)
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


def rtn_any(w: torch.Tensor, bits, group_size: int, clip: bool = False) -> QuantizedMatrix:
    """RTN at one depth, or at per-column depths (a sequence of 0..8): columns are ordered by depth, descending
    (stable, so equal depths keep their order), and each run of equal depth is one RTN segment."""
    if isinstance(bits, (int, np.integer)):
        return rtn_quantize(w, int(bits), group_size, clip)
    depths = np.asarray(bits, dtype=np.int64)
    w = w.detach().to(torch.float32)
    out, inp = w.shape
    if depths.shape != (inp,):
        raise ValueError(f"per-column depths must have {inp} entries, got shape {depths.shape}")
    order = np.argsort(-depths, kind="stable")
    segments, codes, scales, zeros = [], [], [], []
    start = 0
    for d in sorted(set(depths.tolist()), reverse=True):
        cols = order[start : start + int((depths == d).sum())]
        if d == 0:
            segments.append(Segment(0, 1, start, start + len(cols)))
            codes.append(np.zeros((out, len(cols)), np.uint8))
            scales.append(np.zeros((out, 0), np.float16))
            zeros.append(np.zeros((out, 0), np.uint8))
        else:
            q = rtn_quantize(w[:, torch.from_numpy(cols)], int(d), group_size, clip)
            seg = q.segments[0]
            segments.append(Segment(seg.bits, seg.group_size, start, start + len(cols)))
            codes += q.codes
            scales += q.scales
            zeros += q.zeros
        start += len(cols)
    perm = None if np.array_equal(order, np.arange(inp)) else order.astype(np.int64)
    return QuantizedMatrix((out, inp), segments, codes, scales, zeros, perm)
