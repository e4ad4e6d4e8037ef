"""A legalized graph: nodes that name only core ops (ir/core.py), run by their reference implementations.

This is what native targets consume (the C library's op list, the GPU runtimes); `run` is its oracle and checks
every node's output against the op's shape rule, so a rule that a target would evaluate wrongly fails here first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .core import CORE_OPS, shape_operand
from .graph import Ref


@dataclass
class CoreNode:
    name: str
    op: str  # a key of CORE_OPS, or "input" / "param" / "output"
    args: tuple = ()
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class CoreGraph:
    nodes: list[CoreNode]
    params: dict[str, Any]  # name -> tensor or packed matrix, shared with the traced graph

    def ops(self) -> set[str]:
        return {n.op for n in self.nodes}


def _get(v: Any, env: dict[str, Any]) -> Any:
    if isinstance(v, Ref):
        return env[v.name]
    if isinstance(v, (list, tuple)):
        return type(v)(_get(x, env) for x in v)
    return v


def run(g: CoreGraph, *inputs: Any, weight=None, check_shapes: bool = True, values: dict | None = None) -> Any:
    """Execute with the reference implementations. `weight(name)` gives a parameter's float tensor (default: the
    stored value itself); every output's shape is compared with its op's shape rule. `values`, if given, receives
    every node's value by name (what a target's results are compared with)."""
    weight = weight or (lambda name: g.params[name])
    env: dict[str, Any] = {} if values is None else values
    feed = iter(inputs)
    for n in g.nodes:
        if n.op == "input":
            env[n.name] = next(feed)
        elif n.op == "param":
            env[n.name] = weight(n.attrs["name"])
        elif n.op == "output":
            outs = tuple(_get(a, env) for a in n.args)
            return outs[0] if n.attrs.get("single", len(outs) == 1) else outs
        else:
            op = CORE_OPS[n.op]
            args = _get(n.args, env)
            value = op.reference(*args, **n.attrs)
            if check_shapes:
                expected = op.shape(*(shape_operand(a) for a in args), **n.attrs)
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else None
                if expected != got:
                    raise AssertionError(f"{n.name} ({n.op}): shape rule gives {expected}, reference made {got}")
            env[n.name] = value
    raise ValueError("core graph has no output node")
