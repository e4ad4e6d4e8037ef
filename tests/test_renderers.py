"""Renderers of the packed product (backends/product.py): the C renderer's kernels, compiled with the system C
compiler, against the numpy oracle on random records of every kind; its source against a committed golden; the
LLVM renderer's object against the description's entry points.

Tolerance: float32 sums of up to a few hundred products of codes (< 256), scales and activations of order 1, against
a float64 oracle: relative error ~ n * 2^-24, well under 1e-4 of the output's scale."""
import ctypes
import os
import subprocess
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xbitc.backends.cstyle import CRenderer
from xbitc.backends.llvm.render import LLVMRenderer
from xbitc.backends.llvm.rowlane import pack, reference_rows
from xbitc.backends.product import PackedProduct
from xbitc.native.build import compiler

GOLDEN = Path(__file__).parent / "golden" / "rowlane_portable.c"
UPDATE = "XBITC_UPDATE_GOLDEN"
SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
_LIB: list = []


def c_kernels(tmp: Path):
    """The rendered C kernels as a shared library (built once per test session)."""
    if not _LIB:
        src = tmp / "k.c"
        src.write_text(CRenderer().render(PackedProduct("f32"), "t").payload)
        so = tmp / "k.so"
        subprocess.run([compiler(), "-std=c11", "-O2", "-shared", "-fPIC", "-Wall", "-Werror", str(src), "-o", str(so)],
                       check=True)
        _LIB.append(ctypes.CDLL(str(so)))
    return _LIB[0]


def test_rendered_c_matches_the_golden():
    text = CRenderer().render(PackedProduct("f32"), "portable").payload
    regenerate = f"regenerate it deliberately with {UPDATE}=1 pytest tests/test_renderers.py, review and commit it"
    if os.environ.get(UPDATE) == "1":
        GOLDEN.write_text(text)
    assert GOLDEN.exists(), f"{GOLDEN} is missing (goldens are committed): {regenerate}"
    assert text == GOLDEN.read_text(), f"the rendered C differs from {GOLDEN}; if intended, {regenerate}"


def test_llvm_renderer_defines_the_described_entry_points():
    r = LLVMRenderer("x86_64-unknown-linux-gnu", "x86-64-v3", "+avx2,+fma,+f16c").render(PackedProduct("f32"), "v3")
    assert r.language == "object" and r.functions == ("xbitc_rows_gemv_v3", "xbitc_rows_gemm_v3")
    assert all(name.encode() in r.payload for name in r.functions)


@settings(max_examples=25, **SETTINGS)
@given(rows=st.integers(1, 40), widths=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 70)), min_size=1,
                                                   max_size=4),
       batch=st.integers(1, 3), permuted=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_c_kernels_match_the_oracle(tmp_path_factory, rows, widths, batch, permuted, seed):
    rng = np.random.default_rng(seed)
    lib = c_kernels(tmp_path_factory.mktemp("ck"))
    records, off = [], 0
    for bits, n in widths:
        codes = rng.integers(0, 1 << bits, (rows, n), dtype=np.uint8)
        scales = rng.uniform(0.01, 0.1, rows).astype(np.float16)
        zeros = rng.integers(0, 1 << bits, rows, dtype=np.uint8)
        records.append((codes, scales, zeros, off, bits))
        off += n
    inp = off
    buf, table = pack(records, rows, "f32")
    perm = rng.permutation(inp).astype(np.int32) if permuted else None
    x = rng.standard_normal((batch, inp)).astype(np.float32)
    xp = x[:, perm] if permuted else x  # the oracle reads stored column j at x[perm[j]]
    want = reference_rows([r[:4] for r in records], xp, rows)
    scale = np.abs(want).max() + 1e-6
    ptr = ctypes.c_void_p
    perm_ptr = ptr(perm.ctypes.data) if permuted else None
    y = np.full((batch, rows), np.nan, dtype=np.float32)
    for t in range(batch):
        lib.xbitc_rows_gemv_t(ptr(table.ctypes.data), ctypes.c_int64(len(records)), ptr(x[t].ctypes.data), perm_ptr,
                              ptr(y[t].ctypes.data), ctypes.c_int64(0), ctypes.c_int64(rows))
    assert np.abs(y - want).max() <= 1e-4 * scale
    xg = np.ascontiguousarray(xp)
    y2 = np.full((batch, rows), np.nan, dtype=np.float32)
    lib.xbitc_rows_gemm_t(ptr(table.ctypes.data), ctypes.c_int64(len(records)), ptr(xg.ctypes.data),
                          ptr(y2.ctypes.data), ctypes.c_int64(0), ctypes.c_int64(rows), ctypes.c_int64(batch),
                          ctypes.c_int64(inp), ctypes.c_int64(rows))
    assert np.abs(y2 - want).max() <= 1e-4 * scale
    # one row dequantized, columns back in input order, equals the matrix the oracle multiplies
    row = int(rng.integers(0, rows))
    got = np.full(inp, np.nan, dtype=np.float32)
    lib.xbitc_rows_dequant_t(ptr(table.ctypes.data), ctypes.c_int64(len(records)), perm_ptr, ctypes.c_int64(row),
                             ctypes.c_int64(inp), ptr(got.ctypes.data))
    stored = np.concatenate([r[1][row].astype(np.float32) * (r[0][row].astype(np.float32) - np.float32(r[2][row]))
                             for r in records])
    dense = np.empty(inp, dtype=np.float32)
    dense[perm if permuted else np.arange(inp)] = stored
    assert np.array_equal(got, dense)
