"""The WebGPU device the runtime computes on: backends/gpu/webgpu.py's wrapper with the adapter's own buffer limits
(WebGPU's defaults stop a storage binding at 128 MiB, below a large model's embedding table), pipelines cached per
kernel, and the one error a machine without a driver gets, naming what to install."""
from __future__ import annotations

import numpy as np

from xbitc.backends.base import BackendUnavailable
from xbitc.backends.gpu.lang import Kernel
from xbitc.backends.gpu.render import WGSL
from xbitc.backends.gpu.webgpu import NoAdapter, Pipeline, WebGPU, adapter

FIX = ("install a Vulkan driver: on Debian / Ubuntu `apt-get install mesa-vulkan-drivers libvulkan1` (Mesa's "
       "lavapipe runs WebGPU on the CPU), and wgpu-py with `pip install 'xbitc[gpu]'`; or run with --backend x86 / "
       "reference")
LIMITS = ("max-buffer-size", "max-storage-buffer-binding-size")


class DeviceUnavailable(BackendUnavailable):
    """No WebGPU adapter here; the message says why and what to install."""


class Device(WebGPU):
    def __init__(self):
        try:
            self.adapter = adapter()  # imports wgpu: NoAdapter says so when it is not installed
        except NoAdapter as err:
            raise DeviceUnavailable(f"the wgsl backend needs a WebGPU adapter ({err}); {FIX}") from None
        import wgpu

        self.wgpu = wgpu
        limits = {name: self.adapter.limits[name] for name in LIMITS}
        self.device = self.adapter.request_device_sync(required_limits=limits)
        self.limits = dict(self.device.limits)
        self.uniform_align = int(self.limits["min-uniform-buffer-offset-alignment"])
        self.printer = WGSL()
        self._pipelines: dict[Kernel, Pipeline] = {}
        self._by_source: dict[str, Pipeline] = {}

    def pipeline_for(self, kernel: Kernel) -> Pipeline:
        """The kernel's compute pipeline, built once (kernels are built once per specialisation; two with the same
        source share one)."""
        pipe = self._pipelines.get(kernel)
        if pipe is None:
            source = self.printer.render(kernel)
            pipe = self._by_source.get(source)
            if pipe is None:
                pipe = self._by_source[source] = self.pipeline(kernel, source)
            self._pipelines[kernel] = pipe
        return pipe

    def storage(self, nbytes: int):
        """An uninitialised storage buffer of at least `nbytes` (16-byte multiple: vec4 views fit)."""
        use = self.wgpu.BufferUsage
        return self.device.create_buffer(size=max(16, -(-nbytes // 16) * 16),
                                         usage=use.STORAGE | use.COPY_SRC | use.COPY_DST)

    def upload(self, data: np.ndarray):
        return self.buffer(np.ascontiguousarray(data))

    def read_bytes(self, buf, offset: int, nbytes: int) -> bytes:
        return bytes(self.device.queue.read_buffer(buf, offset, nbytes)) if nbytes else b""
