"""wgsl: runs a compiled artifact on a WebGPU device through wgpu-py (extra `xbitc[gpu]`), the whole graph on the
device: every core op a WGSL kernel (backends/gpu/ops.py, ops_nn.py), packed matrices in the GPU row-lane layout
(backends/gpu/packed.py), the decode step's key / value caches kept on the device. On a machine without a GPU, Mesa's
lavapipe (Vulkan on the CPU) is the adapter. The runtime is xbitc/webgpu; it renders its kernels itself.

Like cuda and metal, it also writes the model's kernels into the artifact (`gpu/wgsl/*.wgsl` and
`gpu/kernels.json`, backends/gpu/emit.py) for other WebGPU hosts."""
from __future__ import annotations

from functools import lru_cache

from xbitc.ir.graph import Graph

from .base import Capabilities
from .gpu.emit import GpuBackend


@lru_cache(maxsize=1)
def _adapter_found() -> bool:
    from .gpu.webgpu import NoAdapter, adapter

    try:
        adapter()
    except NoAdapter:
        return False
    return True


class WgslBackend(GpuBackend):
    name = "wgsl"
    language = "wgsl"

    def capabilities(self) -> Capabilities:
        return Capabilities(bit_depths=tuple(range(0, 9)), executes_here=_adapter_found())

    def lower(self, graph: Graph):
        from xbitc.webgpu.program import WgslProgram

        return WgslProgram(graph)
