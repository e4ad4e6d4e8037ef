"""Packed form of a QuantizedMatrix: what the artifact stores and kernels read.

Per segment of equal depth b: codes bit-packed per output row (see pack.py), float16 scales [out, ngroups], and
zero points packed at the same depth b (a zero point is a code), and the column permutation when there is one
(xbitc.quant.segments). The arrays' names, dtypes and shapes are `planned_tensors`, sized in xbitc.size. `layout`
names the code layout; backends may repack into their own at load time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xbitc.size import NUMPY_DTYPES, perm_array, segment_arrays

from .format import QuantizedMatrix, Segment
from .pack import pack, unpack
from .segments import perm_dtype

LAYOUT = "lsb-rows"


def planned_tensors(prefix: str, shape: tuple[int, int], segs: list[Segment],
                    permuted: bool) -> dict[str, tuple[str, list[int]]]:
    """What `PackedMatrix.tensors(prefix)` will hold, before there is data: name -> (safetensors dtype, shape)."""
    out = {f"{prefix}.perm": perm_array(shape[1])} if permuted else {}
    for i, seg in enumerate(segs):
        out.update({f"{prefix}.s{i}.{part}": a for part, a in segment_arrays(shape[0], seg).items()})
    return out


@dataclass
class PackedSegment:
    seg: Segment
    codes: np.ndarray  # [out, row_bytes(ncols, bits)] uint8
    scales: np.ndarray  # [out, ngroups] float16
    zeros: np.ndarray  # [out, row_bytes(ngroups, bits)] uint8


@dataclass
class PackedMatrix:
    shape: tuple[int, int]
    segments: list[PackedSegment]
    perm: np.ndarray | None = None
    layout: str = LAYOUT

    @classmethod
    def from_quantized(cls, q: QuantizedMatrix) -> "PackedMatrix":
        segs = []
        for seg, c, s, z in zip(q.segments, q.codes, q.scales, q.zeros):
            if seg.bits == 0:
                empty = np.zeros((q.shape[0], 0), np.uint8)
                segs.append(PackedSegment(seg, empty, np.zeros((q.shape[0], 0), np.float16), empty))
            else:
                scales = np.ascontiguousarray(s, dtype=np.float16)
                segs.append(PackedSegment(seg, pack(c, seg.bits), scales, pack(z, seg.bits)))
        perm = None if q.perm is None else np.ascontiguousarray(q.perm, dtype=perm_dtype(q.shape[1]))
        return cls(tuple(q.shape), segs, perm)

    def to_quantized(self) -> QuantizedMatrix:
        codes, scales, zeros = [], [], []
        for ps in self.segments:
            seg = ps.seg
            if seg.bits == 0:
                codes.append(np.zeros((self.shape[0], seg.ncols), np.uint8))
                zeros.append(np.zeros((self.shape[0], 0), np.uint8))
            else:
                codes.append(unpack(ps.codes, seg.bits, seg.ncols))
                zeros.append(unpack(ps.zeros, seg.bits, seg.ngroups))
            scales.append(ps.scales)
        return QuantizedMatrix(self.shape, [p.seg for p in self.segments], codes, scales, zeros, self.perm)

    def dequantize(self) -> torch.Tensor:
        return self.to_quantized().dequantize()

    # -- serialisation: flat tensors for safetensors + a small JSON-able description
    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.perm is not None:
            out[f"{prefix}.perm"] = self.perm
        for i, ps in enumerate(self.segments):
            if ps.seg.bits:
                out[f"{prefix}.s{i}.codes"] = ps.codes
                out[f"{prefix}.s{i}.scales"] = ps.scales
                out[f"{prefix}.s{i}.zeros"] = ps.zeros
        return out

    def describe(self) -> dict:
        return {
            "shape": list(self.shape),
            "layout": self.layout,
            "permuted": self.perm is not None,
            "segments": [[p.seg.bits, p.seg.group_size, p.seg.start, p.seg.stop] for p in self.segments],
        }

    @classmethod
    def from_tensors(cls, prefix: str, desc: dict, tensors: dict[str, np.ndarray]) -> "PackedMatrix":
        if desc["layout"] != LAYOUT:
            raise ValueError(f"{prefix}: code layout {desc['layout']!r} is not {LAYOUT!r}")
        out_features = desc["shape"][0]
        segs = []
        for i, (bits, group, start, stop) in enumerate(desc["segments"]):
            seg = Segment(bits, group, start, stop)
            if bits:
                segs.append(
                    PackedSegment(
                        seg, tensors[f"{prefix}.s{i}.codes"], tensors[f"{prefix}.s{i}.scales"], tensors[f"{prefix}.s{i}.zeros"]
                    )
                )
            else:
                empty = np.zeros((out_features, 0), np.uint8)
                segs.append(PackedSegment(seg, empty, np.zeros((out_features, 0), np.float16), empty))
        perm = tensors[f"{prefix}.perm"] if desc["permuted"] else None
        _check(prefix, tuple(desc["shape"]), segs, perm)
        return cls(tuple(desc["shape"]), segs, perm, desc["layout"])

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.tensors("_").values())

    def column_bits(self) -> np.ndarray:
        return self.to_quantized().column_bits()


def _check(name: str, shape: tuple[int, int], segs: list[PackedSegment], perm: np.ndarray | None) -> None:
    """What kernels index by must be in range: a file that says otherwise is refused, not read out of bounds."""
    out, inp = shape
    pos = 0
    for ps in segs:
        seg = ps.seg
        if seg.start != pos or seg.stop < seg.start or not 0 <= seg.bits <= 8 or seg.group_size < 1:
            raise ValueError(f"{name}: segment {seg} does not continue the columns at {pos} (corrupt artifact)")
        pos = seg.stop
        if seg.bits:
            for part, (code, dims) in segment_arrays(out, seg).items():
                _check_array(f"{name}: {part} of segment {seg}", getattr(ps, part), code, dims)
    if pos != inp:
        raise ValueError(f"{name}: segments cover {pos} of {inp} columns (corrupt artifact)")
    if perm is not None:
        _check_array(f"{name}: its column permutation", perm, *perm_array(inp))
        p = np.asarray(perm).reshape(-1).astype(np.int64)
        if p.size != inp or p.min(initial=0) < 0 or p.max(initial=0) >= inp or np.bincount(p, minlength=inp).max() > 1:
            raise ValueError(f"{name}: its column permutation is not a permutation of {inp} columns (corrupt artifact)")


def _check_array(what: str, a: np.ndarray, code: str, dims: list[int]) -> None:
    """Exactly the dtype and shape the kernels read (xbitc.size plans them), not only as many elements."""
    if a.dtype != NUMPY_DTYPES[code] or tuple(a.shape) != tuple(dims):
        raise ValueError(f"{what} is {a.dtype} {list(a.shape)} where {np.dtype(NUMPY_DTYPES[code])} {list(dims)} is "
                         "expected (corrupt artifact)")
