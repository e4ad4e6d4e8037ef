"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Columns of W are quantized one at a time; the error of each is spread over the not-yet-quantized columns through
the upper Cholesky factor of the (damped) inverse Hessian, with the updates to columns beyond the current block
applied lazily once per block (the paper's Algorithm 1). Everything here is per output row except the Hessian, so the
work is O(out * in^2) and the memory O(in^2 + out * in).

Mixed precision: every input column has its own depth (0..8; 0 drops the column to exactly 0, its error compensated
by the later columns like any other quantization error). Columns are processed grouped by depth, then by Hessian
diagonal descending (act_order) or original index, and stored in the layout every quantizer writes
(xbitc.quant.segments): the same runs of columns, one segment per depth, finest first.

The depth order matters, because GPTQ can only push a column's error onto the columns after it. `depth_order`:
"ascending" (the default: coarsest first, so dropped columns come first and the finest columns, whose own error is
smallest, come last and absorb everyone's), "drop_first" (dropped columns first, then depth descending) or
"descending" (act_order's "important columns first" when depths follow importance; but the dropped columns come
last with nothing after them to absorb their error: they are zeroed uncompensated, as magnitude pruning would).
Dropping a column early is SparseGPT's pruning step: the remaining columns are refitted to carry what it did.
Measured on SmolLM2-135M with the learned allocator's plans (GPTQ, 64 x 512 calibration tokens, no tuning, 4,096
WikiText-2 tokens), perplexity descending / drop_first / ascending: 2.0 bpw (37% of the weights dropped)
6207 / 578 / 555; 3.0 bpw 132.6 / 62.5 / 60.4. (On synthetic correlated inputs without drops, descending is
slightly better when depths track the Hessian diagonal.)

Scale/zero groups are counted inside each segment and measured on the error-updated weights when the algorithm
reaches a group's first column; the float16 scales and the codes reproduce exactly the matrix GPTQ measured.
"""
from __future__ import annotations

from bisect import bisect_right

import numpy as np
import torch

from .format import QuantizedMatrix
from .grid import dequantize_codes, grid_params, quantize_codes
from .segments import runs, segments, stored_order, stored_segments, stores_perm

MAX_DAMP_RETRIES = 4  # damp, 10x, 100x, ... before giving up on the Cholesky
DEPTH_ORDERS = ("descending", "ascending", "drop_first")
BLOCK_ROWS = 256  # rows of an [in, in] matrix copied or checked at a time (no second [in, in] temporary)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int | np.ndarray,
    group_size: int,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    *,
    depth_order: str = "ascending",
    clip: bool = False,
) -> QuantizedMatrix:
    """GPTQ-quantize a [out, in] weight matrix given the [in, in] Hessian (2/N) sum x x^T of its inputs.

    `bits` is one depth for every column or an int array of `in` depths in 0..8 (0 drops the column). Columns whose
    Hessian diagonal is 0 never saw a nonzero input and are zeroed. Columns are processed by depth (`depth_order`:
    "descending", "ascending" or "drop_first", i.e. dropped columns first, then descending), then by Hessian diagonal
    descending (act_order) or index; `perm` stores them one segment per depth, finest first, each in processing order
    (None only for uniform bits without act_order). `clip` searches each group's range (xbitc.quant.grid) on the
    error-updated weights. `meta["loss"]` is the sum of the per-weight GPTQ losses (w - q)^2 / (2 [U]_qq^2) (U the
    upper Cholesky factor of the damped H^-1), which equals tr(dW H_damped dW^T) / 2 for dW = W - Wq; `meta["damp"]`
    is the relative damping actually used.
    """
    return _gptq(w, hessian, bits, group_size, damp, act_order, block_size, depth_order, want_result=False, clip=clip)[0]


def _gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int | np.ndarray,
    group_size: int,
    damp: float,
    act_order: bool,
    block_size: int,
    depth_order: str = "ascending",
    want_result: bool = True,
    clip: bool = False,
) -> tuple[QuantizedMatrix, torch.Tensor | None]:
    """The quantized matrix and (if want_result) the float32 [out, in] matrix GPTQ's error computation used, in
    original column order."""
    if w.ndim != 2:
        raise ValueError(f"w must be a [out, in] matrix, got shape {tuple(w.shape)}")
    out, inp = w.shape
    if tuple(hessian.shape) != (inp, inp):
        raise ValueError(f"hessian must be [{inp}, {inp}] for w of shape {tuple(w.shape)}, got {tuple(hessian.shape)}")
    if group_size < 1 or block_size < 1:
        raise ValueError(f"group_size and block_size must be >= 1, got {group_size} and {block_size}")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if depth_order not in DEPTH_ORDERS:
        raise ValueError(f"depth_order must be one of {DEPTH_ORDERS}, got {depth_order!r}")
    depths = _column_depths(bits, inp)

    # Stored column j is row j of WT, so that the per-column work of the inner loop runs on contiguous memory.
    WT = torch.empty(inp, out, dtype=torch.float32)
    WT.copy_(w.detach().T)
    hessian = hessian.detach()
    if not (torch.isfinite(WT).all() and torch.isfinite(hessian).all()):
        raise ValueError("w and hessian must be finite")
    diag = torch.diagonal(hessian).to(torch.float64, copy=True)
    WT[diag == 0] = 0.0  # a column that never saw a nonzero input: nothing to fit, nothing to compensate with

    perm = _column_order(depths, diag.numpy(), act_order, depth_order)  # processing order
    order = None
    if not np.array_equal(perm, np.arange(inp)):
        order = torch.from_numpy(perm)
        WT = WT[order]
        depths = depths[perm]
    Hinv, damp_used = _inverse_cholesky_upper(hessian, order, damp)

    segs = segments(runs(depths), group_size)  # in processing order
    # Group g of a run spans processed columns [start, stop); blocks are cut so that a group starting inside a
    # block lies wholly in it, and a group reaching past its block starts at the block's first column. Either way
    # the group's current weights are at hand when it starts (W1 in the block, W beyond it, all updates applied).
    group_at: dict[int, tuple[int, int, int]] = {}  # first processed column -> (run index, group index, stop)
    for si, seg in enumerate(segs):
        if seg.bits:
            for gi, g0 in enumerate(range(seg.start, seg.stop, seg.group_size)):
                group_at[g0] = (si, gi, min(g0 + seg.group_size, seg.stop))
    breaks = sorted({s.start for s in segs} | set(group_at) | {inp})

    codes = torch.zeros(inp, out, dtype=torch.uint8)
    scales = [torch.zeros(s.ngroups, out) for s in segs]
    zeros = [torch.zeros(s.ngroups, out) for s in segs]
    losses = torch.zeros(out, dtype=torch.float64)
    seg_of = np.repeat(np.arange(len(segs)), [s.ncols for s in segs])

    scale = zero = None  # of the group in progress, which may have started in an earlier block
    i1 = 0
    while i1 < inp:
        i2 = _block_end(breaks, i1, block_size)
        count = i2 - i1
        W1 = WT[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2].float()
        for i in range(count):
            col = i1 + i
            seg = segs[seg_of[col]]
            if col in group_at:
                si, gi, g1 = group_at[col]
                cur = W1[i : i + g1 - col] if g1 <= i2 else WT[col:g1]  # the latter only when i == 0
                scale, zero = grid_params(cur.T, seg.bits, clip=clip)
                scale, zero = scale[:, 0], zero[:, 0]
                if not torch.isfinite(scale).all():
                    raise ValueError("GPTQ: weights too large for float16 scales")
                scales[si][gi] = scale
                zeros[si][gi] = zero
            wcol = W1[i]
            if seg.bits:
                q = quantize_codes(wcol, scale, zero, seg.bits)
                codes[col] = q.to(torch.uint8)
                qcol = dequantize_codes(q, scale, zero)
            else:
                qcol = torch.zeros_like(wcol)
            err = Err1[i]
            torch.sub(wcol, qcol, out=err)
            err /= Hinv1[i, i]
            if i + 1 < count:
                W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1.0)
            wcol.copy_(qcol)  # W1 now holds Q in the columns done
        losses += Err1.double().square().sum(0) / 2  # (w - q)^2 / d^2 / 2 per weight
        WT[i1:i2] = W1
        if i2 < inp:
            WT[i2:].addmm_(Hinv[i1:i2, i2:].T.float(), Err1, alpha=-1.0)
        i1 = i2

    # Stored layout: the processed runs reordered finest first, whole (so the groups and codes are unchanged).
    to_stored = stored_order(depths)
    stored = stored_segments(depths, group_size)
    run_of = {s.bits: i for i, s in enumerate(segs)}
    codes = codes[torch.from_numpy(to_stored)]
    qm = QuantizedMatrix(
        shape=(out, inp),
        segments=stored,
        codes=[codes[s.start : s.stop].T.numpy().copy() if s.bits else np.zeros((out, 0), np.uint8) for s in stored],
        scales=[scales[run_of[s.bits]].T.numpy().astype(np.float16) for s in stored],
        zeros=[zeros[run_of[s.bits]].T.numpy().astype(np.uint8) for s in stored],
        perm=perm[to_stored] if stores_perm(stored, act_order) else None,
        meta={
            "method": "gptq",
            "loss": float(losses.sum()),
            "damp": damp_used,
            "act_order": act_order,
            "depth_order": depth_order,
        },
    )
    if not want_result:
        return qm, None
    if order is not None:
        Wq = torch.empty_like(WT)
        Wq[order] = WT
        WT = Wq
    return qm, WT.T.contiguous()


def _column_depths(bits: int | np.ndarray, inp: int) -> np.ndarray:
    if isinstance(bits, (int, np.integer)):
        depths = np.full(inp, int(bits), dtype=np.int64)
    else:
        arr = np.asarray(bits)
        if arr.shape != (inp,):
            raise ValueError(f"bits must be an int or an array of {inp} column depths, got shape {arr.shape}")
        if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
            raise ValueError(f"column depths must be integers, got dtype {arr.dtype}")
        depths = arr.astype(np.int64)
    if depths.size and (depths.min() < 0 or depths.max() > 8):
        raise ValueError(f"bit depths must be 0..8, got range {depths.min()}..{depths.max()}")
    return depths


def _column_order(depths: np.ndarray, diag: np.ndarray, act_order: bool, depth_order: str) -> np.ndarray:
    """Processing order: by depth (see DEPTH_ORDERS), then Hessian diagonal descending (act_order) or original index.
    Stable, so ties keep original index order."""
    if depth_order == "ascending":
        primary = depths
    elif depth_order == "drop_first":
        primary = np.where(depths == 0, -(1 << 8), -depths)
    else:
        primary = -depths
    keys = (-diag, primary) if act_order else (primary,)
    return np.lexsort(keys)


def _block_end(breaks: list[int], i1: int, block_size: int) -> int:
    """End of the block starting at i1: the last group/segment boundary within block_size, if any, else i1+block."""
    j = bisect_right(breaks, i1 + block_size) - 1
    return breaks[j] if breaks[j] > i1 else i1 + block_size


def _inverse_cholesky_upper(hessian: torch.Tensor, order: torch.Tensor | None, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1 for H the Hessian in processing `order` (None: as
    it is) with 1 on the diagonal of columns that never saw an input; in float64 (the caller reads it a block at a
    time as float32, the precision GPTQ's updates run in, so no float32 copy of the whole is made).

    One [in, in] float64 matrix is worked on in place and no other [in, in] copy is made: the Hessians of wide inputs
    are what bounds a compile's memory. It is held column-major, the layout LAPACK works in, which torch's
    factorizations and inverse then write directly (on a row-major matrix each makes a transposed copy); the
    permutation is written into it a block of rows at a time. On failure the relative damping is raised tenfold,
    MAX_DAMP_RETRIES times, before raising; each try starts again from `hessian`.
    """
    rel, tried, mean_diag = damp, [], None
    info = torch.empty((), dtype=torch.int32)
    n = hessian.shape[0]
    for _ in range(MAX_DAMP_RETRIES + 1):
        tried.append(rel)
        H = torch.empty(n, n, dtype=torch.float64).mT
        for r0 in range(0, n, BLOCK_ROWS):
            rows = slice(r0, min(r0 + BLOCK_ROWS, n))
            H[rows] = hessian[rows] if order is None else hessian[order[rows]][:, order]
        diag = torch.diagonal(H)
        diag[diag == 0] = 1.0
        if mean_diag is None:
            mean_diag = float(diag.mean())
        diag += rel * mean_diag
        torch.linalg.cholesky_ex(H, out=(H, info))
        if int(info) == 0:
            torch.cholesky_inverse(H, out=H)
            torch.linalg.cholesky_ex(H, upper=True, out=(H, info))
            if int(info) == 0 and all(torch.isfinite(H[r0:r0 + BLOCK_ROWS]).all() for r0 in range(0, n, BLOCK_ROWS)):
                return H, rel
        del H
        rel = rel * 10 if rel > 0 else 1e-6
    raise np.linalg.LinAlgError(
        f"GPTQ: Hessian is not positive definite with damping {tried} x mean(diag); "
        "check the calibration statistics (NaNs, negative diagonal, too few samples)"
    )
