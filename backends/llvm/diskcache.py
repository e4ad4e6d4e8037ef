"""The kernel disk cache: compiled objects the runtime made itself, checked on every read before LLVM sees them.

An entry is `<key>.o` = MAGIC + HMAC-SHA256(secret, key || object) + object. The key is the kernel's fingerprint
(generator source, spec, target triple, cpu, features, LLVM and llvmlite versions). The secret is 32 random bytes
this user's runtime made, kept outside every cache folder (`$XBITC_KEY_FILE`, else
`$XDG_STATE_HOME/xbitc/kernel-cache.key`, else `~/.local/state/xbitc/kernel-cache.key`) and readable by its owner
only, so a cache folder someone hands over (a tarball, a CI cache, `XBITC_CACHE_DIR` pointed at their folder)
cannot vouch for its own entries. A damaged entry (truncated, zeroed, flipped bits), one under another key, or one
not made with this secret fails the check: it is discarded and rebuilt with one warning line. A cache folder or key
that others can write is not used at all (the kernels are compiled in memory instead).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import sys
import tempfile
from pathlib import Path

MAGIC = b"XBITC-KERNEL-1\n\0"
_BARE_OBJECTS = (b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\x64\x86")  # ELF, Mach-O, COFF x86-64: unsigned entries
MAX_ENTRY_BYTES = 256 << 20  # kernel objects are kilobytes to a few megabytes
_DIGEST = 32
_warned: set[str] = set()


def cache_dir() -> Path:
    d = os.environ.get("XBITC_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "xbitc" / "kernels"


def warn(message: str) -> None:
    if message not in _warned:  # one line per problem and process, not one per kernel
        _warned.add(message)
        print(f"xbitc: warning: {message}", file=sys.stderr)


def _private(st: os.stat_result) -> bool:
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def key_file() -> Path:
    if os.environ.get("XBITC_KEY_FILE"):
        return Path(os.environ["XBITC_KEY_FILE"])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "xbitc" / "kernel-cache.key"


def _secret(folder: Path) -> bytes | None:
    """This user's secret, made on first use; None (no disk cache) where the cache folder or the key is not private."""
    path = key_file()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _private(os.stat(folder)):
            warn(f"kernel cache {folder} is writable by other users; not used (compiling in memory)")
            return None
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # mode 0600
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(_DIGEST))
            try:
                os.link(tmp, path)  # whole or not at all: a racing process sees no key or this one, never half
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or not _private(st) or st.st_mode & 0o077 or st.st_size != _DIGEST:
            warn(f"kernel cache key {path} is not a private {_DIGEST}-byte file; cache not used "
                 f"(remove it to make a new one)")
            return None
        return path.read_bytes()
    except OSError as err:
        warn(f"kernel cache {folder} or its key {path} is not usable ({err.strerror}); compiling in memory")
        return None


def _tag(secret: bytes, key: str, obj: bytes) -> bytes:
    return hmac.new(secret, key.encode() + b"\0" + obj, hashlib.sha256).digest()


def read(key: str) -> bytes | None:
    """The object cached under `key`, or None when there is none or it fails its check (then it is removed)."""
    folder = cache_dir()
    path = folder / f"{key}.o"
    if not path.exists():
        return None
    secret = _secret(folder)
    if secret is None:
        return None
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_ENTRY_BYTES:  # a FIFO or device would block or flood
            data = b""
        else:
            data = path.read_bytes()
    except OSError:
        return None
    head = len(MAGIC) + _DIGEST
    if (len(data) > head and data.startswith(MAGIC)
            and hmac.compare_digest(data[len(MAGIC):head], _tag(secret, key, data[head:]))):
        return data[head:]
    if not data.startswith(_BARE_OBJECTS):  # a bare object is an older xbitc's entry: replaced without a word
        warn(f"kernel cache entry {path.name} failed its check (damaged or modified); discarded and rebuilt")
    try:
        path.unlink()
    except OSError:
        pass
    return None


def write(key: str, obj: bytes) -> bool:
    """Store `obj` under `key` (atomically: readers see the old entry or the whole new one)."""
    folder = cache_dir()
    secret = _secret(folder)
    if secret is None:
        return False
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + _tag(secret, key, obj) + obj)
        os.replace(tmp, folder / f"{key}.o")
        return True
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return False
