"""Model loading details that the equivalence tests do not see."""
import gguf
import numpy as np
import pytest

from xbitc.frontend import one_gguf_reader


def write_gguf(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_token_list([f"tok{i}" for i in range(50)])
    w.add_tensor("blk.0.ffn_up.weight", np.arange(24, dtype=np.float32).reshape(4, 6))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_one_gguf_reader_parses_a_file_once_and_reads_the_same(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path)
    real = gguf.GGUFReader
    with one_gguf_reader():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(tmp_path / "." / "m.gguf")) is first  # the same file by another spelling
    assert gguf.GGUFReader is real  # restored
    fresh = gguf.GGUFReader(path)
    assert list(first.fields) == list(fresh.fields)
    assert [t.name for t in first.tensors] == [t.name for t in fresh.tensors]
    np.testing.assert_array_equal(first.tensors[0].data, fresh.tensors[0].data)
    assert first.tensors[0].data.reshape(4, 6)[3, 5] == 23


def test_one_gguf_reader_restores_the_reader_after_an_error(tmp_path):
    real = gguf.GGUFReader
    with pytest.raises(FileNotFoundError), one_gguf_reader():
        gguf.GGUFReader(tmp_path / "missing.gguf")
    assert gguf.GGUFReader is real
