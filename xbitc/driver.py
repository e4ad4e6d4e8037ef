"""`xbitc compile` as a function: load, trace, run the pass pipeline, write the artifact.

Under torchrun (WORLD_SIZE > 1) every process runs compile_model: all check the input and load the model, the passes
share their work through xbitc.distributed, and rank 0 logs and writes the artifact once every rank has finished.
"""
from __future__ import annotations

import gc
import os
import tempfile

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from xbitc import artifact, calibration, distributed, frontend, lazy, registry, stepgraph, streaming
from xbitc.manifest import Manifest
from xbitc.passes.base import MAX_BPW, MIN_BPW, Pass, PassContext, PassError, PassManager, coerce_options, parse_spec
from xbitc.passes.targets import weight_roles


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
    tune_steps: int | None = None  # tune steps; None: TUNE_STEPS[effort] with the learned allocator or high effort
    effort: str = "default"  # "high": more tuning steps (TUNE_STEPS), on uniform pipelines too
    # None: under a --bpw target the allocator gives the embeddings and output layer depths like any matrix; with
    # --bits they stay float. True / False force it.
    quantize_embeddings: bool | None = None
    float_dtype: str = "float16"
    calib: str | None = None  # text file, "self", or None for the packaged sample text
    calib_windows: int = 16
    calib_len: int = 256
    seed: int = 0
    trust_pickle: bool = False
    max_memory: int | None = None  # bytes: the block-wise compile's bound, checked before any work (streaming)
    inputs: tuple[str, ...] = ()  # --input NAME:SHAPE[:DTYPE] for plain modules and .pt2 programs (frontend.INPUT_HELP)
    dump_ir: Path | None = None
    log: Callable[[str], None] = print
    progress: bool = True
    extra: dict = field(default_factory=dict)


DEFAULT_TUNE_STEPS = 24
# tune steps by --effort; what "high" buys and costs per budget: BENCHMARKS.md, accuracy
TUNE_STEPS = {"default": DEFAULT_TUNE_STEPS, "high": 192}


def default_pipeline(opts: CompileOptions) -> str:
    learned = opts.bpw is not None and opts.bits is None and opts.allocator == "learned"
    default = opts.bpw is not None and opts.bits is None
    embeddings = opts.quantize_embeddings if opts.quantize_embeddings is not None else default
    # Uniform pipelines reproduce plain GPTQ/RTN (the published baselines) unless tuning is asked for.
    tuned = learned or opts.effort == "high"
    steps = opts.tune_steps if opts.tune_steps is not None else (TUNE_STEPS[opts.effort] if tuned else 0)
    quantize = [f"quantize{{method={opts.method},clip={opts.clip}}}"]
    if steps:
        quantize.append(f"tune{{steps={steps},objective={opts.objective}}}")
    if learned:
        act = "true" if opts.method == "gptq" else "false"
        alloc = f"allocate{{bpw={opts.bpw},objective={opts.objective},embeddings={embeddings},act_order={act}}}"
        return ",".join(["canonicalize", alloc, *quantize, "pack"])
    plan = [f"embeddings={embeddings}", f"act_order={'true' if opts.method == 'gptq' else 'false'}"]
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
    if opts.effort not in TUNE_STEPS:
        raise PassError(f"--effort {opts.effort!r}: choose {' or '.join(TUNE_STEPS)}")
    if opts.tune_steps is not None and opts.tune_steps < 0:
        raise PassError(f"--tune-steps {opts.tune_steps} must be 0 (off) or more")
    if opts.calib_windows < 1:
        raise PassError(f"--calib-windows {opts.calib_windows} must be 1 or more")
    if opts.calib_len < 2:
        raise PassError(f"--calib-len {opts.calib_len} must be 2 or more (tokens per calibration window)")
    if opts.allocator not in ("learned", "uniform"):
        raise PassError(f"--allocator {opts.allocator!r}: choose learned or uniform")
    if opts.bpw is None and opts.bits is None and not opts.passes:
        raise PassError("give a size target (--bpw B) or a uniform configuration (--bits N [--group G])")


def budget_target(opts: CompileOptions, passes: list[Pass], spec: str) -> float | None:
    """The whole-model bits per weight the artifact must meet (the manifest records it): --bpw, which some pass of
    the pipeline must plan to (a pass with a `bpw` option set), else the last such pass's own target. A pipeline
    that ignores --bpw is refused here, before the model is loaded."""
    planners = [p for p in passes if getattr(p, "bpw", None) is not None]
    if opts.bpw is None:
        return float(planners[-1].bpw) if planners else None
    if not planners:
        raise PassError(
            f"--bpw {opts.bpw}: no pass of the pipeline {spec!r} plans to a size target, so the artifact would miss it; "
            f"give the target to plan or allocate (e.g. plan{{bpw={opts.bpw}}} or allocate{{bpw={opts.bpw}}}) or leave --bpw out"
        )
    for p in planners:
        if p.bpw != opts.bpw:
            raise PassError(f"--bpw {opts.bpw} disagrees with bpw={p.bpw} of pass {p.name!r} in --passes; give the size "
                            "target once")
    return opts.bpw


def check_dump_dir(path: Path) -> None:
    """--dump-ir must name a folder this process can create files in (it is written while the passes run)."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise PassError(f"--dump-ir {path} is a file, not a folder; choose another --dump-ir folder")
    folder = path
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise PassError(f"--dump-ir {path}: {folder} is a file, not a folder; choose another --dump-ir folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".xbitc-probe.", dir=folder))
    except OSError as err:
        raise PassError(f"--dump-ir {path}: {folder} is not writable ({err.strerror}); choose another --dump-ir folder") from None


def check_calib_file(opts: CompileOptions) -> None:
    """A --calib file must be a non-empty UTF-8 text file: checked before the model is loaded."""
    if opts.calib and opts.calib != "self":
        calibration.read_text(opts.calib)


def check_calib_model(model: frontend.LoadedModel, opts: CompileOptions) -> None:
    """--calib must mean something for the loaded model; it is never ignored without a word."""
    if not opts.calib:
        return
    kind = model.kind
    if opts.calib == "self":
        if kind != "causal-lm":
            other = "give a text file with --calib FILE or leave" if model.tokenizer is not None else "leave"
            raise calibration.TextError(
                f"--calib self samples text from a causal language model, and {model.source} is not one (its kind: "
                f"{kind}); {other} --calib out"
            )
        return
    if model.tokenizer is None:
        ways = "use --calib self (the model writes its own calibration text) or leave --calib out (random token ids)" \
            if kind == "causal-lm" else "leave --calib out (calibration then uses random inputs shaped like the example)"
        hf = ", or compile a Hugging Face folder that holds its tokenizer files" if kind in ("causal-lm", "encoder") else ""
        raise calibration.TextError(f"--calib {opts.calib}: {model.source} has no tokenizer to read text with; {ways}{hf}")
    if kind not in ("causal-lm", "encoder"):
        raise calibration.TextError(f"--calib {opts.calib}: {model.source} does not read text (its kind: {kind}); "
                                    "leave --calib out")


def calibration_inputs(model: frontend.LoadedModel, opts: CompileOptions) -> list[tuple]:
    if model.kind == "causal-lm" and opts.calib == "self":
        tok = model.tokenizer
        vocab = model.module.model.config.vocab_size
        bos = tok.bos_token_id if tok is not None else None
        return calibration.self_windows(model.module, vocab, bos, opts.calib_windows, opts.calib_len, opts.seed,
                                         progress=opts.progress)
    if model.tokenizer is None or model.kind not in ("causal-lm", "encoder"):
        vocab = getattr(getattr(getattr(model.module, "model", None), "config", None), "vocab_size", None)
        if vocab is not None and model.kind in ("causal-lm", "encoder"):  # a Hugging Face model without tokenizer
            return calibration.random_windows(int(vocab), opts.calib_windows, min(opts.calib_len, model.max_seq),
                                              opts.seed, mask=model.kind == "encoder")
        return calibration.random_inputs(model.example_inputs, opts.calib_windows, opts.seed)
    path = Path(opts.calib) if opts.calib and opts.calib != "self" else calibration.PACKAGE_TEXT / "calib.txt"
    if model.kind == "encoder":  # text windows with a full attention mask
        length = min(opts.calib_len, model.max_seq)
        wins = calibration.text_windows(model.tokenizer, path, opts.calib_windows, length, opts.seed)
        return [(w[0], torch.ones_like(w[0])) for w in wins]
    return calibration.text_windows(model.tokenizer, path, opts.calib_windows, opts.calib_len, opts.seed)


def compile_model(source: str | frontend.LoadedModel, out: Path, opts: CompileOptions) -> Manifest | None:
    """Compile `source` (a path/spec, or a model already loaded with frontend.load) into the artifact `out`.

    Returns the artifact's manifest; under torchrun, on rank 0, and None on the other ranks (which return once the
    artifact is in place). The first process to fail raises its error; the others raise distributed.PeerFailed."""
    with distributed.group():
        quiet = replace(opts, log=lambda s: None, progress=False, dump_ir=None)  # logs and IR dumps: rank 0's
        try:
            return _compile(source, out, opts if distributed.is_main() else quiet)
        except BaseException as err:
            if not distributed.first_failure():
                raise distributed.PeerFailed("another process of this run failed first and reported why") from err
            raise


def _compile(source: str | frontend.LoadedModel, out: Path, opts: CompileOptions) -> Manifest | None:
    main = distributed.is_main()
    # Bad input is refused before the long work: options, the output path, the pipeline, the calibration file.
    check_options(opts)
    if main:  # rank 0 writes; on another host the path may mean nothing
        artifact.check_output(out)  # an unwritable -o is found now, not after the compile
    if opts.dump_ir is not None:
        check_dump_dir(opts.dump_ir)
    backend = registry.get(registry.BACKEND_GROUP, opts.backend)()
    spec = opts.passes or default_pipeline(opts)
    extra = backend.passes()
    if extra and not opts.passes:
        spec = ",".join([spec, *extra])
    passes = build_passes(spec)  # unknown passes / options fail here, before any model is loaded
    target_bpw = budget_target(opts, passes, spec)
    needs_calib = any(p.needs_calibration for p in passes)
    if needs_calib and opts.calib_windows < distributed.world_size():
        n = distributed.world_size()
        raise PassError(f"--calib-windows {opts.calib_windows} is fewer than the {n} processes of this run, and each "
                        f"needs a calibration window; give --calib-windows {n} or more, or start fewer processes")
    check_calib_file(opts)
    if opts.max_memory is not None:
        need = streaming.check_memory(source, passes, opts.max_memory, opts.calib_windows, opts.calib_len, opts.calib)
        opts.log(f"memory: about {streaming.gb(need)} estimated at the peak, within --max-memory {streaming.gb(opts.max_memory)}")
    distributed.barrier()  # every process passed the checks (one that failed ends the others here)
    # a Hugging Face folder's weights stay in their files through tracing (--calib self runs the float model: eager);
    # a GGUF file's only under --max-memory: every read dequantizes, so where the model fits, whole is faster
    gguf = str(source).endswith(".gguf")
    model = source if isinstance(source, frontend.LoadedModel) else frontend.load(
        source, trust_pickle=opts.trust_pickle, inputs=opts.inputs,
        lazy=opts.calib != "self" and (opts.max_memory is not None or not gguf), only_lazy=opts.max_memory is not None)
    opts.log(f"loaded {model.source} ({model.kind}, {model.param_count:,} parameters)")
    calib_inputs = None
    if opts.calib and not needs_calib:
        opts.log(f"note: --calib {opts.calib} is not used: no pass of {spec!r} reads calibration data")
    elif needs_calib:
        check_calib_model(model, opts)
        if opts.calib != "self":  # text windows are cheap: a too-short text is refused before tracing
            calib_inputs = calibration_inputs(model, opts)
    graph = frontend.trace(model, log=opts.log)
    if not streaming.streams(passes):  # the whole-model passes hold every weight: read them, one tensor at a time
        lazy.materialize(graph)  # (a pipeline that streams reads them a layer block at a time: xbitc.streaming)
    graph.meta["float_dtype"] = opts.float_dtype
    ctx = PassContext(log=opts.log)
    ctx.stats["progress"] = opts.progress
    ctx.stats["backend"] = backend.name
    ctx.stats["scratch"] = artifact.scratch_folder(out) if main else None  # spilled work beside the output (a disk)
    ctx.stats["emitted"] = backend.emitted(graph)  # e.g. kernel objects: the size planners count them too
    if needs_calib:
        ctx.calib_inputs = calib_inputs if calib_inputs is not None else calibration_inputs(model, opts)
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
    distributed.barrier()  # every process has finished: only now may rank 0 write
    manifest = None
    if main:
        manifest = artifact.write(
            graph, out, backend=backend.name, pipeline=manager.spec(), passes=ctx.records, target_bpw=target_bpw,
            roles=roles, tokenizer=model.tokenizer, emit=backend.emit, notes={"plan": ctx.stats.get("plan_summary", {})},
        )
    distributed.barrier()  # the others return once the artifact is in place
    return manifest

