"""Parameters on the device, uploaded once (on first use) and shared by every graph over them (a model's main graph
and its decode step): float tensors as float32 whatever their stored type, integers as int32, bools as 0/1 words;
packed matrices in backends/gpu/packed.py's GPU layout (the row-lane words, pieces, src and dst tables), which its
kernels read for linears and, through the layout's row read, for embedding lookups."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from xbitc.quant.packed import PackedMatrix

from .device import Device

DEVICE_NUMPY = {"float32": np.float32, "int32": np.int32, "bool": np.uint32}


def device_array(t: torch.Tensor) -> np.ndarray:
    """A tensor in its device element type (int64 ids and positions fit int32; bool as 32-bit 0/1)."""
    t = t.detach()
    if t.is_floating_point():
        return t.to(torch.float32).contiguous().numpy()
    if t.dtype is torch.bool:
        return t.contiguous().numpy().astype(np.uint32)
    a = t.contiguous().numpy()
    if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
        raise ValueError("an integer tensor holds values outside int32, the widest integer WGSL has")
    return a.astype(np.int32)


def gpu_matrix(pm: PackedMatrix):
    """The GPU layout of a packed matrix (its live segments as row-lane records, the permutation folded in)."""
    from xbitc.backends.cpu.rows import rowlane_records
    from xbitc.backends.gpu.packed import GpuMatrix

    out, inp = pm.shape
    records = rowlane_records([ps for ps in pm.segments if ps.seg.bits and ps.seg.ncols], out)
    perm = None if pm.perm is None else np.asarray(pm.perm).astype(np.int64)
    return GpuMatrix.from_records(records, out, inp, perm)


class Weights:
    def __init__(self, device: Device, params: dict[str, Any]):
        self.device, self.params = device, params
        self._dense: dict[str, Any] = {}
        self._packed: dict[str, tuple[Any, dict[str, Any]]] = {}

    def dense(self, name: str):
        """The buffer of a float / integer / bool parameter."""
        if name not in self._dense:
            value = self.params[name]
            t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
            self._dense[name] = self.device.upload(device_array(t))
        return self._dense[name]

    def packed(self, name: str) -> tuple[Any, dict[str, Any]]:
        """(GpuMatrix, its buffers by part: words, pieces, src, dst) of a packed parameter."""
        if name not in self._packed:
            m = gpu_matrix(self.params[name])
            parts = {"words": m.words, "pieces": m.pieces, "src": m.src, "dst": m.dst}
            self._packed[name] = (m, {part: self.device.upload(a) for part, a in parts.items()})
        return self._packed[name]

    @property
    def nbytes(self) -> int:
        """Bytes uploaded so far."""
        return sum(b.size for b in self._dense.values()) + sum(b.size for _, bs in self._packed.values()
                                                                for b in bs.values())
