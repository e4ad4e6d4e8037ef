"""The `xbitc` command line."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

# The x86 kernels run row ranges on their own thread pool between torch ops. torch's OpenMP threads busy-wait after
# every parallel op by default and take the core that pool needs: a 256-token prefill on 2 threads took 886 ms with
# the default, 666 ms with passive waiting (float PyTorch: 681 -> 722 ms). It must be set before torch loads, so the
# command line sets it for its own process (a user's setting wins); library users can set it themselves.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from xbitc import registry


class UsageError(ValueError):
    """A command-line value that cannot work; the message says which and what to give instead."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt: the same cleanup runs (a half-written
    artifact's temporary folder is removed) and the command ends with one line."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _expected_errors() -> tuple[type[BaseException], ...]:
    from xbitc.artifact import ArtifactError
    from xbitc.calibration import TextError
    from xbitc.frontend import LoadError
    from xbitc.importer import TraceError
    from xbitc.passes.base import PassError

    from xbitc.backends.base import BackendUnavailable
    from xbitc.native.build import BuildError
    from xbitc.native.modelbin import ExportError
    from xbitc.webgpu.export import BundleError

    return (ArtifactError, LoadError, TraceError, PassError, registry.UnknownPlugin, BackendUnavailable, TextError,
            UsageError, ExportError, BuildError, BundleError)


def _peer_failed() -> type[BaseException]:
    from xbitc.distributed import PeerFailed

    return PeerFailed


def cmd_compile(a: argparse.Namespace) -> int:
    from xbitc.driver import CompileOptions, compile_model
    from xbitc.streaming import parse_size

    opts = CompileOptions(
        max_memory=parse_size(a.max_memory) if a.max_memory is not None else None,
        bpw=a.bpw, bits=a.bits, group=a.group, backend=a.backend, passes=a.passes, method=a.method,
        quantize_embeddings=a.quantize_embeddings, allocator=a.allocator, objective=a.objective, float_dtype=a.float_dtype, calib=a.calib,
        calib_windows=a.calib_windows, calib_len=a.calib_len, seed=a.seed, trust_pickle=a.trust_pickle, inputs=tuple(a.input or ()),
        clip=not a.no_clip, tune_steps=a.tune_steps, effort=a.effort, dump_ir=Path(a.dump_ir) if a.dump_ir else None,
    )
    m = compile_model(a.model, Path(a.output), opts)
    if m is None:  # another process of the same torchrun run wrote the artifact and says so
        return 0
    s = m.size
    lin = f", linears {s.linear_bits_per_weight:.3f}" if s.linear_bits_per_weight is not None else ""
    print(f"wrote {a.output}: {s.counted_bytes / 1e6:.2f} MB, {s.bits_per_weight:.3f} bits per weight (whole model{lin})")
    return 0


def text_artifact(path: str, command: str, generates: bool) -> None:
    """Refuse, before loading it, an artifact `xbitc run`/`eval` cannot read text with."""
    from xbitc.artifact import TOKENIZER, read_manifest

    m = read_manifest(Path(path))
    if not any(f.startswith(TOKENIZER + "/") for f in m.files):
        raise UsageError(
            f"{path} has no tokenizer (its source model came without one), so xbitc {command} cannot turn text into "
            "tokens; compile a Hugging Face folder that holds its tokenizer files, or call the model on token ids "
            "from Python (xbitc.runtime.load)"
        )
    if m.kind != "causal-lm" and (generates or m.kind in ("encoder", "vision")):
        raise UsageError(f"xbitc {command} needs a causal language model, and {path} is not one (its kind: {m.kind}); "
                         "call it from Python with xbitc.runtime.load")


def cmd_run(a: argparse.Namespace) -> int:
    from xbitc.runtime import load

    if not a.text:
        raise UsageError('--text is empty; give the prompt to continue, e.g. --text "Once upon a time"')
    if a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {a.max_new_tokens} must be 1 or more")
    text_artifact(a.artifact, "run", generates=True)
    model = load(a.artifact, backend=a.backend)
    if len(model.tokenizer(a.text).input_ids) == 0:
        raise UsageError(f"--text {a.text!r} holds no tokens; give the prompt to continue")
    print(a.text + model.generate(a.text, a.max_new_tokens))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from xbitc.evaluate import score
    from xbitc.calibration import read_text, token_stream
    from xbitc.runtime import load

    if a.window < 2:
        raise UsageError(f"--window {a.window} must be 2 or more (every window scores its tokens after the first); "
                         "the default is 512")
    if a.max_tokens is not None and a.max_tokens < a.window:
        raise UsageError(f"--max-tokens {a.max_tokens} is less than one window of {a.window} tokens; "
                         "raise --max-tokens or lower --window")
    text = read_text(a.text_file, "text file", "give a UTF-8 text file of at least --window tokens")
    if a.reference and not Path(a.reference).exists() and ":" not in a.reference:  # a factory spec has a colon
        raise UsageError(f"--reference {a.reference} does not exist; give the float source model the artifact was "
                         "compiled from (a .pt2, Hugging Face folder, .gguf or package.module:function)")
    text_artifact(a.artifact, "eval", generates=False)
    model = load(a.artifact, backend=a.backend)
    ids = token_stream(model.tokenizer, text)
    if len(ids) < a.window:
        raise UsageError(f"text file {a.text_file} has {len(ids)} tokens, fewer than one window of {a.window}; "
                         "give a longer text or lower --window")
    ref = None
    if a.reference:
        from xbitc import frontend

        ref = frontend.load(a.reference).module
    s = score(model, ids, a.window, a.max_tokens, reference=ref)
    print(f"perplexity {s.perplexity:.3f} over {s.tokens} tokens (windows of {a.window}); top-1 accuracy {s.top1_acc:.4f}")
    if ref is not None:
        print(f"KL to float {s.kl:.4f} nats/token; top-1 agreement {s.top1_agree:.4f}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from xbitc.inspect import report

    for art in a.artifact:
        print(report(Path(art), verify=not a.no_verify))
    if a.plot:
        from xbitc.plot import plot

        print(f"wrote {plot([Path(p) for p in a.artifact], Path(a.plot))}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    if a.webgpu is not None:
        return _export_webgpu(a)
    if a.check is not None:
        raise UsageError("--check applies to --webgpu (a bundle's self-check); drop it, or export with --webgpu DIR")
    from xbitc.native.export import export_c_lib

    out = export_c_lib(Path(a.artifact), Path(a.c_lib), act=a.act or "f32", target=a.target, cpu=a.cpu,
                       sources=a.sources)
    target = (out / "model.h").read_text().split("XBITC_MODEL_TARGET ")[1].split()[0].strip('"')
    lib = f"libxbitc.a for {target}" if (out / "libxbitc.a").exists() else \
        f"libxbitc.a's sources, {target} kernel objects and a Makefile (run make with the target's C compiler)"
    print(f"wrote {out}: model.bin ({(out / 'model.bin').stat().st_size / 1e6:.2f} MB), {lib}, xbitc.h, model.h, "
          "README.md")
    return 0


def _export_webgpu(a: argparse.Namespace) -> int:
    from xbitc.webgpu.export import CHECK_TOKENS, export_webgpu

    given = [flag for flag, v in (("--act", a.act), ("--target", a.target), ("--cpu", a.cpu),
                                  ("--sources", a.sources or None)) if v is not None]
    if given:
        raise UsageError(f"{', '.join(given)} applies to --c-lib only (the C library); drop it for --webgpu")
    out = Path(a.webgpu)
    model = export_webgpu(Path(a.artifact), out, check=a.check)
    check = f", check.json ({a.check}, {CHECK_TOKENS} tokens)" if a.check else ""
    print(f"wrote {out}: kernels.wgsl, model.json ({len(model['matrices'])} packed matrices), weights.bin "
          f"({model['weights_bytes'] / 1e6:.2f} MB){check}")
    return 0


def cmd_list(group: str) -> int:
    for name in registry.names(group):
        print(f"{name:16s} {registry.origin(group, name)}")
        if group == registry.PASS_GROUP:  # each pass's options, their defaults and the ranges they accept
            from xbitc.passes.base import describe_options

            try:
                options = describe_options(registry.get(group, name))
            except Exception as err:  # a broken plugin must not hide the others
                options = f"(cannot be loaded: {type(err).__name__}: {err})"
            if options:
                print(f"{'':16s}   {options}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xbitc", description="Compile Transformers below 4 bits per weight.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model into an artifact folder")
    c.add_argument("model", help=".pt2, Hugging Face folder, .gguf, .pt (with --trust-pickle) or package.module:function")
    c.add_argument("-o", "--output", default="model.xbitc")
    c.add_argument("--bpw", type=float, help="whole-model bits per weight target (everything in the artifact counted)")
    c.add_argument("--bits", type=int, help="uniform bit depth (1..8) instead of a target")
    c.add_argument("--group", type=int, help="group size along input columns (0 = per-channel)")
    c.add_argument("--backend", default="reference")
    c.add_argument("--passes", help="full pipeline spec, e.g. 'canonicalize,plan{bpw=4},quantize{method=rtn},pack'")
    c.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    c.add_argument("--no-clip", action="store_true",
                   help="keep each group's full range (plain GPTQ/RTN grids) instead of searching the clipping range")
    c.add_argument("--tune-steps", type=int, metavar="N",
                   help="after quantizing, train the group scales and norm weights on the objective for N calibration "
                        "batches (default: 24 with the learned allocator, 0 otherwise; 0 turns it off)")
    c.add_argument("--effort", default="default", choices=["default", "high"],
                   help="high: tune 192 steps instead of 24 (uniform --bits pipelines too), for several times the "
                        "compile time (SmolLM2 at 3.0 bpw: 49 minutes on a shared 2-core machine, the default 9 alone); "
                        "--tune-steps overrides it")
    c.add_argument("--quantize-embeddings", action="store_true", default=None,
                   help="quantize embeddings and the output layer too (the default with --bpw)")
    c.add_argument("--float-embeddings", dest="quantize_embeddings", action="store_false",
                   help="keep embeddings and the output layer float (the default with --bits)")
    c.add_argument("--allocator", default="learned", choices=["learned", "uniform"],
                   help="with --bpw: learned per-column depths (default) or the best uniform depth that fits")
    c.add_argument("--objective", default="auto",
                   help="allocation cost: kl, ce, mse or package.module:function (auto: kl for language models, else mse)")
    c.add_argument("--float-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    c.add_argument("--calib", help="calibration text file, or 'self' to sample from the float model")
    c.add_argument("--calib-windows", type=int, default=16)
    c.add_argument("--calib-len", type=int, default=256)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--trust-pickle", action="store_true", help="allow .pt pickles (loading them runs their code)")
    c.add_argument("--input", action="append", metavar="NAME:SHAPE[:DTYPE]",
                   help="an input of forward, repeated in order, for a plain nn.Module (.pt, factory) or a .pt2: "
                        "e.g. ids:1x16:int64 (static) or ids:batchxseq:int64 (named sizes stay dynamic; NAME=N traces "
                        "at N, default 2 for batch, 8 otherwise). Without it xbitc uses the model's example inputs or "
                        "infers them from a first Embedding, Linear or Conv layer")
    c.add_argument("--max-memory", metavar="SIZE",
                   help="bound on the compile's memory, e.g. 3GB: a Hugging Face folder compiled with --method gptq "
                        "(--bits B or --bpw B, tuned or not) is measured and quantized a layer block at a time and "
                        "tuned with its activations on disk; refused at once if the estimate is over")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR before and after every pass")
    c.set_defaults(fn=cmd_compile)
    r = sub.add_parser("run", help="generate text greedily from a compiled language model")
    r.add_argument("artifact")
    r.add_argument("--text", required=True)
    r.add_argument("--max-new-tokens", type=int, default=20)
    r.add_argument("--backend")
    r.set_defaults(fn=cmd_run)
    e = sub.add_parser("eval", help="perplexity (and KL to a float model) of a compiled language model on a text file")
    e.add_argument("artifact")
    e.add_argument("--text-file", required=True)
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--max-tokens", type=int)
    e.add_argument("--reference", help="the float source model, for KL and top-1 agreement")
    e.add_argument("--backend")
    e.set_defaults(fn=cmd_eval)
    i = sub.add_parser("inspect", help="show an artifact's size, allocation and provenance")
    i.add_argument("artifact", nargs="+")
    i.add_argument("--plot", metavar="PNG", help="draw bits per component type per layer and column depth histograms")
    i.add_argument("--no-verify", action="store_true", help="print the manifest's claims without checking the files")
    i.set_defaults(fn=cmd_inspect)
    x = sub.add_parser("export", help="write a compiled artifact as a C library a program links (no Python), or "
                                      "its packed matrices as a WebGPU bundle for a web page")
    x.add_argument("artifact")
    to = x.add_mutually_exclusive_group(required=True)
    to.add_argument("--c-lib", metavar="DIR", help="folder to write: model.bin, libxbitc.a, xbitc.h, model.h, README.md")
    to.add_argument("--webgpu", metavar="DIR",
                    help="new folder to write a browser bundle into: kernels.wgsl, model.json, weights.bin (the packed "
                         "matrices and their WebGPU kernels; examples/webgpu/ runs it)")
    x.add_argument("--check", metavar="NAME",
                   help="with --webgpu: also write check.json, seeded activations and the reference product for "
                        "packed matrix NAME, so a page can verify itself")
    x.add_argument("--act", choices=["f32", "q8"],
                   help="packed products on float activations (f32, the default: exact, the Python runtime's) or on "
                        "int8 activations per record (q8: faster, as llama.cpp does; needs the generated kernels)")
    x.add_argument("--target", help="CPU family to build the library for: x86-64 or aarch64 (Linux, Android; built "
                                    "with the GNU cross compiler), macos-arm64 or ios-arm64 (Mach-O objects and "
                                    "sources with a Makefile, built on a Mac); default: the family the artifact was "
                                    "compiled for (--backend x86 / arm), else this host's")
    x.add_argument("--sources", action="store_true",
                   help="write libxbitc.a's sources, kernel objects and a Makefile instead of building it (for the "
                        "Android NDK or any other toolchain)")
    x.add_argument("--cpu", help="pin the kernels to one CPU (LLVM name, e.g. cortex-a55, neoverse-n1, znver4) instead of "
                                 "choosing among the family's levels at run time; only that CPU's features are used")
    x.set_defaults(fn=cmd_export)
    sub.add_parser("list-passes", help="passes available (built-in and plugins)").set_defaults(fn=lambda a: cmd_list(registry.PASS_GROUP))
    sub.add_parser("list-backends", help="backends available").set_defaults(fn=lambda a: cmd_list(registry.BACKEND_GROUP))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM (kill, a job scheduler, a container stop) ends a command like Ctrl-C: cleanup runs, one line is printed
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return args.fn(args)
    except _peer_failed():  # another process of the same torchrun run failed first and printed the error
        return 1
    except _expected_errors() as err:
        print(f"xbitc: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"xbitc: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print("xbitc: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("xbitc: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
