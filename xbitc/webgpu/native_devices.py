"""The executor's other devices: the same plans and kernel calls as WebGPU, on CUDA or on the CPU as Metal.

A device gives the executor (executor.py) `storage(nbytes)`, `upload(array)`, `read_bytes(buffer, offset, nbytes)`,
`uniform_align` and `run_calls(prepared, calls)`; buffers are opaque to it except for a byte `size`.

  CudaDevice        an NVIDIA GPU through the driver API (backends/gpu/cuda.py): kernels printed as CUDA and built
                    by nvcc for the card's architecture when a plan first needs them (one nvcc call per batch of new
                    kernels, kept for the process), launched in order on the default stream; a buffer is a device
                    allocation freed when the last Python reference to it goes.
  MetalShimDevice   kernels printed as Metal and compiled as C++ against backends/gpu/metal_shim.h, run on the CPU
                    (backends/gpu/metal_cpu.py): a whole model through the Metal source, checking its semantics on
                    machines without Metal (not its legality as Metal, which only Apple's compiler judges).

Kernels come from the runtime's own kernel builders, never from an artifact's files.
"""
from __future__ import annotations

import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from xbitc.backends.base import BackendUnavailable
from xbitc.backends.gpu.lang import Kernel


def new_batches(kernels: list[Kernel], known: dict[Kernel, Any]) -> list[list[Kernel]]:
    """The kernels not in `known`, once each, in batches whose names are unique (one compiled module each)."""
    batches: list[list[Kernel]] = []
    for k in dict.fromkeys(k for k in kernels if k not in known):
        batch = next((b for b in batches if all(o.name != k.name for o in b)), None)
        if batch is None:
            batches.append(batch := [])
        batch.append(k)
    return batches


class CudaBuffer:
    def __init__(self, device, ptr: int, size: int):
        self.ptr, self.size = ptr, size
        weakref.finalize(self, device.free, ptr)


class CudaDevice:
    uniform_align = 16

    def __init__(self, ordinal: int = 0):
        from xbitc.backends.gpu import cuda

        try:
            self.cu = cuda.CudaDevice(ordinal)
        except cuda.NoDevice as err:
            raise BackendUnavailable(f"the cuda backend needs an NVIDIA GPU ({err}); run with --backend wgsl or "
                                     "reference here") from None
        if cuda.nvcc() is None:
            raise BackendUnavailable("the cuda backend builds its kernels with nvcc, which is not on PATH: install "
                                     "the CUDA toolkit, or run with --backend wgsl or reference")
        self._cuda = cuda
        self._workdir = tempfile.TemporaryDirectory(prefix="xbitc-cuda-")
        self._functions: dict[Kernel, Any] = {}
        self._modules: list[Any] = []

    def storage(self, nbytes: int) -> CudaBuffer:
        size = max(16, -(-nbytes // 16) * 16)
        return CudaBuffer(self.cu, self.cu.alloc(size), size)

    def upload(self, data: np.ndarray) -> CudaBuffer:
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        buf = self.storage(raw.nbytes)
        padded = np.zeros(buf.size, np.uint8)
        padded[:raw.nbytes] = raw
        self.cu.copy_in(buf.ptr, padded)
        return buf

    def read_bytes(self, buf: CudaBuffer, offset: int, nbytes: int) -> bytes:
        if not nbytes:
            return b""
        self.cu.synchronize()
        return self.cu.download(buf.ptr + offset, np.uint8, nbytes).tobytes()

    def _build(self, kernels: list[Kernel]) -> None:
        from xbitc.backends.gpu.render import CUDA

        for batch in new_batches(kernels, self._functions):
            where = Path(self._workdir.name) / f"m{len(self._modules)}"
            module = self.cu.load(self._cuda.cubin(CUDA().render_all(batch), self.cu.arch, where))
            self._modules.append(module)
            for k in batch:
                self._functions[k] = self.cu.function(module, k.name)

    def run_calls(self, prepared, calls) -> None:
        self._build([c.kernel for c in calls])
        for c in calls:
            off, size = c.slot
            params = prepared.uniforms[off:off + size] if c.kernel.params else None
            self.cu.launch(self._functions[c.kernel], c.kernel, [buf.ptr + o for buf, o, _ in c.bindings], params,
                           c.groups)


class MetalShimDevice:
    uniform_align = 16

    def __init__(self, workdir: Path | None = None):
        from xbitc.backends.gpu.metal_cpu import cxx

        if cxx() is None:
            raise BackendUnavailable("the Metal shim compiles kernels as C++: set CXX or install clang++ or g++")
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="xbitc-metal-")
        self.workdir = Path(workdir if workdir is not None else self._tmp.name)
        self._libs: dict[Kernel, Any] = {}

    def storage(self, nbytes: int) -> np.ndarray:
        return np.zeros(max(16, -(-nbytes // 16) * 16), np.uint8)

    def upload(self, data: np.ndarray) -> np.ndarray:
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        buf = self.storage(raw.nbytes)
        buf[:raw.nbytes] = raw
        return buf

    def read_bytes(self, buf: np.ndarray, offset: int, nbytes: int) -> bytes:
        return buf[offset:offset + nbytes].tobytes()

    def run_calls(self, prepared, calls) -> None:
        from xbitc.backends.gpu.metal_cpu import MetalCPU

        for batch in new_batches([c.kernel for c in calls], self._libs):
            # -O0: a model's kernels compile in a fraction of -O1's time, and a checking device needs no speed
            lib = MetalCPU(batch, self.workdir / f"lib{len(set(map(id, self._libs.values())))}", opt="-O0")
            self._libs.update((k, lib) for k in batch)
        for c in calls:
            off, size = c.slot
            params = prepared.uniforms[off:off + size] if c.kernel.params else None
            self._libs[c.kernel].run(c.kernel.name, [buf[o:o + n] for buf, o, n in c.bindings], params, c.groups)
