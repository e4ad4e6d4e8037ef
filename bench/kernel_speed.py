"""Benchmark of the LLVM gemv kernels (backends/llvm) against the machine's read bandwidth and torch float32.

    python bench/kernel_speed.py            # all shapes, depths 1..8, 1 and 2 threads (a few minutes)
    python bench/kernel_speed.py --quick    # two shapes
    python bench/kernel_speed.py --act q8   # the int8-activation strategy (layout il32w8)
    python bench/kernel_speed.py --avx2     # kernels compiled with the host's AVX-512 / AVX-VNNI features switched off
    python bench/kernel_speed.py --compute  # cache-resident compute ceiling of every strategy (Gweights/s)
    python bench/kernel_speed.py --layout rows   # the row-lane kernel the runtime uses (one call per matrix)

Every run appends what it printed to BENCHMARKS.md (bench/common.py `append`); --no-append only prints.

Method.
* Read bandwidth: bytes / median time of numpy reductions over a 512 MiB float32 array, with 1 thread and with the
  array split over N threads. Both ``sum`` (as the brief asks) and ``max`` are measured: numpy's float32 sum runs at
  only ~17 GB/s even from cache on this box, so it under-reports DRAM bandwidth. "measured BW" = the best of them.
* Before every timed gemv / torch call the weights are evicted from all cache levels with clflush (a tiny LLVM
  helper; ``--flush stream`` reads 96 MiB instead), so they come from DRAM as for a model much larger than the
  32 MiB L3, while the interpreter and the kernel code stay warm (streaming flushes also evict the interpreter and
  add 10-30 us of cold ctypes-call overhead, which swamps the small shapes).
* Rows are split into N contiguous ranges; with N threads the calling thread runs one range and a thread pool the
  others (ctypes drops the GIL). Bytes read = codes + scales (f16) + zeros (u8) + x (f32).
* Speed-up = median torch ``W @ x`` time in float32 and in bfloat16 (torch.set_num_threads(N), same eviction) /
  median kernel time.
* Matrix-matrix rows (``--batch``, default 64 tokens; 0 skips them): the same kernel over a batch (the row-lane q8
  kernel takes any batch, f32 uses its gemm), against torch ``X @ W.T``; GMAC/s = batch x rows x cols / time.
* With N threads each thread has its own q8 scratch (int8 x and lookup tables), as the runtime gives each call.
* N > 1 threads run twice (``--pool both``): through a Python ThreadPoolExecutor ("N python", what the runtime
  uses beside busy-waiting OpenMP threads; waking its worker costs ~50-80 us on this VM) and through llvm/pool.py's
  native spinning workers ("N spin", its default elsewhere; ~10 us a call), created for those rows only so that
  they never spin beside the others.
* Rounds (``--rounds``, default 3): every row runs ``--reps`` times per round and each round passes over all rows in
  turn; a row's median is over all its runs. The box is shared: a burst of another tenant's memory traffic then
  lands in a few runs of many rows instead of every run of one row.
* "% of local BW" divides by a numpy max over 64 MiB taken with the same thread count right after each row's runs:
  the box is shared with other jobs and its bandwidth drifts.
* Weights are random bytes in the kernel layout (timing does not depend on the code values; correctness is covered
  by tests/test_llvm_kernels.py).
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
    from xbitc.backends.llvm import KernelSpec, compile_kernel, default_spec, get_layout, host_target
    from xbitc.backends.llvm import rowlane as rl
    from xbitc.backends.llvm.jit import cache_line_flusher
    from xbitc.backends.llvm.pool import SpinPool
    from xbitc.backends.llvm.rowlane import ROWS_KIND, RowLaneSpec
except ImportError as exc:  # pragma: no cover
    sys.exit(f"cannot import xbitc.backends.llvm ({exc}); install the package (pip install -e .) first")

REPORT: list[str] = []  # everything printed, appended to BENCHMARKS.md at the end


def say(*parts, **kw) -> None:
    """print, and keep the text for the BENCHMARKS.md entry."""
    print(*parts, **kw)
    REPORT.append(" ".join(str(p) for p in parts))


def append_report(title: str, argv) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import append

    body = "\n".join(REPORT).strip("\n")
    # comment lines (# ...) become plain paragraphs in markdown, not headings
    out: list[str] = []
    for line in body.split("\n"):
        if line.startswith("# "):
            line = line[2:]
            if out and out[-1]:
                out.append("")  # each comment line its own paragraph
        elif line.startswith("|") and out and out[-1] and not out[-1].startswith("|"):
            out.append("")  # a table starts a new block
        out.append(line)
    body = "\n".join(out)
    args = list(sys.argv[1:] if argv is None else argv)
    append(title, body, " ".join(["python bench/kernel_speed.py", *args]))


FULL_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (576, 576), (1536, 576), (576, 1536), (192, 576)]
QUICK_SHAPES = [(4096, 14336), (576, 1536)]
FLUSH_BYTES = 96 << 20
BENCH_SPIN = 1 << 22  # polls a spinning worker waits before sleeping: longer than a clflush between two runs


def parse_depths(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


class StreamFlusher:
    """Evicts the caches by summing a 96 MiB buffer (fallback where clflush is not available)."""

    name = "a 96 MiB streaming read"

    def __init__(self):
        self.buf = np.ones(FLUSH_BYTES // 4, dtype=np.float32)

    def __call__(self, arrays):
        self.buf.sum()


class LineFlusher:
    """Evicts exactly the given arrays from every cache level (clflush)."""

    name = "clflush"

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, arrays):
        for a in arrays:
            self.fn(a.ctypes.data, a.nbytes)


def reduce_bandwidth(a: np.ndarray, fn, nthreads: int, pool: ThreadPoolExecutor, reps: int) -> float:
    """Median GB/s of `fn` over `a` split into `nthreads` parts run concurrently."""
    parts = np.array_split(a, nthreads)
    fn(parts[0])
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        futs = [pool.submit(fn, p) for p in parts[1:]]
        fn(parts[0])
        for f in futs:
            f.result()
        ts.append(time.perf_counter() - t)
    return a.nbytes / statistics.median(ts) / 1e9


def split_rows(rows: int, n: int, align: int = 16) -> list[tuple[int, int]]:
    per = -(-rows // n)
    per = -(-per // align) * align
    return [(b, min(rows, b + per)) for b in range(0, rows, per)]


def time_split(job, rows, nthreads, arrays, pool, flush, reps) -> list[float]:
    """Seconds of each of `reps` runs of the kernel calls job(rows_begin, rows_end, thread_index) -> (fn, args) over
    `nthreads` row ranges run at once (the calling thread runs the first; `pool` a SpinPool or a
    ThreadPoolExecutor runs the others), each run preceded by evicting `arrays` from the caches."""
    ranges = split_rows(rows, nthreads)
    ts = []
    for _ in range(reps):
        jobs = [job(rb, re, i) for i, (rb, re) in enumerate(ranges)]
        flush(arrays)
        t = time.perf_counter()
        if isinstance(pool, SpinPool):
            pool.run(jobs)
        else:
            futs = [pool.submit(fn, *a) for fn, a in jobs[1:]]
            jobs[0][0](*jobs[0][1])
            for f in futs:
                f.result()
        ts.append(time.perf_counter() - t)
    return ts


def time_torch(rows, cols, nthreads, flush, reps, dtype, batch=0) -> float:
    """Median seconds of torch `W @ x` (batch 0) or `X @ W.T` (X [batch, cols]) in `dtype`, weights evicted."""
    import torch

    torch.set_num_threads(nthreads)
    w = torch.randn(rows, cols, dtype=torch.float32).to(dtype)
    x = torch.randn(*((batch,) if batch else ()), cols, dtype=torch.float32).to(dtype)
    run = (lambda: x @ w.T) if batch else (lambda: w @ x)
    for _ in range(2):
        run()
    ts = []
    for _ in range(reps):
        flush([w.view(torch.int16).numpy() if dtype == torch.bfloat16 else w.numpy()])
        t = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


STRATEGIES = [  # (label, KernelSpec kwargs, host_target(without=...))
    ("f32 dequant+FMA, il8w32, host (AVX-512 regs)", dict(layout="il8w32"), ()),
    ("f32 dequant+FMA, il8w32, AVX2 only", dict(layout="il8w32"), ("avx512", "avxvnni", "amx")),
    ("f32 dequant+FMA, il16w32 (zmm), host", dict(layout="il16w32"), ()),
    ("f32, canonical layout (scalar fallback)", dict(layout="canonical"), ()),
    ("q8 int8 activations, il32w8, AVX-512 VNNI", dict(layout="il32w8", act="q8"), ()),
    ("q8 int8 activations, il32w8, AVX2 pmaddubsw", dict(layout="il32w8", act="q8"), ("avx512", "avxvnni", "amx")),
]


def compute_bench(depths, group, rows=256, cols=4096, rounds=6) -> None:
    """Cache-resident throughput of each strategy: min thread-CPU time over rounds of 30 calls (robust to other jobs
    on the box), as Gweights/s. The weights (<= 1 MiB) stay in L2, so this is the kernels' compute ceiling."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(cols).astype(np.float32)
    y = np.zeros(rows, dtype=np.float32)
    cases = []
    for label, kw, without in STRATEGIES:
        for bits in depths:
            spec = KernelSpec(bits, group, **kw)
            k = compile_kernel(spec, host_target(without=without))
            lay = get_layout(spec.layout)
            ng = -(-cols // group)
            arrs = (rng.integers(0, 256, lay.nbytes(rows, cols, bits), dtype=np.uint8),
                    rng.uniform(0.001, 0.1, (rows, ng)).astype(np.float16).view(np.uint16),
                    rng.integers(0, 1 << bits, (rows, ng), dtype=np.uint8))
            cases.append((label, bits, k.gemv, tuple(a.ctypes.data for a in arrs) + (x.ctypes.data, y.ctypes.data),
                          arrs))
    best = [float("inf")] * len(cases)
    for _ in range(rounds):
        for i, (_, _, fn, ptrs, _) in enumerate(cases):
            for _ in range(30):
                t = time.thread_time()
                fn(*ptrs, 0, rows, cols)
                best[i] = min(best[i], time.thread_time() - t)
    say(f"\n# compute ceiling: {rows}x{cols}, group {group}, cache resident, 1 thread, Gweights/s (GB/s of weights)")
    say("| strategy | " + " | ".join(f"{b} bit" for b in depths) + " |")
    say("|---|" + "---|" * len(depths))
    for label, _, _ in STRATEGIES:
        row = []
        for (lab, bits, _, _, arrs), t in zip(cases, best):
            if lab == label:
                row.append(f"{rows * cols / t / 1e9:.1f} ({sum(a.nbytes for a in arrs) / t / 1e9:.1f})")
        say(f"| {label} | " + " | ".join(row) + " |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,576x1536 (rows x cols = out x in)")
    ap.add_argument("--depths", default="1-8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--act", choices=["f32", "q8"], default="f32")
    ap.add_argument("--layout", default=None, help="default: il32w8 for q8; for f32 il16w32 with AVX-512, else "
                    "il8w32; 'rows': the row-lane kernel (backends/llvm/rowlane.py), one record per group")
    ap.add_argument("--spec", default=None, help="extra integer KernelSpec fields, e.g. prefetch=8192,accs=4")
    ap.add_argument("--avx2", action="store_true", help="compile without the host's AVX-512 / AVX-VNNI features")
    ap.add_argument("--reps", type=int, default=9, help="runs of each row per round")
    ap.add_argument("--rounds", type=int, default=3, help="passes over all rows; medians over every round's runs")
    ap.add_argument("--flush", choices=["clflush", "stream"], default="clflush")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--batch", type=int, default=64, help="tokens of the matrix-matrix rows (0: gemv only)")
    ap.add_argument("--pool", choices=["python", "spin", "both"], default="both",
                    help="how rows reach the other threads: a ThreadPoolExecutor, the native "
                         "spinning pool ($XBITC_X86_POOL=spin), or a row for each")
    ap.add_argument("--fresh-compile", action="store_true", help="bypass the disk cache (to time compilation)")
    ap.add_argument("--compute", action="store_true", help="only the cache-resident strategy comparison")
    ap.add_argument("--no-append", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    REPORT.clear()
    if args.compute:
        compute_bench(parse_depths(args.depths), args.group)
        if not args.no_append:
            append_report("LLVM kernels: compute ceiling", argv)
        return

    depths = parse_depths(args.depths)
    threads = [int(t) for t in args.threads.split(",")]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    target = host_target(without=("avx512", "avxvnni", "amx")) if args.avx2 else host_target()
    layout = args.layout or ("il32w8" if args.act == "q8" else default_spec(4, args.group, target).layout)
    pool = ThreadPoolExecutor(max(threads))
    clf = cache_line_flusher() if args.flush == "clflush" else None
    flush = LineFlusher(clf) if clf else StreamFlusher()
    t_start = time.perf_counter()

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    say(f"# xbitc LLVM gemv kernels: act={args.act} layout={layout} group={args.group} cpu={target.cpu}"
          f"{' (AVX-512/VNNI off)' if args.avx2 else ''} spec+={args.spec or '-'} "
          f"load-avg(1m)={load:.2f} cores={os.cpu_count()}")
    big = np.ones((512 << 20) // 4, dtype=np.float32)
    bws = {}
    for n in sorted(set([1] + threads)):
        bws[("sum", n)] = reduce_bandwidth(big, np.sum, n, pool, 5)
        bws[("max", n)] = reduce_bandwidth(big, np.max, n, pool, 5)
    del big
    bw = max(bws.values())
    say("# read bandwidth, 512 MiB float32, median of 5: "
          + ", ".join(f"numpy {m} {n}t {v:.1f}" for (m, n), v in bws.items())
          + f" GB/s -> measured BW = {bw:.1f} GB/s")
    local_arr = np.ones((64 << 20) // 4, dtype=np.float32)

    kernels = {}
    compile_ms = []
    compile_kernel(KernelSpec(4, 32, col_tile=1024), target, use_disk_cache=False)  # warm up LLVM
    rows_kernel = None
    if layout == "rows":
        rows_kernel = compile_kernel(RowLaneSpec(act=args.act), target, kinds=(ROWS_KIND,),
                                     use_disk_cache=not args.fresh_compile)
        compile_ms.append(("all", rows_kernel.compile_ms[ROWS_KIND], rows_kernel.compile_cpu_ms[ROWS_KIND],
                           rows_kernel.from_cache[ROWS_KIND]))
    for bits in depths if rows_kernel is None else []:
        kw = {"layout": layout, "act": args.act}
        for item in filter(None, (args.spec or "").split(",")):
            key, val = item.split("=")
            kw[key] = int(val)
        spec = KernelSpec(bits, args.group, **kw)
        k = compile_kernel(spec, target, kinds=("gemv", "gemm") if args.batch else ("gemv",),
                           use_disk_cache=not args.fresh_compile)
        kernels[bits] = k
        compile_ms.append((bits, k.compile_ms["gemv"], k.compile_cpu_ms["gemv"], k.from_cache["gemv"]))
    say("# gemv compile, wall / CPU ms ('c' = loaded from the disk cache): "
          + ", ".join(f"b{b}: {ms:.0f}/{cpu:.0f}{'c' if c else ''}" for b, ms, cpu, c in compile_ms))

    torch_t = {}  # (rows, cols, threads, dtype, batch) -> median seconds
    if not args.no_torch:
        import torch

        for rows, cols in shapes:
            for n in threads:
                for dt in (torch.float32, torch.bfloat16):
                    for batch in sorted({0, args.batch}):
                        torch_t[(rows, cols, n, dt, batch)] = time_torch(rows, cols, n, flush, args.reps, dt, batch)
        tf32, tbf16 = torch.float32, torch.bfloat16
    else:
        tf32 = tbf16 = None

    def vs_torch(t, *key):
        """(torch f32 us, torch bf16 us, speed-up over each) for the kernel's median t."""
        f, h = (torch_t.get(key[:3] + (dt,) + key[3:]) for dt in (tf32, tbf16))
        return (f"{f * 1e6:.0f}" if f else "-", f"{h * 1e6:.0f}" if h else "-",
                f"{f / t:.1f}x" if f else "-", f"{h / t:.1f}x" if h else "-")

    rng = np.random.default_rng(0)
    lay = get_layout(layout) if rows_kernel is None else None
    local_bws, batch_rows = [], []
    say()
    say("| shape (out x in) | bits | threads | median (us) | best (us) | MB read | GB/s | % of BW | % of local BW "
          "| torch f32 (us) | torch bf16 (us) | vs f32 | vs bf16 |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    nslots = max(threads)
    pools = ["python", "spin"] if args.pool == "both" else [args.pool]
    variants = [(n, kind) for n in threads for kind in (pools if n > 1 else ["python"])]
    cases = []
    for rows, cols in shapes:
        x = rng.standard_normal(cols).astype(np.float32)
        y = np.zeros(rows, dtype=np.float32)
        xb = rng.standard_normal((max(args.batch, 1), cols)).astype(np.float32)
        yb = np.zeros((max(args.batch, 1), rows), dtype=np.float32)
        xp, yp, xbp, ybp = x.ctypes.data, y.ctypes.data, xb.ctypes.data, yb.ctypes.data
        ng = -(-cols // args.group)
        for bits in depths:
            if rows_kernel is not None:  # one record per group; random bytes (scales made finite below)
                shapes_ = [(bits, min(args.group, cols - c0), c0) for c0 in range(0, cols, args.group)]
                nrb = -(-rows // rl.LANES)
                codes = rng.integers(0, 256, nrb * sum(rl.record_bytes(*sh[:2]) for sh in shapes_), dtype=np.uint8)
                table = rl.record_table(codes.ctypes.data, shapes_)
                for t in table:  # float16 1/16 .. 1: finite scales
                    codes[t[3] - codes.ctypes.data + np.arange(nrb)[:, None] * t[6] + np.arange(1, 32, 2)] = 0x2C
                scales = zeros = np.zeros(0, np.uint8)
                tp, nrec = table.ctypes.data, len(table)
                held = [table]  # the kernels get raw pointers: keep what they point into alive with the case
                if args.act == "q8":  # each thread its own scratch, as the runtime gives each call
                    per = rl.q8_scratch_bytes([sh[1] for sh in shapes_], max(args.batch, 1), [sh[0] for sh in shapes_])
                    scratch = [np.zeros(per, np.uint8) for _ in range(nslots)]
                    held.append(scratch)
                    q8 = rows_kernel.rows_q8

                    def gemv(rb, re, i, q8=q8, tp=tp, nrec=nrec, sc=scratch, rows=rows, cols=cols, xp=xp, yp=yp):
                        return q8, (tp, nrec, xp, None, yp, rb, re, 1, cols, rows, sc[i].ctypes.data)

                    def gemm(rb, re, i, q8=q8, tp=tp, nrec=nrec, sc=scratch, rows=rows, cols=cols, xbp=xbp, ybp=ybp):
                        return q8, (tp, nrec, xbp, None, ybp, rb, re, args.batch, cols, rows, sc[i].ctypes.data)
                else:
                    def gemv(rb, re, i, k=rows_kernel, tp=tp, nrec=nrec, xp=xp, yp=yp):
                        return k.rows_gemv, (tp, nrec, xp, None, yp, rb, re)

                    def gemm(rb, re, i, k=rows_kernel, tp=tp, nrec=nrec, rows=rows, cols=cols, xbp=xbp, ybp=ybp):
                        return k.rows_gemm, (tp, nrec, xbp, ybp, rb, re, args.batch, cols, rows)
            else:
                codes = rng.integers(0, 256, lay.nbytes(rows, cols, bits), dtype=np.uint8)
                scales = (rng.uniform(0.001, 0.1, (rows, ng))).astype(np.float16).view(np.uint16)
                zeros = rng.integers(0, 1 << bits, (rows, ng), dtype=np.uint8)
                ptrs = (codes.ctypes.data, scales.ctypes.data, zeros.ctypes.data)
                held = []

                def gemv(rb, re, i, k=kernels[bits], ptrs=ptrs, cols=cols, xp=xp, yp=yp):
                    return k.gemv, (*ptrs, xp, yp, rb, re, cols)

                def gemm(rb, re, i, k=kernels[bits], ptrs=ptrs, rows=rows, cols=cols, xbp=xbp, ybp=ybp):
                    return k.gemm, (*ptrs, xbp, ybp, rb, re, cols, args.batch, rows)
            for job in (gemv, gemm) if args.batch else (gemv,):
                fn, a = job(0, rows, 0)
                fn(*a)  # warm-up
            cases.append(dict(rows=rows, cols=cols, bits=bits, gemv=gemv, gemm=gemm, arrays=(codes, scales, zeros),
                              nbytes=codes.nbytes + scales.nbytes + zeros.nbytes + x.nbytes, keep=(x, y, xb, yb, held)))
    # (every closure above binds its pointers as defaults: the loop variables move on before the rounds run)
    # Rounds: every (case, threads) runs `reps` times per round and the rounds go over all cases in turn, so a
    # burst of load from the box's other tenants lands in a few samples of many rows, not in all of one row's.
    samples = {}
    for _ in range(args.rounds):
        for ci_, c in enumerate(cases):
            for n, kind in variants:
                # a spinning pool only while its rows run: its workers would take the cores of the others
                spin = SpinPool(n - 1, spin=BENCH_SPIN) if kind == "spin" else None
                try:
                    tv = time_split(c["gemv"], c["rows"], n, c["arrays"], spin or pool, flush, args.reps)
                    tg = time_split(c["gemm"], c["rows"], n, c["arrays"], spin or pool, flush, args.reps) \
                        if args.batch else []
                finally:
                    if spin is not None:
                        spin.close()
                local = reduce_bandwidth(local_arr, np.max, n, pool, 3)
                acc = samples.setdefault((ci_, n, kind), ([], [], []))
                acc[0].extend(tv)
                acc[1].extend(tg)
                acc[2].append(local)
    for ci_, c in enumerate(cases):
        rows, cols, bits, nbytes = c["rows"], c["cols"], c["bits"], c["nbytes"]
        for n, kind in variants:
            tv, tg, locs = samples[(ci_, n, kind)]
            t, tb, local_bw = statistics.median(tv), min(tv), statistics.median(locs)
            local_bws.append(local_bw)
            gbs = nbytes / t / 1e9
            tts, tbs, sps, spb = vs_torch(t, rows, cols, n, 0)
            label = f"{n} {kind}" if n > 1 else "1"
            say(f"| {rows}x{cols} | {bits} | {label} | {t * 1e6:.0f} | {tb * 1e6:.0f} | {nbytes / 1e6:.2f} | "
                f"{gbs:.1f} | {100 * gbs / bw:.0f}% | {100 * gbs / local_bw:.0f}% | {tts} | {tbs} | {sps} | {spb} |")
            if args.batch:
                t = statistics.median(tg)
                tts, tbs, sps, spb = vs_torch(t, rows, cols, n, args.batch)
                batch_rows.append(f"| {rows}x{cols} | {bits} | {label} | {args.batch} | {t * 1e6:.0f} | "
                                  f"{args.batch * rows * cols / t / 1e9:.1f} | {tts} | {tbs} | {sps} | {spb} |")
    if batch_rows:
        say(f"\n# matrix-matrix: a batch of {args.batch} tokens (prefill), weights evicted before each call; "
            f"GMAC/s = batch x rows x cols / median; torch: X @ W.T with X [{args.batch}, in]")
        say("| shape (out x in) | bits | threads | batch | median (us) | GMAC/s | torch f32 (us) | torch bf16 (us) "
            "| vs f32 | vs bf16 |")
        say("|---|---|---|---|---|---|---|---|---|---|")
        for line in batch_rows:
            say(line)
    say(f"\n# '% of BW': over the measured BW above ({bw:.1f} GB/s); '% of local BW': over a numpy max of 64 MiB with "
          f"the same thread count taken right after that row's runs (range {min(local_bws):.1f}.."
          f"{max(local_bws):.1f} GB/s). Medians of {args.rounds} rounds x {args.reps} runs, the rounds passing over "
          f"all rows in turn; weights evicted with {flush.name} before each.")
    say(f"# total {time.perf_counter() - t_start:.0f} s")
    if not args.no_append:
        append_report(f"LLVM kernels: gemv vs DRAM bandwidth and torch (act={args.act}"
                      f"{', quick' if args.quick else ''}{', AVX2 only' if args.avx2 else ''})", argv)


if __name__ == "__main__":
    main()
