"""Scratch space on disk for what a compile has finished with, until the artifact is written.

The block-wise compile (xbitc.streaming) packs one layer block at a time; keeping every packed block in memory until
the writer runs would grow the peak with the model. A Spill appends each finished array to one unnamed temporary
file (it has no name from the start: nothing to clean up, even after a crash) and hands back a shared map of it (a
write lands in the file, as it would in memory), so the array costs disk, not resident memory, until something reads
it: the artifact's writer, at the end, when the passes' working memory is free again. The pages it reads stay
mapped and count as the process's resident memory (all of the packed model, by the end) unless they are handed back:
`page_out`, which the writer calls after copying each piece.
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import mmap
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from xbitc.quant.format import QuantizedMatrix
from xbitc.quant.packed import PackedMatrix, PackedSegment

ALIGN = 64  # each array starts on a cache line, as the allocator would place it
# Take pages out of this process's page tables: a shared file map's pages stay in the page cache and the file, so
# nothing is lost and nothing is written. (MADV_PAGEOUT evicts from the page cache instead: it writes dirty scratch
# pages out at once, and it skips a page-cache folio mapped twice or only in part, as the pages at arrays' boundaries
# are: a third of what was read stayed resident.)
_MADV_DONTNEED = 4
# each live map handed out, as (first, end, id of what owns it), sorted: maps never overlap, so the one that could
# hold an address is the last to start at or before it (a model's thousands of maps, looked up at every page-out)
_maps: list[tuple[int, int, int]] = []


def _add_map(entry: tuple[int, int, int]) -> None:
    bisect.insort(_maps, entry)


def _drop_map(entry: tuple[int, int, int]) -> None:
    i = bisect.bisect_left(_maps, entry)
    if i < len(_maps) and _maps[i] == entry:
        del _maps[i]


def page_out(a: np.ndarray) -> None:
    """Take the pages of `a`, if it lies in a Spill's map, out of this process's resident memory: they stay in the
    scratch file, read from it again if anything asks. Anything else, and systems without madvise, are left
    alone."""
    lo, nbytes = a.__array_interface__["data"][0], a.nbytes
    if _libc() is None or not _mapped(lo, nbytes):
        return
    start = lo - lo % mmap.PAGESIZE
    _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(lo + nbytes - start), _MADV_DONTNEED)


def in_scratch(a: np.ndarray | torch.Tensor) -> bool:
    """Whether `a`'s bytes lie in a map a Spill handed out (and still holds)."""
    if isinstance(a, torch.Tensor):
        return _mapped(a.data_ptr(), a.numel() * a.element_size())
    return _mapped(a.__array_interface__["data"][0], a.nbytes)


def _mapped(lo: int, nbytes: int) -> bool:
    i = bisect.bisect_right(_maps, (lo, float("inf"))) - 1
    return nbytes > 0 and 0 <= i < len(_maps) and _maps[i][0] <= lo and lo + nbytes <= _maps[i][1]


@functools.cache
def _libc():
    try:
        lib = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if not hasattr(lib, "madvise"):
        return None
    if hasattr(lib, "mmap"):
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return lib


def _map(file, offset: int, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """A shared map of `file`'s bytes at `offset` as an array, unmapped when the array and every view of it are
    gone. Mapped with the C library's mmap: Python's (and so np.memmap) duplicates the file descriptor
    for every map, and a large model's thousands of spilled arrays would pass the usual limit of 1024 open files."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mmap"):
        m = np.memmap(file, dtype=dtype, mode="r+", offset=offset, shape=shape)  # shared, as the map below
        first = m.__array_interface__["data"][0]
        entry = (first, first + m.nbytes, id(m))
        _add_map(entry)
        weakref.finalize(m, _drop_map, entry)
        return m
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = nbytes + offset - start
    addr = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, file.fileno(), start)
    if addr in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise OSError(err, f"cannot map the scratch file: {os.strerror(err)}")
    buffer = (ctypes.c_char * nbytes).from_address(addr + offset - start)
    entry = (addr + offset - start, addr + length, id(buffer))
    _add_map(entry)
    weakref.finalize(buffer, _unmap, libc, entry, addr, length)  # every view of the array holds `buffer`
    return np.frombuffer(buffer, dtype).reshape(shape)


def _unmap(libc, entry: tuple[int, int, int], addr: int, length: int) -> None:
    _drop_map(entry)
    libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(length))


def as_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over `array` (Spill.tensor_array's) in `dtype`, sharing its memory."""
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


class Spill:
    def __init__(self, folder: str | Path | None = None):
        self._file = tempfile.TemporaryFile(dir=folder)

    def array(self, a: np.ndarray) -> np.ndarray:
        """`a`'s values, now read from the scratch file, in the same memory order (what reads them may depend on it:
        a reduction over a transposed array adds in another order)."""
        if a.flags.f_contiguous and not a.flags.c_contiguous:
            return self.array(a.T).T
        a = np.ascontiguousarray(a)
        if a.nbytes == 0:
            return a
        end = self._file.seek(0, os.SEEK_END)
        self._file.write(b"\0" * (-end % ALIGN))
        offset = self._file.tell()
        self._file.write(a.reshape(-1).view(np.uint8).data)
        self._file.flush()
        return _map(self._file, offset, a.dtype, a.shape)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        return as_tensor(self.tensor_array(t), t.dtype)

    def tensor_array(self, t: torch.Tensor) -> np.ndarray:
        """`t`'s elements on the map as numpy (bfloat16, which numpy lacks, as its int16 bits); as_tensor reads
        them back as `t`'s dtype."""
        bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return self.array(bits.detach().cpu().numpy())

    def quantized(self, q: QuantizedMatrix) -> QuantizedMatrix:
        """`q` (unpacked codes: a byte each) read from the scratch file, for passes that still change its scales."""
        out = QuantizedMatrix(q.shape, q.segments, [self.array(c) for c in q.codes], [self.array(s) for s in q.scales],
                              [self.array(z) for z in q.zeros], None if q.perm is None else self.array(q.perm), q.meta)
        for a in [*out.codes, *out.zeros]:  # the constructor's checks read them
            page_out(a)
        return out

    def packed(self, m: PackedMatrix) -> PackedMatrix:
        segments = [PackedSegment(s.seg, self.array(s.codes), self.array(s.scales), self.array(s.zeros))
                    for s in m.segments]
        return PackedMatrix(m.shape, segments, None if m.perm is None else self.array(m.perm), m.layout)

    def close(self) -> None:
        """Drop the file's name handle; the maps handed out keep its data until they are gone."""
        self._file.close()
