"""ir/pycode.py: the compiled form of a graph computes exactly what the interpreter computes (same ops in the same
order on the same tensors, so bit-identical), and nothing from a graph file can inject code."""
import pytest
import torch

from conftest import tiny_lm
from xbitc import frontend
from xbitc.ir.graph import Graph, Node, Op, Ref
from xbitc.ir.interp import Interpreter
from xbitc.ir.pycode import compile_interpreter
from xbitc.passes.base import PassContext
from xbitc.passes.canonicalize import Canonicalize

transformers = pytest.importorskip("transformers")
from test_equivalence import build, inputs_for  # noqa: E402


@pytest.mark.parametrize("arch", ["tiny", "llama", "gpt2", "bert", "vit"])
def test_compiled_graph_is_bit_identical_to_the_interpreter(arch):
    if arch == "tiny":
        m, x = tiny_lm()
        loaded = frontend._from_module(m, x, "tiny", "0")
    else:
        loaded = frontend.wrap_hf(build(arch), None, arch, arch)
    g = Canonicalize().run(frontend.trace(loaded), PassContext(log=lambda s: None))
    interp = Interpreter(g)
    run = compile_interpreter(interp)
    for batch, seq in [(1, 5), (2, 9)]:
        x = loaded.example_inputs if arch == "tiny" else inputs_for(loaded.kind, batch, seq)
        assert torch.equal(run(*x), interp.run(*x))
    if g.step is not None:
        step = Interpreter(g.step)
        from xbitc.stepgraph import empty_cache
        ids = torch.randint(0, 300, (1, 4))
        a, b = compile_interpreter(step)(ids, *empty_cache(g.step)), step.run(ids, *empty_cache(g.step))
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_keyword_names_cannot_inject_code():
    """A crafted graph.json may name a keyword argument anything; it must reach the op as data, never as source."""
    g = Graph(nodes=[
        Node("x", Op.INPUT),
        Node("y", Op.TORCH_OP, args=(Ref("x"),), kwargs={"dim=0), __import__('os').system('false'), (1": -1},
             attrs={"target": "aten.softmax.int"}),
        Node("out", Op.OUTPUT, args=(Ref("y"),)),
    ])
    run = compile_interpreter(Interpreter(g))
    assert "__import__" not in run.source.replace("K[", "")  # only a constant-table reference in the source
    with pytest.raises((TypeError, RuntimeError)):  # the op receives the odd keyword as data and rejects it
        run(torch.randn(3))
