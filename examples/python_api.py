"""The Python API end to end: compile a model under a size budget, load the artifact, run it, compare, inspect.

    python examples/python_api.py [--bpw 4.5] [--out /tmp/tiny.xbitc]

The model is a random-weight Llama built from a config (nothing is downloaded), so its float outputs are nearly
flat and the quality figures say how faithfully the artifact reproduces them, not how good a language model it is.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: leaves the cores to xbitc's kernel threads

import torch
import transformers

from xbitc import frontend, runtime
from xbitc.driver import CompileOptions, compile_model
from xbitc.evaluate import score
from xbitc.inspect import report

VOCAB = 512


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB)
    return transformers.LlamaForCausalLM(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpw", type=float, default=4.5, help="whole-model budget, bits per weight")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="xbitc-example-")) / "tiny.xbitc")
    args = ap.parse_args()

    model = tiny_llama()
    # wrap_hf gives the tensor-in, tensor-out view xbitc traces (ids -> logits); a path or "module:function" works too
    loaded = frontend.wrap_hf(model, source="tiny-llama (random weights)", source_hash="tiny-llama-seed0")
    # At this size the embedding and output layer are most of the weights: the budget must cover them too.
    # A few tuning steps instead of the default 24 keep the example quick on two cores.
    opts = CompileOptions(bpw=args.bpw, quantize_embeddings=True, tune_steps=8, calib_windows=8, progress=False)
    manifest = compile_model(loaded, args.out, opts)

    compiled = runtime.load(args.out)  # the host's executing backend (x86 kernels on x86-64), hashes checked
    oracle = runtime.load(args.out, backend="reference")  # dequantizes once and runs torch: the semantics
    ids = torch.randint(0, VOCAB, (1, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    got = compiled(ids)
    signal = float(want.pow(2).mean().sqrt())
    print(f"executing backend: {compiled.backend_name}")
    print(f"max abs error vs float: {float((got - want).abs().max()):.4f} (float logits max abs {float(want.abs().max()):.4f})")
    print(f"relative rms error vs float: {float((got - want).pow(2).mean().sqrt()) / signal:.4f}")
    print(f"max abs difference vs reference backend: {float((got - oracle(ids)).abs().max()):.3e}")
    scores = score(compiled, ids[0], window=64, reference=lambda w: model(input_ids=w).logits, progress=False)
    with torch.no_grad():  # the same windows score() used: what a uniform guess loses, a yardstick for the KL
        logp = model(input_ids=ids.view(-1, 64)).logits[:, :-1].log_softmax(-1)
    uniform = float((logp.exp() * logp).sum(-1).mean()) + torch.log(torch.tensor(float(VOCAB))).item()
    print(f"kl to float: {scores.kl:.5f} nats/token (a uniform guess: {uniform:.5f}); "
          f"top-1 agreement {scores.top1_agree:.3f}")
    print(f"greedy continuation (KV cache): {compiled.generate_ids(ids[:, :8], max_new_tokens=6)}")

    on_disk = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file() and "tokenizer" not in f.parts)
    print(f"bits per weight: {manifest.size.bits_per_weight:.4f} (target {args.bpw})")
    print(f"bytes on disk: {on_disk}")
    print(report(args.out))  # what `xbitc inspect` prints


if __name__ == "__main__":
    main()
