"""Loading and running compiled artifacts from Python.

Which backend executes: the one asked for (`backend=`, `--backend`), else the environment's `XBITC_BACKEND`, else the
artifact's own. An artifact compiled for `reference` holds only the portable packed format, which every executing
backend lowers from, so on an x86-64 host it runs through the x86 kernels; `reference` stays available as the oracle
(`XBITC_BACKEND=reference` or `backend="reference"`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from xbitc import registry
from xbitc.artifact import TOKENIZER, load_graph
from xbitc.ir.verify import verify


class CompiledModel:
    def __init__(self, path: Path, backend: str | None = None, check: bool = True):
        self.path = Path(path)
        self.graph, self.manifest = load_graph(self.path, check=check)
        verify(self.graph)
        self.backend_name = backend or os.environ.get("XBITC_BACKEND") or host_backend(self.manifest.backend)
        self.backend = registry.get(registry.BACKEND_GROUP, self.backend_name)()
        self.program = self.backend.lower(self.graph)
        self._tokenizer = None

    def __call__(self, *inputs: torch.Tensor) -> Any:
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

            self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return self._tokenizer

    @torch.no_grad()
    def generate(self, text: str, max_new_tokens: int = 20) -> str:
        """Greedy decoding, re-running the whole prefix each step (the graph has no KV cache yet)."""
        if self.manifest.kind != "causal-lm":
            raise ValueError(f"generate needs a causal language model; this artifact is a {self.manifest.kind} model")
        tok = self.tokenizer
        ids = tok(text, return_tensors="pt").input_ids
        start = ids.shape[1]
        for _ in range(max_new_tokens):
            nxt = self(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if tok.eos_token_id is not None and int(nxt) == tok.eos_token_id:
                break
        return tok.decode(ids[0, start:], skip_special_tokens=True)


def host_backend(artifact_backend: str) -> str:
    """The backend that runs an artifact compiled for `artifact_backend` on this host by default."""
    if artifact_backend != "reference":
        return artifact_backend
    from xbitc.backends.x86 import is_x86_host

    return "x86" if is_x86_host() else "reference"


def load(path: str | Path, backend: str | None = None, check: bool = True) -> CompiledModel:
    return CompiledModel(Path(path), backend, check)
