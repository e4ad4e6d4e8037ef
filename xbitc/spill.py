"""Scratch space on disk for what a compile has finished with, until the artifact is written.

The block-wise compile (xbitc.streaming) packs one layer block at a time; keeping every packed block in memory until
the writer runs would grow the peak with the model. A Spill appends each finished array to one unnamed temporary
file (it has no name from the start: nothing to clean up, even after a crash) and hands back a copy-on-write map of
it, so the array costs disk, not resident memory, until something reads it: the artifact's writer, at the end, when
the passes' working memory is free again. The pages it reads stay mapped and count as the process's resident
memory (all of the packed model, by the end) unless they are handed back: `page_out`, which the writer calls after
copying each piece.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from xbitc.quant.packed import PackedMatrix, PackedSegment

ALIGN = 64  # each array starts on a cache line, as the allocator would place it
_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim the pages now; clean file pages are dropped, nothing is ever discarded
_maps: dict[int, tuple[int, int]] = {}  # id of each live map handed out -> its [first, end) addresses


def page_out(a: np.ndarray) -> None:
    """Take the pages of `a`, if it lies in a Spill's map, out of this process's resident memory: they are clean
    pages of the scratch file, read from it again if anything asks. (A page written since it was mapped is the
    process's own copy, which MADV_PAGEOUT keeps unless there is swap: no value ever changes.) Anything else, and
    systems without madvise, are left alone."""
    lo = a.__array_interface__["data"][0]
    hi = lo + a.nbytes
    if a.nbytes == 0 or not any(first <= lo and hi <= end for first, end in _maps.values()) or _libc() is None:
        return
    start = lo - lo % mmap.PAGESIZE
    _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(hi - start), _MADV_PAGEOUT)


@functools.cache
def _libc():
    try:
        lib = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return lib if hasattr(lib, "madvise") else None


class Spill:
    def __init__(self, folder: str | Path | None = None):
        self._file = tempfile.TemporaryFile(dir=folder)

    def array(self, a: np.ndarray) -> np.ndarray:
        """`a`'s values, now read from the scratch file."""
        a = np.ascontiguousarray(a)
        if a.nbytes == 0:
            return a
        end = self._file.seek(0, os.SEEK_END)
        self._file.write(b"\0" * (-end % ALIGN))
        offset = self._file.tell()
        self._file.write(a.reshape(-1).view(np.uint8).data)
        self._file.flush()
        m = np.memmap(self._file, dtype=a.dtype, mode="c", offset=offset, shape=a.shape)
        first = m.__array_interface__["data"][0]
        _maps[id(m)] = (first, first + m.nbytes)
        weakref.finalize(m, _maps.pop, id(m), None)
        return m

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: spill the bits
            return self.tensor(t.view(torch.int16)).view(torch.bfloat16)
        return torch.from_numpy(self.array(t.detach().cpu().numpy()))

    def packed(self, m: PackedMatrix) -> PackedMatrix:
        segments = [PackedSegment(s.seg, self.array(s.codes), self.array(s.scales), self.array(s.zeros))
                    for s in m.segments]
        return PackedMatrix(m.shape, segments, None if m.perm is None else self.array(m.perm), m.layout)

    def close(self) -> None:
        """Drop the file's name handle; the maps handed out keep its data until they are gone."""
        self._file.close()
