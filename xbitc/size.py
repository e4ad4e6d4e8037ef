"""Honest size accounting: bits per weight = 8 * (bytes the artifact needs to run) / (source parameter count).

The arrays a packed matrix is stored as, and so its exact bytes, are computed here from its segments (layout rules:
xbitc.quant.segments); xbitc.footprint builds the whole artifact's size from them, and the artifact writer measures
the real files.
"""
from __future__ import annotations

import math

import numpy as np

from xbitc.quant.format import Segment
from xbitc.quant.pack import row_bytes
from xbitc.quant.segments import perm_dtype, segments

ITEM_BYTES = {"U8": 1, "U16": 2, "I32": 4, "F16": 2, "BF16": 2, "F32": 4, "I64": 8}  # safetensors dtype codes
NUMPY_DTYPES = {"U8": np.uint8, "U16": np.uint16, "I32": np.int32, "F16": np.float16, "F32": np.float32, "I64": np.int64}
_PERM_CODES = {np.uint16: "U16", np.int32: "I32"}


def segment_arrays(rows: int, seg: Segment) -> dict[str, tuple[str, list[int]]]:
    """The codes, scales and zeros of a stored segment (none for a dropped one): safetensors dtype and shape."""
    if seg.bits == 0:
        return {}
    return {"codes": ("U8", [rows, row_bytes(seg.ncols, seg.bits)]), "scales": ("F16", [rows, seg.ngroups]),
            "zeros": ("U8", [rows, row_bytes(seg.ngroups, seg.bits)])}


def perm_array(in_features: int) -> tuple[str, list[int]]:
    return _PERM_CODES[perm_dtype(in_features)], [in_features]


def array_bytes(code: str, shape: list[int]) -> int:
    return ITEM_BYTES[code] * math.prod(shape)


def segment_bytes(rows: int, seg: Segment) -> int:
    """The bytes of `segment_arrays`, without building them: allocate prices every column upgrade with it."""
    if seg.bits == 0:
        return 0
    return rows * (row_bytes(seg.ncols, seg.bits) + 2 * seg.ngroups + row_bytes(seg.ngroups, seg.bits))


def packed_bytes(shape: tuple[int, int], segments: list[Segment], permuted: bool) -> int:
    perm = array_bytes(*perm_array(shape[1])) if permuted else 0
    return sum(segment_bytes(shape[0], s) for s in segments) + perm


def uniform_bytes(shape: tuple[int, int], bits: int, group: int) -> int:
    return packed_bytes(shape, segments([(bits, shape[1])], group), permuted=False)


def bits_per_weight(total_bytes: int, param_count: int) -> float:
    return 8.0 * total_bytes / max(param_count, 1)
