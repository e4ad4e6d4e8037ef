"""Naming and resolving the operators that TORCH_OP-style nodes execute: a closed, explicit list.

A target is stored as a string: "aten.mul.Tensor" for torch operator overloads, "operator.getitem" / "math.ceil" /
"torch.sym_float" for Python callables that torch.export leaves in graphs. An artifact is data, never code, so the
operators a graph may name are the pure tensor and scalar operators listed below: no I/O (`aten.from_file`), no
interpreter access (`builtins.*`), no serialization (`torch.load`), nothing that takes or returns callables. Names
are checked against the lists *before* any attribute lookup, so no string can walk to an object outside them.
Tracing refuses to write any other operator (`target_name`) and loading refuses to read one (`resolve`).
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch

# aten operator packets (every non-`out` overload of each): arithmetic, comparison, activations, reductions,
# views and layout, indexing, creation of constant or index tensors, normalization, attention, convolution.
ATEN_OPS = frozenset("""
    abs acos acosh add add_ addcdiv addcmul addmm alias all amax amin any arange argmax argmin asin asinh
    atan atan2 atanh avg_pool1d avg_pool2d baddbmm bitwise_and bitwise_not bitwise_or bitwise_xor bmm broadcast_to
    bucketize cat ceil chunk clamp clamp_max clamp_min clip clone constant_pad_nd contiguous conv1d conv2d conv3d
    convolution copy copy_ cos cosh cumprod cumsum detach detach_ diff div div_ dropout einsum elu embedding
    eq erf exp exp2 expand expand_as expm1 fill fill_ flatten flip floor floor_divide fmod full full_like
    gather ge gelu glu group_norm gt hardsigmoid hardswish hardtanh index index_put index_put_ index_select isinf isnan
    layer_norm le leaky_relu lerp lift_fresh_copy linear log log10 log1p log2 log_softmax logical_and logical_not
    logical_or logical_xor logsumexp lt masked_fill masked_fill_ matmul max max_pool1d max_pool2d maximum mean min
    minimum mm mul mul_ native_dropout native_group_norm native_layer_norm ne neg new_full new_ones
    new_zeros nonzero norm ones ones_like pad permute pow prod reciprocal relu remainder repeat repeat_interleave
    reshape roll round rsqrt rsub scalar_tensor scaled_dot_product_attention scatter scatter_add select sigmoid sign
    silu sin sinh slice softmax softplus sort split split_with_sizes sqrt square squeeze stack std sub sub_ sum
    sym_numel sym_size sym_stride t tan tanh tensor_split topk transpose tril triu trunc type_as unbind unflatten
    unsqueeze var view where zeros zeros_like
    __and__ __or__ __xor__ __lshift__ __rshift__ _assert_tensor_metadata _log_softmax _softmax _to_copy
    _unsafe_view _native_batch_norm_legit_no_training native_batch_norm batch_norm to
    erfc erfinv lgamma digamma logit sinc hypot xlogy nan_to_num i0 frac special_erfcx special_expit special_logit
    special_xlogy special_i0 special_ndtr special_ndtri special_log_ndtr
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool1d adaptive_max_pool2d _adaptive_avg_pool2d
    max_pool1d_with_indices max_pool2d_with_indices upsample_nearest1d upsample_nearest2d upsample_bilinear2d
    upsample_linear1d upsample_bicubic2d linalg_vector_norm instance_norm conv_transpose1d conv_transpose2d
    conv_transpose3d mish pixel_shuffle pixel_unshuffle
""".split())

# In-place operators traced graphs contain (detach_ by HF's rotary code, add_ by T5's position bias). They write
# their first operand, which ir/verify.py requires to be a value the graph made itself, never a parameter or input.
IN_PLACE = frozenset("detach_ add_ sub_ mul_ div_ masked_fill_ fill_ index_put_ copy_".split())

# Python callables torch.export leaves for symbolic sizes and tuple results: pure functions of numbers.
PY_CALLABLES: dict[str, Callable] = {
    **{f"operator.{n}": getattr(operator, n) for n in (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "getitem",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_")},
    **{f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "trunc", "sqrt", "log2")},
    **{f"torch.{n}": getattr(torch, n) for n in (
        "sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite")},
}
_PY_BY_ID = {id(fn): name for name, fn in PY_CALLABLES.items()}


class UnknownTarget(ValueError):
    pass


def _aten_overload(packet: str, overload: str) -> torch._ops.OpOverload | None:
    """The listed operator overload, or None. The overload name must be one torch declares (never an attribute such
    as `__getattribute__` or `_op`), and only IN_PLACE operators may write an argument (`out=` variants never)."""
    if packet not in ATEN_OPS:
        return None
    ops = getattr(torch.ops.aten, packet)
    if overload not in ops.overloads():
        return None
    op = getattr(ops, overload)
    if not isinstance(op, torch._ops.OpOverload):
        return None
    writes = [a for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if writes and (packet not in IN_PLACE or writes != op._schema.arguments[:1]):
        return None
    return op


def writes_first_operand(name: Any) -> bool:
    """Whether the (resolvable) operator `name` writes its first operand in place."""
    parts = name.split(".") if isinstance(name, str) else []
    return len(parts) == 3 and parts[0] == "aten" and parts[1] in IN_PLACE


# operators whose result may share memory with their first operand: writing the result writes that operand
MAY_ALIAS = frozenset("""
    alias broadcast_to chunk contiguous detach detach_ expand expand_as flatten permute reshape select slice split
    split_with_sizes squeeze t tensor_split to transpose type_as unbind unflatten unsqueeze view _unsafe_view
    add_ sub_ mul_ div_ masked_fill_ fill_ index_put_ copy_
""".split()) | {"getitem"}


def in_place_errors(nodes: list) -> list[str]:
    """In-place operators may write only values the graph computed itself: a write that reaches a parameter or an
    input (directly or through views) would change the model's weights or the caller's tensors between calls."""
    by_name = {n.name: n for n in nodes}
    errors = []
    for n in nodes:
        target = n.attrs.get("target")
        if not writes_first_operand(target):
            continue
        src = n.args[0] if n.args else None
        while getattr(src, "name", None) in by_name:
            producer = by_name[src.name]
            if producer.op.value in ("param", "input"):
                errors.append(f"node {n.name!r} ({target}) writes {producer.op.value} %{producer.name} in place")
                break
            packet = str(producer.attrs.get("target") or producer.attrs.get("kernel") or "").split(".")
            if len(packet) < 2 or packet[1] not in MAY_ALIAS or not producer.args:
                break
            src = producer.args[0]
    return errors


def target_name(target: Any) -> str:
    """The stored name of a traced operator; refuses anything outside the closed lists."""
    if isinstance(target, torch._ops.OpOverload):
        packet = target._schema.name.split("::")[1]
        name = f"{target.namespace}.{packet}.{target._overloadname}"
        if target.namespace == "aten" and _aten_overload(packet, target._overloadname) is target:
            return name
        raise UnknownTarget(f"operator {name} is not in xbitc's list of pure tensor operators (ir/targets.py)")
    if isinstance(target, torch._ops.OpOverloadPacket):
        raise UnknownTarget(f"unresolved overload packet {target}")
    name = _PY_BY_ID.get(id(target))
    if name is not None and PY_CALLABLES[name] is target:
        return name
    raise UnknownTarget(f"operator {target!r} is not in xbitc's list of pure tensor operators (ir/targets.py)")


def resolve(name: Any) -> Callable:
    """The function a stored operator name stands for; refuses every name outside the closed lists."""
    if not isinstance(name, str):
        raise UnknownTarget(f"operator name {name!r} is not a string")
    if name in PY_CALLABLES:
        return PY_CALLABLES[name]
    parts = name.split(".")
    op = None
    if len(parts) == 3 and parts[0] == "aten":
        try:
            op = _aten_overload(parts[1], parts[2])
        except (AttributeError, RuntimeError):  # a listed packet this torch does not have
            raise UnknownTarget(f"torch {torch.__version__} has no operator {name!r}") from None
    if op is None:
        raise UnknownTarget(f"operator {name!r} is not in xbitc's list of pure tensor operators")
    return op


def is_resolvable(name: Any) -> bool:
    try:
        resolve(name)
        return True
    except UnknownTarget:
        return False


__all__ = ["target_name", "resolve", "is_resolvable", "writes_first_operand", "UnknownTarget", "ATEN_OPS",
           "PY_CALLABLES", "IN_PLACE", "in_place_errors"]
