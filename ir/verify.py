"""The verifier: structural checks for every graph, then one rule per op (a table, as in tinygrad's spec).

The pass manager runs it after every pass, so a pass that breaks the graph is named at once.
"""
from __future__ import annotations

from typing import Callable

import torch

from .fuse import KERNELS
from .graph import LINEAR_OPS, TARGET_OPS, Graph, Node, Op, Ref
from .targets import is_resolvable


class VerifyError(ValueError):
    pass


def _storage_kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return "float" if value.is_floating_point() else "tensor"
    return type(value).__name__  # QuantizedMatrix / PackedMatrix


def _weight_rule(expected: str) -> Callable[[Node, Graph], list[str]]:
    def rule(n: Node, g: Graph) -> list[str]:
        if len(n.args) < 2 or not isinstance(n.args[1], Ref):
            return ["needs (input, weight) arguments"]
        w = g.node(n.args[1].name)
        if w.op is not Op.PARAM:
            return [f"weight %{w.name} is a {w.op.value}, not a param"]
        value = g.params[w.attrs["name"]]
        kind = _storage_kind(value)
        errs = [] if kind == expected else [f"weight {w.attrs['name']} is stored as {kind}, {n.op.value} needs {expected}"]
        if len(value.shape) != 2:
            errs.append(f"weight {w.attrs['name']} has shape {tuple(value.shape)}, expected 2-D")
        if n.op in LINEAR_OPS and len(n.args) > 2 and n.args[2] is not None:
            b = g.params[g.node(n.args[2].name).attrs["name"]]
            if tuple(b.shape) != (value.shape[0],):
                errs.append(f"bias shape {tuple(b.shape)} does not match {value.shape[0]} outputs")
        if n.type is not None and n.op in LINEAR_OPS and n.type.shape and n.type.shape[-1] != value.shape[0]:
            errs.append(f"output type {n.type} does not end in {value.shape[0]} features")
        return errs

    return rule


def _param_rule(n: Node, g: Graph) -> list[str]:
    name = n.attrs.get("name")
    return [] if name in g.params else [f"refers to missing parameter {name!r}"]


def _target_rule(n: Node, g: Graph) -> list[str]:
    t = n.attrs.get("target")
    return [] if isinstance(t, str) and is_resolvable(t) else [f"target {t!r} does not name a known operator"]


def _embed_rule(n: Node, g: Graph) -> list[str]:
    if len(n.args) != 2 or not all(isinstance(a, Ref) for a in n.args):
        return ["needs (indices, table) arguments"]
    w = g.node(n.args[1].name)
    if w.op is not Op.PARAM:
        return [f"table %{w.name} is not a param"]
    kind = _storage_kind(g.params[w.attrs["name"]])
    return [] if kind in ("float", "QuantizedMatrix", "PackedMatrix") else [f"table stored as {kind}"]


RULES: dict[Op, Callable[[Node, Graph], list[str]]] = {
    Op.INPUT: lambda n, g: [] if not n.args else ["inputs take no arguments"],
    Op.PARAM: _param_rule,
    Op.OUTPUT: lambda n, g: [] if n.args else ["output needs at least one value"],
    Op.LINEAR: _weight_rule("float"),
    Op.QLINEAR: _weight_rule("QuantizedMatrix"),
    Op.PACKED_LINEAR: _weight_rule("PackedMatrix"),
    Op.EMBED: _embed_rule,
    Op.RMSNORM: lambda n, g: [] if len(n.args) == 2 and "eps" in n.attrs else ["needs (x, weight) and attrs.eps"],
    Op.FUSED: lambda n, g: [] if n.attrs.get("kernel") in KERNELS else [f"unknown kernel {n.attrs.get('kernel')!r}"],
}
for _op in TARGET_OPS:
    RULES[_op] = _target_rule


def verify(g: Graph) -> None:
    """Raise VerifyError listing every problem found."""
    errors: list[str] = []
    seen: set[str] = set()
    for n in g.nodes:
        if n.name in seen:
            errors.append(f"%{n.name}: name defined twice")
        for r in n.refs():
            if r not in seen:
                errors.append(f"%{n.name}: uses %{r} before it is defined (or it does not exist)")
        seen.add(n.name)
        rule = RULES.get(n.op)
        if rule is None:
            errors.append(f"%{n.name}: no verifier rule for op {n.op.value}")
            continue
        try:
            errors += [f"%{n.name} ({n.op.value}): {e}" for e in rule(n, g)]
        except (KeyError, IndexError, AttributeError) as err:
            errors.append(f"%{n.name} ({n.op.value}): malformed node ({err!r})")
    outputs = [n for n in g.nodes if n.op is Op.OUTPUT]
    if len(outputs) != 1 or (g.nodes and g.nodes[-1].op is not Op.OUTPUT):
        errors.append("graph must end in exactly one output node")
    used = {n.attrs.get("name") for n in g.nodes if n.op is Op.PARAM}
    if g.step is not None:  # parameters only the decode step reads (its constants) are stored for it
        used |= {n.attrs.get("name") for n in g.step.nodes if n.op is Op.PARAM}
    for name in sorted(set(g.params) - used):
        errors.append(f"parameter {name!r} is stored but no node reads it")
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise VerifyError(f"graph failed verification:\n  {shown}{more}")
