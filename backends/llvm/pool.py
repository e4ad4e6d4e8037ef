"""A spinning worker pool in native code: hand row ranges of one kernel call to other cores in ~10 us, not ~50.

Why. A Python thread pool wakes a sleeping worker through a futex; on this VM that costs 50-80 us before the
worker's kernel starts (measured: a 2-thread 1-bit 4096x14336 gemv took 380 us although its two halves ran 245
and 300 us), as much as a whole SmolLM2-sized gemv. llama.cpp and OpenMP runtimes keep workers spinning for the
same reason. Here each worker is a Python thread that enters `xbitc_pool_worker` once through ctypes (the GIL is
released for the worker's whole life) and then polls its slot:

    slot (int64[16], one 128-byte line pair per worker so workers never share a cache line):
        [0] seq   job number, written last by `xbitc_pool_post` (release)
        [1] done  the last job number the worker finished (release)
        [2] fn    address of a kernel function taking up to 11 integer / pointer arguments
        [3..13]   the arguments

    void    xbitc_pool_worker(int64_t* slot, const int64_t* quit, int64_t spin)  # until *quit != 0
    int64_t xbitc_pool_post(int64_t* slot, int64_t fn, int64_t a0, ..., int64_t a10)  # -> the job's seq
    void    xbitc_pool_wait(const int64_t* slot, int64_t seq)  # spins until the worker finished job seq

A worker spins (x86 `pause`) for `spin` polls after its last job, then polls every SLEEP_US microseconds with
usleep, and after LONG_IDLE_POLLS such polls every LONG_SLEEP_US, so an idle process does not burn its cores (a
job posted then waits up to that long once). Every kernel the runtime calls has only integer and pointer
parameters (<= 11), which x86-64 and AArch64 pass in the same registers / stack slots as int64, so one call type
`void(int64 x 11)` calls any of them (extra arguments are ignored by the callee).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import threading
import weakref
from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from .codegen import I32, I64, P, VOID, ci

POOL_VERSION = 1
POOL_KIND = "pool"
SLOT_WORDS = 16  # 128 bytes: seq, done, fn, 11 args, padding
MAX_ARGS = 11
SLEEP_US = 50  # poll interval once the spin is over ...
LONG_IDLE_POLLS = 2000  # ... for this many polls (~0.1-0.2 s), then
LONG_SLEEP_US = 1000  # this one, so an idle process costs its cores next to nothing
DEFAULT_SPIN = 1 << 16  # polls (~2-5 ms of pause) before the worker starts sleeping between polls


@dataclass(frozen=True)
class PoolSpec:
    """The pool's functions as a 'kernel spec', so they are compiled, fingerprinted and disk cached like kernels."""

    def key(self) -> str:
        return f"pool{POOL_VERSION}"

    def names(self) -> tuple[str, ...]:
        return ("xbitc_pool_worker", "xbitc_pool_post", "xbitc_pool_wait")


def generate_pool_module(target) -> ir.Module:
    m = ir.Module(name="xbitc_pool")
    m.triple = target.triple
    pause = None
    if target.is_x86:
        pause = ir.Function(m, ir.FunctionType(VOID, []), name="llvm.x86.sse2.pause")
    usleep = ir.Function(m, ir.FunctionType(I32, [I32]), name="usleep")
    job_t = ir.FunctionType(VOID, [I64] * MAX_ARGS)

    def relax(b):
        if pause is not None:
            b.call(pause, [])

    def word(b, slot, i):
        return b.gep(slot, [ci(i)], inbounds=True)

    # worker
    fn = ir.Function(m, ir.FunctionType(VOID, [P(I64), P(I64), I64]), name="xbitc_pool_worker")
    slot, quit_, spin = fn.args
    entry, head, run, idle, sleep, out = (fn.append_basic_block(n) for n in ("entry", "head", "run", "idle",
                                                                               "sleep", "out"))
    ir.IRBuilder(entry).branch(head)
    b = ir.IRBuilder(head)
    last = b.phi(I64)
    polls = b.phi(I64)
    # a slot starts at seq 0 and a worker at last = 0, not at the slot's seq when its thread got going: a job
    # posted before the thread first ran must still run
    last.add_incoming(ci(0), entry)
    polls.add_incoming(ci(0), entry)
    seq = b.load_atomic(word(b, slot, 0), "acquire", 8)
    b.cbranch(b.icmp_signed("!=", seq, last), run, idle)
    b = ir.IRBuilder(run)
    target_fn = b.inttoptr(b.load(word(b, slot, 2), align=8), P(job_t))
    b.call(target_fn, [b.load(word(b, slot, 3 + i), align=8) for i in range(MAX_ARGS)])
    b.store_atomic(seq, word(b, slot, 1), "release", 8)
    last.add_incoming(seq, run)
    polls.add_incoming(ci(0), run)
    b.branch(head)
    b = ir.IRBuilder(idle)
    stop = b.icmp_signed("!=", b.load_atomic(quit_, "acquire", 8), ci(0))
    relax(b)
    more = b.add(polls, ci(1))
    b.cbranch(stop, out, sleep)
    b = ir.IRBuilder(sleep)
    with b.if_then(b.icmp_signed(">", more, spin)):
        long_idle = b.icmp_signed(">", more, b.add(spin, ci(LONG_IDLE_POLLS)))
        b.call(usleep, [b.select(long_idle, ir.Constant(I32, LONG_SLEEP_US), ir.Constant(I32, SLEEP_US))])
    last.add_incoming(last, b.block)
    polls.add_incoming(more, b.block)
    b.branch(head)
    ir.IRBuilder(out).ret_void()

    # post
    fn = ir.Function(m, ir.FunctionType(I64, [P(I64)] + [I64] * (1 + MAX_ARGS)), name="xbitc_pool_post")
    slot, *vals = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    for i, v in enumerate(vals):
        b.store(v, word(b, slot, 2 + i), align=8)
    nxt = b.add(b.load(word(b, slot, 0), align=8), ci(1))  # only the posting thread writes seq
    b.store_atomic(nxt, word(b, slot, 0), "release", 8)
    b.ret(nxt)

    # wait
    fn = ir.Function(m, ir.FunctionType(VOID, [P(I64), I64]), name="xbitc_pool_wait")
    slot, want = fn.args
    entry, loop, out = (fn.append_basic_block(n) for n in ("entry", "loop", "out"))
    ir.IRBuilder(entry).branch(loop)
    b = ir.IRBuilder(loop)
    done = b.load_atomic(word(b, slot, 1), "acquire", 8)
    relax(b)
    b.cbranch(b.icmp_signed("==", done, want), out, loop)
    ir.IRBuilder(out).ret_void()
    return m


WORKER_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
POST_PROTO = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, *([ctypes.c_int64] * (1 + MAX_ARGS)))
WAIT_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)
PROTOS = (WORKER_PROTO, POST_PROTO, WAIT_PROTO)


class PoolClosed(RuntimeError):
    """run() on a pool that was closed (or inherited through fork, where its threads do not exist)."""


class SpinPool:
    """`workers` native spinning threads. `run(jobs)` runs jobs[0] on the calling thread and the others on workers,
    returning when all are done; a job is (ctypes function, args) with <= 11 int / pointer / None args (the posted
    ones may also give the function's address as an int).
    The caller keeps every buffer a job reads alive until run returns (it does: run blocks). A pool lives until
    `close()` (or interpreter exit): its threads hold it. Function objects passed as jobs are kept (with their
    address) for the pool's life: pass the same kernel objects each call, as the runtime does."""

    def __init__(self, workers: int, spin: int = DEFAULT_SPIN, target=None):
        from .jit import compile_kernel, host_target

        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        k = compile_kernel(PoolSpec(), target or host_target(), kinds=(POOL_KIND,))
        self._worker, self._post, self._wait = k._part(POOL_KIND)
        self._kernel = k
        # each slot on its own 128-byte-aligned pair of cache lines: workers never share one
        raw = np.zeros((max(workers, 1) + 1) * SLOT_WORDS, dtype=np.int64)
        skip = (-raw.ctypes.data % (SLOT_WORDS * 8)) // 8
        self.slots = raw[skip:skip + max(workers, 1) * SLOT_WORDS].reshape(-1, SLOT_WORDS)
        self.quit = np.zeros(1, dtype=np.int64)
        self._slot_addrs = [int(s.ctypes.data) for s in self.slots]  # ~1.6 us per .ctypes lookup: once
        self._addrs: dict[int, tuple] = {}  # id(ctypes function) -> (function, address)
        self._lock = threading.Lock()  # one run (or close) at a time: a slot holds one job
        self.threads = [threading.Thread(target=self._serve, args=(i, spin), name=f"xbitc-spin-{i}", daemon=True)
                        for i in range(workers)]
        try:
            for t in self.threads:
                t.start()
        except BaseException:  # e.g. no more threads: stop the ones that did start
            self.quit[0] = 1
            for t in self.threads:
                if t.ident is not None:
                    t.join()
            raise
        _live.add(self)

    def _serve(self, i: int, spin: int) -> None:
        # a bound method: the thread keeps the pool (and the slot memory the worker polls) alive until close()
        self._worker(self._slot_addrs[i], self.quit.ctypes.data, spin)

    @property
    def workers(self) -> int:
        return len(self.threads)

    def run(self, jobs) -> None:
        if not jobs:
            return
        if self.quit[0]:
            raise PoolClosed("the pool was closed")
        if len(jobs) - 1 > self.workers:
            raise ValueError(f"{len(jobs)} jobs for {self.workers} workers + the calling thread")
        # everything checked before the first post: a job once posted runs, and run must then wait for it
        posts = []
        for i, (fn, args) in enumerate(jobs[1:]):
            if len(args) > MAX_ARGS:
                raise ValueError(f"a pool job takes at most {MAX_ARGS} arguments, got {len(args)}")
            vals = [0 if a is None else int(a) for a in args] + [0] * (MAX_ARGS - len(args))
            posts.append((self._slot_addrs[i], self._address(fn), vals))
        with self._lock:
            if self.quit[0]:
                raise PoolClosed("the pool was closed")
            posted = []
            try:
                for slot, addr, vals in posts:
                    posted.append((slot, self._post(slot, addr, *vals)))
                fn, args = jobs[0]
                fn(*args)
            finally:
                self._wait_all(posted)

    def _wait_all(self, posted) -> None:
        """Wait for every posted job, even through KeyboardInterrupt (re-raised after): never return while a
        worker may still use the caller's buffers."""
        interrupted = None
        while posted:
            try:
                while posted:
                    self._wait(*posted[0])
                    posted.pop(0)
            except BaseException as err:  # noqa: BLE001 - keep waiting, then re-raise
                interrupted = interrupted or err
        if interrupted is not None:
            raise interrupted

    def _address(self, fn) -> int:
        if isinstance(fn, int):
            return fn
        known = self._addrs.get(id(fn))
        if known is None:  # keep fn alive with its address, so the id is not reused
            known = self._addrs[id(fn)] = (fn, ctypes.cast(fn, ctypes.c_void_p).value)
        return known[1]

    def close(self) -> None:
        """Stop the workers; idempotent. Waits for a run in progress on another thread (a worker that saw the
        quit flag before a job posted after it would never run that job)."""
        with self._lock:
            if not self.quit[0]:
                self.quit[0] = 1
                for t in self.threads:
                    t.join()
        _live.discard(self)


_live: "weakref.WeakSet[SpinPool]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for p in list(_live):
        p.close()


def _forget_after_fork() -> None:
    """In a forked child the pools' threads do not exist: mark every pool closed (run raises PoolClosed) instead
    of letting a run wait forever for a worker that is not there."""
    for p in list(_live):
        p.quit[0] = 1
        p.threads = []
        p._lock = threading.Lock()
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
