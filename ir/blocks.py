"""The sequential block structure of a traced graph: prologue (embedding), repeated layers, head.

A model too large for memory is compiled a block at a time: only one layer's weights, its calibration inputs and its
statistics are held at once. This module finds the blocks and runs one alone.

Layers are found from parameter names (the `prefix.{i}.` shared by the most parameters, e.g. `model.layers.3.`) and
then verified structurally: the graph's nodes are in execution order (torch.export traces forward as it runs), each
layer's nodes must be one contiguous run, and every layer must be the same op sequence reading the same inputs and
the same parameters up to the index. Between two layers the cut goes where the fewest values cross (after the
residual add, before the next norm); the first and last layer are cut at the same offsets from their parameter reads,
so the prologue keeps what all layers share (masks, positions, rotary tables) and the head starts with the final norm.
A graph without such repeated layers is one block.

Each block is a small graph of its own: an INPUT per value it reads from earlier blocks (its stream first, then the
values computed once in the prologue that every layer reads), its PARAM nodes, its nodes unchanged and in order, and
an OUTPUT of every value a later block reads. Running the blocks one after another executes exactly the original ops
in the original order, so the result is bit-identical to running the whole graph.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from .graph import Graph, Node, Op, Ref
from .interp import Interpreter

_LAYER_PARAM = re.compile(r"^(.*?)\.(\d+)\.")


@dataclass
class Block:
    kind: str  # "prologue" | "layer" | "head" | "whole"
    index: int  # the layer number for layers, else -1
    nodes: list[str]  # the original graph's nodes (no PARAM or INPUT placeholders), in order
    params: list[str]  # parameter names the block reads
    inputs: list[str]  # values it reads from earlier blocks (for the prologue / whole graph: the graph's inputs)
    outputs: list[str]  # values later blocks read (for the head / whole graph: the graph's output node)
    graph: Graph = field(repr=False)


@dataclass
class Blocks:
    blocks: list[Block]
    prefix: str = ""  # parameter-name prefix of the layers, e.g. "model.layers."; "" when there are none
    note: str = ""  # why the graph is one block, when it is

    @property
    def layers(self) -> list[Block]:
        return [b for b in self.blocks if b.kind == "layer"]


def layer_of(name: str, prefix: str) -> int | None:
    """The layer index a parameter name belongs to under `prefix` (e.g. "model.layers."), or None."""
    if not prefix or not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def find_blocks(graph: Graph) -> Blocks:
    """Split `graph` into prologue, layers and head, or one whole block saying why not."""
    prefix, note = _layer_prefix(graph)
    cuts = None
    if prefix:
        cuts, note = _cuts(graph, prefix)
    if cuts is None:
        return Blocks([_make_block(graph, "whole", -1, _body(graph, 0, len(graph.nodes)), set())], note=note)
    kinds = ["prologue"] + ["layer"] * (len(cuts) - 1) + ["head"]
    ranges = list(zip([0, *cuts], [*cuts, len(graph.nodes)]))
    shared = _shared_values(graph, ranges)
    blocks = [_make_block(graph, kind, i - 1 if kind == "layer" else -1, _body(graph, lo, hi), shared)
              for i, (kind, (lo, hi)) in enumerate(zip(kinds, ranges))]
    found = Blocks(blocks, prefix=prefix)
    differs = _first_unlike(found)
    if differs is not None:
        note = f"layer {differs} of {prefix}N is not the same op sequence as layer 0"
        return Blocks([_make_block(graph, "whole", -1, _body(graph, 0, len(graph.nodes)), set())], note=note)
    return found


def run_blocks(found: Blocks, *inputs: Any) -> Any:
    """Run the blocks one after another from the graph's inputs; equals Interpreter(graph)(*inputs) exactly."""
    env = dict(zip(found.blocks[0].inputs, inputs))
    for i, block in enumerate(found.blocks):
        out = run_block(block, env)
        if block.kind in ("head", "whole"):
            return out
        env.update(zip(block.outputs, out))
        still = {name for later in found.blocks[i + 1:] for name in later.inputs}
        env = {k: v for k, v in env.items() if k in still}  # free what no later block reads
    raise RuntimeError("the blocks have no head")


def run_block(block: Block, env: dict[str, Any], interp: Interpreter | None = None) -> Any:
    """Run one block from the values of its inputs (`env`: value name -> tensor or size); returns the tuple of its
    outputs (the model's output for the head). `interp` may be an Interpreter over block.graph (hooks, weights)."""
    return (interp or Interpreter(block.graph)).run(*[env[name] for name in block.inputs])


def _layer_prefix(graph: Graph) -> tuple[str, str]:
    """The `prefix.` before a layer index that the most distinct indices share (at least two), or a note."""
    indices: dict[str, set[int]] = {}
    for name in graph.params:
        m = _LAYER_PARAM.match(name)
        if m:
            indices.setdefault(m.group(1) + ".", set()).add(int(m.group(2)))
    if not indices:
        return "", "no parameter name holds a layer index"
    prefix = max(indices, key=lambda p: (len(indices[p]), -len(p)))
    seen = indices[prefix]
    if len(seen) < 2:
        return "", f"one layer only ({prefix}{min(seen)}.)"
    if seen != set(range(len(seen))):
        return "", f"layers {prefix}N are not numbered 0..{len(seen) - 1}"
    return prefix, ""


def _cuts(graph: Graph, prefix: str) -> tuple[list[int] | None, str]:
    """Node positions where the layers start, and where the head starts (last)."""
    nodes = graph.nodes
    param_of = {n.name: n.attrs["name"] for n in nodes if n.op is Op.PARAM}
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, n in enumerate(nodes):
        for r in n.refs():
            layer = layer_of(param_of[r], prefix) if r in param_of else None
            if layer is not None:
                first.setdefault(layer, i)
                last[layer] = i
    count = len(first)
    if any(last[i] >= first[i + 1] for i in range(count - 1)):
        return None, f"the layers {prefix}N are not executed one after another"
    live = _live_counts(graph)
    inner = []
    for i in range(count - 1):  # the cut between layer i and i+1: the fewest values crossing, earliest on ties
        window = range(last[i] + 1, first[i + 1] + 1)
        inner.append(min(window, key=lambda c: (live[c], c)))
    lead = {first[i + 1] - c for i, c in enumerate(inner)}  # nodes of a layer before its first parameter read
    tail = {c - last[i] for i, c in enumerate(inner)}  # nodes after its last parameter read, plus one
    if len(lead) != 1 or len(tail) != 1:
        return None, f"the layers {prefix}N are not cut alike (not one repeated op sequence)"
    start, end = first[0] - lead.pop(), last[count - 1] + tail.pop()
    output = next(i for i, n in enumerate(nodes) if n.op is Op.OUTPUT)
    if start < 1 or end > output:
        return None, f"the layers {prefix}N do not leave room for an embedding and a head"
    return [start, *inner, end], ""


def _live_counts(graph: Graph) -> list[int]:
    """live[c]: how many values (not parameters) are made before node c and read at or after it."""
    nodes = graph.nodes
    pos = {n.name: i for i, n in enumerate(nodes)}
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for r in n.refs():
            last_use[r] = i
    delta = [0] * (len(nodes) + 2)
    for name, use in last_use.items():
        if nodes[pos[name]].op is not Op.PARAM:
            delta[pos[name] + 1] += 1
            delta[use + 1] -= 1
    live, run = [], 0
    for i in range(len(nodes) + 1):
        run += delta[i]
        live.append(run)
    return live


def _body(graph: Graph, lo: int, hi: int) -> list[Node]:
    return [n for n in graph.nodes[lo:hi] if n.op is not Op.PARAM and (lo == 0 or n.op is not Op.INPUT)]


def _shared_values(graph: Graph, ranges: list[tuple[int, int]]) -> set[str]:
    """Values the prologue makes that a layer after the first reads (masks, positions, rotary tables, sizes)."""
    pro_end = ranges[0][1]
    made = {n.name for n in graph.nodes[:pro_end] if n.op is not Op.PARAM}
    return {r for lo, hi in ranges[2:-1] for n in graph.nodes[lo:hi] for r in n.refs() if r in made}


def _make_block(graph: Graph, kind: str, index: int, body: list[Node], shared: set[str]) -> Block:
    by_name = graph.by_name()
    mine = {n.name for n in body}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    needed = [r for n in body for r in n.refs() if r not in mine]
    params = {r for r in needed if by_name[r].op is Op.PARAM}
    outside = sorted({r for r in needed if r not in params}, key=order.__getitem__)
    inputs = [r for r in outside if r not in shared] + [r for r in outside if r in shared]
    if kind in ("prologue", "whole"):
        inputs = [n.name for n in body if n.op is Op.INPUT]
    readers_after = {r for n in graph.nodes[order[body[-1].name] + 1:] for r in n.refs()} if body else set()
    outputs = [n.name for n in body if n.name in readers_after]
    param_nodes = [by_name[r] for r in sorted(params, key=order.__getitem__)]
    head = [Node(r, Op.INPUT, type=by_name[r].type) for r in inputs] if kind not in ("prologue", "whole") else []
    nodes = head + [replace(n) for n in param_nodes] + [replace(n) for n in body]
    if kind not in ("head", "whole"):
        nodes.append(Node(f"{kind}_{index}_out", Op.OUTPUT, args=tuple(Ref(o) for o in outputs), attrs={"single": False}))
    names = [n.attrs["name"] for n in param_nodes]
    sub = Graph(nodes=nodes, params={k: graph.params[k] for k in names}, meta=dict(graph.meta))
    return Block(kind, index, [n.name for n in body], names, inputs, outputs, sub)


def _first_unlike(found: Blocks) -> int | None:
    """The first layer whose op sequence, inputs and parameter roles differ from layer 0's, or None."""
    layers = found.layers
    want = _signature(layers[0], found.prefix)
    for b in layers[1:]:
        if _signature(b, found.prefix) != want:
            return b.index
    return None


def _signature(block: Block, prefix: str) -> tuple:
    values = [n for n in block.graph.nodes if n.op is not Op.PARAM]
    local = {n.name: i for i, n in enumerate(values)}
    role = {}  # a parameter by its name inside the layer ("self_attn.q_proj.weight"), others by their full name
    for n in block.graph.nodes:
        if n.op is Op.PARAM:
            name = n.attrs["name"]
            inner = name[len(prefix):].split(".", 1)[-1] if layer_of(name, prefix) is not None else name
            role[n.name] = ("param", inner)

    def sig(v: Any) -> Any:
        if isinstance(v, Ref):
            return role[v.name] if v.name in role else ("ref", local[v.name])
        if isinstance(v, (list, tuple)):
            return tuple(sig(x) for x in v)
        if isinstance(v, dict):
            return tuple((k, sig(x)) for k, x in v.items())
        return v

    return tuple((n.op.value, n.attrs.get("target"), sig(n.args), sig(n.kwargs),
                  n.type if n.op is not Op.INPUT else None) for n in values)  # a graph input names its sizes
