"""One core graph executed on the device: plan at the inputs' shapes (ir/execplan.py), the launches as kernel calls
(backends/gpu/launches.py), every call recorded into one compute pass and submitted once, outputs read back (or
left on the device: `DeviceTensor`).

Memory: temporaries share one arena buffer, each bound as the sub-range the plan placed it at; the arena and the
scratch buffer (a packed product's gathered activations) grow to the largest call seen and are reused. Inputs get
buffers per call (a `DeviceTensor` input is bound where it is). Outputs written by launches get buffers of their
own, so a value left on the device outlives the next call's reuse of the arena.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xbitc.backends.gpu import launches
from xbitc.backends.gpu.ops import Call, Env, Packed, Scratch
from xbitc.ir.coregraph import CoreGraph
from xbitc.ir.execplan import Plan, plan

from .device import Device
from .weights import DEVICE_NUMPY, Weights, device_array

TORCH_OUT = {"float32": torch.float32, "int32": torch.int64, "bool": torch.bool}  # the graph's types
PLANS_KEPT = 8


class DeviceTensor:
    """A value kept on the device (a decode step's key / value caches): bound in place when passed back as an
    input; `torch()` reads it back."""

    def __init__(self, device: Device, buffer: Any, offset: int, shape: tuple[int, ...], dtype: str):
        self.device, self.buffer, self.offset = device, buffer, offset
        self.shape, self.dtype = tuple(shape), dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 4

    def torch(self) -> torch.Tensor:
        raw = self.device.read_bytes(self.buffer, self.offset, self.nbytes)
        return _to_torch(raw, self.shape, self.dtype)

    def __repr__(self) -> str:
        return f"DeviceTensor({list(self.shape)}, {self.dtype})"


def _to_torch(raw: bytes, shape, dtype: str) -> torch.Tensor:
    a = np.frombuffer(raw, dtype=DEVICE_NUMPY[dtype]).copy().reshape(shape)
    return torch.from_numpy(a).to(TORCH_OUT[dtype]) if dtype != "float32" else torch.from_numpy(a)


@dataclass
class Prepared:
    """A plan at one set of input shapes, its calls and their uniform parameters (one blob, aligned slots)."""

    plan: Plan
    calls: list[tuple[str, Call]]  # (node, call)
    uniforms: bytes
    slots: list[tuple[int, int]]  # (offset, size) of each call's parameters in `uniforms`
    scratch_bytes: int
    dedicated: set[int]  # plan buffers (temporaries) that are outputs: buffers of their own
    state: dict = field(default_factory=dict)  # what the device keeps for these calls (uniform buffer, bindings)


@dataclass
class Bound:
    """One kernel call with its storage bindings resolved to (device buffer, byte offset, byte size); `slot` is the
    (offset, size) of its parameter struct in the Prepared's `uniforms`."""

    node: str
    kernel: Any
    bindings: list[tuple[Any, int, int]]
    slot: tuple[int, int]
    groups: tuple[int, ...]


class _Env(Env):
    def __init__(self, p: Plan, weights: Weights, dedicated: set[int]):
        self.names = {id(v): name for name, v in p.params.items()}
        self.weights, self.plan, self.dedicated = weights, p, dedicated

    def matrix(self, value):
        name = self.names.get(id(value))
        if name is None or value.buffer >= 0:
            return None
        return name, self.weights.packed(name)[0]

    def in_arena(self, value) -> bool:
        return value.buffer >= 0 and self.plan.buffers[value.buffer].role == "temp" and \
            value.buffer not in self.dedicated


class Executor:
    def __init__(self, core: CoreGraph, device: Device, weights: Weights):
        self.core, self.device, self.weights = core, device, weights
        self._prepared: OrderedDict[tuple, Prepared] = OrderedDict()
        self._arena = self._scratch = None
        self._arena_bytes = self._scratch_bytes = 0

    def prepare(self, specs: list[tuple[tuple[int, ...], str]]) -> Prepared:
        key = tuple((tuple(s), d) for s, d in specs)
        if key in self._prepared:
            self._prepared.move_to_end(key)
            return self._prepared[key]
        p = plan(self.core, list(key))
        dedicated = {v.buffer for v in p.outputs if getattr(v, "scalar", 0) is None and v.buffer >= 0
                     and p.buffers[v.buffer].role == "temp"}
        env = _Env(p, self.weights, dedicated)
        calls = [(launch.node, c) for launch in p.launches for c in launches.calls(launch, env)]
        blob, slots = bytearray(), []
        for _, c in calls:
            raw = c.kernel.pack_params(**c.params) if c.kernel.params else b""
            slots.append((len(blob), len(raw)))
            blob += raw + bytes(-len(raw) % self.device.uniform_align)
        scratch = max([b.offset + b.nbytes for _, c in calls for b in c.bind if isinstance(b, Scratch)], default=0)
        prepared = Prepared(p, calls, bytes(blob), slots, scratch, dedicated)
        self._prepared[key] = prepared
        if len(self._prepared) > PLANS_KEPT:
            self._prepared.popitem(last=False)
        return prepared

    def _grow(self, arena: int, scratch: int) -> None:
        if arena > self._arena_bytes or self._arena is None:
            self._arena_bytes = max(arena, self._arena_bytes, 16)
            self._arena = self.device.storage(self._arena_bytes)
        if scratch > self._scratch_bytes or self._scratch is None:
            self._scratch_bytes = max(scratch, self._scratch_bytes, 16)
            self._scratch = self.device.storage(self._scratch_bytes)

    def run(self, inputs: list[Any], resident: set[int] = frozenset()) -> list[Any]:
        """The graph's outputs for `inputs` (torch tensors or DeviceTensors): torch tensors read back, except the
        output positions in `resident`, which stay on the device as DeviceTensors."""
        specs = [(tuple(x.shape), x.dtype if isinstance(x, DeviceTensor) else str(x.dtype).replace("torch.", ""))
                 for x in inputs]
        pr = self.prepare(specs)
        p = pr.plan
        self._grow(p.arena_bytes, pr.scratch_bytes)
        where: dict[int, tuple[Any, int]] = {}  # plan buffer -> (gpu buffer, offset)
        for v, x in zip(p.inputs, inputs):
            where[v.buffer] = (x.buffer, x.offset) if isinstance(x, DeviceTensor) else \
                (self.device.upload(device_array(x)), 0)
        for name, v in p.params.items():
            if v.buffer >= 0:
                where[v.buffer] = (self.weights.dense(name), 0)
        for b in pr.dedicated:
            where[b] = (self.device.storage(p.buffers[b].bytes), 0)

        def resolve(b) -> tuple[Any, int, int]:
            if isinstance(b, Packed):
                buf = self.weights.packed(b.param)[1][b.part]
                return buf, 0, buf.size
            if isinstance(b, Scratch):
                return self._scratch, b.offset, -(-b.nbytes // 16) * 16
            buf, off = where.get(b.buffer) or (self._arena, p.buffers[b.buffer].offset)
            return buf, off, p.buffers[b.buffer].bytes

        self.device.run_calls(pr, [Bound(node, c.kernel, [resolve(b) for b in c.bind], slot, c.groups)
                                   for (node, c), slot in zip(pr.calls, pr.slots)])

        outs: list[Any] = []
        for i, v in enumerate(p.outputs):
            if getattr(v, "scalar", 0) is not None:  # a host number the graph returns
                outs.append(torch.tensor(v.scalar))
                continue
            buf, off = where.get(v.buffer) or (self._arena, p.buffers[v.buffer].offset)
            if i in resident:
                outs.append(DeviceTensor(self.device, buf, off, v.shape, v.dtype))
            else:
                nbytes = math.prod(v.shape) * 4
                outs.append(_to_torch(self.device.read_bytes(buf, off, nbytes), v.shape, v.dtype))
        return outs

