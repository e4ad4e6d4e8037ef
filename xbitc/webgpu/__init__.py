"""The GPU runtime: a compiled model executed entirely on a GPU device, first of all WebGPU through wgpu-py
(`--backend wgsl`, `runtime.load(path, backend="wgsl")`; the backend plugin is backends/wgsl.py). The executor is
device-neutral: native_devices.py runs the same plans on CUDA (the driver API, kernels built by nvcc) and, to check
the Metal source's semantics, on the CPU through the Metal shim.

Design. A traced graph is legalized to core ops (passes/legalize.py) once. Per call, the execution plan at the
inputs' shapes (ir/execplan.py: every value's shape and device type, aliases, strided copies for the reordering
views, an arena placement for temporaries) becomes a list of kernel calls (backends/gpu/launches.py: every core op
a lang.py kernel printed as WGSL; packed linears and packed embedding rows through backends/gpu/packed.py). All of
them are recorded into one compute pass and submitted once: no value goes back to the host between ops; only the
outputs are read back. Plans and their calls are kept for the last few input shapes, so a repeated shape costs
only the dispatches: a call's WebGPU bind group is kept while it binds the same buffer ranges, so a decode step
rebuilds only the groups of its fresh inputs and outputs.

  device.py    the wgpu device (the adapter's buffer limits), pipelines cached per kernel, the no-adapter error
  weights.py   parameters uploaded once, shared by a model's main graph and its decode step: float32 / int32 /
               bool words, packed matrices in the GPU row-lane layout (no float copy of a packed matrix is made,
               embedding tables included: their rows are read through the layout)
  executor.py  one core graph on the device: arena, scratch, inputs, the calls with their bindings, read back
  native_devices.py  the CUDA device and the Metal-shim CPU device
  program.py   the Program interface runtime.CompiledModel drives (`__call__`, `companion` for the decode step)
  export.py    `xbitc export ART --webgpu DIR`: the packed matrices and their WGSL kernels as a bundle a web page
               runs (examples/webgpu/), described by its model.json

Decoding: the decode step's key / value caches are outputs left on the device (`DeviceTensor`) and bound in place as
the next step's inputs, so a token costs one submission and the read back of its logits. The step graph extends
the caches by concat, which copies them into new buffers each step; appending in place into preallocated caches
is not done (a step is O(cache) in copies, next to O(cache) in attention reads anyway).

Timings on Mesa's lavapipe (Vulkan on the CPU, this project's test machines) measure that emulation, not a GPU:
they are recorded to show the runtime works end to end, never as speed figures.
"""
from .device import Device, DeviceUnavailable
from .executor import DeviceTensor, Executor
from .program import WgslProgram

__all__ = ["Device", "DeviceUnavailable", "DeviceTensor", "Executor", "WgslProgram"]
