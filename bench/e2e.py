"""End-to-end speed of SmolLM2-135M: float PyTorch eager vs the reference backend vs the x86 backend.

    python bench/e2e.py                  # 3-bit group 128, 32 new tokens, prefill 256, 1 and 2 threads
    python bench/e2e.py --threads 1 --new-tokens 8 --reps 1 --no-append   # smoke run

Method.
* The model (`xbitc.models.smollm2_gguf()`, loaded with `xbitc.frontend.load`) is compiled with
  `compile_model(CompileOptions(bits=3, group=128, backend="x86"))` (RTN; embeddings / tied output layer stay
  float16 -> float32 at run time, as in every artifact). The same artifact is loaded twice, with the x86 backend
  (generated LLVM kernels) and with the reference backend (packed weights dequantized to float32 once, torch
  matmuls); "float" is the loaded PyTorch module itself, float32, eager.
* Decode: greedy, the same prompt, `--new-tokens` steps, tok/s = 1 / the median step time, two ways:
  with a KV cache (the float model through transformers' own DynamicCache; xbitc engines through the artifact's
  compiled decode step, step.json: one token over explicit key/value tensors; prefill not timed) and without (every
  step re-runs the whole prefix: one forward at the current length). "vs float" divides by the float model's cached
  rate. Every engine decodes its own tokens; the table says whether x86 and reference produced the same ones (they
  compute the same quantized network, so they should), and a line is printed if an engine's cached and uncached
  tokens differ.
* Prefill: one forward of `--prefill` tokens (the packaged calibration text), median of `--reps`.
* 1-token forward: one forward of the main graph on a single token (the kernels' gemv path), median of 20.
* Threads: torch.set_num_threads(n) and the x86 backend's pool (`xbitc.backends.cpu.threads.set_num_threads(n)`),
  same n. All engines run in the same process, in turn, for every thread count.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append, table  # noqa: E402

from xbitc import frontend, models, runtime  # noqa: E402
from xbitc.backends.cpu import threads as cpu_threads  # noqa: E402
from xbitc.driver import CompileOptions, compile_model  # noqa: E402
from xbitc.stepgraph import empty_cache  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
COLUMNS = ["engine", "threads", "decode tok/s (KV cache)", "vs float (KV cache)", "decode tok/s (no cache)",
           "prefill tok/s", "1-token forward ms", "same tokens as reference"]


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


@torch.no_grad()
def decode(fn, ids: torch.Tensor, steps: int) -> tuple[list[int], list[float]]:
    toks, times = [], []
    for _ in range(steps):
        logits, dt = timed(fn, ids)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        toks.append(int(nxt))
        times.append(dt)
        ids = torch.cat([ids, nxt], dim=1)
    return toks, times


@torch.no_grad()
def decode_cached(step, ids: torch.Tensor, steps: int) -> tuple[list[int], list[float]]:
    """Greedy decode with a KV cache: `step(ids, past) -> (logits, past)`; the prompt's prefill is not timed."""
    logits, past = step(ids, None)
    toks, times = [], []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        toks.append(int(nxt))
        (logits, past), dt = timed(step, nxt, past)
        times.append(dt)
    return toks, times


def hf_step(hf):
    """The float model's own cached step (transformers DynamicCache), as a user of PyTorch would decode."""
    def step(ids, past):
        out = hf(input_ids=ids, past_key_values=past, use_cache=True)
        return out.logits, out.past_key_values
    return step


def xbitc_step(model):
    """The artifact's compiled decode step (step.json) over explicit key/value tensors."""
    def step(ids, past):
        logits, *kv = model.step(ids, *(empty_cache(model.graph.step) if past is None else past))
        return logits, kv
    return step


@torch.no_grad()
def median_time(fn, ids: torch.Tensor, reps: int) -> float:
    fn(ids)  # warm-up (first-use caches: the reference backend's dequantized weights, kernel pages)
    return statistics.median(timed(fn, ids)[1] for _ in range(reps))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="turns each engine takes at cached decode (interleaved)")
    ap.add_argument("--engines", default="float,reference,x86")
    ap.add_argument("--keep", help="write the artifact here (default: a temporary folder)")
    ap.add_argument("--artifact", help="measure this compiled SmolLM2 artifact (e.g. a learned-allocation one from "
                    "bench/accuracy.py --keep) instead of compiling --bits/--group")
    ap.add_argument("--no-append", action="store_true", help="print only, do not append to BENCHMARKS.md")
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    engines = a.engines.split(",")

    gguf = models.smollm2_gguf()
    t0 = time.perf_counter()
    loaded = frontend.load(str(gguf))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if a.artifact:
        out = Path(a.artifact)
        compile_s = float("nan")
    else:
        out = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="xbitc-e2e-")) / "smollm2.xbitc"
        compile_model(loaded, out, CompileOptions(bits=a.bits, group=a.group, backend="x86", progress=False,
                                                  log=lambda s: None))
        compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = runtime.load(out, backend="x86")  # x86: repack + kernels (disk cache)
    lower_s = time.perf_counter() - t0
    manifest = fast.manifest
    what = (f"`{out.name}` ({manifest.pipeline})" if a.artifact else
            f"`compile_model(CompileOptions(bits={a.bits}, group={a.group}, backend=\"x86\"))` (RTN; embeddings and "
            "the tied output layer float)")
    short = f"{manifest.size.bits_per_weight:.2f} bpw" if a.artifact else f"{a.bits}-bit g{a.group}"
    ref = runtime.load(out, backend="reference")
    kern = manifest.notes.get("kernels", {})
    lins = fast.program.interp.linear_impl.linears.values()
    plans = {p.how for lin in lins for p in (s.plan for s in lin.segs)}
    if any(lin.rows is not None for lin in lins):  # the default: one row-lane call per matrix
        plans.add(f"row-lane ({sum(lin.rows.nrec for lin in lins if lin.rows is not None)} records in "
                  f"{sum(lin.rows is not None for lin in lins)} matrices)")
    print(f"# loaded in {load_s:.1f} s, compiled in {compile_s:.1f} s, x86 lower (repack + kernels) {lower_s:.1f} s; "
          f"artifact {manifest.size.counted_bytes / 1e6:.2f} MB = {manifest.size.bits_per_weight:.3f} bpw, "
          f"kernels/ {kern.get('bytes', 0):,} bytes; kernel plans: {sorted(plans)}", flush=True)

    tok = loaded.tokenizer
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    text = (Path(__file__).resolve().parent.parent / "xbitc" / "data" / "calib.txt").read_text(encoding="utf-8")
    long_ids = tok(text, return_tensors="pt").input_ids[:, : a.prefill]
    if long_ids.shape[1] < a.prefill:
        long_ids = long_ids.repeat(1, -(-a.prefill // long_ids.shape[1]))[:, : a.prefill]
    one = prompt[:, :1]
    fns = {"float": loaded.module, "reference": ref, "x86": fast}
    labels = {"float": "float32 PyTorch eager", "reference": f"reference backend ({short})",
              "x86": f"x86 backend ({short})"}
    try:
        load_avg = os.getloadavg()
    except OSError:
        load_avg = (float("nan"),) * 3
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        cpu_threads.set_num_threads(n)
        tokens = {}
        # cached decode, the headline number: engines take turns for --rounds rounds, so a noisy neighbour on the
        # shared machine slows all of them alike; tok/s = 1 / the median over every round's steps
        steppers = {name: hf_step(loaded.module.model) if name == "float" else
                    xbitc_step(fns[name]) if fns[name].step is not None else None for name in engines}
        ctimes = {name: [] for name in engines}
        ctokens = {}
        for _ in range(a.rounds):
            for name in engines:
                if steppers[name] is not None:
                    decode_cached(steppers[name], prompt, 2)  # warm-up
                    ctokens[name], t = decode_cached(steppers[name], prompt, a.new_tokens)
                    ctimes[name] += t
        for name in engines:
            fn = fns[name]
            fn(prompt)  # warm-up
            toks, times = decode(fn, prompt, a.new_tokens)
            tokens[name] = toks
            step = statistics.median(times)
            if steppers[name] is not None:
                cached = 1 / statistics.median(ctimes[name])
                if ctokens[name] != toks:
                    print(f"# {name}: cached decode produced other tokens than re-running the prefix")
            else:
                cached = float("nan")
            if name == "float":
                float_cached = cached
            pre = median_time(fn, long_ids, a.reps)
            try:
                single = median_time(fn, one, 20)
            except Exception as err:  # the traced graph may not accept 1-token inputs
                print(f"# {name}: 1-token forward failed: {type(err).__name__}: {err}")
                single = float("nan")
            rows.append({
                "engine": labels[name], "threads": n, "decode tok/s (KV cache)": cached,
                "vs float (KV cache)": cached / float_cached if "float" in engines else float("nan"),
                "decode tok/s (no cache)": 1 / step,
                "prefill tok/s": long_ids.shape[1] / pre, "1-token forward ms": single * 1e3,
                "same tokens as reference": "" if name == "reference" or "reference" not in tokens
                else ("yes" if toks == tokens["reference"] else
                      f"no ({sum(x == y for x, y in zip(toks, tokens['reference']))}/{len(toks)})"),
            })
            print(table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    try:
        load_after = os.getloadavg()
    except OSError:
        load_after = (float("nan"),) * 3
    body = table(rows, COLUMNS)
    plen = prompt.shape[1]
    note = (
        f"SmolLM2-135M-Instruct compiled with {what}: {manifest.size.counted_bytes / 1e6:.2f}"
        f" MB, {manifest.size.bits_per_weight:.3f} bits per weight, of which kernels/ {kern.get('bytes', 0):,} bytes "
        f"(x86 kernel plans: {', '.join(sorted(plans))}). Compile {compile_s:.1f} s; x86 lower (repack + kernel "
        f"fetch) {lower_s:.1f} s.\n\n"
        f"Decode: greedy, {a.new_tokens} new tokens after a {plen}-token prompt, tok/s = 1 / median step time. "
        f"KV cache: float = the transformers model with its DynamicCache; xbitc = the artifact's compiled decode step "
        f"(step.json: one token over explicit key/value tensors, x86: one row-lane gemv call per matrix); prefill not timed; engines "
        f"take turns for {a.rounds} rounds and the median is over all rounds' steps (OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')} for every engine). No cache: "
        f"every step re-runs the whole prefix, a forward of {plen}..{plen + a.new_tokens - 1} tokens (x86: the gemm "
        f"kernel). Prefill: one forward of {long_ids.shape[1]} tokens, "
        f"median of {a.reps}. 1-token forward: one single-token forward of the main graph, median of 20. "
        f"Threads: torch.set_num_threads(n) and the x86 pool, same n; all engines in one process, in turn. "
        f"Load average (1/5/15 min) {load_avg[0]:.2f}/{load_avg[1]:.2f}/{load_avg[2]:.2f} before, "
        f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after: the machine is shared (another "
        f"benchmark may hold a core), so 2-thread rows in particular are not clean scaling numbers."
    )
    print("\n" + body)
    if not a.no_append:
        cmd = "python bench/e2e.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
        append(f"End to end: SmolLM2-135M, {short}, float vs reference vs x86", note + "\n\n" + body,
               cmd.strip())


if __name__ == "__main__":
    main()
