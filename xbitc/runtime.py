"""Loading and running compiled artifacts from Python.

Which backend executes: the one asked for (`backend=`, `--backend`), else the environment's `XBITC_BACKEND`, else
`host_backend`: the artifact's own where it executes here, else the CPU backend of the host's family (x86 on x86-64,
arm on AArch64). Every artifact holds the portable packed format, which every executing backend lowers from, so a
`reference` artifact runs through the host's kernels too; `reference` stays available as the oracle
(`XBITC_BACKEND=reference` or `backend="reference"`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from xbitc import registry
from xbitc.artifact import TOKENIZER, load_graph
from xbitc.stepgraph import empty_cache


class CompiledModel:
    def __init__(self, path: Path, backend: str | None = None, check: bool = True):
        self.path = Path(path)
        self.graph, self.manifest = load_graph(self.path, check=check)  # verified and dry-run there, step included
        self.backend_name = backend or os.environ.get("XBITC_BACKEND") or host_backend(self.manifest.backend)
        try:
            self.backend = registry.get(registry.BACKEND_GROUP, self.backend_name)()
        except registry.UnknownPlugin:
            if backend or os.environ.get("XBITC_BACKEND"):
                raise
            # every artifact carries the portable packed format, so a missing plugin is never a dead end
            raise registry.UnknownPlugin(
                f"{self.path} was compiled for backend {self.backend_name!r}, which is not installed here; install "
                "the package that provides it, or run the artifact with the portable reference format "
                "(--backend reference, or backend='reference')") from None
        self.program = self.backend.lower(self.graph)
        self.step = self.program.companion(self.graph.step) if self.graph.step is not None else None
        self._tokenizer = None

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if self.graph.meta.get("input_sizes_exact"):  # traced by this xbitc; older artifacts' INPUT types hold
            check_inputs(self.graph, inputs)  # the traced example size for dynamic sizes too, so cannot be checked
        return self.program(*inputs)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            folder = self.path / TOKENIZER
            if not folder.exists():
                raise ValueError(f"{self.path} has no tokenizer; it was compiled from a model without one")
            import os

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoTokenizer

            # the folder's files were verified against the manifest; code it names (auto_map) is never trusted
            self._tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        return self._tokenizer

    @torch.no_grad()
    def generate_ids(self, ids: torch.Tensor, max_new_tokens: int, eos: int | None = None,
                     use_cache: bool = True) -> list[int]:
        """Greedy continuation of `ids` [1, T]. With the artifact's decode step (and `use_cache`), the prompt is run
        once with empty key/value caches and every new token is one step over the caches; otherwise every token
        re-runs the whole prefix through the main graph."""
        if self.manifest.kind != "causal-lm":
            raise ValueError(f"generate needs a causal language model; this artifact is a {self.manifest.kind} model")
        out: list[int] = []
        if self.step is not None and use_cache:
            logits, *past = self.step(ids, *empty_cache(self.graph.step, ids.shape[0]))
            for _ in range(max_new_tokens):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(nxt))
                if int(nxt) == eos or len(out) == max_new_tokens:
                    break
                logits, *past = self.step(nxt, *past)
            return out
        for _ in range(max_new_tokens):
            nxt = self(ids)[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) == eos:
                break
        return out

    def generate(self, text: str, max_new_tokens: int = 20, use_cache: bool = True) -> str:
        """Greedy decoding of `text`'s continuation (see generate_ids)."""
        tok = self.tokenizer
        ids = tok(text, return_tensors="pt").input_ids
        return tok.decode(self.generate_ids(ids, max_new_tokens, tok.eos_token_id, use_cache), skip_special_tokens=True)


class InputShapeError(ValueError):
    """A call's inputs do not fit the shapes the artifact was traced for; the message names the input."""


def check_inputs(graph: Any, inputs: tuple) -> None:
    """Refuse, before running, inputs whose count, rank or static sizes differ from the graph's INPUT types (str
    sizes are dynamic: any size). A static size the caller changes would otherwise fail deep in the graph."""
    expected = graph.inputs()
    if len(inputs) != len(expected):
        names = ", ".join(n.name for n in expected)
        raise InputShapeError(f"this model takes {len(expected)} input{'s' * (len(expected) != 1)} ({names}), "
                              f"{len(inputs)} given")
    for node, x in zip(expected, inputs):
        if node.type is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise InputShapeError(f"input {node.name!r} must be a tensor, got {type(x).__name__}")
        want = node.type.shape
        if len(want) == x.dim() and all(not isinstance(w, int) or w == g for w, g in zip(want, x.shape)):
            continue
        shown = "[" + ", ".join(str(w) if isinstance(w, int) else "N" for w in want) + "]"
        named = "x".join(
            str(w) if isinstance(w, int) and (i >= x.dim() or w == x.shape[i]) else ("batch" if i == 0 else f"d{i}")
            for i, w in enumerate(want)
        )
        raise InputShapeError(
            f"input {node.name!r} has shape {list(x.shape)}, but this model was compiled for {shown} (N: any size); "
            f"pass that shape, or compile again with the sizes that vary named, e.g. --input {node.name}:{named}:"
            f"{node.type.dtype}"
        )


def host_backend(artifact_backend: str) -> str:
    """The backend that runs an artifact compiled for `artifact_backend` on this host by default: its own where it
    executes here, else the host's CPU backend (x86 on x86-64, arm on AArch64), else reference: every artifact
    carries the portable packed format, so an artifact compiled for another ISA (arm on an x86-64 host) still
    runs."""
    from xbitc.backends.cpu.backend import CpuBackend

    if artifact_backend != "reference":
        try:
            if registry.get(registry.BACKEND_GROUP, artifact_backend)().capabilities().executes_here:
                return artifact_backend
        except registry.UnknownPlugin:
            return artifact_backend  # CompiledModel names what to install
    for name in registry.names(registry.BACKEND_GROUP):  # the CPU backend whose family's ISA is the host's
        try:
            cls = registry.get(registry.BACKEND_GROUP, name)
        except Exception:  # a broken plugin must not stop artifacts from loading
            continue
        if isinstance(cls, type) and issubclass(cls, CpuBackend) and cls.family.runs_here():
            return name
    return "reference"


def load(path: str | Path, backend: str | None = None, check: bool = True) -> CompiledModel:
    return CompiledModel(Path(path), backend, check)
