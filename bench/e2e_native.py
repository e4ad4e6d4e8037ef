"""End-to-end speed of SmolLM2-135M through the C library (`xbitc export --c-lib`), beside llama.cpp, the Python
runtime and float PyTorch, in one run.

    python bench/e2e_native.py --artifact out/smollm2-3.0.xbitc [--artifact other.xbitc ...]
    python bench/e2e_native.py --artifact A --threads 1 --reps 1 --rounds 1 --no-append   # smoke run

Method.
* C library: each artifact is exported (model.bin + libxbitc.a; `--act f32`, exact float activations, and
  `--act q8`, int8 activations per record as llama.cpp does) and bench/native/speed.c, linked against it, runs
  what llama-bench runs: prefill = one feed of --prefill tokens into an empty session (pp), decode = --decode tokens
  fed one at a time from an empty session (tg); tok/s = 1 / median time, over --reps runs after a warm-up run.
  Threads: the library's own pool (xbitc_pool_start).
* llama.cpp: bench/llamacpp.py (build from the llama-cpp-python sdist, Q4_K_M and Q3_K_M requantized from the
  installed Q4_1 GGUF; see there), llama-bench with the same prefill / decode / reps, its mean tok/s.
* Python runtime (x86 backend, --python): decode through the artifact's compiled step (KV cache), prefill one forward of
  the main graph, medians. Float PyTorch (--float): the loaded model, transformers' cache, eager float32.
* Engines take turns (--rounds rounds, thread counts inside), and each figure is the median over rounds, so a noisy
  neighbour slows all alike. Ratios are taken within this run only.
* Bandwidth floor: decode reads every weight once per token, so decode tok/s <= read bandwidth / model.bin bytes;
  read bandwidth = bytes / median time of numpy sums over a 512 MiB float32 array, split over the same threads.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import llamacpp  # noqa: E402
from common import append, table  # noqa: E402
from kernel_speed import reduce_bandwidth  # noqa: E402

from xbitc.native import build  # noqa: E402
from xbitc.native.export import export_c_lib  # noqa: E402

SPEED = Path(__file__).parent / "native" / "speed.c"
COLUMNS = ["engine", "file MB", "threads", "prefill tok/s", "decode tok/s", "decode vs llama.cpp Q4_K_M",
           "decode vs llama.cpp Q3_K_M", "decode % of bandwidth floor"]


def read_bandwidth(threads: int, reps: int = 5) -> float:
    """Bytes per second numpy sums read from a 512 MiB float32 array split over `threads` (bench/kernel_speed.py's
    measure)."""
    a = np.ones(128 << 20, dtype=np.float32)
    with ThreadPoolExecutor(threads) as pool:
        return reduce_bandwidth(a, np.sum, threads, pool, reps) * 1e9


def native_engine(artifact: Path, work: Path, act: str) -> tuple[Path, Path]:
    lib = export_c_lib(artifact, work / f"{artifact.stem}-{act}.clib", act=act)
    exe = build.link_program([SPEED], lib / "libxbitc.a", lib / "speed")
    return lib / "model.bin", exe


def native_measure(exe: Path, model_bin: Path, threads: int, a) -> tuple[float, float]:
    out = subprocess.run([str(exe), str(model_bin), str(threads), str(a.prefill), str(a.decode), str(a.reps)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def python_measure(model, threads: int, a) -> tuple[float, float]:
    import torch

    from xbitc.backends.cpu import threads as cpu_threads
    from xbitc.stepgraph import empty_cache

    torch.set_num_threads(threads)
    cpu_threads.set_num_threads(threads)
    ids = ((torch.arange(a.prefill) * 7919 + 13) % 49152).unsqueeze(0)  # the ids speed.c feeds (SmolLM2's vocabulary)
    with torch.no_grad():
        pre = []
        for _ in range(a.reps + 1):
            t = time.perf_counter()
            model(ids)
            pre.append(time.perf_counter() - t)
        steps = []
        for _ in range(a.reps):
            logits, *past = model.step(ids[:, :1], *empty_cache(model.graph.step))
            for d in range(a.decode - 1):
                t = time.perf_counter()
                logits, *past = model.step(ids[:, d + 1:d + 2], *past)
                steps.append(time.perf_counter() - t)
    return a.prefill / statistics.median(pre[1:]), 1 / statistics.median(steps)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", action="append", required=True, help="a compiled SmolLM2 artifact (repeatable)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--act", default="f32,q8", help="activation strategies of the exported libraries")
    ap.add_argument("--python", action="store_true", help="also the Python runtime (x86 backend)")
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    work = Path(tempfile.mkdtemp(prefix="xbitc-e2e-native-"))

    engines: dict[str, tuple[float, callable]] = {}  # name -> (file MB, measure(threads) -> (prefill, decode))
    for art in map(Path, a.artifact):
        for act in a.act.split(","):
            model_bin, exe = native_engine(art, work, act)
            engines[f"xbitc C library --act {act}, {art.name}"] = (
                model_bin.stat().st_size / 1e6, lambda n, e=exe, b=model_bin: native_measure(e, b, n, a))
        if a.python:
            from xbitc import runtime

            model = runtime.load(art, backend="x86")
            engines[f"xbitc Python runtime (x86), {art.name}"] = (
                model.manifest.size.counted_bytes / 1e6, lambda n, m=model: python_measure(m, n, a))
    bin_dir = llamacpp.build()
    for name, path in llamacpp.models(bin_dir=bin_dir).items():
        def measure(n, p=path):
            r = llamacpp.measure(bin_dir, p, n, a.prefill, a.decode, a.reps)
            return r["prefill_tok_s"], r["decode_tok_s"]
        engines[f"llama.cpp {name}"] = (path.stat().st_size / 1e6, measure)

    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(a.rounds):
        for n in threads:
            for name, (_, measure) in engines.items():
                results.setdefault((name, n), []).append(measure(n))
                print(f"# round {r + 1}, {n} threads, {name}: {results[(name, n)][-1]}", flush=True)
    bandwidth = {n: read_bandwidth(n) for n in threads}

    rows = []
    for n in threads:
        med = {name: tuple(statistics.median(x[i] for x in results[(name, n)]) for i in (0, 1)) for name in engines}
        for name, (mb, _) in engines.items():
            pre, dec = med[name]
            floor = bandwidth[n] / (mb * 1e6)
            rows.append({
                "engine": name, "file MB": mb, "threads": n, "prefill tok/s": pre, "decode tok/s": dec,
                "decode vs llama.cpp Q4_K_M": dec / med["llama.cpp Q4_K_M"][1],
                "decode vs llama.cpp Q3_K_M": dec / med["llama.cpp Q3_K_M"][1],
                "decode % of bandwidth floor": 100 * dec / floor,
            })
    body = table(rows, COLUMNS)
    note = (f"CPU flags: {llamacpp.cpu_flags()}. Read bandwidth (numpy sum, 512 MiB): "
            + ", ".join(f"{bandwidth[n] / 1e9:.1f} GB/s at {n} thread{'s' * (n > 1)}" for n in threads)
            + f". Prefill {a.prefill} tokens, decode {a.decode} tokens from an empty cache, {a.reps} reps, "
            f"{a.rounds} rounds interleaved, medians over rounds. File MB: model.bin for the C library, the artifact's "
            "counted bytes for the Python runtime, the GGUF for llama.cpp.")
    print("\n" + note + "\n\n" + body)
    if not a.no_append:
        cmd = "python bench/e2e_native.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append("End to end through the C library: SmolLM2-135M vs llama.cpp", note + "\n\n" + body, cmd.strip())


if __name__ == "__main__":
    main()
