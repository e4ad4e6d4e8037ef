"""The native spinning worker pool (backends/llvm/pool.py) that hands row ranges to other cores."""
import ctypes
import os
import time

import numpy as np
import pytest

from xbitc.backends.llvm import host_target
from xbitc.backends.llvm import rowlane as rl
from xbitc.backends.llvm.jit import compile_kernel
from xbitc.backends.llvm.pool import MAX_ARGS, PoolClosed, SpinPool

pytestmark = pytest.mark.skipif(not host_target().is_x86, reason="x86 host kernels")


def _q8_case(rows=200, cols=300, seed=0):
    rng = np.random.default_rng(seed)
    recs = [(rng.integers(0, 8, (rows, cols), dtype=np.uint8), rng.standard_normal(rows).astype(np.float16),
             rng.integers(0, 8, rows, dtype=np.uint8), 0, 3)]
    buf, table = rl.pack(recs, rows, "q8")
    x = rng.standard_normal(cols).astype(np.float32)
    return buf, table, x


def test_slots_sit_on_their_own_cache_lines():
    pool = SpinPool(3)
    try:
        assert all(a % 128 == 0 for a in pool._slot_addrs)
        assert sorted(b - a for a, b in zip(pool._slot_addrs, pool._slot_addrs[1:])) == [128, 128]
    finally:
        pool.close()


@pytest.mark.parametrize("workers,spin", [(1, 1 << 16), (3, 1 << 16), (2, 0)])
def test_spin_pool_runs_every_range_like_one_call(workers, spin):
    """Each job runs exactly once, on its own rows, with its own arguments: the split result is bit-identical to
    one call. spin=0 makes workers sleep between polls at once: jobs must still be picked up."""
    k = compile_kernel(rl.RowLaneSpec(act="q8"), host_target(), kinds=(rl.ROWS_KIND,))
    buf, table, x = _q8_case()
    rows, cols = 200, 300
    per = rl.q8_scratch_bytes([cols], 1, [3])
    scratch = [np.zeros(per, np.uint8) for _ in range(workers + 1)]

    def args(rb, re, i, y):
        return (table.ctypes.data, len(table), x.ctypes.data, None, y.ctypes.data, rb, re, 1, cols, rows,
                scratch[i].ctypes.data)

    whole = np.full(rows, np.nan, np.float32)
    k.rows_q8(*args(0, rows, 0, whole))
    pool = SpinPool(workers, spin=spin)
    try:
        bounds = np.linspace(0, rows // 16, workers + 2).astype(int) * 16
        bounds[-1] = rows
        for _ in range(20):  # many posts: sequence numbers advance, no job is lost or run twice
            y = np.full(rows, np.nan, np.float32)
            pool.run([(k.rows_q8, args(a, b, i, y)) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])
            assert np.array_equal(y, whole)
    finally:
        pool.close()


def test_spin_pool_rejects_what_it_cannot_run():
    """Bad job lists are refused before anything is posted: no job runs (one posted job would outlive the call)."""
    pool = SpinPool(2)
    add = ctypes.CFUNCTYPE(None)(lambda: None)
    ran = []
    count = ctypes.CFUNCTYPE(None)(lambda: ran.append(1))
    with pytest.raises(ValueError, match="4 jobs for 2 workers"):
        pool.run([(add, ())] * 4)
    with pytest.raises(ValueError, match=f"at most {MAX_ARGS} arguments"):
        pool.run([(count, ()), (count, ()), (add, tuple(range(MAX_ARGS + 1)))])
    pool.run([(add, ()), (add, ())])  # a later, good run: the slots are free again
    assert ran == []
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(PoolClosed, match="closed"):
        pool.run([(add, ())])
    with pytest.raises(ValueError, match="workers must be >= 0"):
        SpinPool(-1)


def test_a_job_posted_before_the_worker_thread_starts_still_runs():
    """Regression: workers used to take the slot's sequence number when their thread first ran as 'seen', so a job
    posted before that never ran and the caller waited forever. Fresh pools used at once, in a subprocess with a
    timeout so a regression fails instead of hanging the suite."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import ctypes, threading
        import numpy as np
        from xbitc.backends.llvm import host_target
        from xbitc.backends.llvm.jit import compile_kernel
        from xbitc.backends.llvm.pool import POOL_KIND, SLOT_WORDS, PoolSpec
        worker, post, wait = compile_kernel(PoolSpec(), host_target(), kinds=(POOL_KIND,))._part(POOL_KIND)
        slot, quit_ = np.zeros(SLOT_WORDS, np.int64), np.zeros(1, np.int64)
        fn = ctypes.cast(ctypes.pythonapi.Py_IsInitialized, ctypes.c_void_p).value
        seq = post(slot.ctypes.data, fn, *([0] * 11))  # posted before the worker exists
        t = threading.Thread(target=worker, args=(slot.ctypes.data, quit_.ctypes.data, 1000), daemon=True)
        t.start()
        wait(slot.ctypes.data, seq)
        quit_[0] = 1
        t.join()
        print("ok", seq)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "ok 1", out.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_does_not_wait_for_workers_it_does_not_have():
    """A child inherits the pool object but not its threads: run must refuse (PoolClosed), not spin forever."""
    pool = SpinPool(1)
    noop = ctypes.CFUNCTYPE(None)(lambda: None)
    pid = os.fork()
    if pid == 0:  # child: exit codes report what happened
        try:
            pool.run([(noop, ()), (ctypes.pythonapi.Py_IsInitialized, ())])
            os._exit(1)
        except PoolClosed:
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(2)
    try:
        for _ in range(300):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 0
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child waited for a worker thread it does not have")
        pool.run([(noop, ()), (ctypes.pythonapi.Py_IsInitialized, ())])  # the parent's pool still works
    finally:
        pool.close()
