"""Keep the C heap from holding on to memory the compile has freed (glibc only; elsewhere these are no-ops).

glibc serves an allocation from its heap unless it is larger than the mmap threshold, and after freeing a large
mmapped block it raises that threshold (up to 32 MB). A compile frees such blocks constantly (GPTQ's Hessians,
activations of 512-token windows), so soon nearly every tensor comes from the heap, where freed memory stays
resident wherever a live block sits above it: a pass's peak is then the previous passes' leftovers plus its own.
Fixing the threshold (which also turns the adjustment off) makes every tensor of at least MMAP_THRESHOLD bytes its
own mapping, returned to the system the moment it is freed; what remains in the heap is trimmed between passes.

The threshold trades memory for time: every mapping is fresh pages the kernel must fault in and zero. SmolLM2 at
3.0 bpw (bench/cost.py, alone): at 1 MB (every activation and weight-sized temporary mapped) the peak fell from 4.34
to 3.04 GB but the compile took 670 s instead of 550 s; 8 MB keeps the many 1-4 MB activations and matrices in the
heap, reused without faults, and maps the attention scores, logits and the embedding-sized blocks.
"""
from __future__ import annotations

import ctypes
from contextlib import contextmanager

MMAP_THRESHOLD = 8 << 20  # bytes: see the module docstring
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc


def bound_retention(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of `threshold` bytes or more from their own mappings, for the rest of the process."""
    lib = _glibc()
    return bool(lib) and bool(lib.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def release() -> None:
    """Give the heap's free pages back to the system (between passes)."""
    lib = _glibc()
    if lib:
        lib.malloc_trim(0)


@contextmanager
def mapped_above(threshold: int):
    """Within this context, serve allocations of `threshold` bytes or more from their own mappings (then back to
    MMAP_THRESHOLD): for work that frees many mid-sized blocks in an order the heap cannot reuse, such as a forward
    pass whose activations are copied to disk as it goes (passes/tune.py on a model larger than memory)."""
    bound_retention(threshold)
    try:
        yield
    finally:
        bound_retention(MMAP_THRESHOLD)
        release()
