"""Bad input gets one line that names the problem and the fix, exit status 2, nothing written, and is found before
the long work (loading, tracing, calibrating) wherever it can be (issue 14, "Bad input")."""
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TinyLM
from xbitc import artifact, frontend, registry
from xbitc.cli import main
from xbitc.driver import CompileOptions, compile_model
from xbitc.passes.base import Pass, PassError, PassManager
from xbitc.passes.plan import PlanUniform

HERE = Path(__file__).parent
WORDS = "the a of and to in is was it for on with as at by an be this that from or".split()
TEXT = " ".join(WORDS * 8)  # 168 tokens of the word-level tokenizer below


def word_tokenizer():
    """A word-level tokenizer of 22 ids (any other word is [UNK]): what a Hugging Face folder would hold."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[UNK]")


def tiny_loaded(tokenizer=None, kind="generic") -> frontend.LoadedModel:
    m = TinyLM()
    dyn = {0: ("batch", "seq")} if kind == "causal-lm" else {}
    return frontend.LoadedModel(m, m.example_inputs, kind, "tiny", "0", tokenizer, dyn)


def quiet(**kw) -> CompileOptions:
    return CompileOptions(log=lambda s: None, progress=False, **kw)


def one_error_line(err: str, *parts: str) -> str:
    """stderr holds one error line (and maybe progress bars of the libraries that loaded the model), no traceback."""
    lines = [line for line in err.strip().splitlines() if "xbitc" in line or "Error" in line]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("xbitc: error: "), err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def nothing_written(folder: Path) -> bool:
    return not any(p.name.endswith((".xbitc", ".tmp", ".old")) for p in folder.iterdir())


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the model is loaded or traced: the refusal must come before the long work."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded or traced before the bad input was refused")

    monkeypatch.setattr(frontend, "load", boom)
    monkeypatch.setattr(frontend, "trace", boom)


# --- --calib -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, part", [
    ("empty", "is empty"), ("binary", "is not UTF-8 text"), ("folder", "is a folder"), ("missing", "does not exist"),
])
def test_calib_file_refused_before_loading(tmp_path, capsys, no_load, kind, part):
    calib = tmp_path / "calib.txt"
    if kind == "empty":
        calib.write_text("")
    elif kind == "binary":
        calib.write_bytes(bytes(range(256)) * 4)
    elif kind == "folder":
        calib.mkdir()
    out = tmp_path / "m.xbitc"
    # --method gptq with --bits: a missing file was silently ignored here (the model has no tokenizer)
    assert main(["compile", "conftest:tiny_lm", "--bits", "4", "--method", "gptq", "--calib", str(calib),
                 "-o", str(out)]) == 2
    one_error_line(capsys.readouterr().err, f"calibration text {calib}", part, "--calib self")
    assert nothing_written(tmp_path)


def test_calib_without_tokenizer_is_refused(tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    assert main(["compile", "conftest:tiny_lm", "--bits", "4", "--method", "gptq", "--calib", str(calib),
                 "-o", str(tmp_path / "m.xbitc")]) == 2
    one_error_line(capsys.readouterr().err, "has no tokenizer", "leave --calib out")
    assert nothing_written(tmp_path)
    # --calib self on a model that is not a language model was ignored just the same
    assert main(["compile", "conftest:tiny_lm", "--bits", "4", "--method", "gptq", "--calib", "self",
                 "-o", str(tmp_path / "m.xbitc")]) == 2
    one_error_line(capsys.readouterr().err, "--calib self samples text from a causal language model", "its kind: generic")


def test_calib_too_short_is_refused_before_tracing(tmp_path, capsys, monkeypatch):
    """A Hugging Face folder with a tokenizer, and a calibration text of 3 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "hf"
    tok = word_tokenizer()
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    calib = tmp_path / "calib.txt"
    calib.write_text("the a of")

    def boom(*a, **k):
        raise AssertionError("traced before the calibration text was checked")

    monkeypatch.setattr(frontend, "trace", boom)
    out = tmp_path / "m.xbitc"
    assert main(["compile", str(folder), "--bits", "4", "--method", "gptq", "--calib", str(calib), "-o", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "has 3 tokens", "lower --calib-len")
    assert not out.exists()


def test_calib_text_of_a_loaded_model_with_tokenizer(tmp_path):
    """The library path: the same checks through compile_model, before tracing."""
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    loaded = tiny_loaded(word_tokenizer(), "causal-lm")
    with pytest.raises(ValueError, match="has 168 tokens, too few for one window of 256"):
        compile_model(loaded, tmp_path / "m.xbitc", quiet(bits=4, method="gptq", calib=str(calib)))
    manifest = compile_model(loaded, tmp_path / "m.xbitc",
                             quiet(bits=4, method="gptq", calib=str(calib), calib_len=32, calib_windows=2))
    assert manifest.size.bits_per_weight > 0


# --- -o --------------------------------------------------------------------------------------------------------------


def test_unwritable_output_is_refused_first(tmp_path, capsys, no_load):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    out = blocker / "sub" / "m.xbitc"
    assert main(["compile", "conftest:tiny_lm", "--bits", "4", "-o", str(out)]) == 2
    one_error_line(capsys.readouterr().err, f"cannot write {out}", "is a file, not a folder", "choose another -o path")


def test_unwritable_dump_folder_is_refused_first(tmp_path, capsys, no_load):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    assert main(["compile", "conftest:tiny_lm", "--bits", "4", "-o", str(tmp_path / "m.xbitc"),
                 "--dump-ir", str(blocker / "ir")]) == 2
    one_error_line(capsys.readouterr().err, "--dump-ir", "is a file, not a folder", "choose another --dump-ir folder")
    assert main(["compile", "conftest:tiny_lm", "--bits", "4", "-o", str(tmp_path / "m.xbitc"),
                 "--dump-ir", str(blocker)]) == 2
    one_error_line(capsys.readouterr().err, "is a file, not a folder")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_first(tmp_path, capsys, no_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["compile", "conftest:tiny_lm", "--bits", "4", "-o", str(ro / "m.xbitc")]) == 2
        one_error_line(capsys.readouterr().err, "is not writable", "choose another -o path")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# --- SIGTERM and scratch folders ---------------------------------------------------------------------------------


SIGTERM_SCRIPT = """
import os, signal, sys
from xbitc import tensorfile
from xbitc.cli import main

real = tensorfile.save
def save_then_terminate(*a, **k):  # SIGTERM arrives while the artifact is being written
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGTERM)
tensorfile.save = save_then_terminate
sys.exit(main(["compile", "conftest:tiny_lm", "--bits", "4", "-o", sys.argv[1]]))
"""


def test_sigterm_while_writing_leaves_nothing(tmp_path):
    out = tmp_path / "m.xbitc"
    r = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": f"{HERE}:{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "xbitc: stopped by SIGTERM"
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_scratch_folders_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "m.xbitc"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = artifact._writer_tag()
    host = tag.split("-", 1)[1]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        stale = [tmp_path / f".m.xbitc.w{dead.pid}-{host}.abc123_x.tmp", tmp_path / f".m.xbitc.w{dead.pid}-{host}.q9.old"]
        kept = [
            tmp_path / f".m.xbitc.w{live.pid}-{host}.abc123_x.tmp",  # a writer still running
            tmp_path / f".m.xbitc.w{dead.pid}-otherhost.abc.tmp",  # another machine's writer: its pids are not ours
            tmp_path / f".other.xbitc.w{dead.pid}-{host}.abc.tmp",  # another artifact's
            tmp_path / ".m.xbitc.legacy1.tmp",  # no writer recorded
        ]
        for d in stale + kept:
            d.mkdir()
            (d / "weights.safetensors").write_bytes(b"x" * 100)
        compile_model(tiny_loaded(), out, quiet(bits=4))
        assert all(not d.exists() for d in stale)
        assert all(d.exists() for d in kept)
        assert (out / "manifest.json").exists()
    finally:
        live.kill()
        live.wait()


def test_scratch_folder_names_record_the_writer(tmp_path, monkeypatch):
    seen = []
    real = artifact._replace

    def spy(tmp, out):
        seen.append(tmp.name)
        return real(tmp, out)

    monkeypatch.setattr(artifact, "_replace", spy)
    compile_model(tiny_loaded(), tmp_path / "m.xbitc", quiet(bits=4))
    assert seen and seen[0].startswith(f".m.xbitc.w{os.getpid()}-") and seen[0].endswith(".tmp")


# --- eval and run ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_artifacts(tmp_path_factory):
    """A language-model artifact with a tokenizer, and one without."""
    d = tmp_path_factory.mktemp("lm")
    with_tok, without = d / "tok.xbitc", d / "plain.xbitc"
    compile_model(tiny_loaded(word_tokenizer(), "causal-lm"), with_tok, quiet(bits=4))
    compile_model(tiny_loaded(None, "causal-lm"), without, quiet(bits=4))
    text = d / "text.txt"
    text.write_text(TEXT)
    return with_tok, without, text


@pytest.mark.parametrize("window", ["0", "1", "-5"])
def test_eval_window_is_checked(lm_artifacts, capsys, window):
    art, _, text = lm_artifacts
    assert main(["eval", str(art), "--text-file", str(text), "--window", window]) == 2
    one_error_line(capsys.readouterr().err, f"--window {window} must be 2 or more")


def test_eval_refusals(lm_artifacts, tmp_path, capsys):
    art, plain, text = lm_artifacts
    assert main(["eval", str(art), "--text-file", str(text), "--window", "16"]) == 0  # the good case works
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", str(art), "--text-file", str(text), "--window", "512"]) == 2
    one_error_line(capsys.readouterr().err, "has 168 tokens, fewer than one window of 512", "lower --window")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(256)))
    assert main(["eval", str(art), "--text-file", str(binary), "--window", "16"]) == 2
    one_error_line(capsys.readouterr().err, "is not UTF-8 text")
    assert main(["eval", str(art), "--text-file", str(tmp_path), "--window", "16"]) == 2
    one_error_line(capsys.readouterr().err, "is a folder")
    assert main(["eval", str(plain), "--text-file", str(text), "--window", "16"]) == 2
    one_error_line(capsys.readouterr().err, "has no tokenizer", "Hugging Face folder")
    assert main(["eval", str(art), "--text-file", str(text), "--window", "16", "--max-tokens", "8"]) == 2
    one_error_line(capsys.readouterr().err, "--max-tokens 8 is less than one window of 16")


def test_run_refusals(lm_artifacts, capsys):
    art, plain, _ = lm_artifacts
    assert main(["run", str(art), "--text", ""]) == 2
    one_error_line(capsys.readouterr().err, "--text is empty")
    assert main(["run", str(plain), "--text", "the a"]) == 2
    one_error_line(capsys.readouterr().err, "has no tokenizer")
    assert main(["run", str(art), "--text", "the a", "--max-new-tokens", "0"]) == 2
    one_error_line(capsys.readouterr().err, "--max-new-tokens 0 must be 1 or more")
    assert main(["run", str(art), "--text", "the a", "--max-new-tokens", "3"]) == 0


# --- budgets and pass options ----------------------------------------------------------------------------------------


def test_pipeline_that_ignores_bpw_is_refused_before_loading(tmp_path, capsys, no_load):
    out = tmp_path / "m.xbitc"
    assert main(["compile", "conftest:tiny_lm", "--bpw", "3", "--passes", "canonicalize,plan{bits=8},quantize,pack",
                 "-o", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "--bpw 3.0: no pass of the pipeline", "plan{bpw=3.0}", "leave --bpw out")
    assert main(["compile", "conftest:tiny_lm", "--bpw", "3", "--passes", "canonicalize,plan{bpw=4},quantize,pack",
                 "-o", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "--bpw 3.0 disagrees with bpw=4.0 of pass 'plan'")
    assert nothing_written(tmp_path)


@dataclasses.dataclass(frozen=True)
class ClaimsBudget(Pass):
    """A planner that takes a size target and does nothing with it."""

    name = "claims-budget"
    provides = frozenset({"planned"})
    bpw: float | None = None

    def run(self, graph, ctx):
        return graph


def test_artifact_over_its_target_is_never_written(tmp_path):
    registry.register(registry.PASS_GROUP, ClaimsBudget.name, ClaimsBudget)
    out = tmp_path / "m.xbitc"
    spec = "canonicalize,claims-budget{bpw=3},plan{bits=8},quantize,pack"
    with pytest.raises(artifact.ArtifactError, match="takes .* bits per weight, over its target of 3.0; nothing was written"):
        compile_model(tiny_loaded(), out, quiet(bpw=3.0, passes=spec))
    assert nothing_written(tmp_path)
    # without --bpw the pipeline's own target is the one the manifest records, and is held to
    with pytest.raises(artifact.ArtifactError, match="over its target of 3.0"):
        compile_model(tiny_loaded(), out, quiet(passes=spec))
    manifest = compile_model(tiny_loaded(), out, quiet(passes="canonicalize,plan{bpw=9},quantize,pack"))
    assert manifest.size.target_bpw == 9.0 and manifest.size.bits_per_weight <= 9.0


@pytest.mark.parametrize("spec, part", [
    ("plan{bits=99}", "option bits=99 of pass 'plan' is out of range: it must be 1..8"),
    ("plan{bits=0}", "option bits=0 of pass 'plan' is out of range: it must be 1..8"),
    ("plan{group=-1}", "option group=-1 of pass 'plan' is out of range: it must be >= 0"),
    ("plan{bpw=100}", "option bpw=100.0 of pass 'plan' is out of range: it must be 0.5..32"),
    ("allocate{bpw=0.1}", "option bpw=0.1 of pass 'allocate' is out of range: it must be 0.5..32"),
    ("allocate{batches=0}", "option batches=0 of pass 'allocate' is out of range: it must be >= 1"),
    ("allocate{groups=64-x}", "option groups='64-x' of pass 'allocate'"),
    ("quantize{damp=2}", "option damp=2.0 of pass 'quantize' is out of range: it must be 0..1"),
    ("tune{steps=-1}", "option steps=-1 of pass 'tune' is out of range: it must be >= 0"),
    ("tune{lr=0}", "option lr=0.0 of pass 'tune' is out of range: it must be > 0"),
])
def test_pass_options_are_checked_against_their_ranges(tmp_path, capsys, no_load, spec, part):
    assert main(["compile", "conftest:tiny_lm", "--passes", f"canonicalize,{spec},quantize,pack",
                 "-o", str(tmp_path / "m.xbitc")]) == 2
    one_error_line(capsys.readouterr().err, part)


def test_ranges_hold_for_passes_built_in_python():
    with pytest.raises(PassError, match="option bits=99 of pass 'plan' is out of range"):
        PassManager([PlanUniform(bits=99)])


def test_list_passes_shows_ranges(capsys):
    assert main(["list-passes"]) == 0
    out = capsys.readouterr().out
    assert "bits=None (1..8)" in out and "bpw=3.0 (0.5..32)" in out and "steps=24 (>= 0)" in out


def test_kernel_objects_that_take_the_budget_are_named(tmp_path, capsys):
    pytest.importorskip("llvmlite")
    from xbitc.backends.x86 import is_x86_host

    if not is_x86_host():
        pytest.skip("the x86 backend emits kernels on x86-64 hosts")
    out = tmp_path / "m.xbitc"
    assert main(["compile", "conftest:tiny_lm", "--bpw", "4", "--backend", "x86", "-o", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "x86 backend's own files (kernels/:", "--backend reference")
    assert "bytes)" in line and "--quantize-embeddings" not in line  # quantizing embeddings cannot help here
    assert nothing_written(tmp_path)


def test_eval_reference_that_does_not_exist_is_refused_before_loading(tmp_path, capsys):
    from xbitc.cli import main

    text = tmp_path / "t.txt"
    text.write_text("hello " * 100)
    code = main(["eval", str(tmp_path / "no-artifact"), "--text-file", str(text), "--reference", str(tmp_path / "gone.pt2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--reference" in err[0] and "does not exist" in err[0]


def test_an_artifact_of_a_missing_backend_plugin_says_how_to_run_it(tmp_path):
    import json

    from conftest import tiny_lm
    from xbitc import frontend, registry, runtime
    from xbitc.driver import CompileOptions, compile_model

    m, x = tiny_lm()
    out = tmp_path / "p.xbitc"
    compile_model(frontend._from_module(m, x, "tiny", "0"), out,
                  CompileOptions(bits=4, group=32, log=lambda s: None, progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["backend"] = "not-installed"  # as if compiled by a plugin this machine lacks
    text = json.dumps(manifest, indent=1)  # then the size records, as the writer makes them (padded to fit)
    manifest["size"]["files"]["manifest.json"] = len(text) + 8
    manifest["size"]["counted_bytes"] = sum(manifest["size"]["files"].values())
    manifest["size"]["bits_per_weight"] = round(8 * manifest["size"]["counted_bytes"] / manifest["source"]["param_count"], 4)
    text = json.dumps(manifest, indent=1)
    text += " " * (manifest["size"]["files"]["manifest.json"] - len(text))
    (out / "manifest.json").write_text(text)
    with pytest.raises(registry.UnknownPlugin, match="not installed here.*--backend reference"):
        runtime.load(out)
    assert runtime.load(out, backend="reference")(x[0]).shape == (2, 12, 96)
