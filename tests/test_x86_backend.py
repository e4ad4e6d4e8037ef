"""The x86 backend: whole-model logits equal the reference backend's, mixed-depth permuted weights equal the float64
product, the artifact carries kernels/ and a C header that links, and the kernel disk cache is used.

Tolerances.
* Per matrix (`test_mixed_depth_permuted_matrix`): the rigorous float32 bound of tests/test_llvm_kernels.py,
  |y - y_exact| <= (2n + 64 + 4 * segments) * u * sum_j |s_j| (q_j + z_j) |x_j| with u = 2**-24 (Higham 3.1/4.2;
  terms s*q*x and s*z*x, one extra rounding per accumulated segment and for the bias). It cannot flake and is ~n
  times smaller than one wrong code's effect (~|s_j x_j|).
* Whole model (`test_logits_match_reference`): both backends evaluate the same quantized network in float32 and
  differ only in summation order inside each linear: per linear at most the bound above, in practice ~sqrt(n) * u
  relative (measured: max |diff| / max |logit| = 1.1e-6 over all cases here). We allow 2e-5 * max |logit|
  (18x margin over observed values; the rigorous per-linear bound for n = 160 is 2.3e-5 of sum |terms|), while
  one wrong code at 8 bits moves a logit by ~s*x ~ 1e-3 of the logit scale (50x the tolerance), at 2 bits far more.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_lm
from xbitc import frontend, registry, runtime
from xbitc.backends import cpu, x86
from xbitc.backends.cpu import emit, linears, segments, targets, threads
from xbitc.backends.cpu import rows as row_lane
from xbitc.backends.llvm import Target, clear_memory_cache, compile_stats, host_target
from xbitc.backends.llvm.layout import repack
from xbitc.driver import CompileOptions, compile_model
from xbitc.ir.graph import Graph, Node, Op, Ref
from xbitc.quant.gptq import gptq_quantize
from xbitc.quant.format import QuantizedMatrix, Segment
from xbitc.quant.packed import PackedMatrix

U = 2.0**-24
pytestmark = pytest.mark.skipif(not x86.is_x86_host(), reason="the x86 backend executes on x86-64 hosts only")


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("XBITC_CACHE_DIR", str(tmp_path_factory.mktemp("x86cache")))
    clear_memory_cache()
    yield
    mp.undo()
    clear_memory_cache()


def compile_tiny(out: Path, **kw):
    m, x = tiny_lm()
    loaded = frontend._from_module(m, x, "tiny", "0")
    opts = CompileOptions(log=lambda s: None, progress=False, backend="x86", **kw)
    return m, compile_model(loaded, out, opts)


@pytest.fixture(scope="module")
def artifact_4b(tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "t4.xbitc"
    _, manifest = compile_tiny(out, bits=4, group=32)
    return out, manifest


def test_entry_point_and_capabilities():
    assert registry.get(registry.BACKEND_GROUP, "x86") is x86.X86Backend
    caps = x86.X86Backend().capabilities()
    assert caps.bit_depths == tuple(range(1, 9)) and caps.executes_here


@pytest.fixture(params=["rows", "segments"])
def kernels(request, monkeypatch):
    """Both ways the x86 backend runs packed linears: the row-lane kernel (default) and per-segment kernels."""
    monkeypatch.setenv("XBITC_X86_LINEAR", request.param)
    return request.param


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64])
def test_logits_match_reference(tmp_path, bits, group, kernels):
    out = tmp_path / "m.xbitc"
    compile_tiny(out, bits=bits, group=group)
    fast = runtime.load(out)  # the manifest names the x86 backend
    ref = runtime.load(out, backend="reference")
    impl = fast.program.interp.linear_impl
    assert isinstance(impl, linears.CpuLinears)
    if kernels == "rows":
        assert len(impl.linears) == 4 and all(lin.rows is not None and not lin.segs for lin in impl.linears.values())
    else:
        plans = [p for ps in impl.plans().values() for p in ps]
        assert len(plans) == 4 and all(p.how == "interleaved" for p in plans)
    g = torch.Generator().manual_seed(bits * 100 + group)
    for shape in [(1, 1), (1, 5), (2, 10)]:  # one token: gemv kernels; several: gemm kernels
        ids = torch.randint(0, 96, shape, generator=g)
        a, b = fast(ids), ref(ids)
        assert a.shape == b.shape == (*shape, 96) and a.dtype == torch.float32
        assert float((a - b).abs().max()) <= 2e-5 * float(b.abs().max()), shape


MIXED = {8: 30, 4: 100, 3: 20, 2: 24, 0: 26}


def _mixed_matrix(group: int, seed: int = 0, counts: dict[int, int] = MIXED):
    """A GPTQ-quantized [72, sum(counts)] matrix with counts[b] columns of depth b (shuffled): a permuted
    PackedMatrix with one segment per depth (0 included)."""
    rng = np.random.default_rng(seed)
    depths = np.concatenate([np.full(n, b) for b, n in counts.items()])
    out, inp = 72, len(depths)
    rng.shuffle(depths)
    w = torch.from_numpy(rng.standard_normal((out, inp)).astype(np.float32))
    xs = torch.from_numpy(rng.standard_normal((256, inp)).astype(np.float32))
    h = 2.0 / xs.shape[0] * xs.T @ xs
    q = gptq_quantize(w, h, depths, group)
    assert q.perm is not None and any(s.bits == 0 for s in q.segments)
    return q, PackedMatrix.from_quantized(q)


def _random_matrix(group: int, counts: dict[int, int], out: int = 40, seed: int = 0):
    """Random codes / scales / zero points in segments of counts[b] columns of depth b, a random permutation
    (GPTQ is too slow for wide test matrices and the kernels do not care where the codes came from)."""
    rng = np.random.default_rng(seed)
    segs, codes, scales, zeros, pos = [], [], [], [], 0
    for b, n in counts.items():
        seg = Segment(b, min(group, n), pos, pos + n)
        segs.append(seg)
        pos += n
        codes.append(rng.integers(0, 1 << b, (out, n), dtype=np.uint8) if b else np.zeros((out, n), np.uint8))
        scales.append(rng.uniform(0.01, 0.1, (out, seg.ngroups)).astype(np.float16))
        zeros.append(rng.integers(0, 1 << b, (out, seg.ngroups), dtype=np.uint8) if b else np.zeros((out, 0), np.uint8))
    q = QuantizedMatrix((out, pos), segs, codes, scales, zeros, rng.permutation(pos).astype(np.int32))
    return q, PackedMatrix.from_quantized(q)


def _bound(q, x: np.ndarray) -> np.ndarray:
    """sum_j |s_j| (q_j + z_j) |x_j| per output (float64), for x [T, in]."""
    xp = np.abs(x[:, q.perm]).astype(np.float64)
    acc = np.zeros((x.shape[0], q.shape[0]))
    for seg, c, s, z in zip(q.segments, q.codes, q.scales, q.zeros):
        if seg.bits == 0:
            continue
        rep = lambda a: np.repeat(np.asarray(a, dtype=np.float64), seg.group_size, axis=1)[:, : seg.ncols]
        coef = np.abs(rep(s)) * (c.astype(np.float64) + rep(z))
        acc += xp[:, seg.start : seg.stop] @ coef.T
    return acc


def _linear_graph(name: str, pm: PackedMatrix, bias: torch.Tensor | None) -> Graph:
    """x -> packed_linear(x, W, b) -> output, the smallest graph the backend lowers."""
    nodes = [Node("x", Op.INPUT), Node("w", Op.PARAM, attrs={"name": name})]
    args = [Ref("x"), Ref("w")]
    params = {name: pm}
    if bias is not None:
        nodes.append(Node("b", Op.PARAM, attrs={"name": name + ".bias"}))
        args.append(Ref("b"))
        params[name + ".bias"] = bias
    nodes += [Node("y", Op.PACKED_LINEAR, args=tuple(args)), Node("out", Op.OUTPUT, args=(Ref("y"),))]
    return Graph(nodes=nodes, params=params)


# segment groups are min(group, ncols): with 32, the 100-column 4-bit segment has group 32 (interleaved kernel), the
# 30-, 20- and 24-column ones groups 30 and 20 (canonical kernel) and 24 (regrouped to 8); with 96, group 96 runs
# regrouped at 32. Segments of 512 / 1024 columns (random codes) fill il16w32 blocks exactly: AVX-512 hosts run
# that layout.
WIDE = {5: 512, 3: 1024, 0: 64}


NARROW = {4: 100, 3: 20, 0: 4}  # group 20 over 100 columns has no fast kernel; 20 columns in one group are padded


@pytest.mark.parametrize("group, counts, hows", [
    (32, MIXED, {"interleaved", "regrouped"}),  # 30 and 20 columns in one group: zero-padded to 32; 24 regrouped at 8
    (96, MIXED, {"regrouped", "interleaved"}),
    (128, WIDE, {"interleaved"}),
    (20, NARROW, {"canonical", "interleaved"}),
])
def test_mixed_depth_permuted_matrix(group, counts, hows, kernels, monkeypatch, caplog):
    monkeypatch.setattr(cpu, "_logged", set())
    q, pm = _mixed_matrix(group, counts=counts) if counts is MIXED else _random_matrix(group, counts)
    bias = torch.linspace(-1, 1, q.shape[0])
    with caplog.at_level(logging.INFO, logger="xbitc.backends.cpu"):
        prog = x86.X86Backend().lower(_linear_graph("lin.weight", pm, bias))
    if kernels == "segments":
        plans = prog.interp.linear_impl.plans()["lin.weight"]
        assert {p.how for p in plans} == hows
        assert ("canonical-layout" in caplog.text) == ("canonical" in hows)
        assert ("scales repeated" in caplog.text) == ("regrouped" in hows)
        if counts is WIDE and host_target().has("avx512f"):
            assert {p.spec.layout for p in plans} == {"il16w32"}
    else:  # every segment and group is a record of the one row-lane call
        lin = prog.interp.linear_impl.linears["lin.weight"]
        assert lin.rows is not None and lin.rows.nrec == sum(s.ngroups for s in q.segments if s.bits)
    w64 = q.dequantize().double()
    rng = np.random.default_rng(1)
    for lead in [(1,), (3,), (2, 5), ()]:
        x = torch.from_numpy(rng.standard_normal((*lead, q.shape[1])).astype(np.float32))
        y = prog(x)
        assert y.shape == (*lead, q.shape[0])
        x2 = x.reshape(-1, q.shape[1]).numpy()
        exact = x2.astype(np.float64) @ w64.numpy().T + bias.double().numpy()
        nseg = sum(1 for s in q.segments if s.bits)
        tol = (2 * q.shape[1] + 64 + 4 * nseg) * U * (_bound(q, x2) + np.abs(bias.numpy()))
        assert np.all(np.abs(y.reshape(-1, q.shape[0]).double().numpy() - exact) <= tol + 1e-30), lead


def test_kernel_plan_choices():
    level = {lv.suffix: lv for lv in targets.X86_64.levels}
    wide = Target(targets.X86_64.triple, level["avx512"].cpu, level["avx512"].features)
    narrow = Target(targets.X86_64.triple, level["avx2"].cpu, level["avx2"].features)
    plan = lambda b, g, t, n: (segments.kernel_plan(b, g, t, n).how, segments.kernel_plan(b, g, t, n).spec.layout,
                               segments.kernel_plan(b, g, t, n).kernel_group)
    assert plan(3, 128, wide, 1536) == ("interleaved", "il16w32", 128)  # 3 whole 512-column blocks
    assert plan(3, 128, wide, 576) == ("interleaved", "il8w32", 128)  # 768 padded columns instead of 1024
    assert plan(3, 128, narrow, 1536) == ("interleaved", "il8w32", 128)
    assert plan(4, 576, wide, 576) == ("regrouped", "il8w32", 64)  # per-channel SmolLM2 rows
    assert plan(4, 160, wide, 160) == ("regrouped", "il8w32", 32)
    assert plan(4, 1024, wide, 4096) == ("interleaved", "il16w32", 1024)
    assert plan(2, 20, wide, 20) == ("canonical", "canonical", 20)


@pytest.mark.parametrize("pool", ["spin", "python"])
@pytest.mark.parametrize("act", ["f32", "q8"])
def test_threaded_row_ranges_give_identical_results(monkeypatch, kernels, pool, act):
    """Split over 3 threads through the spinning pool (gemv and q8; the f32 gemm always takes the Python pool) or
    the Python pool: bit-identical to one thread."""
    monkeypatch.setenv("XBITC_X86_POOL", pool)
    monkeypatch.setenv("XBITC_X86_ACT", act)
    q, pm = _mixed_matrix(32, seed=3)
    prog = x86.X86Backend().lower(_linear_graph("w", pm, None))
    x = torch.randn(4, q.shape[1])
    one = [prog(x), prog(x[:1])]
    monkeypatch.setattr(threads, "MIN_TASK_MACS", 1)
    monkeypatch.setattr(threads, "MIN_SPIN_TASK_MACS", 1)
    assert threads.row_ranges(72, 10**6, threads=3) == [(0, 32), (32, 64), (64, 72)]
    before = threads.num_threads()
    threads.set_num_threads(3)
    try:
        many = [prog(x), prog(x[:1])]
    finally:
        threads.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)  # rows are computed independently of the split


def test_spinning_pool_replaced_or_unbuildable_falls_back(monkeypatch, kernels):
    """A pool closed under a running model (set_num_threads from another thread) leaves that call to one thread;
    a pool that could not be built (False) does not break set_num_threads."""
    monkeypatch.setenv("XBITC_X86_POOL", "spin")
    q, pm = _mixed_matrix(32, seed=4)
    prog = x86.X86Backend().lower(_linear_graph("w", pm, None))
    x = torch.randn(1, q.shape[1])
    want = prog(x)
    monkeypatch.setattr(threads, "MIN_SPIN_TASK_MACS", 1)
    before = threads.num_threads()
    threads.set_num_threads(3)
    try:
        assert torch.equal(prog(x), want)
        pool = threads._spin
        if pool:  # the row-lane kernel ran through it: close it behind the model's back
            pool.close()
            assert torch.equal(prog(x), want)
        monkeypatch.setattr(threads, "_spin", False)
        threads.set_num_threads(2)  # must not try to close False
        assert threads._spin is None
    finally:
        threads.set_num_threads(before)


def test_reference_fallback_when_no_kernel_builds(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "_logged", set())

    def broken(*a, **k):
        raise RuntimeError("LLVM says no")

    for module in (row_lane, segments):  # the row-lane kernel and every segment kernel fail to build
        monkeypatch.setattr(module, "compile_kernel", broken)
    q, pm = _mixed_matrix(32, seed=5)
    with caplog.at_level(logging.WARNING, logger="xbitc.backends.cpu"):
        prog = x86.X86Backend().lower(_linear_graph("w", pm, None))
    assert "reference float path" in caplog.text
    x = torch.randn(3, q.shape[1])
    ref = torch.nn.functional.linear(x, q.dequantize())
    assert torch.allclose(prog(x), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


def test_artifact_has_kernels_and_header(artifact_4b):
    out, manifest = artifact_4b
    note = manifest.notes["kernels"]
    assert note["abi_version"] == emit.ABI_VERSION and note["header"] == "kernels/xbitc_kernels.h"
    # the row-lane kernels for every level and activation strategy: what the runtime runs, any depth and group
    assert sorted((r["target"], r["act"]) for r in note["rows"]) == sorted(
        (t, a) for t in ("x86_64", "avx2", "avx512") for a in ("f32", "q8"))
    for r in note["rows"]:
        assert (out / r["file"]).stat().st_size == r["bytes"] > 0
        assert manifest.size.files[r["file"]] == r["bytes"]  # counted in bits per weight
    header = (out / "kernels" / "xbitc_kernels.h").read_text()
    assert "#define XBITC_KERNELS_ABI_VERSION 1" in header and 'extern "C"' in header
    assert "void xbitc_rows_gemm_avx2(" in header and "int64_t ldy" in header and "void xbitc_rows_q8_x86_64(" in header
    assert json.loads((out / "manifest.json").read_text())["notes"]["kernels"]["rows"] == note["rows"]


def test_the_target_table_drives_emission_and_host_detection(artifact_4b, tmp_path, monkeypatch):
    """kernels/ and the hosts that execute are read from the x86-64 entry of the CPU target table: the artifact holds
    one object per level and activation strategy for the entry's triple, an entry with one level emits that level
    only, and the entry's machine names decide where the backend runs."""
    fam = targets.X86_64
    assert x86.X86Backend.family is fam and targets.host_family() is fam
    out, manifest = artifact_4b
    note = manifest.notes["kernels"]
    assert note["triple"] == fam.triple
    assert [(r["target"], r["cpu"], r["act"]) for r in note["rows"]] == [
        (lv.suffix, lv.cpu, a) for lv in fam.levels for a in linears.ACTIVATIONS]
    graph = runtime.load(out, backend="reference").graph
    monkeypatch.setattr(x86.X86Backend, "family", dataclasses.replace(fam, levels=fam.levels[1:2]))
    rows = x86.X86Backend().emit(graph, tmp_path)["kernels"]["rows"]
    assert [(r["target"], r["act"]) for r in rows] == [("avx2", a) for a in linears.ACTIVATIONS]
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == sorted(
        [f"xbitc_rows_{a}_avx2.o" for a in linears.ACTIVATIONS] + [emit.HEADER])
    header = (tmp_path / "kernels" / emit.HEADER).read_text().replace("\n * ", " ")  # comment lines rejoined
    assert "suffix avx2 = x86-64-v3 (AVX2, FMA, F16C). Pick one" in header and "_avx512" not in header
    for machine, runs in [("x86_64", True), ("AMD64", True), ("aarch64", False), ("arm64", False)]:
        monkeypatch.setattr(platform, "machine", lambda m=machine: m)
        assert x86.is_x86_host() is runs and x86.X86Backend().capabilities().executes_here is runs
        assert (targets.host_family() is fam) is runs


def test_emitted_objects_link_and_match_the_jit(artifact_4b, tmp_path):
    """The header compiles as C and C++, all objects link into one library, and every variant the host can run,
    called from C on records the Python packer builds from the artifact's segments, computes the exact product
    (f32) or W times the int8-rounded activations (q8)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    out, manifest = artifact_4b
    hdr = out / "kernels" / "xbitc_kernels.h"
    src = tmp_path / "use.c"
    src.write_text(f'#include "{hdr}"\nint main(void) {{ return xbitc_kernels_abi_version() == 1 ? 0 : 1; }}\n')
    subprocess.run([cc, "-Wall", "-Werror", "-std=c99", "-o", str(tmp_path / "use"), str(src)], check=True)
    subprocess.run([str(tmp_path / "use")], check=True)
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx:
        subprocess.run([cxx, "-fsyntax-only", "-Wall", "-Werror", "-x", "c++", str(hdr)], check=True)
    lib = tmp_path / "libk.so"
    objs = [str(out / r["file"]) for r in manifest.notes["kernels"]["rows"]]
    subprocess.run([cc, "-shared", "-o", str(lib), *objs], check=True)
    so = ctypes.CDLL(str(lib))

    from xbitc.backends.llvm.rowlane import pack as rows_pack
    from xbitc.backends.llvm.rowlane import q8_scratch_bytes, reference_rows_q8
    from xbitc.quant.pack import unpack

    graph = runtime.load(out, backend="reference").graph
    name = next(n for n, v in graph.params.items() if isinstance(v, PackedMatrix))
    pm = graph.params[name]
    ps = pm.segments[0]
    rows, cols = pm.shape
    scales = np.ascontiguousarray(ps.scales, dtype=np.float16).reshape(rows, -1)
    zeros = np.ascontiguousarray(unpack(ps.zeros, 4, ps.seg.ngroups)).reshape(rows, -1)
    codes = unpack(ps.codes, 4, cols).reshape(rows, cols)
    G = ps.seg.group_size
    recs = [(codes[:, g * G:(g + 1) * G], scales[:, g], zeros[:, g], g * G, 4) for g in range(ps.seg.ngroups)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    exact = x.astype(np.float64) @ pm.dequantize().double().numpy().T
    host = host_target()
    runnable = {lv.suffix: lv.runs_on(host.features) for lv in targets.X86_64.levels}
    p = lambda a: ctypes.c_void_p(a.ctypes.data)  # noqa: E731
    i64 = ctypes.c_int64
    ran = 0
    for r in manifest.notes["kernels"]["rows"]:
        if not runnable[r["target"]]:
            continue
        buf, table = rows_pack(recs, rows, r["act"])
        y = np.full((3, rows), np.nan, dtype=np.float32)
        if r["act"] == "q8":
            scratch = np.zeros(q8_scratch_bytes([rc[0].shape[1] for rc in recs], 3), np.uint8)
            getattr(so, f"xbitc_rows_q8_{r['target']}")(p(table), i64(len(recs)), p(x), None, p(y), i64(0),
                                                        i64(rows), i64(3), i64(cols), i64(rows), p(scratch))
            want = reference_rows_q8([(c, s.astype(np.float32), z, o) for c, s, z, o, _ in recs], x, rows)
        else:
            x1 = np.ascontiguousarray(x[:1])
            getattr(so, f"xbitc_rows_gemv_{r['target']}")(p(table), i64(len(recs)), p(x1), None, p(y), i64(0),
                                                          i64(rows))
            getattr(so, f"xbitc_rows_gemm_{r['target']}")(p(table), i64(len(recs)), p(x), p(y[1:]), i64(0),
                                                          i64(rows), i64(2), i64(cols), i64(rows))
            want = exact[[0, 0, 1]]  # gemv: token 0 into y[0]; gemm: tokens 0 and 1 into y[1], y[2]
        assert np.abs(y - want).max() <= 1e-5 * np.abs(want).max(), r["name"]
        ran += 1
    assert ran >= 2


def test_second_lower_compiles_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XBITC_CACHE_DIR", str(tmp_path / "fresh"))
    clear_memory_cache()
    out = tmp_path / "c.xbitc"
    compile_tiny(out, bits=5, group=32)  # emits objects into the fresh cache
    s0 = compile_stats()
    compile_tiny(tmp_path / "c2.xbitc", bits=5, group=32)
    s1 = compile_stats()
    assert s1["codegen"] == s0["codegen"] and s1["disk_hits"] >= s0["disk_hits"] + 3  # objects from the cache
    runtime.load(out)  # first lower: host kernels compiled (gemv + gemm) and written to the cache
    s2 = compile_stats()
    assert s2["codegen"] > s1["codegen"]
    clear_memory_cache()
    model = runtime.load(out)  # second lower, as in a new process: everything from the disk cache
    s3 = compile_stats()
    assert s3["codegen"] == s2["codegen"] and s3["disk_hits"] >= s2["disk_hits"] + 1  # the row-lane object
    model(torch.randint(0, 96, (1, 4)))  # running compiles nothing either
    assert compile_stats()["codegen"] == s2["codegen"]


def test_non_x86_host_is_refused_clearly(monkeypatch, artifact_4b):
    """Asked for explicitly, the x86 backend refuses another ISA with the way out; by default an x86 artifact runs
    on the host's own CPU backend (every artifact carries the portable packed format)."""
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not x86.X86Backend().capabilities().executes_here
    with pytest.raises(x86.X86BackendUnavailable, match=r"can't execute on this aarch64 host.*--backend reference"):
        runtime.load(artifact_4b[0], backend="x86")
    assert runtime.host_backend("x86") == "arm"
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    assert runtime.host_backend("x86") == "reference"
    runtime.load(artifact_4b[0], backend="reference")  # still loads for the reference backend


def test_portable_artifacts_run_on_the_x86_kernels_by_default(tmp_path, monkeypatch):
    """An artifact compiled for `reference` holds only the portable format; on an x86-64 host loading it picks the
    x86 backend (same logits within the whole-model tolerance above), and XBITC_BACKEND or backend= overrides."""
    monkeypatch.delenv("XBITC_BACKEND", raising=False)
    m, x = tiny_lm()
    out = tmp_path / "p.xbitc"
    compile_model(frontend._from_module(m, x, "tiny", "0"), out,
                  CompileOptions(log=lambda s: None, progress=False, bits=3, group=32))
    assert json.loads((out / "manifest.json").read_text())["backend"] == "reference"
    assert not (out / "kernels").exists()
    fast = runtime.load(out)
    assert fast.backend_name == "x86" and isinstance(fast.program.interp.linear_impl, linears.CpuLinears)
    ref = runtime.load(out, backend="reference")
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    a, b = fast(ids), ref(ids)
    assert float((a - b).abs().max()) <= 2e-5 * float(b.abs().max())
    monkeypatch.setenv("XBITC_BACKEND", "reference")
    assert runtime.load(out).backend_name == "reference"
    monkeypatch.delenv("XBITC_BACKEND")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert runtime.host_backend("reference") == "arm"  # an AArch64 host runs portable artifacts on its kernels
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    assert runtime.load(out).backend_name == "reference"  # a host outside the target table: the oracle


def test_q8_activations_equal_their_oracle(monkeypatch):
    """XBITC_X86_ACT=q8: every record's activations rounded to int8 (absmax/127), integer dot products; the result
    equals W applied to those rounded activations (float64 oracle) within the float32 bound of the exact path, for
    one token and several, through the permutation."""
    from xbitc.backends.llvm.rowlane import quantize_record_x

    monkeypatch.setenv("XBITC_X86_ACT", "q8")
    q, pm = _random_matrix(32, {5: 70, 3: 100, 8: 3, 0: 10, 2: 40, 1: 45}, out=40, seed=7)
    prog = x86.X86Backend().lower(_linear_graph("w", pm, None))
    assert prog.interp.linear_impl.linears["w"].rows.act == "q8"
    rng = np.random.default_rng(2)
    for T in (1, 4):
        x = rng.standard_normal((T, q.shape[1])).astype(np.float32)
        xp = x[:, q.perm]
        want = np.zeros((T, q.shape[0]))
        bound = np.zeros((T, q.shape[0]))
        for seg, c, s, z in zip(q.segments, q.codes, q.scales, q.zeros):
            for g in range(seg.ngroups if seg.bits else 0):
                cols = slice(g * seg.group_size, min(seg.ncols, (g + 1) * seg.group_size))
                sg, zg = s[:, g].astype(np.float64)[:, None], z[:, g].astype(np.float64)[:, None]
                w = sg * (c[:, cols].astype(np.float64) - zg)
                for t in range(T):
                    xq, d = quantize_record_x(xp[t, seg.start:seg.stop][cols])
                    xr = xq.astype(np.float64) * np.float64(d)
                    want[t] += w @ xr
                    bound[t] += (np.abs(sg) * (c[:, cols] + zg)) @ np.abs(xr)
        y = prog(torch.from_numpy(x)).double().numpy()
        assert np.all(np.abs(y - want) <= (2 * q.shape[1] + 64) * U * bound + 1e-30)
        exact = x.astype(np.float64) @ q.dequantize().double().numpy().T
        assert np.abs(y - exact).max() > 0  # it is the rounded activations, not the float ones, that it multiplies


def test_long_batches_run_in_chunks_with_the_same_result(monkeypatch):
    """The row-lane gemm keeps per-token sums on the stack: a long batch is cut into chunks (here forced tiny) and
    gives exactly what one call gives."""
    q, pm = _random_matrix(8, {4: 64, 2: 40, 8: 9}, out=37, seed=11)  # group 8: many records per row block
    prog = x86.X86Backend().lower(_linear_graph("w", pm, None))
    x = torch.randn(23, q.shape[1])
    whole = prog(x)
    monkeypatch.setattr(row_lane, "GEMM_STACK_BYTES", 1)  # one token per call
    assert torch.equal(prog(x), whole)


@pytest.mark.parametrize("tamper", ["perm", "segments", "codes"])
def test_corrupt_packed_tensors_are_refused_at_load(tamper):
    """Kernels index by the permutation, segment bounds and array sizes: a file whose values would make them read
    outside their buffers is refused when it is loaded (the artifact loader turns this into an ArtifactError)."""
    q, pm = _random_matrix(32, {4: 64, 2: 40}, out=16, seed=3)
    desc, arrays = pm.describe(), dict(pm.tensors("w"))
    if tamper == "perm":
        arrays["w.perm"] = arrays["w.perm"].copy()
        arrays["w.perm"][3] = 60000
    elif tamper == "segments":
        desc["segments"][1][3] += 7  # the last segment runs past the matrix
    else:
        arrays["w.s0.codes"] = arrays["w.s0.codes"][:-1]
    with pytest.raises(ValueError, match="corrupt artifact"):
        PackedMatrix.from_tensors("w", desc, arrays)
    PackedMatrix.from_tensors("w", pm.describe(), dict(pm.tensors("w")))  # the untouched file loads


def test_pool_choice_avoids_spinning_beside_busy_waiting_openmp(monkeypatch):
    """auto = spin only where PyTorch's OpenMP threads do not busy-wait too (one torch thread, or
    OMP_WAIT_POLICY=PASSIVE); an explicit choice wins; anything else is refused with the choices named."""
    monkeypatch.delenv("XBITC_X86_POOL", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        assert threads.pool_kind() == "python"
        monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
        assert threads.pool_kind() == "spin"
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
        assert threads.pool_kind() == "python"
        torch.set_num_threads(1)
        assert threads.pool_kind() == "spin"
        monkeypatch.setenv("XBITC_X86_POOL", "python")
        assert threads.pool_kind() == "python"
        monkeypatch.setenv("XBITC_X86_POOL", "busy")
        with pytest.raises(ValueError, match="XBITC_X86_POOL='busy': expected one of auto, python, spin"):
            threads.pool_kind()
    finally:
        torch.set_num_threads(before)
