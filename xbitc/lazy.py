"""Weights read when asked: a Hugging Face folder of (sharded) safetensors, or a GGUF file, loaded without
materializing it.

The model is built with its parameters on the meta device (`meta_parameters`; buffers, which a checkpoint often
lacks, such as rotary frequencies, are computed as usual), traced with fake CPU float32 tensors in the parameters'
place (`fake_parameters`), and every parameter of the traced graph is a `LazyWeight`: its shard and key, read from
the memory-mapped file (safetensors' safe_open) when asked and cast to float32, as the eager loader casts it.
Loading and tracing an 8B model then holds none of its weights; a pass reads a tensor when it needs it. A GGUF
tensor (`GGUFWeight`) is read from its offset in the file, dequantized by gguf-py and put in transformers' layout by
transformers' tensor processor for the architecture, as transformers' own GGUF loader does with every tensor at once.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open

from xbitc.ir.graph import Graph

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class LazyWeight:
    """A parameter still in its safetensors shard: shape and dtype known, data read on demand."""

    def __init__(self, file: Path, key: str, shape: tuple[int, ...], stored: torch.dtype):
        self.file, self.key, self.shape, self.stored = str(file), key, torch.Size(shape), stored
        self.dtype = torch.float32 if stored.is_floating_point else stored  # what load() returns

    def load(self) -> torch.Tensor:
        with safe_open(self.file, framework="pt") as f:
            return f.get_tensor(self.key).to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        """The interpreter asks every stored parameter for its float form by this name."""
        return self.load()

    def numel(self) -> int:
        return self.shape.numel()

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __repr__(self) -> str:
        return f"LazyWeight({Path(self.file).name}:{self.key}, {tuple(self.shape)}, {self.stored})"


class GGUFWeight(LazyWeight):
    """A tensor still in a GGUF file: its bytes at `offset` (`raw`: their dtype and array shape as gguf-py reads
    them), of GGML type `qtype`; `shape` is transformers' (GGUF lists dimensions innermost first). `process` puts the
    dequantized values in transformers' layout (for llama: q and k rows un-permuted); it is set once the tensor is
    matched to a parameter."""

    def __init__(self, file: Path, key: str, shape: tuple[int, ...], stored: torch.dtype, qtype: int, offset: int,
                 raw: tuple[np.dtype, tuple[int, ...]]):
        super().__init__(file, key, shape, stored)
        self.qtype, self.offset, self.raw = qtype, offset, raw
        self.process: Callable[[np.ndarray, str], np.ndarray] = lambda values, name: values

    def load(self) -> torch.Tensor:
        import gguf

        dtype, shape = self.raw
        count = int(np.prod(shape))
        with open(self.file, "rb") as fh:  # read, not mapped: the pages do not stay with the process
            data = np.fromfile(fh, dtype=dtype, count=count, offset=self.offset).reshape(shape)
        values = self.process(gguf.dequantize(data, gguf.GGMLQuantizationType(self.qtype)), self.key)
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(self.shape).to(self.dtype)


def gguf_checkpoint(file: Path) -> dict[str, GGUFWeight]:
    """Every tensor of a GGUF file by its GGUF name, from the header (gguf-py's reader maps the file; nothing of the
    tensors' data is read)."""
    import gguf

    stored = {gguf.GGMLQuantizationType.F16: torch.float16, gguf.GGMLQuantizationType.BF16: torch.bfloat16}
    found = {}
    for t in gguf.GGUFReader(str(file)).tensors:
        found[t.name] = GGUFWeight(file, t.name, tuple(int(d) for d in reversed(t.shape)),
                                   stored.get(t.tensor_type, torch.float32), int(t.tensor_type), int(t.data_offset),
                                   (t.data.dtype, tuple(t.data.shape)))
    return found


def checkpoint(folder: Path) -> dict[str, LazyWeight] | None:
    """Every tensor of a folder's safetensors checkpoint (model.safetensors or a sharded index) by key, reading only
    the headers; None when the folder holds no safetensors checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        return None
    found = {}
    for shard in shards:
        path = folder / shard
        with open(path, "rb") as fh:  # the header alone: an 8-byte length, then JSON
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for key, info in header.items():
            if key != "__metadata__" and info["dtype"] in _DTYPES:
                found[key] = LazyWeight(path, key, tuple(info["shape"]), _DTYPES[info["dtype"]])
    return found


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no initialisation work); buffers
    stay real. A parameter already on meta is kept as the same object, so tied weights stay tied."""
    real = torch.nn.Module.register_parameter

    def register(self: torch.nn.Module, name: str, param: Any) -> None:
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        real(self, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = real


def bind(model: torch.nn.Module, weights: dict[str, LazyWeight]) -> dict[str, LazyWeight] | None:
    """Each meta parameter's checkpoint tensor by the parameter's name (tied names share one), and the checkpoint's
    buffers copied in; None when a parameter is not in the checkpoint under its own name or shape (the eager loader
    then does what transformers does: renamed keys, conversions)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    bound: dict[str, LazyWeight] = {}
    by_param: dict[int, LazyWeight] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in by_param:
            w = weights.get(name) or weights.get(f"{prefix}.{name}")
            if w is None or tuple(w.shape) != tuple(p.shape):
                return None
            by_param[id(p)] = w
        bound[name] = by_param[id(p)]
    for name, b in model.named_buffers():
        w = weights.get(name) or weights.get(f"{prefix}.{name}")
        if w is not None and tuple(w.shape) == tuple(b.shape):
            b.copy_(w.load().to(b.dtype))
    return bound


@contextmanager
def fake_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Inside, the model's meta parameters are fake float32 CPU tensors of a fresh FakeTensorMode, which is active,
    so torch.export traces the model as if it held its weights; the meta parameters come back on exit."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    swapped, made = [], {}
    with mode:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_meta:
                    dtype = torch.float32 if p.is_floating_point() else p.dtype
                    if id(p) not in made:
                        made[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False)
                    swapped.append((module, name, p))
                    module._parameters[name] = made[id(p)]
    try:
        with mode:
            yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def is_lazy(graph: Graph) -> bool:
    return any(isinstance(v, LazyWeight) for v in graph.params.values())


def materialize(graph: Graph) -> None:
    """Read every lazy parameter into memory (float32), one at a time: for passes that need the whole model."""
    for name, value in list(graph.params.items()):
        if isinstance(value, LazyWeight):
            graph.params[name] = value.load()
