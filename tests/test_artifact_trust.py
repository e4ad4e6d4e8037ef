"""An artifact is data, never code: a crafted artifact (with its manifest re-hashed, as an attacker would) can
neither name an operator outside the closed list nor make the loader read outside its folder, follow a link, block
on a device file, or run with files the manifest does not vouch for."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama_artifact
from xbitc import runtime
from xbitc.artifact import ArtifactError, load_graph

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A random-weight Llama with its cached decode step (graph.json and step.json), 8-bit RTN."""
    return tiny_llama_artifact(tmp_path_factory.mktemp("trust") / "llama.xbitc", bits=8, group=32)


@pytest.fixture
def art(pristine, tmp_path) -> Path:
    dst = tmp_path / "a.xbitc"
    shutil.copytree(pristine, dst)
    return dst


def rehash(folder: Path, edit_manifest=None) -> None:
    """What an attacker does after editing files: make the manifest agree with them again."""
    mf = folder / "manifest.json"
    m = json.loads(mf.read_text())
    for rel in list(m["files"]):
        f = folder / rel
        if f.is_file() and not f.is_symlink():
            m["files"][rel] = hashlib.sha256(f.read_bytes()).hexdigest()
            sizes = m["size"]["files"] if rel in m["size"]["files"] else m["size"]["uncounted"]
            sizes[rel] = f.stat().st_size
    if edit_manifest:
        edit_manifest(m)
    size = m["size"]
    for _ in range(10):  # the manifest's own size and the totals that follow from it, as the writer makes them
        size["counted_bytes"] = sum(size["files"].values())
        size["bits_per_weight"] = round(8 * size["counted_bytes"] / m["source"]["param_count"], 4)
        text = json.dumps(m)
        if len(text) <= size["files"]["manifest.json"]:
            text += " " * (size["files"]["manifest.json"] - len(text))
            break
        size["files"]["manifest.json"] = len(text)
    mf.write_text(text)


def inject(folder: Path, graph_file: str, target: str, marker: Path, **extra) -> None:
    g = json.loads((folder / graph_file).read_text())
    payload = f"open({str(marker)!r}, 'w').write('pwned')"
    node = {"name": "evil", "op": "torch_op", "args": [payload], "kwargs": {}, "attrs": {"target": target, **extra},
            "type": None}
    g["nodes"].insert(len(g["nodes"]) - 1, node)
    out = g["nodes"][-1]
    out["args"] = [{"ref": "evil"}] + out["args"][1:] if graph_file == "graph.json" else out["args"]
    (folder / graph_file).write_text(json.dumps(g))
    rehash(folder)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xbitc.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)


def assert_refused_everywhere(art: Path, match: str, tmp_path: Path, capsys, marker: Path | None = None,
                              in_a_child: bool = False) -> None:
    """The runtime and both commands that read an artifact refuse it: exit status 2 and one line naming the problem.
    The commands run in this process (what a child adds, its own exit, is checked once: `in_a_child`)."""
    from xbitc.cli import main

    with pytest.raises(ArtifactError, match=match):
        runtime.load(art)
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    for args in (("run", art, "--text", "hi"), ("eval", art, "--text-file", text, "--window", 16)):
        if in_a_child:
            r = cli(*args)
            code, err = r.returncode, r.stderr
        else:
            capsys.readouterr()
            code, err = main(list(map(str, args))), capsys.readouterr().err
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert match.split(".*")[0] in err or match in err
    if marker is not None:
        assert not marker.exists(), "the artifact ran code"


@pytest.mark.parametrize("graph_file", ["graph.json", "step.json"])
@pytest.mark.parametrize("target", ["builtins.exec", "builtins.eval", "builtins.open", "builtins.__import__",
                                    "torch.load", "os.system", "builtins.getattr", "operator.attrgetter",
                                    "aten.__class__.__init__", "aten.from_file.default",
                                    "aten.add.__getattribute__", "aten.sub.__setattr__", "aten.mul.__call__",
                                    "aten.add._op", "aten.sort.values"])
def test_operators_outside_the_closed_list_are_refused(art, tmp_path, graph_file, target):
    marker = tmp_path / "marker"
    inject(art, graph_file, target, marker)
    # the message names the node and the operator
    with pytest.raises(ArtifactError, match=f"evil.*{target.split('.')[-1]}") as err:
        runtime.load(art)
    assert "not in xbitc's list" in str(err.value)
    assert not marker.exists()


def test_refused_through_the_cli_without_side_effect(art, tmp_path, capsys):
    marker = tmp_path / "marker"
    inject(art, "graph.json", "builtins.exec", marker)
    assert_refused_everywhere(art, "not in xbitc's list", tmp_path, capsys, marker, in_a_child=True)


@pytest.mark.parametrize("op", ["add", "softmax", "reshape"])
def test_named_ops_carry_their_target_through_the_same_check(art, tmp_path, op):
    marker = tmp_path / "marker"
    inject(art, "graph.json", "builtins.exec", marker)
    g = json.loads((art / "graph.json").read_text())
    next(n for n in g["nodes"] if n["name"] == "evil")["op"] = op
    (art / "graph.json").write_text(json.dumps(g))
    rehash(art)
    with pytest.raises(ArtifactError, match="evil"):
        runtime.load(art)
    assert not marker.exists()


def test_in_place_writes_to_weights_are_refused(art):
    g = json.loads((art / "graph.json").read_text())
    param = next(n for n in g["nodes"] if n["op"] == "param")
    view = {"name": "v", "op": "torch_op", "args": [{"ref": param["name"]}, [-1]], "kwargs": {},
            "attrs": {"target": "aten.view.default"}, "type": None}
    bump = {"name": "bump", "op": "torch_op", "args": [{"ref": "v"}, 1.0], "kwargs": {},
            "attrs": {"target": "aten.add_.Tensor"}, "type": None}
    g["nodes"][g["nodes"].index(param) + 1:g["nodes"].index(param) + 1] = [view, bump]
    (art / "graph.json").write_text(json.dumps(g))
    rehash(art)
    with pytest.raises(ArtifactError, match="bump.*writes param"):
        runtime.load(art)


def test_fused_nodes_are_never_read_from_a_file(art):
    g = json.loads((art / "graph.json").read_text())
    g["nodes"].insert(1, {"name": "f", "op": "fused", "args": [], "kwargs": {}, "attrs": {"kernel": "rope"}, "type": None})
    (art / "graph.json").write_text(json.dumps(g))
    rehash(art)
    with pytest.raises(ArtifactError, match="fused"):
        runtime.load(art)


@pytest.mark.parametrize("name", ["/etc/hostname", "../../etc/passwd", "tokenizer/../../x", "./graph.json",
                                  "a//b", "manifest.json", "C:\\x"])
def test_manifest_names_stay_inside_the_artifact(art, tmp_path, capsys, name):
    def add(m):
        m["files"][name] = "0" * 64
        m["size"]["uncounted"][name] = 1

    rehash(art, add)
    assert_refused_everywhere(art, "not a plain path inside the artifact", tmp_path, capsys)


def test_a_device_file_is_refused_without_reading_it(art, tmp_path):
    (art / "weights.safetensors").unlink()
    os.symlink("/dev/zero", art / "weights.safetensors")
    # run in a child with a timeout: the old loader hashed /dev/zero forever
    r = subprocess.run([sys.executable, "-c", f"from xbitc import runtime; runtime.load({str(art)!r})"],
                       capture_output=True, text=True, timeout=60)
    assert "symbolic link" in r.stderr


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_listed_device_inside_the_folder_is_refused(art, tmp_path):
    os.mknod(art / "dev", 0o644 | 0o020000, os.makedev(1, 5)) if os.geteuid() == 0 else pytest.skip("mknod needs root")

    def add(m):
        m["files"]["dev"] = "0" * 64
        m["size"]["uncounted"]["dev"] = 1 << 40

    rehash(art, add)
    with pytest.raises(ArtifactError, match="not a regular file"):
        runtime.load(art)


def test_a_symlinked_weights_file_is_refused_even_when_the_hash_matches(art, tmp_path, capsys):
    elsewhere = tmp_path / "w.safetensors"
    shutil.move(art / "weights.safetensors", elsewhere)
    os.symlink(elsewhere, art / "weights.safetensors")
    assert_refused_everywhere(art, "symbolic link", tmp_path, capsys)


def test_a_symlinked_folder_is_refused(art, tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x").write_text("secret")
    os.symlink(tmp_path / "outside", art / "extra")

    def add(m):
        m["files"]["extra/x"] = hashlib.sha256(b"secret").hexdigest()
        m["size"]["uncounted"]["extra/x"] = 6

    rehash(art, add)
    with pytest.raises(ArtifactError, match="extra is not listed"):  # the link itself is not a listed file
        runtime.load(art)


def test_sizes_are_checked_before_hashing(art, tmp_path):
    with open(art / "weights.safetensors", "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(ArtifactError, match="bytes where the manifest records"):
        runtime.load(art)


def test_every_file_the_runtime_reads_is_listed(art, tmp_path, capsys):
    # an emptied files list used to let corrupted weights run silently
    data = bytearray((art / "weights.safetensors").read_bytes())
    data[-1] ^= 0x40
    (art / "weights.safetensors").write_bytes(bytes(data))
    rehash(art, lambda m: m.update(files={k: v for k, v in m["files"].items() if k.startswith("tokenizer/")}))
    assert_refused_everywhere(art, "does not list", tmp_path, capsys)


@pytest.mark.parametrize("extra", ["step.json", "notes.txt", "tokenizer/added_tokens.json"])
def test_unlisted_files_are_refused(art, tmp_path, extra):
    if extra == "step.json":
        rehash(art, lambda m: (m["files"].pop("step.json"), m["size"]["files"].pop("step.json")))
    else:
        (art / extra).parent.mkdir(exist_ok=True)
        (art / extra).write_text("{}")
    with pytest.raises(ArtifactError, match=f"{extra} is not listed"):
        runtime.load(art)


def test_the_pristine_artifact_still_loads_and_runs(pristine, capsys):
    from xbitc.cli import main

    graph, _ = load_graph(pristine)
    assert graph.step is not None
    assert main(["run", str(pristine), "--text", "hello world", "--max-new-tokens", "3"]) == 0, capsys.readouterr().err
    out = runtime.load(pristine)(torch.randint(0, 64, (1, 5)))
    assert out.shape == (1, 5, 64) and torch.isfinite(out).all()
