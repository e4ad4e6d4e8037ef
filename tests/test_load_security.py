"""A model file never runs code without --trust-pickle: crafted .pt2 archives (pickled weights, example inputs,
constants, native code, shape expressions and guards torch evaluates as Python) are refused before torch reads them."""
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from xbitc import frontend, pt2safety
from xbitc.cli import main
from xbitc.frontend import LoadError


def _ran(marker, value):
    """The payload: what an attacker's pickle calls. Leaves a marker file and returns `value`."""
    Path(marker).write_text("ran")
    return value


class Payload:
    def __init__(self, marker, value):
        self.marker, self.value = str(marker), value

    def __reduce__(self):
        return (_ran, (self.marker, self.value))


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 32)
        self.lin = torch.nn.Linear(32, 40)

    def forward(self, ids):
        return self.lin(torch.nn.functional.gelu(self.emb(ids)))


def save_program(path, dynamic=True):
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 8))
    dims = ({0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=2, max=128)},) if dynamic else None
    torch.export.save(torch.export.export(Small(), (ids,), dynamic_shapes=dims), path)
    return path


def rewrite(src, dst, edit=lambda name, data: data, add=()):
    """Copy the archive, passing every entry (name without the root folder) through `edit`; `add`: (name, bytes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for name in zin.namelist():
            inner = name.split("/", 1)[1]
            data = edit(inner, zin.read(name))
            if data is not None:
                zout.writestr(name, data)
        for inner, data in add:
            zout.writestr(f"{root}/{inner}", data)
    return dst


def pickled(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def json_edit(target, fn):
    def edit(name, data):
        return json.dumps(fn(json.loads(data))).encode() if name == target else data
    return edit


@pytest.fixture
def program(tmp_path):
    return save_program(tmp_path / "clean.pt2")


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "payload-ran"


def pickled_weight(program, marker, dst):
    """The attack of issue 14: one weight becomes a pickle whose __reduce__ runs the payload."""
    weight = torch.nn.Parameter(torch.export.load(str(program)).state_dict["lin.weight"].detach().clone())

    def mark(cfg):
        cfg["config"]["lin.weight"]["use_pickle"] = True
        return cfg

    path_name = None

    def edit(name, data):
        nonlocal path_name
        if name == "data/weights/model_weights_config.json":
            cfg = json.loads(data)
            path_name = cfg["config"]["lin.weight"]["path_name"]
            return json.dumps(mark(cfg)).encode()
        return data

    rewrite(program, dst.with_suffix(".tmp"), edit)
    return rewrite(dst.with_suffix(".tmp"), dst,
                   lambda n, d: pickled(Payload(marker, weight)) if n == f"data/weights/{path_name}" else d)


def test_a_clean_program_has_nothing_that_runs_code(program, tmp_path):
    assert pt2safety.findings(program) == []
    static = save_program(tmp_path / "static.pt2", dynamic=False)
    assert pt2safety.findings(static) == []


def test_a_pickled_weight_needs_trust_and_never_runs_without_it(program, marker, tmp_path, capsys):
    evil = pickled_weight(program, marker, tmp_path / "evil.pt2")
    out = tmp_path / "m.xbitc"
    assert main(["compile", str(evil), "--bits", "4", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data/weights/" in err and "'lin.weight'" in err and "--trust-pickle" in err
    assert not marker.exists() and not out.exists()
    # the user's consent: torch loads it, the payload runs, the compile goes through
    assert main(["compile", str(evil), "--bits", "4", "--trust-pickle", "-o", str(out)]) == 0
    assert marker.exists() and (out / "manifest.json").exists()


def test_pickled_example_inputs_that_the_weights_only_loader_refuses(program, marker, tmp_path):
    ids = torch.randint(0, 40, (2, 8))
    evil = rewrite(program, tmp_path / "evil.pt2",
                   lambda n, d: pickled(((Payload(marker, ids),), {})) if n.startswith("data/sample_inputs/") else d)
    with pytest.raises(LoadError, match=r"weights-only loader refuses in data/sample_inputs/model\.pt.*--trust-pickle"):
        frontend.load(str(evil))
    assert not marker.exists()


def test_pickled_constants_native_code_and_stray_pickles(program, marker, tmp_path):
    def opaque(cfg):
        cfg["config"]["thing"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
        return cfg

    cases = {
        "opaque": (rewrite(program, tmp_path / "c1.pt2", json_edit("data/constants/model_constants_config.json", opaque),
                           add=[("data/constants/opaque_obj_0", b"\x80\x02N.")]), "data/constants/opaque_obj_0"),
        "aoti": (rewrite(program, tmp_path / "c2.pt2", add=[("data/aotinductor/model/model.so", b"\x7fELF")]),
                 "compiled native code"),
        "stray": (rewrite(program, tmp_path / "c3.pt2", add=[("extra/data.pkl", pickled(Payload(marker, 1)))]),
                  "extra/data.pkl"),
    }
    for name, (path, words) in cases.items():
        with pytest.raises(LoadError, match="--trust-pickle") as info:
            frontend.load(str(path))
        assert words in str(info.value), name
    assert not marker.exists()


def test_code_in_shape_expressions_guards_and_tree_specs(program, marker, tmp_path):
    run = f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')"

    def expr(name, data):
        if name != "models/model.json":
            return data
        text = data.decode()
        first = text.index("Symbol('s")
        return (text[:first] + run + " or " + text[first:]).encode()

    def guard(program):
        program["guards_code"] = [run]
        return program

    def enum_spec(program):
        sig = program["graph_module"]["module_call_graph"][0]["signature"]
        sig["in_spec"] = json.dumps([1, {"type": "builtins.tuple", "context": json.dumps({"__enum__": True, "fqn": "os:sep", "name": "x"}), "children_spec": []}])
        return program

    cases = {
        "expr": (rewrite(program, tmp_path / "e1.pt2", expr), "shape expression"),
        "guard": (rewrite(program, tmp_path / "e2.pt2", json_edit("models/model.json", guard)), "guard code"),
        "enum": (rewrite(program, tmp_path / "e3.pt2", json_edit("models/model.json", enum_spec)), "imports Python modules"),
    }
    for name, (path, words) in cases.items():
        with pytest.raises(LoadError, match="--trust-pickle") as info:
            frontend.load(str(path))
        assert words in str(info.value), name
    assert not marker.exists()
    # what the refusal prevents: torch.export.load evaluates the expression (and then fails on what it returned)
    with pytest.raises(AttributeError):
        torch.export.load(str(cases["expr"][0]))
    assert marker.exists()


def test_repeated_entry_names_are_refused(program, tmp_path):
    with pytest.warns(UserWarning, match="Duplicate name"):
        evil = rewrite(program, tmp_path / "dup.pt2", add=[("data/weights/weight_1", b"\0" * 16)])
    with pytest.raises(LoadError, match="two entries named 'data/weights/weight_1'"):
        frontend.load(str(evil))


@pytest.mark.parametrize("content", [b"hello, I am a text file\n", "truncated"])
def test_a_file_that_is_not_an_archive_gets_one_line(program, tmp_path, capsys, content):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(program.read_bytes()[: program.stat().st_size // 2] if content == "truncated" else content)
    assert main(["compile", str(bad), "--bits", "4", "-o", str(tmp_path / "o.xbitc")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a torch.export archive" in err and "torch.export.save" in err


# --- found by review: hostile Hugging Face folders, shape expressions that never finish, zip bombs -----------------

def _llama_folder(tmp_path):
    import transformers as t

    cfg = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    folder = tmp_path / "hf"
    t.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_a_config_naming_code_or_a_non_model_attribute_gets_one_line(tmp_path):
    import json

    from xbitc.frontend import LoadError, load

    folder = _llama_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    custom = {k: v for k, v in cfg.items() if k != "model_type"}  # only the folder's own code could read it
    (folder / "config.json").write_text(json.dumps({**custom, "auto_map": {"AutoConfig": "evil.Config"}}))
    with pytest.raises(LoadError, match="transformers cannot load this model"):
        load(str(folder))
    assert not marker.exists()
    # `architectures` names a class; any other attribute of transformers (a function here) is not taken
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["pipeline"]}))
    assert load(str(folder)).kind in ("causal-lm", "encoder")


def test_shape_expressions_that_would_never_finish_are_refused():
    from xbitc.pt2safety import plain_expression

    assert plain_expression("Add(Symbol('s0'), Integer(1))")
    assert plain_expression("Pow(Symbol('s0'), Integer(2))")
    assert not plain_expression("Pow(Integer(10), Pow(Integer(10), Integer(10)))")
    assert not plain_expression("Pow(Integer(10), Integer(10000000000))")
    assert not plain_expression("10**10**10")


def test_a_zip_bomb_entry_is_refused_before_reading(tmp_path):
    import zipfile

    from xbitc.pt2safety import MAX_JSON_BYTES, NotAnArchive, findings

    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("model/models/model.json", "w", force_zip64=True) as f:
            chunk = b" " * (1 << 24)
            for _ in range(MAX_JSON_BYTES // len(chunk) + 1):
                f.write(chunk)
    with pytest.raises(NotAnArchive, match="unpacks to"):
        findings(bomb)
