
import pytest

from conftest import tiny_lm
from xbitc import frontend
from xbitc.cli import main
from xbitc.driver import CompileOptions, compile_model
from xbitc.plot import allocation_table, component


def test_component_names():
    assert component("model.layers.3.self_attn.q_proj.weight", "linear") == ("q", 3)
    assert component("model.layers.12.mlp.down_proj.weight", "linear") == ("down", 12)
    assert component("transformer.h.0.attn.c_attn.weight", "linear") == ("c_attn", 0)
    assert component("model.embed_tokens.weight", "embedding") == ("embedding", None)
    assert component("up.1.weight", "linear") == ("up", 1)


@pytest.fixture(scope="module")
def two_artifacts(tmp_path_factory):
    m, x = tiny_lm()
    loaded = frontend._from_module(m, x, "tiny", "0")
    paths = []
    for bits in (3, 5):
        p = tmp_path_factory.mktemp("a") / f"b{bits}.xbitc"
        compile_model(loaded, p, CompileOptions(bits=bits, group=32, quantize_embeddings=True, log=lambda s: None, progress=False))
        paths.append(p)
    return paths


def test_allocation_table_counts_every_quantized_weight(two_artifacts):
    table, hist, _ = allocation_table(two_artifacts[0])
    assert hist[3] == 96 * 64 + 2 * (160 * 64 + 64 * 160) and hist.sum() == hist[3]
    assert set(table) == {"embedding", "up", "down"}
    assert set(table["up"]) == {0, 1}
    assert table["up"][0] == pytest.approx(8 * (160 * (24 + 2 * 2 + 1)) / (160 * 64))  # codes + scales + zeros


def test_inspect_plot_side_by_side(two_artifacts, tmp_path, capsys):
    png = tmp_path / "alloc.png"
    assert main(["inspect", *map(str, two_artifacts), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert capsys.readouterr().out.count("bits per weight over") == 2


def test_inspect_verifies_like_load(two_artifacts, tmp_path, capsys):
    import json
    import shutil

    art = tmp_path / "x.xbitc"
    shutil.copytree(two_artifacts[0], art)
    assert main(["inspect", str(art)]) == 0
    assert "verified: files" in capsys.readouterr().out
    (art / "weights.safetensors").unlink()  # used to print the manifest's size as if the file were there
    assert main(["inspect", str(art)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights.safetensors" in err[0] and "missing" in err[0]
    assert main(["inspect", "--no-verify", str(art)]) == 0
    assert "NOT VERIFIED" in capsys.readouterr().out


@pytest.mark.parametrize("claim", ["counted_bytes", "bits_per_weight", "manifest_size"])
def test_inspect_refuses_size_claims_the_files_do_not_back(two_artifacts, tmp_path, capsys, claim):
    import json
    import shutil

    art = tmp_path / "x.xbitc"
    shutil.copytree(two_artifacts[0], art)
    m = json.loads((art / "manifest.json").read_text())
    if claim == "counted_bytes":
        m["size"]["counted_bytes"] = 1000
    elif claim == "bits_per_weight":
        m["size"]["bits_per_weight"] = 1.0
    text = json.dumps(m, indent=1)
    if claim == "manifest_size":
        text += " " * 7
    (art / "manifest.json").write_text(text)
    assert main(["inspect", str(art)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_inspect_shows_manifest_strings_as_data(two_artifacts, tmp_path, capsys):
    import json
    import shutil

    art = tmp_path / "x.xbitc"
    shutil.copytree(two_artifacts[0], art)
    m = json.loads((art / "manifest.json").read_text())
    m["source"]["path"] = "evil\x1b[2K\x1b[1Afiles verified"  # would erase and rewrite the line above
    (art / "manifest.json").write_text(json.dumps(m, indent=1))
    assert main(["inspect", "--no-verify", str(art)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2K" in out
