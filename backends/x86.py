"""x86: packed linears run through the generated LLVM kernels (backends/llvm) on x86-64 hosts.

The x86-64 entry of the CPU target table (cpu/targets.py) as a `CpuBackend` (cpu/backend.py): `emit` writes the
row-lane kernels as one ELF object per activation strategy (f32, q8) and x86-64 level (baseline x86-64 / SSE2,
x86-64-v3 / AVX2+FMA+F16C, x86-64-v4 / AVX-512), plus the C header `kernels/xbitc_kernels.h`.
"""
from __future__ import annotations

from .cpu.backend import CpuBackend, CpuBackendUnavailable
from .cpu.targets import X86_64


class X86BackendUnavailable(CpuBackendUnavailable):
    """The x86 backend was asked to execute on a host that is not x86-64."""


def is_x86_host() -> bool:
    return X86_64.runs_here()


class X86Backend(CpuBackend):
    name = "x86"
    family = X86_64
    unavailable = X86BackendUnavailable


__all__ = ["X86Backend", "X86BackendUnavailable", "is_x86_host"]
