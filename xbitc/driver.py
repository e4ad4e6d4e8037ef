"""`xbitc compile` as a function: load, trace, run the pass pipeline, write the artifact."""
from __future__ import annotations

import gc

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from xbitc import artifact, calibration, frontend, registry, stepgraph
from xbitc.manifest import Manifest
from xbitc.passes.base import Pass, PassContext, PassError, PassManager, coerce_options, parse_spec
from xbitc.passes.targets import weight_roles

MIN_BPW, MAX_BPW = 0.5, 32.0


@dataclass
class CompileOptions:
    bpw: float | None = None
    bits: int | None = None
    group: int | None = None
    backend: str = "reference"
    passes: str | None = None  # full pipeline spec; default built from the options above
    method: str = "rtn"
    clip: bool = True  # search each group's clipping range (quantize{clip})
    allocator: str = "learned"  # with --bpw: "learned" (allocate pass) or "uniform" (plan pass)
    objective: str = "auto"  # kl for language models, mse for encoders and vision models
    tune_steps: int | None = None  # tune pass steps; None: DEFAULT_TUNE_STEPS with the learned allocator, else 0
    quantize_embeddings: bool = False
    float_dtype: str = "float16"
    calib: str | None = None  # text file, "self", or None for the packaged sample text
    calib_windows: int = 16
    calib_len: int = 256
    seed: int = 0
    trust_pickle: bool = False
    dump_ir: Path | None = None
    log: Callable[[str], None] = print
    progress: bool = True
    extra: dict = field(default_factory=dict)


DEFAULT_TUNE_STEPS = 24


def default_pipeline(opts: CompileOptions) -> str:
    learned = opts.bpw is not None and opts.bits is None and opts.allocator == "learned"
    # Uniform pipelines reproduce plain GPTQ/RTN (the published baselines) unless tuning is asked for.
    steps = opts.tune_steps if opts.tune_steps is not None else (DEFAULT_TUNE_STEPS if learned else 0)
    quantize = [f"quantize{{method={opts.method},clip={opts.clip}}}"]
    if steps:
        quantize.append(f"tune{{steps={steps},objective={opts.objective}}}")
    if learned:
        act = "true" if opts.method == "gptq" else "false"
        alloc = f"allocate{{bpw={opts.bpw},objective={opts.objective},embeddings={opts.quantize_embeddings},act_order={act}}}"
        return ",".join(["canonicalize", alloc, *quantize, "pack"])
    plan = [f"embeddings={opts.quantize_embeddings}", f"act_order={'true' if opts.method == 'gptq' else 'false'}"]
    if opts.bits is not None:
        plan.append(f"bits={opts.bits}")
    if opts.group is not None:
        plan.append(f"group={opts.group}")
    if opts.bpw is not None:
        plan.append(f"bpw={opts.bpw}")
    stages = ["canonicalize", "plan{" + ",".join(plan) + "}", *quantize, "pack"]
    return ",".join(stages)


def build_passes(spec: str) -> list[Pass]:
    passes = []
    for name, raw in parse_spec(spec):
        cls = registry.get(registry.PASS_GROUP, name)
        passes.append(cls(**coerce_options(cls, raw)))
    return passes


def check_options(opts: CompileOptions) -> None:
    if opts.bpw is not None and not MIN_BPW <= opts.bpw <= MAX_BPW:
        raise PassError(f"--bpw {opts.bpw} is outside what xbitc can reach ({MIN_BPW}..{MAX_BPW} bits per weight)")
    if opts.bits is not None and not 1 <= opts.bits <= 8:
        raise PassError(f"--bits {opts.bits} must be 1..8")
    if opts.group is not None and opts.group < 0:
        raise PassError(f"--group {opts.group} must be positive (0 = per-channel)")
    if opts.tune_steps is not None and opts.tune_steps < 0:
        raise PassError(f"--tune-steps {opts.tune_steps} must be 0 (off) or more")
    if opts.allocator not in ("learned", "uniform"):
        raise PassError(f"--allocator {opts.allocator!r}: choose learned or uniform")
    if opts.bpw is None and opts.bits is None and not opts.passes:
        raise PassError("give a size target (--bpw B) or a uniform configuration (--bits N [--group G])")


def calibration_inputs(model: frontend.LoadedModel, opts: CompileOptions) -> list[tuple]:
    if model.tokenizer is None or model.kind not in ("causal-lm", "encoder"):
        return calibration.random_inputs(model.example_inputs, opts.calib_windows, opts.seed)
    if model.kind == "encoder":  # text windows with a full attention mask
        path = Path(opts.calib) if opts.calib and opts.calib != "self" else calibration.PACKAGE_TEXT / "calib.txt"
        length = min(opts.calib_len, model.max_seq)
        wins = calibration.text_windows(model.tokenizer, path, opts.calib_windows, length, opts.seed)
        return [(w[0], torch.ones_like(w[0])) for w in wins]
    if opts.calib == "self":
        tok = model.tokenizer
        vocab = model.module.model.config.vocab_size
        return calibration.self_windows(model.module, vocab, tok.bos_token_id, opts.calib_windows, opts.calib_len, opts.seed)
    path = Path(opts.calib) if opts.calib else calibration.PACKAGE_TEXT / "calib.txt"
    if not path.exists():
        raise PassError(f"calibration text {path} does not exist")
    return calibration.text_windows(model.tokenizer, path, opts.calib_windows, opts.calib_len, opts.seed)


def compile_model(source: str | frontend.LoadedModel, out: Path, opts: CompileOptions) -> Manifest:
    """Compile `source` (a path/spec, or a model already loaded with frontend.load) into the artifact `out`."""
    check_options(opts)
    backend = registry.get(registry.BACKEND_GROUP, opts.backend)()
    spec = opts.passes or default_pipeline(opts)
    extra = backend.passes()
    if extra and not opts.passes:
        spec = ",".join([spec, *extra])
    passes = build_passes(spec)  # unknown passes / options fail here, before any model is loaded
    model = source if isinstance(source, frontend.LoadedModel) else frontend.load(source, trust_pickle=opts.trust_pickle)
    opts.log(f"loaded {model.source} ({model.kind}, {model.param_count:,} parameters)")
    graph = frontend.trace(model, log=opts.log)
    graph.meta["float_dtype"] = opts.float_dtype
    needs_calib = any(p.needs_calibration for p in passes)
    ctx = PassContext(log=opts.log)
    ctx.stats["progress"] = opts.progress
    ctx.stats["emitted"] = backend.emitted(graph)  # e.g. kernel objects: the size planners count them too
    if needs_calib:
        ctx.calib_inputs = calibration_inputs(model, opts)
    if not isinstance(source, frontend.LoadedModel):
        model.module = None  # the graph holds its own copy of the weights: free the source model's (peak memory)
        gc.collect()  # the traced module sits in reference cycles: free it before the first pass, not whenever
    manager = PassManager(passes, dump_dir=opts.dump_ir)
    graph = manager.run(graph, ctx)
    try:
        stepgraph.link(graph)
    except ValueError as err:  # a user pipeline may remove what the step reads: ship without it, say so
        opts.log(f"dropping the cached decode step: {err}")
        graph.step = None
    roles = weight_roles(graph)
    manifest = artifact.write(
        graph, out, backend=backend.name, pipeline=manager.spec(), passes=ctx.records, target_bpw=opts.bpw,
        roles=roles, tokenizer=model.tokenizer, emit=backend.emit, notes={"plan": ctx.stats.get("plan_summary", {})},
    )
    return manifest

