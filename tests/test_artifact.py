import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_lm
from xbitc import frontend, runtime
from xbitc.artifact import ArtifactError, read_manifest
from xbitc.driver import CompileOptions, compile_model
from xbitc.size import uniform_bytes


def compile_tiny(out: Path, **kw) -> tuple:
    m, x = tiny_lm()
    loaded = frontend._from_module(m, x, "tiny", "0")
    opts = CompileOptions(log=lambda s: None, progress=False, **kw)
    return m, compile_model(loaded, out, opts)


def test_bits_per_weight_matches_bytes_on_disk(tmp_path):
    out = tmp_path / "a.xbitc"
    m, manifest = compile_tiny(out, bits=4, group=32, quantize_embeddings=True)
    on_disk = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    assert manifest.size.files == on_disk  # every file counted, manifest.json included, at its real size
    assert manifest.size.counted_bytes == sum(on_disk.values())
    params = sum(p.numel() for p in m.parameters())
    assert manifest.size.bits_per_weight == pytest.approx(8 * sum(on_disk.values()) / params, abs=1e-4)
    # linears alone: 4-bit codes + (16-bit scale + 4-bit zero) per 32 columns, zero points padded to whole bytes
    shapes = [(160, 64), (160, 64), (64, 160), (64, 160)]
    expected = 8 * sum(uniform_bytes(s, 4, 32) for s in shapes) / sum(a * b for a, b in shapes)
    assert 4 + 20 / 32 <= expected < 4 + 24 / 32
    assert manifest.size.linear_bits_per_weight == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("target", [6.0, 9.0, 14.0])
def test_plan_lands_under_the_target(tmp_path, target):
    _, manifest = compile_tiny(tmp_path / "b.xbitc", bpw=target, quantize_embeddings=True)
    assert manifest.size.bits_per_weight <= target


def test_compiled_model_runs_and_stays_close(tmp_path):
    out = tmp_path / "c.xbitc"
    m, _ = compile_tiny(out, bits=8, group=32)
    model = runtime.load(out)
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        ref = m(ids)
    # 8-bit linears plus float16 storage of the embedding: ~1% of the output scale (see test_passes)
    assert float((model(ids) - ref).abs().max()) <= 0.02 * float(ref.abs().max())


def test_corruption_is_reported(tmp_path):
    out = tmp_path / "d.xbitc"
    compile_tiny(out, bits=4)
    weights = out / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.safetensors does not match its sha256"):
        runtime.load(out)
    (out / "graph.json").unlink()
    with pytest.raises(ArtifactError, match="graph.json listed in the manifest is missing"):
        runtime.load(out)


def test_manifest_schema_and_version_are_enforced(tmp_path):
    out = tmp_path / "e.xbitc"
    compile_tiny(out, bits=4)
    raw = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**raw, "surprise": 1}))
    with pytest.raises(ArtifactError, match="surprise"):
        read_manifest(out)
    (out / "manifest.json").write_text(json.dumps({**raw, "version": 99}))
    with pytest.raises(ArtifactError, match="manifest version 99"):
        read_manifest(out)
    with pytest.raises(ArtifactError, match="not an xbitc artifact"):
        read_manifest(tmp_path)


def test_failed_compile_leaves_previous_artifact_intact(tmp_path):
    out = tmp_path / "f.xbitc"
    compile_tiny(out, bits=4)
    before = (out / "manifest.json").read_text()
    with pytest.raises(Exception):
        compile_tiny(out, bpw=1.0, quantize_embeddings=True)  # impossible budget
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.xbitc"]


def test_refuses_to_overwrite_a_non_artifact(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("do not delete")
    with pytest.raises(ArtifactError, match="not an xbitc artifact"):
        compile_tiny(tmp_path / "precious", bits=4)
    assert (tmp_path / "precious" / "thesis.txt").exists()


def test_plugins_load_through_entry_points(tmp_path):
    pytest.importorskip("xbitc_test_plugin", reason="installed by `make test` from tests/plugin")
    from xbitc_test_plugin import TracedReferenceBackend

    out = tmp_path / "g.xbitc"
    m, _ = compile_tiny(out, passes="canonicalize,count-linears{at_least=4},plan{bits=4},quantize,pack", backend="traced-reference")
    assert "count-linears" in read_manifest(out).pipeline
    model = runtime.load(out)
    before = TracedReferenceBackend.calls
    model(torch.randint(0, 96, (1, 5)))
    assert TracedReferenceBackend.calls - before == 4  # every packed linear ran through the plugin's code
    assert sys.modules["xbitc_test_plugin"].__file__.startswith(str(Path(__file__).parent / "plugin"))


def test_gptq_artifact_round_trips_exactly(tmp_path):
    """GPTQ leaves permutations and transposed (non-contiguous) scale arrays: the artifact must store them exactly."""
    from xbitc import artifact
    from xbitc.driver import build_passes
    from xbitc.passes.base import PassContext, PassManager
    from xbitc.passes.targets import weight_roles

    m, x = tiny_lm()
    g = frontend.trace(frontend._from_module(m, x, "tiny", "0"))
    ctx = PassContext(log=lambda s: None, calib_inputs=[(torch.randint(0, 96, (1, 24)),) for _ in range(4)])
    ctx.stats["progress"] = False
    g = PassManager(build_passes("canonicalize,plan{bits=3,group=32},quantize{method=gptq},pack")).run(g, ctx)
    assert any(getattr(v, "perm", None) is not None for v in g.params.values())
    expected = {k: v.dequantize() for k, v in g.params.items() if not isinstance(v, torch.Tensor)}
    artifact.write(g, tmp_path / "q.xbitc", backend="reference", pipeline="", passes=[], target_bpw=None, roles=weight_roles(g))
    loaded, _ = artifact.load_graph(tmp_path / "q.xbitc")
    for name, w in expected.items():
        assert torch.equal(loaded.params[name].dequantize(), w), name


def test_equal_compiles_write_equal_weight_files(tmp_path):
    """Reproducible builds: the same model and options give byte-identical weights.safetensors (safetensors writes
    its metadata map in hash order, so the file carries one metadata key), and so equal hashes in the manifests."""
    from conftest import tiny_llama_artifact

    pytest.importorskip("transformers")
    a, b = (tiny_llama_artifact(tmp_path / name, bits=3, group=16) for name in ("a.xbitc", "b.xbitc"))
    assert (a / "weights.safetensors").read_bytes() == (b / "weights.safetensors").read_bytes()
    assert read_manifest(a).files["weights.safetensors"] == read_manifest(b).files["weights.safetensors"]
