"""The kernel disk cache: compiled objects the runtime made itself, checked on every read before LLVM sees them.

An entry is `<key>.o` = MAGIC + HMAC-SHA256(secret, key || object) + object. The key is the kernel's fingerprint
(generator source, spec, target triple, cpu, features, LLVM and llvmlite versions); the secret is 32 random bytes in
`<cache>/secret`, readable by its owner only. A damaged entry (truncated, zeroed, flipped bits), one copied under
another key, or one patched by anyone who cannot read the secret fails the check: it is discarded and rebuilt with
one warning line. A cache folder or secret that others can write is not used at all (the kernels are compiled in
memory instead), since whoever can write them could forge entries.
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
SECRET = "secret"
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


def _secret(folder: Path) -> bytes | None:
    """The cache's secret, made on first use; None (no disk cache) where the folder or secret is not private."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _private(os.stat(folder)):
            warn(f"kernel cache {folder} is writable by other users; not used (compiling in memory)")
            return None
        path = folder / SECRET
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(_DIGEST))
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or not _private(st) or st.st_mode & 0o077 or st.st_size != _DIGEST:
            warn(f"kernel cache secret {path} is not a private {_DIGEST}-byte file; cache not used "
                 f"(remove {folder} to start a fresh cache)")
            return None
        return path.read_bytes()
    except OSError as err:
        warn(f"kernel cache {folder} is not usable ({err.strerror}); compiling in memory")
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
        data = path.read_bytes()
    except OSError:
        return None
    head = len(MAGIC) + _DIGEST
    if (len(data) > head and data.startswith(MAGIC)
            and hmac.compare_digest(data[len(MAGIC):head], _tag(secret, key, data[head:]))):
        return data[head:]
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
