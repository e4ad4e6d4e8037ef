"""Writing and reading `model.xbitc/` folders: manifest.json, graph.json, weights.safetensors, tokenizer/.

Writing goes to a temporary sibling folder that is renamed into place only when complete, so a crash or an error
never leaves a half-written artifact. Reading checks the manifest version and every file's sha256 first.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors.numpy import load as safetensors_load

from xbitc import __version__, spill, tensorfile
from xbitc.ir import serialize
from xbitc.ir.graph import Graph
from xbitc.ir.verify import VerifyError, dry_run, verify
from xbitc.quant.packed import PackedMatrix
from xbitc.size import bits_per_weight

from .manifest import MANIFEST_VERSION, WEIGHTS_METADATA, Manifest, Size, Source, TensorEntry

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
            parts = value.tensors(name)  # views: tensorfile.save copies each (GPTQ's scales are transposed) in turn
            arrays.update(parts)
            d = value.describe()
            entries[name] = TensorEntry(
                role=roles.get(name, "linear"), shape=d["shape"], storage="packed", layout=d["layout"],
                permuted=d["permuted"], segments=d["segments"], bytes=sum(a.nbytes for a in parts.values()),
            )
        elif isinstance(value, torch.Tensor):
            arrays[name] = _tensor_to_numpy(value)
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
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=_scratch_prefix(out), suffix=".tmp", dir=out.parent))
    try:
        arrays, entries = flatten_params(graph, roles)
        tensorfile.save(arrays, tmp / WEIGHTS, metadata=WEIGHTS_METADATA, written=spill.page_out)
        del arrays
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
            if len(text.encode()) <= manifest_bytes:
                # a shorter rendering (e.g. a bits-per-weight figure with fewer digits) would oscillate: pad it
                text += " " * (manifest_bytes - len(text.encode()))
                break
            manifest_bytes = len(text.encode())
        (tmp / MANIFEST).write_bytes(text.encode())
        if len(text.encode()) != manifest_bytes:
            raise ArtifactError("internal error: manifest size did not reach a fixed point")
        if target_bpw is not None and manifest.size.bits_per_weight > target_bpw:
            raise ArtifactError(
                f"the compiled model takes {manifest.size.bits_per_weight:.3f} bits per weight, over its target of "
                f"{target_bpw}; nothing was written: plan to the target in the pipeline (plan{{bpw={target_bpw}}} or "
                f"allocate{{bpw={target_bpw}}}) or raise the target"
            )
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
        trash = Path(tempfile.mkdtemp(prefix=_scratch_prefix(out), suffix=".old", dir=out.parent))
        try:
            os.replace(out, trash / "old")
            try:
                os.replace(tmp, out)
            except BaseException:  # interrupted between the two renames: put the previous artifact back
                if not out.exists() and (trash / "old").exists():
                    os.replace(trash / "old", out)
                raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def scratch_folder(out: Path) -> Path:
    """The nearest existing folder above `out`: where its missing parents are created from, and where a compile keeps
    scratch files (on the output's disk, which has room for the artifact, not a temporary folder that may live in
    memory)."""
    folder = Path(out).absolute().parent
    while not folder.exists():
        folder = folder.parent
    return folder


def check_output(out: Path) -> None:
    """Refuse an output path that cannot be written, before any work: an existing file or folder that is not an
    artifact, a parent that is a file, a folder this process cannot create entries in."""
    out = Path(out)
    if out.exists() and not (out / MANIFEST).exists():
        raise ArtifactError(f"{out} exists and is not an xbitc artifact; choose another -o path")
    try:
        folder = scratch_folder(out)  # the artifact's parents are created from it
    except OSError as err:
        raise ArtifactError(f"cannot write {out}: {err.filename or out.parent} cannot be read ({err.strerror}); "
                            "choose another -o path") from None
    if not folder.is_dir():
        raise ArtifactError(f"cannot write {out}: {folder} is a file, not a folder; choose another -o path")
    try:  # permissions, read-only file systems, quotas: only trying tells
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".probe", dir=folder))
    except OSError as err:
        raise ArtifactError(f"cannot write {out}: {folder} is not writable ({err.strerror}); choose another -o path") from None


def _writer_tag() -> str:
    """Who writes: pid and host, in the names of the scratch folders, so that a later write can tell the folders of
    a writer that was killed (removed) from those of one still running (left alone)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]
    return f"w{os.getpid()}-{host}"


def _scratch_prefix(out: Path) -> str:
    return f".{out.name}.{_writer_tag()}."


def _alive(pid: int) -> bool:
    if os.name != "posix":  # no signal-0 probe: assume every writer may still be running
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the scratch folders (`.NAME.wPID-HOST.*.tmp` / `.old`) that killed writers of `out` left next to it:
    those whose writer process, on this host, is gone. Returns what was removed."""
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.w(\d+)-([A-Za-z0-9-]*)\.[a-z0-9_]+\.(tmp|old)")
    host = _writer_tag().split("-", 1)[1]
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or m.group(2) != host or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


MAX_MANIFEST_BYTES = 64 << 20  # a real manifest is kilobytes; this bounds what a hostile one makes us read
MAX_JSON_DEPTH = 64  # lists and objects in a manifest or stored graph nest a few levels; a hostile file, thousands


def _parse_json(text: str | bytes) -> Any:
    """json.loads, refusing as ValueError what would otherwise escape as RecursionError in the parser or in any
    later walk over the value (nesting deeper than MAX_JSON_DEPTH); integers past Python's digit limit already are."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"values nest deeper than {MAX_JSON_DEPTH} levels") from None
    stack = [(value, 1)]
    while stack:  # iterative: the value may be nested just under the parser's own limit
        v, depth = stack.pop()
        if isinstance(v, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"values nest deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return value


def read_manifest(path: Path) -> Manifest:
    return _manifest(Path(path))[0]


def _manifest(path: Path) -> tuple[Manifest, int]:
    """The manifest and its size in bytes as read."""
    mf = path / MANIFEST
    if not path.is_dir() or not mf.exists():
        raise ArtifactError(f"{path} is not an xbitc artifact (no {MANIFEST}); compile one with `xbitc compile`")
    data = _read(path, MANIFEST, MAX_MANIFEST_BYTES)
    try:
        raw = _parse_json(data)
    except ValueError as err:
        raise ArtifactError(f"{mf} is not valid JSON ({err}); the artifact is corrupt, compile it again") from None
    if not isinstance(raw, dict) or raw.get("version") != MANIFEST_VERSION:
        found = raw.get("version") if isinstance(raw, dict) else None
        raise ArtifactError(
            f"{path} has manifest version {found!r}; this xbitc {__version__} reads version {MANIFEST_VERSION}"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as err:
        raise ArtifactError(f"{mf} does not match the manifest schema: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}") from None
    _check_entries(mf, manifest)
    return manifest, len(data)


def _check_entries(mf: Path, m: Manifest) -> None:
    """What the schema leaves open and readers (the loader, `xbitc inspect`) index into: tensor shapes, a packed
    tensor's [out, in] and [bits, group, start, stop] segments, each pass's name and seconds."""
    for name, e in m.tensors.items():
        packed_ok = e.storage != "packed" or (len(e.shape) == 2 and e.segments is not None
                                              and all(len(s) == 4 and min(s) >= 0 for s in e.segments))
        if not packed_ok or any(d < 0 for d in e.shape):
            raise ArtifactError(f"{mf}: tensor {name} has shape {e.shape} and segments {e.segments}; a packed tensor "
                                "is [out, in] with [bits, group, start, stop] segments, and no size is negative")
    for p in m.passes:
        if not isinstance(p.get("pass"), str) or type(p.get("seconds")) not in (int, float):
            raise ArtifactError(f"{mf}: pass record {p!r:.200} lacks its name (pass) or its time (seconds)")


def verify_files(path: Path, manifest: Manifest, manifest_bytes: int | None = None) -> dict[str, bytes]:
    """Check every file the runtime reads against the manifest before any is read: names relative and inside the
    folder, regular files (no links, devices or pipes), sizes as recorded (checked before hashing, so a listed
    /dev/zero or a huge file is refused at once), sha256 as recorded; required files listed, no unlisted files.
    Returns the verified bytes of the files the loader parses (graph, step, weights): it never reads them again."""
    sizes = {**manifest.size.files, **manifest.size.uncounted}
    _check_size_claims(path, manifest, manifest_bytes)
    for rel in (GRAPH, WEIGHTS):
        if rel not in manifest.files:
            raise ArtifactError(f"{path}: the manifest does not list {rel}; the artifact is corrupt, compile it again")
    present = _files_in(path)
    unlisted = sorted(present - set(manifest.files) - {MANIFEST})
    if unlisted:
        raise ArtifactError(f"{path}: {unlisted[0]} is not listed in the manifest; remove it or compile the artifact again")
    kept = {}
    for rel, digest in manifest.files.items():
        _check_name(path, rel)
        if rel not in present:
            raise ArtifactError(f"{path}: file {rel} listed in the manifest is missing")
        data = _read(path, rel, sizes[rel], exact=True)
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactError(f"{path}: {rel} does not match its sha256 in the manifest (corrupt or modified)")
        if rel in (GRAPH, STEP, WEIGHTS):
            kept[rel] = data
    return kept


def _check_size_claims(path: Path, manifest: Manifest, manifest_bytes: int | None = None) -> None:
    """The reported size is the sum of the files' sizes, the bits per weight follow from it, and every listed file
    has a size; the files' real sizes are then checked against these numbers one by one."""
    size = manifest.size
    mf_bytes = (path / MANIFEST).stat().st_size if manifest_bytes is None else manifest_bytes
    if size.files.get(MANIFEST) != mf_bytes:
        raise ArtifactError(f"{path}: {MANIFEST} has {mf_bytes:,} bytes where it records {size.files.get(MANIFEST)!r} "
                            "(modified, or written by an xbitc before 2026-12-05 whose size record could be a byte off: "
                            "compile it again)")
    if size.counted_bytes != sum(size.files.values()):
        raise ArtifactError(f"{path}: the manifest's size ({size.counted_bytes:,} bytes) is not the sum of its files' "
                            f"({sum(size.files.values()):,}); corrupt or modified")
    bpw = bits_per_weight(size.counted_bytes, manifest.source.param_count)
    if abs(bpw - size.bits_per_weight) > 1e-3:
        raise ArtifactError(f"{path}: the manifest claims {size.bits_per_weight} bits per weight where its bytes give "
                            f"{bpw:.4f}; corrupt or modified")
    unsized = sorted(set(manifest.files) - set(size.files) - set(size.uncounted))
    if unsized:
        raise ArtifactError(f"{path}: the manifest lists {unsized[0]} without its size; corrupt or modified")


def _check_name(root: Path, rel: str) -> None:
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or "\\" in rel or "\0" in rel or any(p in ("", ".", "..") for p in parts)
            or rel == MANIFEST):
        raise ArtifactError(f"{root}: the manifest lists {rel!r}, which is not a plain path inside the artifact; refused")


def _read(root: Path, rel: str, size: int, exact: bool = False) -> bytes:
    """The bytes of `rel`, a regular file inside `root` reached without following links, of `size` bytes (at most,
    unless exact). Checked and read through one descriptor, so what was checked is what is read."""
    here = root
    for part in rel.split("/")[:-1]:
        here = here / part
        try:
            st = os.lstat(here)
        except OSError:
            raise ArtifactError(f"{root}: file {rel} listed in the manifest is missing") from None
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactError(f"{root}: {rel} is reached through a symbolic link; an artifact holds plain files only")
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below as not a regular file
        fd = os.open(root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ArtifactError(f"{root}: file {rel} listed in the manifest is missing") from None
    except OSError as err:
        if os.path.islink(root / rel):
            raise ArtifactError(f"{root}: {rel} is reached through a symbolic link; an artifact holds plain files only") from None
        raise ArtifactError(f"{root}: cannot open {rel} ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{root}: {rel} is not a regular file; an artifact holds plain files only")
        if st.st_size != size if exact else st.st_size > size:
            raise ArtifactError(f"{root}: {rel} has {st.st_size:,} bytes where the manifest records {size:,} (corrupt or modified)")
        data = f.read(size + 1)
    if len(data) != st.st_size:  # it changed while being read
        raise ArtifactError(f"{root}: {rel} changed while it was read; load it again when nothing writes to it")
    return data


def _files_in(root: Path) -> set[str]:
    """Every non-directory entry under root (links included, not followed), as relative posix names."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath).relative_to(root)
        found.update((base / f).as_posix() for f in filenames)
        found.update((base / d).as_posix() for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
    return found


def load_graph(path: Path, check: bool = True) -> tuple[Graph, Manifest]:
    path = Path(path)
    manifest, manifest_bytes = _manifest(path)
    if check:
        files = verify_files(path, manifest, manifest_bytes)
    else:  # the caller's choice: read by path, unverified
        files = {rel: (path / rel).read_bytes() for rel in (GRAPH, STEP, WEIGHTS) if (path / rel).is_file()}
    if WEIGHTS not in files or GRAPH not in files:
        raise ArtifactError(f"{path}: {GRAPH} or {WEIGHTS} is missing; compile the artifact again")
    try:
        arrays = safetensors_load(files[WEIGHTS])
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise ArtifactError(f"{path}: {WEIGHTS} is not a readable safetensors file ({err})") from None
    params: dict[str, Any] = {}
    limit = 64 * len(files[WEIGHTS]) + (1 << 20)  # generous even for matrices whose columns are 0-bit
    for name, entry in manifest.tensors.items():
        try:
            params[name] = _param(name, entry, arrays, limit)
        except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as err:
            raise ArtifactError(f"{path}: tensor {name}: {err} (the file does not describe a valid tensor)") from None
    graphs = {}
    for rel in (GRAPH, STEP):
        if rel in files:  # with check, an unlisted step.json was refused above
            try:
                doc = _parse_json(files[rel])
            except ValueError as err:
                raise ArtifactError(f"{path}: {rel} is not valid JSON ({err}); the artifact is corrupt") from None
            try:
                graphs[rel] = serialize.graph_from_dict(doc, params)
            except serialize.GraphFormatError as err:
                raise ArtifactError(f"{path}: {rel}: {err}") from None
    graph = graphs[GRAPH]
    graph.step = graphs.get(STEP)
    for rel, g in graphs.items():
        try:  # what cannot run is refused here, naming the file, not as some error in the middle of a call
            verify(g)
            dry_run(g)
        except VerifyError as err:
            first, *rest = (line.strip() for line in str(err).splitlines())
            raise ArtifactError(f"{path}: {rel}: {first} {'; '.join(rest)}".rstrip()) from None
    return graph, manifest


def _param(name: str, entry: TensorEntry, arrays: dict[str, np.ndarray], limit: int) -> Any:
    if math.prod(entry.shape) > limit:
        raise ValueError(f"shape {entry.shape} is more than {WEIGHTS} can hold")
    if entry.storage == "packed":
        desc = {"shape": entry.shape, "layout": entry.layout, "permuted": entry.permuted, "segments": entry.segments}
        return PackedMatrix.from_tensors(name, desc, arrays)
    if entry.storage != "float":
        raise ValueError(f"storage {entry.storage!r} cannot be loaded")
    try:  # bfloat16 is stored as its raw bits (numpy has no bfloat16)
        dtype = np.dtype(np.int16 if entry.dtype == "bfloat16" else entry.dtype) if entry.dtype else None
    except TypeError:
        dtype = None
    if dtype is None:
        raise ValueError(f"dtype {entry.dtype!r} is not one xbitc stores")
    array = _array(arrays, name, dtype, tuple(entry.shape))
    t = torch.from_numpy(array.copy())
    if entry.dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t


def _array(arrays: dict[str, np.ndarray], key: str, dtype: np.dtype, shape: tuple) -> np.ndarray:
    if key not in arrays:
        raise ValueError(f"{WEIGHTS} has no array {key}")
    a = arrays[key]
    if a.dtype != dtype or a.shape != shape:
        raise ValueError(f"array {key} is {a.dtype} {list(a.shape)} where {dtype} {list(shape)} is expected")
    return a
