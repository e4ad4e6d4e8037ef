"""Building the C runtime: the portable sources shipped in xbitc/native (include/, src/) and the packed product's C
kernels (rendered by backends/cstyle) compiled with the system C compiler, plus the row-lane kernel objects the LLVM
renderer makes for the CPU family (every level of backends/cpu/targets.py; the runtime picks one by the CPU's
features), archived into one static library.

Kernel objects come from xbitc's own generator (through its verified disk cache), never from the artifact."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).parent
INCLUDE = HERE / "include"
SOURCES = sorted((HERE / "src").glob("*.c"))
CFLAGS = ["-std=c11", "-O3", "-fPIC", "-Wall", "-Wextra", "-pedantic", "-fno-math-errno"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g", "-O1", "-fno-omit-frame-pointer"]


class BuildError(RuntimeError):
    """The C compiler or archiver failed; the message holds its output."""


def toolchain(family=None) -> tuple[str, str]:
    """(C compiler, archiver) for `family` (a backends/cpu/targets.py entry; None: the host). The host's come from
    $CC / $AR or the PATH; another family's from its GNU cross toolchain ($XBITC_CROSS_PREFIX overrides the
    prefix)."""
    from xbitc.backends.cpu.targets import host_family

    host = host_family()
    if family is None or (host is not None and family.name == host.name):
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if not cc:
            raise BuildError("no C compiler found: install gcc or clang (Debian: apt install gcc), or set CC")
        return cc, os.environ.get("AR") or shutil.which("ar") or "ar"
    prefix = os.environ.get("XBITC_CROSS_PREFIX") or family.cross_prefix
    cc = shutil.which(prefix + "gcc")
    if not cc:
        raise BuildError(f"no {prefix}gcc to build for {family.name}: install the cross compiler (Debian: apt install "
                         f"gcc-{prefix.rstrip('-').replace('_', '-')}, "
                         f"libc6-dev-{'arm64' if family.name == 'aarch64' else 'amd64'}-cross; "
                         "`make test` does) or set XBITC_CROSS_PREFIX")
    return cc, shutil.which(prefix + "ar") or "ar"


def compiler() -> str:
    return toolchain()[0]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise BuildError(f"{' '.join(cmd[:3])} ... failed:\n{proc.stdout}{proc.stderr}")


def kernel_objects(folder: Path, family=None) -> tuple[list[Path], list[str]]:
    """Write `family`'s (default: the host's) row-lane objects, f32 and q8 for every level, into folder; (paths,
    -D flags that enable them). None for a host outside the table: the C renderer's kernels run there."""
    from xbitc.backends.cpu.targets import host_family
    from xbitc.backends.llvm.render import LLVMRenderer
    from xbitc.backends.product import PackedProduct

    family = family or host_family()
    if family is None:
        return [], []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for level in family.levels:
        renderer = LLVMRenderer(family.triple, level.cpu, level.features)
        for act in ("f32", "q8"):
            path = folder / f"xbitc_rows_{act}_{level.suffix}.o"
            path.write_bytes(renderer.render(PackedProduct(act), level.suffix).payload)
            paths.append(path)
    return paths, [f"-D{family.c_define}"]


def portable_kernels(folder: Path) -> Path:
    """The C renderer's kernels (every host runs them; the generated objects replace them where they fit)."""
    from xbitc.backends.cstyle import CRenderer
    from xbitc.backends.product import PackedProduct

    path = folder / "xbitc_rows_portable.c"
    path.write_text(CRenderer().render(PackedProduct("f32"), "portable").payload)
    return path


def build_library(out: Path, sanitize: bool = False, kernels: bool = True, family=None) -> Path:
    """Compile the runtime (and the kernels) for `family` (default: the host) into out/libxbitc.a; its path."""
    out = Path(out)
    objdir = out / "obj"
    objdir.mkdir(parents=True, exist_ok=True)
    cc, ar = toolchain(family)
    objects, defines = kernel_objects(objdir, family) if kernels else ([], [])
    flags = CFLAGS + (SANITIZE if sanitize else []) + defines + [f"-I{INCLUDE}"]
    for src in [*SOURCES, portable_kernels(objdir)]:
        obj = objdir / (src.stem + ".o")
        _run([cc, *flags, "-c", str(src), "-o", str(obj)])
        objects.append(obj)
    lib = out / "libxbitc.a"
    lib.unlink(missing_ok=True)
    _run([ar, "rcs", str(lib), *map(str, objects)])
    shutil.rmtree(objdir)
    return lib


def link_program(sources: list[Path], lib: Path, exe: Path, sanitize: bool = False, family=None) -> Path:
    """Build a C program against the library (what an integrator's build does); for another family, linked
    statically so that an emulator runs it without the target's shared libraries."""
    flags = ["-std=c11", "-O2", "-Wall", "-Wextra"] + (SANITIZE if sanitize else [])
    cc, _ = toolchain(family)
    static = ["-static"] if cc != toolchain()[0] else []
    _run([cc, *flags, *static, f"-I{INCLUDE}", *map(str, sources), str(lib), "-lm", "-lpthread", "-o", str(exe)])
    return exe
