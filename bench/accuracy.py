"""Accuracy of compressed SmolLM2-135M on WikiText-2: the yardstick every method is judged by.

Protocol: the first 16,384 tokens of ../shared/data/wikitext2-test.raw (joined, tokenized once), scored in
non-overlapping windows of 1,024 tokens; calibration 64 random windows of 512 tokens from wikitext2-valid.tokens
(seed 0). Every row is compiled by `xbitc compile` in a fresh process and evaluated by loading the written artifact
with the runtime, so the table measures what users get. Appends the table to BENCHMARKS.md.

    python bench/accuracy.py            # full protocol (about 45 minutes on 2 cores)
    python bench/accuracy.py --quick    # 4,096 tokens, 16 calibration windows of 256: for iteration
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import append, require_shared, run_cli_measured, table  # noqa: E402

from xbitc import frontend, models  # noqa: E402
from xbitc.calibration import token_stream  # noqa: E402
from xbitc.evaluate import windows  # noqa: E402
from xbitc.runtime import load  # noqa: E402

ROWS = {  # name -> xbitc compile arguments
    "RTN 4-bit g128": ["--bits", "4", "--group", "128", "--method", "rtn", "--no-clip"],
    "RTN 3-bit g128": ["--bits", "3", "--group", "128", "--method", "rtn", "--no-clip"],
    "RTN 2-bit g128": ["--bits", "2", "--group", "128", "--method", "rtn", "--no-clip"],
    "GPTQ 4-bit g128": ["--bits", "4", "--group", "128", "--method", "gptq", "--no-clip"],
    "GPTQ 3-bit g128": ["--bits", "3", "--group", "128", "--method", "gptq", "--no-clip"],
    "GPTQ 3-bit per-channel": ["--bits", "3", "--group", "0", "--method", "gptq", "--no-clip"],
    "GPTQ 2-bit g128": ["--bits", "2", "--group", "128", "--method", "gptq", "--no-clip"],
    # learned allocation: whole-model budgets with everything counted, embeddings and output layer included
    **{f"xbitc {b} bpw": ["--bpw", b, "--method", "gptq", "--quantize-embeddings"] for b in ("4.0", "3.5", "3.0", "2.5", "2.0")},
    # equal file size with the GPTQ g128 rows above (embeddings float16; whole-model bpw as measured for those rows)
    **{f"xbitc {b} bpw (= GPTQ {k}-bit size)": ["--bpw", b, "--method", "gptq", "--quantize-embeddings"]
       for k, b in ((2, "5.129"), (3, "5.921"), (4, "6.719"))},
}
COLUMNS = ["method", "ppl", "KL", "top1 agree", "top1 acc", "recovery", "bpw (whole)", "bpw (linears)", "MB", "compile s", "peak GiB"]


@torch.no_grad()
def evaluate(logits_fn, wins, ref_logp=None) -> dict:
    nll = kl = agree = correct = 0.0
    n = 0
    for i, w in enumerate(wins):
        logp = F.log_softmax(logits_fn(w)[0, :-1].float(), -1)
        target = w[0, 1:]
        nll += float(F.nll_loss(logp, target, reduction="sum"))
        correct += float((logp.argmax(-1) == target).sum())
        if ref_logp is not None:
            r = ref_logp[i]
            kl += float((r.exp() * (r - logp)).sum())
            agree += float((r.argmax(-1) == logp.argmax(-1)).sum())
        n += len(target)
    out = {"ppl": math.exp(nll / n), "top1 acc": correct / n}
    if ref_logp is not None:
        out.update({"KL": kl / n, "top1 agree": agree / n})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", help="comma-separated subset of row names")
    ap.add_argument("--keep", help="folder to keep the compiled artifacts in")
    ap.add_argument("--reuse", action="store_true", help="with --keep: evaluate an artifact already there instead of "
                    "compiling it again (compile s = the manifest's pass times; peak memory unknown)")
    a = ap.parse_args()
    test = require_shared("wikitext2-test.raw")
    calib = require_shared("wikitext2-valid.tokens")
    tokens = 4096 if a.quick else 16384
    calib_args = ["--calib", str(calib), "--calib-windows", "16" if a.quick else "64", "--calib-len", "256" if a.quick else "512"]
    gguf = str(models.smollm2_gguf())
    model = frontend.load(gguf)
    ids = token_stream(model.tokenizer, test.read_text(encoding="utf-8"))
    wins = windows(ids, 1024, tokens)
    with torch.no_grad():
        ref_logp = [F.log_softmax(model.module(w)[0, :-1].float(), -1) for w in wins]
    rows = [{"method": "float32", **evaluate(model.module, wins, ref_logp), "bpw (whole)": 32.0, "recovery": 1.0}]
    print(table(rows, COLUMNS), flush=True)
    names = a.rows.split(",") if a.rows else list(ROWS)
    out_dir = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="xbitc-acc-"))
    stopped = None
    try:
        for name in names:
            art = out_dir / (name.replace(" ", "_") + ".xbitc")
            if a.reuse and (art / "manifest.json").exists():
                compiled = load(art)
                seconds, peak = sum(p.get("seconds", 0) for p in compiled.manifest.passes), float("nan")
            else:
                seconds, peak, _ = run_cli_measured(["compile", gguf, "-o", str(art), *ROWS[name], *calib_args])
                compiled = load(art)
            s = compiled.manifest.size
            r = evaluate(compiled, wins, ref_logp)
            rows.append({
                "method": name, **r, "recovery": r["top1 acc"] / rows[0]["top1 acc"], "bpw (whole)": s.bits_per_weight,
                "bpw (linears)": s.linear_bits_per_weight, "MB": s.counted_bytes / 1e6, "compile s": seconds,
                "peak GiB": peak,
            })
            print(table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    except (KeyboardInterrupt, Exception) as err:  # keep what was measured: a long run stopped late still counts
        stopped = f"{type(err).__name__} before rows {', '.join(names[len(rows) - 1:])!r}"
        print(f"# stopped: {stopped}", flush=True)
    body = table(rows, COLUMNS)
    note = (
        f"SmolLM2-135M-Instruct, WikiText-2 test first {len(wins) * 1024:,} tokens, windows of 1,024; calibration "
        f"{calib_args[3]} windows of {calib_args[5]} tokens from wikitext2-valid (seed 0); embeddings and output layer "
        "kept float16 in RTN/GPTQ rows; xbitc rows quantize it too (learned allocation, objective kl, GPTQ with "
        "per-column depths, clipping searched per group). RTN/GPTQ rows use the plain full-range grid (--no-clip), as the "
        "reference implementations do. GPTQ: act-order, 1% dampening; float16 scale and b-bit zero point per group. "
        "recovery = top-1 accuracy / float top-1 accuracy."
    )
    if stopped:
        note += f" **Partial run**: stopped ({stopped})."
    print("\n" + body)
    append("Accuracy: SmolLM2-135M" + (" (quick)" if a.quick else "") + (" (partial)" if stopped else ""),
           note + "\n\n" + body,
           "python bench/accuracy.py" + (" --quick" if a.quick else ""))


if __name__ == "__main__":
    main()
