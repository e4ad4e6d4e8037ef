"""Properties of the generated LLVM kernels (backends/llvm): JIT results equal the numpy reference on the canonical
format for every depth 1..8, row ranges, accumulate mode, the batched gemm, cross-target objects and the disk cache.

Tolerance. The kernels evaluate y = sum_j s_g (q_j - z_g) x_j in float32, but in another order than the float64
reference: per group sum_j q_j x_j and z_g * sum_j x_j are formed separately (8 interleaved partial sums each), scaled
by s_g, accumulated per lane and reduced by a halving tree. Everything except the additions/multiplications is exact
(float16 -> float32, small integers -> float32, scaling x by powers of two). For any evaluation order of a sum of M
products with at most k roundings each, |computed - exact| <= gamma_{M+k} * sum |terms| with
gamma_m = m*u / (1 - m*u), u = 2**-24 (Higham, Accuracy and Stability of Numerical Algorithms, 3.1 / 4.2). Here the
terms are s_g q_j x_j and s_g z_g x_j, so M <= 2 * in_features, and we allow k = 64 for the per-group products, the
lane and tree reductions. So the bound is ``(2n + 64) * u * sum_j |s_g| (q_j + z_g) |x_j|`` (plus |y0| * u when adding
into y0) - rigorous, so it cannot flake, and still ~n times smaller than the effect of a single wrong code
(~|s_g x_j|), which is what a layout or extraction bug produces.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xbitc.backends.llvm import (
    KernelSpec,
    PackedLinear,
    clear_memory_cache,
    compile_kernel,
    compile_stats,
    emit_object,
    host_target,
    reference_gemv,
    reference_gemv_q8,
    repack,
)
from xbitc.backends.llvm.layout import dequantize_reference, quantize_activations_q8
from xbitc.quant.pack import pack, unpack

U = 2.0**-24
SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))

# group sizes the default interleaved layout (il8w32, 256-column blocks) handles: 8 | G and (G | 256 or 256 | G)
IL_GROUPS = [8, 32, 128, 512]
CANONICAL_GROUPS = [3, 20, 48]


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Each test session compiles into its own cache dir (so the cache tests see a cold cache)."""
    old = os.environ.get("XBITC_CACHE_DIR")
    os.environ["XBITC_CACHE_DIR"] = str(tmp_path_factory.mktemp("kcache"))
    clear_memory_cache()
    yield
    if old is None:
        os.environ.pop("XBITC_CACHE_DIR", None)
    else:
        os.environ["XBITC_CACHE_DIR"] = old
    clear_memory_cache()


def make_matrix(seed: int, bits: int, rows: int, cols: int, group: int, extreme: bool = False):
    rng = np.random.default_rng(seed)
    ng = -(-cols // group)
    hi = 1 << bits
    if extreme:  # all codes / zeros at the ends of the range
        q = rng.choice(np.array([0, hi - 1], dtype=np.uint8), size=(rows, cols))
        z = rng.choice(np.array([0, hi - 1], dtype=np.uint8), size=(rows, ng))
    else:
        q = rng.integers(0, hi, (rows, cols), dtype=np.uint8)
        z = rng.integers(0, hi, (rows, ng), dtype=np.uint8)
    s = (rng.standard_normal((rows, ng)) * 0.05).astype(np.float16)
    return pack(q, bits), s, z


def bound(packed, s, z, x, bits, group, y0=None):
    cols = x.shape[-1]
    rows = s.shape[0]
    q = unpack(packed.reshape(rows, -1), bits, cols).astype(np.float64)
    sg = np.repeat(np.abs(s.astype(np.float64)), group, axis=1)[:, :cols]
    zg = np.repeat(z.astype(np.float64), group, axis=1)[:, :cols]
    mag = np.abs(np.asarray(x, dtype=np.float64)) @ (sg * (q + zg)).T
    tol = (2 * cols + 64) * U * mag * (1 + 1e-6) + 1e-30
    if y0 is not None:
        tol = tol + np.abs(y0) * U * 2
    return tol


def assert_close(got, want, tol):
    err = np.abs(got.astype(np.float64) - want)
    bad = err > tol
    assert not bad.any(), f"max err {err.max():.3g} vs tol {tol[bad].min():.3g} at {np.argwhere(bad)[:5].tolist()}"


dims = st.tuples(st.integers(1, 19), st.integers(1, 700))


@pytest.mark.parametrize("bits", range(1, 9))
@settings(max_examples=10, **SETTINGS)
@given(rc=dims, group=st.sampled_from(IL_GROUPS), seed=st.integers(0, 2**32 - 1), extreme=st.booleans())
def test_gemv_matches_reference(bits, rc, group, seed, extreme):
    rows, cols = rc
    packed, s, z = make_matrix(seed, bits, rows, cols, group, extreme)
    x = np.random.default_rng(seed + 1).standard_normal(cols).astype(np.float32)
    lin = PackedLinear(packed, s, z, bits, group, cols)
    y = lin.gemv(x, y=np.full(rows, np.nan, dtype=np.float32))  # y is written, never read
    assert_close(y, reference_gemv(packed, s, z, x, bits, group), bound(packed, s, z, x, bits, group))


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
@settings(max_examples=8, **SETTINGS)
@given(rc=st.tuples(st.integers(1, 9), st.integers(1, 600)), group=st.sampled_from(CANONICAL_GROUPS),
       seed=st.integers(0, 2**32 - 1))
def test_canonical_layout_any_group_size(bits, rc, group, seed):
    rows, cols = rc
    packed, s, z = make_matrix(seed, bits, rows, cols, group)
    x = np.random.default_rng(seed + 1).standard_normal(cols).astype(np.float32)
    lin = PackedLinear(packed, s, z, bits, group, cols, spec=KernelSpec(bits, group, layout="canonical"))
    y = lin.gemv(x)
    assert_close(y, reference_gemv(packed, s, z, x, bits, group), bound(packed, s, z, x, bits, group))
    xb = np.random.default_rng(seed + 2).standard_normal((3, cols)).astype(np.float32)
    yb = lin.gemm(xb)
    assert_close(yb, reference_gemv(packed, s, z, xb, bits, group), bound(packed, s, z, xb, bits, group))


@pytest.mark.parametrize("layout,rows_per_iter", [("il16w32", 2), ("il32w8", 1), ("il8w32", 1), ("il8w32", 3), ("il8w8", 1)])
@settings(max_examples=6, **SETTINGS)
@given(rc=dims, bits=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_other_layouts_and_row_tiling(layout, rows_per_iter, rc, bits, seed):
    rows, cols = rc
    group = 32
    packed, s, z = make_matrix(seed, bits, rows, cols, group)
    x = np.random.default_rng(seed + 1).standard_normal(cols).astype(np.float32)
    spec = KernelSpec(bits, group, layout=layout, rows_per_iter=rows_per_iter)
    lin = PackedLinear(packed, s, z, bits, group, cols, spec=spec)
    assert_close(lin.gemv(x), reference_gemv(packed, s, z, x, bits, group), bound(packed, s, z, x, bits, group))


@pytest.mark.parametrize("act", ["f32", "q8"])
@settings(max_examples=12, **SETTINGS)
@given(bits=st.integers(1, 8), rc=st.tuples(st.integers(1, 9), st.integers(1, 2600)),
       group=st.sampled_from([32, 256, 1024]), accumulate=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_several_column_tiles(act, bits, rc, group, accumulate, seed):
    """A small col_tile forces several x tiles per row (the default 16384 covers most layers in one)."""
    rows, cols = rc
    packed, s, z = make_matrix(seed, bits, rows, cols, group)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal(cols).astype(np.float32)
    layout = "il32w8" if act == "q8" else "il8w32"
    spec = KernelSpec(bits, group, layout=layout, act=act, col_tile=256)
    lin = PackedLinear(packed, s, z, bits, group, cols, spec=spec)
    if act == "q8":
        xq, d = quantize_activations_q8(x, group)
        xe = xq.astype(np.float64) * np.repeat(d.astype(np.float64), group)[:cols]
    else:
        xe = x
    ref = reference_gemv(packed, s, z, xe, bits, group)
    y0 = rng.standard_normal(rows).astype(np.float32) if accumulate else None
    y = lin.gemv(x, y=y0.copy() if accumulate else None, accumulate=accumulate)
    assert_close(y, ref + (y0 if accumulate else 0), bound(packed, s, z, xe, bits, group, y0))


def test_zero_in_features():
    for layout in ("il8w32", "canonical"):
        lin = PackedLinear(np.zeros((3, 0), np.uint8), np.zeros((3, 0), np.float16), np.zeros((3, 0), np.uint8),
                           4, 32, 0, spec=KernelSpec(4, 32, layout=layout))
        assert np.array_equal(lin.gemv(np.zeros(0, np.float32), y=np.full(3, np.nan, np.float32)), np.zeros(3))
        y = lin.gemm(np.zeros((2, 0), np.float32), y=np.full((2, 3), np.nan, np.float32))
        assert np.array_equal(y, np.zeros((2, 3)))


@settings(max_examples=25, **SETTINGS)
@given(bits=st.integers(1, 8), rc=st.tuples(st.integers(1, 19), st.integers(1, 700)),
       group=st.sampled_from(IL_GROUPS), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_row_ranges_and_accumulate(bits, rc, group, data, seed):
    rows, cols = rc
    rb = data.draw(st.integers(0, rows), label="rows_begin")
    re = data.draw(st.integers(rb, rows), label="rows_end")
    packed, s, z = make_matrix(seed, bits, rows, cols, group)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal(cols).astype(np.float32)
    y0 = rng.standard_normal(rows).astype(np.float32)
    lin = PackedLinear(packed, s, z, bits, group, cols)
    ref = reference_gemv(packed, s, z, x, bits, group)
    tol = bound(packed, s, z, x, bits, group)
    # write mode: rows outside [rb, re) untouched
    y = y0.copy()
    lin.gemv(x, y=y, rows=(rb, re))
    assert np.array_equal(y[:rb], y0[:rb]) and np.array_equal(y[re:], y0[re:])
    assert_close(y[rb:re], ref[rb:re], tol[rb:re])
    # accumulate mode: y[r] += (W x)[r]
    y = y0.copy()
    lin.gemv(x, y=y, rows=(rb, re), accumulate=True)
    assert np.array_equal(y[:rb], y0[:rb]) and np.array_equal(y[re:], y0[re:])
    assert_close(y[rb:re], (y0.astype(np.float64) + ref)[rb:re], bound(packed, s, z, x, bits, group, y0)[rb:re])
    # two segments of a split input (mixed-depth style): second one accumulates into the first
    if cols >= 2:
        c1 = data.draw(st.integers(1, cols - 1), label="split")
        bits2 = data.draw(st.integers(1, 8), label="bits2")
        p1, s1, z1 = make_matrix(seed + 3, bits, rows, c1, group)
        p2, s2, z2 = make_matrix(seed + 4, bits2, rows, cols - c1, group)
        l1 = PackedLinear(p1, s1, z1, bits, group, c1)
        l2 = PackedLinear(p2, s2, z2, bits2, group, cols - c1)
        y = l1.gemv(x[:c1].copy())
        l2.gemv(x[c1:].copy(), y=y, accumulate=True)
        want = reference_gemv(p1, s1, z1, x[:c1], bits, group) + reference_gemv(p2, s2, z2, x[c1:], bits2, group)
        tol = bound(p1, s1, z1, x[:c1], bits, group) + bound(p2, s2, z2, x[c1:], bits2, group) + np.abs(want) * U * 4
        assert_close(y, want, tol)


@settings(max_examples=25, **SETTINGS)
@given(bits=st.integers(1, 8), rc=st.tuples(st.integers(1, 12), st.integers(1, 600)),
       group=st.sampled_from(IL_GROUPS), batch=st.integers(1, 9), accumulate=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_gemm_matches_reference(bits, rc, group, batch, accumulate, seed):
    rows, cols = rc
    packed, s, z = make_matrix(seed, bits, rows, cols, group)
    rng = np.random.default_rng(seed + 1)
    xb = rng.standard_normal((batch, cols)).astype(np.float32)
    lin = PackedLinear(packed, s, z, bits, group, cols)
    ref = reference_gemv(packed, s, z, xb, bits, group)  # [batch, rows]
    tol = bound(packed, s, z, xb, bits, group)
    if accumulate:
        y0 = rng.standard_normal((batch, rows)).astype(np.float32)
        y = lin.gemm(xb, y=y0.copy(), accumulate=True)
        assert_close(y, y0 + ref, tol + np.abs(y0) * 2 * U)
    else:
        y = lin.gemm(xb, y=np.full((batch, rows), np.nan, dtype=np.float32))
        assert_close(y, ref, tol)
    # a sub-range of rows leaves the others alone
    if rows > 1:
        y = np.zeros((batch, rows), dtype=np.float32)
        lin.gemm(xb, y=y, rows=(1, rows))
        assert np.all(y[:, 0] == 0)
        assert_close(y[:, 1:], ref[:, 1:], tol[:, 1:])


def _q8_targets():
    host = host_target()
    out = [pytest.param(None, id="host")]
    if host.has("avx2") and (host.has("avx512vnni") or host.has("avxvnni")):
        out.append(pytest.param(("avx512", "avxvnni"), id="avx2-maddubs"))
    return out


@pytest.mark.parametrize("without", _q8_targets())
@settings(max_examples=12, **SETTINGS)
@given(bits=st.integers(1, 8), rc=dims, group=st.sampled_from([32, 128, 512]), seed=st.integers(0, 2**32 - 1))
def test_q8_activation_path(without, bits, rc, group, seed):
    """act='q8' is exact integer arithmetic on int8-rounded activations: it must equal W @ x_hat."""
    rows, cols = rc
    packed, s, z = make_matrix(seed, bits, rows, cols, group)
    x = (np.random.default_rng(seed + 1).standard_normal(cols) * 3).astype(np.float32)
    target = host_target(without=without) if without else None
    spec = KernelSpec(bits, group, layout="il32w8", act="q8")
    lin = PackedLinear(packed, s, z, bits, group, cols, spec=spec, target=target)
    xq, d = quantize_activations_q8(x, group)
    xhat = xq.astype(np.float64) * np.repeat(d.astype(np.float64), group)[:cols]
    assert_close(lin.gemv(x), reference_gemv_q8(packed, s, z, x, bits, group), bound(packed, s, z, xhat, bits, group))


def test_repack_roundtrip_and_size():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        q = rng.integers(0, 1 << bits, (3, 300), dtype=np.uint8)
        out = repack(pack(q, bits), bits, 3, 300, 32, "il8w32")
        assert out.nbytes == 3 * 2 * bits * 32  # 2 blocks of 256 columns, bits * 32 bytes each
        # lane l, code k of block 0 = column 8k + l: check one word by hand
        words = out[: bits * 32].view(np.uint32).reshape(bits, 8)
        stream = sum(int(words[w, 3]) << (32 * w) for w in range(bits))  # lane 3
        for k in range(32):
            assert (stream >> (k * bits)) & ((1 << bits) - 1) == q[0, 8 * k + 3]


def test_reference_matches_dequantize():
    packed, s, z = make_matrix(1, 3, 4, 70, 32)
    w = dequantize_reference(packed, s, z, 3, 70, 32)
    x = np.arange(70, dtype=np.float32)
    assert np.allclose(reference_gemv(packed, s, z, x, 3, 32), w @ x)


@pytest.mark.parametrize(
    "triple,cpu,features,machine",
    [
        ("x86_64-unknown-linux-gnu", "skylake-avx512", "+avx512f,+avx512bw,+avx512vl", 62),
        ("x86_64-unknown-linux-gnu", "x86-64", "", 62),  # baseline SSE2: no F16C, no FMA
        ("aarch64-linux-gnu", "generic", "+neon", 183),
    ],
)
def test_cross_target_objects(triple, cpu, features, machine):
    specs = [KernelSpec(4, 128), KernelSpec(3, 32, layout="il16w32")]
    for spec in specs:
        obj = emit_object(triple, cpu, features, spec=spec)
        assert obj[:4] == b"\x7fELF" and len(obj) > 1000
        assert int.from_bytes(obj[18:20], "little") == machine
    q8 = emit_object(triple, cpu, features + (",+avx512vnni" if machine == 62 and features else ""),
                     spec=KernelSpec(2, 128, layout="il32w8", act="q8"))
    assert q8[:4] == b"\x7fELF"


def test_disk_cache_hits_without_recompiling(tmp_path, monkeypatch):
    monkeypatch.setenv("XBITC_CACHE_DIR", str(tmp_path))
    spec = KernelSpec(5, 64, col_tile=4096)  # a spec no other test uses
    clear_memory_cache()
    before = compile_stats()
    k1 = compile_kernel(spec)
    mid = compile_stats()
    assert mid["codegen"] == before["codegen"] + 1 and not k1.from_cache["gemv"]
    assert list(tmp_path.glob("*.o"))
    clear_memory_cache()
    k2 = compile_kernel(spec)
    after = compile_stats()
    assert after["codegen"] == mid["codegen"], "second compile must load the cached object"
    assert after["disk_hits"] == mid["disk_hits"] + 1 and k2.from_cache["gemv"]
    # the cached kernel computes the same thing
    packed, s, z = make_matrix(7, 5, 6, 333, 64)
    x = np.random.default_rng(8).standard_normal(333).astype(np.float32)
    lin = PackedLinear(packed, s, z, 5, 64, 333, spec=spec)
    assert lin.kernel is k2
    assert_close(lin.gemv(x), reference_gemv(packed, s, z, x, 5, 64), bound(packed, s, z, x, 5, 64))
    # a second process compiles nothing
    code = (
        "from xbitc.backends.llvm import KernelSpec, compile_kernel, compile_stats\n"
        "k = compile_kernel(KernelSpec(5, 64, col_tile=4096))\n"
        "print(compile_stats()['codegen'], compile_stats()['disk_hits'], k.from_cache['gemv'])\n"
    )
    env = dict(os.environ, XBITC_CACHE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "True"]
    clear_memory_cache()


def test_compile_time_is_reported():
    clear_memory_cache()
    k = compile_kernel(KernelSpec(6, 128, col_tile=2048), use_disk_cache=False)
    assert 0 < k.compile_ms["gemv"] < 5000  # target is < 100 ms of CPU; wall time on a loaded CI box varies


def test_float16_conversion_without_f16c():
    """Targets without F16C convert scales with integer ops; check normal, subnormal, negative and zero scales."""
    host = host_target()
    if not host.is_x86:
        pytest.skip("x86 only")
    target = host_target(without=("avx512", "f16c", "amx"))
    assert not target.has_f16_convert
    rng = np.random.default_rng(3)
    rows, cols, group, bits = 7, 300, 32, 4
    packed, s, z = make_matrix(3, bits, rows, cols, group)
    special = np.array([6.0e-8, -6.0e-8, 3.0e-5, -0.0, 0.0, 65504.0, -2.0, 1e-4], dtype=np.float16)
    s.reshape(-1)[: special.size] = special
    x = rng.standard_normal(cols).astype(np.float32)
    lin = PackedLinear(packed, s, z, bits, group, cols, spec=KernelSpec(bits, group), target=target)
    assert_close(lin.gemv(x), reference_gemv(packed, s, z, x, bits, group), bound(packed, s, z, x, bits, group))
    xb = rng.standard_normal((3, cols)).astype(np.float32)
    assert_close(lin.gemm(xb), reference_gemv(packed, s, z, xb, bits, group), bound(packed, s, z, xb, bits, group))


# ---------------------------------------------------------------------------------------- row-lane kernel


def _rowlane_case(seed: int, rows: int, specs: list[tuple[int, int]], extreme: bool = False, act: str = "f32"):
    """Records of (bits, ncols) at consecutive x offsets, random (or extreme) codes / zeros, float16 scales."""
    from xbitc.backends.llvm.rowlane import pack as rl_pack

    rng = np.random.default_rng(seed)
    recs, off = [], 0
    for bits, n in specs:
        hi = 1 << bits
        pick = (lambda shape: rng.choice(np.array([0, hi - 1], np.uint8), size=shape)) if extreme else \
            (lambda shape: rng.integers(0, hi, shape, dtype=np.uint8))
        recs.append((pick((rows, n)), (rng.standard_normal(rows) * 0.05).astype(np.float16), pick(rows), off, bits))
        off += n
    buf, table = rl_pack(recs, rows, act)
    return recs, buf, table, off


def _rowlane_bound(recs, x, act="f32"):
    """(2n + 64) u sum_j |s| (q + z) |x_j| per row: the same rigorous float32 bound as the other kernels (products
    s*(q - z)*x formed as s*(sum q x) - (s z)(sum x), a few roundings each, summed in another order). For q8, x_j is
    the int8-rounded activation xq_j * d the kernel multiplies (its integer dot products are exact)."""
    from xbitc.backends.llvm.rowlane import quantize_record_x

    acc = np.zeros((x.shape[0], recs[0][0].shape[0])) if recs else np.zeros((x.shape[0], 0))
    n = x.shape[1]
    for q, s, z, off, _ in recs:
        coef = np.abs(s.astype(np.float64))[:, None] * (q.astype(np.float64) + z.astype(np.float64)[:, None])
        xr = x[:, off:off + q.shape[1]].astype(np.float64)
        if act == "q8":
            xr = np.stack([(lambda xq, d: xq.astype(np.float64) * np.float64(d))(*quantize_record_x(row))
                           for row in x[:, off:off + q.shape[1]]])
        acc += np.abs(xr) @ coef.T
    return (2 * n + 64) * U * acc


def _rowlane_targets():
    out = [pytest.param("f32", (), id="f32"), pytest.param("q8", (), id="q8")]
    host = host_target()
    if host.has("avx2") and (host.has("avx512vnni") or host.has("avxvnni")):  # q8's AVX2 pmaddubsw path too
        out.append(pytest.param("q8", ("avx512", "avxvnni"), id="q8-avx2"))
    return out


@pytest.mark.parametrize("act,without", _rowlane_targets())
@settings(max_examples=40, **SETTINGS)
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 150),
       specs=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 90)), min_size=1, max_size=6),
       batch=st.integers(1, 9), extreme=st.booleans())
def test_rowlane_kernel_matches_reference(act, without, seed, rows, specs, batch, extreme):
    """Every depth, packed and byte records, widths that are not multiples of 32, row counts that are not
    multiples of 16, one token (gemv) and several (gemm), row ranges starting on a 16-row block, q8's runs of four
    row blocks (shallow matrices), of two, and single tail blocks, and q8's token groups with every remainder
    (batch 1..9). q8: equals W applied to each record's int8-rounded activations (reference_rows_q8)."""
    from xbitc.backends.llvm.rowlane import ROWS_KIND, RowLaneSpec, q8_scratch_bytes, reference_rows, reference_rows_q8

    k = compile_kernel(RowLaneSpec(act=act), target=host_target(without), kinds=(ROWS_KIND,))
    recs, buf, table, n = _rowlane_case(seed, rows, specs, extreme, act)
    x = np.random.default_rng(seed + 1).standard_normal((batch, n)).astype(np.float32)
    oracle = reference_rows_q8 if act == "q8" else reference_rows
    exact = oracle([(q, s.astype(np.float32), z, off) for q, s, z, off, _ in recs], x, rows)
    tol = _rowlane_bound(recs, x, act)
    perm = np.arange(n, dtype=np.int32)  # the identity, given explicitly: the gather path must agree too
    for rb in sorted({0, 16 * (rows // 32), 16 * (rows // 48)}):
        y = np.full((batch, rows), np.nan, dtype=np.float32)
        if act == "q8":
            scratch = np.zeros(q8_scratch_bytes([q.shape[1] for q, *_ in recs], batch, [r[4] for r in recs]), np.uint8)
            k.rows_q8(table.ctypes.data, len(recs), x.ctypes.data, perm.ctypes.data if rb else None, y.ctypes.data,
                      rb, rows, batch, n, rows, scratch.ctypes.data)
        elif batch == 1:
            k.rows_gemv(table.ctypes.data, len(recs), x.ctypes.data, perm.ctypes.data if rb else None,
                        y.ctypes.data, rb, rows)
        else:
            k.rows_gemm(table.ctypes.data, len(recs), x.ctypes.data, y.ctypes.data, rb, rows, batch, n, rows)
        assert np.isnan(y[:, :rb]).all()  # rows outside the range are not written
        assert np.all(np.abs(y[:, rb:] - exact[:, rb:]) <= tol[:, rb:] + 1e-30)


@pytest.mark.parametrize("without", [p.values[1] for p in _rowlane_targets() if p.values[0] == "q8"])
@pytest.mark.parametrize("specs", [
    [(1, 128), (2, 100), (5, 40)],  # shallow: runs of four row blocks
    [(7, 64), (8, 70), (1, 128)],  # deep: runs of two
    [(6, 60), (3, 120)],  # deep code bytes exactly half (360 of 720): not under half, runs of two
    [(6, 59), (3, 120), (4, 96)],  # just under half: four
])
def test_q8_row_runs_and_token_groups_for_every_depth_mix(specs, without):
    """Below q8_group_tokens tokens the q8 kernel picks four row blocks per record visit for matrices with under
    half their code bytes in records deeper than Q8_WIDE_MAX_BITS, else two; 7 whole blocks + a partial one run
    every loop (a run of 4, one of 2, a single block, the partial block) from row 0 and from a range start inside a
    run. From q8_group_tokens tokens on it runs them in groups (every code plane of every depth shared by a group)
    and the remainder one at a time: batch 1..9 covers every remainder. Equal to the oracle every way."""
    from xbitc.backends.llvm.rowlane import (Q8_WIDE_MAX_BITS, ROWS_KIND, RowLaneSpec, q8_group_tokens,
                                             q8_scratch_bytes, reference_rows_q8)

    assert Q8_WIDE_MAX_BITS == 5  # the cases above straddle this boundary
    target = host_target(without)
    assert q8_group_tokens(target) <= 4  # batches up to 9 hold two groups and every remainder
    k = compile_kernel(RowLaneSpec(act="q8"), target=target, kinds=(ROWS_KIND,))
    rows = 16 * 7 + 5
    recs, buf, table, n = _rowlane_case(3, rows, specs, act="q8")
    for batch in range(1, 10):
        x = np.random.default_rng(4 + batch).standard_normal((batch, n)).astype(np.float32)
        exact = reference_rows_q8([(q, s.astype(np.float32), z, off) for q, s, z, off, _ in recs], x, rows)
        tol = _rowlane_bound(recs, x, "q8")
        for rb in (0, 16, 48):
            y = np.full((batch, rows), np.nan, dtype=np.float32)
            scratch = np.zeros(q8_scratch_bytes([q.shape[1] for q, *_ in recs], batch, [r[4] for r in recs]),
                               np.uint8)
            k.rows_q8(table.ctypes.data, len(recs), x.ctypes.data, None, y.ctypes.data, rb, rows, batch, n, rows,
                      scratch.ctypes.data)
            assert np.isnan(y[:, :rb]).all()
            assert np.all(np.abs(y[:, rb:] - exact[:, rb:]) <= tol[:, rb:] + 1e-30), (batch, rb)


def test_rowlane_record_formats():
    """Packed at the record's depth unless bytes are smaller; the packed stream is the documented bit layout."""
    from xbitc.backends.llvm.rowlane import BYTES_KIND, layout_codes, record_kind

    assert record_kind(3, 3) == BYTES_KIND and record_kind(8, 1) == BYTES_KIND  # 3 bytes < 32*3 bits; 1 < 32
    assert record_kind(3, 20) == 3 and record_kind(2, 128) == 2  # 20 bytes > 12; 128 > 32
    codes = np.arange(17 * 40, dtype=np.int64).reshape(17, 40) % 8
    flat = layout_codes(codes.astype(np.uint8), 3)
    assert flat.size == 2 * 2 * 3 * 16 * 4  # 2 row blocks x 2 column blocks x 3 words x 16 lanes x 4 bytes
    words = flat.view("<u4").reshape(2, 2, 3, 16)
    for r, j in [(0, 0), (5, 31), (16, 39), (3, 10)]:
        w = words[r // 16, j // 32, :, r % 16]
        stream = sum(int(v) << (32 * i) for i, v in enumerate(w))
        assert (stream >> (3 * (j % 32))) & 7 == codes[r, j]


def test_kernel_cache_key_follows_the_generators_source(monkeypatch):
    """A disk-cached kernel is found by its fingerprint; an edit to the code generators must change it even when
    nobody bumped a version number (a stale kernel would compute the old layout's products)."""
    from xbitc.backends.llvm import jit

    spec, target = KernelSpec(bits=3, group_size=128), host_target()
    before = jit.fingerprint(spec, target)
    assert jit.fingerprint(spec, target) == before  # stable
    monkeypatch.setattr(jit, "SOURCE_DIGEST", "0" * 16)
    assert jit.fingerprint(spec, target) != before
