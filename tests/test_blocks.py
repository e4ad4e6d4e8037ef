"""The block structure of traced graphs (xbitc.ir.blocks): prologue, repeated layers, head; run one after another
they execute exactly the graph's ops in its order, so the outputs are bit-identical to running the whole graph."""
import pytest
import torch

from test_equivalence import build, inputs_for
from xbitc import frontend
from xbitc.ir.blocks import find_blocks, layer_of, run_block, run_blocks
from xbitc.ir.graph import Op
from xbitc.ir.interp import Interpreter
from xbitc.passes.base import PassContext
from xbitc.passes.canonicalize import Canonicalize

transformers = pytest.importorskip("transformers")


def traced(module: torch.nn.Module, loaded=None):
    loaded = loaded or frontend.wrap_hf(module, None, "m", "m")
    return loaded, Canonicalize().run(frontend.trace(loaded, step=False), PassContext(log=lambda s: None))


def check_partition(graph, found):
    """Every node is in exactly one block, in the graph's order; every parameter is read by some block."""
    order = [n for b in found.blocks for n in b.nodes]
    assert order == [n.name for n in graph.nodes if n.op is not Op.PARAM]
    assert set(graph.params) == {p for b in found.blocks for p in b.params}


@pytest.mark.parametrize("arch", ["gpt2", "bert", *(pytest.param(a, marks=pytest.mark.slow)
                                                    for a in ("llama", "vit", "neox", "qwen2", "mistral", "phi3"))])
def test_blocks_run_equals_graph(arch):
    loaded, g = traced(build(arch))
    found = find_blocks(g)
    assert [b.kind for b in found.blocks] == ["prologue", "layer", "layer", "head"], found.note
    check_partition(g, found)
    for b in found.layers:  # a layer reads only its own parameters, and its stream first
        assert all(layer_of(p, found.prefix) == b.index for p in b.params)
        assert b.inputs[0] in found.blocks[b.index].outputs  # what the block before it made
    assert not any(layer_of(p, found.prefix) is not None for p in found.blocks[0].params + found.blocks[-1].params)
    interp = Interpreter(g)
    for batch, seq in [(1, 5), (3, 17)]:
        x = inputs_for(loaded.kind, batch, seq)
        assert torch.equal(run_blocks(found, *x), interp(*x))


def test_one_block_from_saved_inputs():
    """A Llama: block i runs alone from its inputs as saved while running the blocks before it (three layers: two cuts
    between layers, which must fall at the same place)."""
    t = transformers
    model = t.LlamaForCausalLM(t.LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=300))
    loaded, g = traced(model)
    found = find_blocks(g)
    assert len(found.layers) == 3
    assert len({len(b.nodes) for b in found.layers}) == 1
    x = inputs_for("causal-lm", 2, 9)
    env = dict(zip(found.blocks[0].inputs, x))
    saved = []
    for b in found.blocks[:-1]:
        saved.append({k: env[k].clone() if isinstance(env[k], torch.Tensor) else env[k] for k in b.inputs})
        env.update(zip(b.outputs, run_block(b, env)))
    second = found.blocks[2]
    again = run_block(second, saved[2])
    assert all(torch.equal(a, env[name]) for a, name in zip(again, second.outputs))
    assert torch.equal(run_block(found.blocks[-1], env), loaded.module(*x))
    assert torch.equal(run_blocks(found, *x), Interpreter(g)(*x))


class Residual(torch.nn.Module):
    def __init__(self, acts):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 16), a) for a in acts)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x) + x
        return x


@pytest.mark.parametrize("acts,blocks", [
    ((torch.nn.ReLU(), torch.nn.ReLU(), torch.nn.ReLU()), ["prologue", "layer", "layer", "layer", "head"]),
    ((torch.nn.ReLU(), torch.nn.Tanh()), ["whole"]),  # layers.0 and layers.1 differ: not repeated
    ((torch.nn.ReLU(),), ["whole"]),  # one layer is no repetition
])
def test_plain_modules(acts, blocks):
    torch.manual_seed(0)
    loaded, g = traced(None, frontend.from_module(Residual(acts), (torch.randn(2, 16),)))
    found = find_blocks(g)
    assert [b.kind for b in found.blocks] == blocks, found.note
    check_partition(g, found)
    x = torch.randn(3, 16)
    assert torch.equal(run_blocks(found, x), Interpreter(g)(x))


def test_no_layer_names_one_block():
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    loaded, g = traced(None, frontend.from_module(mlp, (torch.randn(2, 16),)))
    found = find_blocks(g)
    assert [b.kind for b in found.blocks] == ["whole"] and "no parameter name holds a layer index" in found.note


@pytest.mark.slow
def test_unlike_layers_one_block():
    """T5's first layer also computes the relative position bias the others reuse: not one repeated sequence."""
    loaded, g = traced(build("t5"))
    found = find_blocks(g)
    assert len(found.blocks) == 1 and "layer 1" in found.note
    check_partition(g, found)
    x = inputs_for(loaded.kind, 2, 6)
    assert torch.equal(run_blocks(found, *x), Interpreter(g)(*x))
