"""Predicting an artifact's exact size from a plan, before anything is quantized or written.

Planners (`plan`, `allocate`) must land on a whole-model bits-per-weight target, so they need the bytes of every
file: tensor data (exact from the plan's segments), the safetensors header (rendered the way safetensors renders
it), graph.json (the current graph, with linear ops renamed as packing will) and manifest.json (rendered from the
same pydantic model the writer uses, with placeholder hashes of the right length).
"""
from __future__ import annotations

import json

import numpy as np

from xbitc.ir import serialize
from xbitc.ir.graph import Graph, Op
from xbitc.manifest import WEIGHTS_METADATA, Manifest, Size, Source, TensorEntry
from xbitc.quant.format import Segment
from xbitc.quant.packed import planned_tensors
from xbitc.quant.segments import segments, stored_segments, stores_perm
from xbitc.size import array_bytes

FLOAT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
PASS_RECORD_BYTES = 130  # one {"pass", "fingerprint", "seconds"} entry in the manifest, indent=1


def segments_of(bits, group: int, inp: int, reorders: bool = False) -> tuple[list[Segment], bool]:
    """Segments a plan entry will be stored as and whether a permutation is stored with them (`reorders`: the
    quantizer orders columns by their data, GPTQ's act_order)."""
    segs = segments([(int(bits), inp)], group) if isinstance(bits, (int, np.integer)) else stored_segments(bits, group)
    return segs, stores_perm(segs, reorders)


def safetensors_bytes(arrays: dict[str, tuple[str, list[int]]]) -> int:
    header, offset = {"__metadata__": WEIGHTS_METADATA}, 0
    for name in sorted(arrays):
        dtype, shape = arrays[name]
        n = array_bytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text)) % 8 + offset


def artifact_bytes(graph: Graph, plan: dict, roles: dict[str, str], permute_uniform: bool = False, passes: int = 4,
                   emitted: tuple[dict[str, int], dict] | None = None, pipeline: list[str] | None = None,
                   backend: str | None = None, summary: dict | None = None) -> int:
    """Counted bytes of the artifact `plan` (name -> {"bits", "group"}) will produce from `graph`; `emitted`: the
    backend's files and manifest notes (`Backend.emitted`); `pipeline`: the specs of the passes that will run (their
    records go into the manifest; without it, `passes` records of a typical length are assumed); `backend`: its
    name as the manifest records it; `summary`: the plan summary the manifest will hold, with numbers at their
    longest (else a 200-character placeholder)."""
    extra_files, extra_notes = emitted or ({}, {})
    float_code = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[graph.meta.get("float_dtype", "float16")]
    kinds = graph.meta.get("param_kinds", {})
    arrays: dict[str, tuple[str, list[int]]] = {}
    entries: dict[str, TensorEntry] = {}
    for name, t in graph.params.items():
        shape = [int(s) for s in t.shape]
        if name in plan:
            segs, permuted = segments_of(plan[name]["bits"], plan[name]["group"], shape[1], permute_uniform)
            part = planned_tensors(name, tuple(shape), segs, permuted)
            arrays.update(part)
            entries[name] = TensorEntry(
                role=roles.get(name, "linear"), shape=shape, storage="packed", layout="lsb-rows", permuted=permuted,
                segments=[[s.bits, s.group_size, s.start, s.stop] for s in segs],
                bytes=sum(array_bytes(*a) for a in part.values()),
            )
        else:
            is_param = t.is_floating_point() and kinds.get(name, "parameter") == "parameter"
            code = float_code if is_param else {1: "U8", 2: "F16", 4: "F32", 8: "I64"}[t.element_size()]
            arrays[name] = (code, shape)
            entries[name] = TensorEntry(
                role=roles.get(name, "float"), shape=shape, storage="float", dtype=str(t.dtype).removeprefix("torch."),
                bytes=array_bytes(code, shape),
            )
    weights = safetensors_bytes(arrays)
    # graph.json, and step.json for the cached decode step: both have their planned linears renamed by packing
    graph_json = sum(_json_bytes(g, plan) for g in (graph, graph.step) if g is not None)
    listed = ["graph.json", "weights.safetensors"] + (["step.json"] if graph.step is not None else []) + sorted(extra_files)
    size = Size(target_bpw=0.0, bits_per_weight=0.0, linear_bits_per_weight=0.0, counted_bytes=10**9,
                files={**{f: 10**6 for f in listed}, "manifest.json": 10**5}, uncounted={})
    manifest = Manifest(
        xbitc_version="0.0.0", created="2026-01-01T00:00:00+00:00", kind=graph.meta.get("kind", "generic"),
        backend=backend or "reference", source=Source(path=str(graph.meta.get("source", "")), sha256="0" * 64, param_count=10**8),
        pipeline=",".join(pipeline) if pipeline else "x" * 120,
        passes=[{"pass": p, "fingerprint": "0" * 16, "seconds": 99999.999} for p in pipeline or []], inputs=[n.name for n in graph.inputs()], size=size, tensors=entries,
        files={f: "0" * 64 for f in listed},
        notes={"plan": summary if summary is not None else {"summary": "x" * 200}, **extra_notes},
    )
    meta = len(manifest.model_dump_json(indent=1)) + (0 if pipeline else PASS_RECORD_BYTES * passes)
    return weights + graph_json + meta + sum(extra_files.values())


def _json_bytes(graph: Graph, plan: dict) -> int:
    by_name = graph.by_name()
    renamed = sum(1 for n in graph.nodes if n.op is Op.LINEAR and by_name[n.args[1].name].attrs["name"] in plan)
    return len(serialize.dumps(graph)) + len("packed_") * renamed
