"""What compiling costs: SmolLM2-135M at 3.0 bits per weight, the accuracy bench's protocol, run alone.

One `xbitc compile` (learned allocation, GPTQ, tune; 64 calibration windows of 512 tokens from wikitext2-valid) in a
fresh process: wall time, peak resident memory (the process's VmHWM), and the time of every pass from the artifact's
manifest. Targets (issue 4): at most 10 minutes and 4 GB on 2 cores. Run it on an otherwise idle machine; appends
the table to BENCHMARKS.md.

    python bench/cost.py [--bpw 3.0] [--repeat 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append, require_shared, run_cli_measured, table  # noqa: E402
from xbitc import models  # noqa: E402
from xbitc.runtime import load  # noqa: E402

COLUMNS = ["run", "wall s", "peak GB", "bpw (whole)", "allocate s", "quantize s", "tune s", "other s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpw", default="3.0")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    calib = require_shared("wikitext2-valid.tokens")
    args = ["--bpw", a.bpw, "--method", "gptq", "--quantize-embeddings", "--calib", str(calib),
            "--calib-windows", "64", "--calib-len", "512"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="xbitc-cost-") as tmp:
        for i in range(a.repeat):
            art = Path(tmp) / f"run{i}.xbitc"
            seconds, peak_gib, _ = run_cli_measured(["compile", str(models.smollm2_gguf()), "-o", str(art), *args])
            m = load(art).manifest
            by_pass = {p["pass"].split("{")[0]: p.get("seconds", 0.0) for p in m.passes}
            passes = sum(by_pass.values())
            rows.append({"run": i + 1, "wall s": seconds, "peak GB": peak_gib * 2**30 / 1e9,
                         "bpw (whole)": m.size.bits_per_weight, "allocate s": by_pass.get("allocate", 0.0),
                         "quantize s": by_pass.get("quantize", 0.0), "tune s": by_pass.get("tune", 0.0),
                         "other s": seconds - passes + sum(v for k, v in by_pass.items()
                                                           if k not in ("allocate", "quantize", "tune"))})
            print(table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    if len(rows) > 1:
        rows.append({"run": "median", **{c: statistics.median(r[c] for r in rows) for c in COLUMNS[1:]}})
    body = table(rows, COLUMNS)
    print("\n" + body)
    note = (f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) compiled to {a.bpw} bpw: learned allocation (kl), GPTQ "
            "with per-column depths, tune (default steps), pack; calibration 64 windows of 512 tokens from "
            "wikitext2-valid. wall = the whole `xbitc compile` process (load, trace, passes, write); peak = its VmHWM "
            "(1 GB = 1e9 bytes). other = loading, tracing, calibration tokenizing, pack and writing. "
            "Targets: <= 600 s and <= 4 GB.")
    append(f"Compile cost: SmolLM2-135M at {a.bpw} bpw", note + "\n\n" + body, f"python bench/cost.py --bpw {a.bpw}")


if __name__ == "__main__":
    main()
