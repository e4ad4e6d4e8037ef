"""The Backend interface.

A backend states what it can run (`capabilities`), which passes it wants after quantization (`passes`), turns a
packed graph into a `Program` (`lower`) and may add files to the artifact (`emit`, e.g. kernels or a C header).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from xbitc.ir.fuse import simplify
from xbitc.ir.graph import Graph
from xbitc.ir.interp import Interpreter, LinearImpl
from xbitc.ir.pycode import compile_interpreter


@dataclass(frozen=True)
class Capabilities:
    bit_depths: tuple[int, ...] = tuple(range(1, 9))
    group_sizes: str = "any"
    layouts: tuple[str, ...] = ("lsb-rows",)
    executes_here: bool = True  # can the Python runtime run it on this machine


class BackendUnavailable(RuntimeError):
    """The backend cannot execute on this machine; the message names the one to use instead."""


class Program:
    """Runs a lowered graph: the reference interpreter with the backend's packed-linear implementation."""

    def __init__(self, graph: Graph, linear_impl: LinearImpl | None = None, weights: dict | None = None):
        # inference-only rewrites (ir/fuse.py): fewer ops, same results; `graph` itself is left as traced
        self.graph = simplify(graph)
        self.interp = Interpreter(self.graph, linear_impl, weights=weights)
        self._compiled = None

    def __call__(self, *inputs: Any) -> Any:
        # the interpreter's semantics as straight-line Python (ir/pycode.py): same ops, no per-node lookups
        if self._compiled is None:
            self._compiled = compile_interpreter(self.interp)
        return self._compiled(*inputs)

    def companion(self, graph: Graph) -> Program:
        """A program for another graph over the same parameters (a language model's decode step): same linear
        implementation, same cache of dequantized tensors, so nothing is prepared or held twice."""
        return Program(graph, self.interp.linear_impl, weights=self.interp._weights)


class Backend:
    name: ClassVar[str] = ""

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def passes(self) -> list[str]:
        """Pass specs to append after `pack` (legalization, repacking)."""
        return []

    def lower(self, graph: Graph) -> Program:
        raise NotImplementedError

    def emit(self, graph: Graph, folder: Path) -> dict[str, Any]:
        """Write backend files into the artifact folder being built; return manifest notes."""
        return {}

    def emitted(self, graph: Graph) -> tuple[dict[str, int], dict[str, Any]]:
        """The files (artifact-relative path -> bytes) and manifest notes `emit` adds for `graph`, measured by
        emitting into a scratch folder. The size planners count them before choosing depths; that is exact when what
        `emit` writes does not depend on the quantization plan, as for the built-in backends."""
        with tempfile.TemporaryDirectory(prefix="xbitc-emit-") as d:
            notes = self.emit(graph, Path(d)) or {}
            files = {p.relative_to(d).as_posix(): p.stat().st_size for p in sorted(Path(d).rglob("*")) if p.is_file()}
        return files, notes

