"""Model loading details that the equivalence tests do not see."""
import re
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


# --- inputs of plain modules: --input, inference from the first layer, refusals (issue 14) -------------------------

def compile_cli(args, capsys):
    from xbitc.cli import main

    code = main(["compile", *map(str, args)])
    err = capsys.readouterr().err.strip()
    return code, err


def token_mlp():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 256), torch.nn.GELU(),
                               torch.nn.Linear(256, 100))


def input_types(out):
    from xbitc.runtime import load

    m = load(out, backend="reference")
    return m, [n.type.shape for n in m.graph.inputs()]


def test_input_specs_parse_and_bad_ones_get_one_line():
    import torch

    from xbitc.frontend import LoadError, parse_input, parse_inputs

    s = parse_input("ids:1x16:int64")
    assert (s.name, s.shape, s.axis_names, s.dtype) == ("ids", (1, 16), (None, None), torch.int64)
    s = parse_input("ids:batchxseq=32:int64")
    assert s.shape == (2, 32) and s.axis_names == ("batch", "seq")
    s = parse_input("x:batch,max_len,3")  # ',' when a name holds an x; dtype defaults to float32
    assert s.shape == (2, 8, 3) and s.axis_names == ("batch", "max_len", None) and s.dtype == torch.float32
    bad = {
        "ids": "is not NAME:SHAPE[:DTYPE]",
        "ids:1x16:int65": "unknown dtype 'int65'",
        "ids:1x0:int64": "size 0 must be 1 or more",
        "ids:1x-3": "neither a size nor a dimension name",
        "ids:seq=1": "trace dynamic dimension 'seq' at 2 or more",
    }
    for text, words in bad.items():
        with pytest.raises(LoadError, match=re.escape(words)) as info:
            parse_input(text)
        assert "\n" not in str(info.value)
    with pytest.raises(LoadError, match="given twice"):
        parse_inputs(["x:2x3", "x:2x3"])


def test_headline_command_on_a_torch_saved_module_infers_its_inputs(tmp_path, capsys):
    """`xbitc compile model.pt --bpw 3 --trust-pickle` on torch.save(module): token ids inferred from the first
    layer (an Embedding), batch and sequence dynamic."""
    import torch

    pt = tmp_path / "model.pt"
    torch.save(token_mlp(), pt)
    out = tmp_path / "m.xbitc"
    code, err = compile_cli([pt, "--bpw", "5", "--trust-pickle", "-o", out], capsys)
    assert code == 0, err
    model, shapes = input_types(out)
    assert len(shapes) == 1 and all(isinstance(d, str) for d in shapes[0])  # both axes dynamic
    assert model(torch.randint(0, 100, (3, 5))).shape == (3, 5, 100)


def test_inputs_inferred_from_a_first_linear_or_conv(tmp_path):
    import torch

    from xbitc import frontend

    mlp = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.ReLU(), torch.nn.Linear(48, 4))
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(1))
    conv1 = torch.nn.Sequential(torch.nn.Conv1d(5, 8, 3), torch.nn.ReLU())
    for module, shape in [(mlp, (2, 24)), (conv, (2, 3, 32, 32)), (conv1, (2, 5, 64))]:
        path = tmp_path / f"{len(shape)}.pt"
        torch.save(module, path)
        loaded = frontend.load(str(path), trust_pickle=True)
        (x,) = loaded.example_inputs
        assert tuple(x.shape) == shape and x.dtype == torch.float32
        graph = frontend.trace(loaded)
        (batch, *rest) = graph.inputs()[0].type.shape
        assert isinstance(batch, str) and rest == list(shape[1:])  # batch dynamic, the rest static


def test_input_flag_static_shapes_are_refused_up_front_and_named_ones_stay_dynamic(tmp_path, capsys):
    import torch

    from xbitc.runtime import InputShapeError

    pt = tmp_path / "model.pt"
    torch.save(token_mlp(), pt)
    static, dynamic = tmp_path / "static.xbitc", tmp_path / "dynamic.xbitc"
    assert compile_cli([pt, "--bits", "4", "--trust-pickle", "--input", "ids:1x16:int64", "-o", static], capsys)[0] == 0
    assert compile_cli([pt, "--bits", "4", "--trust-pickle", "--input", "ids:batchxseq:int64", "-o", dynamic],
                       capsys)[0] == 0
    model, shapes = input_types(static)
    assert shapes == [(1, 16)]
    assert model(torch.randint(0, 100, (1, 16))).shape == (1, 16, 100)
    with pytest.raises(InputShapeError) as info:
        model(torch.randint(0, 100, (2, 16)))
    assert str(info.value) == ("input 'input' has shape [2, 16], but this model was compiled for [1, 16] (N: any size); "
                               "pass that shape, or compile again with the sizes that vary named, e.g. --input "
                               "input:batchx16:int64")
    model, shapes = input_types(dynamic)
    assert model(torch.randint(0, 100, (3, 5))).shape == (3, 5, 100)
    code, err = compile_cli([pt, "--bits", "4", "--trust-pickle", "--input", "ids:2", "--input", "ids:3", "-o", static],
                            capsys)
    assert code == 2 and "given twice" in err


def test_input_flag_on_a_program_must_fit_its_sizes(tmp_path, capsys):
    """A .pt2 (batch dynamic, sequence 12) takes --input in its own sizes; a wrong size or count gets one line."""
    pt2 = tiny_program(tmp_path / "model.pt2")
    out = tmp_path / "m.xbitc"
    code, err = compile_cli([pt2, "--bits", "4", "--input", "ids:batch=3x12:int64", "-o", out], capsys)
    assert code == 0, err
    code, err = compile_cli([pt2, "--bits", "4", "--input", "ids:2x13:int64", "-o", out], capsys)
    assert code == 2 and err.endswith("--input ids: shape 2x13 does not fit the program's input ids (Nx12, N: any size)")
    code, err = compile_cli([pt2, "--bits", "4", "--input", "ids:2x12:int64", "--input", "mask:2x12", "-o", out], capsys)
    assert code == 2 and "takes 1 input (ids) and --input gives 2" in err


@pytest.mark.parametrize("module, words", [
    ("norm_first", "from its first layer (LayerNorm)"),
    ("two_inputs", "forward takes 2 required arguments"),
])
def test_modules_whose_inputs_cannot_be_inferred_get_one_line(tmp_path, capsys, module, words):
    import torch

    made = {
        "norm_first": torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)),
        "two_inputs": torch.nn.Bilinear(4, 4, 4),
    }[module]
    pt = tmp_path / "model.pt"
    torch.save(made, pt)
    code, err = compile_cli([pt, "--bits", "4", "--trust-pickle", "-o", tmp_path / "o.xbitc"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and words in err and "--input NAME:SHAPE:DTYPE" in err


def test_state_dicts_text_files_and_bad_gguf_get_one_line(tmp_path, capsys):
    import torch

    sd = tmp_path / "weights.pt"
    torch.save(token_mlp().state_dict(), sd)
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes, not a model\n")
    good = tmp_path / "good.gguf"
    write_gguf(good)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-40])
    other = tmp_path / "other.gguf"
    other.write_text("not gguf at all")
    cases = [
        ([sd, "--trust-pickle"], "holds a state_dict or checkpoint"),
        ([sd, "--trust-pickle"], "a torch.export program (.pt2) or a Hugging Face folder"),
        ([text, "--trust-pickle"], "cannot be unpickled (UnpicklingError"),
        ([cut], "is a truncated or damaged GGUF file"),
        ([other], "is not a GGUF file (it starts with b'not ', not b'GGUF')"),
    ]
    for args, words in cases:
        code, err = compile_cli([*args, "--bits", "4", "-o", tmp_path / "o.xbitc"], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and words in err, (args, err)


def test_a_transformers_model_saved_with_torch_save(tmp_path, capsys):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    pt = tmp_path / "llama.pt"
    torch.save(transformers.LlamaForCausalLM(cfg), pt)
    out = tmp_path / "llama.xbitc"
    code, err = compile_cli([pt, "--bits", "4", "--trust-pickle", "-o", out], capsys)
    assert code == 0, err
    model, shapes = input_types(out)
    assert model.manifest.kind == "causal-lm" and all(isinstance(d, str) for d in shapes[0])
    code, err = compile_cli([pt, "--bits", "4", "--trust-pickle", "--input", "ids:1x8:int64", "-o", out], capsys)
    assert code == 2 and "is a transformers model, whose inputs xbitc makes itself: leave --input out" in err


# --- Whisper's encoder on its own (issue 14) -----------------------------------------------------------------------

def tiny_whisper_config():
    import transformers

    return transformers.WhisperConfig(
        d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=30, max_target_positions=16,
        vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )


def test_a_whisper_encoder_compiles_and_encoder_decoders_are_refused_by_class(tmp_path):
    import torch
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from xbitc import frontend
    from xbitc.driver import CompileOptions, compile_model
    from xbitc.runtime import load

    cfg = tiny_whisper_config()
    assert cfg.is_encoder_decoder  # the flag the encoder shares with the whole model
    torch.manual_seed(0)
    encoder = WhisperEncoder(cfg).eval()
    loaded = frontend.wrap_hf(encoder, source="whisper-encoder")
    (feats,) = loaded.example_inputs
    assert loaded.kind == "audio" and tuple(feats.shape) == (2, 16, 60)  # frames = 2 * max_source_positions
    out = tmp_path / "enc.xbitc"
    compile_model(loaded, out, CompileOptions(bits=8, group=32, log=lambda s: None, progress=False))
    model = load(out, backend="reference")
    x = torch.randn(3, 16, 60)  # another batch size: batch stays dynamic
    with torch.no_grad():
        want = encoder(input_features=x).last_hidden_state
    got = model(x)
    assert got.shape == want.shape and torch.allclose(got, want, atol=0.1)
    for whole in (transformers.WhisperForConditionalGeneration(cfg), transformers.WhisperModel(cfg)):
        with pytest.raises(frontend.LoadError, match=f"{type(whole).__name__} is an encoder-decoder model"):
            frontend.wrap_hf(whole, source="whisper")


# --- a static trace refuses other shapes up front (issue 14) -------------------------------------------------------

class Rows(__import__("torch").nn.Module):
    """Scales each sample by its mean through views whose sizes export fixes when traced at batch 1: at batch 2 the
    static graph would mix the samples and give wrong numbers without an error."""

    def __init__(self):
        import torch

        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x)
        return h * h.reshape(x.shape[0], -1).mean(-1).reshape(x.shape[0], 1, 1)


def rows_at_batch_one():
    import torch

    torch.manual_seed(0)
    return Rows(), (torch.randn(1, 4, 16),)


def test_a_model_traced_at_batch_one_refuses_batch_two_before_running(tmp_path):
    import torch

    from xbitc.driver import CompileOptions, compile_model
    from xbitc.runtime import InputShapeError, load

    out = tmp_path / "rows.xbitc"
    compile_model("test_frontend:rows_at_batch_one", out, CompileOptions(bits=8, log=lambda s: None, progress=False))
    model = load(out, backend="reference")
    assert model(torch.randn(1, 4, 16)).shape == (1, 4, 16)
    with pytest.raises(InputShapeError, match=re.escape("input 'x' has shape [2, 4, 16], but this model was compiled "
                                                        "for [1, 4, 16]")):
        model(torch.randn(2, 4, 16))
    with pytest.raises(InputShapeError, match=re.escape("this model takes 1 input (x), 2 given")):
        model(torch.randn(1, 4, 16), torch.randn(1, 4, 16))
