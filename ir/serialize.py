"""JSON form of the graph (nodes, types, attrs). Parameters are stored separately (safetensors)."""
from __future__ import annotations

import json
import math
from typing import Any

import torch

from .graph import TARGET_OPS, Graph, Node, Op, Ref, TensorType
from .targets import UnknownTarget, in_place_errors, resolve

FORMAT_VERSION = 1


class GraphFormatError(ValueError):
    """A stored graph is malformed or names an operator outside the closed lists; the message names the node."""


def encode_value(v: Any) -> Any:
    if isinstance(v, Ref):
        return {"ref": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, tuple):
        return {"tuple": [encode_value(x) for x in v]}
    if isinstance(v, list):
        return [encode_value(x) for x in v]
    if isinstance(v, dict):
        return {"dict": {k: encode_value(x) for k, x in v.items()}}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": "cpu"}  # artifacts are device independent; backends place tensors
    if isinstance(v, torch.layout):
        return {"layout": str(v).removeprefix("torch.")}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    raise TypeError(f"cannot serialise a {type(v).__name__} in the IR: {v!r}")


def decode_value(v: Any) -> Any:
    if isinstance(v, list):
        return [decode_value(x) for x in v]
    if not isinstance(v, dict):
        return v
    (key, val), = v.items()
    if key == "ref":
        return Ref(val)
    if key == "float":
        return float(val)
    if key == "tuple":
        return tuple(decode_value(x) for x in val)
    if key == "dict":
        return {k: decode_value(x) for k, x in val.items()}
    if key in ("dtype", "layout", "memory_format"):
        obj = getattr(torch, val, None)
        expected = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}[key]
        if not isinstance(obj, expected):
            raise ValueError(f"unknown torch {key} {val!r}")
        return obj
    if key == "device":
        return torch.device("cpu")
    raise ValueError(f"unknown encoded value {v!r}")


def graph_to_dict(g: Graph) -> dict:
    return {
        "format": FORMAT_VERSION,
        "meta": encode_value(g.meta)["dict"],
        "nodes": [
            {
                "name": n.name,
                "op": n.op.value,
                "args": [encode_value(a) for a in n.args],
                "kwargs": {k: encode_value(a) for k, a in n.kwargs.items()},
                "attrs": {k: encode_value(a) for k, a in n.attrs.items()},
                "type": None if n.type is None else {"shape": list(n.type.shape), "dtype": n.type.dtype},
            }
            for n in g.nodes
        ],
    }


def graph_from_dict(d: dict, params: dict | None = None) -> Graph:
    """Read a stored graph. Every operator is checked against the closed lists (ir/targets.py) here, before anything
    can run, and any malformed field is refused with the node it is in."""
    if not isinstance(d, dict) or d.get("format") != FORMAT_VERSION:
        found = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise GraphFormatError(f"IR format {found!r} is not supported (this xbitc reads {FORMAT_VERSION})")
    if not isinstance(d.get("nodes"), list) or not isinstance(d.get("meta"), dict):
        raise GraphFormatError("the graph needs a list of nodes and a meta object")
    nodes = [_node_from_dict(i, nd) for i, nd in enumerate(d["nodes"])]
    writes = in_place_errors(nodes)
    if writes:
        raise GraphFormatError(f"{writes[0]}; refused")
    try:
        meta = {k: decode_value(v) for k, v in d["meta"].items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise GraphFormatError(f"graph meta: {err}") from None
    return Graph(nodes=nodes, params=dict(params or {}), meta=meta)


def _node_from_dict(index: int, nd: Any) -> Node:
    label = f"node {index}" + (f" ({nd.get('name')!r})" if isinstance(nd, dict) else "")
    try:
        t = nd["type"]
        node = Node(
            name=_str(nd["name"]),
            op=Op(nd["op"]),
            args=tuple(decode_value(a) for a in _of(nd["args"], list)),
            kwargs={_str(k): decode_value(a) for k, a in _of(nd["kwargs"], dict).items()},
            attrs={_str(k): decode_value(a) for k, a in _of(nd["attrs"], dict).items()},
            type=None if t is None else TensorType(tuple(_of(t["shape"], list)), _str(t["dtype"])),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise GraphFormatError(f"{label}: malformed ({type(err).__name__}: {err})") from None
    if node.op in TARGET_OPS:
        try:
            resolve(node.attrs.get("target"))
        except UnknownTarget as err:
            raise GraphFormatError(f"{label}, op {node.op.value}: {err}; refused") from None
    elif node.op is Op.FUSED:
        raise GraphFormatError(f"{label}: fused nodes are made at load time and never stored; refused")
    return node


def _of(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"expected a {kind.__name__}, found {type(value).__name__}")
    return value


def _str(value: Any) -> str:
    return _of(value, str)


def dumps(g: Graph) -> str:
    return json.dumps(graph_to_dict(g), separators=(",", ":"), sort_keys=False)


def loads(s: str, params: dict | None = None) -> Graph:
    return graph_from_dict(json.loads(s), params)
