"""The kernel disk cache is never trusted blindly: every entry is checked before LLVM loads it, and a bad one is
discarded and rebuilt with one warning line (it used to crash LLVM, segfault, or silently compute wrong numbers)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xbitc.backends.llvm import KernelSpec, clear_memory_cache, compile_kernel, compile_stats, diskcache

SPEC = "KernelSpec(3, 64, col_tile=1024)"  # a spec no other test uses

CHILD = f"""
import numpy as np, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_llvm_kernels import make_matrix, reference_gemv
from xbitc.backends.llvm import KernelSpec, PackedLinear, compile_stats
packed, s, z = make_matrix(1, 3, 40, 200, 64)
x = np.random.default_rng(2).standard_normal(200).astype(np.float32)
y = PackedLinear(packed, s, z, 3, 64, 200, spec={SPEC}).gemv(x)
err = float(np.abs(y - reference_gemv(packed, s, z, x, 3, 64)).max())
print(compile_stats()["codegen"], compile_stats()["disk_hits"], err)
"""


def child(cache: Path) -> tuple[list[str], str]:
    env = dict(os.environ, XBITC_CACHE_DIR=str(cache), PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split(), r.stderr


def damage_zeros(data: bytes) -> bytes:
    return bytes(100)


def damage_truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def damage_patch_code(data: bytes) -> bytes:
    # flip bits deep in the object, where the machine code is: the old cache ran it and returned wrong numbers
    b = bytearray(data)
    for i in range(len(b) // 2, len(b) // 2 + 64):
        b[i] ^= 0x5A
    return bytes(b)


def damage_strip_header(data: bytes) -> bytes:
    return data[len(diskcache.MAGIC) + 32:]  # a bare object, as the old cache stored them


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("kc")
    out, err = child(cache)
    assert out[0] != "0" and float(out[2]) < 1e-3  # compiled, and right
    out, err = child(cache)
    assert out[:2] == ["0", "1"] and not err.strip()  # a second process: one disk hit, nothing compiled, no warning
    return cache


@pytest.mark.parametrize("damage", [damage_zeros, damage_truncate, damage_patch_code, damage_strip_header])
def test_a_damaged_entry_is_rebuilt_with_one_warning(warm_cache, tmp_path, damage):
    cache = tmp_path / "c"
    cache.mkdir(mode=0o700)
    for f in warm_cache.iterdir():
        (cache / f.name).write_bytes(f.read_bytes())
    entries = [f for f in cache.glob("*.o")]
    assert len(entries) == 1
    entries[0].write_bytes(damage(entries[0].read_bytes()))
    out, err = child(cache)
    assert out[0] == "1" and out[1] == "0", "the bad entry must not be used"
    assert float(out[2]) < 1e-3
    lines = err.strip().splitlines()
    if damage is damage_strip_header:  # an unsigned object, as caches before signing held: replaced quietly
        assert not lines, err
    else:
        assert len(lines) == 1 and "failed its check" in lines[0] and "discarded and rebuilt" in lines[0], err
    out, err = child(cache)  # and the rebuilt entry is good again
    assert out[:2] == ["0", "1"] and not err.strip()


def test_an_entry_under_another_key_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("XBITC_CACHE_DIR", str(tmp_path / "c"))
    assert diskcache.write("aaaa", b"object bytes")
    assert diskcache.read("aaaa") == b"object bytes"
    (tmp_path / "c" / "bbbb.o").write_bytes((tmp_path / "c" / "aaaa.o").read_bytes())
    assert diskcache.read("bbbb") is None and not (tmp_path / "c" / "bbbb.o").exists()


def test_a_cache_made_with_another_key_is_rejected(warm_cache, tmp_path):
    """A cache folder someone hands over (a tarball, a CI cache) cannot vouch for its own entries: the key that
    signs them is this user's, outside every cache folder."""
    cache = tmp_path / "handed-over"
    cache.mkdir(mode=0o700)
    for f in warm_cache.iterdir():
        (cache / f.name).write_bytes(f.read_bytes())
    env_key = tmp_path / "other.key"
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, XBITC_CACHE_DIR=str(cache), XBITC_KEY_FILE=str(env_key),
                                PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
    assert r.returncode == 0, r.stderr[-2000:]
    codegen, hits, err = r.stdout.split()
    assert (codegen, hits) == ("1", "0") and float(err) < 1e-3
    assert "failed its check" in r.stderr


def test_an_entry_signed_with_another_key_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("XBITC_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("XBITC_KEY_FILE", str(tmp_path / "k1"))
    assert diskcache.write("k", b"code")
    assert diskcache.read("k") == b"code"
    monkeypatch.setenv("XBITC_KEY_FILE", str(tmp_path / "k2"))
    assert diskcache.read("k") is None


def test_a_fifo_entry_does_not_block(tmp_path, monkeypatch):
    monkeypatch.setenv("XBITC_CACHE_DIR", str(tmp_path / "c"))
    assert diskcache.write("k", b"code")
    (tmp_path / "c" / "k.o").unlink()
    os.mkfifo(tmp_path / "c" / "k.o")
    assert diskcache.read("k") is None  # would block forever reading a FIFO


def test_a_folder_others_can_write_is_not_used(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    monkeypatch.setenv("XBITC_CACHE_DIR", str(folder))
    diskcache._warned.clear()
    assert not diskcache.write("k", b"code")
    assert diskcache.read("k") is None
    assert "writable by other users" in capsys.readouterr().err
    clear_memory_cache()
    before = compile_stats()
    k = compile_kernel(KernelSpec(2, 32, col_tile=1024))  # still works, compiled in memory
    assert compile_stats()["codegen"] == before["codegen"] + 1 and not k.from_cache["gemv"]
    assert not list(folder.glob("*.o"))
    clear_memory_cache()


def test_a_readable_secret_is_not_trusted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XBITC_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("XBITC_KEY_FILE", str(tmp_path / "key"))
    assert diskcache.write("k", b"code")
    (tmp_path / "key").chmod(0o644)
    diskcache._warned.clear()
    assert diskcache.read("k") is None
    assert "not a private" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["llvmlite", "source", "features", "cpu"])
def test_the_key_covers_the_toolchain(monkeypatch, change):
    import dataclasses

    import llvmlite

    from xbitc.backends.llvm import jit

    spec, t = KernelSpec(4, 128), jit.host_target()
    before = jit.fingerprint(spec, t)
    if change == "llvmlite":
        monkeypatch.setattr(llvmlite, "__version__", "0.0.0")
    elif change == "source":
        monkeypatch.setattr(jit, "SOURCE_DIGEST", "0" * 16)
    else:
        t = dataclasses.replace(t, **{change: getattr(t, change) + ",x"})
    assert jit.fingerprint(spec, t) != before
