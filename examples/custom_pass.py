"""A user-written pass in a pipeline: keep the first and last block's linears at 8 bits.

    python examples/custom_pass.py [--bits 3]

The pass runs between `plan` (which chose one depth for every weight) and `quantize` (which honours the plan), and
overrides the plan for the blocks next to the embedding and the output. The program compiles the same model with
and without it and reads each artifact's manifest to show what changed: depths per block, size, output error.
"""
from __future__ import annotations

import argparse
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from xbitc import frontend, registry, runtime
from xbitc.driver import CompileOptions, compile_model
from xbitc.ir.graph import Graph
from xbitc.passes.base import Pass, PassContext, PassError


@dataclass(frozen=True)
class KeepEdgeLayers(Pass):
    """Give every planned weight of the first and last `layers.<i>.` block `bits` bits, whatever the plan said."""

    name = "keep-edges"
    requires = frozenset({"planned"})  # a plan must exist to override: the manager refuses the pass before `plan`
    bits: int = 8  # options are dataclass fields: `keep-edges{bits=6}` in a pipeline spec

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if not 1 <= self.bits <= 8:
            raise PassError(f"keep-edges{{bits={self.bits}}}: bits must be 1..8")
        plan = ctx.stats["plan"]  # weight name -> {"bits": int or per-column list, "group": int}, read by quantize
        block = {n: int(m.group(1)) for n in plan if (m := re.search(r"layers\.(\d+)\.", n))}
        if not block:
            raise PassError("keep-edges found no 'layers.<i>.' weights in the plan")
        edges = {min(block.values()), max(block.values())}
        raised = [n for n, i in block.items() if i in edges]
        for n in raised:
            plan[n] = {**plan[n], "bits": self.bits}
        ctx.log(f"keep-edges: {len(raised)} weights of blocks {sorted(edges)} raised to {self.bits} bits")
        return graph  # the graph is untouched; the plan travels in the context


class Block(torch.nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.nn.functional.gelu(self.up(self.norm(h))))


class TinyLM(torch.nn.Module):
    """Token ids -> logits through `layers.<i>` residual MLP blocks: any nn.Module compiles, not only transformers."""

    def __init__(self, vocab: int = 512, dim: int = 128, hidden: int = 512, layers: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(Block(dim, hidden) for _ in range(layers))
        self.norm, self.head = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for block in self.layers:
            h = block(h)
        return self.head(self.norm(h))


def depth_by_block(manifest) -> dict[int, list[int]]:
    """Block index -> sorted distinct depths of its packed tensors, read from the artifact's manifest."""
    out: dict[int, set[int]] = {}
    for name, entry in manifest.tensors.items():
        m = re.search(r"layers\.(\d+)\.", name)
        if m and entry.storage == "packed":
            out.setdefault(int(m.group(1)), set()).update(seg[0] for seg in entry.segments)
    return {i: sorted(d) for i, d in sorted(out.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=3, help="uniform depth the plan gives every other weight")
    args = ap.parse_args()
    # In-process registration; a package would publish the class under the `xbitc.passes` entry-point group instead.
    registry.register(registry.PASS_GROUP, KeepEdgeLayers.name, KeepEdgeLayers)

    model = TinyLM().eval()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    # a plain module is traced from example inputs; batch and sequence length (token ids) stay dynamic
    loaded = frontend.from_module(model, (ids,), name="TinyLM (random weights)")
    with torch.no_grad():
        want = model(ids)
    base = f"canonicalize,plan{{bits={args.bits},group=64}}"
    out_dir = Path(tempfile.mkdtemp(prefix="xbitc-example-"))
    for label, spec in [("without", f"{base},quantize{{method=rtn}},pack"),
                        ("with", f"{base},keep-edges{{bits=8}},quantize{{method=rtn}},pack")]:
        path = out_dir / f"{label}.xbitc"
        manifest = compile_model(loaded, path, CompileOptions(passes=spec, progress=False, log=lambda s: None))
        got = runtime.load(path)(ids)
        err = float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())
        print(f"{label} keep-edges: pipeline {manifest.pipeline}")
        for block, depths in depth_by_block(manifest).items():
            print(f"  {label} block {block}: depths {depths}")
        print(f"  {label} size: {manifest.size.bits_per_weight:.4f} bits per weight")
        print(f"  {label} relative rms error: {err:.4f}")


if __name__ == "__main__":
    main()
