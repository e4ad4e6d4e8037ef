"""plan: choose one uniform (bits, group size) that keeps the whole artifact under a bits-per-weight target.

Until learned allocation exists this is the budget logic: try depths from 8 down, and for each the finest group
size, and take the first configuration whose predicted artifact size fits. Everything counts: packed codes,
scales, zeros, float tensors left unquantized, safetensors headers and the graph/manifest metadata.
"""
from __future__ import annotations

from dataclasses import dataclass


from xbitc.ir.graph import Graph
from xbitc.footprint import FLOAT_BYTES, artifact_bytes
from xbitc.size import bits_per_weight

from .base import MAX_BPW, MIN_BPW, Pass, PassContext, PassError, option
from .targets import quantizable, weight_roles

GROUPS = (32, 64, 128, 256, 0)  # 0 = one group per row (per-channel)


def float_bytes(graph: Graph, name: str) -> int:
    t = graph.params[name]
    per = FLOAT_BYTES[graph.meta.get("float_dtype", "float16")] if t.is_floating_point() and graph.meta.get("param_kinds", {}).get(name, "parameter") == "parameter" else t.element_size()
    return t.numel() * per


def predict_bytes(graph: Graph, config: dict[str, tuple[int, int]], act_order: bool = False,
                  emitted: tuple[dict, dict] | None = None, pipeline: list[str] | None = None) -> int:
    """Artifact bytes if `config` (param -> (bits, group)) is applied and everything else stays float (plus the
    backend's `emitted` files and notes)."""
    plan = {n: {"bits": b, "group": g} for n, (b, g) in config.items()}
    return artifact_bytes(graph, plan, weight_roles(graph), permute_uniform=act_order, emitted=emitted, pipeline=pipeline)


def budget_advice(ctx: PassContext, count: int, floor: float, target: float, embeddings: bool) -> str:
    """The end of a refused budget's message: what takes the bits when the backend's own files (kernel objects) are a
    large share of `floor` (the smallest bits per weight within reach), and the ways out of `target`."""
    files = (ctx.stats.get("emitted") or ({}, {}))[0]
    emitted = sum(files.values())
    cost = bits_per_weight(emitted, count) if count else 0.0
    text, ways = "", []
    if emitted and cost >= 0.25 * floor:
        folders = ", ".join(sorted({f.split("/")[0] + ("/" if "/" in f else "") for f in files}))
        backend = ctx.stats.get("backend", "the")
        text = (f"; {cost:.3f} of them are the {backend} backend's own files ({folders}: {emitted:,} bytes), "
                f"which a model of {count:,} weights cannot amortize")
        ways.append("compile with --backend reference (its artifact carries no kernel objects and still runs on the "
                    "host's fastest backend)")
    if floor < MAX_BPW:
        ways.append(f"raise --bpw above {floor:.3f}")
    if not embeddings and not (emitted and cost >= target):  # with the kernels alone over the target it cannot help
        ways.append("add --quantize-embeddings")
    return text + "; " + (", or ".join(ways) if ways else "this model cannot be made smaller")


@dataclass(frozen=True)
class PlanUniform(Pass):
    name = "plan"
    provides = frozenset({"planned"})
    bpw: float | None = option(None, MIN_BPW, MAX_BPW)
    bits: int | None = option(None, 1, 8)
    group: int | None = option(None, 0)  # 0 = per-channel
    embeddings: bool = False
    act_order: bool = False  # must match quantize's: GPTQ with act-order stores a column permutation

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        targets = quantizable(graph, self.embeddings)
        if not targets:
            raise PassError("the model has no linear layers to quantize")
        count = graph.source_param_count() or sum(t.numel() for t in graph.params.values())
        bits_options = [self.bits] if self.bits else list(range(8, 0, -1))
        group_options = [self.group] if self.group is not None else list(GROUPS)
        floor = None
        for bits in bits_options:
            for group in group_options:
                config = {n: (bits, group) for n in targets}
                bpw = bits_per_weight(predict_bytes(graph, config, self.act_order, ctx.stats.get("emitted"),
                                                        ctx.pipeline_specs()), count)
                floor = bpw if floor is None else min(floor, bpw)
                if self.bpw is None or bpw <= self.bpw:
                    return self._choose(graph, ctx, config, bits, group, bpw)
        raise PassError(
            f"--bpw {self.bpw} is below what uniform quantization of this model can reach "
            f"(smallest: {floor:.3f} bits per weight with {'embeddings' if self.embeddings else 'embeddings kept float'})"
            + budget_advice(ctx, count, floor, self.bpw, self.embeddings)
        )

    def _choose(self, graph, ctx, config, bits, group, bpw) -> Graph:
        ctx.stats["plan"] = {n: {"bits": b, "group": g} for n, (b, g) in config.items()}
        gtxt = f"group {group}" if group else "per-channel"
        ctx.log(f"plan: {bits}-bit, {gtxt} for {len(config)} tensors -> predicted {bpw:.3f} bits per weight")
        ctx.stats["plan_summary"] = {"bits": bits, "group": group, "predicted_bpw": bpw}
        return graph

