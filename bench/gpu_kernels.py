"""Packed GPU gemv (backends/gpu) in GB/s of packed weights at each depth, against the device's copy bandwidth.

    python bench/gpu_kernels.py                      # 4096 x 14336, depths 1..8, group 128
    python bench/gpu_kernels.py --rows 1024 --cols 4096 --depths 2,3,4

On an NVIDIA GPU (CUDA driver + nvcc): the kernels built for the card, timed with CUDA events (median of
--repeat), beside cuMemcpyDtoD of a 1 GiB buffer (bandwidth = bytes read + bytes written over time); the table is
appended to BENCHMARKS.md. The issue's target: gemv at 2..4 bits >= 70% of the copy bandwidth. Columns: the
product kernel alone on gathered activations, and gather + product (what a gemv costs), then a 16-token gemm
per token. Each depth's result is first checked against the numpy oracle on 64 rows.

Without CUDA it runs through WebGPU (wgpu-py); on a CPU adapter (lavapipe) the times are printed as "not speed
figures" (a check that the kernels run, nothing about a GPU) and nothing is appended.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append, table  # noqa: E402

from xbitc.backends.gpu.packed import GEMM_TOKENS, GpuMatrix, kernels  # noqa: E402
from xbitc.backends.gpu.render import CUDA  # noqa: E402
from xbitc.backends.llvm.rowlane import reference_rows  # noqa: E402
from xbitc.backends.product import PackedProduct  # noqa: E402

P = PackedProduct()
KERNELS = {k.name: k for k in kernels(P)}
GATHER, GEMV, GEMM = "xbitc_rows_gather", P.function("gemv"), P.function("gemm")
GEMM_BATCH = 16


def matrix(rng, rows: int, cols: int, bits: int, group: int):
    codes = rng.integers(0, 1 << bits, (rows, cols), dtype=np.uint8)
    records = []
    for c0 in range(0, cols, group):
        records.append((codes[:, c0:c0 + group], rng.uniform(0.005, 0.02, rows).astype(np.float16),
                        rng.integers(0, 1 << bits, rows, dtype=np.uint8), c0, bits))
    return records, rng.permutation(cols)


def check(records, perm, x, y, rows: int = 64) -> None:
    """y (first `rows` rows, token 0) against the oracle: the error bound of tests/test_gpu_kernels.py."""
    sub = [(c[:rows], s[:rows], z[:rows], off) for c, s, z, off, _ in records]
    xs = x[:1, perm]
    want = reference_rows(sub, xs, rows)[0]
    absum = sum(np.abs(xs[0, off:off + c.shape[1]]).astype(np.float64)
                @ (s.astype(np.float64)[:, None] * (c + z.astype(np.float64)[:, None])).T for c, s, z, off in sub)
    bound = (160 + len(records)) * 2.0**-24 * absum
    if not (np.abs(y[:rows] - want) <= bound).all():
        raise SystemExit(f"wrong results (worst error {np.abs(y[:rows] - want).max():.3g}): not timing a broken kernel")


class Cuda:
    def __init__(self):
        from xbitc.backends.gpu.cuda import CudaDevice, cubin

        self.dev = CudaDevice()
        mod = self.dev.load(cubin(CUDA().render_all(list(KERNELS.values())), self.dev.arch, Path(tempfile.mkdtemp())))
        self.fns = {name: self.dev.function(mod, name) for name in KERNELS}
        self.name, self.speed = f"{self.dev.name} ({self.dev.arch})", True

    def copy_gbs(self) -> float:
        n = 1 << 30
        a, b = self.dev.alloc(n), self.dev.alloc(n)
        t = self.dev.time(lambda: self.dev.copy(b, a, n))
        self.dev.free_all()
        return 2 * n / t / 1e9

    def upload(self, a):
        return self.dev.upload(a)

    def empty(self, nbytes):
        return self.dev.alloc(nbytes)

    def call(self, name, bufs, args):
        return lambda: self.dev.launch(self.fns[name], KERNELS[name], bufs, *args)

    def time(self, work, repeat):
        return self.dev.time(work, repeat)

    def read(self, buf, count):
        return self.dev.download(buf, np.float32, count)

    def free(self):
        self.dev.free_all()


class WebGpu:
    def __init__(self):
        from xbitc.backends.gpu.webgpu import WebGPU

        self.gpu = WebGPU()
        self.pipes = {name: self.gpu.pipeline(k) for name, k in KERNELS.items()}
        self.fence = self.gpu.buffer(16)
        info = self.gpu.adapter.info
        self.name = f"{self.gpu.name} (WebGPU)"
        self.speed = info.get("adapter_type", "").lower() not in ("cpu", "software") and "llvmpipe" not in self.name

    def copy_gbs(self) -> float | None:
        return None

    def upload(self, a):
        return self.gpu.buffer(a)

    def empty(self, nbytes):
        return self.gpu.buffer(nbytes)

    def call(self, name, bufs, args):
        return (self.pipes[name], bufs, *args)

    def time(self, calls, repeat):
        calls = calls if isinstance(calls, list) else [calls]
        times = []
        for _ in range(repeat + 1):  # the first run compiles
            t0 = time.perf_counter()
            self.gpu.dispatch(*calls)
            self.gpu.read(self.fence, np.uint8)  # waits for the queue (wgpu-py 0.32's work-done callback is broken)
            times.append(time.perf_counter() - t0)
        return float(np.median(times[1:]))

    def read(self, buf, count):
        return self.gpu.read(buf, np.float32, count)

    def free(self):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=14336)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--depths", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    try:
        dev = Cuda()
    except Exception as err:  # no driver, no GPU or no nvcc: WebGPU instead
        print(f"CUDA not used ({err}); running through WebGPU", file=sys.stderr)
        dev = WebGpu()
    copy = dev.copy_gbs()
    rows, cols = args.rows, args.cols
    rng = np.random.default_rng(0)
    out = []
    for bits in (int(b) for b in args.depths.split(",")):
        records, perm = matrix(rng, rows, cols, bits, args.group)
        m = GpuMatrix.from_records(records, rows, cols, perm)
        x = rng.standard_normal((GEMM_BATCH, cols)).astype(np.float32)
        w, pieces, src = dev.upload(m.words), dev.upload(m.pieces), dev.upload(m.src)
        x1, xb = dev.upload(np.ascontiguousarray(x[:1])), dev.upload(x)
        xp1, xpb = dev.empty(4 * m.xp_floats(1, 1)), dev.empty(4 * m.xp_floats(GEMM_BATCH, GEMM_TOKENS))
        y = dev.empty(4 * rows * GEMM_BATCH)
        gather = dev.call(GATHER, [x1, src, xp1], m.gather_args(1, 1))
        gemv = dev.call(GEMV, [w, w, pieces, xp1, y], m.product_args(1, 1))
        gather_b = dev.call(GATHER, [xb, src, xpb], m.gather_args(GEMM_BATCH, GEMM_TOKENS))
        gemm = dev.call(GEMM, [w, w, pieces, xpb, y], m.product_args(GEMM_BATCH, GEMM_TOKENS))
        both = (lambda: (gather(), gemv())) if isinstance(dev, Cuda) else [gather, gemv]
        dev.time(both, 1)
        check(records, perm, x, dev.read(y, rows))
        t_gemv = dev.time(gemv, args.repeat)
        t_both = dev.time(both, args.repeat)
        dev.time(gather_b, 1)
        t_gemm = dev.time(gemm, max(3, args.repeat // 5))
        gbs = m.bytes / t_gemv / 1e9
        out.append({"bits": bits, "weights MB": m.bytes / 1e6, "gemv us": t_gemv * 1e6, "GB/s": gbs,
                    "% copy": 100 * gbs / copy if copy else None, "gather+gemv us": t_both * 1e6,
                    f"gemm {GEMM_BATCH} tok us/token": t_gemm * 1e6 / GEMM_BATCH})
        dev.free()
    cols_ = ["bits", "weights MB", "gemv us", "GB/s", "% copy", "gather+gemv us", f"gemm {GEMM_BATCH} tok us/token"]
    head = (f"{dev.name}: packed gemv on {rows} x {cols}, group {args.group}"
            + (f", device copy {copy:.0f} GB/s" if copy else ""))
    if not dev.speed:
        head += " -- a CPU adapter: NOT SPEED FIGURES, only a check that the kernels run"
    print(head)
    print(table(out, cols_))
    if dev.speed and isinstance(dev, Cuda):
        append(f"Packed GPU gemv ({dev.name})", head + "\n\n" + table(out, cols_), "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
