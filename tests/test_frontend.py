"""Model loading details that the equivalence tests do not see."""
from pathlib import Path

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


def tiny_program(path, store_inputs=True):
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_lm

    m, x = tiny_lm()
    ep = torch.export.export(m, x, dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    if not store_inputs:
        ep.example_inputs = None
    torch.export.save(ep, path)
    return path


@pytest.mark.parametrize("store_inputs", [True, False])
def test_readme_first_example_compiles_an_exported_program_with_bpw(tmp_path, capsys, store_inputs):
    """`xbitc compile model.pt2 --bpw B` with the default (learned) allocator needs example inputs: the archive's,
    or made from the program's input specs when it stores none."""
    import json

    from xbitc.cli import main

    pt2 = tiny_program(tmp_path / "model.pt2", store_inputs)
    out = tmp_path / "model.xbitc"
    assert main(["compile", str(pt2), "--bpw", "4", "-o", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["kind"] == "generic"


def test_inputs_made_from_the_specs_of_a_program_without_stored_ones(tmp_path):
    import torch

    from xbitc.frontend import exported_inputs

    ep = torch.export.load(str(tiny_program(tmp_path / "m.pt2", store_inputs=False)))
    assert ep.example_inputs is None
    (ids,) = exported_inputs(ep, "m.pt2")
    assert ids.shape == (2, 12) and ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < 96
