"""One stored layout for quantized matrices: what the planners predict from a plan (xbitc.footprint for the artifact,
passes/allocate for its top-up) is exactly what the quantizers write (RTN, and GPTQ in every column order, with and
without act_order): the same segments, permutation, array names, dtypes and shapes, and so the same bytes."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xbitc.footprint import segments_of
from xbitc.passes.allocate import _tensor_bytes
from xbitc.quant.format import QuantizedMatrix, Segment
from xbitc.quant.gptq import DEPTH_ORDERS, gptq_quantize
from xbitc.quant.packed import PackedMatrix, planned_tensors
from xbitc.quant.rtn import rtn_any
from xbitc.size import packed_bytes

SAFETENSORS = {np.uint8: "U8", np.uint16: "U16", np.int32: "I32", np.float16: "F16"}


def _written(rows: int, bits, group: int, act_order: bool, seed: int) -> dict[str, PackedMatrix]:
    """The packed matrices the quantizers make for the plan entry {"bits": bits, "group": group}, the way the
    quantize pass calls them (group 0 = per-channel); RTN only without act_order (it never orders by data)."""
    inp = len(bits) if isinstance(bits, list) else 7
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, inp, generator=g)
    x = torch.randn(2 * inp + 2, inp, generator=g)
    h = 2 * x.T @ x / len(x)
    depths = bits if isinstance(bits, int) else np.asarray(bits, dtype=np.int64)
    made = {f"gptq {o}": gptq_quantize(w, h, depths, group or inp, act_order=act_order, depth_order=o)
            for o in DEPTH_ORDERS}
    if not act_order:
        made["rtn"] = rtn_any(w, bits, group or inp)
    return {who: PackedMatrix.from_quantized(q) for who, q in made.items()}


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 3),
    bits=st.one_of(st.lists(st.integers(0, 8), min_size=1, max_size=24), st.integers(1, 8)),
    group=st.sampled_from([0, 1, 2, 3, 5, 8, 64]),  # 0: per-channel; 64: wider than any segment
    act_order=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_planned_layout_is_the_written_layout(rows, bits, group, act_order, seed):
    inp = len(bits) if isinstance(bits, list) else 7
    shape = (rows, inp)
    segs, permuted = segments_of(bits, group, inp, reorders=act_order)
    planned = planned_tensors("w", shape, segs, permuted)
    size = packed_bytes(shape, segs, permuted)
    if isinstance(bits, list):  # allocate's top-up prices a tensor from its depth counts alone
        assert _tensor_bytes(shape, np.bincount(bits, minlength=9), group, act_order) == size
    for who, p in _written(rows, bits, group, act_order, seed).items():
        desc = p.describe()
        assert desc["segments"] == [[s.bits, s.group_size, s.start, s.stop] for s in segs], who
        assert desc["permuted"] == permuted, who
        arrays = p.tensors("w")
        assert {n: (SAFETENSORS[a.dtype.type], list(a.shape)) for n, a in arrays.items()} == planned, who
        assert p.nbytes == size, who
        np.testing.assert_array_equal(p.column_bits(), np.broadcast_to(bits, (inp,)))


def test_segments_run_from_the_finest_depth_down_whatever_order_gptq_worked_in():
    """GPTQ's depth order is the order it quantizes in (it changes the codes), not the stored order."""
    depths = [2, 0, 4, 2, 4, 0, 2]
    want = [Segment(4, 2, 0, 2), Segment(2, 3, 2, 5), Segment(0, 1, 5, 7)]
    assert segments_of(depths, 3, 7)[0] == want
    for p in _written(2, depths, 3, False, 0).values():
        assert [ps.seg for ps in p.segments] == want
        np.testing.assert_array_equal(p.perm, [2, 4, 0, 3, 6, 1, 5])  # inside a segment: original order


def test_a_reordered_matrix_stores_its_permutation_even_when_it_is_the_identity():
    """Depths already in stored order, or a Hessian already in act_order: the plan cannot see that, so the
    permutation is stored anyway (the prediction is the size, not a bound)."""
    depths = [8, 8, 3, 3, 0]
    assert segments_of(depths, 2, 5)[1]
    for p in _written(2, depths, 2, False, 0).values():
        np.testing.assert_array_equal(p.perm, np.arange(5))
    h = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0]))  # act_order keeps the identity
    q = gptq_quantize(torch.randn(3, 4), h, 4, 4, act_order=True)
    np.testing.assert_array_equal(q.perm, np.arange(4))
    assert gptq_quantize(torch.randn(3, 4), h, 4, 4, act_order=False).perm is None  # uniform, index order


def test_the_permutation_is_uint16_while_the_column_indices_fit():
    for inp, code in [(1 << 16, "U16"), ((1 << 16) + 1, "I32")]:
        depths = np.zeros(inp, dtype=np.int64)
        depths[-1] = 1  # two segments: permuted
        segs, permuted = segments_of(depths.tolist(), 0, inp)
        q = QuantizedMatrix(
            (1, inp), segs, [np.zeros((1, s.ncols), np.uint8) for s in segs],
            [np.ones((1, s.ngroups), np.float16) for s in segs], [np.zeros((1, s.ngroups), np.uint8) for s in segs],
            np.roll(np.arange(inp), 1),
        )
        p = PackedMatrix.from_quantized(q)
        assert planned_tensors("w", (1, inp), segs, permuted)["w.perm"] == (code, [inp])
        assert SAFETENSORS[p.perm.dtype.type] == code
        assert p.nbytes == packed_bytes((1, inp), segs, permuted)
