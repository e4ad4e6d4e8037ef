"""Generated Metal kernels compiled as C++ (metal_shim.h) and run on the CPU: a check of their semantics on machines
without Metal, not of their legality as Metal (only Apple's compiler says that).

    lib = MetalCPU([kernel, ...], workdir)
    lib.run("name", [np arrays in binding order], {"param": value}, groups=(gx, gy, gz))

Buffers are numpy arrays, read and written in place. The workgroups run one after another, the threads of one as
fibers that switch at barriers (see the shim), so a run is deterministic and catches missing or divergent
barriers that a sequential loop over threads would hide.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from .lang import BUILTINS, Kernel
from .render import BUILTIN_VARS, Metal

SHIM = Path(__file__).with_name("metal_shim.h")


def cxx() -> str | None:
    """The C++ compiler: $CXX, else clang++, else g++."""
    return os.environ.get("CXX") or shutil.which("clang++") or shutil.which("g++")


def driver(k: Kernel) -> str:
    """extern "C" int xb_run_<name>(void** buffers, const void* params, gx, gy, gz): the grid through the shim."""
    m = Metal()
    wx, wy, wz = k.workgroup
    args = [f"({m.type(b.dtype)}*)buf[{i}]" for i, b in enumerate(k.buffers)]
    if k.params:
        args.append("prm")
    args += [BUILTIN_VARS[b] for b in BUILTINS if b in k.builtins]
    prm = f"    {k.name}_params prm;\n    std::memcpy(&prm, params, sizeof prm);\n" if k.params else ""
    return f"""
extern "C" int xb_run_{k.name}(void** buf, const void* params, unsigned gx, unsigned gy, unsigned gz) {{
{prm}    uint3 nwg = {{gx, gy, gz}};
    (void)params;
    return xbitc_cpu::run_grid(nwg, uint3{{{wx}, {wy}, {wz}}}, [&](uint3 wid, uint3 lid, uint lix) {{
        uint3 gid = {{wid.x * {wx} + lid.x, wid.y * {wy} + lid.y, wid.z * {wz} + lid.z}};
        (void)gid; (void)lix;
        {k.name}({", ".join(args)});
    }});
}}
"""


class MetalCPU:
    def __init__(self, kernels: list[Kernel], workdir: Path, opt: str = "-O1"):
        compiler = cxx()
        if compiler is None:
            raise RuntimeError("no C++ compiler (set CXX, or install clang++ or g++)")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "metal_stdlib").write_text(f'#include "{SHIM}"\n')
        src = workdir / "kernels.metal.cpp"
        src.write_text(Metal().render_all(kernels) + "".join(driver(k) for k in kernels))
        so = workdir / "kernels.so"
        r = subprocess.run([compiler, "-std=c++20", opt, "-shared", "-fPIC", "-w", "-I", str(workdir), str(src),
                            "-o", str(so)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"the Metal kernels do not compile as C++ ({compiler}):\n{r.stderr[-4000:]}")
        self.lib = ctypes.CDLL(str(so))
        self.kernels = {k.name: k for k in kernels}

    def run(self, name: str, buffers: list[np.ndarray], params: dict | bytes | None = None,
            groups: tuple[int, ...] = (1,)) -> None:
        """`params`: by name, or the struct's bytes as `Kernel.pack_params` lays them out."""
        k = self.kernels[name]
        if len(buffers) != len(k.buffers):
            raise ValueError(f"{name} binds {len(k.buffers)} buffers, got {len(buffers)}")
        for a, b in zip(buffers, k.buffers):
            if not (a.flags.c_contiguous and a.flags.writeable):
                raise ValueError(f"buffer {b.name}: a contiguous writable array")
        ptrs = (ctypes.c_void_p * max(1, len(buffers)))(*[a.ctypes.data for a in buffers])
        prm = params if isinstance(params, bytes) else k.pack_params(**(params or {}))
        gx, gy, gz = tuple(groups) + (1,) * (3 - len(groups))
        fn = getattr(self.lib, f"xb_run_{name}")
        if fn(ptrs, ctypes.c_char_p(prm or b"\0"), ctypes.c_uint(gx), ctypes.c_uint(gy), ctypes.c_uint(gz)):
            raise RuntimeError(f"{name}: a barrier was not reached by every thread of a workgroup")
