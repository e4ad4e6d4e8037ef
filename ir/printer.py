"""Stable text form of a graph, for golden tests, --dump-ir and humans."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .graph import Graph, Ref


def _fmt(v: Any) -> str:
    if isinstance(v, Ref):
        return f"%{v.name}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (torch.dtype, torch.layout, torch.memory_format)):
        return str(v).removeprefix("torch.")
    if isinstance(v, float):
        return repr(v)
    return repr(v) if isinstance(v, str) else str(v)


def describe_param(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}[{', '.join(map(str, value.shape))}]"
    if isinstance(value, np.ndarray):
        return f"{value.dtype}[{', '.join(map(str, value.shape))}]"
    segs = " ".join(f"{s.bits}b/g{s.group_size}x{s.ncols}" for s in _segments(value))
    return f"{type(value).__name__}[{', '.join(map(str, value.shape))}] {{{segs}}}"


def _segments(value: Any):
    segs = getattr(value, "segments", [])
    return [getattr(s, "seg", s) for s in segs]


def print_graph(g: Graph) -> str:
    lines = []
    for name in sorted(g.params):
        lines.append(f"param {name}: {describe_param(g.params[name])}")
    for n in g.nodes:
        head = n.op.value
        if "target" in n.attrs:
            head += f"[{n.attrs['target']}]"
        args = [_fmt(a) for a in n.args] + [f"{k}={_fmt(v)}" for k, v in n.kwargs.items()]
        attrs = {k: v for k, v in n.attrs.items() if k != "target"}
        tail = f" {_fmt(attrs)}" if attrs else ""
        ty = f" : {n.type}" if n.type is not None else ""
        lines.append(f"%{n.name} = {head}({', '.join(args)}){tail}{ty}")
    return "\n".join(lines) + "\n"
