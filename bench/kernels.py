"""Benchmark of the LLVM gemv kernels (backends/llvm) against the machine's read bandwidth and torch float32.

    python bench/kernels.py            # all shapes, depths 1..8, 1 and 2 threads (a few minutes)
    python bench/kernels.py --quick    # two shapes
    python bench/kernels.py --act q8   # the int8-activation strategy (layout il32w8)
    python bench/kernels.py --avx2     # kernels compiled with the host's AVX-512 features switched off

Method. Read bandwidth = bytes / median time of numpy sums over a 512 MiB float32 array, with 1 thread and with the
array split over N threads; the best of those is "measured BW". Every timed gemv / torch call is preceded by a
streaming read of a 96 MiB buffer so the weights come from DRAM, not from the 32 MiB L3 (a whole model does not fit
in cache either). Rows are split into N contiguous ranges; with N threads the calling thread runs one range and a
thread pool the others (ctypes drops the GIL). Bytes read = codes + scales (f16) + zeros (u8) + x (f32).
Speed-up = median torch float32 ``W @ x`` time (torch.set_num_threads(N), same flushing) / median kernel time.
Weights are random bytes in the kernel layout (timing does not depend on the code values; correctness is covered by
tests/test_llvm_kernels.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    from xbitc.backends.llvm import KernelSpec, compile_kernel, get_layout, host_target
except ImportError as exc:  # pragma: no cover
    sys.exit(f"cannot import xbitc.backends.llvm ({exc}); install the package (pip install -e .) first")

FULL_SHAPES = [(4096, 4096), (4096, 14336), (576, 576), (1536, 576), (576, 1536), (192, 576)]
QUICK_SHAPES = [(4096, 14336), (576, 1536)]
FLUSH_BYTES = 96 << 20


def parse_depths(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


class Flusher:
    def __init__(self):
        self.buf = np.ones(FLUSH_BYTES // 4, dtype=np.float32)

    def __call__(self):
        self.buf.sum()


def read_bandwidth(nthreads: int, pool: ThreadPoolExecutor, reps: int = 7) -> tuple[float, float]:
    """(median, best) GB/s of summing a 512 MiB float32 array split over `nthreads` threads."""
    a = np.ones((512 << 20) // 4, dtype=np.float32)
    parts = np.array_split(a, nthreads)
    a.sum()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        if nthreads == 1:
            a.sum()
        else:
            futs = [pool.submit(p.sum) for p in parts[1:]]
            parts[0].sum()
            for f in futs:
                f.result()
        ts.append(time.perf_counter() - t)
    return a.nbytes / statistics.median(ts) / 1e9, a.nbytes / min(ts) / 1e9


def split_rows(rows: int, n: int, align: int = 8) -> list[tuple[int, int]]:
    per = -(-rows // n)
    per = -(-per // align) * align
    return [(b, min(rows, b + per)) for b in range(0, rows, per)]


def time_gemv(fn, ptrs, rows, cols, nthreads, pool, flush, reps) -> tuple[float, float]:
    """(median, best) seconds per gemv, each call preceded by a cache flush."""
    ranges = split_rows(rows, nthreads)
    ts = []
    for _ in range(reps):
        flush()
        t = time.perf_counter()
        if len(ranges) == 1:
            fn(*ptrs, 0, rows, cols)
        else:
            futs = [pool.submit(fn, *ptrs, rb, re, cols) for rb, re in ranges[1:]]
            fn(*ptrs, ranges[0][0], ranges[0][1], cols)
            for f in futs:
                f.result()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def time_torch(rows, cols, nthreads, flush, reps) -> float:
    import torch

    torch.set_num_threads(nthreads)
    w = torch.randn(rows, cols, dtype=torch.float32)
    x = torch.randn(cols, dtype=torch.float32)
    for _ in range(2):
        w @ x
    ts = []
    for _ in range(reps):
        flush()
        t = time.perf_counter()
        w @ x
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    ap.add_argument("--depths", default="1-8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--act", choices=["f32", "q8"], default="f32")
    ap.add_argument("--layout", default=None, help="default: il8w32 for f32, il32w8 for q8")
    ap.add_argument("--rows-per-iter", type=int, default=None)
    ap.add_argument("--avx2", action="store_true", help="compile without the host's AVX-512 / AVX-VNNI features")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,576x1536 (rows x cols = out x in)")
    args = ap.parse_args(argv)

    depths = parse_depths(args.depths)
    threads = [int(t) for t in args.threads.split(",")]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    layout = args.layout or ("il32w8" if args.act == "q8" else "il8w32")
    target = host_target(without=("avx512", "avxvnni", "amx")) if args.avx2 else host_target()
    pool = ThreadPoolExecutor(max(threads))
    flush = Flusher()
    t_start = time.perf_counter()

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"# xbitc LLVM gemv kernels: act={args.act} layout={layout} group={args.group} "
          f"cpu={target.cpu} {'(AVX-512 off)' if args.avx2 else ''} load-avg(1m)={load:.2f} cores={os.cpu_count()}")
    bws = {n: read_bandwidth(n, pool) for n in sorted(set([1] + threads))}
    bw = max(v[0] for v in bws.values())
    bw_best = max(v[1] for v in bws.values())
    print("# read bandwidth (numpy sum, 512 MiB, median / best of 7): "
          + ", ".join(f"{n} thread{'s' if n > 1 else ''} {v[0]:.1f} / {v[1]:.1f} GB/s" for n, v in bws.items())
          + f" -> measured BW = {bw:.1f} GB/s (best {bw_best:.1f})")

    kernels = {}
    compile_ms = []
    for bits in depths:
        kw = {"layout": layout, "act": args.act}
        if args.rows_per_iter:
            kw["rows_per_iter"] = args.rows_per_iter
        spec = KernelSpec(bits, args.group, **kw)
        k = compile_kernel(spec, target)
        kernels[bits] = k
        compile_ms.append((bits, k.compile_ms["gemv"], k.from_cache["gemv"]))
    print("# gemv compile (ms, wall; 'c' = from disk cache): "
          + ", ".join(f"b{b}: {ms:.0f}{'c' if c else ''}" for b, ms, c in compile_ms))

    torch_t = {}
    if not args.no_torch:
        for rows, cols in shapes:
            for n in threads:
                torch_t[(rows, cols, n)] = time_torch(rows, cols, n, flush, args.reps)

    rng = np.random.default_rng(0)
    lay = get_layout(layout)
    print()
    print("| shape (out x in) | bits | threads | median (us) | best (us) | MB read | GB/s | % of BW "
          "| % of BW (best/best) | torch f32 (us) | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rows, cols in shapes:
        x = rng.standard_normal(cols).astype(np.float32)
        y = np.zeros(rows, dtype=np.float32)
        ng = -(-cols // args.group)
        for bits in depths:
            codes = rng.integers(0, 256, lay.nbytes(rows, cols, bits), dtype=np.uint8)
            scales = (rng.uniform(0.001, 0.1, (rows, ng))).astype(np.float16).view(np.uint16)
            zeros = rng.integers(0, 1 << bits, (rows, ng), dtype=np.uint8)
            ptrs = (codes.ctypes.data, scales.ctypes.data, zeros.ctypes.data, x.ctypes.data, y.ctypes.data)
            nbytes = codes.nbytes + scales.nbytes + zeros.nbytes + x.nbytes
            fn = kernels[bits].gemv
            fn(*ptrs, 0, rows, cols)  # warm-up
            for n in threads:
                t, tb = time_gemv(fn, ptrs, rows, cols, n, pool, flush, args.reps)
                gbs = nbytes / t / 1e9
                tt = torch_t.get((rows, cols, n))
                sp = f"{tt / t:.1f}x" if tt else "-"
                tts = f"{tt * 1e6:.0f}" if tt else "-"
                print(f"| {rows}x{cols} | {bits} | {n} | {t * 1e6:.0f} | {tb * 1e6:.0f} | {nbytes / 1e6:.2f} | "
                      f"{gbs:.1f} | {100 * gbs / bw:.0f}% | {100 * nbytes / tb / 1e9 / bw_best:.0f}% | {tts} | {sp} |",
                      flush=True)
    print(f"\n# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
