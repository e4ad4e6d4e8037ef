"""Sensitivities of a model whose weights stay in their files: the Fisher diagonal and cost tables a block at a time.

fisher_diagonal takes one backward pass through the whole model, which holds every weight and its gradient. Here the
calibration batches run forward block by block (xbitc.ir.blocks) without gradients, every value a block reads kept
in a scratch file (xbitc.spill); then backward from the head, one block at a time in reverse: the block's weights
are read, its forward is run again from its kept inputs with the weights as leaves, and the gradient of its outputs
(handed down by the block after it) is pulled back to its weights and its inputs. Each weight's squared gradients are
summed as fisher_diagonal sums them, and its cost tables (xbitc.alloc.solve.column_costs) are made as soon as the
last block reading it is done, so the allocation holds tables, not weights.

The same sample draws in the same order and the same per-batch gradients: the result equals fisher_diagonal's up to
the order of float additions. A weight two blocks read (a tied embedding and output layer) has its gradient summed
over both before it is squared; the later block's share waits in the scratch file, one copy per batch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from xbitc import distributed, heap, lazy
from xbitc.ir.blocks import Block, find_blocks
from xbitc.ir.interp import Interpreter, materialize
from xbitc.ir.graph import Graph
from xbitc.objectives import resolve_objective
from xbitc.spill import Spill, page_out

from .sensitivity import _sampled_loss, _skip_draws, fisher_diagonal, perturbed
from .solve import TensorCosts, column_costs

REF = "ref:"  # kept values of the float model's stream (a user objective compares against it)


def blockwise_costs(graph: Graph, names: list[str], batches: list[tuple], objective: str | Callable, groups: list[int],
                    seed: int = 0, progress: bool = True, scratch: Path | None = None) -> dict[str, TensorCosts]:
    """column_costs of every named weight of the lazy `graph` from its Fisher diagonal on `batches`, with one block's
    weights in memory at a time; kept activations go to a scratch file in the folder `scratch` (None: the system's
    temporary folder)."""
    found = find_blocks(graph)
    if not found.layers:  # one block: the whole model is read anyway
        lazy.materialize(graph)
        return whole_graph_costs(graph, names, batches, objective, groups, seed, progress)
    run = _Run(found.blocks, names, batches, resolve_objective(objective), seed, Spill(scratch))
    bar = tqdm(total=2 * len(found.blocks) - 1, desc="sensitivity", leave=False, disable=not progress)
    try:
        run.forward(bar)
        return run.backward(groups, bar)
    finally:
        bar.close()
        run.spill.close()


def whole_graph_costs(graph: Graph, names: list[str], batches: list[tuple], objective: str | Callable,
                      groups: list[int], seed: int = 0, progress: bool = True) -> dict[str, TensorCosts]:
    """column_costs of every named weight from fisher_diagonal over the whole graph in memory."""
    fisher = fisher_diagonal(graph, names, batches, objective, seed, progress)
    return {n: column_costs(graph.params[n], fisher.pop(n), groups, n) for n in names}


class _Run:
    def __init__(self, blocks: list[Block], names: list[str], batches: list[tuple], objective, seed: int, spill: Spill):
        self.blocks, self.batches, self.objective, self.seed, self.spill = blocks, batches, objective, seed, spill
        self.index = {n: k for k, n in enumerate(names)}  # a weight's noise stream under a user objective
        self.first_reader = {n: min(i for i, b in enumerate(blocks) if n in b.params) for n in names}
        self.mine = distributed.my_share(range(len(batches)))
        self.kept: list[dict] = [{} for _ in batches]  # per batch: every value a block reads, by value name

    def _weights(self, block: Block) -> dict[str, torch.Tensor]:
        """The block's parameters as the interpreter's float forms, read from their files."""
        return {name: materialize(block.graph.params[name]) for name in block.params}

    def _perturbed(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`raw` with the named weights perturbed as fisher_diagonal perturbs them for a user objective."""
        return {n: perturbed(w, self.seed, self.index[n]) if n in self.index else w for n, w in raw.items()}

    def forward(self, bar: tqdm) -> None:
        """Run this rank's batches through every block before the head without gradients, keeping what each block
        reads. A user objective also needs the float model's outputs: its stream runs beside the perturbed one."""
        streams = [("", True), (REF, False)] if callable(self.objective) else [("", False)]
        envs = {(prefix, b): dict(zip(self.blocks[0].inputs, self.batches[b]))
                for prefix, _ in streams for b in self.mine}
        for i, block in enumerate(self.blocks):
            for (prefix, b), env in envs.items():
                if prefix == REF and block.kind != "head":  # the float stream is compared at the output only
                    continue
                for name in block.inputs:
                    if prefix + name not in self.kept[b]:
                        self.kept[b][prefix + name] = self._keep(env[name])
            if block.kind == "head":
                return
            later = {n for blk in self.blocks[i + 1:] for n in blk.inputs}
            raw = self._weights(block)
            for prefix, perturb in streams:
                interp = Interpreter(block.graph, weights=self._perturbed(raw) if perturb else dict(raw))
                for b in self.mine:
                    envs[prefix, b] = _advance(interp, block, envs[prefix, b], later)
            del raw, interp
            heap.release()
            bar.update(1)

    def _keep(self, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return self.spill.tensor(value)
        return value

    def backward(self, groups: list[int], bar: tqdm) -> dict[str, TensorCosts]:
        grads: list[dict[str, torch.Tensor]] = [{} for _ in self.batches]  # d loss / d value, per batch
        pending: dict[tuple[str, int], torch.Tensor] = {}  # a weight's gradient from a later block, per batch
        costs: dict[str, TensorCosts] = {}
        gen = torch.Generator().manual_seed(self.seed)
        for i in reversed(range(len(self.blocks))):
            # one call per block: its weights, gradients and sums are gone before the next block's are read
            costs.update(self._backward_block(i, grads, pending, gen, groups))
            heap.release()
            bar.update(1)
        return costs

    def _backward_block(self, i: int, grads: list[dict], pending: dict, gen: torch.Generator,
                        groups: list[int]) -> dict[str, TensorCosts]:
        block = self.blocks[i]
        raw = self._weights(block)
        weights = self._perturbed(raw) if callable(self.objective) else dict(raw)
        leaves = {n: weights[n].detach().requires_grad_(True) for n in block.params if n in self.index}
        weights.update(leaves)
        fisher = {n: torch.zeros_like(w) for n, w in leaves.items() if self.first_reader[n] == i}
        interp = Interpreter(block.graph, grad=True, weights=weights)
        # the inputs' gradients matter only where an earlier block has a weight to measure
        to_inputs = any(self.first_reader[n] < i for n in self.index)
        head = block.kind == "head"
        shapes = self._head_shapes(block, raw) if head and distributed.world_size() > 1 else {}
        for b in range(len(self.batches)) if head else self.mine:
            if b not in self.mine:  # another rank's batch: draw what it draws
                if self.objective in ("kl", "mse"):
                    _skip_draws(self.objective, shapes[b], gen)
                continue
            inputs = [self._input(self.kept[b][n], to_inputs) for n in block.inputs]
            out = interp.run(*inputs)
            wrt = [*leaves.values(), *(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)]
            if head:
                ref = self._reference(block, raw, b) if callable(self.objective) else out.detach()
                _sampled_loss(self.objective, out, ref, self.batches[b], gen).backward(inputs=wrt)
            else:
                pairs = [(o, grads[b].pop(n)) for n, o in zip(block.outputs, out)
                         if n in grads[b] and isinstance(o, torch.Tensor) and o.requires_grad]
                if pairs:
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], inputs=wrt)
            del out
            for name, t in zip(block.inputs, inputs):
                if isinstance(t, torch.Tensor) and t.grad is not None:
                    grads[b][name] = grads[b][name] + t.grad if name in grads[b] else t.grad
            for name, leaf in leaves.items():
                g, leaf.grad = leaf.grad, None
                if g is None:
                    continue
                if (name, b) in pending:
                    g = g + pending.pop((name, b))
                if name in fisher:
                    fisher[name].addcmul_(g, g)  # no temporary the size of the weight
                else:  # an earlier block reads it too: square the sum of both blocks' shares
                    pending[name, b] = self.spill.tensor(g)
        costs = {}
        for name in list(fisher):
            f = fisher.pop(name)
            distributed.all_reduce_sum(f)
            f /= max(len(self.batches), 1)
            costs[name] = column_costs(raw[name], f, groups, name)
        for b in self.mine:  # this block's kept inputs are read no more: hand their pages back
            for name in block.inputs:
                value = self.kept[b].get(name)
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    page_out(value.numpy())
        return costs

    @staticmethod
    def _input(value, grad: bool):
        if grad and isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().requires_grad_(True)
        return value

    def _reference(self, head: Block, raw: dict, b: int) -> torch.Tensor:
        return Interpreter(head.graph, weights=dict(raw)).run(*[self.kept[b][REF + n] for n in head.inputs])

    def _head_shapes(self, head: Block, raw: dict) -> dict[int, torch.Size]:
        """The head's output shape for every batch, this rank's measured and the others' received: what each batch
        draws depends on it (under torchrun only)."""
        dims = torch.zeros(len(self.batches), 9, dtype=torch.int64)
        interp = Interpreter(head.graph, weights=dict(raw))
        for b in self.mine:
            shape = interp.run(*[self.kept[b][n] for n in head.inputs]).shape
            dims[b, 0] = len(shape)
            dims[b, 1:1 + len(shape)] = torch.tensor(shape)
        distributed.all_reduce_sum(dims)
        return {b: torch.Size(dims[b, 1:1 + int(dims[b, 0])].tolist()) for b in range(len(self.batches))}


def _advance(interp: Interpreter, block: Block, env: dict, later: set[str]) -> dict:
    """A batch's values after `block`: what it made, and what it was given, that a later block reads."""
    made = dict(zip(block.outputs, interp.run(*[env[n] for n in block.inputs])))
    return {k: v for k, v in (env | made).items() if k in later}
