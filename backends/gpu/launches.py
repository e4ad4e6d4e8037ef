"""A planned launch (ir/execplan.py) as the kernel calls that compute it: the table from core op to the functions of
ops.py and ops_nn.py. Every core op that launches is here; the host ops (dim, scalar_*) and the aliases (reshape,
squeeze, unsqueeze) never reach a kernel."""
from __future__ import annotations

from typing import Callable

from . import ops, ops_nn
from .ops import Call, Env, GpuOpError

TABLE: dict[str, Callable[..., list[Call]]] = {
    **{op: ops.elementwise for op in ("neg", "abs", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid",
                                      "erf", "relu", "silu", "logical_not", "add", "sub", "mul", "div", "maximum",
                                      "minimum", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
                                      "where", "gelu", "pow")},
    **{op: ops.view_copy for op in ("transpose", "permute", "expand", "slice", "select")},
    "cast": ops.cast, "arange": ops.arange, "full": ops.full, "concat": ops.concat, "gather": ops.gather,
    "embed": ops.embed, "mean": ops.reduce, "sum": ops.reduce, "softmax": ops.softmax, "rmsnorm": ops.norm,
    "layernorm": ops.norm, "rope": ops.rope,
    "matmul": ops_nn.matmul, "linear": ops_nn.linear, "attention": ops_nn.attention, "conv2d": ops_nn.conv2d,
}


def calls(launch, env: Env) -> list[Call]:
    """The calls computing `launch` in order (none for an empty output)."""
    fn = TABLE.get(launch.op)
    if fn is None:
        raise GpuOpError(f"node {launch.node}: no GPU kernel for core op {launch.op!r}")
    return fn(launch, env)
