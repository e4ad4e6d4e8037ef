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
