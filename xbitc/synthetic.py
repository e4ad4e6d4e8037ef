"""Random-weight Llama checkpoints of any size, written as a Hugging Face folder of sharded safetensors, or as a
GGUF file the way llama.cpp's converter writes one.

For tests and benchmarks of models larger than memory: a 1.5B-parameter folder is written a shard at a time, so the
writer never holds more than one shard. Weights are drawn like transformers' initialisation (normal, std 0.02;
norm weights 1), so activations keep a sane scale through the layers.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int = 32000, heads: int = 16,
                 kv_heads: int = 4, tie: bool = False) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tie, "hidden_act": "silu",
        "dtype": "float16",
    }


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def write_llama(folder: Path, cfg: dict, shard_bytes: int = 1 << 29, seed: int = 0) -> int:
    """Write `cfg`'s model with random float16 weights into `folder` (config.json, shards, index); returns its
    parameter count."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    shapes = llama_shapes(cfg)
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.ones(shapes[n]) if len(shapes[n]) == 1 else torch.randn(shapes[n], generator=gen) * 0.02)
                   .to(torch.float16) for n in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    total = sum(torch.Size(s).numel() for s in shapes.values())
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def write_llama_gguf(file: Path, cfg: dict, seed: int = 0, matrices: str = "Q8_0",
                     values: dict[str, torch.Tensor] | None = None) -> int:
    """Write `cfg`'s model with random weights as a GGUF file: matrices quantized to GGML type `matrices`, norm
    weights float32, q and k rows permuted as llama.cpp's converter permutes them (for its rotary layout). Returns its
    parameter count; `values`, if given, receives the weights as transformers should read them back (dequantized, in
    its layout) by transformers name. (gguf-py's writer holds every quantized tensor until it writes the file.)"""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[matrices]
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(file), "llama")
    w.add_name("synthetic llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(h // heads)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
    gen = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(cfg)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])  # llama.cpp's converter's
    for name, shape in shapes.items():
        gguf_name = names.get_name(name.removesuffix(".weight")) + ".weight"
        if len(shape) == 1:
            norm = (1 + 0.1 * torch.randn(shape, generator=gen)).numpy()
            w.add_tensor(gguf_name, norm)
            if values is not None:
                values[name] = torch.from_numpy(norm.copy())
            continue
        matrix = (torch.randn(shape, generator=gen) * 0.02).numpy()
        codes = gguf.quants.quantize(matrix, qtype)
        if values is not None:
            values[name] = torch.from_numpy(gguf.quants.dequantize(codes, qtype).reshape(shape).copy())
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's permute, which readers undo
            n = heads if name.endswith("q_proj.weight") else kv
            matrix = matrix.reshape(n, 2, shape[0] // n // 2, shape[1]).swapaxes(1, 2).reshape(shape)
            codes = gguf.quants.quantize(np.ascontiguousarray(matrix), qtype)
        w.add_tensor(gguf_name, codes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sum(torch.Size(s).numel() for s in shapes.values())
