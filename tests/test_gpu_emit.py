"""`xbitc compile --backend wgsl|cuda|metal` writes the model's GPU kernels into the artifact (backends/gpu/emit.py):
the files are listed and counted, equal a fresh rendering, do not depend on the quantization plan (what the size
planners count before planning is what is written), and are legal: every WGSL kernel passes WebGPU's shader and
pipeline validation (lavapipe here) with the bindings kernels.json states, the CUDA file compiles with nvcc for
sm_80 and sm_90, the Metal file compiles as C++ against backends/gpu/metal_shim.h. cuda and metal artifacts do not
execute in xbitc's runtime: asked for by name they give one line naming what to use; by default the host's CPU
backend runs them, as it runs an arm artifact on x86-64.

The WebGPU tests come last in this file, and the file runs with the other WebGPU modules after the rest of the
suite (conftest.py): lavapipe loads its own libLLVM, after which llvmlite's MCJIT aborts; the one run through the
host's CPU backend here is a separate process.
"""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import word_tokenizer
from test_bad_input import one_error_line
from xbitc import frontend, runtime
from xbitc.artifact import load_graph, read_manifest
from xbitc.backends.base import BackendUnavailable
from xbitc.backends.gpu import packed as pk
from xbitc.backends.gpu.cuda import cubin, nvcc
from xbitc.backends.gpu.emit import INDEX, GpuUnsupported, collect, sources
from xbitc.backends.gpu.metal_cpu import SHIM, cxx
from xbitc.cli import main
from xbitc.driver import CompileOptions, compile_model

ROOT = Path(__file__).parent.parent
LANGS = ("wgsl", "cuda", "metal")


def llama() -> frontend.LoadedModel:
    """A random-weight one-layer Llama with its decode step and a tokenizer (as conftest.tiny_llama_artifact)."""
    import transformers as t

    torch.manual_seed(0)
    cfg = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    return frontend.wrap_hf(t.LlamaForCausalLM(cfg), word_tokenizer(), "llama", "0")


def compiled(loaded, out: Path, backend: str, **kw) -> Path:
    compile_model(loaded, out, CompileOptions(log=lambda s: None, progress=False, backend=backend, **kw))
    return out


@pytest.fixture(scope="module")
def loaded():
    pytest.importorskip("transformers")
    return llama()


PLANS = {  # two plans: the cuda artifact keeps the embedding table float, the metal one packs it at 2 bits
    "wgsl": dict(bits=4, group=32), "cuda": dict(bits=4, group=32),
    "metal": dict(bits=2, group=64, quantize_embeddings=True),
}


@pytest.fixture(scope="module")
def artifacts(loaded, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-emit")
    return {lang: compiled(loaded, folder / f"{lang}.xbitc", lang, **PLANS[lang]) for lang in LANGS}


def index(art: Path) -> dict:
    return json.loads((art / INDEX).read_text())


def gpu_files(art: Path) -> dict[str, bytes]:
    return {p.relative_to(art).as_posix(): p.read_bytes() for p in sorted((art / "gpu").rglob("*")) if p.is_file()}


def test_the_gpu_backends_are_declared_and_listed(capsys):
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["xbitc.backends"]
    for lang in LANGS:
        module, cls = declared[lang].split(":")
        assert getattr(importlib.import_module(module), cls).name == lang
    assert main(["list-backends"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert set(LANGS) <= listed


@pytest.mark.parametrize("lang", LANGS)
def test_the_manifest_lists_and_counts_the_gpu_files(artifacts, lang):
    art = artifacts[lang]
    m, idx, files = read_manifest(art), index(artifacts[lang]), gpu_files(art)
    sources_ = [rel for rel in files if rel != INDEX]
    assert idx["language"] == lang and idx["files"] == sources_
    assert all(rel.startswith(f"gpu/{lang}/") for rel in sources_)
    assert len(sources_) == (len(idx["kernels"]) if lang == "wgsl" else 1)  # WGSL: one module per kernel
    for rel, data in files.items():
        assert rel in m.files and m.size.files[rel] == len(data)  # hashed, and counted in the size
    note = m.notes["gpu"]
    assert note == {"language": lang, "index": INDEX, "kernels": len(idx["kernels"]),
                    "bytes": sum(len(d) for d in files.values())}
    for k in idx["kernels"]:
        assert k["name"] in files[k["file"]].decode() and k["ops"]
    ops = {op for k in idx["kernels"] for op in k["ops"]}
    assert {"linear", "embed", "attention", "rmsnorm", "rope"} <= ops  # main graph and decode step
    assert set(idx["planned"]) == {"main", "step"}


@pytest.mark.parametrize("lang", LANGS)
def test_the_emitted_sources_equal_a_fresh_rendering(artifacts, lang):
    """Rendered again from the artifact's own (packed) graphs, every file is the same, byte for byte."""
    art = artifacts[lang]
    graph, _ = load_graph(art)
    found, ops, _ = collect(graph)
    kernels = [found[name] for name in sorted(found)]
    for rel, text in sources(kernels, lang).items():
        assert (art / rel).read_bytes() == text.encode(), rel
    idx = index(art)
    assert [{n: v for n, v in k.items() if n not in ("file", "ops")} for k in idx["kernels"]] == \
        [k.interface() for k in kernels]
    assert [k["ops"] for k in idx["kernels"]] == [sorted(ops[k.name]) for k in kernels]


# the kernel set is the same in every language: one in the default suite, the other with the slow tests
@pytest.mark.parametrize("lang", [pytest.param("cuda", marks=pytest.mark.slow), "metal"])
def test_the_emitted_files_do_not_depend_on_the_plan(loaded, artifacts, lang, tmp_path):
    """What `Backend.emitted` measures on the traced graph before any pass is what compile writes, byte for byte,
    whether the plan keeps the embedding table float at 4 bits (cuda) or packs it at 2 bits (metal); both plans
    emit the same kernels."""
    from xbitc import registry

    art = artifacts[lang]
    backend = registry.get(registry.BACKEND_GROUP, lang)()
    traced = frontend.trace(loaded)
    files, notes = backend.emitted(traced)
    written = gpu_files(art)
    assert files == {rel: len(d) for rel, d in written.items()} and notes == {"gpu": read_manifest(art).notes["gpu"]}
    backend.emit(traced, tmp_path)
    assert gpu_files(tmp_path) == written
    embed = read_manifest(art).tensors["model.embed_tokens.weight"].storage
    assert embed == ("packed" if lang == "metal" else "float")
    strip = lambda art: [{n: v for n, v in k.items() if n != "file"} for k in index(art)["kernels"]]  # noqa: E731
    assert strip(art) == strip(artifacts["wgsl"])


def test_the_packed_layout_rules_match_the_kernels_and_the_artifact(artifacts):
    """kernels.json "packed" states the layout a host derives from the canonical weights: its constants are
    packed.py's, its calls' parameters are the kernels', and the layout built from the artifact's matrices obeys it."""
    from xbitc.webgpu.weights import gpu_matrix

    art = artifacts["wgsl"]
    rules = index(art)["packed"]
    by_name = {k["name"]: k for k in index(art)["kernels"]}
    assert (rules["threads"], rules["piece_cols"], rules["gemm_tokens"], rules["lanes_per_thread"], rules["none"]) \
        == (pk.THREADS, pk.PIECE_COLS, pk.GEMM_TOKENS, pk.LPT, pk.NONE)
    assert len(rules["piece_fields"]) == pk.PIECE_FIELDS
    for role, name in rules["kernels"].items():
        k = by_name[name]
        assert k["workgroup"] == [rules["threads"], 1, 1]
        params = rules["calls"][role]["params"]
        params = rules["calls"]["gemv"]["params"] if params == "as gemv" else params
        assert set(params) == {p["name"] for p in k["params"]}, role
    graph, _ = load_graph(art)
    matrices = [v for v in graph.params.values() if hasattr(v, "segments")]
    assert matrices
    for pm in matrices:
        m = gpu_matrix(pm)
        kinds = m.pieces[: m.npieces, 0]
        assert set(kinds.tolist()) <= set(rules["kinds"])
        assert (m.pieces[: m.npieces, 1] <= rules["piece_cols"]).all()
        assert m.xcols % rules["block_cols"] == 0 and m.rows == pm.shape[0]
        live = m.dst[m.dst != rules["none"]].astype(int)  # piece << 7 | column in piece
        assert len(live) and (live >> 7 < m.npieces).all() and ((live & 127) < m.pieces[live >> 7, 1]).all()
        assert (m.src[m.src != rules["none"]] < pm.shape[1]).all()


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found: CUDA sources compile only where the CUDA toolkit is")
# sm_90 in the default suite; sm_80 (the same source, another nvcc back end) with the slow tests
@pytest.mark.parametrize("arch", [pytest.param("sm_80", marks=pytest.mark.slow), "sm_90"])
def test_the_emitted_cuda_compiles_with_nvcc(artifacts, arch, tmp_path):
    art = artifacts["cuda"]
    (rel,) = index(art)["files"]
    image = cubin((art / rel).read_text(), arch, tmp_path)  # warnings are errors
    for k in index(art)["kernels"]:
        assert k["name"].encode() in image


def test_the_emitted_metal_compiles_as_cpp(artifacts, tmp_path):
    if cxx() is None:
        pytest.skip("no C++ compiler (clang++ or g++) to compile the Metal source against metal_shim.h")
    art = artifacts["metal"]
    (rel,) = index(art)["files"]
    (tmp_path / "metal_stdlib").write_text(f'#include "{SHIM}"\n')  # what `#include <metal_stdlib>` finds
    r = subprocess.run([cxx(), "-std=c++20", "-fsyntax-only", "-w", "-I", str(tmp_path), "-x", "c++",
                        str(art / rel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("lang", ["cuda", "metal"])
def test_cuda_and_metal_artifacts_name_what_runs_them(artifacts, lang, capsys):
    """Metal never executes in xbitc's runtime; CUDA does where a GPU, its driver and nvcc are (tests/device)."""
    from xbitc.backends.cuda import _gpu_here

    if lang == "cuda" and _gpu_here() is None:
        pytest.skip("a CUDA GPU is here: the cuda backend executes (tests/device/test_cuda_model.py)")
    art = artifacts[lang]
    with pytest.raises(BackendUnavailable, match="--backend wgsl"):
        runtime.load(art, backend=lang)
    assert main(["run", str(art), "--backend", lang, "--text", "hello world"]) == 2
    why = "the cuda backend needs an NVIDIA GPU" if lang == "cuda" else "the metal backend writes"
    one_error_line(capsys.readouterr().err, why, "--backend wgsl", "reference")


@pytest.mark.slow  # a compile-free CLI run in its own process: ~10 s
def test_by_default_a_cuda_artifact_runs_on_the_host_backend(artifacts):
    """As an arm artifact on x86-64: the portable packed format runs through this host's CPU backend (in its own
    process: see the module docstring), generating what the reference interpreter generates."""
    from xbitc.backends.cuda import _gpu_here

    if _gpu_here() is None:
        pytest.skip("a CUDA GPU is here: cuda artifacts run on it by default")
    art = artifacts["cuda"]
    assert runtime.host_backend("cuda") != "cuda"
    want = runtime.load(art, backend="reference").generate("hello world", 4)
    r = subprocess.run([sys.executable, "-m", "xbitc.cli", "run", str(art), "--text", "hello world",
                        "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == ("hello world" + want).strip()


def test_a_model_the_gpu_kernels_cannot_run_is_refused_at_compile(tmp_path):
    class CumSum(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(32, 32)

        def forward(self, x):
            return torch.cumsum(self.lin(x), dim=-1)

    loaded = frontend.from_module(CumSum(), (torch.randn(2, 32),))
    with pytest.raises(GpuUnsupported, match=r"no core-op lowering: %cumsum.*--backend x86"):
        compiled(loaded, tmp_path / "cumsum.xbitc", "metal", bits=4)
    assert not (tmp_path / "cumsum.xbitc").exists()


# ------------------------------------------------------------------------------------------------ WebGPU (last)


@pytest.fixture(scope="module")
def webgpu():
    from xbitc.backends.gpu.webgpu import NoAdapter, adapter

    try:
        return adapter().request_device_sync()
    except NoAdapter as err:
        pytest.skip(f"no WebGPU adapter to validate the WGSL ({err}); `make system-deps` installs lavapipe")


def test_every_emitted_wgsl_kernel_validates_on_webgpu(artifacts, webgpu):
    """Each module compiles into a compute pipeline whose layout is built from kernels.json alone (storage buffers
    in order, read-only unless written, then the uniform parameter struct)."""
    import wgpu

    art = artifacts["wgsl"]
    for k in index(art)["kernels"]:
        kinds = [wgpu.BufferBindingType.storage if b["write"] else wgpu.BufferBindingType.read_only_storage
                 for b in k["buffers"]] + ([wgpu.BufferBindingType.uniform] if k["params"] else [])
        group = webgpu.create_bind_group_layout(entries=[
            {"binding": i, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": t}} for i, t in enumerate(kinds)])
        try:
            module = webgpu.create_shader_module(code=(art / k["file"]).read_text(), label=k["name"])
            webgpu.create_compute_pipeline(layout=webgpu.create_pipeline_layout(bind_group_layouts=[group]),
                                           compute={"module": module, "entry_point": k["name"]})
        except wgpu.GPUError as err:
            pytest.fail(f"{k['file']}: {err}")


def test_the_wgsl_runtime_launches_only_emitted_kernels(artifacts):
    """At the shapes kernels.json says were planned, every kernel the WebGPU runtime prepares for the artifact (its
    real packed matrices) is one of the emitted ones."""
    from xbitc.webgpu.device import DeviceUnavailable

    art = artifacts["wgsl"]
    try:
        model = runtime.load(art, backend="wgsl")
    except DeviceUnavailable as err:
        pytest.skip(str(err))
    emitted = {k["name"] for k in index(art)["kernels"]}
    planned = index(art)["planned"]
    used = set()
    for label, program in (("main", model.program), ("step", model.step)):
        for specs in planned[label]:
            used |= {c.kernel.name for _, c in program.executor.prepare([(tuple(s), d) for s, d in specs]).calls}
    assert used and used <= emitted, used - emitted
    assert {"xbitc_rows_gemv", "xbitc_rows_gemm", "xbitc_rows_gather"} <= used  # the packed linears ran packed
