"""arm: the AArch64 entry of the CPU target table (cpu/targets.py) as a `CpuBackend` (cpu/backend.py).

`xbitc compile ... --backend arm` ships the row-lane kernels as AArch64 ELF objects (f32 and q8 for the NEON,
dotprod and i8mm levels) with the C header; `xbitc export` of such an artifact builds the C library for AArch64.
On AArch64 hosts the Python runtime runs them JIT-compiled; elsewhere an arm artifact runs on the host's backend
(every artifact carries the portable packed format).
"""
from __future__ import annotations

from .cpu.backend import CpuBackend
from .cpu.targets import AARCH64


class ArmBackend(CpuBackend):
    name = "arm"
    family = AARCH64


__all__ = ["ArmBackend"]
