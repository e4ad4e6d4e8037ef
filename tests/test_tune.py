"""The tune pass: trains group scales and norm weights on the task cost without changing a stored bit."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import tiny_lm
from xbitc import frontend
from xbitc.driver import CompileOptions, build_passes, compile_model, default_pipeline
from xbitc.ir.interp import Interpreter
from xbitc.passes.base import PassContext, PassError, PassManager
from xbitc.passes.tune import FLOAT_PARAMS
from xbitc.quant.format import QuantizedMatrix
from xbitc.quant.rtn import rtn_any
from xbitc.quant.tune import TunableScales

CALLS = {"n": 0}


def counted_mse(outputs, reference_outputs, batch):
    CALLS["n"] += 1
    return ((outputs - reference_outputs) ** 2).mean()


def batches(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 96, (2, 24), generator=g),) for _ in range(n)]


def run(spec, calib=None):
    model, x = tiny_lm()
    graph = frontend.trace(frontend._from_module(model, x, "tiny", "0"))
    float_graph = frontend.trace(frontend._from_module(model, x, "tiny", "0"))
    ctx = PassContext(log=lambda s: None, calib_inputs=calib if calib is not None else batches())
    ctx.stats["progress"] = False
    graph = PassManager(build_passes(spec)).run(graph, ctx)
    return graph, float_graph, ctx


def kl_to_float(graph, float_graph, data):
    q, f = Interpreter(graph), Interpreter(float_graph)
    total = 0.0
    with torch.no_grad():
        for b in data:
            ref = F.log_softmax(f.run(*b), -1)
            total += float(F.kl_div(F.log_softmax(q.run(*b), -1), ref, log_target=True, reduction="batchmean"))
    return total / len(data)


PLAN = "canonicalize,plan{bits=2,group=16},quantize{method=rtn}"


def test_tune_lowers_the_cost_and_changes_only_scales_and_norms():
    plain, float_graph, _ = run(PLAN)
    tuned, _, ctx = run(PLAN + ",tune{steps=40,objective=kl,lr=0.01}")
    stats = ctx.stats["tune"]
    assert stats["kept"] and stats["loss_after"] < stats["loss_before"]
    assert stats["loss_after"] == min(stats["checks"]) and stats["checks"][0] == stats["loss_before"]
    # measured independently, on batches the pass never saw
    held = batches(4, seed=7)
    assert kl_to_float(tuned, float_graph, held) < 0.9 * kl_to_float(plain, float_graph, held)
    moved = 0
    for name, q in plain.params.items():
        if not isinstance(q, QuantizedMatrix):
            continue
        t = tuned.params[name]
        for a, b in zip(q.codes, t.codes):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(q.zeros, t.zeros):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(q.scales, t.scales):
            assert b.dtype == np.float16 and b.shape == a.shape and (b > 0).all()
            moved += int((a != b).sum())
    assert moved > 0
    assert not torch.equal(plain.params["norm.weight"], tuned.params["norm.weight"])


def test_tune_keeps_the_untuned_model_when_tuning_makes_it_worse():
    plain, _, _ = run(PLAN)
    tuned, _, ctx = run(PLAN + ",tune{steps=12,checks=6,objective=kl,lr=20}")  # a step size that can only diverge
    stats = ctx.stats["tune"]
    assert not stats["kept"]
    assert stats["steps"] == 4 and len(stats["checks"]) == 3  # two checkpoints without progress stop it early
    for name, q in plain.params.items():
        if isinstance(q, QuantizedMatrix):
            for a, b in zip(q.scales, tuned.params[name].scales):
                np.testing.assert_array_equal(a, b)
    assert torch.equal(plain.params["norm.weight"], tuned.params["norm.weight"])


def test_tune_calls_a_custom_objective():
    before = CALLS["n"]
    run(PLAN + ",tune{steps=5,checks=1,objective=test_tune:counted_mse}")
    assert CALLS["n"] - before == 5 + 2 * 2  # every step, and the before/after check on two held batches
    before = CALLS["n"]
    _, _, ctx = run(PLAN + ",tune{steps=5,checks=4,objective=test_tune:counted_mse}")
    stats = ctx.stats["tune"]
    assert CALLS["n"] - before == stats["steps"] + 2 * len(stats["checks"])
    assert len(stats["checks"]) == 1 + len({2, 4, 5} & set(range(1, stats["steps"] + 1)))  # checkpoints: steps 2, 4, 5


REFS = []


def recorded_mse(outputs, reference_outputs, batch):
    REFS.append(reference_outputs)
    return ((outputs - reference_outputs) ** 2).mean()


def test_the_float_model_runs_on_each_check_batch_once(monkeypatch):
    """The reference outputs of the held-out batches do not change between checkpoints: computed once, kept as
    float16, handed to the objective widened back to float32."""
    made, runs = [], {}  # the pass makes the reference interpreter first, then the tuned one
    real_init, real_run = Interpreter.__init__, Interpreter.run

    def recording(self, *args, **kw):
        made.append(self)
        real_init(self, *args, **kw)

    def counting(self, *inputs, **kw):
        runs[made.index(self)] = runs.get(made.index(self), 0) + 1
        return real_run(self, *inputs, **kw)

    monkeypatch.setattr(Interpreter, "__init__", recording)
    monkeypatch.setattr(Interpreter, "run", counting)
    REFS.clear()
    _, _, ctx = run(PLAN + ",tune{steps=6,checks=3,objective=test_tune:recorded_mse}")
    checks = len(ctx.stats["tune"]["checks"])
    assert checks >= 3
    steps = ctx.stats["tune"]["steps"]
    reference, tuned = (made.index(i) for i in made[-2:])
    assert runs[reference] == steps + 2  # one per step and one per check batch (not per check batch per checkpoint)
    assert runs[tuned] == steps + 2 * checks
    assert all(r.dtype == torch.float32 for r in REFS)
    held = [r for r in REFS if r.shape == REFS[-1].shape]
    # the same check batch judged at two checkpoints gets bit-identical reference outputs
    assert any(torch.equal(a, b) for i, a in enumerate(held) for b in held[i + 1 :])


def test_tune_needs_quantized_weights():
    with pytest.raises(PassError, match="requires"):
        run("canonicalize,tune{steps=2}")


def test_default_pipelines():
    assert "tune{steps=24" in default_pipeline(CompileOptions(bpw=3.0))
    assert "tune" not in default_pipeline(CompileOptions(bpw=3.0, tune_steps=0))
    assert "tune" not in default_pipeline(CompileOptions(bits=3))  # uniform: plain GPTQ/RTN, the baselines
    assert "tune{steps=5" in default_pipeline(CompileOptions(bits=3, tune_steps=5))
    with pytest.raises(PassError, match="tune-steps"):
        compile_model("x", None, CompileOptions(bpw=3.0, tune_steps=-1))
    # --effort high tunes longer, uniform pipelines too; --tune-steps still decides when given
    assert "tune{steps=192" in default_pipeline(CompileOptions(bpw=3.0, effort="high"))
    assert "tune{steps=192" in default_pipeline(CompileOptions(bits=3, effort="high"))
    assert "tune{steps=7" in default_pipeline(CompileOptions(bpw=3.0, effort="high", tune_steps=7))
    with pytest.raises(PassError, match="effort"):
        compile_model("x", None, CompileOptions(bpw=3.0, effort="max"))


@given(st.integers(1, 12), st.integers(1, 60), st.sampled_from([4, 16, 128]), st.integers(0, 50))
def test_tunable_scales_reproduce_the_matrix_and_commit_in_float16(rows, cols, group, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    depths = torch.randint(0, 9, (cols,), generator=g).numpy()  # mixed depths, drops, a permutation
    q = rtn_any(w, depths, group)
    t = TunableScales(q)
    assert torch.equal(t.weight(), q.dequantize())  # codes minus zeros are exact in float16: same arithmetic
    with torch.no_grad():
        for p in t.parameters():
            p.fill_(math.log(2.0))  # every scale doubled
    expect = 2 * q.dequantize()
    t.commit()
    assert all(s.dtype == np.float16 for s in q.scales)
    torch.testing.assert_close(q.dequantize(), expect, rtol=0, atol=0)  # doubling a float16 is exact
    assert torch.equal(t.weight(), q.dequantize())  # and tuning restarts from the committed scales


def test_tunable_scales_accept_arrays_in_any_memory_order():
    """GPTQ hands over zero points and scales as transposed (column-major) arrays."""
    g = torch.Generator().manual_seed(1)
    depths = torch.randint(1, 9, (300,), generator=g).numpy()
    q = rtn_any(torch.randn(64, 300, generator=g), depths, 128)
    expect = q.dequantize()
    q.zeros = [np.asfortranarray(z) for z in q.zeros]
    q.scales = [np.asfortranarray(s) for s in q.scales]
    t = TunableScales(q)
    assert torch.equal(t.weight(), expect)
    held = t.weight_as_stored()
    assert torch.equal(held.in_order(), expect)
    (held.stored * torch.randn(300, 64, generator=g).t()).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in t.parameters())


@given(st.integers(1, 8), st.integers(1, 40), st.sampled_from([4, 16]), st.integers(0, 50))
def test_scale_gradients_match_autograd_of_the_plain_formula(rows, cols, group, seed):
    g = torch.Generator().manual_seed(seed)
    depths = torch.randint(0, 9, (cols,), generator=g).numpy()
    q = rtn_any(torch.randn(rows, cols, generator=g), depths, group)
    t = TunableScales(q)
    assume(t.parameters())  # not every column dropped
    with torch.no_grad():
        for p in t.parameters():
            p.uniform_(-0.3, 0.3, generator=g)
    # a transposed probe: the weight gradient of a linear layer often arrives in that layout
    probe = torch.randn(cols, rows, generator=g).t()
    held = t.weight_as_stored()  # columns as stored when permuted: the same sum with the probe's columns gathered
    as_stored = held if isinstance(held, torch.Tensor) else held.stored
    probe_stored = probe if isinstance(held, torch.Tensor) else probe.index_select(1, held.columns).t().contiguous().t()
    results = []
    for w, p in ((t.weight(), probe), (as_stored, probe_stored)):
        (w * p).sum().backward()
        results.append([p.grad.clone() for p in t.parameters()])
        for p in t.parameters():
            p.grad = None
    # the same matrix written with ordinary differentiable ops
    stored = []
    for seg in t.segments:
        s = (seg.base * torch.exp(seg.log_scale)).repeat_interleave(seg.group, 1)[:, : seg.ncols]
        zero = seg.zeros.repeat_interleave(seg.group, 1)[:, : seg.ncols]
        stored.append((seg.start, (seg.codes.float() - zero) * s))
    plain = torch.zeros(rows, cols)
    for start, piece in stored:
        plain = plain.index_copy(1, t.columns[start : start + piece.shape[1]], piece)
    (plain * probe).sum().backward()
    for mine in results:
        for a, p in zip(mine, t.parameters()):
            # both sum the same float32 products, in a different order: a few ulps of the largest term
            torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-5)


def test_tune_defaults_to_output_error_for_models_that_are_not_language_models():
    from test_allocate import Parallel

    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(2, 16, 256, generator=g),) for _ in range(8)]
    held = [(torch.randn(2, 16, 256, generator=g),) for _ in range(3)]
    graphs = {}
    for spec in (PLAN, PLAN + ",tune{steps=20}"):
        model = Parallel()
        graph = frontend.trace(frontend._from_module(model, data[0], "parallel", "0"))
        ctx = PassContext(log=lambda s: None, calib_inputs=data)
        ctx.stats["progress"] = False
        graphs[spec] = PassManager(build_passes(spec)).run(graph, ctx)
    assert ctx.stats["tune"]["objective"] == "mse" and ctx.stats["tune"]["kept"]
    float_graph = frontend.trace(frontend._from_module(Parallel(), data[0], "parallel", "0"))

    def err(graph):
        with torch.no_grad():
            return sum(float(((Interpreter(graph).run(*b) - Interpreter(float_graph).run(*b)) ** 2).mean())
                       for b in held)

    assert err(graphs[PLAN + ",tune{steps=20}"]) < err(graphs[PLAN])


def test_tune_with_learned_mixed_depths_gptq_and_a_quantized_embedding(monkeypatch):
    """The default learned pipeline's shape: permuted mixed-depth segments, dropped columns, GPTQ, the tied
    embedding quantized. Tuning keeps every code, zero point and permutation and lowers the KL on unseen data."""
    from xbitc.passes.tune import Tune

    before = {}
    real_run = Tune.run

    def snapshot_then_run(self, graph, ctx):
        before.update({n: copy.deepcopy(v) for n, v in graph.params.items() if isinstance(v, QuantizedMatrix)})
        return real_run(self, graph, ctx)

    monkeypatch.setattr(Tune, "run", snapshot_then_run)
    tuned, float_graph, ctx = run("canonicalize,allocate{bpw=3,objective=kl,groups=16-0},quantize{method=gptq},"
                                  "tune{steps=30,objective=kl,lr=0.01}")
    assert ctx.stats["tune"]["kept"]
    assert FLOAT_PARAMS not in ctx.stats  # the float copies are released once used
    kinds = set()
    for name, q in before.items():
        t = tuned.params[name]
        kinds |= {s.bits for s in q.segments} | {"permuted" if q.perm is not None else "plain"}
        assert q.segments == t.segments
        assert (q.perm is None and t.perm is None) or np.array_equal(q.perm, t.perm)
        for a, b in zip(q.codes + q.zeros, t.codes + t.zeros):
            np.testing.assert_array_equal(a, b)
    assert 0 in kinds and "permuted" in kinds and "emb.weight" in before
    untuned = copy.copy(tuned)
    untuned.params = {**tuned.params, **before}
    held = batches(4, seed=9)
    assert kl_to_float(tuned, float_graph, held) < kl_to_float(untuned, float_graph, held)


def test_tune_trains_the_scales_even_when_called_under_no_grad():
    with torch.no_grad():
        plain, _, _ = run(PLAN)
        tuned, _, ctx = run(PLAN + ",tune{steps=10,objective=kl,lr=0.01}")
    assert ctx.stats["tune"]["kept"]
    assert any((a != b).any() for n, q in plain.params.items() if isinstance(q, QuantizedMatrix)
               for a, b in zip(q.scales, tuned.params[n].scales))


def test_quantize_keeps_float_weights_only_for_a_tune_pass():
    _, _, ctx = run(PLAN)
    assert FLOAT_PARAMS not in ctx.stats
    _, _, ctx = run(PLAN + ",tune{steps=0}")
    assert FLOAT_PARAMS not in ctx.stats


def test_tune_refuses_bad_options_and_packed_weights():
    with pytest.raises(PassError, match="not one of"):
        build_passes("tune{objective=klx}")
    with pytest.raises(PassError, match="option lr=0.0 of pass 'tune' is out of range: it must be > 0"):
        build_passes("tune{lr=0}")
    with pytest.raises(PassError, match="option checks=0 of pass 'tune' is out of range: it must be >= 1"):
        build_passes("tune{checks=0}")
    with pytest.raises(PassError, match="before pack"):
        run(PLAN + ",pack,tune{steps=2}")


@settings(deadline=None, max_examples=30)
@given(tokens=st.integers(1, 150), vocab=st.integers(2, 40), spread=st.floats(0.1, 20.0), seed=st.integers(0, 2**16))
def test_chunked_kl_matches_the_plain_formula_and_its_gradient(tokens, vocab, spread, seed):
    """The memory-saving KL (objectives.kl_per_token: chunks of 64 tokens, gradient softmax(logits) - softmax(ref)
    recomputed in backward) equals F.kl_div's value and autograd gradient. Both are float32 sums of at most
    vocab * tokens terms of size O(spread); the chunked one accumulates in float64, so they differ by float32
    rounding of the plain one: relative 1e-5 of the summed magnitudes."""
    from xbitc.objectives import kl_per_token

    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=g) * spread).requires_grad_(True)
    ref = torch.randn(tokens, vocab, generator=g) * spread
    plain = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean")
    (g_plain,) = torch.autograd.grad(plain * 3.0, logits)
    chunked = kl_per_token(logits, ref)
    (g_chunked,) = torch.autograd.grad(chunked * 3.0, logits)
    assert chunked.dtype == torch.float32 and chunked.shape == ()
    assert float(chunked.detach()) == pytest.approx(float(plain.detach()), rel=1e-5, abs=1e-5 * spread)
    torch.testing.assert_close(g_chunked, g_plain, rtol=1e-5, atol=1e-6 * 3.0 / tokens)


@settings(deadline=None, max_examples=25)
@given(rows=st.integers(1, 24), cols=st.integers(1, 48), lead=st.sampled_from([(), (3,), (2, 5)]), seed=st.integers(0, 99))
def test_weights_rebuilt_for_backward_give_identical_gradients_and_are_not_kept(rows, cols, lead, seed):
    """Under rebuilt_when_saved a linear layer saves a note instead of its float32 weight (1-D, 2-D and 3-D inputs:
    F.linear saves the matrix or a transposed view of it), the matrix is freed after the forward, and backward,
    which rebuilds it from the same codes and scales, gives bit-identical gradients."""
    import weakref

    from xbitc.quant.tune import rebuilt_when_saved

    g = torch.Generator().manual_seed(seed)
    depths = torch.randint(0, 9, (cols,), generator=g).numpy()
    tuner = TunableScales(rtn_any(torch.randn(rows, cols, generator=g), depths, 16))
    assume(tuner.parameters())  # every column dropped: a constant zero matrix, nothing to train or rebuild
    x = torch.randn(*lead, cols, generator=g).requires_grad_(True)  # as inside a model: then the weight is saved
    y0 = torch.randn(*lead, rows, generator=g)
    leaves = [*tuner.parameters(), x]
    plain = torch.autograd.grad((F.linear(x, tuner.weight()) * y0).sum(), leaves, allow_unused=True)
    with rebuilt_when_saved():
        w = tuner.weight()
        alive = weakref.ref(w)
        out = F.linear(x, w)
        del w
        assert alive() is None  # nothing kept the matrix for backward
        rebuilt = torch.autograd.grad((out * y0).sum(), leaves, allow_unused=True)
    for a, b in zip(plain, rebuilt):
        assert (a is None and b is None) or torch.equal(a, b)


def test_tune_is_skipped_when_the_held_out_windows_repeat_training_text():
    """Windows cut from a text shorter than all of them together overlap: the held-out ones would judge the tuning
    on text it trained on. The pass says so and leaves the quantized model as it is."""
    from xbitc.passes.tune import repeated_text

    text = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(3))
    starts = torch.randint(0, 36, (10,), generator=torch.Generator().manual_seed(4)).tolist()
    overlapping = [(text[s : s + 24].unsqueeze(0),) for s in starts]
    assert repeated_text(overlapping[:2], overlapping[2:]) > 0.5
    assert repeated_text(batches(2, seed=5), batches(8, seed=6)) == 0.0  # independent windows
    plain, _, _ = run(PLAN, calib=overlapping)
    tuned, _, ctx = run(PLAN + ",tune{steps=6,objective=kl,lr=0.01}", calib=overlapping)
    assert ctx.stats["tune"]["steps"] == 0 and "repeated" in ctx.stats["tune"]["skipped"]
    for name, q in plain.params.items():
        if isinstance(q, QuantizedMatrix):
            for a, b in zip(q.scales, tuned.params[name].scales):
                np.testing.assert_array_equal(a, b)


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 99))
def test_an_interpreter_reading_permuted_columns_computes_the_same_model_and_gradients(seed):
    """The tune pass hands the interpreter each mixed-depth matrix with its columns as stored (PermutedColumns):
    linears gather their input, the embedding its output. Outputs and scale gradients must be those of the matrices
    put back in column order; only the order of float32 additions inside the products differs."""
    from xbitc.ir.interp import PermutedColumns

    model, x = tiny_lm()
    graph = frontend.trace(frontend._from_module(model, x, "tiny", "0"))
    g = torch.Generator().manual_seed(seed)
    tuners = {}
    for name, value in graph.params.items():
        if isinstance(value, torch.Tensor) and value.ndim == 2 and value.is_floating_point():
            depths = torch.randint(0, 9, (value.shape[1],), generator=g).numpy()
            tuners[name] = TunableScales(rtn_any(value.float(), depths, 16))
    ids = torch.randint(0, 96, (2, 24), generator=g)
    results = []
    for read in ("weight", "weight_as_stored"):
        interp = Interpreter(graph, grad=True, weights={n: getattr(t, read)() for n, t in tuners.items()})
        if read == "weight_as_stored":
            assert any(isinstance(w, PermutedColumns) for w in interp._weights.values())
        out = interp.run(ids)
        leaves = [p for t in tuners.values() for p in t.parameters()]
        grads = torch.autograd.grad(out.square().sum(), leaves)
        results.append((out, grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for x1, x2 in zip(ga, gb):
        torch.testing.assert_close(x2, x1, rtol=1e-4, atol=1e-4 * float(x1.abs().max()))


def test_spilled_activations_give_the_same_gradients_and_leave_memory(tmp_path, monkeypatch):
    """rebuilt_when_saved(spill): what autograd saves goes to the scratch file (its whole storage once, the view
    rebuilt on it with the same strides: a transpose, a slice, the same tensor saved by two ops) and backward reads it
    back; the gradients equal the in-memory backward's to the bit, and nothing spilled outlives the step."""
    from xbitc import spill as spill_mod
    from xbitc.quant import tune as tunable

    monkeypatch.setattr(tunable, "SPILL_BYTES", 0)
    torch.manual_seed(0)
    w1, w2 = torch.randn(48, 32), torch.randn(24, 48)
    x0 = torch.randn(4, 16, 32)

    def grads(spill):
        leaf = torch.ones(32, requires_grad=True)
        with tunable.rebuilt_when_saved(spill):
            h = F.silu(F.linear(x0 * leaf, w1))  # mul saves x0 and leaf; silu saves its input
            t = h.transpose(1, 2)  # a view with other strides, saved by the matmul below
            y = (t[:, :24] @ h[:, :, :24]).sum() + F.linear(h, w2).pow(2).sum()  # slices; h saved by two ops
            y.backward()
        return leaf.grad

    want = grads(None)
    saved = []

    class Counted(spill_mod.Spill):
        def array(self, a):
            saved.append(a.size)
            return super().array(a)

    before = set(spill_mod._maps)
    spill = Counted(tmp_path)
    got = grads(spill)
    spill.close()
    assert torch.equal(got, want)
    # six storages, each once: x0, w1, silu's input, h (saved by the matmul through two views), w2, the last linear's
    # output (pow's input); spilling every saved view on its own would write h twice
    assert sorted(saved) == sorted([4 * 16 * 32, 48 * 32, 4 * 16 * 48, 4 * 16 * 48, 24 * 48, 4 * 16 * 24])
    assert set(spill_mod._maps) <= before  # every spilled activation was read and unmapped with the step


def test_scale_adam_is_torch_adam_and_its_state_waits_in_the_scratch_file(tmp_path):
    """ScaleAdam steps a matrix at a time: each log-scale moves exactly as under one torch Adam over all of them with
    the cosine schedule (the tune pass's arithmetic before it), whether the training state is in memory or in a
    scratch file; in the scratch file, none of the state is resident after a step or a commit."""
    from xbitc.quant.tune import ScaleAdam
    from xbitc.spill import Spill

    def file_resident():  # bytes of file-backed pages this process maps
        return next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("RssFile:"))

    g = torch.Generator().manual_seed(0)
    depths = [torch.randint(0, 9, (256,), generator=g).numpy() for _ in range(3)]
    matrices = [rtn_any(torch.randn(512, 256, generator=g), d, 16) for d in depths]
    depths[1][:] = 0  # one matrix with every column dropped: nothing of it to train
    matrices[1] = rtn_any(torch.randn(512, 256, generator=g), depths[1], 16)
    probes = [[torch.randn(512, 256, generator=g) for _ in matrices] for _ in range(5)]
    steps, lr = len(probes), 0.01
    runs = {}
    for how in ("torch", "memory", "scratch"):
        spill = Spill(tmp_path) if how == "scratch" else None
        # a streamed compile's matrices wait in the scratch file too (xbitc.streaming)
        tuners = [TunableScales(spill.quantized(q) if spill else copy.deepcopy(q), spill) for q in matrices]
        params = [p for t in tuners for p in t.parameters()]
        if how == "torch":
            opt = torch.optim.Adam(params, lr=lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        else:
            opt = ScaleAdam(tuners, lr)
        state_bytes = sum(a.nbytes for t in tuners for seg in t.segments for a in seg.arrays)
        before = file_resident()
        for step, probe in enumerate(probes):
            opt.zero_grad(**({"set_to_none": True} if how == "torch" else {}))
            sum((t.weight() * p).sum() for t, p in zip(tuners, probe)).backward()
            if how == "torch":
                opt.step()
                sched.step()
            else:
                opt.step(lr_factor=0.5 * (1 + math.cos(math.pi * step / steps)))
            if how == "scratch":
                assert file_resident() - before < 0.05 * state_bytes
        for t in tuners:
            t.commit()
        if how == "scratch":
            assert file_resident() - before < 0.05 * state_bytes
            assert all(spill_holds(a) for t in tuners for a in t.q.scales)  # committed in place, in the file
        runs[how] = [s.copy() for t in tuners for s in t.q.scales]
    assert any(not np.array_equal(a, b) for a, b in zip(runs["torch"], [s for q in matrices for s in q.scales]))
    for how in ("memory", "scratch"):
        assert all(np.array_equal(a, b) for a, b in zip(runs["torch"], runs[how])), how


def spill_holds(a: np.ndarray) -> bool:
    from xbitc.spill import in_scratch

    return a.size == 0 or in_scratch(a)
