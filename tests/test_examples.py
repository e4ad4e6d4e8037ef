"""Every program in examples/ runs as a user would run it (a subprocess) and prints what it claims.

Bounds used below:
- Same decoded weights, different executor: outputs agree to float32 summation-order noise, far under
  1e-4 of the outputs' magnitude (a wrong code, scale or permutation moves them by percents).
- Relative RMS error of the compiled model's outputs against the float model's: an all-zero output scores 1 and an
  output uncorrelated with the float one about 1.41, so staying under 0.7 means the artifact carries the float
  model's signal; the random-weight models here measure 0.1-0.45 (a third of the Llama's columns are dropped at its
  budget).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(script: Path, tmp_path: Path, *args: str, pythonpath: Path | None = None) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}  # the examples' artifacts land in tmp_path
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"no match for {pattern!r} in:\n{text}"
    return float(m.group(1))


def test_python_api(tmp_path):
    out = run(EXAMPLES / "python_api.py", tmp_path, "--bpw", "4.5", "--out", str(tmp_path / "tiny.xbitc"))
    bpw = number(r"bits per weight: ([\d.]+) \(target 4.5\)", out)
    assert 4.5 - 0.01 <= bpw <= 4.5  # the README's promise: within 0.01 bits per weight under the target
    on_disk = int(number(r"bytes on disk: (\d+)", out))
    assert on_disk == sum(f.stat().st_size for f in (tmp_path / "tiny.xbitc").rglob("*")
                          if f.is_file() and "tokenizer" not in f.parts)
    # inspect reports the same bytes and bits per weight that are on disk
    assert re.search(rf"size {on_disk:,} bytes = {bpw:.4f} bits per weight", out), out
    peak = number(r"float logits max abs ([\d.]+)", out)
    assert number(r"max abs difference vs reference backend: ([\d.e+-]+)", out) <= 1e-4 * peak
    assert 0 < number(r"relative rms error vs float: ([\d.]+)", out) < 0.7  # > 0: something was quantized
    kl = number(r"kl to float: ([\d.]+)", out)
    uniform = number(r"a uniform guess: ([\d.]+)", out)
    assert 0 < kl < 0.5 * uniform  # far closer to the float model than knowing nothing
    assert len(re.search(r"greedy continuation \(KV cache\): \[([\d, ]+)\]", out).group(1).split(",")) == 6


def test_custom_pass(tmp_path):
    out = run(EXAMPLES / "custom_pass.py", tmp_path, "--bits", "3")
    depths = {(label, int(b)): d for label, b, d in re.findall(r"(with|without) block (\d+): depths \[([\d, ]+)\]", out)}
    assert depths == {("without", 0): "3", ("without", 1): "3", ("without", 2): "3", ("without", 3): "3",
                      ("with", 0): "8", ("with", 1): "3", ("with", 2): "3", ("with", 3): "8"}, out
    assert re.search(r"with keep-edges: pipeline \S*plan\{[^}]*\},keep-edges\{bits=8\},quantize", out), out
    size = {k: number(rf"{k} size: ([\d.]+)", out) for k in ("with", "without")}
    error = {k: number(rf"{k} relative rms error: ([\d.]+)", out) for k in ("with", "without")}
    assert size["with"] > size["without"]  # half the blocks at 8 bits instead of 3 cost bytes...
    assert 0 < error["with"] < error["without"] < 0.7  # ...and buy accuracy


def test_custom_backend_through_its_entry_point(tmp_path):
    # install a copy (the build writes build/ and *.egg-info beside the sources) into a folder only this run sees
    pkg, site = tmp_path / "pkg", tmp_path / "site"
    shutil.copytree(EXAMPLES / "custom_backend", pkg, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(pkg)], check=True, capture_output=True, timeout=300)
    out = run(pkg / "run.py", tmp_path, pythonpath=site)
    assert "found through its entry point: xbitc_numpy_backend:NumpyBackend" in out, out
    assert "compiled for backend 'numpy-dequant'" in out and "numpy-dequant.json" in out, out
    assert "executing backend: numpy-dequant; numpy linear calls in one forward: 3" in out, out  # 3 linears
    # the decoder met every part of the format: several depths, dropped (0-bit) columns, permutations
    depths = re.search(r"depths \[([\d, ]+)\], (\d+) with permuted columns", out)
    assert depths and "0" in depths.group(1).split(", ") and len(depths.group(1).split(",")) >= 3, out
    assert int(depths.group(2)) >= 1, out
    assert "decoded weights identical to xbitc's for all 3 packed tensors: True" in out, out
    peak = number(r"outputs max abs ([\d.]+)", out)
    assert number(r"max abs difference vs reference backend: ([\d.e+-]+)", out) <= 1e-4 * peak
    assert 0 < number(r"relative rms error vs float: ([\d.]+)", out) < 0.7


def _make_generate(art: Path, lib: Path, exe: Path) -> None:
    done = subprocess.run(["make", "-s", "-C", str(EXAMPLES / "embed_c"), f"ARTIFACT={art}", f"LIB={lib}",
                           f"BIN={exe}", str(exe)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_embed_c_generates_the_python_runtimes_tokens(tmp_path):
    """examples/embed_c's program, built by its Makefile against an exported random Llama, generates the tokens the
    Python runtime generates from the same artifact."""
    import torch

    from test_native import compiled
    from xbitc import runtime
    from xbitc.native.export import export_c_lib

    art = compiled("llama", tmp_path)
    lib = export_c_lib(art, tmp_path / "lib")
    exe = tmp_path / "generate"
    _make_generate(art, lib, exe)
    prompt = [5, 17, 42, 99, 3]
    done = subprocess.run([str(exe), str(lib / "model.bin"), "--threads", "2", "--tokens", "20", *map(str, prompt)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    want = runtime.load(art).generate_ids(torch.tensor([prompt]), 20)
    assert [int(t) for t in done.stdout.split()] == want


@pytest.mark.slow
def test_embed_c_on_smollm2_after_make_demo(tmp_path):
    """`make run` in examples/embed_c on the artifact `make demo` wrote: the C program's tokens are the Python
    runtime's, and the text is printed."""
    import torch

    from xbitc import runtime

    art = ROOT / "out" / "smollm2-135m.xbitc"
    if not art.exists():
        pytest.skip("run `make demo` first: it writes out/smollm2-135m.xbitc")
    done = subprocess.run(["make", "-s", "-C", str(EXAMPLES / "embed_c"), f"LIB={tmp_path / 'lib'}",
                           f"BIN={tmp_path / 'generate'}", "TOKENS=16", "run"], capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = [int(x) for x in re.search(r"prompt ids: ([\d ]+)", done.stdout).group(1).split()]
    got = [int(x) for x in re.search(r"generated: +([\d ]+)", done.stdout).group(1).split()]
    model = runtime.load(art)
    assert got == model.generate_ids(torch.tensor([ids]), 16, eos=model.tokenizer.eos_token_id)


def test_embed_c_cross_builds_for_aarch64_and_generates_the_same_tokens(tmp_path):
    """`make` builds examples/embed_c for AArch64 against a library exported with --target aarch64; under
    qemu-aarch64 it generates the Python runtime's tokens."""
    import torch

    from test_native import compiled
    from xbitc import runtime
    from xbitc.native.export import export_c_lib

    if not shutil.which("qemu-aarch64") or not shutil.which("aarch64-linux-gnu-gcc") or \
            not Path("/usr/aarch64-linux-gnu/lib/libc.a").exists():
        pytest.skip("needs qemu-aarch64 and aarch64-linux-gnu-gcc (`make test` installs them)")
    art = compiled("llama", tmp_path)
    lib = export_c_lib(art, tmp_path / "lib-arm", target="aarch64")
    exe = tmp_path / "generate-aarch64"
    done = subprocess.run(["make", "-s", "-C", str(EXAMPLES / "embed_c"), f"ARTIFACT={art}", f"ARM_LIB={lib}",
                           f"ARM_BIN={exe}", str(exe)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    prompt = [5, 17, 42, 99, 3]
    done = subprocess.run(["qemu-aarch64", "-cpu", "max", str(exe), str(lib / "model.bin"), "--threads", "2",
                           "--tokens", "12", *map(str, prompt)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [int(t) for t in done.stdout.split()] == runtime.load(art).generate_ids(torch.tensor([prompt]), 12)
