"""The C library built for AArch64 (`xbitc export --target aarch64`) runs under qemu-aarch64 and computes what the
Python runtime computes on the host, on every level of the AArch64 target table (the emulated CPU decides which one
the library picks: Cortex-A53 NEON, Cortex-A76 dot products, `max` int8 matrix multiply).

Tolerance as tests/test_native.py: the same float32 network, sums in other orders."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from xbitc import runtime
from xbitc.backends.cpu.targets import AARCH64
from xbitc.native import build
from xbitc.native.export import export_c_lib

from test_equivalence import VOCAB
from test_native import DRIVER, close, compiled, python_rows, read_tensors, run_driver, write_tensor

QEMU = shutil.which("qemu-aarch64")
pytestmark = pytest.mark.skipif(
    not QEMU or not shutil.which(AARCH64.cross_prefix + "gcc")
    or not Path("/usr/aarch64-linux-gnu/lib/libc.a").exists(),
    reason="needs qemu-aarch64 and aarch64-linux-gnu-gcc (Debian: qemu-user gcc-aarch64-linux-gnu "
           "libc6-dev-arm64-cross; `make test` installs them)")


@pytest.mark.parametrize("act", ["f32", "q8"])
def test_aarch64_library_generates_what_the_host_computes(act, tmp_path, monkeypatch):
    art = compiled("llama", tmp_path)
    lib = export_c_lib(art, tmp_path / f"arm-{act}", act=act, target="aarch64")
    exe = build.link_program([DRIVER], lib / "libxbitc.a", tmp_path / "driver", family=AARCH64)
    assert exe.read_bytes()[:4] == b"\x7fELF" and exe.read_bytes()[18] == 183  # e_machine EM_AARCH64
    monkeypatch.setenv("XBITC_X86_ACT", act)  # the host runs the same activation strategy
    model = runtime.load(art)  # the host's CPU backend, which reads XBITC_X86_ACT too
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    pfile = write_tensor(tmp_path / "prompt", prompt.numpy())
    outputs = []
    for cpu, level in (("cortex-a53", "neon"), ("cortex-a76", "dotprod"), ("max", "i8mm")):
        qemu = tmp_path / f"run-{cpu}"
        qemu.write_text(f"#!/bin/sh\nexec {QEMU} -cpu {cpu} {exe} \"$@\"\n")
        qemu.chmod(0o755)
        assert run_driver(qemu, "open", lib / "model.bin").stdout.strip() == level
        run_driver(qemu, "lm", lib / "model.bin", pfile, 12, 2, tmp_path / f"{cpu}.out")
        logits, tokens = read_tensors(tmp_path / f"{cpu}.out")
        close(logits, python_rows(model, prompt, tokens))
        assert tokens.tolist() == [int(r.argmax()) for r in python_rows(model, prompt, tokens)]
        outputs.append(logits)
    assert all(np.isfinite(o).all() for o in outputs)


def test_backend_arm_compiles_an_artifact_whose_export_targets_aarch64(tmp_path):
    """`--backend arm`: the artifact ships AArch64 kernel objects with the header (counted in its size), runs on
    this host through the host's backend, and `xbitc export` builds its library for AArch64 without being told."""
    from test_equivalence import build as build_hf
    from xbitc import frontend
    from xbitc.driver import CompileOptions, compile_model

    art = tmp_path / "arm.xbitc"
    compile_model(frontend.wrap_hf(build_hf("llama")), art,
                  CompileOptions(bits=3, group=32, backend="arm", log=lambda s: None, progress=False))
    model = runtime.load(art)
    rows = model.manifest.notes["kernels"]["rows"]
    assert {(r["target"], r["act"]) for r in rows} == {(lv.suffix, a) for lv in AARCH64.levels for a in ("f32", "q8")}
    for r in rows:
        obj = (art / r["file"]).read_bytes()
        assert obj[:4] == b"\x7fELF" and obj[18] == 183  # EM_AARCH64
    assert model.backend_name in ("x86", "reference")  # this host is not AArch64
    lib = export_c_lib(art, tmp_path / "lib")
    exe = build.link_program([DRIVER], lib / "libxbitc.a", tmp_path / "driver", family=AARCH64)
    prompt = torch.tensor([[4, 8, 15, 16]])
    qemu = tmp_path / "run"
    qemu.write_text(f"#!/bin/sh\nexec {QEMU} -cpu max {exe} \"$@\"\n")
    qemu.chmod(0o755)
    run_driver(qemu, "lm", lib / "model.bin", write_tensor(tmp_path / "p", prompt.numpy()), 6, 1, tmp_path / "o")
    logits, tokens = read_tensors(tmp_path / "o")
    close(logits, python_rows(model, prompt, tokens))


def _cases_file(path, cases) -> None:
    """tests/native/kernels.c's input: every case's header, records, buffer, permutation and x."""
    parts = [np.int64(len(cases)).tobytes()]
    for act, rows, inp, table, buf, perm, x in cases:
        parts.append(np.array([act, rows, inp, len(table), x.shape[0], perm is not None, buf.nbytes],
                              dtype="<i8").tobytes())
        parts.append(table.astype("<i8").tobytes())
        parts.append(buf.tobytes() + b"\0" * (-buf.nbytes % 8))
        if perm is not None:
            raw = perm.astype("<i4").tobytes()
            parts.append(raw + b"\0" * (-len(raw) % 8))
        parts.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    path.write_bytes(b"".join(parts))


def test_every_depth_and_level_matches_the_oracle_under_qemu(tmp_path):
    """The AArch64 objects of every level (NEON, dotprod, i8mm) on random matrices of every depth 1..8 and the
    one-byte kind, ragged rows and columns, with and without permutations, one token and several, f32 and q8
    activations, against the numpy oracles (many cases per qemu launch). q8 with several tokens runs them in
    groups (i8mm: usmmla on token pairs) and the rest one at a time: every depth leads a q8 case with batch 1, 2,
    3, 5, 8 or 9 (each depth at least one odd batch of 3 or more), on up to five row blocks (runs of two and one)."""
    from xbitc.backends.llvm.rowlane import pack, reference_rows, reference_rows_q8

    objects, _ = build.kernel_objects(tmp_path / "obj", AARCH64)
    (tmp_path / "kernel_levels.h").write_text(
        "#define LEVELS(X) " + " ".join(f"X({lv.suffix})" for lv in AARCH64.levels) + "\n")
    exe = tmp_path / "kernels"
    cc, _ = build.toolchain(AARCH64)
    subprocess.run([cc, "-std=c11", "-O2", "-static", f"-I{tmp_path}", f"-I{build.HERE / 'src'}",
                    str(DRIVER.parent / "kernels.c"), *map(str, objects), "-lm", "-o", str(exe)], check=True)
    rng = np.random.default_rng(0)
    cases, wants = [], []
    for i in range(48):
        act = i % 2
        rows = int(rng.integers(1, 72))
        records, off = [], 0
        for r in range(int(rng.integers(1, 4))):
            bits, n = int(rng.integers(1, 9)) if r else 1 + (i // 2) % 8, int(rng.integers(1, 80))
            records.append((rng.integers(0, 1 << bits, (rows, n), dtype=np.uint8),
                            rng.uniform(0.01, 0.1, rows).astype(np.float16),
                            rng.integers(0, 1 << bits, rows, dtype=np.uint8), off, bits))
            off += n
        buf, table = pack(records, rows, "q8" if act else "f32")
        table = table.copy()
        table[:, 2:5] -= buf.ctypes.data
        perm = rng.permutation(off).astype(np.int32) if i % 3 else None
        x = rng.standard_normal(((1, 2, 3, 5, 8, 9)[(i // 2) % 6], off)).astype(np.float32)
        xp = x[:, perm] if perm is not None else x
        oracle = reference_rows_q8 if act else reference_rows
        wants.append(oracle([r[:4] for r in records], xp, rows))
        cases.append((act, rows, off, table, buf, perm, x))
    _cases_file(tmp_path / "cases", cases)
    for lv in AARCH64.levels:
        out = tmp_path / f"{lv.suffix}.out"
        proc = subprocess.run([QEMU, "-cpu", "max", str(exe), lv.suffix, str(tmp_path / "cases"), str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        got, pos = np.frombuffer(out.read_bytes(), dtype="<f4"), 0
        for want in wants:
            y = got[pos:pos + want.size].reshape(want.shape)
            pos += want.size
            assert np.abs(y - want).max() <= 1e-4 * (np.abs(want).max() + 1e-6), (lv.suffix, np.abs(y - want).max())


@pytest.mark.slow
def test_smollm2_at_3_bpw_on_aarch64_generates_what_the_host_computes(tmp_path):
    """The real SmolLM2-135M, learned allocation at 3 bits per weight, through the AArch64 library under qemu:
    prefill and 8 decode steps, logits and tokens against the Python runtime on the host."""
    from xbitc import frontend, models
    from xbitc.driver import CompileOptions, compile_model

    art = tmp_path / "smollm2-3.xbitc"
    compile_model(frontend.load(str(models.smollm2_gguf())), art,
                  CompileOptions(bpw=3.0, backend="arm", log=lambda s: None, progress=False))
    lib = export_c_lib(art, tmp_path / "lib")
    exe = build.link_program([DRIVER], lib / "libxbitc.a", tmp_path / "driver", family=AARCH64)
    model = runtime.load(art)
    prompt = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    qemu = tmp_path / "run"
    qemu.write_text(f"#!/bin/sh\nexec {QEMU} -cpu max {exe} \"$@\"\n")
    qemu.chmod(0o755)
    run_driver(qemu, "lm", lib / "model.bin", write_tensor(tmp_path / "p", prompt.numpy()), 8, 2, tmp_path / "o")
    logits, tokens = read_tensors(tmp_path / "o")
    rows = python_rows(model, prompt, tokens)
    close(logits, rows)
    assert tokens.tolist() == [int(r.argmax()) for r in rows]


def test_cpu_pins_one_level(tmp_path):
    """--cpu cortex-a55: the library carries that CPU's kernels only and runs them without asking the CPU; an
    unknown CPU is refused with the names that work."""
    from xbitc.native.modelbin import ExportError

    art = compiled("llama", tmp_path)
    with pytest.raises(ExportError, match="--cpu cortex-a999: not a CPU of the aarch64 family xbitc knows; one of: "):
        export_c_lib(art, tmp_path / "bad", target="aarch64", cpu="cortex-a999")
    lib = export_c_lib(art, tmp_path / "a55", target="aarch64", cpu="cortex-a55")
    exe = build.link_program([DRIVER], lib / "libxbitc.a", tmp_path / "driver", family=AARCH64)
    qemu = tmp_path / "run"
    qemu.write_text(f"#!/bin/sh\nexec {QEMU} -cpu cortex-a76 {exe} \"$@\"\n")  # qemu 7.2 has no A55; the A76 has its features
    qemu.chmod(0o755)
    assert run_driver(qemu, "open", lib / "model.bin").stdout.strip() == "pinned"
    prompt = torch.tensor([[9, 2, 6]])
    run_driver(qemu, "lm", lib / "model.bin", write_tensor(tmp_path / "p", prompt.numpy()), 5, 1, tmp_path / "o")
    logits, tokens = read_tensors(tmp_path / "o")
    close(logits, python_rows(runtime.load(art), prompt, tokens))
