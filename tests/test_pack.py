import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from xbitc.quant.pack import pack, packed_nbytes, row_bytes, unpack


@st.composite
def code_matrices(draw):
    bits = draw(st.integers(1, 8))
    rows = draw(st.integers(0, 9))
    cols = draw(st.integers(0, 70))
    codes = draw(arrays(np.uint8, (rows, cols), elements=st.integers(0, (1 << bits) - 1)))
    return bits, codes


@given(code_matrices())
def test_unpack_inverts_pack_for_every_depth_and_shape(case):
    bits, codes = case
    packed = pack(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (codes.shape[0], row_bytes(codes.shape[1], bits))
    assert packed.nbytes == packed_nbytes(*codes.shape, bits)
    np.testing.assert_array_equal(unpack(packed, bits, codes.shape[1]), codes)


@given(st.integers(1, 8), st.integers(1, 40))
def test_packing_is_dense(bits, n):
    # no padding beyond the final byte of each row: ceil(n*bits/8) bytes
    assert row_bytes(n, bits) * 8 - n * bits < 8


def test_lsb_first_bit_order_is_fixed():
    # golden: codes 1,2,3 at 2 bits -> bits 01 10 11 (LSB first) -> 0b00111001
    assert pack(np.array([[1, 2, 3]], np.uint8), 2).tolist() == [[0b00111001]]
    assert pack(np.array([[5, 3]], np.uint8), 3).tolist() == [[0b00011101]]


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="cannot be packed at 2 bits"):
        pack(np.array([[4]], np.uint8), 2)
    with pytest.raises(ValueError, match="1..8"):
        pack(np.zeros((1, 1), np.uint8), 9)
