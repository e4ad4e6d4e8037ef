"""examples/webgpu/ in a browser: a tiny model compiled and exported with `xbitc export --webgpu DIR --check NAME`,
the page and the bundle served over http on localhost, headless Chromium opened on it; the page's result line
(on the console, which --enable-logging=stderr prints) must be `xbitc-webgpu: ok ...`. The page compares its
float32 results with check.json's float64 reference within the rounding bound the bundle carries (see
xbitc/webgpu/export.py); the second test corrupts one reference value by far more than that bound and expects the
page to say FAIL, so the first cannot pass by a check that does not look.

Without a GPU, Chromium's WebGPU runs on SwiftShader (Vulkan on the CPU, shipped with Chromium) once
--enable-unsafe-webgpu is given (headless Chromium offers no adapter otherwise). Skipped, saying why, where
chromium is not installed (`make system-deps` installs it) or the page reports no WebGPU adapter.
"""
from __future__ import annotations

import functools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

PAGE = Path(__file__).resolve().parent.parent / "examples" / "webgpu"
MATRIX = "down.0.weight"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# WebGPU on a machine without a GPU, and nothing that reaches out to the network or a user's profile
FLAGS = ["--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--disable-gpu-sandbox",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-quic", "--disable-extensions", "--enable-logging=stderr"]
RESULT = re.compile(r'"(xbitc-webgpu: .*)", source: ')
WAIT_S = 180  # SwiftShader compiles the product kernels (~150 KB of WGSL each) on two cores: tens of seconds


def chromium() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.skip("chromium is not installed (apt-get install chromium; `make system-deps` does it)")
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder with the page and a bundle of a tiny model's matrices, as a user serves it."""
    from test_bad_input import quiet, tiny_loaded

    from xbitc.cli import main
    from xbitc.driver import compile_model

    root = tmp_path_factory.mktemp("webgpu-page")
    art = root / "tiny.xbitc"
    compile_model(tiny_loaded(), art, quiet(bpw=3.5))
    site = root / "site"
    site.mkdir()
    for name in ("index.html", "main.js"):
        shutil.copy(PAGE / name, site / name)
    assert main(["export", str(art), "--webgpu", str(site / "bundle"), "--check", MATRIX]) == 0
    return site


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def served(folder: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def page_line(browser: str, url: str, profile: Path) -> str:
    """The page's result line, read from Chromium's console log; Chromium (its process group) is ended after."""
    proc = subprocess.Popen([browser, *FLAGS, f"--user-data-dir={profile}", url], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    seen: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        while True:
            try:
                line = lines.get(timeout=WAIT_S)
            except queue.Empty:
                pytest.fail(f"no result line from the page in {WAIT_S} s; Chromium said:\n" + "".join(seen[-20:]))
            if line is None:
                pytest.fail(f"Chromium ended (exit {proc.wait()}) without the page's result line:\n" +
                            "".join(seen[-20:]))
            seen.append(line)
            m = RESULT.search(line)
            if m:
                return m.group(1)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def run_page(site: Path, tmp_path: Path) -> str:
    browser = chromium()
    with served(site) as url:
        line = page_line(browser, url + "index.html?bundle=bundle/", tmp_path / "profile")
    if line.startswith("xbitc-webgpu: no WebGPU adapter"):
        pytest.skip(f"headless Chromium has no WebGPU adapter here; the page says: {line}")
    return line


@pytest.mark.slow
def test_the_page_runs_the_bundle_in_headless_chromium(site, tmp_path):
    line = run_page(site, tmp_path)
    assert line.startswith(f"xbitc-webgpu: ok matrix={MATRIX} tokens=5 ") and "kernels=gather,gemv,gemm" in line, \
        line
    ratio = float(re.search(r"worst_err/tol=(\S+)", line).group(1))
    assert 0 < ratio <= 1, line  # float32 rounding was seen, within the bound


@pytest.mark.slow
def test_the_page_says_fail_when_the_reference_is_wrong(site, tmp_path):
    bad = tmp_path / "site"
    shutil.copytree(site, bad)
    check = json.loads((bad / "bundle" / "check.json").read_text())
    check["y"][7] += 1e-3 * max(check["absum"])  # ~100x the bound: what one wrong code would do
    (bad / "bundle" / "check.json").write_text(json.dumps(check))
    line = run_page(bad, tmp_path)
    assert line.startswith(f"xbitc-webgpu: FAIL matrix={MATRIX} gemv: 1 of ") and "token 0 row 7" in line, line
