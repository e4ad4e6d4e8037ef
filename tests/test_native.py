"""The C runtime (xbitc/native): model.bin written from compiled artifacts and run by the library a C program links,
against the Python runtime on the same artifact.

Tolerance: both sides compute the same float32 network with the same packed weights; the packed products are the
same generated kernels, but sums elsewhere (norms, attention, dense products) run in other orders, so values differ
by float32 rounding, ~1e-6 relative per op, grown over a few layers: 1e-4 of the logits' scale."""
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from xbitc import frontend, runtime
from xbitc.driver import CompileOptions, compile_model
from xbitc.native import build, modelbin
from xbitc.native.export import export_c_lib

t = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from test_equivalence import VOCAB, build as build_hf, inputs_for  # noqa: E402

DRIVER = Path(__file__).parent / "native" / "driver.c"
DTYPES = {1: np.float32, 2: np.int64, 3: np.bool_}
CODES = {np.dtype(np.float32): 1, np.dtype(np.int64): 2, np.dtype(np.bool_): 3}


def write_tensor(path: Path, a: np.ndarray) -> Path:
    a = np.ascontiguousarray(a)
    path.write_bytes(struct.pack("<ii", CODES[a.dtype], a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape) + a.tobytes())
    return path


def read_tensors(path: Path) -> list[np.ndarray]:
    raw, out, pos = path.read_bytes(), [], 0
    while pos < len(raw):
        dtype, rank = struct.unpack_from("<ii", raw, pos)
        shape = struct.unpack_from(f"<{rank}q", raw, pos + 8)
        pos += 8 + 8 * rank
        n = int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize
        out.append(np.frombuffer(raw[pos:pos + n], dtype=DTYPES[dtype]).reshape(shape))
        pos += n
    return out


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("native")


def compiled(family: str, folder: Path, bits: int = 4) -> Path:
    out = folder / f"{family}.xbitc"
    if not out.exists():
        loaded = frontend.wrap_hf(build_hf(family))
        # GPT-2's layers are Conv1D, not linears: its packed matrices are the embeddings and the output layer
        compile_model(loaded, out, CompileOptions(bits=bits, group=32, quantize_embeddings=family == "gpt2",
                                                  log=lambda s: None, progress=False))
    return out


def exported(family: str, folder: Path, sanitize: bool = False) -> tuple[Path, Path]:
    """(the artifact, the driver program linked against its exported library)."""
    art = compiled(family, folder)
    lib = folder / f"{family}{'-asan' if sanitize else ''}.clib"
    if not lib.exists():
        export_c_lib(art, lib, sanitize=sanitize)
    exe = lib / "driver"
    if not exe.exists():
        build.link_program([DRIVER], lib / "libxbitc.a", exe, sanitize=sanitize)
    return art, exe


def run_driver(exe: Path, *args, expect: int | None = 0) -> subprocess.CompletedProcess:
    # a sanitizer's finding ends the process with 86 (not a status the library returns)
    env = {"ASAN_OPTIONS": "detect_leaks=0:exitcode=86", "UBSAN_OPTIONS": "halt_on_error=1:exitcode=86"}
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert expect is None or proc.returncode == expect, proc.stderr[-3000:]
    return proc


def close(got: np.ndarray, want: torch.Tensor) -> None:
    want = want.detach().float().numpy()
    scale = float(np.abs(want).max()) + 1e-6
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * scale, np.abs(got - want).max() / scale


def python_rows(model, prompt: torch.Tensor, tokens) -> torch.Tensor:
    """The Python runtime's last-token logits for the prompt, then for each of `tokens` but the last fed one at a
    time through the artifact's decode step: what the C side's generation printed, row by row."""
    want, *past = model.step(prompt, *runtime.empty_cache(model.graph.step))
    rows = [want[0, -1]]
    for tok in tokens[:-1]:
        want, *past = model.step(torch.tensor([[int(tok)]]), *past)
        rows.append(want[0, -1])
    return torch.stack(rows)


def test_op_numbering_matches_the_c_header():
    header = (build.HERE / "src" / "internal.h").read_text()
    listed = header.split("#define XB_OP_LIST(X)")[1].split("#define XB_ENUM")[0]
    names = [w[2:-1] for w in listed.replace("\\", " ").split() if w.startswith("X(")]
    assert names == modelbin.OPS
    from xbitc.ir.core import CORE_OPS

    assert set(names) == set(CORE_OPS)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_generation_matches_the_python_runtime(family, native_dir):
    art, exe = exported(family, native_dir)
    model = runtime.load(art)
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    steps = 32
    out = native_dir / f"{family}.lm.out"
    run_driver(exe, "lm", art.parent / f"{family}.clib" / "model.bin", write_tensor(native_dir / "prompt", prompt.numpy()),
               steps, 2, out)
    logits, tokens = read_tensors(out)
    # the Python runtime, through the artifact's decode step: prefill, then the C side's own tokens one at a time
    rows = python_rows(model, prompt, tokens)
    close(logits, rows)
    assert tokens.tolist() == [int(r.argmax()) for r in rows]


@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
def test_main_graph_matches_the_python_runtime(family, native_dir):
    art, exe = exported(family, native_dir)
    model = runtime.load(art)
    xs = inputs_for(model.manifest.kind, 2, 9)
    files = [write_tensor(native_dir / f"in{k}", x.numpy()) for k, x in enumerate(xs)]
    out = native_dir / f"{family}.graph.out"
    run_driver(exe, "graph", art.parent / f"{family}.clib" / "model.bin", 0, 1, out, *files)
    (got,) = read_tensors(out)
    close(got, model(*xs))


def test_sanitized_build_runs_clean(native_dir):
    """The runtime built with AddressSanitizer and UndefinedBehaviorSanitizer: a generation and an encoder call."""
    art, exe = exported("llama", native_dir, sanitize=True)
    prompt = write_tensor(native_dir / "asan-prompt", np.array([[3, 1, 4, 1, 5]], dtype=np.int64))
    run_driver(exe, "lm", exe.parent / "model.bin", prompt, 6, 2, native_dir / "asan.out")
    logits, tokens = read_tensors(native_dir / "asan.out")
    assert logits.shape == (7, VOCAB) and np.isfinite(logits).all()


def _with_crc(raw: bytearray) -> bytes:
    """The file with its checksum made right again: what reaches the structural checks behind the CRC."""
    raw[56:60] = struct.pack("<I", zlib.crc32(bytes(raw[64:])))
    return bytes(raw)


def test_corrupt_or_truncated_model_bin_gives_a_status(native_dir):
    """Every damaged file is refused with a status (or, if what changed is still a valid model, runs): never a crash,
    an out-of-bounds read or undefined behaviour (the sanitized build would end the process)."""
    art, exe = exported("llama", native_dir, sanitize=True)
    good = bytearray((exe.parent / "model.bin").read_bytes())
    prompt = write_tensor(native_dir / "fuzz-prompt", np.array([[7, 2]], dtype=np.int64))
    bad = native_dir / "bad.bin"

    def outcome(data: bytes) -> int:
        bad.write_bytes(data)
        proc = run_driver(exe, "lm", bad, prompt, 2, 1, native_dir / "fuzz.out", expect=None)
        assert proc.returncode in range(0, 9), (proc.returncode, proc.stderr[-2000:])
        return proc.returncode

    assert outcome(bytes(good[:len(good) // 2])) == 1  # truncated
    assert outcome(bytes(good[:40])) == 1
    flipped = bytearray(good)
    flipped[len(good) - 100] ^= 0x40
    assert outcome(bytes(flipped)) == 3  # checksum
    versioned = bytearray(good)
    versioned[8] = 99
    assert outcome(bytes(versioned)) == 2
    words = struct.unpack_from("<Q", good, 32)[0]
    rng = np.random.default_rng(0)
    statuses = []
    for _ in range(60):  # program and tensor words changed behind a correct checksum
        raw = bytearray(good)
        at = 64 + 8 * int(rng.integers(0, words))
        value = int(rng.choice([-1, 0, 1, 2, 7, 1000, 1 << 40, -(1 << 62), int(rng.integers(0, 64))]))
        raw[at:at + 8] = struct.pack("<q", value)
        statuses.append(outcome(_with_crc(raw)))
    print(sorted(statuses))
    assert statuses.count(1) >= 10  # most damage is found when the file is opened


@pytest.mark.slow
def test_smollm2_generation_matches_the_python_runtime(tmp_path):
    """The real SmolLM2-135M (RTN 4-bit g128, embeddings packed): prefill and 32 decode steps, logits and tokens."""
    from xbitc import models

    art = tmp_path / "smollm2.xbitc"
    compile_model(frontend.load(str(models.smollm2_gguf())), art,
                  CompileOptions(bits=4, group=128, quantize_embeddings=True, log=lambda s: None, progress=False))
    lib = export_c_lib(art, tmp_path / "lib")
    exe = build.link_program([DRIVER], lib / "libxbitc.a", tmp_path / "driver")
    model = runtime.load(art)
    prompt = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    run_driver(exe, "lm", lib / "model.bin", write_tensor(tmp_path / "prompt", prompt.numpy()), 32, 2, tmp_path / "o")
    logits, tokens = read_tensors(tmp_path / "o")
    rows = python_rows(model, prompt, tokens)
    close(logits, rows)
    assert tokens.tolist() == [int(r.argmax()) for r in rows]


def test_int8_activations_match_the_python_runtimes_q8(native_dir, monkeypatch):
    """--act q8: the packed products round each record's activations to int8, as the Python runtime does with
    XBITC_X86_ACT=q8 through the same generated kernels; the embedding table, whose rows are decoded, stays f32."""
    art = compiled("llama", native_dir)
    lib = export_c_lib(art, native_dir / "llama-q8.clib", act="q8")
    assert b"XBITC_MODEL_INT8_ACTIVATIONS 1" in (lib / "model.h").read_bytes()
    exe = build.link_program([DRIVER], lib / "libxbitc.a", lib / "driver")
    monkeypatch.setenv("XBITC_X86_ACT", "q8")
    model = runtime.load(art, backend="x86")
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    run_driver(exe, "lm", lib / "model.bin", write_tensor(native_dir / "q8-prompt", prompt.numpy()), 16, 2,
               native_dir / "q8.out")
    logits, tokens = read_tensors(native_dir / "q8.out")
    close(logits, python_rows(model, prompt, tokens))
    monkeypatch.setenv("XBITC_X86_ACT", "f32")  # and q8 really ran: float activations give other logits
    exact, *_ = runtime.load(art, backend="x86").step(prompt, *runtime.empty_cache(model.graph.step))
    assert not np.allclose(logits[0], exact[0, -1].numpy(), rtol=0, atol=1e-6)
