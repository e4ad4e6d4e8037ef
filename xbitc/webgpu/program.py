"""A traced graph as a callable on the device: legalized to core ops once, executed by an Executor per call; the
Program interface of backends/base.py (`__call__`, `companion`), so runtime.CompiledModel runs and generates
through it unchanged."""
from __future__ import annotations

from typing import Any

from xbitc.ir.coregraph import CoreGraph
from xbitc.ir.graph import Graph, Ref
from xbitc.quant.packed import PackedMatrix

from .device import Device
from .executor import Executor
from .weights import Weights


def _kernel_read_params(core: CoreGraph) -> CoreGraph:
    """The graph with every packed parameter that some op other than a linear's or an embedding's matrix reads
    given as its float matrix (only those two ops have packed kernels)."""
    param_of = {n.name: n.attrs["name"] for n in core.nodes if n.op == "param"}
    packed_ok: dict[str, bool] = {}
    for n in core.nodes:
        for j, a in enumerate(n.args):
            refs = a if isinstance(a, (list, tuple)) else [a]
            for r in refs:
                if isinstance(r, Ref) and r.name in param_of:
                    ok = n.op in ("linear", "embed") and j == 1
                    packed_ok[param_of[r.name]] = packed_ok.get(param_of[r.name], True) and ok
    floats = {name: core.params[name].dequantize() for name, ok in packed_ok.items()
              if not ok and isinstance(core.params[name], PackedMatrix)}
    return CoreGraph(core.nodes, {**core.params, **floats}) if floats else core


class WgslProgram:
    """`graph` on the device. `resident`: output positions left on the device (DeviceTensors) instead of read
    back; a decode step keeps its key / value caches there (every output after the logits)."""

    def __init__(self, graph: Graph, device: Device | None = None, weights: Weights | None = None,
                 resident: bool = False):
        from xbitc.passes.legalize import legalize

        self.graph = graph
        self.core = _kernel_read_params(legalize(graph))
        self.device = device or Device()
        self.weights = weights or Weights(self.device, self.core.params)
        self.executor = Executor(self.core, self.device, self.weights)
        out = self.core.nodes[-1]
        self.single = out.attrs.get("single", len(out.args) == 1)
        self.resident = set(range(1, len(out.args))) if resident else set()

    def __call__(self, *inputs: Any) -> Any:
        outs = self.executor.run(list(inputs), self.resident)
        return outs[0] if self.single else tuple(outs)

    def companion(self, graph: Graph) -> "WgslProgram":
        """The decode step over the same device and parameters (uploaded once for both); its caches stay on the
        device between steps."""
        return WgslProgram(graph, self.device, self.weights, resident=True)

