"""Load a model from what users have (export program, Hugging Face folder, GGUF, factory, pickle) and trace it."""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from xbitc import lazy, stepgraph
from xbitc.importer import TraceError, from_exported
from xbitc.ir.graph import Graph, Op


class LoadError(ValueError):
    """The model source could not be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    module: torch.nn.Module  # forward(*tensors) -> tensor
    example_inputs: tuple
    kind: str  # "causal-lm" | "encoder" | "vision" | "audio" | "generic"
    source: str
    source_hash: str
    tokenizer: Any = None
    dynamic_dims: dict[int, tuple[str, ...]] = field(default_factory=dict)  # input index -> names of its dynamic axes
    max_seq: int = 1 << 16  # longest sequence the traced graph accepts (position tables bound it)
    input_note: str = ""  # how the example inputs were made when xbitc guessed them (said when tracing fails)
    # parameter name in the transformers model -> lazy.LazyWeight, when its parameters are on the meta device
    lazy: dict[str, Any] | None = None

    @property
    def param_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())  # shared (tied) parameters count once


class CausalLMLogits(torch.nn.Module):
    """token ids [batch, seq] -> logits [batch, seq, vocab], no cache: what xbitc compiles for language models."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class EncoderHidden(torch.nn.Module):
    """(token ids, attention mask) -> last hidden state, for BERT-style encoders."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class VisionOutput(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


class AudioEncoderHidden(torch.nn.Module):
    """log-mel features [batch, mel bins, frames] -> last hidden state, for Whisper-style audio encoders."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.model(input_features=input_features).last_hidden_state


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    """A whole encoder-decoder model (T5ForConditionalGeneration, WhisperForConditionalGeneration, BartModel,
    EncoderDecoderModel, ...): judged by what the module holds, an encoder and a decoder (itself or in its `.model`),
    not by its config's is_encoder_decoder, which an encoder on its own (WhisperEncoder) shares."""
    kids = dict(model.named_children())
    inner = kids.get("model")
    if isinstance(inner, torch.nn.Module):
        kids.update(dict(inner.named_children()))
    return "encoder" in kids and "decoder" in kids


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def wrap_hf(model: torch.nn.Module, tokenizer: Any = None, source: str = "", source_hash: str = "") -> LoadedModel:
    """Wrap a transformers model in the tensor-in, tensor-out interface xbitc traces."""
    model = model.eval()
    for p in model.parameters():  # transformers refuses .float() on GGUF-loaded models; cast the data directly
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    cfg = model.config
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    if is_encoder_decoder(model):
        raise LoadError(f"{source or 'the model'}: {type(model).__name__} is an encoder-decoder model, which xbitc does not compile yet; "
                        "compile its encoder on its own (e.g. model.get_encoder()) or a decoder-only model")
    name = type(model).__name__
    max_seq = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 16)
    loaded = _wrap_hf(model, cfg, name, tokenizer, source, source_hash)
    loaded.max_seq = max_seq
    return loaded


def _wrap_hf(model, cfg, name, tokenizer, source, source_hash) -> LoadedModel:
    if "ForCausalLM" in name or "LMHeadModel" in name:
        ids = torch.randint(0, cfg.vocab_size, (2, 8))  # size-1 dims would be specialised by export
        return LoadedModel(CausalLMLogits(model), (ids,), "causal-lm", source, source_hash, tokenizer, {0: ("batch", "seq")})
    if hasattr(cfg, "num_mel_bins") and hasattr(cfg, "max_source_positions") and hasattr(model, "conv1"):
        # Whisper's encoder takes exactly max_source_positions * (its convolutions' strides) frames (2x: 3000 for
        # 30 s of audio) and refuses others, so only the batch is dynamic.
        strides = [getattr(getattr(model, c, None), "stride", (1,))[0] for c in ("conv1", "conv2")]
        frames = int(cfg.max_source_positions) * strides[0] * strides[1]
        feats = torch.randn(2, cfg.num_mel_bins, frames)
        return LoadedModel(AudioEncoderHidden(model), (feats,), "audio", source, source_hash, tokenizer,
                           {0: ("batch", None, None)})
    if hasattr(cfg, "image_size") and hasattr(cfg, "num_channels"):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        pix = torch.randn(2, cfg.num_channels, size, size)
        return LoadedModel(VisionOutput(model), (pix,), "vision", source, source_hash, tokenizer, {0: ("batch",)})
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    mask = torch.ones_like(ids)
    axes = ("batch", "seq")
    return LoadedModel(EncoderHidden(model), (ids, mask), "encoder", source, source_hash, tokenizer, {0: axes, 1: axes})


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub at run time
    try:
        import transformers
    except ImportError as err:
        raise LoadError("loading Hugging Face or GGUF models needs the extra: pip install 'xbitc[hf]'") from err
    return transformers


def load_hf_folder(path: Path, gguf_file: str | None = None, lazy: bool = False, only_lazy: bool = False) -> LoadedModel:
    """A Hugging Face folder (or a GGUF file in it). With `lazy`, a safetensors checkpoint or the GGUF file is not
    read: the model is built with meta parameters and each graph parameter reads its tensor when asked (xbitc.lazy);
    the module then cannot run. A model the lazy path cannot map name for name loads eagerly, or with `only_lazy`
    (a memory bound the eager load would break) is refused before its weights are read."""
    tf = _transformers()
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    bound = None
    with one_gguf_reader() if gguf_file else nullcontext():
        if gguf_file:
            check_gguf(path / gguf_file)  # parsed once here; transformers' readers below reuse it
        try:
            # trust_remote_code stays off: a config's auto_map names code in the folder, which never runs
            config = tf.AutoConfig.from_pretrained(path, trust_remote_code=False, **kw)
            arch = (getattr(config, "architectures", None) or [None])[0]
            # the config names a class: only a transformers model class is taken, never any other attribute
            cls = getattr(tf, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
            if not (isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel)):
                cls = tf.AutoModelForCausalLM if gguf_file else tf.AutoModel
            if lazy:
                model, bound = _lazy_gguf_model(path / gguf_file, cls, config) if gguf_file else _lazy_model(path, cls, config)
            if lazy and bound is None and only_lazy:
                raise LoadError(f"{path / gguf_file if gguf_file else path}: its tensors do not map one to one onto "
                                "the model's parameters (renamed keys, a quantized checkpoint, or tensors merged or "
                                "split on load), so it loads only whole, which --max-memory does not bound; leave "
                                "--max-memory out")
            if bound is None:
                model = cls.from_pretrained(path, dtype=torch.float32, trust_remote_code=False, **kw)
        except LoadError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            first = " ".join(str(err).split())[:300]
            raise LoadError(f"{path / gguf_file if gguf_file else path}: transformers cannot load this model "
                            f"({type(err).__name__}: {first}); give a supported Hugging Face folder or GGUF file") from None
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kw)
        except (OSError, ValueError, KeyError, TypeError):
            tokenizer = None
    src = path / gguf_file if gguf_file else path
    loaded = wrap_hf(model, tokenizer, str(src), file_hash(src))
    loaded.lazy = bound
    return loaded


def _lazy_model(path: Path, cls: Any, config: Any) -> tuple[torch.nn.Module | None, dict | None]:
    """`cls` built from `config` with meta parameters bound to the folder's safetensors tensors, or (None, None)
    where that cannot stand in for from_pretrained (no safetensors, a quantized checkpoint, names that differ)."""
    weights = lazy.checkpoint(path)
    if weights is None or getattr(config, "quantization_config", None):
        return None, None
    with lazy.meta_parameters():
        model = cls(config) if issubclass(cls, torch.nn.Module) else cls.from_config(config)  # a class or an Auto*
    bound = lazy.bind(model, weights)
    return (model, bound) if bound is not None else (None, None)


def _lazy_gguf_model(file: Path, cls: Any, config: Any) -> tuple[torch.nn.Module | None, dict | None]:
    """`cls` built from `config` with meta parameters bound to the GGUF file's tensors by transformers' own name map
    and tensor processor, or (None, None) for an architecture whose processor merges or splits tensors (the mixtures
    of experts, ...: they load eagerly)."""
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, LlamaTensorProcessor, TensorProcessor,
                                                          get_gguf_hf_weights_map)
    import gguf

    arch = gguf.GGUFReader(str(file)).fields["general.architecture"].contents()
    kind = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    if kind not in (TensorProcessor, LlamaTensorProcessor):  # one tensor in, one out: these two only
        return None, None
    processor = kind(config=config.to_dict())  # the config transformers parsed from the file: heads, kv heads
    with lazy.meta_parameters():
        model = cls(config) if issubclass(cls, torch.nn.Module) else cls.from_config(config)
    names = get_gguf_hf_weights_map(model, processor)  # GGUF name -> transformers name

    def process(values, name):
        return processor.process(weights=values, name=name, tensor_key_mapping=names, parsed_parameters={}).weights

    weights = {}
    for key, w in lazy.gguf_checkpoint(file).items():
        if key in names:
            w.process = process
            weights[names[key]] = w
    bound = lazy.bind(model, weights)
    return (model, bound) if bound is not None else (None, None)


def check_gguf(file: Path) -> None:
    """Refuse a file that is not GGUF, or a GGUF file that is truncated or damaged, with one line (gguf and
    transformers raise struct.error, ValueError or IndexError deep in their parsers)."""
    import gguf

    with open(file, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise LoadError(f"{file} is empty, not a GGUF file; give a .gguf written by llama.cpp's converters or gguf-py")
    if head != b"GGUF":
        raise LoadError(f"{file} is not a GGUF file (it starts with {head!r}, not b'GGUF'); give a .gguf written by "
                        "llama.cpp's converters or gguf-py, or the Hugging Face folder itself")
    try:
        gguf.GGUFReader(str(file))
    except Exception as err:  # the parser's errors for short or inconsistent files
        raise LoadError(f"{file} is a truncated or damaged GGUF file ({_first_line(err)}); download or convert it "
                        "again") from None


@contextmanager
def one_gguf_reader():
    """transformers opens a GGUF file with a fresh gguf.GGUFReader for the config, again for the model's config and
    its weights, and again for the tokenizer; each one parses all the metadata field by field (SmolLM2's 49K-token
    vocabulary and merges: ~5 s apiece). Inside this context the same file opens as one shared, read-only reader.
    Its name map (get_gguf_hf_weights_map) builds gguf-py's tensor name table anew for every submodule (397 times
    for SmolLM2, 32 ms each); inside, the table of an architecture and depth is built once."""
    import gguf

    real, real_names = gguf.GGUFReader, gguf.get_tensor_name_map
    opened: dict = {}

    def shared(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in opened:
            opened[key] = real(path, mode)
        return opened[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared, functools.cache(real_names)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real, real_names


DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "float64": torch.float64, "double": torch.float64, "int64": torch.int64,
    "long": torch.int64, "int32": torch.int32, "int": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
DIM_EXAMPLE = {"batch": 2}  # size a named dimension is traced at unless given (NAME=N); others: 8
INPUT_HELP = (
    "NAME:SHAPE[:DTYPE], e.g. ids:1x16:int64 or ids:batchxseq:int64; SHAPE is sizes joined by 'x' (or ',' when a "
    "name holds an x); a size given as a name (batch, seq, ...) stays dynamic, NAME=N traces it at N (default 2 for "
    f"batch, 8 otherwise); DTYPE: {', '.join(sorted(set(DTYPES)))} (default float32)"
)


@dataclass
class InputSpec:
    """One --input: a name, per axis a size (int) or a dynamic dimension (name, traced size), a dtype."""
    name: str
    dims: tuple[int | tuple[str, int], ...]
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else d[1] for d in self.dims)

    @property
    def axis_names(self) -> tuple[str | None, ...]:
        return tuple(None if isinstance(d, int) else d[0] for d in self.dims)


def parse_input(text: str) -> InputSpec:
    """Parse one --input value (see INPUT_HELP); a LoadError names what is wrong."""
    import re

    bad = f"--input {text!r}"
    parts = text.split(":")
    if len(parts) not in (2, 3) or not re.fullmatch(_NAME, parts[0]) or not parts[1]:
        raise LoadError(f"{bad} is not NAME:SHAPE[:DTYPE]; write it like ids:1x16:int64 or ids:batchxseq:int64")
    name, shape = parts[0], parts[1]
    dtype_name = parts[2] if len(parts) == 3 else "float32"
    if dtype_name not in DTYPES:
        raise LoadError(f"{bad}: unknown dtype {dtype_name!r}; use one of {', '.join(sorted(set(DTYPES)))}")
    dims: list[int | tuple[str, int]] = []
    for item in shape.split(",") if "," in shape else shape.split("x"):
        if re.fullmatch(r"\d+", item):
            if int(item) < 1:
                raise LoadError(f"{bad}: size {item} must be 1 or more")
            dims.append(int(item))
            continue
        m = re.fullmatch(rf"({_NAME})(?:=(\d+))?", item)
        if m is None:
            raise LoadError(f"{bad}: {item!r} is neither a size nor a dimension name (NAME or NAME=N); "
                            "join sizes with 'x', or with ',' when a name holds an x")
        size = int(m.group(2)) if m.group(2) else DIM_EXAMPLE.get(m.group(1), 8)
        if size < 2:
            raise LoadError(f"{bad}: trace dynamic dimension {m.group(1)!r} at 2 or more ({m.group(1)}={size} "
                            "would be fixed by torch.export); write a plain size to keep it static")
        dims.append((m.group(1), size))
    return InputSpec(name, tuple(dims), DTYPES[dtype_name])


def parse_inputs(texts: Any) -> list[InputSpec]:
    specs = [parse_input(t) for t in texts or ()]
    names = [s.name for s in specs]
    for n in names:
        if names.count(n) > 1:
            raise LoadError(f"--input {n!r} is given twice; give each input of forward once, in order")
    return specs


def make_inputs(specs: list[InputSpec], int_high: int | None) -> tuple[tuple, dict[int, tuple]]:
    """Example tensors for --input specs (integers drawn from [0, int_high), else 0/1) and their dynamic axes."""
    gen = torch.Generator().manual_seed(0)
    tensors, dynamic = [], {}
    for i, spec in enumerate(specs):
        if spec.dtype.is_floating_point:
            tensors.append(torch.randn(spec.shape, generator=gen).to(spec.dtype))
        elif spec.dtype == torch.bool:
            tensors.append(torch.ones(spec.shape, dtype=torch.bool))
        else:
            tensors.append(torch.randint(0, int_high or 2, spec.shape, generator=gen).to(spec.dtype))
        if any(spec.axis_names):
            dynamic[i] = spec.axis_names
    return tuple(tensors), dynamic


def load_factory(spec: str, inputs: list[InputSpec] | None = None) -> LoadedModel:
    mod_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise LoadError(f"cannot import factory {spec!r}: {err}") from None
    made = fn()
    module, example = made if isinstance(made, tuple) else (made, getattr(made, "example_inputs", None))
    return _from_module(module, example, spec, hashlib.sha256(spec.encode()).hexdigest(), inputs)


def from_module(module: torch.nn.Module, example_inputs: tuple | None = None, name: str | None = None) -> LoadedModel:
    """A model you hold in memory, ready for `xbitc.driver.compile_model`: a transformers model (wrapped like a
    Hugging Face folder) or a plain nn.Module traced from `example_inputs` (else `module.example_inputs`, else its
    first layer), batch and token sequence kept dynamic where export allows. Its provenance hash covers every
    parameter and buffer."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    example = example_inputs if example_inputs is not None else getattr(module, "example_inputs", None)
    return _from_module(module, example, name or type(module).__name__, h.hexdigest())


def _from_module(module: Any, example: Any, source: str, digest: str, inputs: list[InputSpec] | None = None) -> LoadedModel:
    if isinstance(module, dict):  # a state_dict, or a training checkpoint holding one
        raise LoadError(
            f"{source} holds a state_dict or checkpoint ({type(module).__name__} of {len(module)} entries: weights "
            "without the model's code), not a model; pass the module itself (torch.save(model, ...)), a "
            "torch.export program (.pt2) or a Hugging Face folder (config.json + safetensors)"
        )
    if not isinstance(module, torch.nn.Module):
        raise LoadError(f"{source} did not produce a torch.nn.Module (got {type(module).__name__})")
    if hasattr(module, "config") and hasattr(module.config, "model_type"):
        if inputs:
            raise LoadError(f"--input is for plain nn.Modules and .pt2 programs; {source} is a transformers model, "
                            "whose inputs xbitc makes itself: leave --input out")
        return wrap_hf(module, None, source, digest)
    module = module.eval()
    if inputs:
        tensors, dynamic = make_inputs(inputs, _first_embedding_rows(module))
        return LoadedModel(module, tensors, "generic", source, digest, dynamic_dims=dynamic,
                           input_note=f"inputs from --input {' '.join(s.name for s in inputs)}")
    if example is not None:
        example = tuple(example)
        return LoadedModel(module, example, "generic", source, digest, dynamic_dims=_guess_dynamic(example))
    return _inferred(module, source, digest)


def _guess_dynamic(example: tuple) -> dict[int, tuple[str, ...]]:
    """Axes of given example inputs to keep dynamic: the batch (a leading axis of 2 or more) and, for 2-D integer
    inputs (token ids), the sequence. Where the model fixes them, export falls back to the traced shapes."""
    dims: dict[int, tuple[str, ...]] = {}
    for i, x in enumerate(example):
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] < 2:
            continue
        ids = x.dim() == 2 and not x.is_floating_point() and x.shape[1] >= 2
        dims[i] = ("batch", "seq") if ids else ("batch",)
    return dims


def _first_embedding_rows(module: torch.nn.Module) -> int | None:
    emb = next((m for m in module.modules() if isinstance(m, torch.nn.Embedding)), None)
    return int(emb.num_embeddings) if emb is not None else None


def _inferred(module: torch.nn.Module, source: str, digest: str) -> LoadedModel:
    """Inputs of a plain module from its first layer, where that layer leaves no doubt: token ids for an Embedding,
    [batch, in_features] floats for a Linear, [batch, channels, ...] for a Conv. "First" is module registration
    order (module.modules()): without inputs nothing can be run to learn the forward order, and most models
    register their layers in the order forward uses them; if a model does not, tracing fails and says how the
    inputs were guessed."""
    import inspect

    how = ("pass --input NAME:SHAPE:DTYPE for each argument of forward (e.g. --input x:batchx16:float32), or return "
           "(module, example_inputs) from a package.module:function factory")
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        params = []
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) != 1:
        raise LoadError(f"{source}: cannot infer the inputs of {type(module).__name__}, whose forward takes "
                        f"{len(required)} required arguments; {how}")
    first = next((m for m in module.modules() if next(m.children(), None) is None and any(True for _ in m.parameters(recurse=False))), None)
    gen = torch.Generator().manual_seed(0)
    arg = required[0].name
    if isinstance(first, torch.nn.Embedding):
        x = torch.randint(0, first.num_embeddings, (2, 8), generator=gen)
    elif isinstance(first, torch.nn.Linear):
        x = torch.randn(2, first.in_features, generator=gen).to(first.weight.dtype)
    elif isinstance(first, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        spatial = {torch.nn.Conv1d: (64,), torch.nn.Conv2d: (32, 32), torch.nn.Conv3d: (16, 16, 16)}[type(first)]
        x = torch.randn(2, first.in_channels, *spatial, generator=gen).to(first.weight.dtype)
    else:
        what = type(first).__name__ if first is not None else "no layer with parameters"
        raise LoadError(f"{source}: cannot infer the inputs of {type(module).__name__} from its first layer ({what}); {how}")
    note = (f"inputs inferred from the first registered layer ({type(first).__name__}): {arg} "
            f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')}; pass --input if that is not what forward takes")
    return LoadedModel(module, (x,), "generic", source, digest, dynamic_dims=_guess_dynamic((x,)), input_note=note)


def load(source: str, trust_pickle: bool = False, inputs: Any = None, lazy: bool = False,
         only_lazy: bool = False) -> LoadedModel:
    """Dispatch on what `source` is; `inputs`: --input texts (see INPUT_HELP) for plain modules and .pt2 programs;
    `lazy` / `only_lazy`: leave a Hugging Face folder's or GGUF file's weights in their files (see load_hf_folder).
    Raises LoadError with a fix for everything it refuses."""
    specs = parse_inputs(inputs)  # a malformed --input is refused before anything is loaded
    path = Path(source)
    if ":" in source and not path.exists() and not source.endswith((".pt", ".pt2", ".gguf")):
        return load_factory(source, specs)
    if not path.exists():
        raise LoadError(f"model file {source!r} does not exist")
    if specs and (path.is_dir() or path.suffix == ".gguf"):
        raise LoadError(f"--input is for plain nn.Modules and .pt2 programs; {source} is a transformers model, whose "
                        "inputs xbitc makes itself: leave --input out")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LoadError(f"{source} is a folder without config.json; expected a Hugging Face model folder")
        return load_hf_folder(path, lazy=lazy, only_lazy=only_lazy)
    if path.suffix == ".gguf":
        return load_hf_folder(path.parent, gguf_file=path.name, lazy=lazy, only_lazy=only_lazy)
    if path.suffix == ".pt2":
        return load_exported(path, trust_pickle, specs)
    if path.suffix in (".pt", ".pth", ".bin", ".pkl"):
        if not trust_pickle:
            raise LoadError(
                f"{source} is a pickle: loading it runs code stored in the file. If you trust its origin, pass "
                "--trust-pickle; otherwise export the model with torch.export.save (a .pt2) or save a safetensors folder"
            )
        try:
            module = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as err:  # not a torch.save file, truncated, or its classes cannot be imported here
            raise LoadError(
                f"{source} cannot be unpickled ({_first_line(err)}); pass a model saved with torch.save(model, ...) "
                "whose classes can be imported here, a .pt2 program or a Hugging Face folder"
            ) from None
        return _from_module(module, getattr(module, "example_inputs", None), str(path), file_hash(path), specs)
    raise LoadError(f"unknown model format {path.suffix!r}: use .pt2, a Hugging Face folder, .gguf, .pt or module:function")


def load_exported(path: Path, trust_pickle: bool = False, inputs: list[InputSpec] | None = None) -> LoadedModel:
    """A torch.export.save archive. torch.export.load runs code stored in some parts of an archive (pickles,
    native code, shape expressions it evaluates: see xbitc.pt2safety); those need --trust-pickle, like a .pt."""
    from xbitc import pt2safety

    try:
        found = pt2safety.findings(path)
    except pt2safety.NotAnArchive as err:
        raise LoadError(
            f"{path} is not a torch.export archive (not a zip file, or truncated: {err}); save the program with "
            "torch.export.save"
        ) from None
    if found and not trust_pickle:
        raise LoadError(
            f"{path} holds {found[0]}: loading it runs code stored in the file. If you trust its origin, pass "
            "--trust-pickle; otherwise save the program again with torch.export.save from plain tensors"
        )
    try:
        ep = torch.export.load(str(path))
    except Exception as err:  # torch raises many types for a bad archive
        raise LoadError(f"{path} is not a readable torch.export program: {_first_line(err)}") from None
    example = _given_inputs(ep, str(path), inputs) if inputs else exported_inputs(ep, str(path))
    loaded = LoadedModel(ep.module(), example, "generic", str(path), file_hash(path))
    loaded.exported = ep  # type: ignore[attr-defined]
    return loaded


def exported_inputs(ep: torch.export.ExportedProgram, source: str) -> tuple:
    """Example inputs of an exported program, one tensor per user input in the graph's order: those stored in the
    archive, else made from the input specs (symbolic sizes at their example value, else their least size >= 2;
    integer inputs that index an embedding in [0, its rows), other integers 0/1)."""
    from torch.utils import _pytree

    kinds = torch.export.graph_signature.InputKind
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind is kinds.USER_INPUT]
    if ep.example_inputs is not None:
        leaves = _pytree.tree_leaves(ep.example_inputs)
        if len(leaves) == len(user) and all(isinstance(t, torch.Tensor) for t in leaves):
            return tuple(t.detach().clone() for t in leaves)
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    params = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.kind is not kinds.USER_INPUT}
    gen = torch.Generator().manual_seed(0)
    made = []
    for name in user:
        val = nodes[name].meta.get("val") if name in nodes else None
        if not isinstance(val, torch.Tensor):
            raise LoadError(
                f"{source} stores no example inputs and its input {name!r} is not a tensor xbitc can make; "
                "pass --input NAME:SHAPE:DTYPE for each input (see xbitc compile --help)"
            )
        shape = tuple(_example_size(d, ep) for d in val.shape)
        if val.dtype.is_floating_point:
            made.append(torch.randn(shape, generator=gen).to(val.dtype))
        elif val.dtype == torch.bool:
            made.append(torch.ones(shape, dtype=torch.bool))
        else:
            rows = _embedding_rows(nodes[name], params, ep)
            made.append(torch.randint(0, rows or 2, shape, generator=gen).to(val.dtype))
    return tuple(made)


def _given_inputs(ep: torch.export.ExportedProgram, source: str, specs: list[InputSpec]) -> tuple:
    """--input for an exported program: one per user input, in order, with the program's static sizes (its dynamic
    dimensions were fixed when it was exported; names in SHAPE only pick the traced size)."""
    kinds = torch.export.graph_signature.InputKind
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind is kinds.USER_INPUT]
    if len(specs) != len(user):
        raise LoadError(f"{source} takes {len(user)} input{'s' * (len(user) != 1)} ({', '.join(user)}) and --input "
                        f"gives {len(specs)}; "
                        "give one --input per input, in that order")
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    params = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.kind is not kinds.USER_INPUT}
    made = []
    for name, spec in zip(user, specs):
        val = nodes[name].meta.get("val")
        want = [d if isinstance(d, int) else "*" for d in getattr(val, "shape", ())]
        if len(want) != len(spec.dims) or any(w != "*" and w != g for w, g in zip(want, spec.shape)):
            shown = "x".join(str(d) if isinstance(d, int) else "N" for d in want)
            raise LoadError(f"--input {spec.name}: shape {'x'.join(map(str, spec.shape))} does not fit the program's "
                            f"input {name} ({shown}, N: any size)")
        made.append(make_inputs([spec], _embedding_rows(nodes[name], params, ep))[0][0])
    return tuple(made)


def _example_size(dim: Any, ep: torch.export.ExportedProgram) -> int:
    if isinstance(dim, int):
        return dim
    hint = getattr(dim.node, "hint", None)
    if hint is not None:
        return int(hint)
    rng = ep.range_constraints.get(dim.node.expr)
    low = int(rng.lower) if rng is not None and rng.lower.is_finite else 2
    high = int(rng.upper) if rng is not None and rng.upper.is_finite else 1 << 30
    return min(max(low, 2), high)


def _embedding_rows(node: Any, params: dict[str, str], ep: torch.export.ExportedProgram) -> int | None:
    """Rows of the smallest embedding table this input indexes directly (None if it indexes none)."""
    rows = []
    for use in node.users:
        if "embedding" in str(use.target) and len(use.args) > 1 and use.args[1] is node:
            table = params.get(getattr(use.args[0], "name", ""))
            value = ep.state_dict.get(table) if table in ep.state_dict else ep.constants.get(table)
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                rows.append(int(value.shape[0]))
    return min(rows) if rows else None


def trace(model: LoadedModel, step: bool = True, log: Callable[[str], None] = lambda s: None) -> Graph:
    """Trace with torch.export (dynamic sequence length where the model has one, else static shapes); for a
    transformers causal LM also its cached decode step (`graph.step`, see xbitc.stepgraph) unless `step` is off."""
    param_count = model.param_count
    ep = getattr(model, "exported", None)
    if ep is None:
        with _weights_stand_in(model):
            ep = _export(model, log)
    prefix = "model." if isinstance(model.module, (CausalLMLogits, EncoderHidden, VisionOutput, AudioEncoderHidden)) else ""
    weights = {f"model.{k}": v for k, v in model.lazy.items()} if model.lazy else None
    graph = from_exported(ep, strip_prefix=prefix, weights=weights)  # dynamic input sizes named in the INPUT types
    if isinstance(model.module, CausalLMLogits) and step:
        graph.step = _trace_step(model, graph, log)
    graph.meta.update(
        {
            "kind": model.kind,
            "source": model.source,
            "source_hash": model.source_hash,
            "source_param_count": int(param_count or sum(p.numel() for p in ep.parameters())),
            "input_sizes_exact": True,  # INPUT types: static sizes ints, dynamic ones names (xbitc.runtime checks)
        }
    )
    return graph


def _weights_stand_in(model: LoadedModel):
    """While tracing a model whose parameters are on the meta device, fake tensors stand in for them."""
    return lazy.fake_parameters(model.module) if model.lazy else nullcontext()


def _trace_step(model: LoadedModel, graph: Graph, log: Callable[[str], None]) -> Graph | None:
    from xbitc.passes.base import PassContext
    from xbitc.passes.canonicalize import Canonicalize

    hf = model.module.model
    step = stepgraph.export_step(hf, hf.config, model.max_seq, log, weights=model.lazy,
                                 tracing=lambda: _weights_stand_in(model))
    if step is None:
        return None
    step = Canonicalize().run(step, PassContext(log=lambda s: None))
    renamed = {}
    kinds = step.meta.get("param_kinds", {})
    for name, value in step.params.items():
        mine = graph.params.get(name)
        if mine is value or (isinstance(mine, torch.Tensor) and tuple(mine.shape) == tuple(value.shape)
                             and torch.equal(mine, value)):
            continue
        if kinds.get(name) == "parameter":  # weights must be the compiled ones; a mismatch means another model
            log(f"no cached decode step: its parameter {name!r} differs from the traced graph's")
            return None
        renamed[name] = "step." + name  # a constant only the cache code uses (e.g. a lifted scalar): keep it apart
    for n in step.nodes:
        if n.op is Op.PARAM and n.attrs["name"] in renamed:
            n.attrs["name"] = renamed[n.attrs["name"]]
    for old, new in renamed.items():
        graph.params[new] = step.params[old]
        graph.meta.setdefault("param_kinds", {})[new] = kinds.get(old, "constant")
    step.params = graph.params
    return step


def _export(model: LoadedModel, log: Callable[[str], None] = lambda s: None) -> torch.export.ExportedProgram:
    """torch.export with the model's dynamic dimensions (one Dim per name, shared across inputs); if torch cannot
    keep them dynamic, with static shapes (said in the log; the artifact then refuses other shapes up front)."""
    dyn = None
    if model.dynamic_dims:
        dims: dict[str, Any] = {}

        def dim(name: str) -> Any:
            if name not in dims:
                low = 2 if name == "seq" else 1  # a sequence of 1 takes other code paths in many models
                high = 1 << 12 if name == "batch" else model.max_seq
                dims[name] = torch.export.Dim(name, min=low, max=high)
            return dims[name]

        dyn = tuple(
            {axis: dim(name) for axis, name in enumerate(model.dynamic_dims[i]) if name}
            if i in model.dynamic_dims else None
            for i in range(len(model.example_inputs))
        )
    errors = []
    for shapes in ([dyn, None] if dyn else [None]):
        try:
            with torch.no_grad():
                ep = torch.export.export(model.module, model.example_inputs, dynamic_shapes=shapes, strict=False)
        except Exception as err:  # export raises a zoo of types; we report the first line
            errors.append(err)
            continue
        if errors:
            names = sorted({n for axes in model.dynamic_dims.values() for n in axes if n})
            log(f"traced with static shapes: torch.export cannot keep {', '.join(names)} dynamic "
                f"({_first_line(errors[0])}); the artifact accepts only the traced shapes")
        return ep
    note = f" ({model.input_note})" if model.input_note else ""
    raise TraceError(f"cannot trace {model.source}: {_first_line(errors[-1])}{note}")


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
