"""numpy-dequant: an xbitc backend that decodes packed weights itself and multiplies in numpy.

It reads the artifact's packed format directly (README "Quantized format"): columns permuted into segments of equal
depth; per segment, codes and zero points bit-packed per row as an LSB-first stream, a float16 scale per group of
columns, and w = scale * (code - zero). The decoded weights are bit-identical to xbitc's reference ones; only the
matrix product's summation order (numpy's BLAS, not torch's) differs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xbitc.backends.base import Backend, Capabilities, Program
from xbitc.ir.graph import LINEAR_OPS, Graph

INDEX = "numpy-dequant.json"


def unpack_rows(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """[rows, bytes] uint8, each row an LSB-first stream of n `bits`-bit values -> [rows, n] int64."""
    stream = np.unpackbits(packed, axis=1, bitorder="little")[:, : n * bits]
    return stream.reshape(len(packed), n, bits).astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))


def dequantize(packed: Any) -> np.ndarray:
    """A PackedMatrix -> its float32 [out, in] weight, columns in the model's order."""
    if packed.layout != "lsb-rows":
        raise ValueError(f"numpy-dequant reads the lsb-rows layout, not {packed.layout!r}")
    rows, cols = packed.shape
    stored = np.zeros((rows, cols), np.float32)  # 0-bit (dropped) columns stay zero
    for ps in packed.segments:
        seg = ps.seg
        if seg.bits == 0:
            continue
        group = np.arange(seg.ncols) // seg.group_size  # each stored column's scale/zero group
        codes = unpack_rows(ps.codes, seg.bits, seg.ncols)
        zeros = unpack_rows(ps.zeros, seg.bits, seg.ngroups)[:, group]
        # float32 scale times a small integer is exact in float64: one rounding, as torch's float32 product
        stored[:, seg.start : seg.stop] = ps.scales.astype(np.float32)[:, group] * (codes - zeros)
    if packed.perm is None:
        return stored
    weight = np.empty_like(stored)
    weight[:, packed.perm.astype(np.int64)] = stored  # stored column j is the model's column perm[j]
    return weight


class NumpyBackend(Backend):
    name = "numpy-dequant"
    calls = 0  # packed linears run through this backend, so a caller can see it was used

    def capabilities(self) -> Capabilities:
        return Capabilities(bit_depths=tuple(range(0, 9)))

    def lower(self, graph: Graph) -> Program:
        weights: dict[str, np.ndarray] = {}  # decoded once per weight, on first use

        def linear(x: torch.Tensor, packed: Any, bias: torch.Tensor | None, name: str) -> torch.Tensor:
            NumpyBackend.calls += 1
            if name not in weights:
                weights[name] = dequantize(packed)
            y = np.matmul(x.detach().float().numpy(), weights[name].T)
            if bias is not None:
                y += bias.detach().float().numpy()
            return torch.from_numpy(y)

        return Program(graph, linear)

    def emit(self, graph: Graph, folder: Path) -> dict[str, Any]:
        # An extra artifact file (counted in the size like everything else). It depends on the graph, not on the
        # quantization plan, so the size planners measure it exactly before choosing depths.
        names = sorted(graph.by_name()[n.args[1].name].attrs["name"] for n in graph.nodes if n.op in LINEAR_OPS)
        (Path(folder) / INDEX).write_text(json.dumps({"backend": self.name, "linears": names}, indent=1))
        return {"numpy_dequant": {"index": INDEX, "linears": len(names)}}
