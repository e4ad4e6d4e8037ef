"""Threads of the CPU backends: how many, the pools that run row ranges on other cores, and the ranges themselves.

The packed linears split a matrix's rows into ranges (`row_ranges`) run concurrently (ctypes drops the GIL); the
calling thread runs the first. A range is at least `MIN_TASK_MACS` multiply-adds on the Python pool (waking a worker
costs ~25-80 us, more than a SmolLM2-sized gemv takes), `MIN_SPIN_TASK_MACS` on the native spinning pool
(llvm/pool.py, ~10 us), which is used where nothing else spins (`pool_kind`). A forked child builds its own pools.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ..llvm.pool import SpinPool
from . import env_choice, log_once

MIN_TASK_MACS = 1 << 20  # multiply-adds per thread task at least (~50 us of gemv work) on the Python pool
MIN_SPIN_TASK_MACS = 1 << 18  # the same on the spinning pool (~10 us to hand a range to a spinning worker)
ROW_ALIGN = 16  # row ranges start on multiples of this (gemv rows go in pairs, the column kernel's in 16s)
POOLS = ("auto", "python", "spin")

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_spin: SpinPool | None = None


def _default_threads() -> int:
    env = os.environ.get("XBITC_NUM_THREADS", "")
    if env.strip().isdigit():
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_num_threads = _default_threads()


def _forget_pools_after_fork() -> None:
    """A forked child inherits the pool objects but not their threads: it builds its own on first use."""
    global _pool, _spin, _pool_lock
    _pool, _spin, _pool_lock = None, None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


def num_threads() -> int:
    """Threads the packed linears use (the caller's thread included)."""
    return _num_threads


def set_num_threads(n: int) -> None:
    """Resize the thread pools (default: the cores this process may run on, or $XBITC_NUM_THREADS)."""
    global _num_threads, _pool, _spin
    n = max(1, int(n))
    with _pool_lock:
        if n != _num_threads:
            if _pool is not None:
                _pool.shutdown(wait=True)
                _pool = None
            if _spin:  # (False: it could not be built; try again at the new size)
                _spin.close()
            _spin = None
        _num_threads = n


def get_pool() -> ThreadPoolExecutor:
    """The Python pool of `num_threads()` workers."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_num_threads, thread_name_prefix="xbitc-cpu")
        return _pool


def pool_kind() -> str:
    """How row ranges reach other cores: "python" (a ThreadPoolExecutor, ~50 us to wake a worker on this VM, so
    only ranges of >= MIN_TASK_MACS are split off) or "spin" (llvm/pool.py's native workers poll for work and start
    a range in ~10 us, so ranges of >= MIN_SPIN_TASK_MACS are; they spin a few ms after each call, then sleep between
    polls). `$XBITC_X86_POOL` picks; "auto" (default) takes "spin" unless PyTorch's own OpenMP threads busy-wait
    beside it (torch uses more than one thread and OMP_WAIT_POLICY is not PASSIVE): two kinds of spinning workers
    oversubscribe the cores (SmolLM2 decode at two threads: 12.6 ms a step with the Python pool, 120 ms with
    spinning workers beside active OpenMP; with OMP_WAIT_POLICY=PASSIVE, which the `xbitc` command sets, 16.1-17.1
    ms with the Python pool and 12.7-12.9 ms spinning). Read when a model is lowered."""
    kind = env_choice("XBITC_X86_POOL", POOLS)
    if kind != "auto":
        return kind
    passive = os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"
    return "spin" if passive or torch.get_num_threads() == 1 else "python"


def get_spin() -> SpinPool | None:
    """The spinning pool of `num_threads() - 1` workers, or None where it cannot be built (then the Python pool)."""
    global _spin
    with _pool_lock:
        if _spin is None:
            try:
                _spin = SpinPool(_num_threads - 1)
            except Exception as err:  # noqa: BLE001 - any LLVM / threading failure: fall back, once
                log_once(("spin",), logging.WARNING, f"threads: no spinning pool ({type(err).__name__}: {err}); "
                         "row ranges go to a Python thread pool")
                _spin = False
        return _spin or None


def row_ranges(rows: int, macs: int, threads: int | None = None, min_macs: int | None = None) -> list[tuple[int, int]]:
    """Split [0, rows) into at most `threads` ranges of >= min_macs (default MIN_TASK_MACS) work each, starts
    aligned to ROW_ALIGN."""
    threads = _num_threads if threads is None else threads
    n = min(threads, macs // (MIN_TASK_MACS if min_macs is None else min_macs), -(-rows // ROW_ALIGN))
    if n <= 1:
        return [(0, rows)]
    per = -(-(-(-rows // n)) // ROW_ALIGN) * ROW_ALIGN
    return [(b, min(rows, b + per)) for b in range(0, rows, per)]
