"""manifest.json: what an artifact holds, how it was made, and the hashes that prove it is intact."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

MANIFEST_VERSION = 1
# weights.safetensors' own metadata: one key, because safetensors writes its metadata map in hash order (two keys came
# out in either order from run to run, so equal compiles gave files of different bytes and hashes)
WEIGHTS_METADATA = {"format": f"xbitc/{MANIFEST_VERSION}"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(Strict):
    path: str
    sha256: str
    param_count: int


class TensorEntry(Strict):
    role: str  # linear | embedding | output | float
    shape: list[int]
    storage: Literal["float", "packed", "other"]
    dtype: str | None = None
    layout: str | None = None
    permuted: bool = False
    segments: list[list[int]] | None = None  # [bits, group, start, stop] per segment
    bytes: int


class Size(Strict):
    target_bpw: float | None
    bits_per_weight: float  # whole model: 8 * counted bytes / source parameters
    linear_bits_per_weight: float | None  # quantized linears only: 8 * their bytes / their parameters
    counted_bytes: int
    files: dict[str, int]  # counted file -> bytes
    uncounted: dict[str, int]  # e.g. tokenizer files: not needed to compute outputs from inputs


class Manifest(Strict):
    format: Literal["xbitc-artifact"] = "xbitc-artifact"
    version: int = MANIFEST_VERSION
    xbitc_version: str
    created: str
    kind: str
    backend: str
    source: Source
    pipeline: str
    passes: list[dict]
    inputs: list[str]
    size: Size
    tensors: dict[str, TensorEntry]
    files: dict[str, str]  # relative path -> sha256
    notes: dict = {}
