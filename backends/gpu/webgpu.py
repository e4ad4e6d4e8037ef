"""lang.py kernels on WebGPU through wgpu-py (extra `xbitc[gpu]`): compile to compute pipelines, move numpy data,
dispatch, read back. On machines without a GPU, Mesa's lavapipe (Vulkan on the CPU) serves as the adapter.

    gpu = WebGPU()                                   # raises NoAdapter (with the reason) where there is none
    pipe = gpu.pipeline(kernel)                      # ShaderError: kernel, line, column and message
    xb, yb = gpu.buffer(x), gpu.buffer(np.zeros(n, np.float32))
    gpu.dispatch((pipe, [xb, yb], {"n": n}, (groups,)), ...)   # one command buffer, in order
    y = gpu.read(yb, np.float32)

Bindings follow the kernel's declaration order, then its parameter struct as a uniform buffer (render.py).
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np

from .lang import Kernel
from .render import WGSL


class NoAdapter(RuntimeError):
    pass


class ShaderError(RuntimeError):
    """A kernel WebGPU refused: `kernel`, `line` and `column` of the WGSL (0 where the error has no place)."""

    def __init__(self, kernel: str, line: int, column: int, message: str, source_line: str = ""):
        self.kernel, self.line, self.column, self.message = kernel, line, column, message
        where = f"line {line}, column {column}" if line else "pipeline"
        super().__init__(f"WGSL kernel {kernel}, {where}: {message}" + (f"\n    {source_line.strip()}"
                                                                          if source_line else ""))


def _describe(err: Exception) -> tuple[int, int, str]:
    """(line, column, message) of a wgpu validation error's text (naga's report: a headline, a "┌─ file:L:C"
    marker, notes "= ..." of which the last is the most specific)."""
    text = str(err)
    m = re.search(r"┌─ [^\n]*?:(\d+):(\d+)", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    msg = next((ln for ln in lines if "error" in ln.lower() and not ln.startswith("Validation Error")),
               lines[-1] if lines else type(err).__name__)
    msg = re.sub(r"^Shader '[^']*' (parsing |validation )?error: |^Shader (parsing |validation )?error: ", "", msg)
    notes = [ln[2:] for ln in lines if ln.startswith("= ")]
    if notes:
        msg += f" ({notes[-1]})"
    return (int(m.group(1)), int(m.group(2)), msg) if m else (0, 0, msg)


def adapter():
    """The WebGPU adapter wgpu-py finds (lavapipe on CPU-only hosts), or NoAdapter naming why there is none."""
    if not os.environ.get("XDG_RUNTIME_DIR"):  # the Vulkan loader warns on every call without one
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="xbitc-xdg-")
    try:
        import wgpu
    except ImportError as err:
        raise NoAdapter(f"wgpu-py is not installed (pip install 'xbitc[gpu]'): {err}") from err
    try:
        found = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as err:  # wgpu raises when no Vulkan / Metal / D3D12 driver answers
        raise NoAdapter(f"no WebGPU adapter ({type(err).__name__}: {err}); on Linux install a Vulkan driver, "
                        "e.g. Mesa's lavapipe (mesa-vulkan-drivers)") from err
    if found is None:
        raise NoAdapter("no WebGPU adapter")
    return found


@dataclass
class Pipeline:
    kernel: Kernel
    source: str
    gpu: object  # wgpu GPUComputePipeline
    layout: object  # its GPUBindGroupLayout


class WebGPU:
    def __init__(self, f16: bool = False):
        import wgpu

        self.wgpu = wgpu
        self.adapter = adapter()
        features = ["shader-f16"] if f16 else []
        self.device = self.adapter.request_device_sync(required_features=features)
        self.printer = WGSL(f16=f16)

    @property
    def name(self) -> str:
        return self.adapter.summary

    def pipeline(self, kernel: Kernel, source: str | None = None) -> Pipeline:
        """The compute pipeline of `kernel` (of `source` in its place, if given: the WGSL to compile)."""
        source = self.printer.render(kernel) if source is None else source
        try:
            module = self.device.create_shader_module(code=source, label=kernel.name)
            gpu = self.device.create_compute_pipeline(layout=self._layout(kernel), label=kernel.name,
                                                      compute={"module": module, "entry_point": kernel.name})
        except self.wgpu.GPUError as err:
            line, col, msg = _describe(err)
            lines = source.splitlines()
            raise ShaderError(kernel.name, line, col, msg, lines[line - 1] if 0 < line <= len(lines) else "") \
                from None
        return Pipeline(kernel, source, gpu, gpu.get_bind_group_layout(0))

    def _layout(self, k: Kernel):
        """The pipeline layout from the declarations (not "auto", which drops bindings the shader never reads)."""
        w = self.wgpu
        kinds = [w.BufferBindingType.storage if m.write else w.BufferBindingType.read_only_storage
                 for m in k.buffers] + ([w.BufferBindingType.uniform] if k.params else [])
        group = self.device.create_bind_group_layout(entries=[
            {"binding": i, "visibility": w.ShaderStage.COMPUTE, "buffer": {"type": t}} for i, t in enumerate(kinds)])
        return self.device.create_pipeline_layout(bind_group_layouts=[group])

    def buffer(self, data: np.ndarray | int):
        """A storage buffer holding `data` (or `data` zero bytes), readable back."""
        use = self.wgpu.BufferUsage
        usage = use.STORAGE | use.COPY_SRC | use.COPY_DST
        if isinstance(data, int):
            return self.device.create_buffer(size=max(16, -(-data // 16) * 16), usage=usage)
        raw = np.ascontiguousarray(data).tobytes()
        return self.device.create_buffer_with_data(data=raw + bytes(-len(raw) % 16 or (16 if not raw else 0)),
                                                   usage=usage)

    def write(self, buf, data: np.ndarray) -> None:
        self.device.queue.write_buffer(buf, 0, np.ascontiguousarray(data).tobytes())

    def read(self, buf, dtype, count: int | None = None) -> np.ndarray:
        out = np.frombuffer(self.device.queue.read_buffer(buf), dtype=dtype)
        return out if count is None else out[:count]

    def dispatch(self, *calls) -> None:
        """Runs calls (pipeline, [buffers], {params}, (groups x[, y[, z]])) in order, in one submission."""
        use = self.wgpu.BufferUsage
        enc = self.device.create_command_encoder()
        cp = enc.begin_compute_pass()
        for pipe, buffers, params, groups in calls:
            k = pipe.kernel
            if len(buffers) != len(k.buffers):
                raise ValueError(f"{k.name} binds {len(k.buffers)} buffers, got {len(buffers)}")
            entries = [{"binding": i, "resource": {"buffer": b}} for i, b in enumerate(buffers)]
            if k.params:
                ub = self.device.create_buffer_with_data(data=k.pack_params(**params), usage=use.UNIFORM)
                entries.append({"binding": len(buffers), "resource": {"buffer": ub}})
            group = self.device.create_bind_group(layout=pipe.layout, entries=entries)
            cp.set_pipeline(pipe.gpu)
            cp.set_bind_group(0, group)
            cp.dispatch_workgroups(*(tuple(groups) + (1,) * (3 - len(groups))))
        cp.end()
        self.device.queue.submit([enc.finish()])
