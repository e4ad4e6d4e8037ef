"""LLVM backend: generated gemv / gemm kernels for b-bit packed linears (x86-64 and generic LLVM targets)."""
from . import diskcache
from .codegen import GENERATOR_VERSION, KernelSpec, Target, default_spec, generate_module
from .jit import (
    CompiledKernel,
    PackedLinear,
    cache_dir,
    clear_memory_cache,
    compile_kernel,
    compile_stats,
    emit_assembly,
    emit_object,
    fingerprint,
    host_target,
)
from .layout import (
    LAYOUTS,
    Layout,
    get_layout,
    quantize_activations_q8,
    reference_gemv,
    reference_gemv_q8,
    repack,
)

__all__ = [
    "GENERATOR_VERSION", "KernelSpec", "Target", "default_spec", "generate_module", "CompiledKernel", "PackedLinear",
    "cache_dir", "clear_memory_cache", "compile_kernel", "compile_stats", "emit_assembly", "emit_object",
    "fingerprint", "host_target", "LAYOUTS", "Layout", "get_layout", "quantize_activations_q8", "reference_gemv",
    "reference_gemv_q8", "repack",
]
