"""Accuracy of compressed SmolLM2-135M on WikiText-2: the yardstick every method is judged by.

Protocol: the first 16,384 tokens of ../shared/data/wikitext2-test.raw (joined, tokenized once), scored in
non-overlapping windows of 1,024 tokens; calibration 64 random windows of 512 tokens from wikitext2-valid.tokens
(seed 0), the same for every calibrated row; the test text is never calibrated on. Every xbitc / RTN / GPTQ row is
compiled by `xbitc compile` in a fresh process and evaluated by loading the written artifact with the runtime, so
the table measures what users get. Appends the table to BENCHMARKS.md.

Rows (ROWS, LLAMA_ROWS; `--rows` picks some, in the order given):
* RTN / GPTQ b-bit g128 / per-channel: uniform baselines, embeddings and output layer float16, plain full-range grid.
* xbitc B bpw: learned allocation under a whole-model budget (everything counted); `(--calib self)`: the same, but
  calibrated on as many sequences of the same length sampled from the float model (data-free) instead of the text;
  `(= GPTQ k-bit size)` / `(= llama.cpp Q size)`: the budget that gives that row's file size.
* llama.cpp Q: bench/llamacpp.py's build of llama.cpp; `llama-imatrix` runs over the xbitc rows' calibration
  windows (decoded into one text that tokenizes back to exactly those tokens, one chunk per window), then
  `llama-quantize --imatrix` makes type Q from the installed GGUF (cached under ~/.cache/xbitc-bench). The GGUF is
  evaluated with transformers' GGUF reader, which dequantizes its weights to float32: the same `evaluate` as every
  row, with float activations as the xbitc artifacts run (llama.cpp's own CPU matmuls also round activations to 8
  bits, which would mix that error into the weights'). MB = the file on disk; bpw = its bits over the parameters.

Columns: ppl = exp(mean NLL); KL = mean KL(float || row) per token; top1 agree = argmax equal to the float model's;
top1 acc = argmax equal to the next token; recovery = top1 acc / float's; `ppl stories` / `KL stories`: the same on
the first 16,384 tokens of ../shared/data/tinystories-valid-excerpt.txt (out of domain: no row calibrates on it);
the float model's log-probabilities are computed once per text. compile s / peak GiB: the `xbitc compile` process
(llama.cpp rows: llama-quantize's wall time; the importance matrix's is in the note).

    python bench/accuracy.py            # full protocol, every row: hours (a compiled row 8-15 min on 2 cores)
    python bench/accuracy.py --quick    # 4,096 tokens, 16 calibration windows of 256: for iteration
    python bench/accuracy.py --keep DIR --rows 'GPTQ 3-bit g128,xbitc 3.0 bpw,llama.cpp Q4_K_M'
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import llamacpp  # noqa: E402
from common import append, require_shared, run_cli_measured, table  # noqa: E402

from xbitc import frontend, models  # noqa: E402
from xbitc.calibration import text_windows, token_stream  # noqa: E402
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
    # longer tuning (192 steps instead of 24): what --effort high buys at each budget
    **{f"xbitc {b} bpw (--effort high)": ["--bpw", b, "--method", "gptq", "--quantize-embeddings", "--effort", "high"]
       for b in ("4.0", "3.5", "3.0", "2.5", "2.0")},
    # data-free: calibrated on sequences sampled from the float model (as many and as long as the text windows)
    "xbitc 3.0 bpw (--calib self)": ["--bpw", "3.0", "--method", "gptq", "--quantize-embeddings", "--calib", "self"],
    # equal file size with the GPTQ g128 rows above (embeddings float16; whole-model bpw as measured for those rows)
    **{f"xbitc {b} bpw (= GPTQ {k}-bit size)": ["--bpw", b, "--method", "gptq", "--quantize-embeddings"]
       for k, b in ((2, "5.129"), (3, "5.921"), (4, "6.719"))},
    # equal file size with llama.cpp's rows (the GGUF file's bits over the model's parameters, as measured)
    **{f"xbitc {b} bpw (= llama.cpp {q} size)": ["--bpw", b, "--method", "gptq", "--quantize-embeddings"]
       for q, b in (("IQ1_M", "4.929"), ("IQ2_XXS", "4.985"), ("IQ2_S", "5.045"), ("IQ2_M", "5.090"),
                    ("Q2_K_S", "5.122"), ("Q3_K_M", "5.561"), ("Q4_K_M", "6.272"))},
}
# llama.cpp, quantized with an importance matrix that llama-imatrix computes on the xbitc rows' calibration windows
LLAMA_ROWS = {f"llama.cpp {q}": q for q in ("Q4_K_M", "Q3_K_M", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XXS", "IQ1_M")}
OOD = {"stories": "tinystories-valid-excerpt.txt"}  # column suffix -> out-of-domain text in ../shared/data/
COLUMNS = ["method", "ppl", "KL", "top1 agree", "top1 acc", "recovery", *(f"{m} {k}" for k in OOD for m in ("ppl", "KL")),
           "bpw (whole)", "bpw (linears)", "MB", "compile s", "peak GiB"]


def log_probs(logits_fn, w: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits_fn(w)[0, :-1].float(), -1)


@torch.no_grad()
def evaluate(logits_fn, wins, ref_logp=None) -> dict:
    """Perplexity and top-1 accuracy on `wins`; KL(reference || model) and top-1 agreement when `ref_logp` (the float
    model's log-probabilities per window) is given. `logits_fn=None` scores the reference itself."""
    nll = kl = agree = correct = 0.0
    n = 0
    for i, w in enumerate(wins):
        logp = ref_logp[i] if logits_fn is None else log_probs(logits_fn, w)
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


def scores(logits_fn, texts: dict) -> dict:
    """evaluate() on every text: the test text's columns as they are, an out-of-domain text's as 'ppl KEY', 'KL KEY'."""
    out = {}
    for key, (wins, ref) in texts.items():
        r = evaluate(logits_fn, wins, ref)
        out.update(r if not key else {f"ppl {key}": r["ppl"], f"KL {key}": r["KL"]})
    return out


def imatrix_text(tokenizer, calib: Path, n: int, length: int, out: Path) -> Path:
    """The xbitc rows' calibration windows (text_windows, same seed) decoded into one text for llama-imatrix. It
    tokenizes back to exactly those n x length tokens (checked), so llama-imatrix's chunks of `length` tokens are the
    windows themselves."""
    wins = [w[0][0] for w in text_windows(tokenizer, calib, n, length)]
    text = "".join(tokenizer.decode(w, clean_up_tokenization_spaces=False) for w in wins)
    if not torch.equal(token_stream(tokenizer, text), torch.cat(wins)):
        raise RuntimeError("the calibration windows, decoded and joined, do not tokenize back to themselves")
    out.write_text(text + "\n", encoding="utf-8")  # llama.cpp's -f drops one trailing newline
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", help="comma-separated subset of row names (default: all, in the order listed)")
    ap.add_argument("--keep", help="folder to keep the compiled artifacts in")
    ap.add_argument("--reuse", action="store_true", help="with --keep: evaluate an artifact already there instead of "
                    "compiling it again (compile s = the manifest's pass times; peak memory unknown)")
    a = ap.parse_args()
    test = require_shared("wikitext2-test.raw")
    calib = require_shared("wikitext2-valid.tokens")
    tokens = 4096 if a.quick else 16384
    n_calib, calib_len = (16, 256) if a.quick else (64, 512)
    names = a.rows.split(",") if a.rows else [*ROWS, *LLAMA_ROWS]
    unknown = [n for n in names if n not in ROWS and n not in LLAMA_ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; rows: {', '.join([*ROWS, *LLAMA_ROWS])}")
    gguf = str(models.smollm2_gguf())
    model = frontend.load(gguf)
    texts = {}  # column suffix ("" for the test text) -> (windows, float model's log-probabilities), once per text
    for key, path in {"": test, **{k: require_shared(f) for k, f in OOD.items()}}.items():
        wins = windows(token_stream(model.tokenizer, path.read_text(encoding="utf-8")), 1024, tokens)
        with torch.no_grad():
            texts[key] = (wins, [log_probs(model.module, w) for w in wins])
    rows = [{"method": "float32", **scores(None, texts), "bpw (whole)": 32.0, "recovery": 1.0}]
    print(table(rows, COLUMNS), flush=True)
    out_dir = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="xbitc-acc-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    imatrix_note = ""
    stopped = None
    try:
        for name in names:
            if name in LLAMA_ROWS:
                if not imatrix_note:
                    t0 = time.perf_counter()
                    text = imatrix_text(model.tokenizer, calib, n_calib, calib_len, out_dir / "imatrix-calib.txt")
                    imat = llamacpp.imatrix(text, calib_len, n_calib)
                    imatrix_note = (f"llama-imatrix (llama.cpp of the llama-cpp-python {llamacpp.VERSION} sdist) on "
                                    f"the same {n_calib} x {calib_len} calibration tokens, {time.perf_counter() - t0:.0f} s")
                t0 = time.perf_counter()
                path = llamacpp.quantize_imatrix(LLAMA_ROWS[name], imat)
                seconds = time.perf_counter() - t0
                quant = frontend.load(str(path))
                r = scores(quant.module, texts)
                size = path.stat().st_size
                rows.append({"method": name, **r, "recovery": r["top1 acc"] / rows[0]["top1 acc"],
                             "bpw (whole)": 8 * size / model.param_count, "MB": size / 1e6, "compile s": seconds})
                del quant
            else:
                art = out_dir / (name.replace(" ", "_") + ".xbitc")
                calib_args = [*([] if "--calib" in ROWS[name] else ["--calib", str(calib)]),
                              "--calib-windows", str(n_calib), "--calib-len", str(calib_len)]
                if a.reuse and (art / "manifest.json").exists():
                    compiled = load(art)
                    seconds, peak = sum(p.get("seconds", 0) for p in compiled.manifest.passes), float("nan")
                else:
                    seconds, peak, _ = run_cli_measured(["compile", gguf, "-o", str(art), *ROWS[name], *calib_args])
                    compiled = load(art)
                s = compiled.manifest.size
                r = scores(compiled, texts)
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
    ood = "; ".join(f"{k}: ../shared/data/{f}, first {len(texts[k][0]) * 1024:,} tokens" for k, f in OOD.items())
    note = (
        f"SmolLM2-135M-Instruct, WikiText-2 test first {len(texts[''][0]) * 1024:,} tokens, windows of 1,024; calibration "
        f"{n_calib} windows of {calib_len} tokens from wikitext2-valid (seed 0); `--calib self` rows: as many sequences "
        "of that length sampled from the float model. Out-of-domain columns (windows of 1,024, the float model's "
        f"log-probabilities computed once per text): {ood}. Embeddings and output layer "
        "kept float16 in RTN/GPTQ rows; xbitc rows quantize it too (learned allocation, objective kl, GPTQ with "
        "per-column depths, clipping searched per group). RTN/GPTQ rows use the plain full-range grid (--no-clip), as the "
        "reference implementations do. GPTQ: act-order, 1% dampening; float16 scale and b-bit zero point per group. "
        "llama.cpp rows: `llama-quantize --imatrix` of the installed Q4_1 GGUF (dequantized to the same float weights), "
        "evaluated with the weights transformers' GGUF reader dequantizes (float activations, as every row); MB = the "
        "GGUF file, bpw = its bits over the model's parameters, compile s = llama-quantize"
        + (f"; importance matrix: {imatrix_note}" if imatrix_note else "")
        + ". recovery = top-1 accuracy / float top-1 accuracy."
    )
    if stopped:
        note += f" **Partial run**: stopped ({stopped})."
    print("\n" + body)
    command = "python bench/accuracy.py" + (" --quick" if a.quick else "") + (f" --rows '{a.rows}'" if a.rows else "")
    append("Accuracy: SmolLM2-135M" + (" (quick)" if a.quick else "") + (" (partial)" if stopped else ""),
           note + "\n\n" + body, command)


if __name__ == "__main__":
    main()
