"""GPU kernels (backends/gpu): the kernel language and the packed product, rendered as WGSL and run through wgpu
(Mesa's lavapipe where there is no GPU), as Metal compiled as C++ against metal_shim.h and run on the CPU (what the
kernels compute, not whether Metal accepts them), and as CUDA compiled by nvcc for sm_80 and sm_90 (run on a GPU by
tests/device/test_cuda_kernels.py), against numpy; the emitted sources against committed goldens.

Tolerance of the product. Every step is exact but the float32 additions and multiplications: codes become floats
exactly (exponent trick), float16 scales and uint8 zero points convert exactly. Output r sums, per piece of at most
128 columns, s * (sum_j q_j x_j - z * sum_j x_j), then the pieces of one slice, then a 6-step tree over slices. So
each term s q_j x_j or s z x_j meets at most 128 + 3 + npieces + 6 roundings, and by Higham's bound for sums of
products (Accuracy and Stability of Numerical Algorithms, 3.1 / 4.2) |y - exact| <= (160 + npieces) * 2^-24 *
sum_j s (q_j + z) |x_j|: rigorous, so it cannot flake, and ~100x below the error of one wrong code (|s x_j|).
The dequantized rows are compared bit for bit: s * (q - z) is the same two float32 operations everywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xbitc.backends.gpu import lang as L
from xbitc.backends.gpu.cuda import cubin, nvcc
from xbitc.backends.gpu.lang import Kernel, f16, f32, i32, u32, vec4f
from xbitc.backends.gpu.metal_cpu import MetalCPU, cxx
from xbitc.backends.gpu.packed import GEMM_TOKENS, GpuMatrix, GpuRenderer, kernels
from xbitc.backends.gpu.render import CUDA, WGSL, Metal
from xbitc.backends.gpu.webgpu import NoAdapter, ShaderError, WebGPU
from xbitc.backends.llvm.rowlane import BYTES_KIND, reference_rows
from xbitc.backends.product import PackedProduct

GOLDEN = Path(__file__).parent / "golden"
UPDATE = "XBITC_UPDATE_GOLDEN"
SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
U = 2.0**-24
P = PackedProduct()
KERNELS = kernels(P)
NAMES = {role: P.function(role) for role in ("gemv", "gemm", "dequant")} | {"gather": "xbitc_rows_gather"}


# ------------------------------------------------------------------------------------------------ matrices


def make_matrix(rng, rows: int, segments, permuted: bool):
    """segments [(bits, ncols, group)] (group 0: one group) -> (records as rowlane `pack` takes them, in, perm)."""
    records, off = [], 0
    for bits, n, group in segments:
        g = group or n
        codes = rng.integers(0, 1 << bits, (rows, n), dtype=np.uint8)
        for c0 in range(0, n, g):
            scales = rng.uniform(0.01, 0.1, rows).astype(np.float16)
            zeros = rng.integers(0, 1 << bits, rows, dtype=np.uint8)
            records.append((codes[:, c0:c0 + g], scales, zeros, off + c0, bits))
        off += n
    return records, off, (rng.permutation(off) if permuted else None)


def oracle(records, x: np.ndarray, perm, rows: int, npieces: int) -> tuple[np.ndarray, np.ndarray]:
    """(y in float64, the error bound of the module docstring per output)."""
    xs = x if perm is None else x[:, perm]  # stored column j reads input column perm[j]
    want = reference_rows([r[:4] for r in records], xs, rows)
    mags = [(r[0], r[1], r[2], r[3]) for r in records]
    absum = np.zeros_like(want)
    for codes, s, z, off in mags:
        w = np.asarray(s, np.float64)[:, None] * (codes.astype(np.float64) + np.asarray(z, np.float64)[:, None])
        absum += np.abs(xs[:, off:off + codes.shape[1]]).astype(np.float64) @ w.T
    return want, (160 + npieces) * U * absum + 1e-30


def dense_row(records, perm, inp: int, row: int) -> np.ndarray:
    """Row `row` as float32 s * (q - z), columns in input order, 0 where no record reads the column."""
    out = np.zeros(inp, np.float32)
    if not records:
        return out
    stored = np.concatenate([r[1][row].astype(np.float32) * (r[0][row].astype(np.float32) - np.float32(r[2][row]))
                             for r in records])
    cols = np.concatenate([np.arange(r[3], r[3] + r[0].shape[1]) for r in records])
    out[cols if perm is None else perm[cols]] = stored
    return out


def check(runner, records, rows: int, inp: int, perm, x: np.ndarray, ids: np.ndarray) -> None:
    m = GpuMatrix.from_records(records, rows, inp, perm)
    want, bound = oracle(records, x, perm, rows, m.npieces)
    for role, tile in (("gemv", 1), ("gemm", GEMM_TOKENS)):
        y = runner.product(m, x, NAMES[role], tile)
        err = np.abs(y - want)
        assert (err <= bound).all(), f"{role}: worst error {err.max():.3g}, bound {bound[err > bound].min():.3g}"
    got = runner.dequant(m, ids)
    for t, row in enumerate(ids):
        expect = dense_row(records, perm, inp, int(row)) if row < rows else np.zeros(inp, np.float32)
        assert np.array_equal(got[t], expect), f"dequant row {row}"


class WebGPURunner:
    def __init__(self, gpu: WebGPU):
        self.gpu = gpu
        self.pipes = {k.name: gpu.pipeline(k) for k in KERNELS}

    def product(self, m: GpuMatrix, x: np.ndarray, name: str, tile: int) -> np.ndarray:
        g, T = self.gpu, x.shape[0]
        wb, xb = g.buffer(m.words), g.buffer(x)
        xp, y = g.buffer(4 * m.xp_floats(T, tile)), g.buffer(np.full(T * m.rows, np.nan, np.float32))
        g.dispatch((self.pipes[NAMES["gather"]], [xb, g.buffer(m.src), xp], *m.gather_args(T, tile)),
                   (self.pipes[name], [wb, wb, g.buffer(m.pieces), xp, y], *m.product_args(T, tile)))
        return g.read(y, np.float32, T * m.rows).reshape(T, m.rows)

    def dequant(self, m: GpuMatrix, ids: np.ndarray) -> np.ndarray:
        g = self.gpu
        out = g.buffer(np.full(len(ids) * m.inp, np.nan, np.float32))
        g.dispatch((self.pipes[NAMES["dequant"]], [g.buffer(m.words), g.buffer(m.pieces), g.buffer(m.dst),
                                                  g.buffer(ids), out], *m.dequant_args(len(ids))))
        return g.read(out, np.float32, len(ids) * m.inp).reshape(len(ids), m.inp)


class MetalRunner:
    def __init__(self, lib: MetalCPU):
        self.lib = lib

    def product(self, m: GpuMatrix, x: np.ndarray, name: str, tile: int) -> np.ndarray:
        T = x.shape[0]
        xp = np.zeros(m.xp_floats(T, tile), np.float32)
        y = np.full(T * m.rows, np.nan, np.float32)
        params, groups = m.gather_args(T, tile)
        self.lib.run(NAMES["gather"], [np.array(x), m.src.copy(), xp], params, groups)
        words = m.words.copy()
        self.lib.run(name, [words, words, m.pieces.copy(), xp, y], *m.product_args(T, tile))
        return y.reshape(T, m.rows)

    def dequant(self, m: GpuMatrix, ids: np.ndarray) -> np.ndarray:
        out = np.full(len(ids) * m.inp, np.nan, np.float32)
        self.lib.run(NAMES["dequant"], [m.words.copy(), m.pieces.copy(), m.dst.copy(), ids.copy(), out],
                     *m.dequant_args(len(ids)))
        return out.reshape(len(ids), m.inp)


@pytest.fixture(scope="module")
def webgpu():
    try:
        return WebGPU(f16=True)
    except NoAdapter as err:
        pytest.skip(f"no WebGPU adapter for the WGSL kernels ({err}); `make system-deps` installs lavapipe")


@pytest.fixture(scope="module")
def wgsl_runner(webgpu):
    return WebGPURunner(webgpu)


@pytest.fixture(scope="module")
def metal_runner(tmp_path_factory):
    if cxx() is None:
        pytest.skip("no C++ compiler (clang++ or g++) for the Metal kernels on the CPU")
    return MetalRunner(MetalCPU(KERNELS, tmp_path_factory.mktemp("metal")))


SEGMENTS = st.lists(st.tuples(st.integers(1, 8), st.integers(1, 700), st.sampled_from([0, 32, 64, 128])),
                    min_size=1, max_size=4)
CASE = dict(rows=st.integers(1, 40), segments=SEGMENTS, batch=st.integers(1, 3), permuted=st.booleans(),
            seed=st.integers(0, 2**31 - 1))


def _case(runner, rows, segments, batch, permuted, seed):
    rng = np.random.default_rng(seed)
    records, inp, perm = make_matrix(rng, rows, segments, permuted)
    x = rng.standard_normal((batch, inp)).astype(np.float32)
    check(runner, records, rows, inp, perm, x, rng.integers(0, rows + 2, 3).astype(np.uint32))


@settings(max_examples=30, **SETTINGS)
@given(**CASE)
def test_wgsl_product_matches_the_oracle(wgsl_runner, rows, segments, batch, permuted, seed):
    _case(wgsl_runner, rows, segments, batch, permuted, seed)


@settings(max_examples=12, **SETTINGS)
@given(**CASE)
def test_metal_product_matches_the_oracle(metal_runner, rows, segments, batch, permuted, seed):
    _case(metal_runner, rows, segments, batch, permuted, seed)


def every_kind(runner) -> None:
    """Every depth 1..8 and kind 9 in one matrix, pieces split from 300-column records, over 2 x 64 pieces (every
    slice busy, some twice: the whole reduction tree carries data), 35 rows (a partial row block), 6 tokens (a gemm
    tile and a partial one), permuted columns, a dropped column range."""
    rng = np.random.default_rng(7)
    segs = [(b, 300 if b % 2 else 64, 128 if b < 4 else 0) for b in range(1, 9)] + [(4, 3, 0), (8, 40, 0)]
    records, inp, perm = make_matrix(rng, 35, segs + [(3, 3600, 32)], True)
    records = [r for r in records if not (r[4] == 2)]  # depth-2 columns dropped: no record reads them
    m = GpuMatrix.from_records(records, 35, inp, perm)
    assert set(m.pieces[:, 0]) == set(range(1, 9)) - {2} | {BYTES_KIND} and m.pieces[:, 1].max() == 128
    assert m.npieces > 128
    x = rng.standard_normal((6, inp)).astype(np.float32)
    check(runner, records, 35, inp, perm, x, np.array([0, 34, 16, 35, 1000], np.uint32))
    check(runner, [], 5, 40, None, x[:2, :40], np.array([0, 4], np.uint32))  # every column dropped: zeros


@pytest.mark.parametrize("target", ["wgsl", "metal"])
def test_every_kind_with_tiles_and_ragged_edges(target, request):
    every_kind(request.getfixturevalue(f"{target}_runner"))


# ------------------------------------------------------------------------------------------------ sources


@pytest.mark.parametrize("lang,ext", [("wgsl", "wgsl"), ("cuda", "cu"), ("metal", "metal")])
def test_rendered_sources_match_the_goldens(lang, ext):
    r = GpuRenderer(lang).render(P)
    assert r.functions == tuple(k.name for k in KERNELS)
    golden = GOLDEN / f"rowlane.{ext}"
    regenerate = f"regenerate it deliberately with {UPDATE}=1 pytest tests/test_gpu_kernels.py, review and commit it"
    if os.environ.get(UPDATE) == "1":
        golden.write_text(r.payload)
    assert golden.exists(), f"{golden} is missing (goldens are committed): {regenerate}"
    assert r.payload == golden.read_text(), f"the rendered {lang} differs from {golden}; if intended, {regenerate}"


def test_wgsl_has_no_64_bit_or_8_bit_types():
    text = WGSL().render_all(KERNELS)
    for word in ("i64", "u64", "f64", "u8", "f16"):
        assert word not in text


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found: the CUDA kernels compile only where the CUDA toolkit is")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile(arch, tmp_path):
    image = cubin(CUDA().render_all(KERNELS + [features_kernel(), reduce_kernel()]), arch, tmp_path)
    for k in KERNELS:
        assert k.name.encode() in image


def test_broken_wgsl_names_kernel_line_and_column(webgpu):
    k = KERNELS[0]
    good = WGSL().render(k)
    lines = good.splitlines()
    at = next(i for i, line in enumerate(lines) if "let s: u32" in line)
    lines[at] = lines[at].replace("src[c]", "src[c] + 1.5f")
    with pytest.raises(ShaderError) as err:
        webgpu.pipeline(k, "\n".join(lines))
    e = err.value
    assert (e.kernel, e.line) == (k.name, at + 1) and e.column > 0
    assert str(e).startswith(f"WGSL kernel {k.name}, line {at + 1}, column {e.column}: ")


# ------------------------------------------------------------------------------------------------ the language


def features_kernel() -> Kernel:
    """One kernel touching every construct the printers spell differently."""
    k = Kernel("features", (64,))
    a, h, w, v = k.buffer("a", f32), k.buffer("h", f16), k.buffer("w", u32), k.buffer("v", vec4f)
    out, outi, outh = k.buffer("out", f32, write=True), k.buffer("outi", i32, write=True), k.buffer("outh", f16, True)
    n = k.param("n", u32)
    i = k.let("i", k.global_id(0))
    with k.if_(i < n):
        x, u = k.let("x", a[i]), k.let("u", w[i])
        q = k.let("q", v[i >> 2])
        comp = k.var("comp", 0.0)
        with k.switch(i & 3) as sw:
            for c in range(3):
                with sw.case(c):
                    comp.set(q[c])
            with sw.default():
                comp.set(q.w)
        fs = [L.exp(x), L.log(abs(x) + 1.0), L.sqrt(abs(x)), L.rsqrt(abs(x) + 1.0), L.tanh(x), L.sin(x), L.cos(x),
              L.floor(x), L.ceil(x), L.minimum(x, 0.5), L.maximum(x, 0.5), L.select(x < 0.0, -x, x * 2.0),
              h[i].cast(f32), L.half_lo(u), L.half_hi(u), L.bitcast((u & 0x7FFFFF) | 0x3F800000, f32), u.cast(f32),
              comp, L.bitcast(L.bitcast(x, i32), f32), float("inf") * (x - x + 1.0)]
        for j, e in enumerate(fs):
            out[i * len(fs) + j] = e
        xi = k.let("xi", (x * 100.0).cast(i32))
        ints = [xi >> 2, -xi, abs(xi), L.minimum(xi, 7), L.maximum(xi, -7), xi // 3, xi % 5, ~xi,
                (u >> 7).cast(i32), L.bitcast(x, i32), xi.ne(0).cast(i32)]
        for j, e in enumerate(ints):
            outi[i * len(ints) + j] = e
        outh[i] = (x * 0.5).cast(f16) + h[i]
    return k


def features_expected(a, h, w, v):
    import warnings

    n = len(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = lambda bits: bits.astype(np.uint16).view(np.float16).astype(np.float32)  # noqa: E731
        comp = v.reshape(-1)[np.arange(n)]  # vec4 i>>2, component i&3: the flat element i
        fs = [np.exp(a), np.log(np.abs(a) + 1), np.sqrt(np.abs(a)), 1 / np.sqrt(np.abs(a) + 1), np.tanh(a),
              np.sin(a), np.cos(a), np.floor(a), np.ceil(a), np.minimum(a, 0.5), np.maximum(a, 0.5),
              np.where(a < 0, -a, a * 2), h.astype(np.float32), half(w & 0xFFFF), half(w >> 16),
              ((w & 0x7FFFFF) | 0x3F800000).view(np.float32), w.astype(np.float32), comp, a,
              np.full(n, np.inf, np.float32)]
        xi = (a * np.float32(100)).astype(np.int32)
        ints = [xi >> 2, -xi, np.abs(xi), np.minimum(xi, 7), np.maximum(xi, -7), np.trunc(xi / 3).astype(np.int32),
                np.fmod(xi, 5), ~xi, (w >> 7).astype(np.int32), a.view(np.int32), (xi != 0).astype(np.int32)]
        hs = (a * np.float32(0.5)).astype(np.float16).astype(np.float32) + h.astype(np.float32)
    return (np.stack(fs, 1).astype(np.float32), np.stack(ints, 1).astype(np.int32),
            hs.astype(np.float16))


def reduce_kernel() -> Kernel:
    """Row sums of squares through shared memory, a halving tree and barriers (rmsnorm's reduction)."""
    k = Kernel("sumsq", (64,))
    x, y = k.buffer("x", f32), k.buffer("y", f32, write=True)
    n = k.param("n", u32)
    red = k.shared("red", f32, 64)
    t, row = k.local_id(0), k.group_id(0)
    acc = k.var("acc", 0.0)
    with k.loop("j", t, n, 64) as j:
        v = k.let("v", x[row * n + j])
        acc.set(acc + v * v)
    red[t] = acc
    k.barrier()
    for s in (32, 16, 8, 4, 2, 1):
        with k.if_(t < s):
            red[t] = red[t] + red[t + s]
        k.barrier()
    with k.if_(t.eq(0)):
        y[row] = red[0]
    return k


def _features_inputs(rng, n=256):
    a = (rng.standard_normal(n) * 3).astype(np.float32)
    a[:4] = [0.0, -0.0, 1.5, -2.5]
    h = rng.standard_normal(n).astype(np.float16)
    w = rng.integers(0, 2**32, n, dtype=np.uint32) & np.uint32(0x3BFF3BFF)  # finite float16 halves
    v = rng.standard_normal((n // 4, 4)).astype(np.float32)
    return a, h, w, v


def _check_features(fs, ints, hs, a, h, w, v):
    ef, ei, eh = features_expected(a, h, w, v)
    exact = [7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # floor .. inf: exact on every target
    np.testing.assert_array_equal(fs[:, exact], ef[:, exact])
    np.testing.assert_allclose(fs, ef, rtol=2e-6, atol=2e-6)  # exp, log, tanh, ...: a few ulp
    np.testing.assert_array_equal(ints, ei)
    np.testing.assert_array_equal(hs, eh)


def test_language_features_on_webgpu(webgpu):
    rng = np.random.default_rng(1)
    a, h, w, v = _features_inputs(rng)
    n = len(a)
    k = features_kernel()
    g = webgpu
    bufs = [g.buffer(b) for b in (a, h, w, v)] + [g.buffer(4 * 20 * n), g.buffer(4 * 11 * n), g.buffer(2 * n)]
    g.dispatch((g.pipeline(k), bufs, {"n": n}, (n // 64,)))
    fs = g.read(bufs[4], np.float32, 20 * n).reshape(n, 20)
    ints = g.read(bufs[5], np.int32, 11 * n).reshape(n, 11)
    _check_features(fs, ints, g.read(bufs[6], np.float16, n), a, h, w, v)
    x = rng.standard_normal((3, 300)).astype(np.float32)
    yb = g.buffer(12)
    g.dispatch((g.pipeline(reduce_kernel()), [g.buffer(x), yb], {"n": 300}, (3,)))
    np.testing.assert_allclose(g.read(yb, np.float32, 3), (x.astype(np.float64) ** 2).sum(1), rtol=1e-5)


def test_language_features_on_metal_cpu(tmp_path):
    if cxx() is None:
        pytest.skip("no C++ compiler (clang++ or g++) for the Metal kernels on the CPU")
    diverge = Kernel("diverge", (8,))
    out = diverge.buffer("out", u32, write=True)
    with diverge.if_(diverge.local_id(0) < 4):
        diverge.barrier()
    out[diverge.local_id(0)] = 1
    lib = MetalCPU([features_kernel(), reduce_kernel(), diverge], tmp_path)
    rng = np.random.default_rng(1)
    a, h, w, v = _features_inputs(rng)
    n = len(a)
    fs, ints, hs = np.zeros((n, 20), np.float32), np.zeros((n, 11), np.int32), np.zeros(n, np.float16)
    lib.run("features", [a, h, w, v, fs, ints, hs], {"n": n}, (n // 64,))
    _check_features(fs, ints, hs, a, h, w, v)
    x = rng.standard_normal((3, 300)).astype(np.float32)
    y = np.zeros(3, np.float32)
    lib.run("sumsq", [x, y], {"n": 300}, (3,))
    np.testing.assert_allclose(y, (x.astype(np.float64) ** 2).sum(1), rtol=1e-5)
    with pytest.raises(RuntimeError, match="barrier was not reached"):
        lib.run("diverge", [np.zeros(8, np.uint32)], {}, (1,))


def test_language_refuses_what_a_target_would_not_mean():
    k = Kernel("bad", (64,))
    a, b = k.buffer("a", f32), k.buffer("b", u32)
    with pytest.raises(TypeError, match="f32 and u32|cast"):
        a[0] + b[0]
    with pytest.raises(TypeError, match="float literal"):
        b[0] + 1.5
    with pytest.raises(ValueError, match="shift by 32"):
        b[0] << 32
    with pytest.raises(TypeError, match="read-only"):
        a[0] = 1.0
    with pytest.raises(TypeError, match="Python truth value"):
        bool(a[0] < 1.0)
    with k.if_(b[0] < 3):
        inner = k.let("inner", b[1])
    with pytest.raises(ValueError, match="outside the block"):
        k.let("late", inner + 1)
    with k.loop("i", 0, 4):  # sibling blocks may reuse a name; nested ones may not shadow it
        first = k.let("w", 1)
        with k.if_(first > 0):
            assert k.let("w", 2).arg == "w_1"
    with k.loop("i", 0, 4):
        assert k.let("w", 3).arg == "w"
    assert k.let("float", 1).arg == "float_"  # a C type name, renamed
    with pytest.raises(ValueError, match="WGSL forbids"):
        with k.loop("i", 0, 4), k.switch(b[0]) as sw, sw.case(1):
            k.continue_()
    h = Kernel("halfs", (64,))
    h.buffer("x", f16)
    with pytest.raises(ValueError, match="shader-f16"):
        WGSL().render(h)
    assert WGSL(f16=True).render(h).startswith("enable f16;")
    assert Metal().render(h).startswith("#include <metal_stdlib>")


# ------------------------------------------------------------------------------------------------ WGSL expressions


def _f_tree(depth: int):
    leaf = st.one_of(st.tuples(st.just("leaf"), st.sampled_from(["fa", "fb"])),
                     st.tuples(st.just("const"), st.floats(-4, 4, width=32)),
                     st.tuples(st.just("floor"), st.sampled_from(["fa", "fb"])),
                     st.tuples(st.just("bits"), st.sampled_from(["ua", "ub"])),
                     st.tuples(st.just("half"), st.sampled_from(["ua", "ub"]), st.booleans()))
    if depth == 0:
        return leaf
    sub, usub = _f_tree(depth - 1), _u_tree(depth - 1)
    return st.one_of(leaf, st.tuples(st.sampled_from(["+", "-", "*", "min", "max"]), sub, sub),
                     st.tuples(st.sampled_from(["neg", "abs"]), sub), st.tuples(st.just("sel"), sub, sub, sub, sub),
                     st.tuples(st.just("u2f"), usub))


def _u_tree(depth: int):
    leaf = st.one_of(st.tuples(st.just("leaf"), st.sampled_from(["ua", "ub"])),
                     st.tuples(st.just("const"), st.integers(0, 2**32 - 1)),
                     st.tuples(st.just("f2u"), st.sampled_from(["fa", "fb"])))
    if depth == 0:
        return leaf
    sub = _u_tree(depth - 1)
    return st.one_of(leaf, st.tuples(st.sampled_from(["+", "-", "*", "&", "|", "^", "/", "%", "min", "max"]), sub, sub),
                     st.tuples(st.sampled_from(["<<", ">>"]), sub, st.integers(0, 31)),
                     st.tuples(st.just("sel"), sub, sub, sub, sub))


def _build(t, env):
    """(lang expression, numpy value) of tree t; env: name -> (expression, array)."""
    op = t[0]
    if op == "leaf":
        return env[t[1]]
    if op == "const":  # bound by let: WGSL refuses overflow in expressions of literals alone
        dt = f32 if isinstance(t[1], float) else u32
        return env["kernel"].let("c", L.const(t[1], dt)), (np.float32(t[1]) if dt is f32 else np.uint32(t[1]))
    if op == "floor":
        e, a = env[t[1]]
        return L.floor(e), np.floor(a)
    if op == "bits":
        e, a = env[t[1]]
        return L.bitcast((e & 0x7FFFFF) | 0x3F800000, f32), ((a & 0x7FFFFF) | 0x3F800000).view(np.float32)
    if op == "half":
        e, a = env[t[1]]
        bits = (a & np.uint32(0x3BFF3BFF)) >> (16 if t[2] else 0)
        return ((L.half_hi if t[2] else L.half_lo)(e & 0x3BFF3BFF),
                (bits & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32))
    if op == "f2u":
        e, a = env[t[1]]
        return L.floor(abs(e)).cast(u32), np.floor(np.abs(a)).astype(np.uint32)
    if op == "u2f":
        e, a = _build(t[1], env)
        return e.cast(f32), np.asarray(a).astype(np.float32)
    if op in ("neg", "abs"):
        e, a = _build(t[1], env)
        return (-e, -a) if op == "neg" else (abs(e), np.abs(a))
    if op in ("<<", ">>"):
        e, a = _build(t[1], env)
        return (e << t[2], a << np.uint32(t[2])) if op == "<<" else (e >> t[2], a >> np.uint32(t[2]))
    if op == "sel":
        (ce, ca), (de, da), (ae, aa), (be, ba) = (_build(s, env) for s in t[1:])
        return L.select(ce < de, ae, be), np.where(ca < da, aa, ba)
    (ae, aa), (be, ba) = _build(t[1], env), _build(t[2], env)
    if op in ("/", "%"):
        be, ba = be | 1, ba | np.uint32(1)
    fn = {"+": (lambda x, y: x + y, np.add), "-": (lambda x, y: x - y, np.subtract),
          "*": (lambda x, y: x * y, np.multiply), "&": (lambda x, y: x & y, np.bitwise_and),
          "|": (lambda x, y: x | y, np.bitwise_or), "^": (lambda x, y: x ^ y, np.bitwise_xor),
          "/": (lambda x, y: x // y, np.floor_divide), "%": (lambda x, y: x % y, np.remainder),
          "min": (L.minimum, np.minimum), "max": (L.maximum, np.maximum)}[op]
    return fn[0](ae, be), fn[1](aa, ba)


@settings(max_examples=20, **SETTINGS)
@given(ftree=_f_tree(3), utree=_u_tree(3), seed=st.integers(0, 2**31 - 1))
def test_wgsl_expressions_evaluate_like_numpy(webgpu, ftree, utree, seed):
    rng = np.random.default_rng(seed)
    n = 64
    data = {"fa": (rng.standard_normal(n) * 2).astype(np.float32), "fb": rng.uniform(-4, 4, n).astype(np.float32),
            "ua": rng.integers(0, 2**32, n, dtype=np.uint32), "ub": rng.integers(0, 2**32, n, dtype=np.uint32)}
    data["fa"][:3] = [0.0, 1.0, -0.5]
    data["ua"][:3] = [0, 1, 2**32 - 1]
    k = Kernel("expr", (64,))
    bufs = {name: k.buffer(name, f32 if name[0] == "f" else u32) for name in data}
    fout, uout = k.buffer("fout", f32, write=True), k.buffer("uout", u32, write=True)
    i = k.let("i", k.global_id(0))
    env = {name: (k.let(f"{name}_i", b[i]), data[name]) for name, b in bufs.items()} | {"kernel": k}
    with np.errstate(all="ignore"):
        fe, fa = _build(ftree, env)
        ue, ua = _build(utree, env)
    fout[i], uout[i] = fe, ue
    g = webgpu
    gb = [g.buffer(data[name]) for name in data] + [g.buffer(4 * n), g.buffer(4 * n)]
    g.dispatch((g.pipeline(k), gb, {}, (1,)))
    want_f = np.broadcast_to(np.asarray(fa, np.float32), (n,))
    got_f = g.read(gb[4], np.float32, n)
    # exact but for contraction of a * b + c into one rounding (allowed by WGSL): a few ulp of the largest operand
    np.testing.assert_allclose(got_f, want_f, rtol=1e-5, atol=1e-5 * (1 + np.abs(want_f).max()))
    np.testing.assert_array_equal(g.read(gb[5], np.uint32, n), np.broadcast_to(np.asarray(ua, np.uint32), (n,)))
