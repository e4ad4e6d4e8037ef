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

    def run_calls(self, prepared, calls) -> None:
        """The executor's calls (executor.Bound) recorded into one compute pass and submitted. The parameters are
        one uniform buffer made at the first run of a plan; a call's bind group is kept while its bindings stay the
        same buffers and ranges (everything but fresh inputs and new outputs), so a repeated decode step rebuilds
        only the groups that bind those."""
        dev, state = self.device, prepared.state
        if "uniforms" not in state:
            state["uniforms"] = dev.create_buffer_with_data(data=prepared.uniforms or bytes(16),
                                                            usage=self.wgpu.BufferUsage.UNIFORM)
            state["groups"] = [None] * len(calls)
        kept = state["groups"]
        enc = dev.create_command_encoder()
        cp = enc.begin_compute_pass()
        for i, c in enumerate(calls):
            pipe = self.pipeline_for(c.kernel)
            key = tuple((id(buf), off, size) for buf, off, size in c.bindings)
            if kept[i] is None or kept[i][0] != key:
                entries = [{"binding": j, "resource": {"buffer": buf, "offset": off, "size": size}}
                           for j, (buf, off, size) in enumerate(c.bindings)]
                if c.kernel.params:
                    off, size = c.slot
                    entries.append({"binding": len(entries),
                                    "resource": {"buffer": state["uniforms"], "offset": off, "size": size}})
                try:
                    group = dev.create_bind_group(layout=pipe.layout, entries=entries)
                except self.wgpu.GPUError as err:
                    raise RuntimeError(f"node {c.node}: kernel {c.kernel.name} could not be bound: {err}") from None
                # the buffers are held with the group: an id is never reused while its key is kept
                kept[i] = (key, group, [b for b, _, _ in c.bindings])
            cp.set_pipeline(pipe.gpu)
            cp.set_bind_group(0, kept[i][1])
            cp.dispatch_workgroups(*c.groups)
        cp.end()
        dev.queue.submit([enc.finish()])
