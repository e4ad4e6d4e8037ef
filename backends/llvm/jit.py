"""Compile generated kernels: in-process MCJIT for the host (with a disk cache of objects) and cross objects.

    compile_kernel(spec, target=None) -> CompiledKernel      # ctypes callables .gemv/.gemv_acc/.gemm/.gemm_acc
    emit_object(target_triple, cpu="", features="", spec=...) -> bytes   # relocatable object for any target
    PackedLinear(codes, scales, zeros, bits, group_size, in_features)   # numpy convenience wrapper

Host kernels are always compiled to a relocatable object first, and that object is what MCJIT loads; the same
bytes go to the disk cache (``$XBITC_CACHE_DIR`` or ``~/.cache/xbitc/kernels``), keyed by a fingerprint of
(generator version, kernel spec, target triple, cpu name, cpu features, LLVM version, opt level). A cache hit loads
the object without generating IR or running LLVM, so a second process compiles nothing. `compile_stats()` counts
code generations, disk hits and in-memory hits.

ctypes releases the GIL for the duration of a call, so row ranges of one gemv can run on a thread pool.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import llvmlite.binding as llvm

from .codegen import GENERATOR_VERSION, KernelSpec, Target, default_spec, generate_module
from .layout import get_layout, ngroups, repack

OPT_LEVEL = 3

_lock = threading.RLock()
_initialized = False
_memory_cache: dict[str, "CompiledKernel"] = {}
_stats = {"codegen": 0, "disk_hits": 0, "memory_hits": 0, "disk_writes": 0}

GEMV_PROTO = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 5), *([ctypes.c_int64] * 3))
GEMM_PROTO = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 5), *([ctypes.c_int64] * 5))


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


def cache_dir() -> Path:
    d = os.environ.get("XBITC_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "xbitc" / "kernels"


def host_target() -> Target:
    _init()
    return Target(llvm.get_process_triple(), llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten())


def fingerprint(spec: KernelSpec, target: Target) -> str:
    parts = [
        f"gen={GENERATOR_VERSION}",
        f"spec={spec.key()}",
        f"triple={target.triple}",
        f"cpu={target.cpu}",
        f"features={target.features}",
        f"llvm={'.'.join(map(str, llvm.llvm_version_info))}",
        f"opt={OPT_LEVEL}",
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _target_machine(target: Target, jit: bool):
    _init()
    tgt = llvm.Target.from_triple(target.triple)
    return tgt.create_target_machine(
        cpu=target.cpu, features=target.features, opt=OPT_LEVEL, reloc="pic", codemodel="default", jit=jit
    )


def build_module(spec: KernelSpec, target: Target, tm=None):
    """Generate, parse, verify and optimize the kernel module; returns an llvmlite ModuleRef."""
    tm = tm or _target_machine(target, jit=False)
    irmod = generate_module(spec, target)
    irmod.data_layout = str(tm.target_data)
    mod = llvm.parse_assembly(str(irmod))
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=OPT_LEVEL)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return mod


def _emit(specs: list[KernelSpec], target: Target, jit: bool) -> bytes:
    tm = _target_machine(target, jit=jit)
    mods = [build_module(s, target, tm) for s in specs]
    main = mods[0]
    for other in mods[1:]:
        main.link_in(other)
    obj = tm.emit_object(main)
    with _lock:
        _stats["codegen"] += 1
    return obj


def emit_object(target_triple: str, cpu: str = "", features: str = "", spec=None) -> bytes:
    """Relocatable object file (ELF/Mach-O/COFF per triple) with the kernels of `spec` for another target.

    `spec` is a KernelSpec or a list of them (all linked into one object; their symbol names must differ).
    Default: 4-bit, group 128, layout il8w32. E.g. emit_object("x86_64-unknown-linux-gnu", "skylake-avx512",
    "+avx512f,+avx512bw,+avx512vl") or emit_object("aarch64-linux-gnu", "generic", "+neon").
    """
    if spec is None:
        spec = KernelSpec(4, 128)
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    return _emit(specs, Target(target_triple, cpu, features), jit=False)


def emit_assembly(spec: KernelSpec, target: Target | None = None) -> str:
    target = target or host_target()
    tm = _target_machine(target, jit=False)
    return tm.emit_assembly(build_module(spec, target, tm))


@dataclass
class CompiledKernel:
    spec: KernelSpec
    target: Target
    gemv: object  # GEMV_PROTO callables (y[r] = ...)
    gemv_acc: object  # (y[r] += ...)
    gemm: object
    gemm_acc: object
    compile_ms: float
    from_cache: bool
    fingerprint: str
    _keep: list = field(default_factory=list, repr=False)  # engine / object buffers kept alive


def _load_object(obj: bytes, spec: KernelSpec, target: Target, tm) -> tuple:
    empty = llvm.parse_assembly(f'target triple = "{target.triple}"\n')
    empty.data_layout = str(tm.target_data)
    engine = llvm.create_mcjit_compiler(empty, tm)
    engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
    engine.finalize_object()
    fns = []
    for name, proto in (
        (spec.gemv_name, GEMV_PROTO),
        (spec.gemv_name + "_acc", GEMV_PROTO),
        (spec.gemm_name, GEMM_PROTO),
        (spec.gemm_name + "_acc", GEMM_PROTO),
    ):
        addr = engine.get_function_address(name)
        if not addr:
            raise RuntimeError(f"symbol {name} not found in compiled kernel object")
        fns.append(proto(addr))
    return engine, fns


def compile_kernel(spec: KernelSpec, target: Target | None = None, use_disk_cache: bool = True) -> CompiledKernel:
    """JIT-compile (or fetch from the memory / disk cache) the kernels of `spec` for the host."""
    target = target or host_target()
    fp = fingerprint(spec, target)
    with _lock:
        hit = _memory_cache.get(fp)
        if hit is not None:
            _stats["memory_hits"] += 1
            return hit
        t0 = time.perf_counter()
        path = cache_dir() / f"{fp}.o"
        obj = None
        if use_disk_cache and path.is_file():
            try:
                obj = path.read_bytes()
            except OSError:
                obj = None
        from_cache = obj is not None and len(obj) > 0
        if from_cache:
            _stats["disk_hits"] += 1
        else:
            obj = _emit([spec], target, jit=True)
            if use_disk_cache:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
                    with os.fdopen(fd, "wb") as f:
                        f.write(obj)
                    os.replace(tmp, path)
                    _stats["disk_writes"] += 1
                except OSError:
                    pass
        tm = _target_machine(target, jit=True)
        engine, fns = _load_object(obj, spec, target, tm)
        ms = (time.perf_counter() - t0) * 1e3
        k = CompiledKernel(spec, target, *fns, compile_ms=ms, from_cache=from_cache, fingerprint=fp,
                           _keep=[engine, tm, obj])
        _memory_cache[fp] = k
        return k


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


class PackedLinear:
    """A quantized [out, in] matrix in kernel layout plus its compiled kernels (numpy in, numpy out).

    codes: canonical packed codes ([out, row_bytes] uint8, see xbitc.quant.pack); scales: [out, ngroups] float16;
    zeros: [out, ngroups] uint8.
    """

    def __init__(self, codes, scales, zeros, bits: int, group_size: int, in_features: int,
                 spec: KernelSpec | None = None, target: Target | None = None):
        self.spec = spec or default_spec(bits, group_size)
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
