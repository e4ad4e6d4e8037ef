"""Naming and resolving the operators that TORCH_OP-style nodes execute.

A target is stored as a string: "aten.mul.Tensor" for torch operator overloads, "operator.getitem" / "math.ceil" /
"torch.sym_float" for Python callables that torch.export leaves in graphs. Resolution only looks into
`torch.ops` and a short allow-list of modules, so loading an artifact can never name arbitrary code to run.
"""
from __future__ import annotations

import importlib
import math
import operator
from typing import Any, Callable

import torch

_PY_MODULES = {"operator": operator, "math": math, "torch": torch, "builtins": __import__("builtins")}


class UnknownTarget(ValueError):
    pass


def target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[1]}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        raise UnknownTarget(f"unresolved overload packet {target}")
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    if module in ("_operator", "operator"):
        module = "operator"
    if module.startswith("torch") and name and getattr(torch, name, None) is target:
        module = "torch"
    if module in _PY_MODULES and name and getattr(_PY_MODULES[module], name, None) is target:
        return f"{module}.{name}"
    raise UnknownTarget(f"operator {target!r} cannot be named in the IR")


def resolve(name: str) -> Callable:
    head, _, rest = name.partition(".")
    if head in _PY_MODULES and head not in ("aten", "prims", "quantized"):
        fn = getattr(_PY_MODULES[head], rest, None)
        if fn is None or "." in rest:
            raise UnknownTarget(f"unknown operator {name!r}")
        return fn
    parts = name.split(".")
    if len(parts) != 3:
        raise UnknownTarget(f"operator name {name!r} is not namespace.op.overload")
    try:
        return getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError) as err:
        raise UnknownTarget(f"torch {torch.__version__} has no operator {name!r}") from err


def is_resolvable(name: str) -> bool:
    try:
        resolve(name)
        return True
    except UnknownTarget:
        return False


__all__ = ["target_name", "resolve", "is_resolvable", "UnknownTarget", "importlib"]
