"""safetensors files written one tensor at a time.

safetensors' own writers take every tensor at once and build the file's bytes in memory first (the numpy writer
copies each tensor into a bytes object), so writing a model held it twice. `save` writes the bytes safetensors'
writer writes (tensors ordered by dtype, widest first, then by name; the header compact JSON padded with spaces to
a multiple of 8) from arrays copied one at a time, so peak memory grows by the largest tensor only.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import numpy as np

# safetensors' Dtype enum in declaration order: the writer sorts tensors by it, descending
_ORDER = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
_CODES = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8", np.dtype(np.int16): "I16",
          np.dtype(np.uint16): "U16", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
          np.dtype(np.uint32): "U32", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
          np.dtype(np.int64): "I64", np.dtype(np.uint64): "U64"}


def dtype_code(dtype: np.dtype) -> str:
    code = _CODES.get(np.dtype(dtype).newbyteorder("="))
    if code is None:
        raise TypeError(f"safetensors cannot store numpy dtype {dtype}")
    return code


def header(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> tuple[bytes, list[str]]:
    """The file's first bytes (length and padded JSON header) and the order the tensors' data follows it in."""
    order = sorted(arrays, key=lambda n: (-_ORDER.index(dtype_code(arrays[n].dtype)), n))
    head: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in order:
        a = arrays[name]
        head[name] = {"dtype": dtype_code(a.dtype), "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


CHUNK = 16 << 20  # bytes written (and handed to `written`) at a time


def save(arrays: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None,
         written: Callable[[np.ndarray], None] | None = None) -> None:
    """Write `arrays` (any strides; little-endian data) as the safetensors file `path`. `written` is called with
    each array's bytes once they are in the file, CHUNK bytes at a time (and with the array itself where a
    contiguous copy was written instead), e.g. to take the pages of arrays mapped from a scratch file out of memory
    again: xbitc.spill.page_out."""
    head, order = header(arrays, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for name in order:
            a = np.ascontiguousarray(arrays[name])  # a copy only where the array is a strided view
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            flat = a.reshape(-1).view(np.uint8)
            for start in range(0, flat.size, CHUNK):
                f.write(flat[start:start + CHUNK].data)
                if written is not None:
                    written(flat[start:start + CHUNK])
            if written is not None and not np.may_share_memory(a, arrays[name]):
                written(arrays[name])  # the copy's source: its pages were read too
