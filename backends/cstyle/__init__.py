"""C-style renderers of the packed product (backends/product.py): C source now; CUDA, Metal and WGSL are meant to
subclass `CRenderer`, overriding its types, qualifiers and loop heads."""
from .c import CRenderer

__all__ = ["CRenderer"]
