"""Bit packing of b-bit integer codes (b in 1..8).

Canonical layout ("lsb-rows"): every row of a [rows, n] code matrix becomes its own little-endian bit stream,
code j occupying bits j*b .. j*b+b-1 (bit 0 of a byte first). A row takes ceil(n*b/8) bytes, so rows start on byte
boundaries and a kernel can address row r directly. Depths that divide 8 (1, 2, 4, 8) never straddle a byte;
3, 5, 6, 7 do, which the stream form handles without padding waste.
"""
from __future__ import annotations

import numpy as np

MAX_BITS = 8


def row_bytes(n: int, bits: int) -> int:
    """Bytes one packed row of n codes at `bits` takes."""
    return (n * bits + 7) // 8


def packed_nbytes(rows: int, n: int, bits: int) -> int:
    return rows * row_bytes(n, bits)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bit depth must be 1..{MAX_BITS}, got {bits}")


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack a [rows, n] array of codes in [0, 2**bits) into a [rows, row_bytes(n, bits)] uint8 array."""
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack expects a 2-D code matrix, got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes outside [0, {1 << bits}) cannot be packed at {bits} bits")
    codes = codes.astype(np.uint8)
    rows, n = codes.shape
    if bits == 8:
        return codes.copy()
    shifts = np.arange(bits, dtype=np.uint8)
    bitplanes = (codes[:, :, None] >> shifts) & 1  # [rows, n, bits], LSB first
    stream = bitplanes.reshape(rows, n * bits)
    return np.packbits(stream, axis=1, bitorder="little")


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack`: [rows, row_bytes(n, bits)] uint8 -> [rows, n] uint8 codes."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    rows = packed.shape[0]
    if packed.ndim != 2 or packed.shape[1] != row_bytes(n, bits):
        raise ValueError(
            f"packed array of shape {packed.shape} does not hold {n} codes of {bits} bits per row "
            f"(expected {row_bytes(n, bits)} bytes per row)"
        )
    if bits == 8:
        return packed.copy()
    stream = np.unpackbits(packed, axis=1, count=n * bits, bitorder="little").reshape(rows, n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint8)
    return (stream * weights).sum(axis=2, dtype=np.uint16).astype(np.uint8)
