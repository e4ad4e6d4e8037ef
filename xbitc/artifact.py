"""Writing and reading `model.xbitc/` folders: manifest.json, graph.json, weights.safetensors, tokenizer/.

Writing goes to a temporary sibling folder that is renamed into place only when complete, so a crash or an error
never leaves a half-written artifact. Reading checks the manifest version and every file's sha256 first.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors.numpy import load_file, save_file

from xbitc import __version__
from xbitc.ir import serialize
from xbitc.ir.graph import Graph
from xbitc.quant.packed import PackedMatrix
from xbitc.size import bits_per_weight

from .manifest import MANIFEST_VERSION, Manifest, Size, Source, TensorEntry

MANIFEST = "manifest.json"
GRAPH = "graph.json"
WEIGHTS = "weights.safetensors"
TOKENIZER = "tokenizer"
STEP = "step.json"  # the cached decode step of a language model (xbitc.stepgraph), when it has one


class ArtifactError(ValueError):
    """The artifact is missing, corrupt, or from an incompatible version; the message says which file and why."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: store the raw bits, tagged in the manifest
        return t.view(torch.int16).numpy()
    return t.detach().cpu().contiguous().numpy()


def flatten_params(graph: Graph, roles: dict[str, str]) -> tuple[dict[str, np.ndarray], dict[str, TensorEntry]]:
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, TensorEntry] = {}
    for name, value in graph.params.items():
        if isinstance(value, PackedMatrix):
            # safetensors writes raw buffers: every array must be C-contiguous (GPTQ's scales are transposed views)
            parts = {k: np.ascontiguousarray(a) for k, a in value.tensors(name).items()}
            arrays.update(parts)
            d = value.describe()
            entries[name] = TensorEntry(
                role=roles.get(name, "linear"), shape=d["shape"], storage="packed", layout=d["layout"],
                permuted=d["permuted"], segments=d["segments"], bytes=sum(a.nbytes for a in parts.values()),
            )
        elif isinstance(value, torch.Tensor):
            arrays[name] = np.ascontiguousarray(_tensor_to_numpy(value))
            entries[name] = TensorEntry(
                role=roles.get(name, "float"), shape=list(value.shape), storage="float",
                dtype=str(value.dtype).removeprefix("torch."), bytes=arrays[name].nbytes,
            )
        else:
            raise ArtifactError(f"parameter {name} is a {type(value).__name__}; run the pack pass before writing")
    return arrays, entries


def write(
    graph: Graph,
    out: Path,
    *,
    backend: str,
    pipeline: str,
    passes: list[dict],
    target_bpw: float | None,
    roles: dict[str, str],
    tokenizer: Any = None,
    emit: Any = None,
    notes: dict | None = None,
) -> Manifest:
    out = Path(out)
    if out.exists() and not (out / MANIFEST).exists():
        raise ArtifactError(f"{out} exists and is not an xbitc artifact; choose another -o path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        arrays, entries = flatten_params(graph, roles)
        save_file(arrays, str(tmp / WEIGHTS), metadata={"format": "xbitc", "version": str(MANIFEST_VERSION)})
        (tmp / GRAPH).write_text(serialize.dumps(graph))
        if graph.step is not None:
            (tmp / STEP).write_text(serialize.dumps(graph.step))
        extra_notes = dict(notes or {})
        if emit is not None:
            extra_notes.update(emit(graph, tmp) or {})
        uncounted: dict[str, int] = {}
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER))
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            files[rel] = sha256(f)
            if rel.startswith(TOKENIZER + "/"):
                uncounted[rel] = f.stat().st_size
        counted = {rel: (tmp / rel).stat().st_size for rel in files if rel not in uncounted}
        count = graph.source_param_count() or sum(int(np.prod(e.shape)) for e in entries.values())
        lin = [e for e in entries.values() if e.storage == "packed" and e.role in ("linear", "output")]
        lin_bpw = 8 * sum(e.bytes for e in lin) / sum(int(np.prod(e.shape)) for e in lin) if lin else None
        manifest = None
        manifest_bytes = 0
        for _ in range(10):  # the manifest counts its own size: iterate to a fixed point
            total = sum(counted.values()) + manifest_bytes
            size = Size(
                target_bpw=target_bpw, bits_per_weight=round(bits_per_weight(total, count), 4),
                linear_bits_per_weight=None if lin_bpw is None else round(lin_bpw, 4),
                counted_bytes=total, files={**counted, MANIFEST: manifest_bytes}, uncounted=uncounted,
            )
            manifest = Manifest(
                xbitc_version=__version__, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                kind=graph.meta.get("kind", "generic"), backend=backend,
                source=Source(path=str(graph.meta.get("source", "")), sha256=str(graph.meta.get("source_hash", "")), param_count=count),
                pipeline=pipeline, passes=passes, inputs=[n.name for n in graph.inputs()], size=size, tensors=entries,
                files=files, notes=extra_notes,
            )
            text = manifest.model_dump_json(indent=1)
            if len(text.encode()) == manifest_bytes:
                break
            manifest_bytes = len(text.encode())
        (tmp / MANIFEST).write_bytes(text.encode())
        if len(text.encode()) != manifest_bytes:
            raise ArtifactError("internal error: manifest size did not reach a fixed point")
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.chmod(0o755)
        _replace(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def read_manifest(path: Path) -> Manifest:
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir() or not mf.exists():
        raise ArtifactError(f"{path} is not an xbitc artifact (no {MANIFEST}); compile one with `xbitc compile`")
    try:
        raw = json.loads(mf.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{mf} is not valid JSON ({err}); the artifact is corrupt, compile it again") from None
    if raw.get("version") != MANIFEST_VERSION:
        raise ArtifactError(
            f"{path} has manifest version {raw.get('version')!r}; this xbitc {__version__} reads version {MANIFEST_VERSION}"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        raise ArtifactError(f"{mf} does not match the manifest schema: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}") from None


def verify_files(path: Path, manifest: Manifest) -> None:
    for rel, digest in manifest.files.items():
        f = path / rel
        if not f.exists():
            raise ArtifactError(f"{path}: file {rel} listed in the manifest is missing")
        if sha256(f) != digest:
            raise ArtifactError(f"{path}: {rel} does not match its sha256 in the manifest (corrupt or modified)")


def load_graph(path: Path, check: bool = True) -> tuple[Graph, Manifest]:
    path = Path(path)
    manifest = read_manifest(path)
    if check:
        verify_files(path, manifest)
    arrays = load_file(str(path / WEIGHTS))
    params: dict[str, Any] = {}
    for name, entry in manifest.tensors.items():
        if entry.storage == "packed":
            desc = {"shape": entry.shape, "layout": entry.layout, "permuted": entry.permuted, "segments": entry.segments}
            try:
                params[name] = PackedMatrix.from_tensors(name, desc, arrays)
            except (KeyError, ValueError) as err:
                raise ArtifactError(f"{path}: tensor {err} (the file does not describe a valid packed matrix)") from None
        else:
            t = torch.from_numpy(arrays[name].copy())
            if entry.dtype == "bfloat16":
                t = t.view(torch.bfloat16)
            params[name] = t
    graph = serialize.loads((path / GRAPH).read_text(), params)
    if (path / STEP).exists():
        graph.step = serialize.loads((path / STEP).read_text(), params)
    return graph, manifest

