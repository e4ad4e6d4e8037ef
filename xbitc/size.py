"""Honest size accounting: bits per weight = 8 * (bytes the artifact needs to run) / (source parameter count).

`predict_packed_bytes` gives the exact tensor bytes a quantized matrix will take in the artifact; xbitc.footprint
builds the whole artifact's size from it, and the artifact writer measures the real files.
"""
from __future__ import annotations

from xbitc.quant.format import Segment
from xbitc.quant.pack import row_bytes

def segment_bytes(rows: int, seg: Segment) -> int:
    if seg.bits == 0:
        return 0
    return rows * (row_bytes(seg.ncols, seg.bits) + 2 * seg.ngroups + row_bytes(seg.ngroups, seg.bits))


def packed_bytes(shape: tuple[int, int], segments: list[Segment], permuted: bool) -> int:
    perm_bytes = (2 if shape[1] <= 1 << 16 else 4) * shape[1]  # see quant.packed.perm_dtype
    return sum(segment_bytes(shape[0], s) for s in segments) + (perm_bytes if permuted else 0)


def uniform_bytes(shape: tuple[int, int], bits: int, group: int) -> int:
    group = min(group, shape[1])
    return packed_bytes(shape, [Segment(bits, group, 0, shape[1])], permuted=False)


def bits_per_weight(total_bytes: int, param_count: int) -> float:
    return 8.0 * total_bytes / max(param_count, 1)
