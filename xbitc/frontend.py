"""Load a model from what users have (export program, Hugging Face folder, GGUF, factory, pickle) and trace it."""
from __future__ import annotations

import hashlib
import importlib
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from xbitc import stepgraph
from xbitc.importer import TraceError, from_exported
from xbitc.ir.graph import Graph, Op


class LoadError(ValueError):
    """The model source could not be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    module: torch.nn.Module  # forward(*tensors) -> tensor
    example_inputs: tuple
    kind: str  # "causal-lm" | "encoder" | "vision" | "generic"
    source: str
    source_hash: str
    tokenizer: Any = None
    dynamic_dims: dict[int, tuple[str, ...]] = field(default_factory=dict)  # input index -> names of its dynamic axes
    max_seq: int = 1 << 16  # longest sequence the traced graph accepts (position tables bound it)

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
    if getattr(cfg, "is_encoder_decoder", False):
        raise LoadError("encoder-decoder models are not supported yet; compile the encoder or decoder separately")
    name = type(model).__name__
    max_seq = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 16)
    loaded = _wrap_hf(model, cfg, name, tokenizer, source, source_hash)
    loaded.max_seq = max_seq
    return loaded


def _wrap_hf(model, cfg, name, tokenizer, source, source_hash) -> LoadedModel:
    if "ForCausalLM" in name or "LMHeadModel" in name:
        ids = torch.randint(0, cfg.vocab_size, (2, 8))  # size-1 dims would be specialised by export
        return LoadedModel(CausalLMLogits(model), (ids,), "causal-lm", source, source_hash, tokenizer, {0: ("batch", "seq")})
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


def load_hf_folder(path: Path, gguf_file: str | None = None) -> LoadedModel:
    tf = _transformers()
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    with one_gguf_reader() if gguf_file else nullcontext():
        config = tf.AutoConfig.from_pretrained(path, **kw)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(tf, arch, None) if arch else None
        if cls is None:
            cls = tf.AutoModelForCausalLM if gguf_file else tf.AutoModel
        model = cls.from_pretrained(path, dtype=torch.float32, **kw)
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(path, **kw)
        except (OSError, ValueError):
            tokenizer = None
    src = path / gguf_file if gguf_file else path
    return wrap_hf(model, tokenizer, str(src), file_hash(src))


@contextmanager
def one_gguf_reader():
    """transformers opens a GGUF file with a fresh gguf.GGUFReader for the config, again for the model's config and
    its weights, and again for the tokenizer; each one parses all the metadata field by field (SmolLM2's 49K-token
    vocabulary and merges: ~5 s apiece). Inside this context the same file opens as one shared, read-only reader."""
    import gguf

    real = gguf.GGUFReader
    opened: dict = {}

    def shared(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in opened:
            opened[key] = real(path, mode)
        return opened[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real


def load_factory(spec: str) -> LoadedModel:
    mod_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise LoadError(f"cannot import factory {spec!r}: {err}") from None
    made = fn()
    module, inputs = made if isinstance(made, tuple) else (made, getattr(made, "example_inputs", None))
    return _from_module(module, inputs, spec, hashlib.sha256(spec.encode()).hexdigest())


def _from_module(module: Any, inputs: Any, source: str, digest: str) -> LoadedModel:
    if not isinstance(module, torch.nn.Module):
        raise LoadError(f"{source} did not produce a torch.nn.Module (got {type(module).__name__})")
    if hasattr(module, "config") and hasattr(module.config, "model_type"):
        return wrap_hf(module, None, source, digest)
    if inputs is None:
        raise LoadError(
            f"{source}: a plain nn.Module needs example inputs; return (module, example_inputs) from the factory "
            "or set module.example_inputs"
        )
    return LoadedModel(module.eval(), tuple(inputs), "generic", source, digest)


def load(source: str, trust_pickle: bool = False) -> LoadedModel:
    """Dispatch on what `source` is. Raises LoadError with a fix for everything it refuses."""
    path = Path(source)
    if ":" in source and not path.exists() and not source.endswith((".pt", ".pt2", ".gguf")):
        return load_factory(source)
    if not path.exists():
        raise LoadError(f"model file {source!r} does not exist")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LoadError(f"{source} is a folder without config.json; expected a Hugging Face model folder")
        return load_hf_folder(path)
    if path.suffix == ".gguf":
        return load_hf_folder(path.parent, gguf_file=path.name)
    if path.suffix == ".pt2":
        return load_exported(path, trust_pickle)
    if path.suffix in (".pt", ".pth", ".bin", ".pkl"):
        if not trust_pickle:
            raise LoadError(
                f"{source} is a pickle: loading it runs code stored in the file. If you trust its origin, pass "
                "--trust-pickle; otherwise export the model with torch.export.save (a .pt2) or save a safetensors folder"
            )
        module = torch.load(path, weights_only=False, map_location="cpu")
        return _from_module(module, getattr(module, "example_inputs", None), str(path), file_hash(path))
    raise LoadError(f"unknown model format {path.suffix!r}: use .pt2, a Hugging Face folder, .gguf, .pt or module:function")


def load_exported(path: Path, trust_pickle: bool = False) -> LoadedModel:
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
    loaded = LoadedModel(ep.module(), exported_inputs(ep, str(path)), "generic", str(path), file_hash(path))
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
        ep = _export(model)
    prefix = "model." if isinstance(model.module, (CausalLMLogits, EncoderHidden, VisionOutput)) else ""
    graph = from_exported(ep, strip_prefix=prefix)
    if isinstance(model.module, CausalLMLogits) and step:
        graph.step = _trace_step(model, graph, log)
    graph.meta.update(
        {
            "kind": model.kind,
            "source": model.source,
            "source_hash": model.source_hash,
            "source_param_count": int(param_count or sum(p.numel() for p in ep.parameters())),
        }
    )
    return graph


def _trace_step(model: LoadedModel, graph: Graph, log: Callable[[str], None]) -> Graph | None:
    from xbitc.passes.base import PassContext
    from xbitc.passes.canonicalize import Canonicalize

    hf = model.module.model
    step = stepgraph.export_step(hf, hf.config, model.max_seq, log)
    if step is None:
        return None
    step = Canonicalize().run(step, PassContext(log=lambda s: None))
    renamed = {}
    kinds = step.meta.get("param_kinds", {})
    for name, value in step.params.items():
        mine = graph.params.get(name)
        if mine is not None and tuple(mine.shape) == tuple(value.shape) and torch.equal(mine, value):
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


def _export(model: LoadedModel) -> torch.export.ExportedProgram:
    dyn = None
    if model.dynamic_dims:
        dims = {"batch": torch.export.Dim("batch", min=1, max=1 << 12), "seq": torch.export.Dim("seq", min=2, max=model.max_seq)}
        dyn = tuple(
            {axis: dims[name] for axis, name in enumerate(model.dynamic_dims[i])} if i in model.dynamic_dims else None
            for i in range(len(model.example_inputs))
        )
    errors = []
    for shapes in ([dyn, None] if dyn else [None]):
        try:
            with torch.no_grad():
                return torch.export.export(model.module, model.example_inputs, dynamic_shapes=shapes, strict=False)
        except Exception as err:  # export raises a zoo of types; we report the first line
            errors.append(err)
    raise TraceError(f"cannot trace {model.source}: {_first_line(errors[-1])}")


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
