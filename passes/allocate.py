"""allocate: learned bit allocation under a whole-model size target.

Measures how sensitive the task cost (objective: kl, ce, mse, or package.module:function) is to every weight on the
calibration data (xbitc.alloc.sensitivity; for a model whose weights stay in their files, a layer block at a time:
xbitc.alloc.blockwise), then gives every column of every quantized tensor — linears, and with
`embeddings` the embedding table and output layer — a depth 0..8 and every tensor a group size, minimising the
predicted cost at the budget (xbitc.alloc.solve). Everything the artifact will hold is counted: tensors left in
float, permutations, scales, zeros, safetensors headers, the graph and the manifest; the solve is repeated on the
exact byte count until the whole model lands just under the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xbitc import lazy
from xbitc.alloc.blockwise import blockwise_costs, whole_graph_costs
from xbitc.alloc.solve import allocate
from xbitc.ir.graph import Graph
from xbitc.footprint import artifact_bytes
from xbitc.objectives import default_objective
from xbitc.quant.segments import segments, stored_runs, stores_perm
from xbitc.size import bits_per_weight, packed_bytes

from .base import MAX_BPW, MIN_BPW, Pass, PassContext, PassError, option
from .plan import budget_advice, float_bytes
from .targets import quantizable, weight_roles

SAFETY_BYTES = 512  # manifest bytes a top-up may add (digits of sizes, longer segment lists)
MARGIN_BPW = 0.001  # aim this far under the target: pass records and timestamps are the only estimated bytes


@dataclass(frozen=True)
class Allocate(Pass):
    name = "allocate"
    provides = frozenset({"planned"})
    bpw: float = option(3.0, MIN_BPW, MAX_BPW)
    objective: str = "auto"  # kl | ce | mse | package.module:function; auto = kl for language models, else mse
    embeddings: bool = True
    groups: str = "64-128-256-0"  # candidate group sizes, '-' separated; 0 = per-channel
    batches: int = option(8, 1)  # calibration batches used for sensitivities
    act_order: bool = True  # must match quantize's: decides whether uniform tensors store a permutation

    needs_calibration = True

    def __post_init__(self) -> None:
        try:
            groups = [int(g) for g in self.groups.split("-")]
        except ValueError:
            groups = []
        if not groups or min(groups) < 0:
            raise PassError(f"option groups={self.groups!r} of pass 'allocate' must be group sizes >= 0 joined by '-' "
                            "(0 = per-channel), e.g. groups=64-128-0")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if not ctx.calib_inputs:
            raise PassError("allocate needs calibration inputs (--calib FILE or --calib self)")
        targets = quantizable(graph, self.embeddings)
        names = sorted(targets)
        count = graph.source_param_count() or sum(t.numel() for t in graph.params.values())
        roles = weight_roles(graph)
        emitted = ctx.stats.get("emitted")  # the backend's files (kernels), counted like everything else
        pipeline = ctx.pipeline_specs()  # the manifest records every pass
        objective = default_objective(self.objective, graph.meta.get("kind"))
        groups = [int(g) for g in self.groups.split("-")]
        # every size below counts the manifest as it will be written: backend name, this pass's summary at its longest
        sized = dict(emitted=emitted, pipeline=pipeline, backend=ctx.stats.get("backend"),
                     summary=_summary(objective, [sum(graph.params[n].shape[1] for n in names)] * 9,
                                      {g: len(names) for g in groups}, -1.2345678901234567e-300))
        fixed = artifact_bytes(graph, {}, roles, **sized)  # all but the quantized tensors' data (and headers)
        fixed -= sum(float_bytes(graph, n) for n in names)
        target_bits = (self.bpw - MARGIN_BPW) * count
        alloc_budget = target_bits - 8 * fixed
        if alloc_budget <= 0:  # known before the sensitivities (the long part): refuse now
            raise self._no_room(ctx, fixed, count)
        batches, progress = ctx.calib_inputs[: self.batches], ctx.stats.get("progress", True)
        if lazy.is_lazy(graph):  # weights still in their files: a block at a time (xbitc.alloc.blockwise)
            by_name = blockwise_costs(graph, names, batches, objective, groups, progress=progress,
                                      scratch=ctx.stats.get("scratch"))
        else:
            by_name = whole_graph_costs(graph, names, batches, objective, groups, progress=progress)
        costs = [by_name.pop(n) for n in names]
        # Bisect the bits given to the solver on the exact artifact size (the solver's size model amortizes
        # group and byte padding; metadata is outside it): land in [target - tolerance, target].
        tolerance = 0.002 * count
        fits, over = 0.0, None
        best = None
        for _ in range(40):
            if alloc_budget <= 0:
                break
            result = allocate(costs, alloc_budget)
            plan = {n: {"bits": result.depths[n].tolist(), "group": result.groups[n]} for n in names}
            total = artifact_bytes(graph, plan, roles, permute_uniform=self.act_order, **sized)
            miss = target_bits - 8 * total
            if miss >= 0:
                fits, best = alloc_budget, (result, plan, total)
                if miss <= tolerance:
                    break
            else:
                over = alloc_budget
            alloc_budget = (fits + over) / 2 if over is not None else alloc_budget + miss
            if over is not None and over - fits < 8:
                break
        if best is None:
            raise self._no_room(ctx, fixed, count) if alloc_budget <= 0 else PassError("allocation did not converge on the budget")
        if best is not None:
            result, plan, total = best
            slack = (target_bits + MARGIN_BPW * count) / 8 - total  # bytes left under the target itself
            for _ in range(8):  # each round offers every column one more bit; stop when a round buys nothing
                plan, spent = top_up(costs, plan, graph, slack - SAFETY_BYTES, self.act_order)
                slack -= spent
                if spent == 0:
                    break
            total = artifact_bytes(graph, plan, roles, permute_uniform=self.act_order, **sized)
        achieved = bits_per_weight(total, count)
        ctx.stats["plan"] = plan
        hist = np.bincount(np.concatenate([result.depths[n] for n in names]), minlength=9)
        used = sorted(set(result.groups.values()))
        ctx.stats["plan_summary"] = _summary(objective, hist.tolist(),
                                             {g: sum(1 for n in names if result.groups[n] == g) for g in used},
                                             result.cost, result.lam, round(achieved, 4))
        ctx.log(f"allocate: {len(names)} tensors, predicted {achieved:.3f} bits per weight; columns by depth 0..8: {hist.tolist()}")
        return graph


    def _no_room(self, ctx: PassContext, fixed: int, count: int) -> PassError:
        floor = bits_per_weight(fixed, count)
        return PassError(
            f"--bpw {self.bpw} leaves no room for the quantized weights: the tensors kept in float and the "
            f"artifact's metadata alone take {floor:.3f} bits per weight{budget_advice(ctx, count, floor, self.bpw, self.embeddings)}"
        )


def _tensor_bytes(shape, counts: np.ndarray, group: int, permute_uniform: bool) -> int:
    """Exact packed bytes of a tensor with `counts[d]` columns at depth d."""
    segs = segments(stored_runs(counts), group)
    return packed_bytes(shape, segs, stores_perm(segs, permute_uniform))


def top_up(costs, plan: dict, graph: Graph, slack: float, permute_uniform: bool) -> tuple[dict, float]:
    """Spend the bytes left under the target on one-step column upgrades, best cost decrease per byte first, with
    each tensor's size recomputed exactly (segments, group and byte padding, permutation)."""
    cands = []
    for ti, t in enumerate(costs):
        k = t.groups.index(min(plan[t.name]["group"] or t.shape[1], t.shape[1]))
        b = np.asarray(plan[t.name]["bits"])
        up = np.minimum(b + 1, 8)
        rows = np.arange(len(b))
        gain = t.cost[k][rows, b] - t.cost[k][rows, up]
        extra = t.size[k][rows, up] - t.size[k][rows, b]
        for j in np.nonzero((up > b) & (gain > 0))[0]:
            cands.append((gain[j] / extra[j], ti, int(j)))
    cands.sort(key=lambda c: -c[0])
    depths = {t.name: np.asarray(plan[t.name]["bits"]).copy() for t in costs}
    counts = {n: np.bincount(d, minlength=9) for n, d in depths.items()}
    sizes: dict[str, int] = {}  # each tensor's bytes at its current counts, once measured
    start = slack
    for _, ti, j in cands:
        if slack <= 0:
            break
        t = costs[ti]
        group = plan[t.name]["group"]
        d = depths[t.name][j]
        if d >= 8:
            continue
        if t.name not in sizes:
            sizes[t.name] = _tensor_bytes(t.shape, counts[t.name], group, permute_uniform)
        counts[t.name][d] -= 1
        counts[t.name][d + 1] += 1
        after = _tensor_bytes(t.shape, counts[t.name], group, permute_uniform)
        delta = after - sizes[t.name]
        if delta <= slack:
            depths[t.name][j] = d + 1
            sizes[t.name] = after
            slack -= delta
        else:
            counts[t.name][d] += 1
            counts[t.name][d + 1] -= 1
    return {n: {"bits": depths[n].tolist(), "group": plan[n]["group"]} for n in plan}, start - slack


def _summary(objective: str, histogram: list[int], groups: dict[int, int], cost: float, lam: float | None = None,
             bpw: float = 99.9999) -> dict:
    """What the manifest records of a learned plan; the size planning renders it with its numbers at their longest."""
    return {"allocator": "learned", "objective": objective, "predicted_bpw": bpw, "predicted_cost": cost,
            "lambda": cost if lam is None else lam, "column_depth_histogram": histogram,
            "groups": {str(g): n for g, n in groups.items()}}
