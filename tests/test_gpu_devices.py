"""The GPU runtime's executor on its other devices (xbitc/webgpu/native_devices.py): a whole compiled model through
the Metal source compiled as C++ and run on the CPU (the shim checks semantics, not Metal legality), against the
Python runtime: logits of a prefill, the decode step with its caches left in device buffers, greedy tokens. The
same executor and plans as WebGPU, so this also checks that nothing in them is WebGPU-specific. The CUDA device
runs the same checks in tests/device/test_cuda_model.py where a GPU is lent.

Tolerance: 1e-4 of the logits' scale, as test_webgpu.py's whole models (float32 sums in another order)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from xbitc import runtime  # noqa: E402
from xbitc.backends.base import Backend, BackendUnavailable, Capabilities  # noqa: E402


def device_backend(make_device):
    """A backend that lowers through the GPU executor on the device `make_device()` returns (one per model)."""

    class OnDevice(Backend):
        name = "on-device"

        def capabilities(self) -> Capabilities:
            return Capabilities(bit_depths=tuple(range(0, 9)))

        def lower(self, graph):
            from xbitc.webgpu.program import WgslProgram

            return WgslProgram(graph, device=make_device())

    return OnDevice


def check_whole_model(art: Path, backend: type[Backend], monkeypatch) -> None:
    from test_equivalence import VOCAB
    from test_webgpu import close

    from xbitc import registry

    monkeypatch.setattr(registry, "get", lambda group, name, _get=registry.get:
                        backend if name == "on-device" else _get(group, name))
    ref, model = runtime.load(art, backend="reference"), runtime.load(art, backend="on-device")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(9))
    close(model(ids), ref(ids))
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    logits, *past = model.step(prompt, *runtime.empty_cache(model.graph.step))
    want, *ref_past = ref.step(prompt, *runtime.empty_cache(ref.graph.step))
    close(logits, want)
    close(past[-1].torch(), ref_past[-1])
    assert model.generate_ids(prompt, 6) == ref.generate_ids(prompt, 6)


def test_a_llama_through_the_metal_source_on_the_cpu(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from test_webgpu import compiled

    from xbitc.webgpu.native_devices import MetalShimDevice

    try:
        MetalShimDevice(tmp_path / "probe")
    except BackendUnavailable as err:
        pytest.skip(str(err))
    check_whole_model(compiled("llama", tmp_path), device_backend(lambda: MetalShimDevice(tmp_path / "metal")),
                      monkeypatch)
    assert list((tmp_path / "metal").glob("lib*/kernels.so"))  # the kernels did run as compiled Metal-as-C++


def test_new_kernels_are_batched_with_unique_names():
    from xbitc.backends.gpu.lang import Kernel
    from xbitc.webgpu.native_devices import new_batches

    a, b, a2, c = Kernel("a"), Kernel("b"), Kernel("a"), Kernel("c")
    assert new_batches([a, b, a, a2, c], {b: None}) == [[a, c], [a2]]
