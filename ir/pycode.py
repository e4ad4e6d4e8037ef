"""The interpreter's semantics compiled to one Python function per graph, for inference.

`Interpreter.run` walks the node list and resolves every argument through a name -> value dict on each call: about
18 us per node, which for a 2,000-node language model is ~40 ms per forward — more than the packed linears of a
one-token decode step take. Here the same graph becomes straight-line Python source (one local variable per node,
constants from a table, each value deleted after its last use like the interpreter frees it), compiled once with
`compile`/`exec`. Ops run the exact functions the interpreter runs, so results are identical (tested bit for bit);
the interpreter stays the oracle and the only path with hooks, lock-step steps and autograd.

Nothing from the artifact reaches `exec` as code: node names become v<index>, op targets were resolved through the
allow-list (ir/targets.py) into the function table, and every literal is passed through the constant table.
"""
from __future__ import annotations

import keyword
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .graph import LINEAR_OPS, TARGET_OPS, Op, Ref, _refs
from .interp import rmsnorm


def compile_interpreter(interp: Any) -> Callable[..., Any]:
    g = interp.graph
    index = {n.name: i for i, n in enumerate(g.nodes)}
    by_name = g.by_name()
    consts: list[Any] = []

    def const(value: Any) -> str:
        consts.append(value)
        return f"K[{len(consts) - 1}]"

    def expr(v: Any) -> str:
        if isinstance(v, Ref):
            return f"v{index[v.name]}"
        if isinstance(v, (tuple, list)) and any(_has_ref(x) for x in v):
            body = ", ".join(expr(x) for x in v)
            return f"({body},)" if isinstance(v, tuple) else f"[{body}]"
        if isinstance(v, dict) and any(_has_ref(x) for x in v.values()):
            return "{" + ", ".join(f"{const(k)}: {expr(x)}" for k, x in v.items()) + "}"
        return const(v)

    inputs = [n for n in g.nodes if n.op is Op.INPUT]
    lines = [f"def _run(*inputs):", f"    if len(inputs) != {len(inputs)}:",
             f"        raise TypeError(f'the graph takes {len(inputs)} inputs, {{len(inputs)}} given')"]
    if inputs:
        lines.append("    " + ", ".join(f"v{index[n.name]}" for n in inputs) + (", = inputs" if len(inputs) == 1 else " = inputs"))
    for i, n in enumerate(g.nodes):
        v = f"v{i}"
        if n.op is Op.INPUT:
            pass
        elif n.op is Op.PARAM:
            lines.append(f"    {v} = W({const(n.attrs['name'])})" if n.name in interp._value_params else f"    {v} = None")
        elif n.op in LINEAR_OPS:
            bias = "None"
            if len(n.args) > 2 and n.args[2]:
                bias = f"W({const(by_name[n.args[2].name].attrs['name'])})"
            lines.append(f"    {v} = LIN({const(n)}, {expr(n.args[0])}, {bias})")
        elif n.op is Op.EMBED:
            lines.append(f"    {v} = EMB({expr(n.args[0])}, W({const(by_name[n.args[1].name].attrs['name'])}))")
        elif n.op is Op.RMSNORM:
            w = const(by_name[n.args[1].name].attrs["name"])
            lines.append(f"    {v} = RMS({expr(n.args[0])}, W({w}), {const(n.attrs['eps'])})")
        elif n.op is Op.OUTPUT:
            outs = [expr(a) for a in n.args]
            single = n.attrs.get("single", len(outs) == 1)
            lines.append(f"    return {outs[0]}" if single else f"    return ({', '.join(outs)},)")
            break
        elif n.op in TARGET_OPS or n.op is Op.FUSED:
            args = ", ".join(expr(a) for a in n.args)
            # keyword names come from the artifact: only plain ASCII identifiers (Python NFKC-folds others) go in the source
            kwargs = ", ".join(f"{k}={expr(x)}" if k.isascii() and k.isidentifier() and not keyword.iskeyword(k)
                               else f"**{{{const(k)}: {expr(x)}}}" for k, x in n.kwargs.items())
            lines.append(f"    {v} = FN[{i}]({', '.join(p for p in (args, kwargs) if p)})")
        else:
            raise NotImplementedError(f"no code for op {n.op.value}")
        dead = [f"v{index[name]}" for name in interp._free_after.get(i, ()) if index[name] != i]
        if dead:
            lines.append(f"    del {', '.join(dead)}")
    fns = {index[name]: fn for name, fn in interp._fns.items()}
    scope = {"K": consts, "W": interp.weight, "LIN": interp._linear, "EMB": F.embedding, "RMS": rmsnorm, "FN": fns}
    exec(compile("\n".join(lines), f"<xbitc graph {id(g):x}>", "exec"), scope)  # noqa: S102 - source built above
    run = scope["_run"]

    def call(*args: Any) -> Any:
        with torch.no_grad():
            return run(*args)

    call.source = "\n".join(lines)  # type: ignore[attr-defined]
    return call


def _has_ref(v: Any) -> bool:
    return next(_refs(v), None) is not None
