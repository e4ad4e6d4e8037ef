"""Packaging: the wheel holds every package of the layout and works without the checkout; no module of the project
shadows a real package (a script's folder comes first on sys.path, so bench/kernels.py once hid transformers'
`kernels` dependency)."""
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> where it lands in the wheel (DESIGN.md: ir/, passes/, backends/ install as xbitc.ir etc.)
LAYOUT = {"xbitc": "xbitc", "ir": "xbitc/ir", "passes": "xbitc/passes", "backends": "xbitc/backends"}
OWN_DISTRIBUTIONS = {"xbitc", "xbitc-test-plugin"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy without what .gitignore lists, so a stale build/ or egg-info cannot leak into the wheel.
    ignored = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                                     ".hypothesis", "*.xbitc", "out", ".cache")
    shutil.copytree(ROOT, tmp / "src", ignore=ignored)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp / "dist"), str(tmp / "src")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp / "dist").glob("xbitc-*.whl")
    return whl


def test_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"xbitc/data/{f.name}" for f in (ROOT / "xbitc" / "data").iterdir() if f.is_file()}
    for folder, installed in LAYOUT.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            package = Path(installed) / init.parent.relative_to(ROOT / folder)
            expected |= {(package / f.name).as_posix() for f in init.parent.glob("*.py")}
    assert "xbitc/alloc/__init__.py" in expected  # the package the old explicit list left out
    assert sorted(expected - names) == []


BUILD_AND_RUN = r"""
import json, pathlib, sys
import torch
import xbitc
from xbitc import runtime
from xbitc.cli import main
import tinymodel

status = main(["compile", "tinymodel:make", "--bpw", "6", "-o", "tiny.xbitc"])
model, (ids,) = tinymodel.make()
logits = runtime.load("tiny.xbitc")(ids)
ref = model(ids).detach()
manifest = json.loads(pathlib.Path("tiny.xbitc/manifest.json").read_text())
print(json.dumps({
    "status": status,
    "xbitc": xbitc.__file__,
    "modules": sorted(m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "xbitc"
                      and getattr(m, "__file__", None)),
    "path": sys.path,
    "bpw": manifest["size"]["bits_per_weight"],
    "top1": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    "cosine": torch.nn.functional.cosine_similarity(logits.flatten(), ref.flatten(), dim=0).item(),
}))
"""

# Linears hold most of the weights, so at 6 bpw (float16 embedding, manifest and graph counted) they get ~5 bits.
TINY_MODEL = """
import torch

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb, self.up, self.down = torch.nn.Embedding(32, 64), torch.nn.Linear(64, 512), torch.nn.Linear(512, 64)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.2

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return torch.nn.functional.linear(h, self.emb.weight)

def make():
    return Tiny(), (torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1)),)
"""


@pytest.mark.slow
def test_wheel_alone_compiles_with_bpw_and_loads(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                        str(target), str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    work = tmp_path / "work"
    work.mkdir()
    (work / "tinymodel.py").write_text(TINY_MODEL)
    # -S: no site-packages and so no .pth files, which hold the editable install's hook into the checkout; the
    # dependencies come from this environment's site-packages, after the wheel's files.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *deps]), "HF_HUB_OFFLINE": "1",
           "XBITC_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-S", "-c", BUILD_AND_RUN], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    assert facts["status"] == 0, r.stderr
    assert Path(facts["xbitc"]).is_relative_to(target)
    assert [m for m in facts["modules"] if not Path(m).is_relative_to(target)] == []
    assert not {str(ROOT), *(str(ROOT / folder) for folder in LAYOUT)} & {str(Path(p).resolve()) for p in facts["path"] if p}
    assert 5.5 < facts["bpw"] <= 6.0
    assert facts["top1"] > 0.9 and facts["cosine"] > 0.95  # the artifact computes the model it was compiled from


def _transformers_probes() -> set[str]:
    """Top-level names transformers looks for with `_is_package_available("...")`: a project module of that name
    on sys.path would be imported in the package's place."""
    spec = importlib.util.find_spec("transformers")
    if spec is None:
        return set()
    source = (Path(spec.origin).parent / "utils" / "import_utils.py").read_text()
    probes = {name.split(".")[0] for name in re.findall(r'_is_package_available\(\s*"([\w.]+)"', source)}
    assert {"torch", "kernels"} <= probes, "transformers' probes could not be parsed"
    return probes


def test_no_module_of_the_project_shadows_a_real_package():
    installed = {}
    own = set()
    for name, dists in importlib.metadata.packages_distributions().items():
        foreign = {d.lower().replace("_", "-") for d in dists} - OWN_DISTRIBUTIONS
        if foreign:
            installed[name] = sorted(foreign)
        else:
            own.add(name)
    # What a run can put first on sys.path: bench/ (its scripts' folder), the checkout (python -m from the root),
    # tests/ (pytest's rootdir insertion), and what the project installs.
    ours = {p.stem for folder in (ROOT / "bench", ROOT, ROOT / "tests") for p in folder.glob("*.py")}
    ours |= {p.parent.name for folder in (ROOT / "bench", ROOT, ROOT / "tests") for p in folder.glob("*/__init__.py")}
    ours |= own
    assert "kernel_speed" in ours and "xbitc" in ours
    probes = _transformers_probes()
    clashes = {name: [why for why, hit in (("standard library", name in sys.stdlib_module_names),
                                          (f"installed by {installed.get(name)}", name in installed),
                                          ("probed by transformers", name in probes)) if hit]
               for name in ours}
    assert {name: why for name, why in clashes.items() if why} == {}
