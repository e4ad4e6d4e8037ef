"""Kernel-side code layouts and the numpy reference the generated kernels are tested against.

The canonical packed format (`xbitc.quant.pack`) is one LSB-first bit stream per output row. It is compact but a
SIMD lane cannot pick code j out of it without a variable shift per lane. The kernels therefore read a *lane
interleaved* layout, ``il{L}w{W}`` (L lanes, W-bit words):

* every row is cut into blocks of ``B = L * W`` input columns (the last block zero padded);
* inside a block, lane ``l`` (0..L-1) owns the W codes of columns ``k*L + l`` for ``k = 0..W-1``, stored as its own
  LSB-first bit stream of ``W*bits`` bits = exactly ``bits`` words of W bits;
* the block stores word 0 of lanes 0..L-1, then word 1 of lanes 0..L-1, ... so a block is ``bits`` vectors of
  L words (``bits * L * W / 8`` bytes) and a row is ``ceil(cols / B)`` blocks, rows back to back.

Loading the ``bits`` word vectors of a block and shifting/masking them by compile-time constants yields, for each
k, the L codes of the L *consecutive* input columns ``k*L .. k*L+L-1`` - one contiguous vector of x. Codes whose
bits straddle two words (bits 3, 5, 6, 7) take one extra shift and or. Nothing is wasted: a row holds
``ceil(cols/B) * B * bits / 8`` bytes, the canonical size rounded up to a whole block.

``il8w32``  - 8 x i32 lanes, 256-column blocks: the float path (codes -> <8 x float>, FMA with x). Default.
``il16w32`` - 16 x i32 lanes, 512-column blocks: the same for 512-bit vectors (AVX-512).
``il32w8``  - 32 x i8 lanes, 256-column blocks: the int8-activation path (u8 codes x s8 activations).
``canonical`` - the canonical stream itself (fallback for group sizes the interleaved kernels do not cover).

Scales and zero points stay in their canonical [rows, ngroups] float16 / uint8 arrays for every layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...quant.pack import row_bytes as canonical_row_bytes
from ...quant.pack import unpack


@dataclass(frozen=True)
class Layout:
    name: str
    lanes: int  # 0 for canonical
    word_bits: int  # 0 for canonical

    @property
    def interleaved(self) -> bool:
        return self.lanes > 0

    @property
    def block_cols(self) -> int:
        return self.lanes * self.word_bits

    def block_bytes(self, bits: int) -> int:
        return bits * self.lanes * self.word_bits // 8

    def nblocks(self, cols: int) -> int:
        return -(-cols // self.block_cols)

    def row_bytes(self, cols: int, bits: int) -> int:
        if not self.interleaved:
            return canonical_row_bytes(cols, bits)
        return self.nblocks(cols) * self.block_bytes(bits)

    def nbytes(self, rows: int, cols: int, bits: int) -> int:
        return rows * self.row_bytes(cols, bits)

    def supports_group(self, group_size: int) -> bool:
        """Whether the interleaved kernels handle this group size (canonical handles all)."""
        if not self.interleaved:
            return group_size >= 1
        b = self.block_cols
        return group_size % self.lanes == 0 and (b % group_size == 0 or group_size % b == 0)


LAYOUTS = {
    "il8w32": Layout("il8w32", 8, 32),
    "il16w32": Layout("il16w32", 16, 32),
    "il32w8": Layout("il32w8", 32, 8),
    "il8w8": Layout("il8w8", 8, 8),  # 64-column blocks: narrow segments (learned allocation) pad 4x less than il8w32
    "canonical": Layout("canonical", 0, 0),
}


def get_layout(layout: str | Layout) -> Layout:
    if isinstance(layout, Layout):
        return layout
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown kernel layout {layout!r}; known: {sorted(LAYOUTS)}") from None


def ngroups(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


def interleave_codes(codes: np.ndarray, bits: int, layout: str | Layout = "il8w32") -> np.ndarray:
    """[rows, cols] uint8 codes -> flat uint8 kernel-layout bytes."""
    lay = get_layout(layout)
    codes = np.asarray(codes, dtype=np.uint8)
    rows, cols = codes.shape
    if not lay.interleaved:
        from ...quant.pack import pack

        return pack(codes, bits).reshape(-1)
    L, W = lay.lanes, lay.word_bits
    nb = lay.nblocks(cols)
    padded = np.zeros((rows, nb * L * W), dtype=np.uint8)
    padded[:, :cols] = codes
    # column c = blk*B + k*L + l -> [rows, nb, k, l]; lane l's stream holds code k at bits k*bits .. k*bits+bits-1,
    # i.e. in word (k*bits) // W at offset (k*bits) % W, spilling into the next word when it straddles. Built with
    # one shift-or per k over all lanes at once in W-bit integers (overflowing high bits drop, which is the mask):
    # ~10x faster than going through bit planes.
    blk = padded.reshape(rows, nb, W, L)
    wdt = np.dtype(f"<u{W // 8}")
    words = np.zeros((rows, nb, bits, L), dtype=wdt)
    for k in range(W):
        i, off = divmod(k * bits, W)
        c = blk[:, :, k, :].astype(wdt)
        words[:, :, i, :] |= c << wdt.type(off)
        if off + bits > W:
            words[:, :, i + 1, :] |= c >> wdt.type(W - off)
    return words.reshape(-1).view(np.uint8)


def repack(
    codes_canonical_packed: np.ndarray,
    bits: int,
    rows: int,
    cols: int,
    group_size: int,
    layout: str | Layout = "il8w32",
) -> np.ndarray:
    """Canonical packed codes ([rows, row_bytes] or flat) -> flat uint8 bytes in `layout` for the kernels."""
    lay = get_layout(layout)
    if not lay.supports_group(group_size):
        raise ValueError(f"layout {lay.name} does not support group_size={group_size}")
    packed = np.asarray(codes_canonical_packed, dtype=np.uint8).reshape(rows, canonical_row_bytes(cols, bits))
    if not lay.interleaved:
        return np.ascontiguousarray(packed).reshape(-1).copy()
    return interleave_codes(unpack_fast(packed, bits, cols), bits, lay)


def unpack_fast(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """`xbitc.quant.pack.unpack` ([rows, row_bytes] canonical -> [rows, n] uint8 codes) by gathering the two bytes
    each code touches (~5x faster than through bit planes; repack runs it on every weight at load time)."""
    packed = np.asarray(packed, dtype=np.uint8)
    rows = packed.shape[0]
    if bits == 8:
        return np.ascontiguousarray(packed[:, :n])
    pos = np.arange(n, dtype=np.int64) * bits
    byte, off = pos >> 3, (pos & 7).astype(np.uint16)
    wide = np.zeros((rows, packed.shape[1] + 1), dtype=np.uint16)  # one spare byte: codes may straddle the last one
    wide[:, :-1] = packed
    two = wide[:, byte] | (wide[:, byte + 1] << np.uint16(8))
    return ((two >> off) & np.uint16((1 << bits) - 1)).astype(np.uint8)


def _expand_groups(a: np.ndarray, group_size: int, cols: int) -> np.ndarray:
    return np.repeat(a, group_size, axis=1)[:, :cols]


def dequantize_reference(
    codes_canonical_packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, cols: int, group_size: int
) -> np.ndarray:
    """float64 [rows, cols] weights w = s * (q - z) from the canonical format."""
    packed = np.asarray(codes_canonical_packed, dtype=np.uint8)
    rows = np.asarray(scales).shape[0]
    q = unpack(packed.reshape(rows, canonical_row_bytes(cols, bits)), bits, cols).astype(np.float64)
    s = _expand_groups(np.asarray(scales, dtype=np.float16).astype(np.float64), group_size, cols)
    z = _expand_groups(np.asarray(zeros, dtype=np.uint8).astype(np.float64), group_size, cols)
    return s * (q - z)


def reference_gemv(
    codes_canonical_packed: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray,
    x: np.ndarray,
    bits: int,
    group_size: int,
    rows: slice | None = None,
) -> np.ndarray:
    """y = W x in float64 from the canonical format (x: [cols]; or [batch, cols] giving [batch, rows])."""
    x = np.asarray(x, dtype=np.float64)
    cols = x.shape[-1]
    w = dequantize_reference(codes_canonical_packed, scales, zeros, bits, cols, group_size)
    if rows is not None:
        w = w[rows]
    return x @ w.T


def quantize_activations_q8(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The int8-activation path's quantization of x, exactly as the kernels do it (float32 arithmetic).

    Per group of `group_size` columns: d = max|x| / 127, xq = round_half_even(x / d) in [-127, 127] (d = 0 -> xq = 0).
    Returns (xq int8 [cols], d float32 [ngroups]).
    """
    x = np.asarray(x, dtype=np.float32)
    cols = x.shape[-1]
    ng = ngroups(cols, group_size)
    xp = np.zeros(ng * group_size, dtype=np.float32)
    xp[:cols] = x
    xg = xp.reshape(ng, group_size)
    amax = np.abs(xg).max(axis=1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.clip(np.rint(xg * inv[:, None]), -127, 127).astype(np.int8).reshape(-1)[:cols]
    return xq, d


def reference_gemv_q8(
    codes_canonical_packed: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray,
    x: np.ndarray,
    bits: int,
    group_size: int,
    rows: slice | None = None,
) -> np.ndarray:
    """What the int8-activation kernels compute: W @ x_hat with x_hat the dequantized int8 activations."""
    xq, d = quantize_activations_q8(x, group_size)
    xhat = xq.astype(np.float64) * np.repeat(d.astype(np.float64), group_size)[: xq.shape[0]]
    return reference_gemv(codes_canonical_packed, scales, zeros, xhat, bits, group_size, rows)
