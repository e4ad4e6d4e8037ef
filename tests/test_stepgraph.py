"""The cached decode step (xbitc.stepgraph): prefill with empty caches plus one-token steps reproduce the main graph's
logits, before and after compilation, on every backend; the artifact counts step.json.

Tolerance: the step computes the same network as the main graph but attends over cached keys/values of different
length, so reductions (softmax, matmul over the key axis) run over differently shaped tensors: float32 results differ
by summation order only, ~sqrt(P) * 2^-24 relative. We allow 1e-4 of the logit scale (as the equivalence tests do);
a wrong position (rotary off by one) or a wrong mask moves logits by O(1) of their scale.
"""
import json

import pytest
import torch

from xbitc import frontend, runtime
from xbitc.driver import CompileOptions, compile_model
from xbitc.ir.interp import Interpreter
from xbitc.stepgraph import empty_cache

transformers = pytest.importorskip("transformers")
from test_equivalence import VOCAB, build  # noqa: E402


def close(a, b):
    return float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_step_graph_matches_full_forward(arch):
    loaded = frontend.wrap_hf(build(arch), None, arch, arch)
    graph = frontend.trace(loaded)
    assert graph.step is not None and graph.step.params is graph.params
    full = Interpreter(graph)
    step = Interpreter(graph.step)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    want = full(ids)
    logits, *past = step(ids[:, :5], *empty_cache(graph.step, 2))  # prefill 5 tokens
    assert close(logits, want[:, :5])
    for t in range(5, 9):  # then one token at a time over the caches
        logits, *past = step(ids[:, t : t + 1], *past)
        assert close(logits[:, 0], want[:, t]), t
    assert past[0].shape[2] == 9


def test_compiled_artifact_decodes_with_the_cache_on_every_backend(tmp_path):
    loaded = frontend.wrap_hf(build("llama"), None, "llama", "llama")
    out = tmp_path / "m.xbitc"
    m = compile_model(loaded, out, CompileOptions(bits=4, group=32, log=lambda s: None, progress=False))
    files = json.loads((out / "manifest.json").read_text())["size"]["files"]
    assert files["step.json"] == (out / "step.json").stat().st_size  # counted like graph.json
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    for backend in ("reference", "x86"):
        model = runtime.load(out, backend=backend)
        assert model.step is not None
        cached = model.generate_ids(ids, 8)
        rerun = model.generate_ids(ids, 8, use_cache=False)
        assert cached == rerun
        logits, *past = model.step(ids, *empty_cache(model.graph.step))
        assert close(logits, model(ids))
    assert m.size.bits_per_weight > 0


def test_allocation_predicts_the_artifact_bytes_with_the_step_graph(tmp_path, monkeypatch):
    """allocate's exact-size model counts step.json and the pipeline's pass records: its last prediction equals the
    bytes written up to the digits of the figures it cannot know yet, and the budget is never exceeded."""
    import xbitc.passes.allocate as allocate

    predicted = []
    real = allocate.artifact_bytes
    monkeypatch.setattr(allocate, "artifact_bytes", lambda *a, **k: predicted.append(real(*a, **k)) or predicted[-1])
    loaded = frontend.wrap_hf(build("llama"), None, "llama", "llama")
    out = tmp_path / "b.xbitc"
    m = compile_model(loaded, out, CompileOptions(bpw=12.0, quantize_embeddings=True, calib="self", calib_windows=2,
                                                  calib_len=16, log=lambda s: None, progress=False))
    assert (out / "step.json").exists()
    # placeholders (durations, sizes, the plan summary) are written at their longest: the prediction errs one way
    # (the plan summary's numbers at their longest: measured 235 bytes on 2026-12-05)
    assert 0 <= predicted[-1] - m.size.counted_bytes <= 320
    assert m.size.bits_per_weight <= 12.0


def test_self_calibration_samples_through_the_cache_as_through_the_whole_prefix():
    """--calib self on a Hugging Face causal LM: sampling with the model's key/value cache (one token per step)
    draws the same sequences as re-running the prefix (same generator; the logits agree to float rounding, so the
    same uniform draws pick the same tokens), at a fraction of the work."""
    from xbitc import calibration

    loaded = frontend.wrap_hf(build("llama"), None, "llama", "llama")
    vocab = loaded.module.model.config.vocab_size
    cached = calibration.self_windows(loaded.module, vocab, None, n=3, length=12, seed=5)
    rerun = calibration.self_windows(lambda ids: loaded.module(ids), vocab, None, n=3, length=12, seed=5)
    assert len(cached) == 3 and cached[0][0].shape == (1, 12)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(cached, rerun))
    assert len({tuple(w[0][0].tolist()) for w in cached}) == 3  # sampled, not one sequence repeated
