"""Scales as trainable parameters: a QuantizedMatrix whose integer codes and zero points stay fixed while each
group's scale moves, so the task cost can be descended after quantization without changing a single stored bit.

The scale is parametrised multiplicatively, s = s0 * exp(t) with t starting at 0: a step of the optimiser then means
the same relative change for a 1e-4 scale as for a 1e-1 one, and s can never change sign. `commit` rounds the result
to float16, the format the artifact stores.

The float matrix is built by a custom autograd function that saves nothing: its backward recomputes the per-group
sums from the matrix's own codes. Letting autograd record the product instead would keep a float32 copy of
every code (and a full-size copy of the repeated scales) per step, the largest memory of the whole compile.
For the same reason `rebuilt_when_saved` stops the layers that use the matrix from keeping it for their backward:
what autograd saves is a note to rebuild it from the codes (the scales do not move between a forward and its
backward), so one float32 matrix is alive at a time instead of the whole model's.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch

from .format import QuantizedMatrix

FP16_TINY = 2.0**-24  # the smallest positive float16: a tuned scale never rounds to 0
FP16_MAX = 65504.0  # nor overflows to inf


class _Segment:
    """One stored segment: its codes (the matrix's own uint8 array, not copied) and zero points, and the scales."""

    def __init__(self, index: int, start: int, ncols: int, group: int, codes, zeros, scales):
        self.index, self.start, self.ncols, self.group = index, start, ncols, group
        self.codes = torch.from_numpy(codes)  # [out, ncols] uint8
        self.zeros = torch.from_numpy(zeros.astype(np.float32))  # [out, ngroups]
        self.base = torch.from_numpy(scales.astype(np.float32))
        self.log_scale = torch.zeros(scales.shape, requires_grad=True)

    def scales(self, log_scale: torch.Tensor) -> torch.Tensor:
        return self.base * torch.exp(log_scale)

    def centred(self) -> torch.Tensor:
        """codes - zero as float32 [out, ngroups, group], zero padded to whole groups (exact small integers)."""
        out, ngroups = self.zeros.shape
        q = torch.nn.functional.pad(self.codes, (0, ngroups * self.group - self.ncols)).float()
        q = q.view(out, ngroups, self.group) - self.zeros[:, :, None]
        if ngroups * self.group != self.ncols:  # padding columns carry no weight
            q.view(out, -1)[:, self.ncols :] = 0
        return q


class _Build(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tuner: "TunableScales", *log_scales: torch.Tensor) -> torch.Tensor:
        ctx.tuner = tuner
        out, inp = tuner.q.shape
        w = torch.zeros(out, inp)  # dropped columns stay 0
        for seg, t in zip(tuner.segments, log_scales):
            s = seg.scales(t)
            ws = (seg.centred() * s[:, :, None]).reshape(out, -1)[:, : seg.ncols]
            w[:, tuner.columns[seg.start : seg.start + seg.ncols]] = ws
        ctx.save_for_backward(*log_scales)
        return w

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor):
        tuner = ctx.tuner
        grads = []
        for seg, t in zip(tuner.segments, ctx.saved_tensors):
            g = grad_w[:, tuner.columns[seg.start : seg.start + seg.ncols]]
            centred = seg.centred()
            g = torch.nn.functional.pad(g, (0, centred.shape[1] * seg.group - seg.ncols))
            grad_s = (g.view_as(centred) * centred).sum(2)  # d loss / d scale, per group
            grads.append(grad_s * seg.scales(t))  # chain rule through s = s0 * exp(t)
        return (None, *grads)


class TunableScales:
    def __init__(self, q: QuantizedMatrix):
        self.q = q
        self.segments = [
            _Segment(k, seg.start, seg.ncols, seg.group_size, codes, zeros, scales)
            for k, (seg, codes, scales, zeros) in enumerate(zip(q.segments, q.codes, q.scales, q.zeros))
            if seg.bits
        ]
        # stored column j holds original column columns[j]
        cols = np.arange(q.shape[1]) if q.perm is None else np.asarray(q.perm, dtype=np.int64)
        self.columns = torch.from_numpy(cols.astype(np.int64))

    def parameters(self) -> list[torch.Tensor]:
        return [seg.log_scale for seg in self.segments]

    def weight(self) -> torch.Tensor:
        """The [out, in] float32 matrix at the current scales, differentiable in them."""
        w = _Build.apply(self, *self.parameters())
        if _ACTIVE and w.requires_grad:
            _register(w, self)
        return w

    @torch.no_grad()
    def commit(self) -> None:
        """Write the tuned scales into the matrix as float16 and restart from them."""
        for seg in self.segments:
            s = seg.scales(seg.log_scale)
            s = torch.where(torch.isfinite(s), s, seg.base).clamp(FP16_TINY, FP16_MAX)  # a diverged step keeps its start
            self.q.scales[seg.index] = s.numpy().astype(np.float16)
            seg.base.copy_(torch.from_numpy(self.q.scales[seg.index].astype(np.float32)))
            seg.log_scale.zero_()


class _Rebuild(NamedTuple):
    """What autograd keeps instead of a built matrix (or a view of it): enough to rebuild that view."""

    tuner: TunableScales
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset of the view relative to the matrix


# one map per open rebuilt_when_saved: storage address -> (weak reference to the matrix built there, its tuner);
# the weak reference proves the address still belongs to that matrix
_ACTIVE: list[dict[int, tuple[weakref.ref, TunableScales]]] = []


@contextmanager
def rebuilt_when_saved():
    """Within this context, a matrix built by TunableScales.weight() that autograd saves for backward (as a linear
    layer saves its weight, or a view of it) is saved as a note and rebuilt from the codes when backward needs it."""
    built: dict[int, tuple[weakref.ref, TunableScales]] = {}

    def pack(t: torch.Tensor):
        if t.layout is torch.strided and t.device.type == "cpu":
            entry = built.get(t.untyped_storage().data_ptr())
            w = entry[0]() if entry is not None else None
            if w is not None and t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr():
                return _Rebuild(entry[1], tuple(t.shape), t.stride(), t.storage_offset() - w.storage_offset())
        return t

    def unpack(saved):
        if not isinstance(saved, _Rebuild):
            return saved
        with torch.no_grad():
            w = saved.tuner.weight()
        return w.as_strided(saved.shape, saved.stride, w.storage_offset() + saved.offset)

    _ACTIVE.append(built)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _ACTIVE.remove(built)


def _register(w: torch.Tensor, tuner: TunableScales) -> None:
    for built in _ACTIVE:
        built[w.untyped_storage().data_ptr()] = (weakref.ref(w), tuner)
