"""metal: writes the model's GPU kernels as Metal Shading Language into the artifact (`gpu/metal/kernels.metal` and
`gpu/kernels.json`, backends/gpu/emit.py) for a host program to build into a Metal library and dispatch; the weights
stay in the artifact's packed format, which the host lays out for the GPU at load. xbitc's Python runtime launches no
Metal: loading a metal artifact runs it on this host's CPU backend by default, and `--backend metal` says what to use
instead."""
from __future__ import annotations

from .gpu.emit import GpuBackend


class MetalBackend(GpuBackend):
    name = "metal"
    language = "metal"
