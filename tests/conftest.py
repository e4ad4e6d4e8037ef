import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the kernel cache and its signing key: the tests' own, kept between runs (compiling kernels takes time) but apart
# from the user's, whose entries a test key could never vouch for (children inherit both)
_STATE = os.path.join(os.path.expanduser("~"), ".cache", "xbitc-tests")
os.environ.setdefault("XBITC_CACHE_DIR", os.path.join(_STATE, "kernels"))
os.environ.setdefault("XBITC_KEY_FILE", os.path.join(_STATE, "kernel-cache.key"))
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
# tests run in `make test`'s pytest-xdist workers: each takes its share of the cores, so torch's threads do not
# outnumber them (OpenMP threads spinning for a core slow every worker)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_SHARE = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_SHARE)
if _WORKERS > 1:  # the packed linears' pool too (children inherit it)
    os.environ.setdefault("XBITC_NUM_THREADS", str(_SHARE))


class TinyLM(torch.nn.Module):
    """A small language-model-shaped network: embedding, two residual MLP blocks, tied output layer."""

    def __init__(self, vocab: int = 96, dim: int = 64, hidden: int = 160, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.up = torch.nn.ModuleList([torch.nn.Linear(dim, hidden) for _ in range(2)])
        self.down = torch.nn.ModuleList([torch.nn.Linear(hidden, dim) for _ in range(2)])
        self.norm = torch.nn.LayerNorm(dim)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.2
        self.example_inputs = (torch.randint(0, vocab, (2, 12), generator=g),)

    def forward(self, ids):
        h = self.emb(ids)
        for up, down in zip(self.up, self.down):
            h = h + down(torch.nn.functional.gelu(up(h)))
        return torch.nn.functional.linear(self.norm(h), self.emb.weight)


def tiny_lm():
    m = TinyLM()
    return m, m.example_inputs


@pytest.fixture
def tiny():
    return tiny_lm()


def word_tokenizer():
    """A 64-word tokenizer made here, so `xbitc run` and `eval` can read text without a hub."""
    import transformers as t
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "hello", "world", "hi"] + [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return t.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def tiny_llama_artifact(out, bits: int, group: int):
    """A random-weight one-layer Llama with its cached decode step (graph.json and step.json) and a tokenizer,
    compiled uniformly to `out`."""
    import transformers as t

    from xbitc import frontend
    from xbitc.driver import CompileOptions, compile_model

    torch.manual_seed(0)
    cfg = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    loaded = frontend.wrap_hf(t.LlamaForCausalLM(cfg), word_tokenizer(), "llama", "0")
    compile_model(loaded, out, CompileOptions(log=lambda s: None, progress=False, bits=bits, group=group))
    assert (out / "step.json").exists()
    return out


# Mesa's lavapipe (the WebGPU adapter here) loads its own libLLVM into the process, after which llvmlite's MCJIT
# aborts while finalizing kernels (seen in test_x86_backend after test_webgpu): the WebGPU tests run last.
GPU_MODULES = ("test_gpu_emit.py", "test_webgpu.py", "test_gpu_kernels.py", "test_webgpu_export.py")


def peak_above(fn) -> float:
    """Bytes the process's peak resident size rose above its size before `fn` ran (Linux: the peak is reset first)."""
    status = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024  # noqa: E731
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.fspath.basename in GPU_MODULES)  # stable: the rest keep their order
