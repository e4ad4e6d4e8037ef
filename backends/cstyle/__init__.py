"""The C renderer of the packed product (backends/product.py): C11 source for the C library's portable kernels. GPU
languages (WGSL, CUDA, Metal) have their own kernel language and printers in backends/gpu/, since their kernels
need what C has no words for (workgroups, shared memory, barriers, address spaces)."""
from .c import CRenderer

__all__ = ["CRenderer"]
