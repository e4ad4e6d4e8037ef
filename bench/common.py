"""Shared benchmark plumbing: machine description, markdown tables, appending results to BENCHMARKS.md."""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
BENCHMARKS = ROOT / "BENCHMARKS.md"


SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "asimd",
              "asimddp", "sve")  # the ones kernels choose paths by


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in SIMD_FLAGS if f in have]
    except OSError:
        pass
    cpu += f" (CPU flags: {' '.join(flags) or 'unknown'})"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}, torch {torch.__version__}"


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def append(title: str, body: str, command: str) -> None:
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = f"\n## {title}\n\n{stamp} on {machine()}\n\nCommand: `{command}`\n\n{body}\n"
    if not BENCHMARKS.exists():
        BENCHMARKS.write_text("# Benchmarks\n\nEvery benchmark under bench/ appends its table here with the machine and date.\n")
    with open(BENCHMARKS, "a") as f:
        f.write(text)


def require_shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        sys.exit(f"benchmark data {path} is missing: benchmarks read ../shared/data/ beside the checkout")
    return path


def run_cli_measured(args: list[str]) -> tuple[float, float, str]:
    """Run `xbitc ARGS` in a fresh process; return (wall seconds, peak RSS in GiB, stderr tail)."""
    # VmHWM, not ru_maxrss: Linux carries the high-water mark across execve, so ru_maxrss of a child spawned by
    # this (large) process starts at the parent's own resident size.
    code = (
        "import sys; from xbitc.cli import main; rc = main(sys.argv[1:]); "
        "hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')); "
        "print('PEAK_RSS_KB', hwm, file=sys.stderr); sys.exit(rc)"
    )
    t0 = dt.datetime.now()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = (dt.datetime.now() - t0).total_seconds()
    if r.returncode != 0:
        raise RuntimeError(f"xbitc {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    peak = next((int(l.split()[1]) for l in r.stderr.splitlines() if l.startswith("PEAK_RSS_KB")), 0) / 2**20
    return seconds, peak, r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""

