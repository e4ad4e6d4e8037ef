"""The stored column layout of a quantized matrix, decided here and only here.

Quantizers (rtn, gptq) write this layout and the size model (xbitc.size, xbitc.footprint, passes/allocate) predicts
it from the plan alone, so every rule depends only on the per-column depths, the group size and whether the
quantizer orders columns by their data (GPTQ's act_order), never on the weights:
- one segment per depth present, finest first (dropped columns last), whatever order a quantizer worked in; inside a
  segment the quantizer's own column order (original index unless act_order);
- a segment's group is the planned group (0: per-channel) capped at its width; a dropped segment has no groups and
  records 1;
- the permutation is stored when there is more than one segment or the order came from the data, even when it
  happens to be the identity (the plan cannot see that); as uint16 while column indices fit, else int32.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .format import Segment

STORED_DEPTHS = range(8, -1, -1)  # segment order: finest first


def depth_counts(depths) -> np.ndarray:
    """Columns at each depth 0..8."""
    return np.bincount(np.asarray(depths, dtype=np.int64), minlength=9)


def stored_runs(counts) -> list[tuple[int, int]]:
    """(depth, columns) of each stored segment, from the columns at each depth."""
    return [(d, int(counts[d])) for d in STORED_DEPTHS if counts[d]]


def runs(depths) -> list[tuple[int, int]]:
    """(depth, columns) of each maximal run of equal depth, in the order given."""
    out: list[tuple[int, int]] = []
    for d in np.asarray(depths).tolist():
        if out and out[-1][0] == d:
            out[-1] = (d, out[-1][1] + 1)
        else:
            out.append((int(d), 1))
    return out


def segments(runs_: Iterable[tuple[int, int]], group: int) -> list[Segment]:
    """Consecutive segments for (depth, columns) runs, with the group rule above."""
    out, start = [], 0
    for bits, n in runs_:
        out.append(Segment(int(bits), min(group or n, n) if bits else 1, start, start + n))
        start += n
    return out


def stored_segments(depths, group: int) -> list[Segment]:
    return segments(stored_runs(depth_counts(depths)), group)


def stored_order(depths) -> np.ndarray:
    """Stored column j is column order[j] of `depths`: finest depth first, stable (equal depths keep their order)."""
    return np.argsort(-np.asarray(depths, dtype=np.int64), kind="stable")


def stores_perm(segs: list[Segment], data_order: bool) -> bool:
    return len(segs) > 1 or data_order


def perm_dtype(in_features: int) -> type:
    """uint16 whenever the column indices fit: half the bytes of int32."""
    return np.uint16 if in_features <= 1 << 16 else np.int32
