"""The wgsl backend: every core op's kernel (backends/gpu/ops.py, ops_nn.py) against its reference in ir/core.py,
run through the WebGPU runtime (xbitc/webgpu) as a one-node core graph; then whole compiled models against the
Python runtime, logits and greedy generation with the key / value caches on the device; and the command line.
On this CPU-only machine WebGPU runs on Mesa's lavapipe; where no adapter exists the tests are skipped, saying why.

Tolerances. Copies, gathers, casts, comparisons, integer arithmetic and float add / sub / mul are exact (IEEE
operations, one rounding each, as torch's). Otherwise, in float32 (eps = 6e-8): division 2.5 ulp (WGSL's bound);
exp / log / tanh / sigmoid / silu as the GPU's library computes them, lavapipe's exp being exp2(x log2 e), whose
relative error grows as |x| eps (2e-6 relative for |x| <= 10 below); erf, which WGSL lacks, a series and a fit with
2e-7 absolute error; sums (reductions, norms, softmax, products, attention) of n terms in another order than
torch's, within n eps of the sum of magnitudes. Whole models: 1e-4 of the logits' scale, as the C library's tests.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

from xbitc import registry
from xbitc.ir.coregraph import CoreGraph, CoreNode, run
from xbitc.ir.graph import Ref
from xbitc.ir.interp import materialize

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).parent.parent
EPS = 2.0**-24


@pytest.fixture(scope="module")
def gpu():
    from xbitc.webgpu.device import Device, DeviceUnavailable

    try:
        return Device()
    except DeviceUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def wgsl_registered():
    """The wgsl backend by name. pyproject.toml declares its entry point; an install made before the entry point
    existed (pip install -e . refreshes it) gets it registered in-process here."""
    from xbitc.backends.wgsl import WgslBackend

    if not importlib.metadata.entry_points(group=registry.BACKEND_GROUP, name="wgsl"):
        registry.register(registry.BACKEND_GROUP, "wgsl", WgslBackend)


def test_the_wgsl_backend_is_declared_as_an_entry_point():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["xbitc.backends"]
    module, cls = declared["wgsl"].split(":")
    assert getattr(importlib.import_module(module), cls).name == "wgsl"


def test_no_adapter_is_one_line_naming_what_to_install(monkeypatch, tmp_path, capsys, wgsl_registered):
    """Where no WebGPU adapter answers (no Vulkan driver), loading names the packages to install; the command line
    prints that one line and exits 2."""
    from test_bad_input import one_error_line, quiet, tiny_loaded, word_tokenizer

    import xbitc.webgpu.device as device
    from xbitc.backends.gpu.webgpu import NoAdapter
    from xbitc.cli import main
    from xbitc.driver import compile_model

    def no_adapter():
        raise NoAdapter("no WebGPU adapter")

    monkeypatch.setattr(device, "adapter", no_adapter)
    with pytest.raises(device.DeviceUnavailable, match="apt-get install mesa-vulkan-drivers libvulkan1"):
        device.Device()
    art = tmp_path / "tiny.xbitc"
    compile_model(tiny_loaded(word_tokenizer(), "causal-lm"), art, quiet(bits=4))
    assert main(["run", str(art), "--backend", "wgsl", "--text", "the a"]) == 2
    one_error_line(capsys.readouterr().err, "needs a WebGPU adapter", "mesa-vulkan-drivers")


# ------------------------------------------------------------------------------------------------ one op at a time


def one_op(op: str, operands: list, attrs: dict | None = None, params: dict | None = None) -> CoreGraph:
    """A core graph computing `op`: tensor operands become inputs, ("param", name) a parameter, lists stay lists
    (concat), anything else a literal operand."""
    nodes: list[CoreNode] = []

    def arg(v):
        if isinstance(v, torch.Tensor):
            nodes.append(CoreNode(f"x{len(nodes)}", "input"))
            return Ref(nodes[-1].name)
        if isinstance(v, tuple) and v[:1] == ("param",):
            nodes.append(CoreNode(f"p{len(nodes)}", "param", attrs={"name": v[1]}))
            return Ref(nodes[-1].name)
        if isinstance(v, list) and any(isinstance(x, torch.Tensor) for x in v):
            return [arg(x) for x in v]
        return v

    args = tuple(arg(v) for v in operands)
    nodes += [CoreNode("y", op, args, attrs or {}), CoreNode("out", "output", (Ref("y"),))]
    return CoreGraph(nodes, params or {})


def inputs_of(operands: list) -> list[torch.Tensor]:
    flat = []
    for v in operands:
        flat += [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, torch.Tensor)]
    return flat


def on_gpu(gpu, g: CoreGraph, xs: list[torch.Tensor]) -> torch.Tensor:
    from xbitc.webgpu.executor import Executor
    from xbitc.webgpu.weights import Weights

    return Executor(g, gpu, Weights(gpu, g.params)).run(xs)[0]


def check(gpu, op, operands, attrs=None, params=None, atol=0.0, rtol=0.0):
    g = one_op(op, operands, attrs, params)
    xs = inputs_of(operands)
    want = run(g, *xs, weight=lambda name: materialize(g.params[name]))
    got = on_gpu(gpu, g, xs)
    assert got.shape == want.shape and got.dtype == want.dtype, (op, got.shape, want.shape, got.dtype, want.dtype)
    if atol == 0 and rtol == 0:
        assert torch.equal(got, want) or torch.allclose(got, want, 0, 0, equal_nan=True), (op, got, want)
    else:
        assert torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True), \
            (op, float((got - want).abs().max()))
    return got


def sample(kind: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "float32":
        return torch.randn(shape, generator=g) * 3
    if kind == "int64":
        return torch.randint(-20, 20, shape, generator=g)
    return torch.randint(0, 2, shape, generator=g).bool()


UNARY_TOL = {"neg": 0, "abs": 0, "relu": 0, "exp": 2e-6, "log": 2e-6, "sqrt": 3e-7, "rsqrt": 3e-7, "sin": 3e-7,
             "cos": 3e-7, "tanh": 3e-7, "sigmoid": 1e-6, "erf": 3e-7, "silu": 2e-6}


@pytest.mark.parametrize("op", list(UNARY_TOL) + ["logical_not"])
def test_unary_ops(gpu, op):
    x = torch.linspace(-10, 10, 2001).reshape(3, 667)
    if op in ("log", "sqrt", "rsqrt"):
        x = x.abs() + 1e-3
    tol = UNARY_TOL.get(op, 0)
    check(gpu, op, [x], atol=tol, rtol=tol)
    if op in ("neg", "abs", "relu"):
        check(gpu, op, [torch.arange(-6, 6).reshape(3, 4)])  # integers stay integers
    if op == "logical_not":
        check(gpu, op, [torch.tensor([[True, False], [False, False]])])
        check(gpu, op, [torch.tensor([0.0, 2.5, -1.0])])


def test_gelu_pow_and_the_erf_polynomial(gpu):
    x = torch.linspace(-9, 9, 5001)
    check(gpu, "erf", [x], atol=2.5e-7)  # the series / fit's bound measured against math.erf
    check(gpu, "gelu", [x], {"approximate": "none"}, atol=3e-6, rtol=1e-6)
    check(gpu, "gelu", [x], {"approximate": "tanh"}, atol=3e-6, rtol=1e-6)
    for e in (2, 3, 0.5, -1, -0.5, 1.7, 0, 5):
        base = x.abs() + 0.1 if not float(e).is_integer() else x
        check(gpu, "pow", [base], {"exponent": e}, atol=1e-6, rtol=2e-6)
    check(gpu, "pow", [torch.arange(-5, 6)], {"exponent": 3})  # integer power of integers: exact


BINARY = ["add", "sub", "mul", "div", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge", "logical_and",
          "logical_or"]


@settings(max_examples=40, deadline=None)
@given(op=st.sampled_from(BINARY), shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=5),
       kinds=st.tuples(*[st.sampled_from(["float32", "int64", "bool"])] * 2), seed=st.integers(0, 99))
def test_binary_ops_broadcast_and_promote(gpu, op, shapes, kinds, seed):
    if op == "sub" and "bool" in kinds:
        return  # torch refuses subtraction with a bool tensor
    a, b = (sample(k, s, seed + i) for i, (k, s) in enumerate(zip(kinds, shapes.input_shapes)))
    if op == "div":
        b = torch.where(b == 0, torch.ones_like(b), b)
    tol = 3e-7 if op == "div" else 0
    check(gpu, op, [a, b], atol=tol * 60, rtol=tol)


@pytest.mark.parametrize("op", BINARY)
@pytest.mark.parametrize("scalar", [2, 0.5, True])
def test_binary_ops_with_a_python_number(gpu, op, scalar):
    if op == "sub" and isinstance(scalar, bool):
        return
    for kind in ("float32", "int64", "bool"):
        if op == "sub" and kind == "bool" and isinstance(scalar, bool):
            continue
        x = sample(kind, (3, 5), 7)
        check(gpu, op, [x, scalar], atol=3e-7 * 60 if op == "div" else 0, rtol=3e-7 if op == "div" else 0)
        check(gpu, op, [scalar, x], atol=3e-7 * 60 if op == "div" else 0, rtol=3e-7 if op == "div" else 0)


def test_nan_propagates_through_maximum_and_minimum(gpu):
    x = torch.tensor([1.0, float("nan"), -2.0])
    for op in ("maximum", "minimum"):
        got = check(gpu, op, [x, torch.tensor([0.0])])
        assert torch.isnan(got[1])


def test_where_and_casts(gpu):
    cond = sample("bool", (4, 1, 5), 1)
    check(gpu, "where", [cond, sample("float32", (3, 5), 2), sample("float32", (5,), 3)])
    check(gpu, "where", [cond, sample("int64", (4, 3, 5), 2), -1.5])  # a float number lifts ints to float
    check(gpu, "where", [cond, sample("bool", (4, 3, 5), 2), sample("int64", (1,), 3)])
    x = torch.tensor([-2.7, -0.5, 0.0, 0.4, 3.9, 100.2])
    for src in (x, x.long(), x != 0):
        for dtype in ("float32", "int64", "bool"):
            check(gpu, "cast", [src], {"dtype": dtype})


def test_views_copies_and_constructors(gpu):
    x = sample("float32", (2, 3, 4, 5), 0)
    check(gpu, "transpose", [x], {"dim0": 1, "dim1": -1})
    check(gpu, "permute", [x], {"dims": [3, 0, 2, 1]})
    check(gpu, "expand", [sample("float32", (3, 1, 5), 1), [2, 3, 4, 5]])
    check(gpu, "expand", [sample("int64", (1, 5), 1), [-1, 5]])
    check(gpu, "slice", [x, 1, 100], {"dim": 2, "step": 2})
    check(gpu, "slice", [x, -3, -1], {"dim": -1, "step": 1})
    check(gpu, "select", [x, ], {"dim": 1, "index": -1})
    check(gpu, "select", [sample("bool", (4, 6), 2)], {"dim": 0, "index": 2})
    parts = [sample("float32", (2, 3, 1), 3), torch.zeros(0), sample("float32", (2, 3, 4), 4),
             sample("float32", (2, 3, 0), 5)]
    check(gpu, "concat", [parts], {"dim": -1})
    check(gpu, "concat", [[sample("int64", (2, 3), 6), sample("float32", (1, 3), 7)]], {"dim": 0})  # promotes
    check(gpu, "arange", [9], {"dtype": "int64"})
    check(gpu, "arange", [9], {"dtype": "float32"})
    check(gpu, "full", [[2, 3]], {"value": -1.25, "dtype": "float32"})
    check(gpu, "full", [[4]], {"value": 7, "dtype": "int64"})
    check(gpu, "full", [[2, 2]], {"value": True, "dtype": "bool"})


def test_gather_and_float_embedding(gpu):
    x = sample("float32", (3, 7, 4), 0)
    for dim in range(3):
        index = torch.randint(0, x.shape[dim], (3, 5, 4) if dim == 1 else (2, 4, 3))
        check(gpu, "gather", [x, index], {"dim": dim})
    check(gpu, "gather", [sample("int64", (4, 6), 1), torch.randint(0, 6, (4, 2))], {"dim": 1})
    table = sample("float32", (11, 8), 2)
    check(gpu, "embed", [torch.randint(0, 11, (2, 5)), ("param", "table")], params={"table": table})


@pytest.mark.parametrize("shape, dims, keepdim", [
    ((3, 70, 5), [1], True), ((3, 7, 5), [0, 2], False), ((4, 300), [-1], False), ((2, 3, 4), [], False),
    ((6, 200, 2), [0, 1], True), ((5,), [0], False),
])
def test_sum_and_mean(gpu, shape, dims, keepdim):
    x = sample("float32", shape, 0)
    n = max(1, x.numel() // max(1, run(one_op("sum", [x], {"dims": dims, "keepdim": keepdim}), x).numel()))
    tol = 4 * n * EPS * 3  # n terms of |x| ~ 3
    check(gpu, "sum", [x], {"dims": dims, "keepdim": keepdim}, atol=tol * 4, rtol=1e-6)
    check(gpu, "mean", [x], {"dims": dims, "keepdim": keepdim}, atol=tol, rtol=1e-6)
    check(gpu, "sum", [sample("int64", shape, 1)], {"dims": dims, "keepdim": keepdim})  # integers: exact
    check(gpu, "sum", [sample("bool", shape, 2)], {"dims": dims, "keepdim": keepdim})


def test_softmax_and_norms(gpu):
    x = sample("float32", (3, 70, 5), 0)
    for dim in (0, 1, -1):
        check(gpu, "softmax", [x], {"dim": dim}, atol=1e-7, rtol=1e-5)
    rows = sample("float32", (2, 3, 200), 1)
    w, b = sample("float32", (200,), 2), sample("float32", (200,), 3)
    check(gpu, "rmsnorm", [rows, ("param", "w")], {"eps": 1e-6}, params={"w": w}, atol=1e-5, rtol=1e-5)
    for weight, bias in ((("param", "w"), ("param", "b")), (None, None), (("param", "w"), None)):
        check(gpu, "layernorm", [rows, weight, bias], {"eps": 1e-5}, params={"w": w, "b": b}, atol=1e-5, rtol=1e-5)


def test_rope_broadcasts_cos_and_sin(gpu):
    x = sample("float32", (2, 4, 5, 16), 0)
    for cs in ((1, 1, 5, 16), (2, 1, 5, 16), (5, 16)):
        check(gpu, "rope", [x, sample("float32", cs, 1), sample("float32", cs, 2)], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("a, b", [
    ((2, 3, 17, 20), (3, 20, 9)), ((2, 1, 4, 20), (3, 20, 9)), ((2, 1, 1, 20), (3, 20, 9)), ((5, 20), (20,)),
    ((33, 70), (70, 40)), ((1, 3), (2, 3, 4)),
])
def test_matmul(gpu, a, b):
    K = a[-1]
    check(gpu, "matmul", [sample("float32", a, 0), sample("float32", b, 1)], atol=K * 9 * 4 * EPS * 3, rtol=1e-6)


@pytest.mark.parametrize("x", [(2, 5, 40), (1, 40), (3, 17, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_float_weights(gpu, x, bias):
    params = {"w": sample("float32", (24, 40), 1), "b": sample("float32", (24,), 2)}
    check(gpu, "linear", [sample("float32", x, 0), ("param", "w"), ("param", "b") if bias else None],
          params=params, atol=40 * 9 * 4 * EPS * 3, rtol=1e-6)


def packed_matrix(rows: int, cols: int, seed: int):
    """A mixed-depth packed matrix as GPTQ writes it: columns permuted, depths 0..8 (0: dropped)."""
    from xbitc.quant.gptq import gptq_quantize
    from xbitc.quant.packed import PackedMatrix

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(4 * cols, cols, generator=g)
    depths = torch.randint(0, 9, (cols,), generator=g).numpy()
    return PackedMatrix.from_quantized(gptq_quantize(w, 2 * x.T @ x / len(x), depths, 16))


@pytest.mark.parametrize("tokens", [1, 3, 11])
def test_linear_and_embed_with_packed_weights(gpu, tokens):
    pm = packed_matrix(40, 150, tokens)
    assert pm.perm is not None and any(ps.seg.bits == 0 for ps in pm.segments)
    params = {"w": pm, "b": sample("float32", (40,), 3)}
    x = sample("float32", (tokens, 150), 0)
    check(gpu, "linear", [x, ("param", "w"), ("param", "b")], params=params, atol=150 * 9 * 8 * EPS * 3, rtol=1e-5)
    ids = torch.randint(0, 40, (1, tokens))
    check(gpu, "embed", [ids, ("param", "w")], params=params, atol=1e-6, rtol=1e-6)  # s * (q - z), as dequantize


@pytest.mark.parametrize("case", ["causal", "window", "bool mask", "float mask", "cache", "wide values", "plain"])
def test_attention(gpu, case):
    B, Hq, Hk, S, T, D, Dv = 2, 4, 2, 5, 5, 16, 16
    attrs = {"scale": None, "causal": case in ("causal", "window", "cache", "wide values"),
             "window": 3 if case == "window" else 0}
    if case == "cache":
        S, T = 2, 9  # queries sit after 7 cached keys
    if case == "wide values":
        D, Dv, T, S, Hk = 96, 80, 70, 70, 4  # two output columns per thread, two key blocks
    q, k = sample("float32", (B, Hq, S, D), 0), sample("float32", (B, Hk, T, D), 1)
    v = sample("float32", (B, Hk, T, Dv), 2)
    operands = [q / 3, k / 3, v]
    if case == "bool mask":
        mask = sample("bool", (B, 1, 1, T), 3)
        mask[0] = False  # a fully masked row gives zeros, as torch's sdpa
        operands.append(mask)
    if case == "float mask":
        operands.append(sample("float32", (1, Hq, S, T), 4))
        attrs["scale"] = 1.0
    check(gpu, "attention", operands, attrs, atol=1e-5, rtol=1e-5)


def test_conv2d(gpu):
    check(gpu, "conv2d", [sample("float32", (2, 3, 16, 16), 0), ("param", "w"), ("param", "b")],
          {"stride": (4, 4), "padding": (0, 0)}, params={"w": sample("float32", (8, 3, 4, 4), 1),
                                                         "b": sample("float32", (8,), 2)}, atol=1e-4, rtol=1e-5)
    check(gpu, "conv2d", [sample("float32", (1, 2, 7, 6), 3), ("param", "w"), None],
          {"stride": (1, 2), "padding": (1, 2)}, params={"w": sample("float32", (3, 2, 3, 3), 4)}, atol=1e-4,
          rtol=1e-5)


def test_every_launching_core_op_has_a_kernel():
    from xbitc.backends.gpu.launches import TABLE
    from xbitc.ir.core import CORE_OPS
    from xbitc.ir.execplan import ALIASES, HOST

    assert set(TABLE) == set(CORE_OPS) - ALIASES - HOST


def test_a_shader_error_names_kernel_line_and_column(gpu):
    from xbitc.backends.gpu.ops import map_kernel
    from xbitc.backends.gpu.webgpu import ShaderError

    k = map_kernel("exp", ("float32",), (True,), "float32", 1)
    source = gpu.printer.render(k).replace("exp(", "exq(")
    with pytest.raises(ShaderError) as err:
        gpu.pipeline(k, source)
    assert err.value.kernel == k.name and err.value.line > 0 and err.value.column > 0
    assert "exq" in str(err.value)


# ------------------------------------------------------------------------------------------------ whole models


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tmp_path_factory.mktemp("wgsl")


def compiled(family: str, folder: Path, tokenizer=None) -> Path:
    from test_equivalence import build

    from xbitc import frontend
    from xbitc.driver import CompileOptions, compile_model

    out = folder / f"{family}{'-tok' if tokenizer else ''}.xbitc"
    if not out.exists():
        # GPT-2: packed embeddings and a tied packed output layer (its layers are Conv1D, kept float)
        compile_model(frontend.wrap_hf(build(family), tokenizer), out,
                      CompileOptions(bits=4, group=32, quantize_embeddings=family == "gpt2", log=lambda s: None,
                                     progress=False))
    return out


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max()) + 1e-6
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-4 * scale, float((got - want).abs().max()) / scale


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_language_models_match_the_python_runtime(gpu, wgsl_registered, artifacts, family):
    pytest.importorskip("transformers")
    from test_equivalence import VOCAB

    from xbitc import runtime
    from xbitc.webgpu.executor import DeviceTensor

    art = compiled(family, artifacts)
    ref, model = runtime.load(art, backend="reference"), runtime.load(art, backend="wgsl")
    for batch, seq in ((2, 9), (1, 17)):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq))
        close(model(ids), ref(ids))
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    logits, *past = model.step(prompt, *runtime.empty_cache(model.graph.step))
    assert past and all(isinstance(p, DeviceTensor) for p in past)  # the caches stay on the device
    want, *ref_past = ref.step(prompt, *runtime.empty_cache(ref.graph.step))
    close(logits, want)
    close(past[-1].torch(), ref_past[-1])
    assert model.generate_ids(prompt, 16) == ref.generate_ids(prompt, 16)


@pytest.mark.parametrize("family", ["bert", "vit", "t5"])
def test_encoders_match_the_python_runtime(gpu, wgsl_registered, artifacts, family):
    """Key-padding masks (BERT), a patch-embedding convolution (ViT), a float position bias (T5)."""
    pytest.importorskip("transformers")
    from test_equivalence import inputs_for

    from xbitc import runtime

    art = compiled(family, artifacts)
    ref, model = runtime.load(art, backend="reference"), runtime.load(art, backend="wgsl")
    xs = inputs_for(ref.manifest.kind, 2, 9)
    close(model(*xs), ref(*xs))


def word_tokenizer(size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0")


def test_xbitc_run_generates_through_webgpu(gpu, wgsl_registered, artifacts, capsys):
    pytest.importorskip("transformers")
    from test_equivalence import VOCAB

    from xbitc.cli import main

    art = compiled("llama", artifacts, word_tokenizer(VOCAB))
    printed = []
    for backend in ("reference", "wgsl"):
        assert main(["run", str(art), "--backend", backend, "--text", "w5 w17 w230", "--max-new-tokens", "6"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and printed[0].count("w") == 3 + 6  # the prompt, then six new words
    assert main(["list-backends"]) == 0
    assert "wgsl" in capsys.readouterr().out


@pytest.mark.slow
def test_smollm2_at_3_bpw_generates_through_webgpu(tmp_path, gpu, wgsl_registered):
    """The real SmolLM2-135M, learned allocation at 3 bits per weight: the same greedy tokens through WebGPU as
    through the Python runtime, and the prefill's logits within 1e-4 of their scale."""
    from xbitc import frontend, models, runtime
    from xbitc.driver import CompileOptions, compile_model

    art = tmp_path / "smollm2-3.xbitc"
    compile_model(frontend.load(str(models.smollm2_gguf())), art,
                  CompileOptions(bpw=3.0, log=lambda s: None, progress=False))
    ref, model = runtime.load(art), runtime.load(art, backend="wgsl")
    prompt = ref.tokenizer("The capital of France is", return_tensors="pt").input_ids
    close(model.step(prompt, *runtime.empty_cache(model.graph.step))[0],
          ref.step(prompt, *runtime.empty_cache(ref.graph.step))[0])
    assert model.generate_ids(prompt, 8) == ref.generate_ids(prompt, 8)
