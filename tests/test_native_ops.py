"""Every core op through the C runtime against its reference implementation (ir/core.py): random cases, all in one
model.bin with one output per case, run by the test driver in one process.

Tolerance: float32 ops whose C and torch implementations sum or approximate in other orders (reductions, exp,
erf, tanh, matrix products) differ by a few float32 ulps of the output's scale: 1e-5 of it; everything integral or
boolean is exact."""
import numpy as np
import torch

from xbitc.ir.core import CORE_OPS
from xbitc.ir.coregraph import CoreGraph, CoreNode
from xbitc.ir.graph import Ref, TensorType
from xbitc.native import build, modelbin

from test_native import DRIVER, read_tensors, run_driver, write_tensor

DTYPE_NAMES = {torch.float32: "float32", torch.int64: "int64", torch.bool: "bool"}


class Cases:
    """A core graph under construction: inputs, params and one output per case, with the expected values."""

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.nodes: list[CoreNode] = []
        self.params: dict[str, torch.Tensor] = {}
        self.feeds: list[torch.Tensor] = []
        self.cases: list[tuple[str, Ref, torch.Tensor]] = []

    def f32(self, *shape, positive=False):
        x = torch.randn(*shape, generator=self.gen)
        return x.abs() + 0.1 if positive else x

    def input(self, value: torch.Tensor) -> Ref:
        name = f"in{len(self.feeds)}"
        self.nodes.append(CoreNode(name, "input", (), {"type": TensorType(tuple(value.shape), DTYPE_NAMES[value.dtype])}))
        self.feeds.append(value)
        return Ref(name)

    def param(self, value: torch.Tensor) -> Ref:
        name = f"p{len(self.params)}"
        self.params[name] = value
        self.nodes.append(CoreNode(name, "param", (), {"name": name}))
        return Ref(name)

    def node(self, op: str, *args, **attrs) -> Ref:
        name = f"n{len(self.nodes)}"
        self.nodes.append(CoreNode(name, op, args, attrs))
        return Ref(name)

    def case(self, op: str, args: tuple, attrs: dict | None = None, values: tuple | None = None) -> None:
        """One op on `args` (tensors become inputs unless already refs; others stay literal operands)."""
        attrs = attrs or {}
        refs = tuple(self.input(a) if isinstance(a, torch.Tensor) else a for a in args)
        out = self.node(op, *refs, **attrs)
        want = CORE_OPS[op].reference(*(values if values is not None else args), **attrs)
        self.cases.append((f"{op}{attrs}", out, want))

    def graph(self) -> CoreGraph:
        nodes = self.nodes + [CoreNode("out", "output", tuple(ref for _, ref, _ in self.cases), {"single": False})]
        return CoreGraph(nodes, self.params)


def build_cases() -> Cases:
    c = Cases()
    for name in ("neg", "abs", "exp", "sin", "cos", "tanh", "sigmoid", "erf", "relu", "silu"):
        c.case(name, (c.f32(3, 5),))
    for name in ("log", "sqrt", "rsqrt"):
        c.case(name, (c.f32(4, 3, positive=True),))
    c.case("logical_not", (torch.rand(5, generator=c.gen) > 0.5,))
    for name in ("add", "sub", "mul", "div", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge"):
        c.case(name, (c.f32(2, 1, 4), c.f32(3, 1)))
        c.case(name, (c.f32(3, 4), 0.5))
    c.case("add", (torch.arange(6).reshape(2, 3), 4))
    c.case("mul", (torch.arange(6).reshape(2, 3), 2.5))
    c.case("div", (torch.arange(6).reshape(2, 3), torch.arange(1, 4)))
    c.case("add", (torch.arange(4), torch.ones(4, dtype=torch.bool)))
    for name in ("logical_and", "logical_or"):
        c.case(name, (torch.rand(3, 4, generator=c.gen) > 0.5, torch.rand(4, generator=c.gen) > 0.3))
    c.case("where", (torch.rand(2, 3, generator=c.gen) > 0.5, c.f32(2, 3), -1e9))
    c.case("where", (torch.rand(3, 1, generator=c.gen) > 0.5, c.f32(4), c.f32(3, 4)))
    for dim in (-1, 0):
        c.case("softmax", (c.f32(3, 7),), {"dim": dim})
    for approximate in ("none", "tanh"):
        c.case("gelu", (c.f32(4, 6),), {"approximate": approximate})
    for exponent in (2.0, 0.5, 3.0):
        c.case("pow", (c.f32(5, positive=True),), {"exponent": exponent})
    for dims, keep in (([-1], True), ([0, 2], False), ([], False)):
        c.case("mean", (c.f32(2, 3, 4),), {"dims": dims, "keepdim": keep})
        c.case("sum", (c.f32(2, 3, 4),), {"dims": dims, "keepdim": keep})
    c.case("sum", (torch.arange(12).reshape(3, 4),), {"dims": [1], "keepdim": False})
    x = c.f32(2, 3, 4)
    c.case("transpose", (x,), {"dim0": 0, "dim1": 2})
    c.case("permute", (x,), {"dims": [2, 0, 1]})
    for dim, start, stop, step in ((1, 1, 3, 1), (2, -3, 1 << 62, 2), (0, -100, -1, 1), (-1, 0, 0, 1)):
        c.case("slice", (x, start, stop), {"dim": dim, "step": step})
    c.case("select", (x,), {"dim": 1, "index": -1})
    parts = [c.f32(2, 3), c.f32(2, 1)]
    refs = [c.input(p) for p in parts]
    out = c.node("concat", refs, dim=-1)
    c.cases.append(("concat", out, torch.cat(parts, -1)))
    for dtype in ("int64", "bool", "float32"):
        c.case("cast", (c.f32(3, 3) * 3,), {"dtype": dtype})
    c.case("cast", (torch.arange(5),), {"dtype": "float32"})
    c.case("arange", (7,), {"dtype": "int64"})
    c.case("full", ([2, 3], ), {"value": 1.5, "dtype": "float32"})
    idx = torch.randint(0, 5, (3, 2), generator=c.gen)
    c.case("gather", (c.f32(3, 5), idx), {"dim": 1})
    # sizes computed from other values: dim and scalar arithmetic feeding reshape / expand / unsqueeze / squeeze
    y = c.f32(2, 6)
    yr = c.input(y)
    d = c.node("dim", yr, axis=1)
    half = c.node("scalar_floordiv", d, 2)
    r = c.node("reshape", yr, [2, half, -1])
    c.cases.append(("reshape", r, y.reshape(2, 3, -1)))
    six = c.node("scalar_sub", c.node("scalar_add", c.node("scalar_mul", d, 2), 3), 9)
    e = c.node("expand", c.node("unsqueeze", yr, dim=0), [3, -1, six])
    c.cases.append(("expand", e, y.unsqueeze(0).expand(3, -1, 6)))
    s = c.node("squeeze", c.node("unsqueeze", yr, dim=1), dim=1)
    c.cases.append(("squeeze", c.node("add", s, 0.0), y))
    # network ops
    c.case("matmul", (c.f32(3, 4), c.f32(4, 5)))
    c.case("matmul", (c.f32(2, 3, 5, 4), c.f32(3, 4, 6)))
    c.case("matmul", (c.f32(2, 5, 4), c.f32(4)))
    w, b = c.f32(6, 4), c.f32(6)
    out = c.node("linear", c.input(xl := c.f32(2, 3, 4)), c.param(w), c.param(b))
    c.cases.append(("linear", out, torch.nn.functional.linear(xl, w, b)))
    table = c.f32(11, 4)
    ids = torch.randint(0, 11, (2, 5), generator=c.gen)
    out = c.node("embed", c.input(ids), c.param(table))
    c.cases.append(("embed", out, table[ids]))
    wn = c.f32(8)
    xn = c.f32(3, 8)
    c.cases.append(("rmsnorm", c.node("rmsnorm", c.input(xn), c.param(wn), eps=1e-6),
                    CORE_OPS["rmsnorm"].reference(xn, wn, eps=1e-6)))
    c.cases.append(("layernorm", c.node("layernorm", c.input(xn), c.param(wn), c.param(wn * 0.5), eps=1e-5),
                    CORE_OPS["layernorm"].reference(xn, wn, wn * 0.5, eps=1e-5)))
    c.cases.append(("layernorm", c.node("layernorm", c.input(xn), None, None, eps=1e-5),
                    CORE_OPS["layernorm"].reference(xn, None, None, eps=1e-5)))
    c.case("rope", (c.f32(1, 2, 5, 8), c.f32(1, 1, 5, 8), c.f32(1, 1, 5, 8)))
    for S, T, hq, hk, attrs in ((5, 5, 4, 2, {"causal": True}), (1, 9, 4, 1, {"causal": True}),
                                (3, 7, 2, 2, {"causal": True, "window": 3}), (4, 4, 2, 2, {"scale": 0.3})):
        q, k, v = c.f32(2, hq, S, 8), c.f32(2, hk, T, 8), c.f32(2, hk, T, 8)
        c.case("attention", (q, k, v, None), {"scale": None, "causal": False, "window": 0, **attrs})
    pad = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    pad[1, ..., 4:] = False
    c.case("attention", (c.f32(2, 2, 6, 8), c.f32(2, 2, 6, 8), c.f32(2, 2, 6, 8), pad),
           {"scale": None, "causal": False, "window": 0})
    c.case("conv2d", (c.f32(1, 3, 8, 8), c.f32(4, 3, 4, 4), c.f32(4)), {"stride": [4, 4], "padding": [0, 0]})
    return c


def test_every_core_op_matches_its_reference(tmp_path):
    c = build_cases()
    covered = {n.op for n in c.nodes} - {"input", "param"}
    assert covered == set(CORE_OPS), sorted(set(CORE_OPS) - covered)
    modelbin.write(tmp_path / "ops.bin", [c.graph()], kind="other")
    lib = build.build_library(tmp_path / "lib", kernels=False)
    exe = build.link_program([DRIVER], lib, tmp_path / "driver")
    files = [write_tensor(tmp_path / f"in{k}", x.numpy()) for k, x in enumerate(c.feeds)]
    run_driver(exe, "graph", tmp_path / "ops.bin", 0, 1, tmp_path / "out", *files)
    got = read_tensors(tmp_path / "out")
    assert len(got) == len(c.cases)
    for (name, _, want), g in zip(c.cases, got):
        want = want.numpy()
        assert g.shape == want.shape and g.dtype == want.dtype, (name, g.shape, want.shape, g.dtype, want.dtype)
        if want.dtype == np.float32:
            scale = float(np.abs(want).max(initial=0)) + 1e-6
            assert np.allclose(g, want, rtol=0, atol=1e-5 * scale, equal_nan=True), (name, np.abs(g - want).max())
        else:
            assert np.array_equal(g, want), name


def test_hostile_sizes_get_a_status_not_a_crash(tmp_path):
    """Graphs a crafted model.bin could hold: sizes that overflow products next to a zero size, steps and indexes
    out of range. The sanitized runtime must answer each with a status (XBITC_E_SHAPE), never memory errors."""
    lib = build.build_library(tmp_path / "lib", sanitize=True, kernels=False)
    exe = build.link_program([DRIVER], lib, tmp_path / "driver", sanitize=True)
    huge = (1 << 56) + 16
    cases = {
        "attention over 2^56 empty keys": lambda c: c.node(
            "attention", c.node("full", [1, 256, 1, 0], value=0.0, dtype="float32"),
            *[c.node("full", [1, 1, huge, 0], value=0.0, dtype="float32")] * 2, None, scale=None, causal=False,
            window=0),
        "conv2d patch of 2^56 channels": lambda c: c.node(
            "conv2d", c.node("full", [1, (1 << 56) + 1, 0, 0], value=0.0, dtype="float32"),
            c.node("full", [0, (1 << 56) + 1, 16, 16], value=0.0, dtype="float32"), None, stride=[1, 1],
            padding=[8, 8]),
        "slice step 2^62": lambda c: c.node("slice", c.input(torch.zeros(4, 4)), 0, 4, dim=0, step=1 << 62),
        "reshape to 2^62 elements": lambda c: c.node("reshape", c.input(torch.zeros(4)), [1 << 31, 1 << 31]),
        "embed id out of range": lambda c: c.node("embed", c.input(torch.tensor([[3, 99]])), c.param(torch.zeros(5, 2))),
        "gather index out of range": lambda c: c.node("gather", c.input(torch.zeros(2, 3)),
                                                      c.input(torch.tensor([[0, 7]])), dim=1),
    }
    for name, make in cases.items():
        c = Cases()
        out = make(c)
        c.cases.append((name, out, None))
        modelbin.write(tmp_path / "m.bin", [c.graph()], kind="other")
        files = [write_tensor(tmp_path / f"in{k}", x.numpy()) for k, x in enumerate(c.feeds)]
        proc = run_driver(exe, "graph", tmp_path / "m.bin", 0, 1, tmp_path / "out", *files, expect=None)
        assert proc.returncode == 6, (name, proc.returncode, proc.stderr[-1500:])
