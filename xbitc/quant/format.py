"""In-memory form of a quantized weight matrix: columns permuted into segments of equal bit depth.

A [out, in] matrix is stored with its input columns reordered by `perm` (stored column j is original column
perm[j]); the reordered columns fall into contiguous segments, each with one bit depth (0..8; 0 drops the columns)
and one group size (columns per scale/zero group, counted inside the segment). Uniform quantization is a single
segment with the identity permutation. Kernels gather the input once by `perm` and run one plain b-bit product
per segment.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .grid import dequantize_codes


@dataclass(frozen=True)
class Segment:
    bits: int
    group_size: int
    start: int  # first stored column
    stop: int  # one past the last stored column

    @property
    def ncols(self) -> int:
        return self.stop - self.start

    @property
    def ngroups(self) -> int:
        return 0 if self.bits == 0 else -(-self.ncols // self.group_size)


@dataclass
class QuantizedMatrix:
    shape: tuple[int, int]
    segments: list[Segment]
    codes: list[np.ndarray]  # per segment: [out, ncols] uint8 codes (unpacked)
    scales: list[np.ndarray]  # per segment: [out, ngroups] float16
    zeros: list[np.ndarray]  # per segment: [out, ngroups] uint8
    perm: np.ndarray | None = None  # [in] integer indices; None means identity
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        out, inp = self.shape
        if self.perm is not None and sorted(self.perm.tolist()) != list(range(inp)):
            raise ValueError("perm must be a permutation of the input columns")
        pos = 0
        for seg, q, s, z in zip(self.segments, self.codes, self.scales, self.zeros, strict=True):
            if seg.start != pos or seg.stop <= seg.start:
                raise ValueError(f"segments must tile the columns in order; got {seg} at column {pos}")
            pos = seg.stop
            if not 0 <= seg.bits <= 8:
                raise ValueError(f"segment bit depth must be 0..8, got {seg.bits}")
            if seg.bits and (q.shape != (out, seg.ncols) or s.shape != (out, seg.ngroups) or z.shape != s.shape):
                raise ValueError(f"segment {seg} arrays have shapes {q.shape}, {s.shape}, {z.shape}")
            if seg.bits and q.size and int(q.max()) >= (1 << seg.bits):
                raise ValueError(f"segment {seg} holds codes that do not fit {seg.bits} bits")
        if pos != inp:
            raise ValueError(f"segments cover {pos} of {inp} columns")

    def column_bits(self) -> np.ndarray:
        """Bit depth of every original input column."""
        stored = np.concatenate([np.full(s.ncols, s.bits, dtype=np.int64) for s in self.segments])
        bits = np.empty_like(stored)
        bits[self.perm if self.perm is not None else np.arange(self.shape[1])] = stored
        return bits

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] matrix the codes represent, columns back in original order."""
        out, inp = self.shape
        stored = torch.zeros(out, inp, dtype=torch.float32)
        for seg, q, s, z in zip(self.segments, self.codes, self.scales, self.zeros):
            if seg.bits == 0:
                continue
            rep = lambda a: torch.from_numpy(a.astype(np.float32)).repeat_interleave(seg.group_size, dim=1)
            stored[:, seg.start : seg.stop] = dequantize_codes(
                torch.from_numpy(q.astype(np.float32)), rep(s)[:, : seg.ncols], rep(z)[:, : seg.ncols]
            )
        if self.perm is None:
            return stored
        w = torch.empty_like(stored)
        w[:, torch.from_numpy(self.perm.astype(np.int64))] = stored
        return w
