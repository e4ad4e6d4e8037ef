"""The core op set and the legalize pass: every model family xbitc traces lowers to core ops only, and the core
graph, run by the ops' reference implementations, computes exactly what the traced graph computes (the same torch
kernels on the same values: equality, not a tolerance), at sizes other than the traced ones."""
import re

import pytest
import torch

from xbitc import frontend
from xbitc.ir.core import CORE_OPS, shape_operand
from xbitc.ir.coregraph import run
from xbitc.ir.interp import Interpreter, materialize
from xbitc.passes.legalize import LegalizeError, legalize, recognise_mask

t = pytest.importorskip("transformers")

from test_equivalence import VOCAB, build, inputs_for  # noqa: E402

FAMILIES = ["bert", "gpt2", "llama", "mistral", "neox", "phi3", "qwen2", "t5", "vit"]


@pytest.mark.parametrize("family", FAMILIES)
def test_families_lower_to_core_ops_and_compute_the_same(family):
    loaded = frontend.wrap_hf(build(family))
    g = frontend.trace(loaded, step=False)
    core = legalize(g)
    assert core.ops() <= set(CORE_OPS) | {"input", "param", "output"}
    weight = lambda name: materialize(g.params[name])
    for batch, seq in ((2, 8), (1, 13), (3, 21)):  # 21: past Mistral's 16-token window
        xs = inputs_for(loaded.kind, batch, seq)  # encoders: padding in the last sequence
        assert torch.equal(run(core, *xs, weight=weight), Interpreter(g)(*xs)), (batch, seq)
    attention = [n for n in core.nodes if n.op == "attention"]
    assert len(attention) == 2
    if family == "mistral":
        assert all(n.attrs["causal"] and n.attrs["window"] == 16 for n in attention)
    elif family in ("bert", "vit"):
        assert not any(n.attrs["causal"] for n in attention)
    elif family == "t5":  # unscaled, the float mask adds the relative position bias (computed at run time)
        assert all(not n.attrs["causal"] and n.attrs["scale"] == 1.0 and n.args[3] is not None for n in attention)
        assert {"embed", "log", "minimum", "gather"} <= core.ops()
    else:
        assert all(n.attrs["causal"] and n.attrs["window"] == 0 and n.args[3] is None for n in attention)


def test_a_packed_artifact_lowers_too(tmp_path):
    from xbitc import artifact, runtime
    from xbitc.driver import CompileOptions, compile_model

    loaded = frontend.wrap_hf(build("llama"))
    out = tmp_path / "l.xbitc"
    compile_model(loaded, out, CompileOptions(bits=4, group=32, log=lambda s: None, progress=False))
    g, _ = artifact.load_graph(out)
    core = legalize(g)
    assert {n.args[1].name for n in core.nodes if n.op == "linear"}  # packed weights are read by name
    ids = torch.randint(0, VOCAB, (2, 11))
    weights = {}
    got = run(core, ids, weight=lambda n: weights.setdefault(n, materialize(g.params[n])))
    assert torch.equal(got, runtime.load(out, backend="reference")(ids))


def test_nodes_without_a_lowering_are_named_with_their_source():
    """RoBERTa numbers positions by a cumulative sum over its non-padding tokens: cumsum is no core op."""
    torch.manual_seed(0)
    cfg = t.RobertaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          vocab_size=VOCAB)
    g = frontend.trace(frontend.wrap_hf(t.RobertaModel(cfg)), step=False)
    with pytest.raises(LegalizeError) as err:
        legalize(g)
    nodes = {n: (op, src) for n, op, src in err.value.unsupported}
    assert any(op.startswith("aten.") for op, _ in nodes.values())
    assert all(re.search(r"modeling_roberta\.py:\d+$", src) for _, src in nodes.values()), nodes


class MaskNet(torch.nn.Module):
    """Attention over a mask made from sizes alone, as models build their causal masks."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        s = x.shape[1]
        q = torch.arange(s).unsqueeze(-1)
        k = torch.arange(s).unsqueeze(0)
        mask = {"causal": k <= q, "anti": k >= q, "window": (k <= q) & (k > q - 5)}[self.kind]
        h = x.unsqueeze(1)
        return torch.nn.functional.scaled_dot_product_attention(h, h, h, attn_mask=mask)


@pytest.mark.parametrize("kind, window", [("causal", 0), ("window", 5), ("anti", None)])
def test_masks_are_recognised_by_what_they_compute(kind, window):
    """Recognition evaluates the mask at sizes past every candidate window; a static sequence length, where windows
    cannot be told apart, is never recognised (tested by the step graphs above, whose caches vary)."""
    from xbitc.ir.fuse import simplify

    x = torch.randn(2, 7, 4)
    loaded = frontend.LoadedModel(MaskNet(kind), (x,), "generic", kind, "0", dynamic_dims={0: ("batch", "seq")})
    g = simplify(frontend.trace(loaded, step=False))
    sdpa = next(n for n in g.nodes if n.attrs.get("target") == "aten.scaled_dot_product_attention.default")
    assert recognise_mask(sdpa.args[3].name, g) == window


SAMPLES = {
    "embed": ((torch.randint(0, 10, (2, 5)), torch.randn(10, 4)), {}),
    "linear": ((torch.randn(2, 3, 8), torch.randn(6, 8), torch.randn(6)), {}),
    "matmul": ((torch.randn(2, 1, 3, 4), torch.randn(5, 4, 7)), {}),
    "conv2d": ((torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3), None), {"stride": (2, 2), "padding": (1, 1)}),
    "rmsnorm": ((torch.randn(2, 3, 8), torch.randn(8)), {"eps": 1e-6}),
    "layernorm": ((torch.randn(2, 3, 8), torch.randn(8), torch.randn(8)), {"eps": 1e-5}),
    "rope": ((torch.randn(2, 4, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)), {}),
    "attention": ((torch.randn(2, 4, 3, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 6)),
                  {"scale": 0.3, "causal": True, "window": 4}),
    "softmax": ((torch.randn(2, 3, 8),), {"dim": -1}),
    "gelu": ((torch.randn(2, 3, 8),), {"approximate": "tanh"}),
    "pow": ((torch.randn(2, 3, 8),), {"exponent": 2}),
    "where": ((torch.randn(2, 3, 8) > 0, torch.randn(2, 3, 8), 0.0), {}),
    "mean": ((torch.randn(2, 3, 8),), {"dims": [-1], "keepdim": True}),
    "sum": ((torch.randn(2, 3, 8),), {"dims": [0, 2], "keepdim": False}),
    "reshape": ((torch.randn(2, 3, 8), [3, -1]), {}),
    "expand": ((torch.randn(1, 3, 1), [4, -1, 5]), {}),
    "transpose": ((torch.randn(2, 3, 8),), {"dim0": 0, "dim1": 2}),
    "permute": ((torch.randn(2, 3, 8),), {"dims": [2, 0, 1]}),
    "unsqueeze": ((torch.randn(2, 3, 8),), {"dim": -1}),
    "squeeze": ((torch.randn(2, 1, 3),), {"dim": 1}),
    "slice": ((torch.randn(2, 3, 8), 1, 100), {"dim": 2, "step": 2}),
    "select": ((torch.randn(2, 3, 8),), {"dim": 1, "index": 2}),
    "concat": (([torch.randn(2, 3, 8), torch.randn(2, 2, 8), torch.empty(0)],), {"dim": 1}),
    "cast": ((torch.randn(2, 3, 8),), {"dtype": "float16"}),
    "arange": ((5,), {"dtype": "int64"}),
    "full": (([2, 3],), {"value": 1.5, "dtype": "float32"}),
    "gather": ((torch.randn(3, 6), torch.randint(0, 6, (3, 4))), {"dim": 1}),
    "dim": ((torch.randn(2, 3, 8),), {"axis": 1}),
}


@pytest.mark.parametrize("name", sorted(CORE_OPS))
def test_every_shape_rule_agrees_with_its_reference(name):
    op = CORE_OPS[name]
    x = torch.randn(2, 3, 8)
    if name in SAMPLES:
        args, attrs = SAMPLES[name]
    elif name.startswith("scalar_"):
        args, attrs = (7, 2), {}
    elif name in ("logical_and", "logical_or"):
        args, attrs = (x > 0, x < 1), {}
    elif op.operands == "a, b":
        args, attrs = (x, torch.randn(3, 1)), {}
    else:
        args, attrs = (x > 0 if name == "logical_not" else x.abs() + 0.1,), {}
    out = op.reference(*args, **attrs)
    want = op.shape(*(shape_operand(a) for a in args), **attrs)
    assert want == (tuple(out.shape) if isinstance(out, torch.Tensor) else None)


@pytest.mark.parametrize("scalar", [1.5, 2, True])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.bool])
def test_scalar_operands_follow_torch_promotion(scalar, dtype):
    x = torch.arange(4).to(dtype)
    for name in ("add", "mul", "eq", "maximum"):
        fn = getattr(torch, name)
        try:
            want = fn(x, torch.tensor(scalar)) if name == "maximum" else fn(x, scalar)
        except RuntimeError:
            continue  # torch refuses the combination (e.g. bool arithmetic): nothing to match
        got = CORE_OPS[name].reference(x, scalar)
        if name != "maximum":
            assert got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_decode_steps_with_a_kv_cache_lower_too(family):
    """The cached decode step (prefill from empty caches, then one token at a time) lowers like the main graph."""
    from xbitc.stepgraph import empty_cache

    step = frontend.trace(frontend.wrap_hf(build(family))).step
    core = legalize(step)
    weight = lambda name: materialize(step.params[name])
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    want, got = Interpreter(step)(ids, *empty_cache(step, 2)), run(core, ids, *empty_cache(step, 2), weight=weight)
    for _ in range(12):  # past Mistral's 16-token window
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        ids = torch.randint(0, VOCAB, (2, 1), generator=gen)
        want, got = Interpreter(step)(ids, *want[1:]), run(core, ids, *got[1:], weight=weight)


def test_a_mask_over_a_static_length_is_not_guessed():
    """With the sequence fixed at 7 a window of 5 and one of 7 or more give the same mask: nothing is recognised."""
    from xbitc.ir.fuse import simplify

    x = torch.randn(2, 7, 4)
    g = simplify(frontend.trace(frontend._from_module(MaskNet("window"), (x,), "w", "0"), step=False))
    sdpa = next(n for n in g.nodes if n.attrs.get("target") == "aten.scaled_dot_product_attention.default")
    assert recognise_mask(sdpa.args[3].name, g) is None


def test_the_documented_table_is_the_code():
    from pathlib import Path

    from xbitc.ir.core import markdown

    doc = Path(__file__).parent.parent / "docs" / "core-ops.md"
    assert doc.read_text() == markdown(), "regenerate: python -m xbitc.ir.core > docs/core-ops.md"
