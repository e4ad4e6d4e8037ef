"""What compiling costs, run alone; appends its table to BENCHMARKS.md.

Default: SmolLM2-135M at 3.0 bits per weight with the accuracy bench's protocol. One `xbitc compile` (learned
allocation, GPTQ, tune; 64 calibration windows of 512 tokens from wikitext2-valid) in a fresh process: wall time,
peak resident memory (the process's VmHWM), and the time of every pass from the artifact's manifest. Targets: at
most 10 minutes and 4 GB on 2 cores.

`--scale`: how the block-wise compile (`--bits 3 --method gptq`, xbitc.streaming; with `--pipeline learned`,
`--bpw 3 --method gptq --tune-steps 0`: learned allocation too; `--pipeline tuned`: `--bpw 3 --method gptq`, the
default tuning as well) grows with the model. Random-weight
Llamas (xbitc.synthetic: float16 safetensors shards written into a temporary folder) of the sizes given, from a
SmolLM2-135M-shaped one up, each compiled with the same calibration tokens (16 windows of 256 random ids): wall
time and seconds per billion parameters, peak memory beside the compile's own estimate and the target (1.5 GB plus
twice the largest block's float16 weights). `--source gguf`: the same models written as Q8_0 GGUF files and compiled
under `--max-memory` (their estimate), the path that streams a GGUF file.

    python bench/cost.py [--bpw 3.0] [--repeat 1]
    python bench/cost.py --scale 0.135,0.5,1.5,3 [--pipeline learned|tuned] [--source gguf]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append, require_shared, run_cli_measured, table  # noqa: E402
from xbitc import models, streaming, synthetic  # noqa: E402
from xbitc.driver import CompileOptions, build_passes, default_pipeline  # noqa: E402
from xbitc.runtime import load  # noqa: E402

COLUMNS = ["run", "wall s", "peak GB", "bpw (whole)", "allocate s", "quantize s", "tune s", "other s"]


# billions of parameters -> Llama shape (layers, hidden, intermediate, heads, kv heads, vocab, tied embeddings)
SHAPES = {
    "0.135": (30, 576, 1536, 9, 3, 49152, True),  # SmolLM2-135M's shape
    "0.5": (24, 1280, 3456, 16, 4, 32000, False),
    "1.5": (30, 2048, 5632, 16, 4, 32000, False),
    "3": (40, 2560, 6912, 20, 4, 32000, False),
}
SCALE_COLUMNS = ["model", "params", "shape (layers x hidden x ffn)", "wall s", "s per B params", "peak GB",
                 "estimate GB", "target GB", "bpw (whole)"]


PIPELINES = {  # --pipeline: the block-wise compiles measured by --scale
    "bits": ["--bits", "3", "--method", "gptq"],  # uniform GPTQ
    "learned": ["--bpw", "3", "--method", "gptq", "--tune-steps", "0"],  # learned allocation (blockwise), GPTQ
    "tuned": ["--bpw", "3", "--method", "gptq"],  # and the default tuning (24 steps, activations spilled)
}
OPTIONS = {"bits": dict(bits=3), "learned": dict(bpw=3.0, tune_steps=0), "tuned": dict(bpw=3.0)}


def scale(sizes: list[str], pipeline: str = "bits", source: str = "folder") -> None:
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        sys.exit(f"--scale {','.join(unknown)}: sizes are {', '.join(SHAPES)} (billions of parameters)")
    rows = []
    for size in sizes:
        layers, hidden, ffn, heads, kv, vocab, tie = SHAPES[size]
        cfg = synthetic.llama_config(layers, hidden, ffn, vocab=vocab, heads=heads, kv_heads=kv, tie=tie)
        with tempfile.TemporaryDirectory(prefix="xbitc-cost-") as tmp:
            folder, art = Path(tmp) / "hf", Path(tmp) / "out.xbitc"
            if source == "gguf":  # Q8_0, as llama.cpp's converter writes it
                folder = Path(tmp) / "model.gguf"
                params = synthetic.write_llama_gguf(folder, cfg)
            else:
                params = synthetic.write_llama(folder, cfg)
            shapes = synthetic.llama_shapes(cfg)
            block = max(2 * sum(torch.Size(v).numel() for k, v in shapes.items() if k.startswith("model.layers.0.")),
                        2 * sum(torch.Size(v).numel() for k, v in shapes.items() if not k.startswith("model.layers.")))
            args = [*PIPELINES[pipeline], "--calib-windows", "16", "--calib-len", "256"]
            passes = build_passes(default_pipeline(CompileOptions(method="gptq", **OPTIONS[pipeline])))
            estimate = sum(streaming.estimate_source(folder, 16, 256, passes).values())
            if source == "gguf":  # a GGUF file streams under a bound (without one it loads whole)
                args += ["--max-memory", str(estimate)]
            seconds, peak_gib, _ = run_cli_measured(["compile", str(folder), "-o", str(art), *args])
            rows.append({"model": f"random Llama {size}B", "params": f"{params / 1e9:.3f}B",
                         "shape (layers x hidden x ffn)": f"{layers} x {hidden} x {ffn}", "wall s": seconds,
                         "s per B params": seconds / (params / 1e9), "peak GB": peak_gib * 2**30 / 1e9,
                         "estimate GB": estimate / 1e9, "target GB": 1.5 + 2 * block / 1e9,
                         "bpw (whole)": load(art).manifest.size.bits_per_weight})
        print(table(rows[-1:], SCALE_COLUMNS).splitlines()[-1], flush=True)
    body = table(rows, SCALE_COLUMNS)
    print("\n" + body)
    what = {"bits": "GPTQ", "learned": "learned allocation's sensitivities (xbitc.alloc.blockwise), then GPTQ",
            "tuned": "learned allocation's sensitivities (xbitc.alloc.blockwise), then GPTQ, then 24 tune steps (the "
                     "model end to end, its saved activations in the scratch file)"}
    model = "MODEL.gguf" if source == "gguf" else "FOLDER"
    bound = " --max-memory ESTIMATE" if source == "gguf" else ""
    made = ("random-weight Llamas written as Q8_0 GGUF files (q/k permuted as llama.cpp's converter does), each "
            "tensor dequantized when read; " if source == "gguf" else "random-weight float16 Llamas; ")
    note = (f"Block-wise compile (`xbitc compile {model} {' '.join(PIPELINES[pipeline])} --calib-windows 16 "
            f"--calib-len 256{bound}`: {what[pipeline]} a layer block at a time, weights read from the files as "
            f"needed) of {made}"
            "wall = the whole process (load, trace, calibrate, quantize, write); peak = its VmHWM (1 GB = 1e9 bytes); "
            "estimate = what `--max-memory` checks against before work starts; target = 1.5 GB + 2x the largest "
            "block's float16 weights (a layer, or the embeddings and output layer).")
    title = {"bits": "block-wise GPTQ", "learned": "block-wise learned allocation and GPTQ",
             "tuned": "block-wise learned allocation, GPTQ and tune"}[pipeline]
    append(f"Compile cost by model size ({title}{', GGUF' if source == 'gguf' else ''})", note + "\n\n" + body,
           f"python bench/cost.py --scale {','.join(sizes)} --pipeline {pipeline} --source {source}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpw", default="3.0")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--scale", help="comma-separated model sizes in billions of parameters: " + ", ".join(SHAPES))
    ap.add_argument("--pipeline", choices=sorted(PIPELINES), default="bits",
                    help="with --scale: uniform --bits 3, or learned allocation --bpw 3 (no tuning)")
    ap.add_argument("--source", choices=["folder", "gguf"], default="folder",
                    help="with --scale: write each model as a Hugging Face safetensors folder or a Q8_0 GGUF file")
    a = ap.parse_args()
    if a.scale:
        return scale(a.scale.split(","), a.pipeline, a.source)
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
