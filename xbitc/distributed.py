"""Many processes, one compile: the torch.distributed process group a launcher's environment asks for, and the few
collectives the passes use to share their work. Outside `group()`, or in one process, every helper is a no-op.

`torchrun --nproc-per-node N xbitc compile ...` starts the same command N times (on one host or several) with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Every process loads the model and builds the same calibration list from
the same seed; a pass then takes its share of the batches (batch i on rank i % N) and sums what it measured over all
ranks (Hessians, sensitivities), or quantizes its share of the matrices and sends them to every rank, so all ranks
hold the same graph after every pass. Only rank 0 logs and writes the artifact.

The group uses gloo: the compile keeps its tensors in host memory, and gloo is torch.distributed's backend for host
tensors, on CPUs and on GPU hosts alike (NCCL carries only CUDA tensors).

Quantized matrices travel as raw arrays plus a JSON description (dtype, shape, segments), never as pickles: what one
process receives from another is data, as an artifact is.

A failure: the failing process marks the run failed in the launcher's key-value store and reports its error; its
exit breaks the collectives the others wait in (or the launcher stops them), and those, finding the mark set, end
with PeerFailed, which the command line does not print. Rank 0 writes only after a barrier every rank reached.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from xbitc.passes.base import PassError
from xbitc.quant.format import QuantizedMatrix, Segment

T = TypeVar("T")
FAILURE_WAIT = timedelta(seconds=10)  # how long a failing process waits on the store to say it failed first


class PeerFailed(RuntimeError):
    """This process stopped because another process of the same run failed first (and reported why)."""


@dataclass
class _Group:
    rank: int
    size: int
    store: dist.Store | None  # the launcher's store: who failed first; None for a group the caller made
    owned: bool  # made by group(): destroyed when it ends
    failed_key: str = ""


_ACTIVE: _Group | None = None


@contextmanager
def group():
    """Join the process group the environment asks for (WORLD_SIZE > 1, from torchrun or another env:// launcher)
    for the duration; one process without that environment runs alone. A group the caller already made is used
    and left in place."""
    global _ACTIVE
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if _ACTIVE is not None or (size <= 1 and not dist.is_initialized()):
        yield
        return
    if dist.is_initialized():
        _ACTIVE = _Group(dist.get_rank(), dist.get_world_size(), None, owned=False)
    else:
        try:
            store, rank, size = next(dist.rendezvous("env://"))
        except (ValueError, RuntimeError) as err:
            raise PassError(f"WORLD_SIZE={size} asks for a group of processes, which could not form ({err}); start "
                            "the compile with torchrun, or unset WORLD_SIZE to compile in one process") from None
        dist.init_process_group("gloo", store=dist.PrefixStore("default_pg", store), rank=rank, world_size=size)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted run starts with no failure
        _ACTIVE = _Group(rank, size, store, owned=True, failed_key=f"xbitc/{restart}/failed")
    try:
        yield
    finally:
        owned, _ACTIVE = _ACTIVE.owned, None
        if owned:
            dist.destroy_process_group()


def rank() -> int:
    return _ACTIVE.rank if _ACTIVE else 0


def world_size() -> int:
    return _ACTIVE.size if _ACTIVE else 1


def is_main() -> bool:
    """Rank 0: the process that logs and writes the artifact."""
    return rank() == 0


def owner(index: int) -> int:
    """The rank that does item `index` of a list every rank holds."""
    return index % world_size()


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's items: r, r + N, r + 2N, ... (all of them in one process)."""
    return list(items[rank() :: world_size()])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks, in place; every rank gets the same values."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def sum_over_ranks(x: float | int) -> float | int:
    """A number summed over all ranks: float64 for a float, int64 for an int (the same type on every rank)."""
    if world_size() == 1:
        return x
    t = all_reduce_sum(torch.tensor([x], dtype=torch.float64 if isinstance(x, float) else torch.int64))
    return type(x)(t.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def first_failure() -> bool:
    """Called by a process that failed: whether it is the first of its run to fail, and so the one to report
    the error (always true in one process). A store that cannot be reached lived in a process that has gone."""
    if _ACTIVE is None or _ACTIVE.store is None:
        return True
    try:
        _ACTIVE.store.set_timeout(FAILURE_WAIT)
        return _ACTIVE.store.add(_ACTIVE.failed_key, 1) == 1
    except Exception:  # noqa: BLE001 - any store error means its host (a failed rank or the launcher) is gone
        return False


def map_matrices(names: list[str], quantize: Callable[[str], QuantizedMatrix]) -> dict[str, QuantizedMatrix]:
    """{name: quantize(name)} on every rank, bit for bit, with names[i] quantized on rank owner(i) only."""
    done = {name: quantize(name) for i, name in enumerate(names) if owner(i) == rank()}
    if world_size() > 1:
        for i, name in enumerate(names):
            info, arrays = _describe(done[name]) if owner(i) == rank() else (None, None)
            done[name] = _rebuild(*_broadcast_record(info, arrays, owner(i)))
    return done


def sync_from_main(values: list[np.ndarray | torch.Tensor]) -> None:
    """Overwrite every rank's `values` (the same shapes and dtypes on every rank) with rank 0's, in place."""
    if world_size() == 1 or not values:
        return
    tensors = [torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in values]
    flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])
    dist.broadcast(flat, 0)
    offset = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        with torch.no_grad():
            t.copy_(flat[offset : offset + n].view(t.dtype).reshape(t.shape))
        offset += n


def _describe(qm: QuantizedMatrix) -> tuple[dict, list[np.ndarray]]:
    info = {"shape": list(qm.shape), "segments": [[s.bits, s.group_size, s.start, s.stop] for s in qm.segments],
            "perm": qm.perm is not None, "meta": qm.meta}
    arrays = [*qm.codes, *qm.scales, *qm.zeros] + ([qm.perm] if qm.perm is not None else [])
    return info, arrays


def _rebuild(info: dict, arrays: list[np.ndarray]) -> QuantizedMatrix:
    n = len(info["segments"])
    return QuantizedMatrix(
        shape=tuple(info["shape"]), segments=[Segment(*s) for s in info["segments"]], codes=arrays[:n],
        scales=arrays[n : 2 * n], zeros=arrays[2 * n : 3 * n], perm=arrays[3 * n] if info["perm"] else None,
        meta=info["meta"],
    )


def _broadcast_record(info: dict | None, arrays: list[np.ndarray] | None, src: int) -> tuple[dict, list[np.ndarray]]:
    """Rank src's (JSON-able dict, numpy arrays) on every rank: a JSON header with each array's dtype and shape, then
    all the arrays' bytes in one buffer."""
    if rank() == src:
        arrays = [np.ascontiguousarray(a) for a in arrays]
        head = json.dumps({"info": info, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}).encode()
        payload = b"".join(a.tobytes() for a in arrays)
        sizes = torch.tensor([len(head), len(payload)], dtype=torch.int64)
    else:
        sizes = torch.zeros(2, dtype=torch.int64)
    dist.broadcast(sizes, src)
    buf = torch.frombuffer(bytearray(head + payload), dtype=torch.uint8) if rank() == src \
        else torch.empty(int(sizes.sum()), dtype=torch.uint8)
    dist.broadcast(buf, src)
    if rank() == src:
        return info, arrays
    raw = buf.numpy().tobytes()
    record = json.loads(raw[: int(sizes[0])])
    out, offset = [], int(sizes[0])
    for dtype, shape in record["arrays"]:
        dt = np.dtype(dtype)  # numpy builds no object array from a byte buffer: data only
        count = int(np.prod(shape, dtype=np.int64))
        out.append(np.frombuffer(raw, dt, count, offset).reshape(shape).copy())
        offset += count * dt.itemsize
    return record["info"], out
