"""`xbitc export --sources` and the Apple targets: the library as sources, kernel objects and a Makefile for a
toolchain this host does not run (Xcode's clang, the Android NDK).

What runs here: the Makefile builds an AArch64 library with the GNU cross compiler (standing in for the NDK's
clang) that generates under qemu what the host computes. For Apple, what can be checked without an SDK: the objects
are Mach-O arm64 for the right platform, define every level's entry points and reference nothing outside; the
sources' Apple branch (sysctlbyname level choice) compiles with the AArch64 cross compiler through the Makefile's
rule. Not checked here: linking with Apple's ld, or running on Apple hardware."""
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from xbitc import runtime
from xbitc.backends.cpu.targets import AARCH64, IOS_ARM64, MACOS_ARM64
from xbitc.cli import main as cli
from xbitc.native import build
from xbitc.native.export import export_c_lib

from test_native import DRIVER, close, compiled, python_rows, read_tensors, run_driver, write_tensor

CROSS_CC = shutil.which(AARCH64.cross_prefix + "gcc")
QEMU = shutil.which("qemu-aarch64")
needs_cross = pytest.mark.skipif(
    not CROSS_CC or not QEMU or not Path("/usr/aarch64-linux-gnu/lib/libc.a").exists(),
    reason="needs qemu-aarch64 and aarch64-linux-gnu-gcc (Debian: qemu-user gcc-aarch64-linux-gnu "
           "libc6-dev-arm64-cross; `make test` installs them)")

MH_MAGIC_64, CPU_TYPE_ARM64 = 0xFEEDFACF, 0x0100000C
LC_SYMTAB, LC_BUILD_VERSION = 0x2, 0x32
PLATFORMS = {1: "macos", 2: "ios"}
N_EXT, N_TYPE, N_UNDF, N_SECT = 0x01, 0x0E, 0x0, 0xE


def mach_o(data: bytes) -> tuple[str, set[str], set[str]]:
    """(platform, defined external symbols, undefined symbols) of a 64-bit little-endian Mach-O object."""
    magic, cputype, _, _, ncmds, _, _, _ = struct.unpack_from("<IiiIIIII", data, 0)
    assert magic == MH_MAGIC_64 and cputype == CPU_TYPE_ARM64, (hex(magic), hex(cputype))
    pos, platform, defined, undefined = 32, None, set(), set()
    for _ in range(ncmds):
        cmd, size = struct.unpack_from("<II", data, pos)
        if cmd == LC_BUILD_VERSION:
            platform = PLATFORMS.get(struct.unpack_from("<I", data, pos + 8)[0])
        elif cmd == LC_SYMTAB:
            symoff, nsyms, stroff, _ = struct.unpack_from("<IIII", data, pos + 8)
            for i in range(nsyms):
                strx, ntype, _, _, _ = struct.unpack_from("<IBBHQ", data, symoff + 16 * i)
                name = data[stroff + strx:data.index(b"\0", stroff + strx)].decode()
                if ntype & N_TYPE == N_UNDF and ntype & N_EXT:
                    undefined.add(name)
                elif ntype & N_TYPE == N_SECT and ntype & N_EXT:
                    defined.add(name)
        pos += size
    return platform, defined, undefined


@pytest.mark.parametrize("family", [MACOS_ARM64, IOS_ARM64], ids=lambda f: f.name)
def test_apple_export_ships_mach_o_objects_sources_and_a_makefile(family, tmp_path, capsys):
    art = compiled("llama", tmp_path)
    out = tmp_path / "lib"
    assert cli(["export", str(art), "--c-lib", str(out), "--target", family.name, "--act", "q8"]) == 0
    assert "kernel objects and a Makefile" in capsys.readouterr().out
    assert not (out / "libxbitc.a").exists()
    assert {p.name for p in out.iterdir()} >= {"model.bin", "model.h", "xbitc.h", "README.md", "Makefile", "src",
                                               "kernels"}
    assert f'XBITC_MODEL_TARGET "{family.name}"' in (out / "model.h").read_text()
    assert {p.name for p in (out / "src").glob("*.c")} == {p.name for p in build.SOURCES} | {"xbitc_rows_portable.c"}
    want = {f"_xbitc_rows_{role}_{lv.suffix}" for lv in family.levels for role in ("gemv", "gemm", "q8")}
    found = set()
    for obj in sorted((out / "kernels").glob("*.o")):
        platform, defined, undefined = mach_o(obj.read_bytes())
        assert platform == family.name.split("-")[0], obj.name
        assert not undefined, f"{obj.name} references {undefined}: kernels must be self-contained"
        found |= defined
    assert found == want
    assert f"-D{family.c_define}" in (out / "Makefile").read_text()


@needs_cross
def test_apple_runtime_branch_compiles_through_the_makefile(tmp_path):
    """The sources' Apple branch picks a level with sysctlbyname: compiled (not run) by the Makefile's own rule."""
    art = compiled("llama", tmp_path)
    out = export_c_lib(art, tmp_path / "lib", target="macos-arm64")
    proc = subprocess.run(["make", "-C", str(out), "src/packed.o", f"CC={CROSS_CC}", "CFLAGS=-O1 -Werror"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nm = subprocess.run([AARCH64.cross_prefix + "nm", "-u", str(out / "src" / "packed.o")], capture_output=True,
                        text=True, check=True).stdout
    assert "sysctlbyname" in nm and "xbitc_rows_q8_i8mm" in nm and "getauxval" not in nm


@needs_cross
def test_sources_export_builds_with_its_makefile_and_generates_under_qemu(tmp_path, monkeypatch):
    """What an Android NDK user does (with the GNU cross compiler standing in for the NDK's clang): `--sources`,
    `make CC=... AR=...`, link, run; greedy tokens and logits as the Python runtime on the host."""
    art = compiled("llama", tmp_path)
    out = export_c_lib(art, tmp_path / "lib", target="aarch64", act="q8", sources=True)
    assert not (out / "libxbitc.a").exists()
    proc = subprocess.run(["make", "-C", str(out), "-j2", f"CC={CROSS_CC}",
                           f"AR={shutil.which(AARCH64.cross_prefix + 'ar')}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exe = build.link_program([DRIVER], out / "libxbitc.a", tmp_path / "driver", family=AARCH64)
    qemu = tmp_path / "run"
    qemu.write_text(f"#!/bin/sh\nexec {QEMU} -cpu max {exe} \"$@\"\n")
    qemu.chmod(0o755)
    assert run_driver(qemu, "open", out / "model.bin").stdout.strip() == "i8mm"
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    run_driver(qemu, "lm", out / "model.bin", write_tensor(tmp_path / "p", prompt.numpy()), 6, 1, tmp_path / "o")
    logits, tokens = read_tensors(tmp_path / "o")
    monkeypatch.setenv("XBITC_X86_ACT", "q8")  # the host runs the same activation strategy
    rows = python_rows(runtime.load(art), prompt, tokens)
    close(logits, rows)
    assert tokens.tolist() == [int(r.argmax()) for r in rows]


@pytest.mark.parametrize("system,machine,family,backend", [
    ("Darwin", "arm64", MACOS_ARM64, "arm"), ("Linux", "aarch64", AARCH64, "arm"), ("iOS", "arm64", IOS_ARM64, "arm"),
    ("Darwin", "x86_64", None, "x86")])
def test_the_host_family_is_isa_and_system_while_jit_kernels_need_only_the_isa(system, machine, family, backend,
                                                                               monkeypatch):
    """A Mac exports Mach-O by default but runs the arm backend's JIT kernels like any AArch64 host."""
    import platform

    from xbitc.backends.cpu import targets

    monkeypatch.setattr(platform, "system", lambda: system)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert targets.host_family() is family
    assert runtime.host_backend("reference") == backend


def test_sources_on_a_host_outside_the_target_table_asks_for_a_target(tmp_path, monkeypatch, capsys):
    """An artifact compiled for no CPU family (reference) exported with --sources on a host that is none of the
    families: the one line names --target and the choices, exit 2, no folder."""
    from xbitc.native import export as export_mod

    art = compiled("llama", tmp_path)
    monkeypatch.setattr(export_mod, "_artifact_family", lambda backend: None)
    monkeypatch.setattr("xbitc.backends.cpu.targets.host_family", lambda: None)
    out = tmp_path / "lib"
    assert cli(["export", str(art), "--c-lib", str(out), "--sources"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--target" in err[0] and "aarch64" in err[0], err
    assert not out.exists()
