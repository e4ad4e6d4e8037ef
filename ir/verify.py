"""The verifier: structural checks for every graph, then one rule per op (a table, as in tinygrad's spec).

The pass manager runs it after every pass, so a pass that breaks the graph is named at once. Loading an artifact
also runs `dry_run`: the graph on fake tensors, so that what cannot run is refused before the first call.
"""
from __future__ import annotations

import logging
import operator
from typing import Callable

import torch

from .fuse import KERNELS, simplify
from .graph import LINEAR_OPS, TARGET_OPS, Graph, Node, Op, Ref
from .targets import PY_CALLABLES, is_resolvable


class VerifyError(ValueError):
    pass


def _storage_kind(value) -> str:
    from xbitc.lazy import LazyWeight

    if isinstance(value, (torch.Tensor, LazyWeight)):  # a LazyWeight: a tensor still in its checkpoint file
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
    return [] if isinstance(name, str) and name in g.params else [f"refers to missing parameter {name!r}"]


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
            if not isinstance(r, str) or r not in seen:  # a stored {"ref": [...]} is no name
                errors.append(f"%{n.name}: uses %{r} before it is defined (or it does not exist)")
        seen.add(n.name)
        rule = RULES.get(n.op)
        if rule is None:
            errors.append(f"%{n.name}: no verifier rule for op {n.op.value}")
            continue
        try:
            errors += [f"%{n.name} ({n.op.value}): {e}" for e in rule(n, g)]
        except (KeyError, IndexError, AttributeError, TypeError) as err:
            errors.append(f"%{n.name} ({n.op.value}): malformed node ({err!r})")
    outputs = [n for n in g.nodes if n.op is Op.OUTPUT]
    if len(outputs) != 1 or (g.nodes and g.nodes[-1].op is not Op.OUTPUT):
        errors.append("graph must end in exactly one output node")
    used = {n.attrs.get("name") for n in g.nodes if n.op is Op.PARAM and isinstance(n.attrs.get("name"), str)}
    if g.step is not None:  # parameters only the decode step reads (its constants) are stored for it
        used |= {n.attrs.get("name") for n in g.step.nodes if n.op is Op.PARAM and isinstance(n.attrs.get("name"), str)}
    for name in sorted(set(g.params) - used):
        errors.append(f"parameter {name!r} is stored but no node reads it")
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise VerifyError(f"graph failed verification:\n  {shown}{more}")


SYMBOLIC_SIZE = 3  # what a symbolic input size stands for in the dry run (not 0 or 1, which torch specializes)
_INT_LIMIT = 1 << 64  # Python ints a graph computes stay sizes and indices: bigger ones are refused before use
_SIZE_FNS = {fn for name, fn in PY_CALLABLES.items() if name != "operator.getitem"}  # they compute sizes


def dry_run(g: Graph) -> None:
    """Run the graph, simplified as every backend's Program runs it (ir/fuse.py), once on fake tensors (shapes and
    dtypes, no memory, no values) with its inputs' recorded types, symbolic sizes set to SYMBOLIC_SIZE. What cannot
    run for shape or type reasons fails here, at load, and so does any tensor larger than the model's inputs and
    weights can explain (a crafted `full([10**12])`) or any integer past 64 bits (a chain of `operator.mul`/`pow`
    that would otherwise hang in Python's bignums). Raise VerifyError naming the node. Graphs whose inputs carry no
    type are left to the run itself. Not checked: index values, and dtypes a CPU kernel lacks that its meta kernel
    accepts (torch refuses those as the call runs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .interp import Interpreter

    inputs = g.inputs()
    if any(n.type is None for n in inputs):
        return
    where = ["a linear, embedding or norm"]  # the ops the interpreter runs inline; the others name themselves
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # it logs a traceback for every op that fails: the error below says it once
    try:
        with FakeTensorMode():
            xs = [torch.empty([d if isinstance(d, int) else SYMBOLIC_SIZE for d in n.type.shape],
                              dtype=getattr(torch, n.type.dtype)) for n in inputs]
            weights = {name: torch.empty(tuple(v.shape), dtype=_fake_dtype(v)) for name, v in g.params.items()}
            widest = max((max(s, default=0) for s in (tuple(w.shape) for w in weights.values())), default=0)
            n_in = sum(x.numel() for x in xs)
            limit = max(1 << 24, 16 * n_in * max(n_in, widest))  # logits (tokens x vocab), attention (tokens^2)
            interp = Interpreter(simplify(g), weights=weights)  # the graph as every backend's Program runs it
            for node in interp.graph.nodes:
                if node.name in interp._fns:
                    interp._fns[node.name] = _checked(interp._fns[node.name], node, limit, where)
            interp.run(*xs, hook=lambda n, x: where.__setitem__(0, "%" + n.name))  # linears: name them too
    except VerifyError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the op raised, the graph cannot run: say where
        msg = " ".join(str(err).split())[:300]
        raise VerifyError(f"graph failed verification: {where[0]} cannot run on its recorded input types "
                          f"({type(err).__name__}: {msg})") from None
    finally:
        fake_log.setLevel(level)


def _fake_dtype(value) -> torch.dtype:
    if isinstance(value, torch.Tensor) and not value.is_floating_point():
        return value.dtype
    return torch.float32  # materialize() hands every float or quantized weight to the ops as float32


def _checked(fn: Callable, node: Node, limit: int, where: list) -> Callable:
    def run(*args, **kwargs):
        where[0] = "%" + node.name
        if fn is operator.pow and any(isinstance(a, int) and abs(a) > 128 for a in args[1:]):
            raise VerifyError(f"graph failed verification: %{node.name}: integer power {args[1]} is too large")
        if fn is operator.mul and any(isinstance(a, (str, bytes, list, tuple)) for a in args):
            raise VerifyError(f"graph failed verification: %{node.name} repeats a sequence (sizes only multiply numbers)")
        if fn in _SIZE_FNS and any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            # traced tensor arithmetic is aten; Python's operators here would dispatch on dtypes the dry run cannot see
            raise VerifyError(f"graph failed verification: %{node.name} applies a Python operator to a tensor")
        out = fn(*args, **kwargs)
        for v in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(v, torch.Tensor) and v.numel() > limit:
                raise VerifyError(f"graph failed verification: %{node.name} makes a tensor of {v.numel():,} elements "
                                  f"({list(v.shape)}), more than its inputs and weights can explain ({limit:,})")
            if isinstance(v, int) and abs(v) > _INT_LIMIT:
                raise VerifyError(f"graph failed verification: %{node.name} computes an integer beyond 64 bits")
        where[0] = f"a linear, embedding or norm after %{node.name}"
        return out

    return run
