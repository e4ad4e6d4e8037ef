"""ir/fuse.py: the graph a Program runs computes bit for bit what the traced graph computes, with fewer ops; patterns
that differ in any detail are left alone; the traced graph itself is never changed.

Exactness: every rewrite runs the same float operations on the same values (x*(-s) for (-x)*s is exact in IEEE
arithmetic; repeat_interleave and enable_gqa move the same values), so the tests compare with torch.equal."""
import collections

import pytest
import torch

from xbitc import frontend
from xbitc.backends.base import Program
from xbitc.importer import from_exported
from xbitc.ir.fuse import simplify
from xbitc.ir.graph import Graph, Node, Op, Ref, TensorType
from xbitc.ir.interp import Interpreter
from xbitc.ir.printer import print_graph
from xbitc.ir.pycode import compile_interpreter
from xbitc.ir.verify import verify
from xbitc.passes.base import PassContext
from xbitc.passes.canonicalize import Canonicalize
from xbitc.stepgraph import empty_cache

transformers = pytest.importorskip("transformers")
from test_equivalence import VOCAB, build, inputs_for  # noqa: E402


def kinds(g: Graph) -> collections.Counter:
    return collections.Counter(n.attrs.get("kernel") or n.op.value for n in g.nodes)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):  # equal, NaN where the other is NaN
        return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def traced(arch):
    loaded = frontend.wrap_hf(build(arch), None, arch, arch)
    return loaded, Canonicalize().run(frontend.trace(loaded), PassContext(log=lambda s: None))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert", "vit"])
def test_simplified_graph_is_bit_identical(arch):
    loaded, g = traced(arch)
    before = print_graph(g)
    s = simplify(g)
    assert print_graph(g) == before  # the traced graph is untouched
    verify(s)
    assert len(s.nodes) <= len(g.nodes)
    ref, run, interp = Interpreter(g), compile_interpreter(Interpreter(s)), Interpreter(s)
    for batch, seq in [(1, 5), (2, 9)]:
        x = inputs_for(loaded.kind, batch, seq)
        want = ref.run(*x)
        assert same(run(*x), want) and same(interp.run(*x), want)
    k = kinds(s)
    if arch in ("llama", "qwen2"):  # 2 layers: 2 norms each + the final one, q and k rotated, one attention each
        assert (k["rmsnorm"], k["rope"], k["rope_sin"], k["gqa_attention"]) == (5, 4, 1, 2)
        assert len(s.nodes) < 0.7 * len(g.nodes)
    else:
        assert not {"rmsnorm", "rope", "gqa_attention", "repeat_kv"} & set(k)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_step_graph_with_caches_is_bit_identical(arch):
    _, g = traced(arch)
    step, fast = g.step, simplify(g.step)
    assert kinds(fast)["gqa_attention"] == 2 and len(fast.nodes) < 0.6 * len(step.nodes)
    ref, run = compile_interpreter(Interpreter(step)), compile_interpreter(Interpreter(fast))
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    a, *pa = ref(ids[:, :5], *empty_cache(step, 2))
    b, *pb = run(ids[:, :5], *empty_cache(step, 2))
    assert same(a, b) and same(pa, pb)
    for t in range(5, 8):
        a, *pa = ref(ids[:, t : t + 1], *pa)
        b, *pb = run(ids[:, t : t + 1], *pb)
        assert same(a, b) and same(pa, pb), t


def test_program_runs_the_simplified_graph_and_keeps_the_traced_one():
    loaded, g = traced("llama")
    nodes = list(g.nodes)
    prog = Program(g)
    assert g.nodes == nodes and prog.graph is not g and kinds(prog.graph)["rmsnorm"] == 5
    step = prog.companion(g.step)
    assert kinds(step.graph)["rope"] == 4 and step.interp._weights is prog.interp._weights
    x = inputs_for(loaded.kind, 2, 7)
    assert torch.equal(prog(*x), Interpreter(g).run(*x))


# ---------------------------------------------------------------------------------- what must not be fused


def graph_of(module, *x):
    return Canonicalize().run(from_exported(torch.export.export(module.eval(), x)), PassContext(log=lambda s: None))


class Norm(torch.nn.Module):
    """HF's LlamaRMSNorm, and variants of it that are not what Op.RMSNORM computes."""

    def __init__(self, variant="hf", dim=16):
        super().__init__()
        self.variant = variant
        self.weight = torch.nn.Parameter(torch.randn(dim))
        self.register_buffer("eps_t", torch.tensor(1e-6))

    def forward(self, x):
        v = self.variant
        if v != "on_input":  # a graph input's dtype is the caller's: not fused on one
            x = x + 1
        dtype = x.dtype
        h = x.to(torch.float32)
        var = h.pow(3 if v == "pow3" else 2).mean(0 if v == "dim0" else -1, keepdim=v != "nokeep")
        if v == "nokeep":
            var = var.unsqueeze(-1)
        r = torch.rsqrt(var + (self.eps_t if v == "tensor_eps" else 1e-6))
        h = h * r
        if v == "no_weight":
            return h.to(dtype)
        if v == "no_cast_back":
            return self.weight * h
        if v == "shared":  # an intermediate also read elsewhere
            return self.weight * h.to(dtype) + r
        return self.weight * h.to(dtype)


@pytest.mark.parametrize("variant,dtype,fused", [
    ("hf", torch.float32, True), ("hf", torch.bfloat16, True), ("no_cast_back", torch.float32, True),
    ("no_cast_back", torch.bfloat16, False), ("no_weight", torch.float32, False), ("tensor_eps", torch.float32, False),
    ("pow3", torch.float32, False), ("dim0", torch.float32, False), ("nokeep", torch.float32, False),
    ("shared", torch.float32, False), ("on_input", torch.float32, False),
])
def test_rmsnorm_is_fused_only_when_it_is_exactly_rmsnorm(variant, dtype, fused):
    x = torch.randn(3, 5, 16).to(dtype)
    g = graph_of(Norm(variant), x)
    s = simplify(g)
    assert (kinds(s)["rmsnorm"] == 1) is fused
    assert same(compile_interpreter(Interpreter(s))(x), Interpreter(g).run(x))


class Rope(torch.nn.Module):
    """HF's apply_rotary_pos_emb on one tensor, and variants that are other rotations."""

    def __init__(self, variant="hf"):
        super().__init__()
        self.variant = variant

    def forward(self, q, cos, sin):
        h = q.shape[-1] // 2
        if self.variant == "quarter":  # another split point
            h = q.shape[-1] // 4
        x1, x2 = q[..., :h], q[..., h:]
        rot = torch.cat((x2, -x1), dim=-1) if self.variant == "other_sign" else torch.cat((-x2, x1), dim=-1)
        if self.variant == "broadcast_sin":  # sin broadcast along the last dim: the sign can't move onto it
            sin = sin[..., :1]
        return q * cos + rot * sin


@pytest.mark.parametrize("variant,fused", [("hf", True), ("quarter", False), ("other_sign", False),
                                           ("broadcast_sin", False)])
def test_rope_is_fused_only_when_it_is_exactly_rotate_half(variant, fused):
    g = torch.Generator().manual_seed(0)
    q, cos, sin = (torch.randn(shape, generator=g) for shape in [(2, 4, 6, 32), (1, 1, 6, 32), (1, 1, 6, 32)])
    graph = graph_of(Rope(variant), q, cos, sin)
    s = simplify(graph)
    assert (kinds(s)["rope"] == 1) is fused
    assert same(compile_interpreter(Interpreter(s))(q, cos, sin), Interpreter(graph).run(q, cos, sin))


@pytest.mark.parametrize("batch", [1, 2])
def test_repeat_kv_falls_back_when_the_sizes_broadcast_another_axis(batch):
    """expand may also broadcast a size-1 batch (sizes say 2, k has 1): repeat_kv then runs the traced ops."""
    g = Graph(nodes=[
        Node("k", Op.INPUT, type=TensorType((1, 2, 3, 4), "float32")),
        Node("u", Op.TORCH_OP, (Ref("k"), 2), attrs={"target": "aten.unsqueeze.default"}),
        Node("e", Op.TORCH_OP, (Ref("u"), [2, 2, 3, 3, 4]), attrs={"target": "aten.expand.default"}),
        Node("r", Op.RESHAPE, (Ref("e"), [2, 6, 3, 4]), attrs={"target": "aten.reshape.default"}),
        Node("out", Op.OUTPUT, (Ref("r"),)),
    ])
    s = simplify(g)
    assert kinds(s)["repeat_kv"] == 1
    k = torch.randn(batch, 2, 3, 4)
    assert torch.equal(compile_interpreter(Interpreter(s))(k), Interpreter(g).run(k))


def test_copies_stay_when_the_graph_writes_in_place():
    """lift_fresh_copy protects a constant from an in-place op after it: it must not be dropped then."""
    g = Graph(nodes=[
        Node("c", Op.PARAM, attrs={"name": "c"}, type=TensorType((3,), "float32")),
        Node("y", Op.TORCH_OP, (Ref("c"),), attrs={"target": "aten.lift_fresh_copy.default"}),
        Node("z", Op.TORCH_OP, (Ref("y"), 1.0), attrs={"target": "aten.add_.Tensor"}),
        Node("out", Op.OUTPUT, (Ref("z"),)),
    ], params={"c": torch.zeros(3)})
    run = compile_interpreter(Interpreter(simplify(g)))
    assert torch.equal(run(), torch.ones(3)) and torch.equal(run(), torch.ones(3))
    assert torch.equal(g.params["c"], torch.zeros(3))


def test_a_dropped_copy_never_hands_out_an_input_or_a_weight():
    g = Graph(nodes=[
        Node("x", Op.INPUT, type=TensorType((2, 3), "float32")),
        Node("c", Op.PARAM, attrs={"name": "c"}, type=TensorType((0,), "float32")),
        Node("e", Op.TORCH_OP, (Ref("c"),), attrs={"target": "aten.lift_fresh_copy.default"}),
        Node("y", Op.TORCH_OP, ([Ref("e"), Ref("x")], -2), attrs={"target": "aten.cat.default"},
             type=TensorType((2, 3), "float32")),
        Node("out", Op.OUTPUT, (Ref("y"),)),
    ], params={"c": torch.zeros(0)})
    s = simplify(g)
    assert "lift_fresh_copy" not in print_graph(s)
    x = torch.randn(2, 3)
    y = compile_interpreter(Interpreter(s))(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


def test_casts_of_inputs_and_to_other_dtypes_stay():
    g = Graph(nodes=[
        Node("x", Op.INPUT, type=TensorType((2,), "float32")),
        Node("a", Op.TORCH_OP, (Ref("x"), torch.float32), attrs={"target": "aten.to.dtype"},
             type=TensorType((2,), "float32")),
        Node("b", Op.TORCH_OP, (Ref("a"), torch.float32), attrs={"target": "aten.to.dtype"},
             type=TensorType((2,), "float32")),
        Node("c", Op.TORCH_OP, (Ref("b"), torch.float16), attrs={"target": "aten.to.dtype"},
             type=TensorType((2,), "float16")),
        Node("out", Op.OUTPUT, (Ref("c"),)),
    ])
    s = simplify(g)
    assert [n.name for n in s.nodes] == ["x", "a", "c", "out"]  # only b, a float32 cast of a float32 value, goes
    x = torch.randn(2, dtype=torch.float64)  # a caller's other dtype still gets the traced cast
    assert torch.equal(Interpreter(s).run(x), Interpreter(g).run(x))
