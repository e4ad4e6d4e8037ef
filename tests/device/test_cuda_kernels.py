"""The CUDA kernels of backends/gpu run on an NVIDIA GPU against the numpy oracle: nvcc builds them for the card's
architecture, the driver API (ctypes on libcuda, backends/gpu/cuda.py) loads and launches them. The cases and the
tolerance are tests/test_gpu_kernels.py's (its docstring has the error bound). Skipped, with the reason, where there
is no CUDA driver, no GPU or no nvcc."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from test_gpu_kernels import CASE, KERNELS, NAMES, SETTINGS, _case, check, every_kind, make_matrix
from xbitc.backends.gpu.cuda import CudaDevice, NoDevice, cubin, nvcc
from xbitc.backends.gpu.packed import GpuMatrix
from xbitc.backends.gpu.render import CUDA


class CudaRunner:
    def __init__(self, dev: CudaDevice, module):
        self.dev = dev
        self.fns = {k.name: (k, dev.function(module, k.name)) for k in KERNELS}

    def _launch(self, name: str, buffers: list[int], args: tuple) -> None:
        kernel, fn = self.fns[name]
        self.dev.launch(fn, kernel, buffers, *args)

    def product(self, m: GpuMatrix, x: np.ndarray, name: str, tile: int) -> np.ndarray:
        dev, T = self.dev, x.shape[0]
        try:
            w, pieces, src, xb = (dev.upload(a) for a in (m.words, m.pieces, m.src, x))
            xp = dev.alloc(4 * m.xp_floats(T, tile))
            y = dev.upload(np.full(T * m.rows, np.nan, np.float32))
            self._launch(NAMES["gather"], [xb, src, xp], m.gather_args(T, tile))
            self._launch(name, [w, w, pieces, xp, y], m.product_args(T, tile))
            return dev.download(y, np.float32, T * m.rows).reshape(T, m.rows)  # synchronises: errors surface here
        finally:
            dev.free_all()

    def dequant(self, m: GpuMatrix, ids: np.ndarray) -> np.ndarray:
        dev = self.dev
        try:
            bufs = [dev.upload(a) for a in (m.words, m.pieces, m.dst, ids)]
            out = dev.upload(np.full(len(ids) * m.inp, np.nan, np.float32))
            self._launch(NAMES["dequant"], bufs + [out], m.dequant_args(len(ids)))
            return dev.download(out, np.float32, len(ids) * m.inp).reshape(len(ids), m.inp)
        finally:
            dev.free_all()


@pytest.fixture(scope="module")
def cuda_runner(tmp_path_factory):
    try:
        dev = CudaDevice()
    except NoDevice as err:
        pytest.skip(f"no CUDA GPU: {err}")
    if nvcc() is None:
        pytest.skip("nvcc not found: the CUDA kernels are built on the machine that runs them")
    image = cubin(CUDA().render_all(KERNELS), dev.arch, tmp_path_factory.mktemp("cuda"))
    return CudaRunner(dev, dev.load(image))


@settings(max_examples=60, **SETTINGS)
@given(**CASE)
def test_cuda_product_matches_the_oracle(cuda_runner, rows, segments, batch, permuted, seed):
    _case(cuda_runner, rows, segments, batch, permuted, seed)


def test_cuda_every_kind_with_tiles_and_ragged_edges(cuda_runner):
    every_kind(cuda_runner)


def test_cuda_large_mixed_matrix(cuda_runner):
    """A 1024 x 6144 matrix of every depth in 128-column groups and 300 tokens (75 gemm tiles)."""
    rng = np.random.default_rng(11)
    segs = [(b, 768, 128) for b in range(1, 9)]
    records, inp, perm = make_matrix(rng, 1024, segs, True)
    x = rng.standard_normal((300, inp)).astype(np.float32)
    check(cuda_runner, records, 1024, inp, perm, x, rng.integers(0, 1030, 64).astype(np.uint32))
