"""JSON form of the graph (nodes, types, attrs). Parameters are stored separately (safetensors)."""
from __future__ import annotations

import json
import math
from typing import Any

import torch

from .graph import Graph, Node, Op, Ref, TensorType

FORMAT_VERSION = 1


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
    if d.get("format") != FORMAT_VERSION:
        raise ValueError(f"IR format {d.get('format')!r} is not supported (this xbitc reads {FORMAT_VERSION})")
    nodes = []
    for nd in d["nodes"]:
        t = nd["type"]
        nodes.append(
            Node(
                name=nd["name"],
                op=Op(nd["op"]),
                args=tuple(decode_value(a) for a in nd["args"]),
                kwargs={k: decode_value(a) for k, a in nd["kwargs"].items()},
                attrs={k: decode_value(a) for k, a in nd["attrs"].items()},
                type=None if t is None else TensorType(tuple(t["shape"]), t["dtype"]),
            )
        )
    return Graph(nodes=nodes, params=dict(params or {}), meta={k: decode_value(v) for k, v in d["meta"].items()})


def dumps(g: Graph) -> str:
    return json.dumps(graph_to_dict(g), separators=(",", ":"), sort_keys=False)


def loads(s: str, params: dict | None = None) -> Graph:
    return graph_from_dict(json.loads(s), params)
