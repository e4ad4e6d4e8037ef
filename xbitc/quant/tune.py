"""Scales as trainable parameters: a QuantizedMatrix whose integer codes and zero points stay fixed while each
group's scale moves, so the task cost can be descended after quantization without changing a single stored bit.

The scale is parametrised multiplicatively, s = s0 * exp(t) with t starting at 0: a step of the optimiser then means
the same relative change for a 1e-4 scale as for a 1e-1 one, and s can never change sign. `commit` rounds the result
to float16, the format the artifact stores.

The float matrix is built by a custom autograd function that saves nothing: its backward rebuilds the matrix from
its own codes (d loss / d t is the group's sum of gradient times weight). Letting autograd record the product
instead would keep a float32 copy of every code (and a full-size copy of the repeated scales) per step, the largest
memory of the whole compile.
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

from xbitc.ir.interp import PermutedColumns
from xbitc.spill import Spill, as_tensor, page_out

from .format import QuantizedMatrix

FP16_TINY = 2.0**-24  # the smallest positive float16: a tuned scale never rounds to 0
FP16_MAX = 65504.0  # nor overflows to inf
SPILL_BYTES = 64 << 10  # smaller saved tensors stay in memory: a map of each would cost more than it holds


class _Segment:
    """One stored segment: its codes (the matrix's own uint8 array, not copied) and zero points, and the scales with
    their training state (log-scale, gradient, Adam's two moments), all [out, ngroups] float32 arrays placed by
    `place` (in memory, or in a scratch file for a model larger than memory)."""

    def __init__(self, index: int, start: int, ncols: int, group: int, codes, zeros, scales, place):
        self.index, self.start, self.ncols, self.group = index, start, ncols, group
        self.stored_codes = codes  # maybe in a scratch file (xbitc.spill): handed back after each read
        self.codes = torch.from_numpy(codes)  # [out, ncols] uint8
        # row-major whatever the arrays' order (GPTQ writes them transposed): the build's views depend on it
        self.arrays = [place(np.ascontiguousarray(a, dtype=np.float32)) for a in (zeros, scales)]
        self.arrays += [place(np.zeros(scales.shape, np.float32)) for _ in range(4)]
        self.zeros, self.base, self.log_scale, grad, *moments = map(torch.from_numpy, self.arrays)
        self.log_scale.requires_grad_(True)
        self.log_scale.grad = grad  # accumulated into in place, so it stays where it was placed
        self.moments = moments

    def page_out(self) -> None:
        """Hand back the pages of the codes and the state if they lie in a scratch file (else nothing)."""
        for a in (self.stored_codes, *self.arrays):
            page_out(a)

    def scales(self, log_scale: torch.Tensor) -> torch.Tensor:
        return self.base * torch.exp(log_scale)

    def by_group(self, t: torch.Tensor) -> list[tuple[torch.Tensor, slice]]:
        """Views of t ([out, ncols]) as [out, groups, width]: its whole groups, then its partial last group if any,
        each with the slice of group indices it covers. Views, so the build writes into the matrix in place."""
        whole = self.ncols // self.group
        end = whole * self.group
        views = [(t[:, :end].unflatten(1, (whole, self.group)), slice(0, whole))] if whole else []
        if end < self.ncols:
            views.append((t[:, end:].unsqueeze(1), slice(whole, whole + 1)))
        return views

    def build_into(self, w: torch.Tensor, scales: torch.Tensor) -> None:
        """w ([out, ncols], a view of the matrix) = (codes - zero) * scale, in place: no temporary the size of the
        matrix, and one rounding per weight ((codes - zero) is exact in float32)."""
        for (wv, groups), (cv, _) in zip(self.by_group(w), self.by_group(self.codes)):
            wv.copy_(cv)
            wv.sub_(self.zeros[:, groups, None])
            wv.mul_(scales[:, groups, None])


class _Build(torch.autograd.Function):
    """w = (codes - zero) * scale per segment, in stored column order (each segment a contiguous slice) or, with
    in_order, gathered back into the original column order (an index_select of every element: as dear as the build
    itself, which is why the tune pass asks for the stored order)."""

    @staticmethod
    def forward(ctx, tuner: "TunableScales", in_order: bool, *log_scales: torch.Tensor) -> torch.Tensor:
        ctx.tuner, ctx.in_order = tuner, in_order
        w = tuner.built(log_scales)
        ctx.save_for_backward(*log_scales)
        return w.index_select(1, tuner.inverse) if in_order and tuner.inverse is not None else w

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor):
        tuner = ctx.tuner
        if ctx.in_order and tuner.inverse is not None:
            grad_w = grad_w.index_select(1, tuner.columns)  # to stored order
        # w = (code - zero) * s0 * exp(t), so d loss / d t = sum over the group of grad * w
        w = tuner.built(ctx.saved_tensors)
        grads = []
        for seg in tuner.segments:
            cols = slice(seg.start, seg.start + seg.ncols)
            grad_t = torch.empty_like(seg.log_scale)
            for (gv, groups), (wv, _) in zip(seg.by_group(grad_w[:, cols]), seg.by_group(w[:, cols])):
                grad_t[:, groups] = torch.linalg.vecdot(gv, wv)
            grads.append(grad_t)
        return (None, None, *grads)


class TunableScales:
    """A QuantizedMatrix's scales made trainable. With `spill`, the scales' training state waits in that scratch file
    and is handed back after every use (a build, a gradient, an optimizer step): a model larger than memory then
    holds one matrix's state at a time, not every group's (xbitc.streaming)."""

    def __init__(self, q: QuantizedMatrix, spill: Spill | None = None):
        self.q = q
        place = spill.array if spill is not None else (lambda a: a)
        self.segments = [
            _Segment(k, seg.start, seg.ncols, seg.group_size, codes, zeros, scales, place)
            for k, (seg, codes, scales, zeros) in enumerate(zip(q.segments, q.codes, q.scales, q.zeros))
            if seg.bits
        ]
        self.dropped = [seg for seg in q.segments if not seg.bits]
        for a in [*q.codes, *q.scales, *q.zeros]:  # copied above, or read again at each build
            page_out(a)
        self.page_out()
        if spill is not None:  # each gradient leaves memory once autograd has added to it
            for seg in self.segments:
                seg.log_scale.register_post_accumulate_grad_hook(lambda p, seg=seg: seg.page_out())
        # stored column j holds original column columns[j]; inverse[i] is the stored column of original column i
        cols = np.arange(q.shape[1]) if q.perm is None else np.asarray(q.perm, dtype=np.int64)
        self.columns = torch.from_numpy(cols.astype(np.int64))
        identity = q.perm is None or np.array_equal(cols, np.arange(q.shape[1]))
        self.inverse = None if identity else torch.from_numpy(np.argsort(cols))

    def page_out(self) -> None:
        for seg in self.segments:
            seg.page_out()

    def built(self, log_scales) -> torch.Tensor:
        """The [out, in] float32 matrix at these log-scales, in stored column order (not differentiable)."""
        out, inp = self.q.shape
        w = torch.empty(out, inp)
        for seg in self.dropped:  # dropped columns are 0
            w[:, seg.start : seg.stop] = 0
        for seg, t in zip(self.segments, log_scales):
            seg.build_into(w[:, seg.start : seg.start + seg.ncols], seg.scales(t.detach()))
            seg.page_out()
        return w

    def parameters(self) -> list[torch.Tensor]:
        return [seg.log_scale for seg in self.segments]

    def weight(self) -> torch.Tensor:
        """The [out, in] float32 matrix at the current scales, differentiable in them."""
        return self._build(in_order=True)

    def weight_as_stored(self) -> torch.Tensor | PermutedColumns:
        """The same matrix for an interpreter: with its columns as stored when they are permuted (a linear gathers
        its input instead), which costs a fraction of putting the columns back in order."""
        if self.inverse is None:
            return self._build(in_order=True)
        return PermutedColumns(self._build(in_order=False), self.columns, self.inverse)

    def _build(self, in_order: bool) -> torch.Tensor:
        w = _Build.apply(self, in_order, *self.parameters())
        if _ACTIVE and w.requires_grad:
            _register(w, self, in_order)
        return w

    @torch.no_grad()
    def commit(self) -> None:
        """Write the tuned scales into the matrix as float16 and restart from them."""
        for seg in self.segments:
            s = seg.scales(seg.log_scale)
            # a diverged step keeps its start
            s = torch.where(torch.isfinite(s), s, seg.base).clamp(FP16_TINY, FP16_MAX)
            stored = self.q.scales[seg.index]
            if stored.flags.writeable:  # in place: in a scratch file, it stays there
                stored[...] = s.numpy()
            else:
                self.q.scales[seg.index] = stored = s.numpy().astype(np.float16)
            seg.base.copy_(torch.from_numpy(stored.astype(np.float32)))
            seg.log_scale.zero_()
            page_out(stored)
            seg.page_out()


class ScaleAdam:
    """Adam over every tuner's log-scales, stepped one matrix at a time so that each matrix's training state can
    leave memory after its step (TunableScales' `spill`). Each parameter's arithmetic is torch's Adam's (on CPU it
    updates one tensor at a time); the moments are the segments' own arrays and the gradients are zeroed in place."""

    def __init__(self, tuners, lr: float):
        self.lr = lr
        self.steps = []
        for tuner in tuners:
            if not tuner.segments:  # every column dropped
                continue
            opt = torch.optim.Adam(tuner.parameters(), lr=lr, foreach=False)
            for seg in tuner.segments:
                opt.state[seg.log_scale] = {"step": torch.tensor(0.0), "exp_avg": seg.moments[0],
                                            "exp_avg_sq": seg.moments[1]}
            self.steps.append((opt, tuner))

    def zero_grad(self) -> None:
        for _, tuner in self.steps:
            for seg in tuner.segments:
                seg.log_scale.grad.zero_()
                seg.page_out()

    def step(self, lr_factor: float = 1.0) -> None:
        for opt, tuner in self.steps:
            for group in opt.param_groups:
                group["lr"] = self.lr * lr_factor
            opt.step()
            tuner.page_out()


class _Rebuild(NamedTuple):
    """What autograd keeps instead of a built matrix (or a view of it): enough to rebuild that view."""

    tuner: TunableScales
    in_order: bool
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset of the view relative to the matrix


# one map per open rebuilt_when_saved: storage address -> (weak reference to the matrix built there, its tuner, its
# column order); the weak reference proves the address still belongs to that matrix
_ACTIVE: list[dict[int, tuple[weakref.ref, TunableScales, bool]]] = []


@contextmanager
def rebuilt_when_saved(spill: Spill | None = None):
    """Within this context, a matrix built by TunableScales (weight() or weight_as_stored()) that autograd saves for
    backward (as a linear layer saves its weight, or a view of it) is saved as a note and rebuilt from the codes, in
    the same column order, when backward needs it. With `spill`, every other float tensor of SPILL_BYTES or more
    that autograd saves (a whole model's activations, for a model larger than memory) waits in that scratch file,
    once however many ops save it, and is read back by the backward that needs it."""
    built: dict[int, tuple[weakref.ref, TunableScales, bool]] = {}
    spilled: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}  # weak both: a copy read back is unmapped when used

    def pack(t: torch.Tensor):
        if t.layout is torch.strided and t.device.type == "cpu":
            entry = built.get(t.untyped_storage().data_ptr())
            w = entry[0]() if entry is not None else None
            if w is not None and t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr():
                return _Rebuild(entry[1], entry[2], tuple(t.shape), t.stride(), t.storage_offset() - w.storage_offset())
            if spill is not None and t.is_floating_point() and t.numel() * t.element_size() >= SPILL_BYTES:
                return _spilled(t, spill, spilled)
        return t

    def unpack(saved):
        if not isinstance(saved, _Rebuild):
            return saved
        with torch.no_grad():
            w = saved.tuner._build(saved.in_order)
        return w.as_strided(saved.shape, saved.stride, w.storage_offset() + saved.offset)

    _ACTIVE.append(built)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _ACTIVE.remove(built)


def _spilled(t: torch.Tensor, spill: Spill, spilled: dict) -> torch.Tensor:
    """`t` read from the scratch file: its whole storage is written once (however many views of it are saved) and
    the view rebuilt on it with the same strides, so backward's kernels add in the same order as from memory. A view
    into a storage more than twice its size stays in memory (only a contiguous one is copied alone)."""
    storage, nbytes = t.untyped_storage(), t.numel() * t.element_size()
    if storage.nbytes() <= 2 * nbytes and storage.nbytes() % t.element_size() == 0:
        key = (storage.data_ptr(), t.dtype)
        entry = spilled.get(key)
        array = entry[1]() if entry is not None and entry[0]() is not None else None
        if array is None:  # (its live base tensor proves the address still holds this storage)
            array = spill.tensor_array(t.detach().as_strided((storage.nbytes() // t.element_size(),), (1,), 0))
            # the map's array lives as long as any tensor read from it: what the note's weak reference follows
            spilled[key] = (weakref.ref(t if t._base is None else t._base), weakref.ref(array))
        return as_tensor(array, t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())
    return spill.tensor(t) if t.is_contiguous() else t


def _register(w: torch.Tensor, tuner: TunableScales, in_order: bool) -> None:
    for built in _ACTIVE:
        built[w.untyped_storage().data_ptr()] = (weakref.ref(w), tuner, in_order)
