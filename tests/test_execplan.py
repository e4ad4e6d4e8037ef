"""The execution plan of core graphs (ir/execplan.py), against the reference run of the same graph: every planned
value has the reference's shape and (device) element type, every reordering view's offset and strides read the
reference's elements out of its contiguous source, host numbers equal the reference's, and no two buffers alive at
once overlap in the arena. Nine model families, main graphs and decode steps, at sizes other than the traced ones."""
import pytest
import torch

from xbitc import frontend
from xbitc.ir.coregraph import run
from xbitc.ir.execplan import ALIGN, REORDER, PlanError, device_dtype, plan
from xbitc.ir.interp import materialize
from xbitc.passes.legalize import legalize

pytest.importorskip("transformers")

from test_equivalence import build, inputs_for  # noqa: E402

FAMILIES = ["bert", "gpt2", "llama", "mistral", "neox", "phi3", "qwen2", "t5", "vit"]
DEVICE = {torch.float32: "float32", torch.int64: "int32", torch.int32: "int32", torch.bool: "bool"}


def check(core, weight, xs):
    ref: dict = {}
    run(core, *xs, weight=weight, values=ref)
    p = plan(core, [(tuple(x.shape), str(x.dtype).replace("torch.", "")) for x in xs])
    for node in core.nodes:
        if node.op in ("param", "output"):
            continue
        v, want = p.values[node.name], ref[node.name]
        if not isinstance(want, torch.Tensor):
            assert v.scalar == want, node.name
            continue
        assert v.shape == tuple(want.shape) and v.dtype == DEVICE[want.dtype], (node.name, node.op, v, want.dtype)
    by_node = {n.name: n for n in core.nodes}
    for launch in p.launches:
        if launch.op in REORDER:
            src = ref[by_node[launch.node].args[0].name].contiguous().clone()  # storage offset 0
            offset, strides = launch.view
            got = torch.as_strided(src.reshape(-1), launch.out.shape, strides, offset) if src.numel() else src
            assert torch.equal(got.reshape(ref[launch.node].shape), ref[launch.node]), launch.node
    temps = [b for b in p.buffers if b.role == "temp"]
    for i, a in enumerate(temps):
        assert a.offset % ALIGN == 0 and a.offset + a.bytes <= p.arena_bytes
        for b in temps[i + 1:]:
            if a.first <= b.last and b.first <= a.last:  # alive together
                assert a.offset + a.bytes <= b.offset or b.offset + b.bytes <= a.offset
    assert p.arena_bytes <= sum(-(-b.bytes // ALIGN) * ALIGN for b in temps)
    return p


@pytest.mark.parametrize("family", FAMILIES)
def test_plans_match_the_reference_run(family):
    loaded = frontend.wrap_hf(build(family))
    g = frontend.trace(loaded, step=True)
    weight = lambda name: materialize(g.params[name])
    core = legalize(g)
    for batch, seq in ((2, 8), (1, 13)):
        p = check(core, weight, inputs_for(loaded.kind, batch, seq))
        assert p.launches and len(p.outputs) == 1
    if g.step is not None:
        step = legalize(g.step)
        cfg = loaded.module.model.config
        layers, kv = cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        for past in (0, 5):
            ids = torch.randint(0, cfg.vocab_size, (1, 1 if past else 4))
            caches = [torch.randn(1, kv, past, dim) for _ in range(2 * layers)]
            check(step, weight, [ids, *caches])


def test_reuse_keeps_the_arena_below_the_sum_of_temporaries():
    loaded = frontend.wrap_hf(build("llama"))
    g = frontend.trace(loaded, step=False)
    p = plan(legalize(g), [((1, 32), "int64")])
    total = sum(b.bytes for b in p.buffers if b.role == "temp")
    assert p.arena_bytes < total / 2  # a layer's temporaries are dead by the next layer


def test_a_missing_input_is_named():
    loaded = frontend.wrap_hf(build("bert"))
    core = legalize(frontend.trace(loaded, step=False))
    with pytest.raises(PlanError, match="the graph takes more inputs than given"):
        plan(core, [((1, 4), "int64")])
    assert device_dtype("int64") == "int32"
