"""cuda: writes the model's GPU kernels as CUDA C++ into the artifact (`gpu/cuda/kernels.cu` and `gpu/kernels.json`,
backends/gpu/emit.py) for a host program to build with nvcc and launch; the weights stay in the artifact's packed
format, which the host lays out for the GPU at load.

Where this machine has an NVIDIA GPU, its driver and nvcc, xbitc's runtime runs the whole model on it: the GPU
runtime's executor (xbitc/webgpu) on its CUDA device (xbitc/webgpu/native_devices.py), kernels rendered and built
by the runtime itself, never read from the artifact. Elsewhere a cuda artifact loads on the host's CPU backend by
default, and `--backend cuda` says in one line what to use instead."""
from __future__ import annotations

from functools import lru_cache

from xbitc.ir.graph import Graph

from .base import BackendUnavailable, Capabilities
from .gpu.emit import GpuBackend


@lru_cache(maxsize=1)
def _gpu_here() -> str | None:
    """None when a CUDA GPU and nvcc are here, else why not."""
    from xbitc.webgpu.native_devices import CudaDevice

    try:
        CudaDevice()
    except BackendUnavailable as err:
        return str(err)
    return None


class CudaBackend(GpuBackend):
    name = "cuda"
    language = "cuda"

    def capabilities(self) -> Capabilities:
        return Capabilities(bit_depths=tuple(range(0, 9)), executes_here=_gpu_here() is None)

    def lower(self, graph: Graph):
        if (why := _gpu_here()) is not None:
            raise BackendUnavailable(why)
        from xbitc.webgpu.native_devices import CudaDevice
        from xbitc.webgpu.program import WgslProgram

        return WgslProgram(graph, device=CudaDevice())
