"""A whole compiled model on an NVIDIA GPU: the GPU runtime's executor (xbitc/webgpu) on its CUDA device
(xbitc/webgpu/native_devices.py: kernels printed as CUDA, built by nvcc for the card, launched through the driver
API) against the Python runtime: prefill logits, the decode step with its caches left on the GPU, greedy tokens.
The checks and tolerance are tests/test_gpu_devices.py's. Skipped, with the reason, where there is no CUDA driver,
GPU or nvcc."""
from __future__ import annotations

import pytest

from test_gpu_devices import check_whole_model, device_backend
from xbitc.backends.base import BackendUnavailable


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_random_model_on_the_gpu_matches_the_python_runtime(family, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from test_webgpu import compiled

    from xbitc.webgpu.native_devices import CudaDevice

    try:
        CudaDevice()
    except BackendUnavailable as err:
        pytest.skip(str(err))
    check_whole_model(compiled(family, tmp_path), device_backend(CudaDevice), monkeypatch)
