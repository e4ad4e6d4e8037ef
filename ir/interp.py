"""Reference semantics of every op: the oracle all tests and backends are checked against.

Quantized weights are dequantized once and cached, which keeps the oracle simple and exact; backends replace the
linear implementation (`linear_impl`) with their kernels and keep everything else.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from .fuse import KERNELS
from .graph import LINEAR_OPS, TARGET_OPS, Graph, Node, Op, Ref
from .targets import resolve

LinearImpl = Callable[[torch.Tensor, Any, torch.Tensor | None, str], torch.Tensor]
LinearHook = Callable[[Node, torch.Tensor], None]


def materialize(value: Any) -> torch.Tensor:
    """A parameter as a float32 (or integer) torch tensor, whatever its storage."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    return value.dequantize()


class PermutedColumns(NamedTuple):
    """A float weight held with its input columns reordered (stored column k is original column columns[k]), as a
    weights map may supply it: a linear gathers its input by `columns` and an embedding its output by `inverse`,
    which for a matrix of many rows costs far less than putting its columns back in order."""

    stored: torch.Tensor
    columns: torch.Tensor
    inverse: torch.Tensor  # stored column of each original column

    def in_order(self) -> torch.Tensor:
        return self.stored.index_select(1, self.inverse)


class Interpreter:
    def __init__(self, graph: Graph, linear_impl: LinearImpl | None = None, grad: bool = False,
                 weights: dict[str, torch.Tensor] | None = None):
        self.graph = graph
        self.grad = grad  # record autograd through the ops (sensitivity analysis); off for inference
        self.linear_impl = linear_impl
        # float forms of parameters, filled on first use; another graph over the same parameters may share it
        self._weights: dict[str, torch.Tensor] = {} if weights is None else weights
        self._by_name = graph.by_name()
        self._fns = {n.name: resolve(n.attrs["target"]) if n.op in TARGET_OPS else KERNELS[n.attrs["kernel"]]
                     for n in graph.nodes if n.op in TARGET_OPS or n.op is Op.FUSED}
        last_use: dict[str, int] = {}
        for i, n in enumerate(graph.nodes):
            for r in n.refs():
                last_use[r] = i
        # PARAM nodes read as values by something other than a weighted op's weight slot
        param_nodes = {p.name for p in graph.nodes if p.op is Op.PARAM}
        self._value_params = {r for n in graph.nodes for r in _refs_except_weight(n) if r in param_nodes}
        self._free_after: dict[int, list[str]] = {}
        for name, i in last_use.items():
            self._free_after.setdefault(i, []).append(name)

    def param_name(self, node: Node, index: int = 1) -> str:
        return self._by_name[node.args[index].name].attrs["name"]

    def set_weight(self, name: str, value: torch.Tensor) -> None:
        """Run with `value` in place of a parameter (e.g. a leaf tensor that collects gradients)."""
        self._weights[name] = value

    def weight(self, name: str) -> torch.Tensor:
        w = self._weight_as_held(name)
        return w.in_order() if isinstance(w, PermutedColumns) else w

    def _weight_as_held(self, name: str) -> torch.Tensor | PermutedColumns:
        if name not in self._weights:
            self._weights[name] = materialize(self.graph.params[name])
        return self._weights[name]

    def _linear(self, n: Node, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        name = self._by_name[n.args[1].name].attrs["name"]
        if n.op is Op.PACKED_LINEAR and self.linear_impl is not None:
            return self.linear_impl(x, self.graph.params[name], bias, name)
        w = self._weight_as_held(name)
        if isinstance(w, PermutedColumns):
            return F.linear(x.index_select(-1, w.columns), w.stored, bias)
        return F.linear(x, w, bias)

    def forget(self, name: str) -> None:
        """Drop the cached float form of a parameter after a pass replaced it."""
        self._weights.pop(name, None)

    def run(self, *inputs: torch.Tensor, hook: LinearHook | None = None) -> Any:
        steps = self.steps(*inputs)
        item = next(steps)
        while item[0] == "linear":
            if hook is not None:
                hook(item[1], item[2])
            item = steps.send(None)
        return item[1]

    __call__ = run

    def steps(self, *inputs: torch.Tensor):
        """Execute as a generator: yields ("linear", node, x) before every linear and ("output", value) at the end.

        Passes that must see each linear's input before deciding its weight (sequential GPTQ) drive several of
        these in lock-step, one per calibration batch, so memory stays bounded by one batch's live values.
        """
        # torch's grad-mode decorators wrap generators per resumption, so the mode never leaks to the caller
        mode = torch.enable_grad() if self.grad else torch.no_grad()
        return mode(self._steps)(inputs)

    def _steps(self, inputs: tuple):
        g = self.graph
        env: dict[str, Any] = {}
        feed = iter(inputs)
        get = lambda v: _substitute(v, env)
        for i, n in enumerate(g.nodes):
            op = n.op
            if op is Op.INPUT:
                try:
                    env[n.name] = next(feed)
                except StopIteration:
                    raise TypeError(f"the graph takes {len(g.inputs())} inputs, {len(inputs)} given") from None
            elif op is Op.PARAM:
                # weighted ops read their weight by name (maybe packed); other users need the float tensor
                env[n.name] = self.weight(n.attrs["name"]) if n.name in self._value_params else None
            elif op in LINEAR_OPS:
                x = env[n.args[0].name]
                bias = self.weight(self._by_name[n.args[2].name].attrs["name"]) if len(n.args) > 2 and n.args[2] else None
                yield ("linear", n, x)
                env[n.name] = self._linear(n, x, bias)
            elif op is Op.EMBED:
                table = self._weight_as_held(self._by_name[n.args[1].name].attrs["name"])
                if isinstance(table, PermutedColumns):
                    env[n.name] = F.embedding(env[n.args[0].name], table.stored).index_select(-1, table.inverse)
                else:
                    env[n.name] = F.embedding(env[n.args[0].name], table)
            elif op is Op.RMSNORM:
                w = self.weight(self._by_name[n.args[1].name].attrs["name"])
                env[n.name] = rmsnorm(env[n.args[0].name], w, n.attrs["eps"])
            elif op is Op.OUTPUT:
                outs = tuple(get(a) for a in n.args)
                yield ("output", outs[0] if n.attrs.get("single", len(outs) == 1) else outs)
                return
            else:
                env[n.name] = self._fns[n.name](*get(n.args), **get(n.kwargs))
            for name in self._free_after.get(i, ()):
                env.pop(name, None)
        raise RuntimeError("graph has no output node")


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype is torch.float32:  # .float() and .to(float32) would return the tensor itself: skip two dispatches
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _substitute(v: Any, env: dict[str, Any]) -> Any:
    if isinstance(v, Ref):
        return env[v.name]
    if isinstance(v, tuple):
        return tuple(_substitute(x, env) for x in v)
    if isinstance(v, list):
        return [_substitute(x, env) for x in v]
    if isinstance(v, dict):
        return {k: _substitute(x, env) for k, x in v.items()}
    return v


def _refs_except_weight(n: Node):
    if n.op in LINEAR_OPS or n.op is Op.EMBED:
        yield n.args[0].name  # weight (and bias) are read by name
        return
    yield from n.refs()
