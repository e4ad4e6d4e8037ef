"""Bad input is refused with a one-line reason, a non-zero exit, and no artifact left behind."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xbitc.cli import main

HERE = Path(__file__).parent


def run_cli(args, cwd):
    env_path = f"{HERE}:{cwd}"
    return subprocess.run(
        [sys.executable, "-m", "xbitc.cli", *args], cwd=cwd, capture_output=True, text=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".xbitc")) or p.name.startswith("."))


@pytest.fixture
def untraceable(tmp_path):
    (tmp_path / "badmodel.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.lin = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return torch.from_numpy(self.lin(x).detach().numpy() * 2)\n"
        "def make():\n"
        "    return M(), (torch.randn(2, 4),)\n"
    )
    return tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["compile", "missing.pt2", "--bpw", "4"], "does not exist"),
        (["compile", "conftest:tiny_lm", "--bpw", "4", "--backend", "nosuch"], "unknown backend 'nosuch'"),
        (["compile", "conftest:tiny_lm", "--passes", "canonicalize,frobnicate"], "unknown pass 'frobnicate'"),
        (["compile", "conftest:tiny_lm", "--bpw", "0.1"], "outside what xbitc can reach"),
        (["compile", "conftest:tiny_lm", "--bpw", "1.2", "--allocator", "uniform"], "below what uniform quantization of this model can reach"),
        (["compile", "conftest:tiny_lm", "--bpw", "1.2"], "leaves no room for the quantized weights"),
        (["compile", "badmodel:make", "--bits", "4"], "numpy"),
        (["compile", "nosuchmodule:make", "--bits", "4"], "cannot import factory"),
    ],
)
def test_refusals(tmp_path, untraceable, args, message):
    out = tmp_path / "out.xbitc"
    r = run_cli([*args, "-o", str(out)], cwd=untraceable)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("xbitc: error:") and message in last, r.stderr
    assert leftovers(tmp_path) == []


def test_pickle_needs_trust(tmp_path, capsys):
    sys.path.insert(0, str(HERE))
    from conftest import TinyLM

    path = tmp_path / "model.pt"
    torch.save(TinyLM(), path)
    out = tmp_path / "m.xbitc"
    assert main(["compile", str(path), "--bits", "4", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "--trust-pickle" in err and not out.exists()
    assert main(["compile", str(path), "--bits", "4", "--trust-pickle", "-o", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["kind"] == "generic"


def test_exported_program_and_inspect(tmp_path, capsys):
    sys.path.insert(0, str(HERE))
    from conftest import tiny_lm

    m, x = tiny_lm()
    pt2 = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(m, x), pt2)
    out = tmp_path / "tiny.xbitc"
    assert main(["compile", str(pt2), "--bits", "3", "--group", "32", "-o", str(out), "--dump-ir", str(tmp_path / "ir")]) == 0
    assert "bits per weight" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bits per weight" in text and "3-bit" in text and "group 32" in text
    assert (tmp_path / "ir" / "04-pack.ir").exists()


def test_list_commands(capsys):
    assert main(["list-passes"]) == 0
    passes = capsys.readouterr().out
    assert "quantize" in passes and "calibrate" in passes
    assert main(["list-backends"]) == 0
    assert "reference" in capsys.readouterr().out
