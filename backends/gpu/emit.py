"""The artifact's `gpu/` for the GPU backends (wgsl, cuda, metal): the source of every kernel the model launches, in
the backend's language, and `gpu/kernels.json`, what a host needs to call them.

    gpu/wgsl/<kernel>.wgsl     one file per kernel: WebGPU compiles one shader module per pipeline
    gpu/cuda/kernels.cu        one translation unit (one nvcc run, one module to load)
    gpu/metal/kernels.metal    one library source (one MTLLibrary)
    gpu/kernels.json           language, generator, per kernel its file, the core ops it serves and its interface
                               (workgroup, buffers in binding order, parameter struct layout: lang.py
                               `Kernel.interface`), how bindings map to the language, and the layout rules of the
                               packed matrices

Which kernels: the legalized main graph and decode step (`graph.step`) are planned (ir/execplan.py) at
representative input shapes (`shape_sets`: one token, a short prompt, a batch of them; for the step, a prompt
over empty caches and one token after it) and every launch is turned into its calls (launches.py), once with every matrix of a
linear or an embedding float and once with every such matrix packed, plus the packed product's gather, gemv,
gemm and dequant. The union covers whatever the quantization plan packs, so what is written does not depend on the
plan: the size planners count it exactly before they choose depths (`Backend.emitted`). Kernels are generic over
shapes (sizes and strides are parameters), so other shapes reuse them (Llama, GPT-2 and BERT at batch 1-4, 1-33
tokens, caches of 0-7: none missing); xbitc's WebGPU runtime renders whatever it launches in any case.

Weights are not written again. They stay in the artifact's one canonical packed layout (weights.safetensors) and
a host turns each matrix into the GPU layout at load (packed.py `GpuMatrix.from_records`, fields in kernels.json
"packed"): a second, GPU-shaped copy would double the counted size of every matrix for a layout that takes one
pass to derive. The sources are data for other hosts: xbitc's own runtimes (WebGPU; CUDA where a GPU and nvcc are)
render their kernels from this same generator and never read them (the manifest's hashes still catch a damaged
copy at load).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, ClassVar

from xbitc import __version__
from xbitc.ir.coregraph import CoreGraph
from xbitc.ir.graph import Graph, Ref
from xbitc.quant.packed import PackedMatrix

from ..base import Backend, BackendUnavailable, Capabilities
from .lang import Kernel
from .ops import Env
from .render import PRINTERS

FORMAT = 1  # of kernels.json; bump on any change of its fields' meaning
INDEX = "gpu/kernels.json"
FILES = {"wgsl": None, "cuda": "kernels.cu", "metal": "kernels.metal"}  # None: one file per kernel
PROMPT = 8  # tokens of the representative prompt
BINDINGS = {
    "wgsl": "@group(0) @binding(i) for buffer i in order, then the parameter struct as a uniform buffer at the next "
            "binding (params_bytes, a multiple of 16)",
    "cuda": "buffer i is the i-th pointer argument, then the parameter struct by value as the last argument; launch "
            "blocks of exactly `workgroup` threads",
    "metal": "[[buffer(i)]] for buffer i in order, then the parameter struct as a constant buffer at the next index; "
             "dispatch threadgroups of exactly `workgroup` threads",
}
NAMES = {"wgsl": "WGSL", "cuda": "CUDA", "metal": "Metal"}
PACKED_OPS = {"gather": "linear", "gemv": "linear", "gemm": "linear", "dequant": "embed"}


class GpuUnsupported(BackendUnavailable):
    """The GPU kernels cannot run this model (an op without a lowering or a kernel); the message names the node
    and the backends to use instead."""


def shape_sets(g: Graph, step: bool) -> list[list[tuple[tuple[int, ...], str]]]:
    """The input (shape, dtype) lists a graph is planned at. Main graph: every symbolic size 1; the first input's
    leading one (a batch, usually) 1 and the others PROMPT; every one PROMPT. Decode step (ids [B, T], caches [B,
    heads, P, dim]): B = 1 and (T, P) = (PROMPT, 0), then (1, PROMPT). Kernels specialise on rank after size-1
    dims merge away and on few rows or many: these sizes meet both sides. Inputs without a type: none."""
    inputs = g.inputs()
    if not inputs or any(n.type is None for n in inputs):
        return []
    lead = inputs[0].type.shape[:1]
    if step and len(inputs) > 1:
        ids, cache = inputs[0].type.shape, inputs[1].type.shape
        named = [({ids[0]: 1, ids[1]: t, cache[2]: p}, PROMPT) for t, p in ((PROMPT, 0), (1, PROMPT))]
    else:
        named = [({}, 1), (dict.fromkeys(lead, 1), PROMPT), ({}, PROMPT)]
    out: list = []
    for sizes, default in named:
        specs = [(tuple(d if isinstance(d, int) else sizes.get(d, default) for d in n.type.shape), n.type.dtype)
                 for n in inputs]
        if specs not in out:
            out.append(specs)
    return out


def _matrices(core: CoreGraph) -> set[str]:
    """Parameters read only as the matrix of a linear or an embedding: what the runtime keeps packed when the plan
    packs them (any other read takes the float matrix, xbitc/webgpu/program.py)."""
    param_of = {n.name: n.attrs["name"] for n in core.nodes if n.op == "param"}
    ok: dict[str, bool] = {}
    for n in core.nodes:
        for j, a in enumerate(n.args):
            for r in a if isinstance(a, (list, tuple)) else [a]:
                if isinstance(r, Ref) and r.name in param_of:
                    name = param_of[r.name]
                    ok[name] = ok.get(name, True) and n.op in ("linear", "embed") and j == 1
    return {name for name, fine in ok.items() if fine}


class _PlanEnv(Env):
    """launches.Env for a plan with no device: `packed` matrices get the GPU layout of a matrix of their shape with
    no stored columns (the calls' kernels depend on the shape only); arena placement as the executor's."""

    def __init__(self, p, packed: set[str]):
        from .packed import GpuMatrix

        self.plan, self.names = p, {id(v): name for name, v in p.params.items()}
        self.layouts = {name: GpuMatrix.from_records([], *p.params[name].shape) for name in packed}
        self.dedicated = {v.buffer for v in p.outputs if getattr(v, "scalar", 0) is None and v.buffer >= 0
                          and p.buffers[v.buffer].role == "temp"}

    def matrix(self, value):
        name = self.names.get(id(value))
        return (name, self.layouts[name]) if name in self.layouts else None

    def in_arena(self, value) -> bool:
        return value.buffer >= 0 and self.plan.buffers[value.buffer].role == "temp" and value.buffer not in \
            self.dedicated


def collect(graph: Graph) -> tuple[dict[str, Kernel], dict[str, set[str]], dict[str, list]]:
    """(kernel name -> Kernel, kernel name -> core ops it serves, graph label -> the input shapes planned)."""
    import torch

    from xbitc.ir.execplan import PlanError, plan
    from xbitc.passes.base import PassContext
    from xbitc.passes.canonicalize import Canonicalize
    from xbitc.passes.legalize import LegalizeError, legalize

    from . import launches
    from .ops import GpuOpError, packed_kernels

    kernels: dict[str, Kernel] = {}
    ops: dict[str, set[str]] = {}
    for role, k in zip(PACKED_OPS, packed_kernels()):  # gather, gemv, gemm, dequant: whatever the plan
        kernels[k.name], ops[k.name] = k, {PACKED_OPS[role]}
    planned: dict[str, list] = {}
    quiet = PassContext(log=lambda s: None)
    # the traced graph as the pipeline's first pass leaves it: dead and assertion nodes hide patterns legalize fuses
    graphs = [("main", graph)] + ([("step", graph.step)] if graph.step is not None else [])
    for label, g in graphs:
        try:
            core = legalize(Canonicalize().run(copy.copy(g), quiet))
            floats = {name: torch.empty(tuple(v.shape), device="meta") if isinstance(v, PackedMatrix) else v
                      for name, v in core.params.items()}
            core = CoreGraph(core.nodes, floats)
            packed = _matrices(core)
            planned[label] = shape_sets(g, label == "step")
            for specs in planned[label]:
                for held in (set(), packed):
                    p = plan(core, specs, packed=held)
                    env = _PlanEnv(p, held)
                    for launch in p.launches:
                        for c in launches.calls(launch, env):
                            if kernels.setdefault(c.kernel.name, c.kernel) is not c.kernel:  # built once per key
                                raise AssertionError(f"two GPU kernels are named {c.kernel.name}")
                            ops.setdefault(c.kernel.name, set()).add(launch.op)
        except (LegalizeError, PlanError, GpuOpError) as err:
            raise GpuUnsupported(f"the GPU kernels cannot run this model's {label} graph: {err}; compile it with "
                                 "--backend x86 / arm / reference") from None
    return kernels, ops, planned


def packed_rules() -> dict[str, Any]:
    """How a host builds and calls the packed matrices (packed.py's module docstring in fields)."""
    from ..llvm.rowlane import ROWS_VERSION
    from ..product import PackedProduct
    from . import packed as pk
    from .ops import packed_kernels

    p = PackedProduct("f32")
    return {
        "built_from": "the packed tensors of weights.safetensors (manifest tensors[].segments), at load: "
                      "xbitc.backends.gpu.packed.GpuMatrix.from_records",
        "rows_format": ROWS_VERSION, "lanes": p.lanes, "block_cols": p.block_cols, "word_bits": p.word_bits,
        "kinds": list(p.kinds), "bytes_kind": p.bytes_kind, "piece_cols": pk.PIECE_COLS,
        "piece_fields": ["kind", "ncols", "codes", "scales", "zeros", "x", "unused", "unused"],
        "tables": {"pieces": "u32 [npieces, piece_fields]: codes, scales and zeros are u32 word offsets from the "
                             "row block's start, x the piece's first column in the gathered activations in 4-float "
                             "units; a record longer than piece_cols is several pieces sharing its scales and zeros",
                   "src": "u32 per gathered column: the input column it reads, `none` for padding to block_cols",
                   "dst": "u32 per input column: piece << 7 | column in piece, `none` for a dropped column"},
        "none": pk.NONE, "threads": pk.THREADS, "lanes_per_thread": pk.LPT, "gemm_tokens": pk.GEMM_TOKENS,
        "kernels": {role: k.name for role, k in zip(PACKED_OPS, packed_kernels())},
        "calls": {
            "gather": {"tile": "1 for gemv, gemm_tokens for gemm", "params": {"inp": "in", "xcols": "len(src)",
                       "tokens": "tokens"}, "groups": ["ceil(xcols / threads)", "ceil(tokens / tile) * tile"],
                       "xp_floats": "ceil(tokens / tile) * tile * xcols"},
            "gemv": {"tile": 1, "params": {"rows": "out", "tokens": "tokens", "xrow": "xcols / 4",
                     "npieces": "pieces (0 for a matrix with no stored column)", "stride": "u32 words per row "
                     "block"}, "groups": ["ceil(rows / lanes)", "tokens"]},
            "gemm": {"tile": pk.GEMM_TOKENS, "params": "as gemv", "groups": ["ceil(rows / lanes)",
                     "ceil(tokens / tile)"]},
            "dequant": {"params": {"inp": "in", "rows": "out", "stride": "as gemv"},
                        "groups": ["ceil(in / threads)", "tokens"]},
        },
    }


def sources(kernels: list[Kernel], language: str) -> dict[str, str]:
    """Artifact-relative path -> text of the kernels in `language`."""
    printer = PRINTERS[language]()
    if FILES[language] is None:
        return {f"gpu/{language}/{k.name}.{language}": printer.render(k) for k in kernels}
    return {f"gpu/{language}/{FILES[language]}": printer.render_all(kernels)}


def emit_kernels(graph: Graph, folder: Path, language: str) -> dict[str, Any]:
    """Write gpu/ for `language` ("wgsl", "cuda" or "metal"); return the manifest note."""
    found, ops, planned = collect(graph)
    kernels = [found[name] for name in sorted(found)]
    texts = sources(kernels, language)
    single = next(iter(texts)) if FILES[language] else None
    index = {
        "format": FORMAT, "language": language, "generator": f"xbitc {__version__}", "files": sorted(texts),
        "planned": {label: [[[list(shape), dtype] for shape, dtype in specs] for specs in sets]
                    for label, sets in planned.items()},
        "bindings": BINDINGS[language],
        "kernels": [{**k.interface(), "file": single or f"gpu/{language}/{k.name}.{language}",
                     "ops": sorted(ops[k.name])} for k in kernels],
        "packed": packed_rules(),
    }
    texts[INDEX] = json.dumps(index, indent=1) + "\n"
    for rel, text in texts.items():
        (Path(folder) / rel).parent.mkdir(parents=True, exist_ok=True)
        (Path(folder) / rel).write_bytes(text.encode())
    return {"gpu": {"language": language, "index": INDEX, "kernels": len(kernels),
                    "bytes": sum(len(t.encode()) for t in texts.values())}}


class GpuBackend(Backend):
    """A backend that writes GPU kernels into the artifact. metal only writes them (xbitc's Python runtime launches
    no Metal); wgsl also executes (backends/wgsl.py), and cuda where an NVIDIA GPU and nvcc are (backends/cuda.py)."""

    language: ClassVar[str] = ""

    def capabilities(self) -> Capabilities:
        return Capabilities(bit_depths=tuple(range(0, 9)), executes_here=False)

    def lower(self, graph: Graph):
        raise BackendUnavailable(
            f"the {self.name} backend writes {NAMES[self.language]} kernels into the artifact (gpu/) for a host "
            "program to launch; xbitc's runtime does not run them: use "
            "--backend wgsl (WebGPU) or --backend reference, or leave --backend out for this host's CPU backend")

    def emit(self, graph: Graph, folder: Path) -> dict[str, Any]:
        return emit_kernels(graph, folder, self.language)
