"""`make demo`: compile SmolLM2-135M at 4.5 bits per weight (embeddings included) and report size and quality."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see xbitc/cli.py

from xbitc import frontend, models  # noqa: E402
from xbitc.calibration import PACKAGE_TEXT, token_stream  # noqa: E402
from xbitc.driver import CompileOptions, compile_model  # noqa: E402
from xbitc.evaluate import score  # noqa: E402
from xbitc.runtime import load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bpw", type=float, default=4.5)
    ap.add_argument("--backend", default="reference", help="backend the artifact is compiled for (reference: portable)")
    ap.add_argument("-o", "--output", default="out/smollm2-135m.xbitc")
    a = ap.parse_args()
    t0 = time.perf_counter()
    model = frontend.load(str(models.smollm2_gguf()))
    opts = CompileOptions(bpw=a.bpw, backend=a.backend, quantize_embeddings=True)
    manifest = compile_model(model, Path(a.output), opts)
    compile_s = time.perf_counter() - t0
    compiled = load(a.output)
    ids = token_stream(model.tokenizer, (PACKAGE_TEXT / "eval.txt").read_text())
    window = 512
    base = score(model.module, ids, window)
    got = score(compiled, ids, window, reference=model.module)
    s = manifest.size
    print()
    print(f"SmolLM2-135M-Instruct -> {a.output}  (compiled for {a.backend} in {compile_s:.0f} s, "
          f"run on {compiled.backend_name})")
    print(f"  artifact size        {s.counted_bytes / 1e6:.2f} MB (float32 source {4 * manifest.source.param_count / 1e6:.0f} MB)")
    print(f"  bits per weight      {s.bits_per_weight:.3f} whole model (target {a.bpw}), {s.linear_bits_per_weight:.3f} linears only")
    print(f"  perplexity           {got.perplexity:.2f} (float {base.perplexity:.2f}) on {got.tokens} tokens of xbitc/data/eval.txt")
    print(f"  KL to float          {got.kl:.4f} nats/token; top-1 agreement {got.top1_agree:.3f}")
    print(f"  sample               {compiled.generate('The capital of France is', 12)!r}")


if __name__ == "__main__":
    main()
