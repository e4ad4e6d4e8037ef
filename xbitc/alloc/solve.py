"""Choosing a bit depth (0..8) for every column of every weight, and a group size per weight, under a size budget.

Cost model (second order, see sensitivity.py): changing weight W_rj by e_rj raises the task cost by about
1/2 F_rj e_rj^2. For every candidate group size and depth b = 1..8 the weights are actually put on the b-bit grid of
their group (xbitc.quant.grid, the artifact's own grid), so c_j(b) = 1/2 sum_r F_rj (W_rj - Q_b(W)_rj)^2 is the
measured error of that grid, not a formula: at 1-2 bits the textbook step^2/12 noise model underestimates the
error of real, bell-shaped weight groups by up to 2x, and it is the low depths the solver most needs to judge.
Dropping the column (0 bits) costs 1/2 sum_r F_rj W_rj^2.
Size model: b bits per weight plus a float16 scale and a b-bit zero per group, s_j(b) = out (b + (16 + b)/g).

The budget enters as a Lagrange multiplier: for a price lam every column independently takes the depth minimising
c_j(b) + lam s_j(b), and every weight the group size minimising its sum; lam is found by bisection (dual ascent)
so the total size meets the budget, then the leftover bits go to the columns with the best cost decrease per bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xbitc.quant.grid import dequantize_codes, grid_params, quantize_codes

DEPTHS = np.arange(9)  # 0 drops a column
SCALE_BITS = 16
COST_ROWS = 1024  # output rows measured at once: a tall table's temporaries stay those of a 1024-row slice


@dataclass
class TensorCosts:
    name: str
    shape: tuple[int, int]
    groups: list[int]  # candidate group sizes (already clipped to the width)
    cost: list[np.ndarray]  # per group option: [in, 9] cost of each depth for each column
    size: list[np.ndarray]  # per group option: [in, 9] bits of each depth for each column


def column_costs(w: torch.Tensor, fisher: torch.Tensor, groups: list[int], name: str = "") -> TensorCosts:
    out, inp = w.shape
    opts_g = sorted({min(g or inp, inp) for g in groups})
    opts_c = [np.zeros((inp, 9)) for _ in opts_g]
    for r0 in range(0, out, COST_ROWS):  # a vocabulary-sized table's temporaries stay a slice's size
        wr = w[r0:r0 + COST_ROWS].float()
        fr = fisher[r0:r0 + COST_ROWS].float().clamp_min(0)
        drop = 0.5 * (fr * wr * wr).sum(0).double().numpy()
        for g, cost in zip(opts_g, opts_c):
            blocks = torch.nn.functional.pad(wr, (0, (-inp) % g)).reshape(-1, g)  # a row per (output row, group)
            cost[:, 0] += drop
            for b in DEPTHS[1:]:
                scale, zero = grid_params(blocks, int(b))
                err = dequantize_codes(quantize_codes(blocks, scale, zero, int(b)), scale, zero) - blocks
                err = err.reshape(wr.shape[0], -1)[:, :inp]
                cost[:, b] += 0.5 * (fr * err * err).sum(0).double().numpy()
    opts_s = []
    for g, cost in zip(opts_g, opts_c):
        cost[:, 1:] = np.minimum.accumulate(cost[:, 1:], axis=1)  # a finer grid never costs more
        size = np.zeros(9)
        size[1:] = out * (DEPTHS[1:] + (SCALE_BITS + DEPTHS[1:]) / g)
        opts_s.append(np.broadcast_to(size, (inp, 9)))  # every column the same: one row, read as [in, 9]
    return TensorCosts(name, (out, inp), opts_g, opts_c, opts_s)


@dataclass
class Allocation:
    depths: dict[str, np.ndarray]  # per tensor: [in] depth of each column
    groups: dict[str, int]
    cost: float  # predicted task-cost increase
    bits: float  # amortized size model, in bits
    lam: float


class _Stacked:
    """All tensors' cost/size tables stacked per group option, so one price is evaluated in a few array ops."""

    def __init__(self, tensors: list[TensorCosts]):
        self.tensors = tensors
        self.noptions = max(len(t.groups) for t in tensors)
        widths = np.array([t.shape[1] for t in tensors])
        self.offsets = np.concatenate([[0], np.cumsum(widths)[:-1]])
        # a tensor with fewer group options repeats its last one
        pick = lambda t, k: min(k, len(t.groups) - 1)
        self.cost = []
        for k in range(self.noptions):
            self.cost.append(np.concatenate([t.cost[pick(t, k)] for t in tensors]))
            for t, lo in zip(tensors, self.offsets):  # the tensors read their tables from the stack: one copy, not two
                if k < len(t.groups):
                    t.cost[k] = self.cost[k][lo:lo + t.shape[1]]
        self.size = [np.concatenate([t.size[pick(t, k)] for t in tensors]) for k in range(self.noptions)]
        self.option = lambda ti, k: pick(tensors[ti], k)

    def choose(self, lam: float) -> tuple[list[int], list[np.ndarray], float, float]:
        per_option = []
        for c, sz in zip(self.cost, self.size):
            obj = np.multiply(sz, lam)  # one [columns, 9] temporary, not two (lam * sz, then the sum)
            obj += c
            b = obj.argmin(1)
            rows = np.arange(len(b))
            per_option.append((b, np.add.reduceat(obj[rows, b], self.offsets), c[rows, b], sz[rows, b]))
        totals = np.stack([o[1] for o in per_option], 1)  # [tensors, options]
        best = totals.argmin(1)
        picks, depths, total_c, total_s = [], [], 0.0, 0.0
        for ti, t in enumerate(self.tensors):
            k = int(best[ti])
            lo = self.offsets[ti]
            hi = lo + t.shape[1]
            b, _, c, sz = per_option[k]
            picks.append(self.option(ti, k))
            depths.append(b[lo:hi].copy())
            total_c += c[lo:hi].sum()
            total_s += sz[lo:hi].sum()
        return picks, depths, total_c, total_s


def allocate(tensors: list[TensorCosts], budget_bits: float) -> Allocation:
    """Depths and group sizes minimising the predicted cost with sum of sizes <= budget_bits."""
    if budget_bits < 0:
        raise ValueError("the budget leaves no bits for the quantized weights")
    stacked = _Stacked(tensors)
    _choose = lambda _, lam: stacked.choose(lam)
    lo, hi = 0.0, 1.0
    while _choose(tensors, hi)[3] > budget_bits:  # a price high enough to fit
        hi *= 4.0
        if hi > 1e300:
            raise ValueError("budget cannot be met even with every column dropped")
    if _choose(tensors, 0.0)[3] <= budget_bits:
        hi = 0.0
    else:
        for _ in range(200):  # bisection in log space between a fitting and a non-fitting price
            mid = np.sqrt(lo * hi) if lo > 0 else hi / 1e6
            if _choose(tensors, mid)[3] > budget_bits:
                lo = mid
            else:
                hi = mid
            if lo > 0 and hi / lo < 1 + 1e-4:  # the greedy fill spends what the last step leaves
                break
    picks, depths, _, used = _choose(tensors, hi)
    depths = _fill(tensors, picks, depths, budget_bits - used)
    return _result(tensors, picks, depths, hi)


def _fill(tensors, picks, depths, slack: float) -> list[np.ndarray]:
    """Spend the leftover bits: one-step upgrades ranked by cost decrease per extra bit."""
    cand = []
    for ti, (t, k, b) in enumerate(zip(tensors, picks, depths)):
        up = np.minimum(b + 1, 8)
        rows = np.arange(len(b))
        gain = t.cost[k][rows, b] - t.cost[k][rows, up]
        extra = t.size[k][rows, up] - t.size[k][rows, b]
        ok = (up > b) & (gain > 0)
        for j in np.nonzero(ok)[0]:
            cand.append((gain[j] / extra[j], extra[j], ti, j))
    cand.sort(key=lambda c: -c[0])
    depths = [d.copy() for d in depths]
    for _, extra, ti, j in cand:
        if extra <= slack:
            depths[ti][j] += 1
            slack -= extra
    return depths


def _result(tensors, picks, depths, lam) -> Allocation:
    rows = lambda b: np.arange(len(b))
    cost = sum(t.cost[k][rows(b), b].sum() for t, k, b in zip(tensors, picks, depths))
    bits = sum(t.size[k][rows(b), b].sum() for t, k, b in zip(tensors, picks, depths))
    return Allocation(
        depths={t.name: b.astype(np.int64) for t, b in zip(tensors, depths)},
        groups={t.name: t.groups[k] for t, k in zip(tensors, picks)},
        cost=float(cost), bits=float(bits), lam=float(lam),
    )
