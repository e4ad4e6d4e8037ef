"""xbitc.tensorfile writes the bytes safetensors' own writer writes, from arrays copied one at a time."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from xbitc import tensorfile

DTYPES = [np.bool_, np.uint8, np.int8, np.int16, np.uint16, np.float16, np.int32, np.uint32, np.float32, np.float64,
          np.int64, np.uint64]


@st.composite
def tensor_sets(draw):
    names = draw(st.lists(st.text("abcxyz.0123_", min_size=1, max_size=8), min_size=1, max_size=8, unique=True))
    arrays = {}
    for name in names:
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        seed = draw(st.integers(0, 2**32 - 1))
        raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
        a = raw.view(dtype).reshape(shape) if dtype != np.bool_ else (raw % 2).astype(np.bool_).reshape(shape)
        if a.ndim == 2 and draw(st.booleans()):
            a = a.T  # a strided view, as GPTQ's transposed scales are
        arrays[name] = a
    return arrays


@settings(max_examples=60, deadline=None)
@given(arrays=tensor_sets(), with_metadata=st.booleans())
def test_same_bytes_as_safetensors(tmp_path_factory, arrays, with_metadata):
    folder = tmp_path_factory.mktemp("tf")
    metadata = {"format": "xbitc"} if with_metadata else None
    save_file({k: a.copy(order="C") for k, a in arrays.items()}, str(folder / "theirs"), metadata=metadata)
    tensorfile.save(arrays, folder / "ours", metadata=metadata)
    assert (folder / "ours").read_bytes() == (folder / "theirs").read_bytes()
    back = load_file(str(folder / "ours"))
    assert back.keys() == arrays.keys()
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape and back[name].tobytes() == a.tobytes()


def test_unknown_dtype_is_named(tmp_path):
    try:
        tensorfile.save({"x": np.zeros(2, np.complex64)}, tmp_path / "f")
    except TypeError as err:
        assert "complex64" in str(err)
    else:
        raise AssertionError("complex64 was written")


def test_spilled_arrays_are_written_without_staying_resident(tmp_path):
    """The block-wise compile's finished weights wait in a scratch file (xbitc.spill); writing the artifact reads
    them, and the pages read go back as each piece is written, so writing a model does not hold all of it."""
    from conftest import peak_above
    from xbitc.spill import Spill, page_out

    spill = Spill(tmp_path)
    size = 96 << 20
    arrays = {f"w{i}": spill.array(np.random.default_rng(i).integers(0, 255, size // 2, dtype=np.uint8)) for i in range(2)}
    arrays["anon"] = np.arange(1000, dtype=np.float32)  # not spilled: page_out leaves it alone
    rise = {}
    for name, written in (("kept", None), ("paged out", page_out)):
        rise[name] = peak_above(lambda: tensorfile.save(arrays, tmp_path / f"{name}.safetensors", written=written))
        page_out(arrays["w0"]), page_out(arrays["w1"])  # the next run starts from nothing resident
    assert rise["kept"] > 0.9 * size, rise  # control: reading the maps makes all of them resident
    assert rise["paged out"] < 3 * tensorfile.CHUNK, rise  # a chunk at a time (and what the kernel reads ahead)
    assert (tmp_path / "kept.safetensors").read_bytes() == (tmp_path / "paged out.safetensors").read_bytes()
    assert np.array_equal(load_file(str(tmp_path / "paged out.safetensors"))["w1"], arrays["w1"])


def test_page_out_hands_back_every_page_of_many_small_arrays(tmp_path):
    """Arrays spilled one after another, read, then paged out: none of their pages stay resident. (MADV_PAGEOUT, used
    before, skips a page-cache folio mapped twice or only in part, as the folios at arrays' boundaries are: a third of
    what was read stayed in memory.)"""
    from xbitc.spill import Spill, page_out

    def file_resident():  # bytes of file-backed pages this process maps
        return next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("RssFile:"))

    spill = Spill(tmp_path)
    rng = np.random.default_rng(0)
    arrays = [spill.array(rng.integers(0, 8, 1_400_000 + 4096 * i, dtype=np.uint8)) for i in range(24)]
    before = file_resident()
    total = sum(int(a.sum()) for a in arrays)
    read = file_resident() - before
    assert read > 0.9 * sum(a.nbytes for a in arrays) and total > 0
    for a in arrays:
        page_out(a)
    assert file_resident() - before < 0.02 * read
    assert sum(int(a.sum()) for a in arrays) == total  # read again from the file: nothing was lost
    spill.close()


def test_spilled_arrays_hold_no_file_descriptors_and_unmap_when_gone(tmp_path):
    """A large model spills thousands of arrays: each is a private map of the one scratch file, without a file
    descriptor of its own (np.memmap holds one each; the usual limit is 1024 open files), unmapped once the array
    and every view of it are gone; a write lands in the file and outlives its pages being handed back."""
    import gc
    import os

    from xbitc.spill import Spill, in_scratch, page_out

    def deleted_maps():  # maps of the scratch file (unnamed in tmp_path)
        return sum(1 for line in open("/proc/self/maps") if str(tmp_path) in line and "(deleted)" in line)

    spill = Spill(tmp_path)
    fds = len(os.listdir("/proc/self/fd"))
    arrays = [spill.array(np.arange(1000 + i, dtype=np.float32).reshape(-1, 1)) for i in range(2000)]
    assert len(os.listdir("/proc/self/fd")) == fds
    assert all(np.array_equal(a[:, 0], np.arange(1000 + i, dtype=np.float32)) for i, a in enumerate(arrays))
    view = arrays[7][3:9]
    del arrays
    gc.collect()
    assert deleted_maps() >= 1 and in_scratch(view) and view[:, 0].tolist() == [3, 4, 5, 6, 7, 8]
    again = spill.array(np.zeros(8, np.int8))
    again[2] = 5
    page_out(again)
    assert again.tolist() == [0, 0, 5, 0, 0, 0, 0, 0]
    spill.close()
    del view, again
    gc.collect()
    assert deleted_maps() == 0  # the file's last maps are gone, and with them its disk space


class _Span:
    """What in_scratch reads of an array (its address and size) without touching the memory: a freed map's bytes."""

    def __init__(self, lo: int, nbytes: int):
        self.__array_interface__, self.nbytes = {"data": (lo, False)}, nbytes


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 40_000), min_size=1, max_size=12), dropped=st.sets(st.integers(0, 11)),
       cuts=st.lists(st.tuples(st.integers(0, 11), st.floats(0, 1), st.floats(0, 1)), max_size=10))
def test_in_scratch_knows_exactly_the_live_maps(tmp_path_factory, sizes, dropped, cuts):
    """in_scratch looks a span up among the live maps (sorted by start): true exactly when the span lies inside one
    map still alive; a map whose array is gone leaves the lookup, and a span running past a map's end is not in it."""
    import gc

    import torch

    from xbitc.spill import Spill, in_scratch

    spill = Spill(tmp_path_factory.mktemp("s"))
    arrays = [spill.array(np.full(n, i, np.uint8)) for i, n in enumerate(sizes)]
    spans = [(a.__array_interface__["data"][0], a.nbytes) for a in arrays]
    for i in dropped & set(range(len(arrays))):
        arrays[i] = None
    gc.collect()
    for (lo, n), a in zip(spans, arrays):
        assert in_scratch(_Span(lo, n)) == (a is not None)
        assert not in_scratch(_Span(lo, n + 1))  # one byte past the map (it ends where its array does)
        if a is not None:
            assert in_scratch(a) and in_scratch(torch.from_numpy(a)) and in_scratch(_Span(lo + n - 1, 1))
    for i, a, b in cuts:
        if i < len(arrays) and arrays[i] is not None:
            lo, hi = sorted((int(a * len(arrays[i])), int(b * len(arrays[i]))))
            assert in_scratch(arrays[i][lo:hi]) == (hi > lo)
    assert not in_scratch(np.zeros(64, np.uint8))
    spill.close()
