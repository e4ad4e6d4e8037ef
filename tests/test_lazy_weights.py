"""Lazy weights (xbitc.lazy): a Hugging Face safetensors folder loads and traces without reading its tensors; each
graph parameter reads its tensor from the shard when asked, equal to what the eager loader (transformers'
from_pretrained) gives, and the traced graph computes what the eager loader's computes."""
import subprocess
import sys
import textwrap

import pytest
import torch

from xbitc import frontend, lazy, stepgraph, synthetic
from xbitc.ir.interp import Interpreter

transformers = pytest.importorskip("transformers")


def saved(tmp_path, arch: str):
    torch.manual_seed(0)
    t = transformers
    if arch == "llama":  # untied, several shards
        model = t.LlamaForCausalLM(t.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300))
    else:  # tied output layer: one checkpoint tensor under two parameter names
        model = t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64))
    model.to(torch.float16).save_pretrained(tmp_path, max_shard_size="100KB")
    return tmp_path


@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_lazy_graph_equals_eager(tmp_path, arch):
    folder = saved(tmp_path, arch)
    assert len(list(folder.glob("*.safetensors"))) > 1
    eager = frontend.trace(frontend.load(str(folder)), step=False)
    loaded = frontend.load(str(folder), lazy=True)
    assert loaded.lazy is not None and all(p.is_meta for p in loaded.module.parameters())
    graph = frontend.trace(loaded)
    assert sorted(k for k in graph.params if not k.startswith("step.")) == sorted(eager.params)  # step: its own
    handles = [v for v in graph.params.values() if isinstance(v, lazy.LazyWeight)]
    assert len(handles) == sum(1 for v in loaded.module.parameters())  # every weight (tied: once) is a handle
    x = torch.randint(0, 300, (2, 7))
    assert torch.equal(Interpreter(graph)(x), Interpreter(eager)(x))
    # the decode step reads the same handles; over an empty cache it gives the full forward's logits
    assert graph.step is not None and graph.step.params is graph.params
    logits = Interpreter(graph.step)(x, *stepgraph.empty_cache(graph.step, batch=2))[0]
    torch.testing.assert_close(logits, Interpreter(eager)(x), rtol=1e-5, atol=1e-5)
    lazy.materialize(graph)
    assert all(torch.equal(graph.params[k], eager.params[k]) for k in eager.params)


def test_unmapped_checkpoint_loads_eagerly(tmp_path):
    """A parameter the checkpoint does not hold under its own name: the lazy binding gives up (the eager loader
    then does what transformers does) instead of leaving a weight unbound."""
    folder = saved(tmp_path, "llama")
    weights = lazy.checkpoint(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    with lazy.meta_parameters():
        model = transformers.LlamaForCausalLM(config)
    assert lazy.bind(model, weights) is not None
    del weights["model.layers.1.mlp.up_proj.weight"]
    assert lazy.bind(model, weights) is None


PEAK = textwrap.dedent("""
    import sys
    from xbitc import frontend, lazy
    import transformers  # imported before the baseline: its import is not the loader's memory

    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

    before = status("VmRSS:")
    graph = frontend.trace(frontend.load(sys.argv[1], lazy=True))
    assert lazy.is_lazy(graph) and graph.step is not None
    print(status("VmHWM:") - before, sum(v.numel() for v in graph.params.values() if isinstance(v, lazy.LazyWeight)))
""")


def grown_by_loading(tmp_path, hidden: int, vocab: int) -> tuple[int, int, int]:
    """(bytes the peak grew by loading + tracing, parameters traced, parameters written) for a 4-layer Llama."""
    folder = tmp_path / f"h{hidden}"
    cfg = synthetic.llama_config(layers=4, hidden=hidden, intermediate=4 * hidden, vocab=vocab, heads=16, kv_heads=4)
    count = synthetic.write_llama(folder, cfg, shard_bytes=100 << 20)
    out = subprocess.run([sys.executable, "-c", PEAK, str(folder)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    grown, params = map(int, out.stdout.split()[-2:])
    return grown, params, count


@pytest.mark.slow
def test_lazy_load_and_trace_memory(tmp_path):
    """Loading and tracing a 126M-parameter Llama (253 MB float16, 505 MB float32, 3 shards) costs no more memory
    than a 0.3M-parameter one of the same structure (tracing's own ~160 MB), within 5% of its float32 size."""
    big, params, count = grown_by_loading(tmp_path, 1024, 32000)
    small, _, _ = grown_by_loading(tmp_path, 64, 300)
    assert params == count
    assert big - small < 0.05 * 4 * count, f"{big / 1e6:.0f} MB against {small / 1e6:.0f} MB"
