"""AArch64 packed-product kernels on paper: retired instructions per packed weight, counted under qemu, per depth,
activation strategy and level (there is no ARM hardware here).

    python bench/arm_instructions.py [--rows 256] [--cols 2048] [--group 128] [--batch 8] [--no-append]

Method.
* The kernels are the AArch64 objects `xbitc export --target aarch64` links (LLVM renderer, every level of the
  target table), called by tests/native/kernels.c on one matrix of `rows x cols` at one depth (groups of `group`
  columns, one record per group), one token: gemv for f32 activations, the q8 kernel for int8 ones. Prefill rows:
  the q8 kernel on `batch` tokens in one call (depths 2, 3, 4), instructions per weight divided by the tokens.
* qemu-aarch64 -cpu max runs it with `-d in_asm,nochain,exec`: every executed translation block is logged with its
  guest address, and the translated code with its instructions; instructions retired inside `xbitc_rows_*` =
  sum over executed blocks of their instruction count (Debian's qemu 7.2 ships no TCG plugins to count directly).
  This counts instructions, not time: qemu has no cache or pipeline model.
* Bytes per weight: the record buffer the kernel reads (codes, float16 scales and uint8 zero points) / weights, once
  per call whatever the tokens; instructions per byte: all tokens' instructions / those bytes.
* llama.cpp: its NEON dot products `ggml_vec_dot_q4_0_q8_0`, `_q4_K_q8_K`, `_q3_K_q8_K` (ggml-cpu/arch/arm/quants.c of
  the llama.cpp bench/llamacpp.py fetches, cross-compiled with -O3 -march=armv8.2-a+dotprod+fp16: llama.cpp's own
  build for a dotprod core), called by bench/native/ggml_dot.c row by row over the same matrix, counted the same way
  (activation quantization not counted, as for xbitc's f32 rows; xbitc's q8 rows include theirs).
* Compute-bound estimate for a Cortex-A76-class core: a kernel is compute-bound when instructions per weight /
  (IPC x clock) exceeds bytes per weight / bandwidth, i.e. above IPC x clock / bandwidth instructions per byte read;
  assumed 2.4 GHz, IPC 3 on this code and 15 GB/s for one core: 0.48 instructions per byte (assumptions, not
  measurements).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import append, table  # noqa: E402

from xbitc.backends.cpu.targets import AARCH64  # noqa: E402
from xbitc.backends.llvm.rowlane import pack  # noqa: E402
from xbitc.native import build  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "native" / "kernels.c"
CLOCK, IPC, BANDWIDTH = 2.4e9, 3.0, 15e9  # the Cortex-A76-class assumptions of the docstring
COLUMNS = ["level", "act", "bits", "tokens", "instructions / weight / token", "bytes / weight", "instructions / byte",
           "A76 estimate"]
PREFILL_BITS = (2, 3, 4)


def harness(work: Path) -> Path:
    objects, _ = build.kernel_objects(work / "obj", AARCH64)
    (work / "kernel_levels.h").write_text("#define LEVELS(X) " + " ".join(f"X({lv.suffix})" for lv in AARCH64.levels)
                                          + "\n")
    exe = work / "kernels"
    cc, _ = build.toolchain(AARCH64)
    subprocess.run([cc, "-std=c11", "-O2", "-static", f"-I{work}", f"-I{build.HERE / 'src'}", str(HARNESS),
                    *map(str, objects), "-lm", "-o", str(exe)], check=True)
    return exe


def case_file(path: Path, act: int, bits: int, rows: int, cols: int, group: int, batch: int = 1) -> int:
    """One matrix at one depth and `batch` tokens as the harness reads it; the record buffer's bytes."""
    rng = np.random.default_rng(bits)
    records = [(rng.integers(0, 1 << bits, (rows, group), dtype=np.uint8), np.full(rows, 0.01, np.float16),
                np.zeros(rows, np.uint8), g * group, bits) for g in range(cols // group)]
    buf, tab = pack(records, rows, "q8" if act else "f32")
    tab = tab.copy()
    tab[:, 2:5] -= buf.ctypes.data
    x = rng.standard_normal((batch, cols)).astype("<f4")
    head = np.array([1, act, rows, cols, len(records), batch, 0, buf.nbytes], dtype="<i8")
    path.write_bytes(head.tobytes() + tab.astype("<i8").tobytes() + buf.tobytes() + b"\0" * (-buf.nbytes % 8)
                     + x.tobytes())
    return int(buf.nbytes)


GGML_TYPES = {"q4_0": 18 / 32, "q4_K": 144 / 256, "q3_K": 110 / 256}  # bytes per weight of each block format


def ggml_harness(work: Path) -> Path | None:
    """bench/native/ggml_dot.c linked with llama.cpp's AArch64 quants.c, or None without llama.cpp's source."""
    import llamacpp

    src = llamacpp.cache_dir() / f"llama_cpp_python-{llamacpp.VERSION}" / "vendor" / "llama.cpp" / "ggml"
    if not src.exists():
        print(f"# no llama.cpp source at {src} (run python bench/llamacpp.py once): its rows are left out")
        return None
    cc, _ = build.toolchain(AARCH64)
    obj, exe = work / "quants.o", work / "ggml_dot"
    subprocess.run([cc, "-std=c11", "-O3", "-march=armv8.2-a+dotprod+fp16", "-D_GNU_SOURCE", f"-I{src / 'include'}",
                    f"-I{src / 'src'}", f"-I{src / 'src' / 'ggml-cpu'}", "-c",
                    str(src / "src" / "ggml-cpu" / "arch" / "arm" / "quants.c"), "-o", str(obj)], check=True)
    subprocess.run([cc, "-std=c11", "-O2", "-static", str(Path(__file__).parent / "native" / "ggml_dot.c"), str(obj),
                    "-lm", "-o", str(exe)], check=True)
    return exe


def count(cmd: list[str], work: Path, prefix: str) -> int:
    """Instructions retired inside functions whose names start with `prefix`, running `cmd` under qemu."""
    log = work / "qemu.log"
    subprocess.run(["qemu-aarch64", "-cpu", "max", "-d", "in_asm,nochain,exec", "-D", str(log), *cmd], check=True,
                   capture_output=True)
    text = log.read_text(errors="replace")
    sizes = {}
    for block in text.split("\nIN: ")[1:]:  # translated blocks: their start address and instruction count
        addrs = re.findall(r"^0x([0-9a-f]+):", block, re.M)
        if addrs:
            sizes[int(addrs[0], 16)] = len(addrs)
    executed = defaultdict(int)
    for m in re.finditer(r"^Trace \d+: 0x[0-9a-f]+ \[[0-9a-f]+/([0-9a-f]+)/[^\]]*\] (\S+)", text, re.M):
        if m.group(2).startswith(prefix):
            executed[int(m.group(1), 16)] += 1
    return sum(n * sizes.get(pc, 0) for pc, n in executed.items())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="tokens of the prefill rows")
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="xbitc-arm-icount-"))
    exe = harness(work)
    weights = a.rows * a.cols
    rows = []
    cases = [(act, bits, 1) for act in (0, 1) for bits in range(1, 9)] + [(1, bits, a.batch) for bits in PREFILL_BITS]
    for act, bits, batch in cases:
        nbytes = case_file(work / "case", act, bits, a.rows, a.cols, a.group, batch)
        for lv in AARCH64.levels:
            n = count([str(exe), lv.suffix, str(work / "case"), str(work / "out")], work, "xbitc_rows_")
            per_w, per_b = n / weights / batch, nbytes / weights
            bound = "compute" if per_w * batch / (CLOCK * IPC) > per_b / BANDWIDTH else "memory"
            rows.append({"level": lv.suffix, "act": "q8" if act else "f32", "bits": bits, "tokens": batch,
                         "instructions / weight / token": per_w, "bytes / weight": per_b,
                         "instructions / byte": per_w * batch / per_b, "A76 estimate": bound})
            print(table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    ggml = ggml_harness(work)
    for name, per_b in GGML_TYPES.items() if ggml is not None else ():
        per_w = count([str(ggml), name, str(a.rows), str(a.cols)], work, "ggml_vec_dot_") / weights
        bound = "compute" if per_w / (CLOCK * IPC) > per_b / BANDWIDTH else "memory"
        rows.append({"level": "llama.cpp (dotprod build)", "act": "q8", "bits": name, "tokens": 1,
                     "instructions / weight / token": per_w,
                     "bytes / weight": per_b, "instructions / byte": per_w / per_b, "A76 estimate": bound})
        print(table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    body = table(rows, COLUMNS)
    note = (f"Matrix {a.rows} x {a.cols}, groups of {a.group}, one token (q8 prefill rows: {a.batch} tokens in one "
            f"call, per token); qemu-aarch64 -cpu max, instructions retired "
            f"in xbitc_rows_* counted from -d in_asm,nochain,exec. A76 estimate: compute-bound when instructions / "
            f"(IPC {IPC:g} x {CLOCK / 1e9:g} GHz) exceed bytes / {BANDWIDTH / 1e9:g} GB/s (assumed, not measured).")
    print("\n" + note + "\n\n" + body)
    if not a.no_append:
        append("AArch64 kernels on paper: instructions per packed weight", note + "\n\n" + body,
               "python bench/arm_instructions.py " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
