"""Load-time simplification of a graph for inference: fewer dispatched ops, the same bits.

A traced transformer runs ~60 small aten ops per layer besides its linears; in a one-token decode step each costs a
few microseconds of dispatch, more in total than the packed linears. `simplify` rewrites a copy of the graph when a
backend lowers it to a Program, so every existing artifact gets faster without recompiling and graph.json stays as
traced; passes, calibration hooks and the interpreter oracle keep running the traced graph.

Every rewrite computes the same float operations on the same values (outputs are bit-identical, tests/test_fuse.py),
and a pattern that differs in any detail (another eps form, a missing norm weight, other slices) is left alone:
  - no-ops forwarded to their input: alias/detach/detach_, `to` the dtype the value already has (which returns its
    input), lift_fresh_copy of a constant, and cat with an empty 1-D constant (torch skips those: export's empty
    DynamicCache). The copies among them are dropped only when no node writes in place.
  - common subexpressions of pure ops merged (every layer re-unsqueezes the shared cos/sin).
  - HF RMSNorm (to float, pow, mean, add eps, rsqrt, mul, to dtype, mul weight) -> Op.RMSNORM, whose function
    (ir.interp.rmsnorm) runs exactly those ops.
  - HF rotary, x*cos + cat(-x2, x1)*sin (7 ops) -> `rope` (4 ops): x*cos + roll(x)*sin', the sign moved from x2
    onto sin' (computed once per graph, shared by every layer): (-a)*b == a*(-b) exactly in IEEE arithmetic.
  - GQA repeat_kv (unsqueeze, expand, reshape: a copy of every head n times) -> `repeat_kv`, one repeat_interleave
    when the sizes are what it assumes at run time, else the original three ops; and when both of an attention's
    keys and values are such copies, `gqa_attention`: the same sdpa with enable_gqa, no copies.
  - the remaining views, cat, silu and tensor-tensor add/mul called through torch's Python bindings, which reach
    the same aten operator 1-2 us sooner than an OpOverload call.

Dtypes come from the node types recorded at trace time: a graph runs with the dtypes it was traced with.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from .graph import Graph, Node, Op, Ref

# ----------------------------------------------------------------------------------------------- fused kernels


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sin_signed: torch.Tensor, half: int) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin, with rotate_half's negation carried by sin_signed = rope_sin(sin, half) when the
    last dims are the 2*half the graph's types say (checked: cheap), else HF's ops as traced."""
    if x.shape[-1] == 2 * half == sin.shape[-1]:
        return x * cos + x.roll(half, -1) * sin_signed  # roll by half: cat(x[..., half:], x[..., :half])
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def rope_sin(sin: torch.Tensor, half: int) -> torch.Tensor:
    return torch.cat((-sin[..., :half], sin[..., half:]), -1)


def repeat_kv(x: torch.Tensor, sizes: list, shape: list) -> torch.Tensor:
    """x.unsqueeze(2).expand(sizes).reshape(shape): with sizes [b, h, n, s, d] over x [b, h, s, d] that is every
    head repeated n times, a plain copy that repeat_interleave makes in one op (checked per call: the sizes are
    symbolic in the graph)."""
    if _repeats(x, sizes, shape):
        return x.repeat_interleave(sizes[2], 1)
    return x.unsqueeze(2).expand(sizes).reshape(shape)


def _repeats(x: torch.Tensor, sizes: list, shape: list) -> bool:
    b, h, s, d = x.shape
    n = sizes[2]
    return list(sizes) == [b, h, n, s, d] and list(shape) == [b, h * n, s, d]


_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def gqa_attention(q: torch.Tensor, k: torch.Tensor, ksizes: list, kshape: list, v: torch.Tensor, vsizes: list,
                  vshape: list, *args: Any, **kwargs: Any) -> torch.Tensor:
    """scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), ...) without the copies: with enable_gqa the
    same CPU flash-attention kernel reads kv head h // n for query head h, which is what the copies hold there."""
    if (_repeats(k, ksizes, kshape) and _repeats(v, vsizes, vshape) and ksizes[2] == vsizes[2]
            and q.dim() == 4 and q.shape[1] == kshape[1]):
        return _SDPA(q, k, v, *args, enable_gqa=True, **kwargs)
    return _SDPA(q, repeat_kv(k, ksizes, kshape), repeat_kv(v, vsizes, vshape), *args, **kwargs)


# aten ops that torch's Python bindings reach about 1-2 us faster than an OpOverload call (which converts its
# arguments through the op schema); same operator, same overload for these argument kinds, same result
_DIRECT = {
    "aten.view.default": torch.Tensor.view, "aten.reshape.default": torch.Tensor.reshape,
    "aten.transpose.int": torch.Tensor.transpose, "aten.unsqueeze.default": torch.Tensor.unsqueeze,
    "aten.permute.default": torch.Tensor.permute, "aten.expand.default": torch.Tensor.expand,
    "aten.silu.default": torch.nn.functional.silu, "aten.cat.default": torch.cat,
    "aten.mul.Tensor": torch.mul, "aten.add.Tensor": torch.add,
}

# what a FUSED node's attrs["kernel"] may name (never a function named by a graph file)
KERNELS: dict[str, Callable[..., Any]] = {"rope": rope, "rope_sin": rope_sin, "repeat_kv": repeat_kv,
                                          "gqa_attention": gqa_attention, **_DIRECT}

# ----------------------------------------------------------------------------------------------- the rewrite

_MUL, _ADD, _TO = "aten.mul.Tensor", "aten.add.Tensor", "aten.to.dtype"
_OUTSIDE = (Op.INPUT, Op.PARAM)  # runtime dtype may differ from the recorded one: the caller's; float32
_VIEWS = {"aten.alias.default", "aten.detach.default", "aten.detach_.default"}  # return their input's values
# deterministic, side-effect free: safe to merge when equal and to drop when unused
_PURE = {
    "aten.unsqueeze.default", "aten.slice.Tensor", "aten.expand.default", "aten.view.default",
    "aten.reshape.default", "aten.transpose.int", "aten.permute.default", "aten.sym_size.int", _TO,
    _MUL, _ADD, "aten.neg.default", "aten.cos.default", "aten.sin.default", "aten.arange.default",
    "aten.cat.default", "aten.le.Tensor", "operator.add", "aten.pow.Tensor_Scalar", "aten.mean.dim",
    "aten.rsqrt.default",
}


def simplify(g: Graph) -> Graph:
    """A new graph over the same parameters computing the same outputs with fewer ops; `g` is not modified."""
    original = g.by_name()
    copies_ok = not any(_writes_in_place(n.attrs.get("target")) for n in g.nodes)
    nodes = _forward_and_merge(g, copies_ok)
    nodes = _fuse(nodes)
    nodes = _drop_dead(nodes)
    by = {n.name: n for n in nodes}
    nodes = [_direct(n, by) for n in nodes]
    # a dropped copy must not make an output the caller's input or a stored weight itself: copy it there
    by = {n.name: n for n in nodes}
    out = nodes[-1]
    if out.op is Op.OUTPUT:
        args, extra = [], []
        for a, was in zip(out.args, original[out.name].args):
            if isinstance(a, Ref) and a != was and by[a.name].op in (Op.INPUT, Op.PARAM):
                c = Node(f"{a.name}__out_copy{len(extra)}", Op.TORCH_OP, (a,),
                         attrs={"target": "aten.clone.default"}, type=by[a.name].type)
                extra.append(c)
                a = Ref(c.name)
            args.append(a)
        if extra:
            nodes[-1:] = extra + [dataclasses.replace(out, args=tuple(args))]
    return Graph(nodes=nodes, params=g.params, meta=g.meta, step=g.step)


def _writes_in_place(target: Any) -> bool:
    if not isinstance(target, str) or not target.startswith("aten."):
        return False
    _, op, overload = (target.split(".") + ["", ""])[:3]
    if op.startswith("__"):  # __and__ computes, __iand__ writes
        return op.startswith("__i")
    return (op.endswith("_") and op != "detach_") or overload.startswith("out")


def _forward_and_merge(g: Graph, copies_ok: bool) -> list[Node]:
    """Drop no-ops and repeated pure ops, pointing their users at the value they equal."""
    fwd: dict[str, Ref] = {}
    by: dict[str, Node] = {}
    seen: dict[Any, str] = {}
    kept: list[Node] = []
    for n in g.nodes:
        n = _substituted(n, fwd)
        src = _noop_source(n, by, g.params, copies_ok)
        if src is None and copies_ok and n.attrs.get("target") in _PURE:
            key = (n.op, n.attrs["target"], _freeze(n.args), _freeze(n.kwargs))
            if key in seen:
                src = Ref(seen[key])
            else:
                seen[key] = n.name
        if src is not None:
            fwd[n.name] = src
            continue
        by[n.name] = n
        kept.append(n)
    return kept


def _noop_source(n: Node, by: dict[str, Node], params: dict, copies_ok: bool) -> Ref | None:
    t = n.attrs.get("target")
    a = n.args
    if t in _VIEWS and len(a) == 1 and isinstance(a[0], Ref) and not n.kwargs:
        return a[0]
    if t == _TO and len(a) == 2 and isinstance(a[0], Ref) and not n.kwargs and by[a[0].name].op not in _OUTSIDE:
        # `to` its own dtype returns the tensor itself. Inputs come in the caller's dtypes and parameters run as
        # float32 whatever their recorded type, so casts of those stay.
        if isinstance(a[1], torch.dtype) and _dtype(by[a[0].name]) == _dtype_name(a[1]):
            return a[0]
    if not copies_ok:
        return None
    if t == "aten.lift_fresh_copy.default" and len(a) == 1 and isinstance(a[0], Ref) and by[a[0].name].op is Op.PARAM:
        return a[0]
    if t == "aten.cat.default" and a and isinstance(a[0], (list, tuple)) and not n.kwargs:
        # torch.cat skips 1-D empty tensors; parameters run as float32, so another float32 operand is unchanged
        rest = [r for r in a[0] if not (isinstance(r, Ref) and _is_empty_1d(by[r.name], params))]
        if len(rest) == 1 and len(a[0]) > 1 and isinstance(rest[0], Ref) and _dtype(by[rest[0].name]) == "float32":
            return rest[0]
    return None


def _is_empty_1d(n: Node, params: dict) -> bool:
    if n.op is not Op.PARAM:
        return False
    v = params.get(n.attrs.get("name"))
    return isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == 0 and v.is_floating_point()


# ----------------------------------------------------------------------------------------------- fusions


class _View:
    """Pattern-matching helpers over the current node list."""

    def __init__(self, nodes: list[Node]):
        self.by = {n.name: n for n in nodes}
        self.uses: dict[str, int] = {}
        for n in nodes:
            for r in n.refs():
                self.uses[r] = self.uses.get(r, 0) + 1

    def op(self, v: Any, target: str, nargs: tuple[int, ...]) -> Node | None:
        """The node `v` refers to when it is a kwargs-free `target` with that many args, used only once."""
        if not isinstance(v, Ref):
            return None
        n = self.by[v.name]
        if n.attrs.get("target") != target or n.kwargs or len(n.args) not in nargs or self.uses.get(n.name) != 1:
            return None
        return n


def _fuse(nodes: list[Node]) -> list[Node]:
    view = _View(nodes)
    out: list[Node] = []
    made: dict[tuple[str, int], Ref] = {}  # (sin, half) -> the node computing rope_sin, shared by every layer
    for n in nodes:
        new = _rmsnorm(view, n) or _repeat_kv(view, n) or _gqa_attention(view, n)
        if new is None and (m := _rope(view, n)) is not None:
            x, cos, sin, half = m
            key = (sin.name, half)
            if key not in made:
                s = Node(f"{sin.name}__rope_sin{half}", Op.FUSED, (sin, half), attrs={"kernel": "rope_sin"},
                         type=view.by[sin.name].type)
                out.append(s)
                made[key] = Ref(s.name)
            new = Node(n.name, Op.FUSED, (x, cos, sin, made[key], half), attrs={"kernel": "rope"}, type=n.type)
        if new is not None:
            view.by[n.name] = new  # later patterns see the fused node, so they never overlap this one
            n = new
        out.append(n)
    return out


def _rmsnorm(v: _View, n: Node) -> Node | None:
    """weight * (xf * rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), xf = x.float() -> RMSNORM(x, w)."""
    if n.attrs.get("target") != _MUL or n.kwargs or len(n.args) != 2:
        return None
    for w, y in (n.args, n.args[::-1]):
        if isinstance(w, Ref) and v.by[w.name].op is Op.PARAM:
            break
    else:
        return None
    cast = v.op(y, _TO, (2,))
    z = v.op(cast.args[0], _MUL, (2,)) if cast else v.op(y, _MUL, (2,))
    if z is None:
        return None
    for xf, r in (z.args, z.args[::-1]):
        rs = v.op(r, "aten.rsqrt.default", (1,))
        if rs is not None and isinstance(xf, Ref):
            break
    else:
        return None
    add = v.op(rs.args[0], _ADD, (2,))
    mean = add and v.op(add.args[0], "aten.mean.dim", (3,))
    sq = mean and v.op(mean.args[0], "aten.pow.Tensor_Scalar", (2,))
    if not sq or sq.args != (xf, 2) or type(sq.args[1]) is not int or mean.args[2] is not True:
        return None
    eps, dims, rank = add.args[1], mean.args[1], _rank(v.by[xf.name])
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or rank is None:
        return None
    if not isinstance(dims, (list, tuple)) or list(dims) not in ([-1], [rank - 1]):
        return None
    # x is what xf is the float32 form of; the result is cast back to x's dtype, as rmsnorm does
    xf_node = v.by[xf.name]
    lead = xf_node.attrs.get("target") == _TO and len(xf_node.args) == 2 and not xf_node.kwargs
    if lead and xf_node.args[1] is torch.float32 and isinstance(xf_node.args[0], Ref):
        x = xf_node.args[0]
    elif _dtype(xf_node) == "float32":
        x = xf
    else:
        return None
    out_dtype = _dtype_name(cast.args[1]) if cast else "float32"
    xn = v.by[x.name]
    if xn.op in _OUTSIDE or _dtype(xn) is None or _dtype(xn) != out_dtype:
        return None
    return Node(n.name, Op.RMSNORM, (x, w), attrs={"eps": eps}, type=n.type)


def _rope(v: _View, n: Node) -> tuple[Ref, Any, Ref, int] | None:
    """x*cos + cat(-x[..., h:], x[..., :h], -1)*sin (any operand order) -> (x, cos, sin, h)."""
    if n.attrs.get("target") != _ADD or n.kwargs or len(n.args) != 2:
        return None
    for a, b in (n.args, n.args[::-1]):
        mb = v.op(b, _MUL, (2,))
        for rh, sin in (mb.args, mb.args[::-1]) if mb else ():
            cat = v.op(rh, "aten.cat.default", (2,))
            if cat is None or not isinstance(cat.args[0], (list, tuple)) or len(cat.args[0]) != 2:
                continue
            neg = v.op(cat.args[0][0], "aten.neg.default", (1,))
            hi = neg and v.op(neg.args[0], "aten.slice.Tensor", (4,))
            lo = v.op(cat.args[0][1], "aten.slice.Tensor", (4,))
            if not (hi and lo and isinstance(hi.args[0], Ref) and hi.args[0] == lo.args[0] and isinstance(sin, Ref)):
                continue
            x = hi.args[0]
            xn, sn = v.by[x.name], v.by[sin.name]
            rank, d = _rank(xn), _last(xn)
            if d is None or d % 2 or _last(sn) != d:
                continue
            h = d // 2
            last = (-1, rank - 1)
            if (cat.args[1] not in last or hi.args[1] not in last or lo.args[1] not in last
                    or hi.args[2] != h or not (isinstance(hi.args[3], int) and hi.args[3] >= d)
                    or lo.args[2] != 0 or lo.args[3] != h):
                continue
            ma = v.op(a, _MUL, (2,))
            if ma is None or x not in ma.args:
                continue
            cos = ma.args[1] if ma.args[0] == x else ma.args[0]
            return x, cos, sin, h
    return None


def _repeat_kv(v: _View, n: Node) -> Node | None:
    """reshape(expand(unsqueeze(x, 2), sizes), shape) with x 4-D -> repeat_kv(x, sizes, shape)."""
    if n.attrs.get("target") != "aten.reshape.default" or n.kwargs or len(n.args) != 2:
        return None
    ex = v.op(n.args[0], "aten.expand.default", (2,))
    un = ex and v.op(ex.args[0], "aten.unsqueeze.default", (2,))
    if not un or un.args[1] != 2 or not isinstance(un.args[0], Ref) or _rank(v.by[un.args[0].name]) != 4:
        return None
    sizes, shape = ex.args[1], n.args[1]
    if not isinstance(sizes, (list, tuple)) or not isinstance(shape, (list, tuple)):
        return None
    if (len(sizes), len(shape)) != (5, 4):
        return None
    return Node(n.name, Op.FUSED, (un.args[0], sizes, shape), attrs={"kernel": "repeat_kv"}, type=n.type)


def _gqa_attention(v: _View, n: Node) -> Node | None:
    """sdpa(q, repeat_kv(k), repeat_kv(v), ...) -> gqa_attention(q, k, sizes, shape, v, sizes, shape, ...)."""
    if n.attrs.get("target") != "aten.scaled_dot_product_attention.default" or len(n.args) < 3:
        return None
    if "enable_gqa" in n.kwargs or any(not isinstance(a, Ref) for a in n.args[:3]):
        return None
    k, val = (v.by[a.name] for a in n.args[1:3])
    if not all(r.op is Op.FUSED and r.attrs["kernel"] == "repeat_kv" and v.uses.get(r.name) == 1 for r in (k, val)):
        return None
    return Node(n.name, Op.FUSED, (n.args[0], *k.args, *val.args, *n.args[3:]), dict(n.kwargs),
                attrs={"kernel": "gqa_attention"}, type=n.type)


def _direct(n: Node, by: dict[str, Node]) -> Node:
    """An op in _DIRECT called through torch's Python binding, when its arguments are ones both calls read alike."""
    t = n.attrs.get("target")
    first = list if t == "aten.cat.default" else Ref
    if t not in _DIRECT or n.kwargs or not n.args or not isinstance(n.args[0], first):
        return n
    if t == "aten.silu.default" and len(n.args) != 1:
        return n
    if t in ("aten.mul.Tensor", "aten.add.Tensor"):  # tensor operands only: no Python numbers to wrap differently
        if len(n.args) != 2 or not all(isinstance(a, Ref) and _is_tensor(by[a.name]) for a in n.args):
            return n
    return Node(n.name, Op.FUSED, n.args, attrs={"kernel": t}, type=n.type)


def _drop_dead(nodes: list[Node]) -> list[Node]:
    """Remove pure nodes nothing reads any more (the insides of fused patterns), last to first."""
    used: set[str] = set()
    kept = []
    for n in reversed(nodes):
        if n.name in used or not (n.op is Op.FUSED or n.attrs.get("target") in _PURE):
            kept.append(n)
            used.update(n.refs())
    return kept[::-1]


# ----------------------------------------------------------------------------------------------- helpers


def _substituted(n: Node, fwd: dict[str, Ref]) -> Node:
    if not fwd or not any(r in fwd for r in n.refs()):
        return n
    def sub(v: Any) -> Any:
        if isinstance(v, Ref):
            return fwd.get(v.name, v)
        if isinstance(v, (list, tuple)):
            return type(v)(sub(x) for x in v)
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        return v

    return dataclasses.replace(n, args=sub(n.args), kwargs=sub(n.kwargs))


def _freeze(v: Any) -> Any:
    """A hashable key that tells apart values torch treats differently (1 / 1.0 / True, list / tuple)."""
    if isinstance(v, Ref):
        return ("ref", v.name)
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_freeze(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple((k, _freeze(x)) for k, x in v.items()))
    return (type(v).__name__, repr(v))


def _is_tensor(n: Node) -> bool:
    return n.op is Op.PARAM or (n.type is not None and not n.type.dtype.startswith("sym"))


def _dtype_name(d: Any) -> str | None:
    return str(d).removeprefix("torch.") if isinstance(d, torch.dtype) else None


def _dtype(n: Node) -> str | None:
    return n.type.dtype if n.type is not None else None


def _rank(n: Node) -> int | None:
    return len(n.type.shape) if n.type is not None else None


def _last(n: Node) -> int | None:
    """The last dimension's size when it is static (not symbolic)."""
    if n.type is None or not n.type.shape or not isinstance(n.type.shape[-1], int):
        return None
    return n.type.shape[-1]
