"""CUDA kernels from lang.py on an NVIDIA GPU, with no CUDA Python package: nvcc builds a cubin, ctypes calls the
driver API (libcuda) to load, launch and time it. What tests/device and bench/gpu_kernels.py use.

    image = cubin(CUDA().render_all(kernels), "sm_90", workdir)      # needs nvcc
    dev = CudaDevice()                                             # NoDevice where no driver / GPU answers
    mod = dev.load(image); fn = dev.function(mod, "name")
    buf = dev.upload(np_array); dev.launch(fn, kernel, [buf, ...], {"param": v}, (gx, gy))
    out = dev.download(buf, np.float32, count)
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from .lang import Kernel


class NoDevice(RuntimeError):
    pass


def nvcc() -> str | None:
    return shutil.which("nvcc") or next((str(p) for p in sorted(Path("/usr/local").glob("cuda*/bin/nvcc"))), None)


def cubin(source: str, arch: str, workdir: Path) -> bytes:
    """The CUDA source compiled for `arch` (e.g. "sm_90") by nvcc, warnings as errors."""
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError("nvcc not found (install the CUDA toolkit or put nvcc on PATH)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    src, out = workdir / "kernels.cu", workdir / f"kernels_{arch}.cubin"
    src.write_text(source)
    r = subprocess.run([compiler, "-cubin", f"-arch={arch}", "-O3", "-Werror", "all-warnings", str(src), "-o",
                        str(out)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"nvcc -arch={arch} failed:\n{r.stderr[-4000:]}")
    return out.read_bytes()


class CudaDevice:
    """One GPU's primary context through libcuda."""

    def __init__(self, ordinal: int = 0):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as err:
            raise NoDevice(f"no CUDA driver (libcuda.so.1): {err}") from err
        self.lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        try:
            self._call("cuInit", ctypes.c_uint(0))
            dev = ctypes.c_int()
            self._call("cuDeviceGet", ctypes.byref(dev), ctypes.c_int(ordinal))
        except RuntimeError as err:
            raise NoDevice(f"no CUDA GPU: {err}") from err
        self.dev = dev
        name = ctypes.create_string_buffer(256)
        self._call("cuDeviceGetName", name, ctypes.c_int(256), dev)
        self.name = name.value.decode()
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._call("cuDeviceGetAttribute", ctypes.byref(major), ctypes.c_int(75), dev)  # compute capability
        self._call("cuDeviceGetAttribute", ctypes.byref(minor), ctypes.c_int(76), dev)
        self.arch = f"sm_{major.value}{minor.value}"
        self.ctx = ctypes.c_void_p()
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(self.ctx), dev)
        self._call("cuCtxSetCurrent", self.ctx)
        self._allocs: list[int] = []

    def _call(self, fn: str, *args) -> None:
        rc = getattr(self.lib, fn)(*args)
        if rc:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            raise RuntimeError(f"{fn}: CUDA error {rc} ({(msg.value or b'?').decode()})")

    # ---- code
    def load(self, image: bytes) -> ctypes.c_void_p:
        mod = ctypes.c_void_p()
        self._call("cuModuleLoadData", ctypes.byref(mod), ctypes.c_char_p(image))
        return mod

    def function(self, module: ctypes.c_void_p, name: str) -> ctypes.c_void_p:
        fn = ctypes.c_void_p()
        self._call("cuModuleGetFunction", ctypes.byref(fn), module, name.encode())
        return fn

    def launch(self, fn, kernel: Kernel, buffers: list[int], params: dict | bytes | None,
               groups: tuple[int, ...]) -> None:
        """kernel's function on `groups` workgroups of its workgroup size; buffers are device pointers in binding
        order, params its parameter struct (passed by value; by name, or the bytes of `Kernel.pack_params`)."""
        if len(buffers) != len(kernel.buffers):
            raise ValueError(f"{kernel.name} takes {len(kernel.buffers)} buffers, got {len(buffers)}")
        values: list = [ctypes.c_uint64(b) for b in buffers]
        if kernel.params:
            raw = params if isinstance(params, bytes) else kernel.pack_params(**(params or {}))
            values.append(ctypes.create_string_buffer(raw))
        args = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        gx, gy, gz = tuple(groups) + (1,) * (3 - len(groups))
        bx, by, bz = kernel.workgroup
        self._call("cuLaunchKernel", fn, *(ctypes.c_uint(v) for v in (gx, gy, gz, bx, by, bz)), ctypes.c_uint(0),
                   ctypes.c_void_p(0), args, ctypes.c_void_p(0))

    def synchronize(self) -> None:
        self._call("cuCtxSynchronize")

    # ---- memory
    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._call("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(max(16, nbytes)))
        self._allocs.append(ptr.value)
        return ptr.value

    def upload(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a)
        ptr = self.alloc(a.nbytes)
        self.copy_in(ptr, a)
        return ptr

    def copy_in(self, ptr: int, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        self._call("cuMemcpyHtoD_v2", ctypes.c_uint64(ptr), ctypes.c_void_p(a.ctypes.data), ctypes.c_size_t(a.nbytes))

    def download(self, ptr: int, dtype, count: int) -> np.ndarray:
        out = np.empty(count, dtype=dtype)
        self._call("cuMemcpyDtoH_v2", ctypes.c_void_p(out.ctypes.data), ctypes.c_uint64(ptr),
                   ctypes.c_size_t(out.nbytes))
        return out

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self._call("cuMemcpyDtoD_v2", ctypes.c_uint64(dst), ctypes.c_uint64(src), ctypes.c_size_t(nbytes))

    def free(self, ptr: int) -> None:
        if ptr in self._allocs:  # free_all may have come first
            self._allocs.remove(ptr)
            self._call("cuMemFree_v2", ctypes.c_uint64(ptr))

    def free_all(self) -> None:
        for p in self._allocs:
            self.lib.cuMemFree_v2(ctypes.c_uint64(p))
        self._allocs = []

    # ---- timing
    def time(self, work, repeat: int = 20) -> float:
        """Median seconds of work() over `repeat` runs, each timed by events around it on the default stream."""
        start, end = ctypes.c_void_p(), ctypes.c_void_p()
        self._call("cuEventCreate", ctypes.byref(start), ctypes.c_uint(0))
        self._call("cuEventCreate", ctypes.byref(end), ctypes.c_uint(0))
        work()  # warm-up: module load, caches
        self.synchronize()
        times = []
        for _ in range(repeat):
            self._call("cuEventRecord", start, ctypes.c_void_p(0))
            work()
            self._call("cuEventRecord", end, ctypes.c_void_p(0))
            self._call("cuEventSynchronize", end)
            ms = ctypes.c_float()
            self._call("cuEventElapsedTime", ctypes.byref(ms), start, end)
            times.append(ms.value / 1e3)
        self.lib.cuEventDestroy_v2(start)
        self.lib.cuEventDestroy_v2(end)
        return float(np.median(times))
