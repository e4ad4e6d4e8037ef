"""Compile, load and run a model through the numpy-dequant backend, and check it against xbitc's reference backend.

    pip install -e examples/custom_backend     # publishes the backend under the `xbitc.backends` entry point
    python examples/custom_backend/run.py

Without the install the script registers the class in-process instead, and says so.
"""
from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from xbitc import frontend, registry, runtime
from xbitc.driver import CompileOptions, compile_model
from xbitc.quant.packed import PackedMatrix

NAME = "numpy-dequant"


def find_backend() -> type:
    try:
        cls = registry.get(registry.BACKEND_GROUP, NAME)
        print(f"backend {NAME!r} found through its entry point: {registry.origin(registry.BACKEND_GROUP, NAME)}")
    except registry.UnknownPlugin:
        sys.path.insert(0, str(Path(__file__).parent))  # the package beside this script, not installed
        from xbitc_numpy_backend import NumpyBackend as cls

        registry.register(registry.BACKEND_GROUP, NAME, cls)
        print(f"backend {NAME!r} is not installed: registered in-process")
    return cls


def main() -> None:
    backend = find_backend()
    decode = importlib.import_module(backend.__module__).dequantize  # the package's own decoder
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                                torch.nn.GELU(), torch.nn.Linear(256, 10)).eval()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    loaded = frontend.from_module(model, (x,), name="mlp (random weights)")  # the batch stays dynamic
    path = Path(tempfile.mkdtemp(prefix="xbitc-example-")) / "mlp.xbitc"
    # A learned allocation (mixed depths, dropped columns, permuted columns) exercises the whole packed format
    opts = CompileOptions(bpw=4.0, tune_steps=0, calib_windows=4, backend=NAME, progress=False, log=lambda s: None)
    manifest = compile_model(loaded, path, opts)
    print(f"compiled for backend {manifest.backend!r}: {manifest.size.bits_per_weight:.4f} bits per weight; "
          f"files {sorted(manifest.size.files)}")

    compiled = runtime.load(path)  # the artifact names its backend: numpy-dequant executes it
    oracle = runtime.load(path, backend="reference")
    before = backend.calls
    got = compiled(x)
    print(f"executing backend: {compiled.backend_name}; numpy linear calls in one forward: {backend.calls - before}")
    packed = {n: p for n, p in compiled.graph.params.items() if isinstance(p, PackedMatrix)}
    same = all(np.array_equal(decode(p), p.dequantize().numpy()) for p in packed.values())
    depths = sorted({p.seg.bits for m in packed.values() for p in m.segments})
    permuted = sum(m.perm is not None for m in packed.values())
    print(f"packed tensors: {len(packed)}, depths {depths}, {permuted} with permuted columns")
    print(f"decoded weights identical to xbitc's for all {len(packed)} packed tensors: {same}")
    want = oracle(x)
    print(f"max abs difference vs reference backend: {float((got - want).abs().max()):.3e} "
          f"(outputs max abs {float(want.abs().max()):.3f})")
    with torch.no_grad():
        ref = model(x)
    print(f"relative rms error vs float: {float((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()):.4f}")


if __name__ == "__main__":
    main()
