"""`xbitc export ARTIFACT --webgpu DIR`: a compiled artifact's packed matrices as a bundle a web page runs with
WebGPU (examples/webgpu/ is such a page), no Python at run time.

DIR holds:
  kernels.wgsl  the packed kernels of backends/gpu/packed.py (gather, gemv, gemm, dequant) printed by the WGSL
                printer: one WGSL module per kernel, one after another (they reuse binding names, so each is compiled
                on its own, from its byte range in model.json)
  weights.bin   every packed matrix in its GPU layout (`GpuMatrix`): the row-lane words, pieces, src and dst tables
                as little-endian u32, each array starting on a 256-byte boundary (WebGPU's storage buffer offset
                alignment, so a host may bind them out of one buffer)
  model.json    FORMAT and VERSION; per kernel role its `Kernel.interface()` (workgroup, storage buffers in binding
                order, then the uniform parameter struct: field offsets, size), the byte range of its module in
                kernels.wgsl, and for gemv / gemm the tokens one workgroup serves; `bind`: which array of a matrix a
                weight binding reads; per packed matrix its name, shape, GpuMatrix constants and the byte ranges
                of its arrays in weights.bin
  check.json    (with `check=NAME`) seeded activations x [tokens, in] for matrix NAME, y = x W^T in float64 from
                `PackedMatrix.dequantize()` (exact: a float16 scale times an integer of at most 8 bits is exact in
                float32), and what a page needs to bound float32 rounding (below)

A call, as a host makes it from model.json alone: a parameter named `tokens` takes the batch's token count, every
other parameter the matrix constant of that name. With T tokens and a product kernel serving `tile` tokens per
workgroup: gather writes xp (ceil(T / tile) * tile * xcols floats) in (ceil(xcols / 256), ceil(T / tile) * tile)
workgroups; the product writes y [T, rows] in (row_blocks, ceil(T / tile)); dequant writes out [T, in] in
(ceil(in / 256), T) (GpuMatrix.gather_args / product_args / dequant_args).

Tolerance (tests/test_gpu_kernels.py's bound): every step but the float32 additions and multiplications is exact,
and each term s q_j x_j or s z x_j meets at most 160 + npieces roundings, so |y_r - exact_r| <= (160 + npieces) *
2^-24 * sum_j s (q_j + z) |x_j|. check.json carries that sum per output (`absum`) and the factor (`roundings`).

The folder is written beside DIR and renamed into place, so a failure leaves no half-written bundle; a DIR that
exists and holds anything is refused, never overwritten.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from xbitc.quant.packed import PackedMatrix

FORMAT = "xbitc-webgpu"
VERSION = 1
ALIGN = 256
CHECK_TOKENS = 5  # two gemm tiles of 4, the second partial
ROLES = ("gather", "gemv", "gemm", "dequant")
BIND = {"w4": "words", "w1": "words", "pieces": "pieces", "src": "src", "dst": "dst"}  # the rest: per call
ARRAYS = ("words", "pieces", "src", "dst")


class BundleError(ValueError):
    """An export the bundle cannot be written for; the message names the problem and what to do instead."""


def bundle_kernels() -> dict:
    """The packed kernels by role."""
    from xbitc.backends.gpu.packed import kernels
    from xbitc.backends.product import PackedProduct

    return dict(zip(ROLES, kernels(PackedProduct()), strict=True))


def constants(m) -> dict:
    """A GpuMatrix's constants: what its kernels' parameters and workgroup counts are made of."""
    return {"rows": m.rows, "inp": m.inp, "xcols": m.xcols, "xrow": m.xcols // 4, "npieces": m.npieces,
            "stride": m.stride, "row_blocks": m.row_blocks}


def magnitudes(pm: PackedMatrix) -> np.ndarray:
    """[out, in] float64 s * (q + z) of every column (0 for dropped ones), in input order: the rounding bound's
    weights."""
    q = pm.to_quantized()
    stored = np.zeros(q.shape, np.float64)
    for seg, c, s, z in zip(q.segments, q.codes, q.scales, q.zeros):
        if seg.bits:
            rep = lambda a: np.repeat(np.asarray(a, np.float64), seg.group_size, axis=1)[:, :seg.ncols]
            stored[:, seg.start:seg.stop] = rep(s) * (c.astype(np.float64) + rep(z))
    if q.perm is None:
        return stored
    out = np.empty_like(stored)
    out[:, np.asarray(q.perm, np.int64)] = stored
    return out


def check_data(name: str, pm: PackedMatrix, npieces: int, tokens: int = CHECK_TOKENS, seed: int = 0) -> dict:
    """check.json: seeded x, the float64 reference y and the rounding bound's parts (module docstring)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, pm.shape[1])).astype(np.float32)
    y = x.astype(np.float64) @ pm.dequantize().double().numpy().T
    absum = np.abs(x).astype(np.float64) @ magnitudes(pm).T
    return {"matrix": name, "tokens": tokens, "seed": seed, "x": x.ravel().tolist(), "y": y.ravel().tolist(),
            "absum": absum.ravel().tolist(), "roundings": 160 + npieces, "unit_roundoff": 2.0**-24,
            "tolerance": "|y - ref| <= roundings * unit_roundoff * absum, per output"}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BundleError(f"--webgpu {out} is a file; give a new folder to write the bundle into")
    if out.is_dir() and any(out.iterdir()):
        raise BundleError(f"--webgpu {out} exists and is not empty; give a new or empty folder (nothing is "
                          "overwritten)")


def _write(tmp: Path, graph, source: str, check: str | None) -> dict:
    from xbitc.backends.gpu.packed import GEMM_TOKENS
    from xbitc.backends.gpu.render import WGSL

    from .weights import gpu_matrix

    ks = bundle_kernels()
    head = (f"// xbitc WebGPU bundle of {source}: one WGSL module per kernel (they reuse binding names: compile "
            "each alone); model.json holds each module's byte range\n").encode()
    wgsl, kinfo = bytearray(head), {}
    for role, k in ks.items():
        text = WGSL().render(k).encode()
        kinfo[role] = {**k.interface(), "source": {"offset": len(wgsl), "bytes": len(text)}}
        wgsl += text + b"\n"
    kinfo["gemv"]["tile"], kinfo["gemm"]["tile"] = 1, GEMM_TOKENS  # tokens one workgroup serves
    (tmp / "kernels.wgsl").write_bytes(bytes(wgsl))

    matrices, checked = [], None
    with open(tmp / "weights.bin", "wb") as f:
        for name in sorted(n for n, v in graph.params.items() if isinstance(v, PackedMatrix)):
            pm = graph.params[name]
            m = gpu_matrix(pm)
            ranges = {}
            for part in ARRAYS:
                raw = np.ascontiguousarray(getattr(m, part), dtype="<u4").tobytes()
                f.write(bytes(-f.tell() % ALIGN))
                ranges[part] = {"offset": f.tell(), "bytes": len(raw)}
                f.write(raw)
            matrices.append({"name": name, "shape": list(pm.shape), **constants(m), "arrays": ranges})
            if name == check:
                checked = check_data(name, pm, m.npieces)
        f.write(bytes(-f.tell() % ALIGN))
        size = f.tell()
    if checked is not None:
        (tmp / "check.json").write_text(json.dumps(checked))
    model = {"format": FORMAT, "version": VERSION, "artifact": source, "weights_bytes": size, "align": ALIGN,
             "kernels": kinfo, "bind": BIND, "matrices": matrices}
    (tmp / "model.json").write_text(json.dumps(model, indent=1))
    return model


def export_webgpu(artifact: Path, out: Path, check: str | None = None) -> dict:
    """Write the bundle (module docstring) to `out`; model.json's content."""
    from xbitc.artifact import load_graph

    out = Path(out)
    _check_out(out)
    graph, _ = load_graph(Path(artifact))
    packed = sorted(n for n, v in graph.params.items() if isinstance(v, PackedMatrix))
    if not packed:
        raise BundleError(f"{Path(artifact).name} holds no packed matrices (every weight is float); compile it with "
                          "--bits or --bpw")
    if check is not None and check not in packed:
        some = ", ".join(packed[:6]) + (", ..." if len(packed) > 6 else "")
        raise BundleError(f"--check {check}: {Path(artifact).name} has no packed matrix of that name; give one of "
                          f"{some or '(none)'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model = _write(tmp, graph, Path(artifact).name, check)
        if out.exists():
            out.rmdir()  # empty: checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model
