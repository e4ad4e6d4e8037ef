"""all-MiniLM-L6-v2 compressed to 2, 3 and 4 bits per weight: similarity of sentence embeddings to the float model.

Held-out sentences: the first 256 non-empty lines of ../shared/data/wikitext2-test.raw that are not headings,
truncated to 128 tokens; embeddings are mean-pooled over the attention mask (the model's own pooling). Calibration:
32 windows of 128 tokens from wikitext2-valid.tokens. For each depth b, RTN and GPTQ b-bit g128 are compiled with
the embedding table quantized too (everything counted), and xbitc's learned allocation is compiled at exactly the
size GPTQ reached, so rows compare at equal file size. `--budgets` measures only xbitc at the whole-model budgets
given (the accuracy climb's 2.0 / 2.5 / 3.0). Appends the table to BENCHMARKS.md.

    python bench/encoder.py [--quick]
    python bench/encoder.py --budgets 2.0,2.5,3.0
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import append, require_shared, run_cli_measured, table  # noqa: E402

from xbitc import frontend, models  # noqa: E402
from xbitc.runtime import load  # noqa: E402

COLUMNS = ["method", "bits", "cosine mean", "cosine min", "bpw (whole)", "bpw (linears)", "MB", "compile s"]


def sentences(n: int) -> list[str]:
    lines = [l.strip() for l in require_shared("wikitext2-test.raw").read_text(encoding="utf-8").splitlines()]
    return [l for l in lines if l and not l.startswith("=")][:n]


@torch.no_grad()
def embed(fn, batch) -> torch.Tensor:
    ids, mask = batch
    hidden = fn(ids, mask)
    m = mask.unsqueeze(-1).float()
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 sentences, depths 3 only")
    ap.add_argument("--budgets", help="only xbitc rows, at these comma-separated whole-model bits per weight")
    a = ap.parse_args()
    folder = str(models.minilm_folder())
    model = frontend.load(folder)
    tok = model.tokenizer
    texts = sentences(64 if a.quick else 256)
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    batches = [(enc.input_ids[i : i + 32], enc.attention_mask[i : i + 32]) for i in range(0, len(texts), 32)]
    ref = torch.cat([embed(model.module, b) for b in batches])
    calib = ["--calib", str(require_shared("wikitext2-valid.tokens")), "--calib-windows", "32", "--calib-len", "128"]
    out_dir = Path(tempfile.mkdtemp(prefix="xbitc-enc-"))
    rows = []

    def measure(name, bits, args):
        art = out_dir / f"{name.replace(' ', '_')}_{bits}.xbitc"
        seconds, _, _ = run_cli_measured(["compile", folder, "-o", str(art), "--quantize-embeddings", *args, *calib])
        c = load(art)
        cos = (torch.cat([embed(c, b) for b in batches]) * ref).sum(-1)
        s = c.manifest.size
        rows.append({"method": name, "bits": bits, "cosine mean": float(cos.mean()), "cosine min": float(cos.min()),
                     "bpw (whole)": s.bits_per_weight, "bpw (linears)": s.linear_bits_per_weight,
                     "MB": s.counted_bytes / 1e6, "compile s": seconds})
        print(table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
        return s.bits_per_weight

    for bpw in a.budgets.split(",") if a.budgets else []:
        measure("xbitc", float(bpw), ["--bpw", bpw, "--method", "gptq"])
    for bits in [] if a.budgets else [3] if a.quick else [2, 3, 4]:
        measure("RTN g128", bits, ["--bits", str(bits), "--group", "128", "--method", "rtn", "--no-clip"])
        size = measure("GPTQ g128", bits, ["--bits", str(bits), "--group", "128", "--method", "gptq", "--no-clip"])
        measure("xbitc (GPTQ's size)", bits, ["--bpw", f"{size:.4f}", "--method", "gptq"])
        measure("xbitc", bits, ["--bpw", f"{bits}.0", "--method", "gptq"])
    body = table(rows, COLUMNS)
    print("\n" + body)
    note = (f"all-MiniLM-L6-v2, {len(texts)} held-out WikiText-2 test lines (<=128 tokens), mean-pooled, cosine to the "
            "float model's embeddings; calibration 32 windows of 128 tokens from wikitext2-valid; embeddings quantized in "
            "every row; RTN/GPTQ rows use the plain full-range grid (--no-clip); xbitc = learned allocation (objective mse) "
            "+ GPTQ with per-column depths and clipping search.")
    append("Encoder: all-MiniLM-L6-v2" + (" (quick)" if a.quick else ""), note + "\n\n" + body,
           "python bench/encoder.py" + (" --quick" if a.quick else "") + (f" --budgets {a.budgets}" if a.budgets else ""))


if __name__ == "__main__":
    main()
