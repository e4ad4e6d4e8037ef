"""The cached decode step of a causal language model: a second graph over the same parameters.

The main graph (token ids -> logits) is what the passes compile; generation through it re-runs the whole prefix for
every new token. For Hugging Face causal LMs the frontend also exports

    step(ids [B, T], k_0, v_0, ..., k_{L-1}, v_{L-1}) -> (logits [B, T, V], k'_0, v'_0, ...)

with past keys/values [B, kv_heads, P, head_dim] (P >= 0, so the same graph does the prefill with empty caches and
every decode step after it), traced through the model's own cache code, so rotary positions and the causal mask
follow P. Nothing here pattern-matches model internals; a model whose cache does not export simply has no step
graph and generates by re-running the prefix.

The step graph reads parameters by the same names as the main graph. After the pipeline it is re-linked to the
main graph's final parameters (`link`), its linears relabelled as the passes relabelled the main graph's; the
artifact stores it as `step.json` (counted: it is needed to run).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch

from xbitc.ir.graph import Graph, Op
from xbitc.quant.format import QuantizedMatrix
from xbitc.quant.packed import PackedMatrix


class CausalLMStep(torch.nn.Module):
    """(ids, *past keys/values) -> (logits, *updated keys/values) through the model's own DynamicCache."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model = model  # same attribute name as CausalLMLogits, so parameter names match the main graph's
        self.layers = layers

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        logits = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits
        return (logits, *[t for layer in cache.layers[: self.layers] for t in (layer.keys, layer.values)])


def cache_geometry(config: Any) -> tuple[int, int, int] | None:
    """(layers, kv heads, head dim) of a transformers config, or None when it does not say."""
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    except (AttributeError, TypeError):
        return None
    return layers, kv, dim


def export_step(model: torch.nn.Module, config: Any, max_seq: int, log: Callable[[str], None],
                weights: dict[str, Any] | None = None, tracing: Callable[[], Any] = nullcontext) -> Graph | None:
    """Trace the decode step of a transformers causal LM, or None (logged) when its cache does not export.
    `weights`: handles for parameters traced as fake tensors (xbitc.lazy), by name in `model`; `tracing()`: the
    context torch.export runs in (where fake tensors stand in for them; the example inputs are made outside)."""
    from xbitc.importer import from_exported

    geometry = cache_geometry(config)
    if geometry is None:
        log("no cached decode step: the model config does not give its cache geometry")
        return None
    layers, kv, dim = geometry
    ids = torch.randint(0, int(config.vocab_size), (2, 3))
    past = [torch.zeros(2, kv, 4, dim) for _ in range(2 * layers)]
    batch = torch.export.Dim("batch", min=1, max=1 << 12)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    cached = torch.export.Dim("past", min=0, max=max_seq)
    shapes = ({0: batch, 1: seq}, [{0: batch, 2: cached}] * (2 * layers))
    was = getattr(config, "use_cache", None)
    try:
        config.use_cache = True
        with torch.no_grad(), tracing():
            ep = torch.export.export(CausalLMStep(model, layers), (ids, past), dynamic_shapes=shapes, strict=False)
        step = from_exported(ep, strip_prefix="model.", weights={f"model.{k}": v for k, v in (weights or {}).items()})
    except Exception as err:  # export raises a zoo of types; the model still compiles without a step graph
        log(f"no cached decode step ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]}); "
            "generation will re-run the prefix")
        return None
    finally:
        if was is not None:
            config.use_cache = was
    step.meta.update({"kind": "causal-lm-step", "cache": {"layers": layers, "kv_heads": kv, "head_dim": dim}})
    return step


def link(graph: Graph) -> None:
    """Point the step graph at the main graph's (compiled) parameters and relabel its linears to match."""
    step = graph.step
    if step is None:
        return
    names = {n.attrs["name"] for n in step.nodes if n.op is Op.PARAM}
    missing = sorted(names - set(graph.params))
    if missing:
        raise ValueError(f"the decode step reads parameters the compiled graph no longer has: {missing[:3]}")
    step.params = graph.params
    by_name = step.by_name()
    for n in step.nodes:
        if n.op in (Op.LINEAR, Op.QLINEAR, Op.PACKED_LINEAR):
            value = graph.params[by_name[n.args[1].name].attrs["name"]]
            n.op = (Op.PACKED_LINEAR if isinstance(value, PackedMatrix)
                    else Op.QLINEAR if isinstance(value, QuantizedMatrix) else Op.LINEAR)
    step.meta["float_dtype"] = graph.meta.get("float_dtype")


def empty_cache(step: Graph, batch: int = 1) -> list[torch.Tensor]:
    c = step.meta["cache"]
    return [torch.zeros(batch, c["kv_heads"], 0, c["head_dim"]) for _ in range(2 * c["layers"])]
