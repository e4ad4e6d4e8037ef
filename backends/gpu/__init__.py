"""xbitc's GPU kernels: one C-style kernel language, printed as WGSL (WebGPU), CUDA and Metal.

    lang.py       the language: typed expressions, storage buffers, uniform parameters, workgroup-shared arrays,
                  barriers, loops, branches, thread indices, and the Kernel holding them (its docstring is the
                  reference for writing kernels)
    render.py     the printers: a C-style base and WGSL / CUDA / Metal subclasses that differ only where the
                  languages do
    packed.py     the packed matrix product (backends/product.py's semantics) on GPUs: the GPU layout of a
                  row-lane matrix (`GpuMatrix`) and its gather, gemv, gemm and dequant kernels; `GpuRenderer` is
                  product.py's Renderer for "wgsl", "cuda" and "metal"
    emit.py       the artifact's gpu/ for the wgsl, cuda and metal backends: every kernel a model launches as source,
                  and kernels.json (interfaces, the packed layout's rules); `GpuBackend`, their shared base
    webgpu.py     running kernels through wgpu-py (Mesa's lavapipe where there is no GPU); WGSL errors name the
                  kernel, line and column
    cuda.py       nvcc + the CUDA driver API through ctypes (tests/device, bench/gpu_kernels.py)
    metal_cpu.py  generated Metal compiled as C++ against metal_shim.h and run on the CPU, threads of a workgroup
                  as fibers switching at barriers: checks semantics, not Metal legality

Nothing here imports wgpu or loads a GPU driver until asked to run something.
"""
from .lang import Kernel
from .packed import GpuMatrix, GpuRenderer, kernels
from .render import CUDA, WGSL, Metal

__all__ = ["CUDA", "WGSL", "GpuMatrix", "GpuRenderer", "Kernel", "Metal", "kernels"]
