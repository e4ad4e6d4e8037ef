"""Compile generated kernels: in-process MCJIT for the host (with a disk cache of objects) and cross objects.

    compile_kernel(spec, target=None, kinds=("gemv",)) -> CompiledKernel   # .gemv/.gemv_acc/.gemm/.gemm_acc
    emit_object(target_triple, cpu="", features="", spec=...) -> bytes   # relocatable object for any target
    PackedLinear(codes, scales, zeros, bits, group_size, in_features)   # numpy convenience wrapper

Host kernels are always compiled to a relocatable object first, and that object is what MCJIT loads; the same
bytes go to the disk cache (``$XBITC_CACHE_DIR`` or ``~/.cache/xbitc/kernels``, see diskcache.py: every entry is
checked on read), keyed by a fingerprint of (generator source and version, kernel spec, target triple, cpu name, cpu
features, LLVM and llvmlite versions, opt level). A cache hit loads
the object without generating IR or running LLVM, so a second process compiles nothing. `compile_stats()` counts
code generations, disk hits and in-memory hits.

ctypes releases the GIL for the duration of a call, so row ranges of one gemv can run on a thread pool.
"""
from __future__ import annotations

import ctypes
import gc
import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import llvmlite
import llvmlite.binding as llvm

from . import diskcache
from .codegen import GENERATOR_VERSION, KINDS, KernelSpec, Target, default_spec, generate_module, symbol_names
from .layout import get_layout, ngroups, repack
from .pool import POOL_KIND, PoolSpec, generate_pool_module
from .pool import PROTOS as POOL_PROTOS
from .rowlane import ROWS_KIND, RowLaneSpec, generate_rows_module
from .diskcache import cache_dir  # noqa: F401 (re-exported)

OPT_LEVEL = 3  # codegen (instruction selection / scheduling / register allocation) level
# The generated IR is already explicitly vectorised and unrolled, so the full -O3 module pipeline buys nothing at run
# time (measured: equal or slower, it re-unrolls loops) and costs ~3x the compile time. We run a short cleanup
# pipeline instead: instcombine, simplifycfg, GVN, instcombine, simplifycfg, ADCE.
PIPELINE = "light"

_lock = threading.RLock()
_initialized = False
_memory_cache: dict[str, "CompiledKernel"] = {}
_stats = {"codegen": 0, "disk_hits": 0, "memory_hits": 0, "disk_writes": 0}

GEMV_PROTO = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 5), *([ctypes.c_int64] * 3))
GEMM_PROTO = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 5), *([ctypes.c_int64] * 5))
ROWS_GEMV_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p, *([ctypes.c_int64] * 2))
ROWS_GEMM_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                   *([ctypes.c_int64] * 5))
ROWS_Q8_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p, *([ctypes.c_int64] * 5), ctypes.c_void_p)


def _init() -> None:
    global _initialized
    with _lock:
        if not _initialized:
            llvm.initialize_all_targets()
            llvm.initialize_all_asmprinters()
            _initialized = True


def compile_stats() -> dict:
    """Counters: 'codegen' (LLVM compilations), 'disk_hits', 'memory_hits', 'disk_writes'."""
    return dict(_stats)


def clear_memory_cache() -> None:
    """Forget in-process kernels (engines stay alive while referenced). For tests."""
    with _lock:
        _memory_cache.clear()


def host_target(without: tuple[str, ...] = ()) -> Target:
    """The host: process triple, cpu name, full feature string. `without` disables every feature whose name starts
    with one of the prefixes, e.g. host_target(without=("avx512", "amx")) emulates an AVX2-only machine."""
    _init()
    feats = llvm.get_host_cpu_features().flatten().split(",")
    if without:
        feats = [("-" + f[1:]) if f[1:].startswith(tuple(without)) else f for f in feats if f]
    return Target(llvm.get_process_triple(), llvm.get_host_cpu_name(), ",".join(feats))


def _source_digest() -> str:
    """The generators' own source text: a kernel cached by an older generator is never reused after a change that
    forgot to bump GENERATOR_VERSION / ROWS_VERSION (both remain, for the artifact manifest and humans)."""
    here = Path(__file__).parent
    text = b"".join((here / f).read_bytes() for f in ("codegen.py", "rowlane.py", "layout.py", "pool.py"))
    return hashlib.sha256(text).hexdigest()[:16]


SOURCE_DIGEST = _source_digest()


def fingerprint(spec: KernelSpec, target: Target, kind: str = "gemv") -> str:
    parts = [
        f"gen={GENERATOR_VERSION}",
        f"src={SOURCE_DIGEST}",
        f"spec={spec.key()}",
        f"kind={kind}",
        f"triple={target.triple}",
        f"cpu={target.cpu}",
        f"features={target.features}",
        f"llvm={'.'.join(map(str, llvm.llvm_version_info))}",
        f"llvmlite={llvmlite.__version__}",
        f"opt={OPT_LEVEL}/{PIPELINE}",
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _target_machine(target: Target, jit: bool):
    _init()
    tgt = llvm.Target.from_triple(target.triple)
    return tgt.create_target_machine(
        cpu=target.cpu, features=target.features, opt=OPT_LEVEL, reloc="pic", codemodel="default", jit=jit
    )


def build_module(spec: KernelSpec, target: Target, tm=None, kinds=KINDS):
    """Generate, parse, verify and optimize the kernel module; returns an llvmlite ModuleRef."""
    tm = tm or _target_machine(target, jit=False)
    if isinstance(spec, PoolSpec):
        irmod = generate_pool_module(target)
    elif isinstance(spec, RowLaneSpec):
        irmod = generate_rows_module(spec, target)
    else:
        irmod = generate_module(spec, target, kinds)
    irmod.data_layout = str(tm.target_data)
    mod = llvm.parse_assembly(str(irmod))
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=2)
    pb = llvm.create_pass_builder(tm, pto)
    if PIPELINE == "O3":
        pto.speed_level = 3
        pb.getModulePassManager().run(mod, pb)
        return mod
    mpm = llvm.create_new_module_pass_manager()
    mpm.add_instruction_combine_pass()
    mpm.add_simplify_cfg_pass()
    mpm.add_new_gvn_pass()
    mpm.add_instruction_combine_pass()
    mpm.add_simplify_cfg_pass()
    mpm.add_aggressive_dce_pass()
    mpm.run(mod, pb)
    return mod


def _emit(specs: list[KernelSpec], target: Target, jit: bool, kinds=KINDS) -> bytes:
    tm = _target_machine(target, jit=jit)
    # llvmlite's IR objects form many reference cycles; a full collection in the middle of generation costs
    # ~200 ms, more than the whole compile, so the collector is paused while we build
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        mods = [build_module(s, target, tm, kinds) for s in specs]
    finally:
        if gc_was_enabled:
            gc.enable()
    main = mods[0]
    for other in mods[1:]:
        main.link_in(other)
    obj = tm.emit_object(main)
    with _lock:
        _stats["codegen"] += 1
    return obj


def emit_object(target_triple: str, cpu: str = "", features: str = "", spec=None, use_disk_cache: bool = False) -> bytes:
    """Relocatable object file (ELF/Mach-O/COFF per triple) with the kernels of `spec` for another target.

    `spec` is a KernelSpec or a list of them (all linked into one object; their symbol names must differ).
    Default: 4-bit, group 128, layout il8w32. E.g. emit_object("x86_64-unknown-linux-gnu", "skylake-avx512",
    "+avx512f,+avx512bw,+avx512vl") or emit_object("aarch64-linux-gnu", "generic", "+neon").
    With `use_disk_cache` the object is looked up in / stored to the kernel disk cache (as `obj-<fingerprint>.o`,
    keyed like the JIT objects; a hit counts as a 'disk_hits' and runs no LLVM).
    """
    if spec is None:
        spec = KernelSpec(4, 128)
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    target = Target(target_triple, cpu, features)
    key = None
    if use_disk_cache:
        key = "obj-" + hashlib.sha256("|".join(fingerprint(s, target, "object") for s in specs).encode()).hexdigest()[:32]
        obj = diskcache.read(key)
        if obj is not None:
            with _lock:
                _stats["disk_hits"] += 1
            return obj
    obj = _emit(specs, target, jit=False)
    if key is not None and diskcache.write(key, obj):
        _stats["disk_writes"] += 1
    return obj


def emit_assembly(spec: KernelSpec, target: Target | None = None, kinds=KINDS) -> str:
    target = target or host_target()
    tm = _target_machine(target, jit=False)
    return tm.emit_assembly(build_module(spec, target, tm, kinds))


class CompiledKernel:
    """The host kernels of one spec. gemv (+ _acc) and gemm (+ _acc) are separate objects, each compiled (or loaded
    from the disk cache) on first use; `.gemv` etc. are ctypes callables taking raw pointers and int64s."""

    def __init__(self, spec: KernelSpec, target: Target, use_disk_cache: bool = True):
        self.spec = spec
        self.target = target
        self.use_disk_cache = use_disk_cache
        self.compile_ms: dict[str, float] = {}  # per kind: wall time to generate+compile or to load from cache
        self.compile_cpu_ms: dict[str, float] = {}  # the same in CPU time of the compiling thread
        self.from_cache: dict[str, bool] = {}
        self.fingerprints: dict[str, str] = {}
        self._fns: dict[str, tuple] = {}
        self._keep: list = []  # engines / target machines / object bytes kept alive

    def _part(self, kind: str) -> tuple:
        fns = self._fns.get(kind)
        if fns is None:
            with _lock:
                fns = self._fns.get(kind)
                if fns is None:
                    fns = self._load(kind)
                    self._fns[kind] = fns
        return fns

    def ensure(self, *kinds: str) -> "CompiledKernel":
        for kind in kinds or KINDS:
            self._part(kind)
        return self

    @property
    def gemv(self):
        return self._part("gemv")[0]

    @property
    def gemv_acc(self):
        return self._part("gemv")[1]

    @property
    def gemm(self):
        return self._part("gemm")[0]

    @property
    def gemm_acc(self):
        return self._part("gemm")[1]

    @property
    def rows_gemv(self):
        """The row-lane kernels of a RowLaneSpec (backends/llvm/rowlane.py)."""
        return self._part(ROWS_KIND)[0]

    @property
    def rows_gemm(self):
        return self._part(ROWS_KIND)[1]

    @property
    def rows_q8(self):
        """The int8-activation row-lane kernel of a RowLaneSpec(act="q8"): any batch."""
        return self._part(ROWS_KIND)[0]

    def _load(self, kind: str) -> tuple:
        spec, target = self.spec, self.target
        fp = fingerprint(spec, target, kind)
        self.fingerprints[kind] = fp
        t0, c0 = time.perf_counter(), time.thread_time()
        obj = diskcache.read(fp) if self.use_disk_cache else None
        self.from_cache[kind] = obj is not None
        if obj is not None:
            _stats["disk_hits"] += 1
        else:
            obj = _emit([spec], target, jit=True, kinds=(kind,))
            if self.use_disk_cache and diskcache.write(fp, obj):
                _stats["disk_writes"] += 1
        tm = _target_machine(target, jit=True)
        empty = llvm.parse_assembly(f'target triple = "{target.triple}"\n')
        empty.data_layout = str(tm.target_data)
        engine = llvm.create_mcjit_compiler(empty, tm)
        engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        engine.finalize_object()
        if kind == POOL_KIND:
            protos = dict(zip(spec.names(), POOL_PROTOS))
        elif kind == ROWS_KIND:
            protos = dict(zip(spec.names(), (ROWS_Q8_PROTO,) if spec.act == "q8" else (ROWS_GEMV_PROTO, ROWS_GEMM_PROTO)))
        else:
            protos = dict.fromkeys(symbol_names(spec, kind), GEMV_PROTO if kind == "gemv" else GEMM_PROTO)
        fns = []
        for name, proto in protos.items():
            addr = engine.get_function_address(name)
            if not addr:
                raise RuntimeError(f"symbol {name} not found in compiled kernel object")
            fns.append(proto(addr))
        self._keep += [engine, tm, obj]
        self.compile_ms[kind] = (time.perf_counter() - t0) * 1e3
        self.compile_cpu_ms[kind] = (time.thread_time() - c0) * 1e3
        return tuple(fns)


def compile_kernel(spec: KernelSpec, target: Target | None = None, kinds=("gemv",),
                   use_disk_cache: bool = True) -> CompiledKernel:
    """Kernels of `spec` for the host (or an explicitly given host-compatible `target`): the `kinds` listed are
    compiled / loaded now, the others on first use. Repeated calls return the same object (memory cache)."""
    target = target or host_target()
    key = fingerprint(spec, target, "all")
    with _lock:
        k = _memory_cache.get(key)
        if k is None:
            k = CompiledKernel(spec, target, use_disk_cache)
            _memory_cache[key] = k
        else:
            _stats["memory_hits"] += 1
    return k.ensure(*kinds)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


class PackedLinear:
    """A quantized [out, in] matrix in kernel layout plus its compiled kernels (numpy in, numpy out).

    codes: canonical packed codes ([out, row_bytes] uint8, see xbitc.quant.pack); scales: [out, ngroups] float16;
    zeros: [out, ngroups] uint8.
    """

    def __init__(self, codes, scales, zeros, bits: int, group_size: int, in_features: int,
                 spec: KernelSpec | None = None, target: Target | None = None):
        self.spec = spec or default_spec(bits, group_size, target or host_target())
        if (self.spec.bits, self.spec.group_size) != (bits, group_size):
            raise ValueError("spec does not match bits / group_size")
        scales = np.ascontiguousarray(scales, dtype=np.float16)
        self.out_features = scales.shape[0]
        self.in_features = in_features
        if scales.shape != (self.out_features, ngroups(in_features, group_size)):
            raise ValueError(f"scales shape {scales.shape} does not fit {self.out_features}x{in_features}")
        self.bits, self.group_size = bits, group_size
        self.layout = get_layout(self.spec.layout)
        self.codes = repack(codes, bits, self.out_features, in_features, group_size, self.layout)
        self.scales = scales.view(np.uint16)
        self.zeros = np.ascontiguousarray(zeros, dtype=np.uint8)
        if self.zeros.shape != scales.shape:
            raise ValueError("zeros must have the shape of scales")
        self.kernel = compile_kernel(self.spec, target)

    @property
    def nbytes(self) -> int:
        """Bytes a gemv reads from the weights (codes + scales + zeros)."""
        return self.codes.nbytes + self.scales.nbytes + self.zeros.nbytes

    def gemv(self, x, y=None, rows: tuple[int, int] | None = None, accumulate: bool = False) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != (self.in_features,):
            raise ValueError(f"x must have shape ({self.in_features},), got {x.shape}")
        if y is None:
            y = np.zeros(self.out_features, dtype=np.float32)
        if y.dtype != np.float32 or y.shape != (self.out_features,) or not y.flags.c_contiguous:
            raise ValueError("y must be a contiguous float32 array of out_features")
        rb, re = rows if rows is not None else (0, self.out_features)
        if not 0 <= rb <= re <= self.out_features:
            raise ValueError(f"bad row range {rows}")
        fn = self.kernel.gemv_acc if accumulate else self.kernel.gemv
        fn(_ptr(self.codes), _ptr(self.scales), _ptr(self.zeros), _ptr(x), _ptr(y), rb, re, self.in_features)
        return y

    def gemm(self, x, y=None, rows: tuple[int, int] | None = None, accumulate: bool = False) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (batch, {self.in_features}), got {x.shape}")
        batch = x.shape[0]
        if y is None:
            y = np.zeros((batch, self.out_features), dtype=np.float32)
        if y.dtype != np.float32 or y.shape != (batch, self.out_features) or not y.flags.c_contiguous:
            raise ValueError("y must be a contiguous float32 [batch, out_features] array")
        rb, re = rows if rows is not None else (0, self.out_features)
        if not 0 <= rb <= re <= self.out_features:
            raise ValueError(f"bad row range {rows}")
        fn = self.kernel.gemm_acc if accumulate else self.kernel.gemm
        fn(_ptr(self.codes), _ptr(self.scales), _ptr(self.zeros), _ptr(x), _ptr(y), rb, re, self.in_features,
           batch, self.out_features)
        return y


_flusher = None


def cache_line_flusher():
    """ctypes ``void flush(const void* p, int64 nbytes)`` that evicts [p, p+nbytes) from every cache level with
    ``clflush`` (x86 only; None elsewhere). For benchmarks: makes weights come from DRAM without evicting everything
    else (the interpreter, the kernel code), unlike streaming a big buffer through the caches."""
    global _flusher
    if _flusher is not None:
        return _flusher[0]
    target = host_target()
    if not target.is_x86 or not target.has("sse2"):
        return None
    from llvmlite import ir

    m = ir.Module(name="xbitc_clflush")
    m.triple = target.triple
    i8p, i64 = ir.PointerType(ir.IntType(8)), ir.IntType(64)
    fn = ir.Function(m, ir.FunctionType(ir.VoidType(), [i8p, i64]), name="xbitc_clflush")
    cl = ir.Function(m, ir.FunctionType(ir.VoidType(), [i8p]), name="llvm.x86.sse2.clflush")
    mf = ir.Function(m, ir.FunctionType(ir.VoidType(), []), name="llvm.x86.sse2.mfence")
    entry, head, body, done = (fn.append_basic_block(n) for n in ("entry", "head", "body", "done"))
    b = ir.IRBuilder(entry)
    b.branch(head)
    b.position_at_end(head)
    off = b.phi(i64)
    off.add_incoming(ir.Constant(i64, 0), entry)
    b.cbranch(b.icmp_signed("<", off, fn.args[1]), body, done)
    b.position_at_end(body)
    b.call(cl, [b.gep(fn.args[0], [off])])
    nxt = b.add(off, ir.Constant(i64, 64))
    off.add_incoming(nxt, body)
    b.branch(head)
    b.position_at_end(done)
    b.call(mf, [])
    b.ret_void()
    tm = _target_machine(target, jit=True)
    m.data_layout = str(tm.target_data)
    mod = llvm.parse_assembly(str(m))
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    f = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(engine.get_function_address("xbitc_clflush"))
    _flusher = (f, engine, tm)
    return f
