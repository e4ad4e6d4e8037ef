"""The interpreter's output for a traced model equals the original nn.Module's (item 3 of the foundation issue).

Tolerance: max |interp - module| <= 1e-4 * max |module|. The interpreter runs the same aten operators on the same
float32 data, so results are normally bit-identical; the bound leaves room for kernels whose reduction order may
depend on tensor strides.
"""
import pytest
import torch

from xbitc import frontend, models
from xbitc.ir.interp import Interpreter
from xbitc.ir.verify import verify
from xbitc.passes.base import PassContext
from xbitc.passes.canonicalize import Canonicalize

transformers = pytest.importorskip("transformers")

SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4)
VOCAB = 300


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    t = transformers
    if arch == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128))
    if arch == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**SMALL, num_key_value_heads=2, vocab_size=VOCAB))
    if arch == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**SMALL, num_key_value_heads=2, vocab_size=VOCAB))
    if arch == "bert":
        return t.BertModel(t.BertConfig(**SMALL, vocab_size=VOCAB))
    if arch == "vit":
        return t.ViTModel(t.ViTConfig(**SMALL, image_size=32, patch_size=8))
    if arch == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**SMALL, num_key_value_heads=2, vocab_size=VOCAB, sliding_window=16))
    if arch == "phi3":
        return t.Phi3ForCausalLM(t.Phi3Config(**SMALL, num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0))
    if arch == "neox":
        return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**SMALL, vocab_size=VOCAB))
    if arch == "t5":  # the encoder: relative position buckets, an unscaled attention with a float bias
        return t.T5EncoderModel(t.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=VOCAB))
    raise ValueError(arch)


def inputs_for(kind: str, batch: int, seq: int) -> tuple:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    if kind == "vision":
        return (torch.randn(batch, 3, 32, 32, generator=g),)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    if kind == "encoder":
        mask = torch.ones_like(ids)
        mask[-1, seq // 2 :] = 0  # padding in the last sequence exercises the attention mask
        return ids, mask
    return (ids,)


def assert_equivalent(loaded: frontend.LoadedModel, shapes) -> None:
    g = Canonicalize().run(frontend.trace(loaded), PassContext(log=lambda s: None))
    verify(g)
    interp = Interpreter(g)
    for batch, seq in shapes:
        x = inputs_for(loaded.kind, batch, seq)
        with torch.no_grad():
            ref = loaded.module(*x)
        out = interp(*x)
        assert out.shape == ref.shape
        assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "bert", "vit", "t5"])
def test_random_weight_architectures(arch):
    loaded = frontend.wrap_hf(build(arch), None, arch, arch)
    # shapes other than the export example (2, 8): the graph is dynamic in batch and sequence length
    assert_equivalent(loaded, [(1, 5), (3, 17)])


@pytest.mark.slow
def test_smollm2_real_weights():
    loaded = frontend.load(str(models.smollm2_gguf()))
    assert_equivalent(loaded, [(1, 9), (2, 33)])


@pytest.mark.slow
def test_minilm_real_weights():
    loaded = frontend.load(str(models.minilm_folder()))
    assert loaded.kind == "encoder"
    assert_equivalent(loaded, [(1, 9), (2, 33)])
