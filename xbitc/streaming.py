"""Block-wise GPTQ: a model larger than memory is quantized one layer block at a time (a learned allocation before
it measures its sensitivities a block at a time too: xbitc.alloc.blockwise).

When the graph's weights are still in their files (xbitc.lazy: a Hugging Face folder compiled with uniform bits and
GPTQ, the driver's `streams` test), the GPTQ quantize pass runs here instead of over the whole graph. The calibration
batches run through the prologue (embedding); then for each layer block (ir/blocks.py), in order: its weights are read
from the shards, its linears are quantized by the same sequential GPTQ as the whole-graph pass
(passes/gptq.sequential: each linear from the inputs it receives with every linear before it already quantized, so
every block sees the outputs of the quantized blocks before it), the quantized block runs on to make the next
block's inputs, and every weight no later block reads is stored as the artifact stores it (packed, or float at the
artifact's float dtype) before the next block is read. The blocks run exactly the whole graph's ops in its order, so
the artifact is the one the whole-graph path writes.

Held at once: one block's float weights and one [in, in] Hessian's GPTQ work, every calibration batch's values at the
block boundary and their activations inside the block. The finished weights wait in a scratch file on disk
(xbitc.spill) until the artifact's writer copies them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from xbitc import heap, lazy
from xbitc.ir.blocks import find_blocks
from xbitc.ir.graph import LINEAR_OPS, Graph, Op
from xbitc.passes.base import PassError
from xbitc.passes.gptq import rtn_rest, sequential
from xbitc.passes.pack import stored_dtype
from xbitc.passes.plan import GROUPS as PLAN_GROUPS
from xbitc.quant.format import QuantizedMatrix
from xbitc.quant.packed import PackedMatrix
from xbitc.spill import Spill


def quantize_blocks(graph: Graph, batches: list[tuple], plan: dict, options: dict, bar: tqdm,
                    scratch: Path | None = None, pack: bool = True) -> None:
    """Quantize `plan`'s weights of the lazy `graph` block by block from this rank's calibration `batches`;
    `options`: gptq_quantize's. Finished weights move to a scratch file in the folder `scratch` (None: the system's
    temporary folder): packed with `pack`; without, as the quantize pass leaves them for the tune pass (unpacked
    codes, float parameters at float32), which passes/pack.py packs into scratch again. A graph without repeated
    layers is read whole and quantized as one block."""
    found = find_blocks(graph)
    if not found.layers:
        lazy.materialize(graph)
        pending, _ = sequential(graph, batches, plan, options, bar)
        rtn_rest(graph, sorted(pending), plan, options["clip"], bar)
        return
    last = {name: i for i, block in enumerate(found.blocks) for name in block.params}  # the last block reading it
    envs = [dict(zip(found.blocks[0].inputs, batch)) for batch in batches]  # each batch's values at the boundary
    files = {n: v for n, v in graph.params.items() if isinstance(v, lazy.LazyWeight)}
    spill = Spill(scratch)
    for i, block in enumerate(found.blocks):
        # The block's graph alone holds its float weights: a quantized one is then freed as soon as GPTQ replaces it
        block.graph.params.update((n, _loaded(graph.params[n])) for n in block.params)
        mine = {n: plan[n] for n in block.params if n in plan and isinstance(block.graph.params[n], torch.Tensor)}
        head = block.kind == "head"
        if mine or not head:  # the head runs only to quantize its linears (the logits are not needed)
            inputs = [tuple(env[n] for n in block.inputs) for env in envs]
            _, outs = sequential(block.graph, inputs, mine, options, bar, outputs=not head)
            if not head:
                later = {n for b in found.blocks[i + 1:] for n in b.inputs}
                for env, out in zip(envs, outs):
                    env.update(zip(block.outputs, out))
                    for name in set(env) - later:
                        del env[name]
        graph.params.update(_after(block, files, last, i))
        block.graph.params.clear()
        _store(graph, [n for n in block.params if last[n] == i], plan, options["clip"], bar, spill, pack)
        heap.release()  # what the block freed goes back to the system, or the heap creeps up block by block
    spill.close()
    lazy.materialize(graph)  # what only the decode step reads (its constants)


def _after(block, files: dict, last: dict, i: int) -> dict:
    """The block's weights as the whole graph keeps them after it: a float weight a later block reads again (a tied
    table) goes back to its file, to be read again then, instead of staying in memory through every layer."""
    out = {}
    for n in block.params:
        value = block.graph.params[n]
        out[n] = files[n] if last[n] > i and n in files and isinstance(value, torch.Tensor) else value
    return out


def _loaded(value: object) -> object:
    return value.load() if isinstance(value, lazy.LazyWeight) else value


def _store(graph: Graph, names: list[str], plan: dict, clip: bool, bar: tqdm, spill: Spill, pack: bool) -> None:
    """Put weights no later block reads out of memory, into the spill file: planned ones no linear read (embedding
    tables) quantized by RTN first; with `pack` in their artifact form, as the pack pass would (packed; float
    parameters at the artifact's float dtype), else as quantize leaves them."""
    rtn_rest(graph, [n for n in names if n in plan and isinstance(graph.params[n], torch.Tensor)], plan, clip, bar)
    dtype, kinds = stored_dtype(graph), graph.meta.get("param_kinds", {})
    for name in names:
        value = graph.params[name]
        if isinstance(value, QuantizedMatrix):
            graph.params[name] = spill.packed(PackedMatrix.from_quantized(value)) if pack else spill.quantized(value)
        elif value.is_floating_point() and kinds.get(name, "parameter") == "parameter":
            graph.params[name] = spill.tensor(value.to(dtype) if pack else value)
    if not pack:
        return
    by_name = graph.by_name()
    done = set(names)
    for n in graph.nodes:
        if n.op in LINEAR_OPS and by_name[n.args[1].name].attrs["name"] in done \
                and isinstance(graph.params[by_name[n.args[1].name].attrs["name"]], PackedMatrix):
            n.op = Op.PACKED_LINEAR


def streams(passes: list) -> bool:
    """Whether a pipeline runs on weights still in their files: up to `pack` it is canonicalize, plan (both read
    shapes only) or learned allocation (its sensitivities a block at a time: xbitc.alloc.blockwise), GPTQ quantize,
    and optionally tune (end to end, its saved activations in the scratch file: passes/tune.py). These are the
    default pipelines of `--bits B --method gptq` and of `--bpw B --method gptq`; the passes after `pack` see the
    packed model."""
    names = [p.name for p in passes]
    if "pack" not in names:
        return False
    before = names[:names.index("pack")]
    if before[-1:] == ["tune"]:
        before.pop()
    planned = [["canonicalize", "plan", "quantize"], ["canonicalize", "allocate", "quantize"]]
    return before in planned and passes[2].method == "gptq"


# Peak resident memory of compiling a 2-layer Llama (xbitc.synthetic, hidden 64) by this path, where the model's own
# share is a few MB: Python, torch, transformers, torch.export's tracing state. Measured 414 MB (VmHWM; see
# README.md); the margin covers the tracing state of a graph of many layers.
FIXED_BYTES = 768 << 20
TABLE_BYTES = 10  # a table's float32 copy, and GPTQ's work on it as an output layer (RTN's codes, float16: less)
# The learned allocation's parts (estimate_peak), per input column and group option: its cost table (9 float64 and
# the heap's share: 71-92 B measured; the size table is one row per tensor), and in the solve its stacked tables
# (the tensors then read theirs from the stack) and temporaries (804 B for 4 options, measured on a million
# columns); per token of a window: float32 values of the widest width autograd keeps through a layer; per token and
# vocabulary entry: float32 logits, their float copy, probabilities and gradient
COST_TABLE_BYTES = 96
SOLVE_BYTES = 224
SENSITIVITY_VALUES = 16
LOGITS_VALUES = 5
# The tune pass (passes/tune.py), per scale group of the matrix in hand (every other matrix's wait in the scratch
# file): float32 zero point, start scale, log-scale, its gradient and two Adam moments, and float16 scales as
# committed, at the start and at the best checkpoint; per element of the largest matrix, a step's float32 build and in
# backward its gradient and rebuild
TUNE_GROUP_BYTES = 30
TUNE_MATRIX_BYTES = 16
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 1 << 10, "MIB": 1 << 20,
          "GIB": 1 << 30, "TIB": 1 << 40}
_LAYER_KEY = re.compile(r"^(.*?)\.(\d+)\.")


def parse_size(text: str) -> int:
    """'3GB', '2.5GiB', '800MB' or a byte count, as bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise PassError(f"--max-memory {text!r} is not a size; give e.g. 3GB, 2.5GiB or 800MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def estimate_peak(weights: dict[str, lazy.LazyWeight], windows: int, window_len: int, heads: int,
                  sensitivity_batches: int = 0, group_options: int = 4,
                  tune_group: int | None = None) -> dict[str, int]:
    """Bytes the block-wise compile holds at its peak, by part: the fixed overhead and the parts of its largest phase.
    Quantizing a layer holds the layer's float32 weights, GPTQ's work on the widest linear input (12 bytes per Hessian
    entry: the float32 Hessian and the float64 matrix its inverse Cholesky factor is computed in, in place; or, while
    the Hessian is summed, the float64 sum and its float32 copy) and every calibration window's activations in the
    layer (seven values of the widest width per token, two attention-score tensors per head). Outside the layers one
    table is held at a time (a tied one is read again from its file by the head): float32, and what quantizing or
    storing it adds (TABLE_BYTES a parameter in all). Finished blocks wait in the scratch file, and the writer copies
    them out 16 MB at a time (xbitc.tensorfile, xbitc.spill.page_out).

    With `sensitivity_batches` (learned allocation, xbitc.alloc.blockwise), measuring a block holds its float32
    weights, their gradients and squared-gradient sums (for an embedding table no other table shares the shape of, a
    fourth copy: a tied output layer's gradient read back), one window's activations kept for backward, every
    batch's gradient at the block boundary, and the cost tables made so far; the solve holds the stacked tables and
    its temporaries. The tables are the one part that grows with depth: COST_TABLE_BYTES and SOLVE_BYTES per input
    column and group option.

    With `tune_group` (the smallest scale group a tune pass may train; 0: one per row), tuning holds one step's
    build of the largest matrix and its gradient (TUNE_MATRIX_BYTES an element), that matrix's scale state
    (TUNE_GROUP_BYTES a group) and a window's logits with the held-out windows' reference logits; the activations
    its backward reads and every other matrix's scale state wait in the scratch file."""
    layers: dict[str, int] = {}
    width = table = columns = matrix = groups = 0  # groups: the most scale groups of one matrix
    tables: dict[tuple, int] = {}  # outside the layers: 2-D shapes and how many tensors have each
    for key, w in weights.items():
        m = _LAYER_KEY.match(key)
        if m:
            layers[m.group(0)] = layers.get(m.group(0), 0) + 4 * w.numel()
        if w.dim() == 2:
            columns += int(w.shape[1])
            matrix = max(matrix, w.numel())
            groups = max(groups, int(w.shape[0]) * (-(-int(w.shape[1]) // tune_group) if tune_group else 1))
            if m:
                width = max(width, int(w.shape[1]))
            else:
                tables[tuple(w.shape)] = tables.get(tuple(w.shape), 0) + 1
                if w.numel() > table:
                    table, (vocab, hidden) = w.numel(), w.shape
    tokens = windows * window_len
    layer = max(layers.values(), default=0)
    phases = {
        "layer": {"layer weights": layer, "GPTQ work": 12 * width * width,
                  "activations": 4 * (7 * tokens * width + 2 * windows * heads * window_len ** 2)},
        "outside the layers": {"largest table and its quantization": TABLE_BYTES * table},
    }
    if sensitivity_batches:
        costs = COST_TABLE_BYTES * group_options * columns
        boundary = 4 * 2 * sensitivity_batches * window_len * (hidden if table else width)
        phases["sensitivity of a layer"] = {
            "layer weights, gradients and sums": 3 * layer, "cost tables": costs, "boundary gradients": boundary,
            "activations": 4 * (SENSITIVITY_VALUES * window_len * width + 3 * heads * window_len ** 2)}
        if table:
            tied = tables[vocab, hidden] == 1  # one table of its shape: the output layer may read it too
            phases["sensitivity outside the layers"] = {
                "embeddings, gradients and sums": 4 * (4 if tied else 3) * table, "cost tables": costs,
                "boundary gradients": boundary,
                "logits": 4 * LOGITS_VALUES * window_len * vocab}
        phases["allocation solve"] = {"cost tables and the solver's copies": SOLVE_BYTES * group_options * columns}
    if tune_group is not None:
        phases["tune"] = {"a matrix's scales and their optimizer state": TUNE_GROUP_BYTES * groups,
                          "largest matrix built and its gradient": TUNE_MATRIX_BYTES * matrix,
                          "logits": 4 * (LOGITS_VALUES + 2) * window_len * (vocab if table else width)}
    return {"fixed": FIXED_BYTES, **max(phases.values(), key=lambda parts: sum(parts.values()))}


def estimate_source(source: Path, windows: int, window_len: int, passes: list = ()) -> dict[str, int]:
    """estimate_peak of the Hugging Face folder or GGUF file `source` compiled block-wise by `passes` (the learned
    allocation's sensitivities and solve counted when an `allocate` pass is among them)."""
    found = source_weights(source)
    if found is None:
        raise ValueError(f"{source} is neither a Hugging Face folder of safetensors nor a GGUF file")
    return _estimate(*found, windows, window_len, passes)


def source_weights(source: Path) -> tuple[dict[str, lazy.LazyWeight], int] | None:
    """The tensors (from the headers: no data read) and attention heads of a Hugging Face folder of safetensors or a
    GGUF file, None for anything else. A GGUF file is checked as loading checks it (one line for a file that is not
    GGUF or is damaged), and its header parsed once for all of this (SmolLM2's vocabulary: ~5 s a parse); its
    tensors go by GGUF name ("blk.N." names its layers, as "layers.N." a folder's)."""
    if source.suffix == ".gguf" and source.is_file():
        import gguf

        from xbitc import frontend

        with frontend.one_gguf_reader():
            frontend.check_gguf(source)
            fields = gguf.GGUFReader(str(source)).fields
            heads = fields.get(f"{fields['general.architecture'].contents()}.attention.head_count")
            return lazy.gguf_checkpoint(source), int(heads.contents()) if heads is not None else 1
    if (source / "config.json").is_file():
        weights = lazy.checkpoint(source)
        config = json.loads((source / "config.json").read_text())
        return None if weights is None else (weights, int(config.get("num_attention_heads", 1)))
    return None


def _estimate(weights: dict[str, lazy.LazyWeight], heads: int, windows: int, window_len: int,
              passes: list) -> dict[str, int]:
    alloc = next((p for p in passes if p.name == "allocate"), None)
    extra = {} if alloc is None else {"sensitivity_batches": min(alloc.batches, windows),
                                      "group_options": len(alloc.groups.split("-"))}
    if any(p.name == "tune" and p.steps > 0 for p in passes):
        if alloc is not None:
            sizes = [int(g) for g in alloc.groups.split("-")]
        else:
            plan = next(p for p in passes if p.name == "plan")
            sizes = list(PLAN_GROUPS) if plan.group is None else [plan.group]
        extra["tune_group"] = min((g for g in sizes if g > 0), default=0)
    return estimate_peak(weights, windows, window_len, heads, **extra)


def check_memory(source: object, passes: list, limit: int, windows: int, window_len: int, calib: str | None) -> int:
    """Refuse, before any work, a --max-memory compile the block-wise path cannot serve or whose estimated peak is
    over `limit`; returns the estimate."""
    size = gb(limit)
    if not streams(passes):
        raise PassError(f"--max-memory {size} bounds the block-wise compile, which serves the GPTQ pipelines: give "
                        "--method gptq (with --bits B or --bpw B), or leave --max-memory out")
    path = Path(source) if isinstance(source, (str, Path)) else None
    found = source_weights(path) if path is not None else None
    if found is None:
        raise PassError(f"--max-memory {size}: {source} is not a Hugging Face folder of safetensors or a GGUF file, "
                        "whose weights the compile reads a layer block at a time; give one or leave --max-memory out")
    if calib == "self":
        raise PassError(f"--max-memory {size}: --calib self samples text from the whole float model in memory; "
                        "give --calib FILE or leave --calib out")
    parts = _estimate(*found, windows, window_len, passes)
    need = sum(parts.values())
    if need > limit:
        detail = ", ".join(f"{k} {gb(v)}" for k, v in parts.items())
        raise PassError(f"--max-memory {size}: compiling {path} block by block needs about {gb(need)} ({detail}); "
                        f"give --max-memory {gb(need)} or more, or fewer --calib-windows / a shorter --calib-len")
    return need
