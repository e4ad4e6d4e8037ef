"""Many processes through torch.distributed (gloo, 2 ranks on this machine) against one process.

Both sides run with one thread per process, so every batch's own numbers are computed identically; the ranks' sums
differ from one process's only in the order of the additions:
- Hessians are summed in float64 and handed on in float32: the two can differ by at most one float32 ulp;
- sensitivities are sums of B nonnegative float32 squares: any two orders of the B - 1 additions differ by at most
  2 (B - 1) 2^-24 of the sum;
- the rest (allocation, GPTQ, tuning) is computed from those, and quantized matrices travel bit for bit. With this
  fixed data no rounding decision lands on a tie, so the quantized results and the artifact are equal.
"""
from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.numpy import load_file

from xbitc import distributed, frontend
from xbitc.alloc.sensitivity import fisher_diagonal
from xbitc.cli import main
from xbitc.driver import CompileOptions, compile_model
from xbitc.passes.base import PassContext, PassError
from xbitc.passes.calibrate import Calibrate
from xbitc.passes.gptq import quantize_gptq
from xbitc.passes.quantize import Quantize
from xbitc.passes.targets import quantizable

HERE = Path(__file__).parent
BATCHES = 5  # odd: the ranks hold 3 and 2 batches


class Block(torch.nn.Module):
    """q/k/v and gate/up read one input each: GPTQ quantizes each such group across the ranks."""

    def __init__(self, vocab: int = 64, dim: int = 32, hidden: int = 48):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        lin = torch.nn.Linear
        self.emb = torch.nn.Embedding(vocab, dim)
        self.q, self.k, self.v, self.o = lin(dim, dim), lin(dim, dim), lin(dim, dim), lin(dim, dim)
        self.gate, self.up, self.down, self.head = lin(dim, hidden), lin(dim, hidden), lin(hidden, dim), lin(dim, vocab)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def forward(self, ids):
        h = self.emb(ids)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 32**0.5, -1) @ self.v(h)
        h = h + self.o(att)
        h = h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))
        return self.head(h)


def _loaded():
    return frontend._from_module(Block(), (torch.zeros(1, 8, dtype=torch.long),), "block", "0")


def _batches():
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 64, (1, 8), generator=g),) for _ in range(BATCHES)]


def _matrices(params: dict, names) -> dict:
    out = {}
    for n in names:
        qm = params[n]
        arrays = [*qm.codes, *qm.scales, *qm.zeros] + ([qm.perm] if qm.perm is not None else [])
        out[n] = {"arrays": [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays], "meta": json.dumps(qm.meta)}
    return out


def _measure() -> dict:
    """What each pass computes; identical calls in one process and on every rank of a group."""
    batches = _batches()
    traced = frontend.trace(_loaded())
    g = copy.deepcopy(traced)
    names = sorted(quantizable(g, True))
    res = {"fisher_" + obj: fisher_diagonal(g, names, batches, obj, progress=False) for obj in ("kl", "mse")}
    ctx = PassContext(calib_inputs=batches, log=lambda s: None, stats={"progress": False})
    Calibrate().run(g, ctx)
    res["hessian"] = ctx.stats["hessian"]
    res["tokens"] = ctx.stats["calib_tokens"]
    plan = {n: {"bits": 3, "group": 16} for n in names}  # emb.weight takes the RTN tail (read by no linear)
    quantize_gptq(g, ctx, plan, clip=False)
    res["gptq"] = _matrices(g.params, names)
    g = traced
    ctx.stats["plan"] = plan
    Quantize(method="rtn", clip=False).run(g, ctx)
    res["rtn"] = _matrices(g.params, names)
    return res


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with distributed.group():
        res = _measure()
        values = [np.full((3, 2), rank, np.float16), torch.full((5,), rank + 0.5, dtype=torch.bfloat16)]
        distributed.sync_from_main(values)
        res["synced"] = [torch.from_numpy(values[0]), values[1]]
        # the same bad input on every rank: one reports it, the other ends as PeerFailed
        try:
            compile_model(_loaded(), Path(folder) / "never.xbitc",
                          CompileOptions(bpw=3, calib_windows=1, log=lambda s: None, progress=False))
        except (PassError, distributed.PeerFailed) as err:
            res["failure"] = f"{type(err).__name__}: {err}"
    torch.save(res, Path(folder) / f"{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """_measure() in one process and on both ranks of a gloo group."""
    folder = tmp_path_factory.mktemp("ranks")
    ctx = mp.spawn(_worker, args=(2, free_port(), str(folder)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-rank group did not finish in 300 s")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        alone = _measure()
    finally:
        torch.set_num_threads(threads)
    return alone, [torch.load(folder / f"{r}.pt") for r in range(2)]


def test_sums_over_ranks_match_one_process(ranks):
    alone, group = ranks
    sens_rtol = 2 * (BATCHES - 1) * 2.0**-24  # see the module docstring
    for res in group:
        for obj in ("fisher_kl", "fisher_mse"):
            assert alone[obj].keys() == res[obj].keys()
            for n, f in alone[obj].items():
                assert f.abs().max() > 0
                torch.testing.assert_close(res[obj][n], f, rtol=sens_rtol, atol=0)
        assert res["tokens"] == alone["tokens"] == BATCHES * 8
        for n, h in alone["hessian"].items():
            torch.testing.assert_close(res["hessian"][n], h, rtol=2.0**-23, atol=0)  # one float32 ulp
    for obj in ("fisher_kl", "fisher_mse", "hessian"):  # all-reduce gives every rank the same bits
        for n in alone[obj]:
            assert torch.equal(group[0][obj][n], group[1][obj][n])


def test_quantized_matrices_are_the_same_on_every_rank_and_as_one_process(ranks):
    alone, group = ranks
    for kind in ("gptq", "rtn"):
        for res in group:
            assert res[kind].keys() == alone[kind].keys()
            for n, m in alone[kind].items():
                assert res[kind][n]["meta"] == m["meta"]
                assert all(torch.equal(a, b) for a, b in zip(res[kind][n]["arrays"], m["arrays"], strict=True)), n
    assert len(group[0]["gptq"]["q.weight"]["arrays"]) == 3 * 1 + 1  # one segment, and the act-order permutation


def test_sync_from_main_gives_every_rank_rank_0s_values(ranks):
    for res in ranks[1]:
        assert torch.equal(res["synced"][0], torch.zeros(3, 2, dtype=torch.float16))
        assert torch.equal(res["synced"][1], torch.full((5,), 0.5, dtype=torch.bfloat16))


def test_bad_input_is_reported_by_one_rank(ranks):
    failures = sorted(res["failure"] for res in ranks[1])
    assert failures[0].startswith("PassError: --calib-windows 1 is fewer than the 2 processes")
    assert failures[1].startswith("PeerFailed")


def test_one_process_helpers_are_no_ops():
    assert (distributed.rank(), distributed.world_size(), distributed.my_share([1, 2, 3])) == (0, 1, [1, 2, 3])
    t = torch.ones(2)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.ones(2))
    assert distributed.sum_over_ranks(2.5) == 2.5 and distributed.first_failure()


# --- the command line under torchrun ---------------------------------------------------------------------------

def _env(cwd: Path) -> dict:
    return {"PYTHONPATH": f"{HERE}:{cwd}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def compile_cli(args: list[str], cwd: Path, nproc: int | None) -> subprocess.CompletedProcess:
    launch = [] if nproc is None else ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                                        str(free_port())]
    return subprocess.run([sys.executable, *launch, "-m", "xbitc.cli", "compile", *args], cwd=cwd, capture_output=True,
                          text=True, env=_env(cwd), timeout=600)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_two_ranks_write_the_one_process_artifact(tmp_path):
    args = ["compile", "conftest:tiny_lm", "--bpw", "3", "--method", "gptq"]  # sensitivities, GPTQ and tuning
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (torchrun sets OMP_NUM_THREADS=1)
    try:
        assert main([*args, "-o", str(tmp_path / "one.xbitc")]) == 0
    finally:
        torch.set_num_threads(threads)
    two = compile_cli([*args[1:], "-o", "two.xbitc"], tmp_path, 2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote two.xbitc") == 1 and two.stdout.count("allocate:") == 1  # rank 0 speaks
    assert leftovers(tmp_path) == []
    a, b = (json.loads((tmp_path / f"{n}.xbitc" / "manifest.json").read_text()) for n in ("one", "two"))
    assert a["tensors"] == b["tensors"]  # the plan: every tensor's column depths, groups and bytes
    wa, wb = (load_file(tmp_path / f"{n}.xbitc" / "weights.safetensors") for n in ("one", "two"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "one.xbitc" / "graph.json").read_bytes() == (tmp_path / "two.xbitc" / "graph.json").read_bytes()


# the learned pipeline covers both sums (sensitivities and Hessians); uniform GPTQ, the Hessians alone, runs in the
# slow suite (each variant is two compiles, one under torchrun: ~40 s)
@pytest.mark.parametrize("pipeline", [pytest.param(["--bits", "3"], marks=pytest.mark.slow),
                                      ["--bpw", "6", "--tune-steps", "0"]])
def test_two_ranks_stream_a_folder_block_by_block_as_one_process_does(tmp_path, pipeline):
    """A Hugging Face folder with --bits B (or --bpw B without tuning) --method gptq is measured and quantized a layer
    block at a time (xbitc.streaming, xbitc.alloc.blockwise): each rank drives its share of the windows through every
    block, sensitivities and Hessians are summed, and the artifact is the one-process one byte for byte."""
    from xbitc import synthetic

    cfg = synthetic.llama_config(layers=2, hidden=128, intermediate=256, vocab=1000, heads=4, kv_heads=2)
    synthetic.write_llama(tmp_path / "hf", cfg, shard_bytes=100_000)
    args = ["hf", *pipeline, "--method", "gptq", "--calib-windows", "4", "--calib-len", "32", "--max-memory", "2GB"]
    one = compile_cli([*args, "-o", "one.xbitc"], tmp_path, None)
    assert one.returncode == 0, one.stderr
    two = compile_cli([*args, "-o", "two.xbitc"], tmp_path, 2)
    assert two.returncode == 0, two.stderr
    assert "memory: about" in two.stdout and two.stdout.count("wrote two.xbitc") == 1
    assert leftovers(tmp_path) == []
    for name in ("weights.safetensors", "graph.json"):
        assert (tmp_path / "one.xbitc" / name).read_bytes() == (tmp_path / "two.xbitc" / name).read_bytes()


@pytest.mark.slow  # two torchrun compiles (~15 s each); test_bad_input_is_reported_by_one_rank stays in the default suite
@pytest.mark.parametrize("failing", [1, 0])
def test_a_failing_rank_ends_the_run_with_one_error_and_no_artifact(tmp_path, failing):
    (tmp_path / "failing_cost.py").write_text(
        "import os\n"
        f"def cost(out, ref, batch):\n"
        f"    if os.environ['RANK'] == '{failing}':\n"
        "        raise ValueError('this cost fails on rank ' + os.environ['RANK'])\n"
        "    return ((out - ref) ** 2).mean()\n"
    )
    run = compile_cli(["conftest:tiny_lm", "--bpw", "3", "--objective", "failing_cost:cost", "-o", "out.xbitc"],
                      tmp_path, 2)
    assert run.returncode != 0
    # rank 0's progress bars share the stream with the other rank's message: find it wherever it starts
    errors = re.findall(r"xbitc: [^\r\n]*", run.stdout + run.stderr)
    assert len(errors) == 1 and f"this cost fails on rank {failing}" in errors[0], run.stderr
    assert not (tmp_path / "out.xbitc").exists() and leftovers(tmp_path) == []
