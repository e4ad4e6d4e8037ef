"""The table of CPU targets: for each ISA family, the triple its artifact objects are emitted for, the
`platform.machine()` names of hosts that run it, and the micro-architecture levels an artifact carries one object
each for (LLVM cpu and features; the suffix goes on every symbol so that all levels link into one binary). A new
family or level is a new entry here, not new code: emit.py writes what the table lists, a backend runs where
`runs_here` says."""
from __future__ import annotations

import platform
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Level:
    """One micro-architecture level: `suffix` of its symbols and file names, LLVM `cpu` and `features`, and a
    `summary` for the C header."""

    suffix: str
    cpu: str
    features: str
    summary: str

    def runs_on(self, features: str) -> bool:
        """Whether a CPU with LLVM feature string `features` (e.g. host_target().features) has all of this level's."""
        have = set(features.split(","))
        return all(f in have for f in self.features.split(",") if f)


@dataclass(frozen=True)
class CpuFamily:
    """One ISA family: `triple` of its emitted objects (described as `object_format`), the `machines` (lowercase
    platform.machine() values) of hosts that run it, its `levels`, and `pick_hint`: how a C program chooses a level
    at run time (a sentence of the header)."""

    name: str
    triple: str
    object_format: str
    machines: tuple[str, ...]
    levels: tuple[Level, ...]
    pick_hint: str
    c_define: str = ""  # what the C library is compiled with to link this family's objects (xbitc/native)
    cross_prefix: str = ""  # of the GNU cross toolchain that builds for it on another host (Debian's names)
    cpus: tuple[str, ...] = ()  # LLVM CPU names a build may be pinned to (--cpu), each implying its features
    systems: tuple[str, ...] = ("Linux",)  # platform.system() of hosts whose C library it is (arm64: macOS, Linux)
    builds_here: bool = True  # False: no toolchain for it exists on Linux hosts; exports ship sources and objects

    def pinned(self, cpu: str) -> "CpuFamily":
        """This family with one level, `cpu` (LLVM derives its features): a library that runs those kernels on
        every CPU, without asking the CPU what it supports."""
        if cpu not in self.cpus:
            raise KeyError(f"--cpu {cpu}: not a CPU of the {self.name} family xbitc knows; one of: "
                           f"{', '.join(self.cpus)}")
        return replace(self, levels=(Level("pinned", cpu, "", f"pinned to {cpu}"),), c_define="XBITC_KERNELS_PINNED")

    def runs_here(self) -> bool:
        """Whether this host's ISA runs the family's code (JIT-compiled kernels: the operating system is moot)."""
        return platform.machine().lower() in self.machines

    def is_host(self) -> bool:
        """Whether this host's C library is the family's (ISA and operating system): the default export target."""
        return self.runs_here() and platform.system() in self.systems


_X86_V3 = "+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+lzcnt,+movbe"
_X86_V4 = _X86_V3 + ",+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512cd"

X86_64 = CpuFamily(
    name="x86-64",
    triple="x86_64-unknown-linux-gnu",
    object_format="ELF x86-64",
    machines=("x86_64", "amd64", "x64"),
    levels=(
        Level("x86_64", "x86-64", "", "baseline (SSE2)"),
        Level("avx2", "x86-64-v3", _X86_V3, "x86-64-v3 (AVX2, FMA, F16C)"),
        Level("avx512", "x86-64-v4", _X86_V4, "x86-64-v4 (AVX-512 F/BW/VL/DQ/CD)"),
    ),
    pick_hint='Pick one at run time, e.g. with __builtin_cpu_supports("avx512f") / ("avx2") && ("fma").',
    c_define="XBITC_KERNELS_X86_64",
    cross_prefix="x86_64-linux-gnu-",
    cpus=("x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4", "haswell", "skylake", "skylake-avx512", "icelake-server",
          "sapphirerapids", "znver2", "znver3", "znver4"),
)

# The C library's objects for AArch64 Linux (and Android, the same ELF objects); tests run them under qemu-aarch64.
# The row-lane generator emits generic vector IR (LLVM selects NEON); with int8 activations the dotprod level's
# integer dot products are sdot and the i8mm level's usdot (codegen.DotU8S8); the i8mm level's prefill multiplies
# token pairs with usmmla (rowlane.uses_usmmla).
AARCH64 = CpuFamily(
    name="aarch64",
    triple="aarch64-unknown-linux-gnu",
    object_format="ELF AArch64",
    machines=("aarch64", "arm64"),
    levels=(
        Level("neon", "generic", "+neon", "Armv8-A with NEON (every AArch64 core)"),
        # generic CPU + features: a named core (neoverse-n2) would also turn on SVE, which i8mm CPUs need not have
        Level("dotprod", "generic", "+neon,+dotprod", "Armv8.2-A with dot products (Cortex-A76, Neoverse N1)"),
        Level("i8mm", "generic", "+neon,+dotprod,+i8mm", "Armv8.6-A with int8 matrix multiply (Neoverse N2, Apple M2)"),
    ),
    pick_hint="Pick one at run time from getauxval(AT_HWCAP) & HWCAP_ASIMDDP and getauxval(AT_HWCAP2) & HWCAP2_I8MM.",
    c_define="XBITC_KERNELS_AARCH64",
    cross_prefix="aarch64-linux-gnu-",
    cpus=("cortex-a53", "cortex-a55", "cortex-a72", "cortex-a76", "cortex-a78", "cortex-x1", "neoverse-n1",
          "neoverse-n2", "neoverse-v1", "apple-m1"),
)

# Apple silicon: the AArch64 levels as Mach-O objects (Apple's C symbol prefix "_" comes with the triple). M1 has dot
# products, M2 and later int8 matrix multiply; the runtime asks sysctlbyname("hw.optional.arm.FEAT_DotProd" /
# "FEAT_I8MM"). No Apple linker or SDK exists on Linux, so an export ships the library's sources, these objects and a
# Makefile that Xcode's clang runs; tests check the objects (format, platform, symbols) and compile the sources' Apple
# branch with the AArch64 cross compiler.
MACOS_ARM64 = replace(
    AARCH64,
    name="macos-arm64",
    triple="arm64-apple-macosx11.0.0",
    object_format="Mach-O arm64 (macOS 11+)",
    systems=("Darwin",),
    pick_hint='Pick one at run time with sysctlbyname("hw.optional.arm.FEAT_DotProd") / ("hw.optional.arm.FEAT_I8MM").',
    c_define="XBITC_KERNELS_APPLE_ARM64",
    cross_prefix="",
    cpus=("apple-m1", "apple-m2", "apple-m3", "apple-m4"),
    builds_here=False,
)
# iOS: the same code; the objects' platform load command says iOS, which Apple's linker requires of an iOS binary.
IOS_ARM64 = replace(MACOS_ARM64, name="ios-arm64", triple="arm64-apple-ios15.0.0", object_format="Mach-O arm64 (iOS 15+)",
                    systems=("iOS",), cpus=("apple-a14", "apple-a15", "apple-a16", "apple-a17", "apple-m1"))

# Only families whose objects are tested belong here.
FAMILIES: tuple[CpuFamily, ...] = (X86_64, AARCH64, MACOS_ARM64, IOS_ARM64)


def family(name: str) -> CpuFamily:
    """The table's entry called `name`."""
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(f"no CPU target family {name!r}; the table has {', '.join(f.name for f in FAMILIES)}")


def host_family() -> CpuFamily | None:
    """The family this host is (ISA and operating system), or None."""
    return next((fam for fam in FAMILIES if fam.is_host()), None)
