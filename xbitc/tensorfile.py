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


def save(arrays: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `arrays` (any strides; little-endian data) as the safetensors file `path`."""
    head, order = header(arrays, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for name in order:
            a = np.ascontiguousarray(arrays[name])  # a copy only where the array is a strided view
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            f.write(a.reshape(-1).view(np.uint8).data if a.size else b"")
