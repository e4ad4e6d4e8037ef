"""Printers of lang.py kernels: one C-style base, and WGSL, CUDA and Metal subclasses that override only what the
languages spell differently: type names, literals, casts and bitcasts, select, math names, thread builtins, the
declarations of locals, buffers, parameters and shared arrays, the entry point's head, barriers and switch cases.

    WGSL().render(kernel)         one shader module (WebGPU compiles one module per pipeline)
    CUDA().render_all(kernels)    one translation unit, extern "C" __global__ functions
    Metal().render_all(kernels)   one Metal library source, `kernel` functions

Every binary operation is printed in parentheses: WGSL has no precedence between some operators (`a & b | c` is an
error) and C's differ from what a reader expects, so nothing is left to either.

Bindings and arguments, the same order on every target: the storage buffers in declaration order (WGSL
@group(0) @binding(i); Metal [[buffer(i)]]; CUDA the i-th pointer argument), then the parameter struct (WGSL a
uniform buffer at the next binding, Metal a `constant` reference at the next buffer index, CUDA the last argument,
by value). `Kernel.pack_params` gives its bytes for all three.
"""
from __future__ import annotations

import math
import struct

import numpy as np

from .lang import (BUILTINS, ArrayDecl, Assign, Comment, Decl, DType, Expr, For, If, Kernel, Memory, Simple,
                   Store, Switch, boolean, f16, f32, i32, u32)

AXES = "xyz"


class CStyle:
    """What C, CUDA and Metal share; WGSL overrides the declarations."""

    name = "c"
    types: dict[str, str] = {"f32": "float", "i32": "int", "u32": "unsigned int", "bool": "bool"}
    math_names: dict[str, str] = {}  # math function -> name, where it differs from lang's
    indent = "    "

    # ---- whole sources
    def render(self, kernel: Kernel) -> str:
        return self.render_all([kernel])

    def render_all(self, kernels: list[Kernel]) -> str:
        features = set().union(*(k.features for k in kernels))
        parts = [self.header(features)] + [self.function(k) for k in kernels]
        return "\n".join(p for p in parts if p)

    def header(self, features: set[str]) -> str:
        return ""

    def function(self, k: Kernel) -> str:
        lines = [f"// {line}" for line in k.doc.splitlines()]
        lines += self.declarations(k)
        lines.append(("\n" if lines else "") + self.entry(k) + " {")
        lines += [self.indent + s for s in self.prologue(k)]
        lines += self.block(k.body, 1)
        lines.append("}")
        return "\n".join(lines) + "\n"

    # ---- types and expressions
    def type(self, t: DType) -> str:
        return self.types[t.name]

    def expr(self, e: Expr, top: bool = False) -> str:
        s = getattr(self, "e_" + e.op)(e)
        return s[1:-1] if top and e.op == "binary" else s

    def e_const(self, e: Expr) -> str:
        return self.literal(e.arg, e.dtype)

    def e_var(self, e: Expr) -> str:
        return e.arg

    def e_param(self, e: Expr) -> str:
        return f"prm.{e.arg}"

    def e_load(self, e: Expr) -> str:
        return f"{e.arg.name}[{self.expr(e.args[0], True)}]"

    def e_unary(self, e: Expr) -> str:
        return f"({e.arg}{self.expr(e.args[0])})"

    def e_binary(self, e: Expr) -> str:
        a, b = e.args
        op = e.arg
        if a.dtype is boolean:
            op = {"&": "&&", "|": "||", "^": "!="}.get(op, op)
        return f"({self.expr(a)} {op} {self.expr(b)})"

    def e_call(self, e: Expr) -> str:
        return f"{self.math_name(e.arg, e.dtype)}({', '.join(self.expr(a, True) for a in e.args)})"

    def math_name(self, fn: str, t: DType) -> str:
        return self.math_names.get(fn, fn)

    def e_cast(self, e: Expr) -> str:
        return f"(({self.type(e.dtype)}){self.expr(e.args[0])})"

    def e_select(self, e: Expr) -> str:
        c, a, b = (self.expr(x) for x in e.args)
        return f"({c} ? {a} : {b})"

    def e_comp(self, e: Expr) -> str:
        return f"{self.expr(e.args[0])}.{'xyzw'[e.arg]}"

    def e_vector(self, e: Expr) -> str:
        return f"{self.type(e.dtype)}({', '.join(self.expr(a, True) for a in e.args)})"

    def e_builtin(self, e: Expr) -> str:
        which, axis = e.arg
        return "lix" if which == "local_index" else f"{BUILTIN_VARS[which]}.{AXES[axis]}"

    def literal(self, v, t: DType) -> str:
        if t is boolean:
            return "true" if v else "false"
        if t.kind == "float":
            if not math.isfinite(v):
                bits = struct.unpack("<I", struct.pack("<f", v))[0]
                return self.bitcast_text(self.literal(bits, u32), u32, f32)
            s = str(np.float16(v) if t is f16 else np.float32(v))
            s = self.float_literal(s if ("." in s or "e" in s) else s + ".0", t)
            return f"({s})" if s.startswith("-") else s
        if t is i32 and v == -(2**31):
            return f"({self.literal(-(2**31) + 1, t)} - {self.literal(1, t)})"
        s = f"{v:#x}{self.int_suffix(t)}" if t is u32 and v >= 4096 else f"{v}{self.int_suffix(t)}"  # masks
        return f"({s})" if v < 0 else s

    def float_literal(self, s: str, t: DType) -> str:
        return s + "f"

    def int_suffix(self, t: DType) -> str:
        return "u" if t is u32 else ""

    def e_bitcast(self, e: Expr) -> str:
        return self.bitcast_text(self.expr(e.args[0], True), e.args[0].dtype, e.dtype)

    def bitcast_text(self, s: str, src: DType, dst: DType) -> str:
        raise NotImplementedError

    # ---- statements
    def block(self, stmts: list, depth: int) -> list[str]:
        out: list[str] = []
        for s in stmts:
            out += [self.indent * depth + line for line in self.stmt(s, depth)]
        return out

    def stmt(self, s, depth: int) -> list[str]:
        if isinstance(s, Decl):
            return [self.decl(s.var.arg, s.var.dtype, self.expr(s.init, True), s.var.mutable)]
        if isinstance(s, ArrayDecl):
            return [self.array_decl(s.mem)]
        if isinstance(s, Assign):
            return [f"{s.var.arg} = {self.expr(s.value, True)};"]
        if isinstance(s, Store):
            return [f"{s.mem.name}[{self.expr(s.index, True)}] = {self.expr(s.value, True)};"]
        if isinstance(s, Comment):
            return [f"// {s.text}"]
        if isinstance(s, Simple):
            return [self.barrier() if s.what == "barrier" else f"{s.what};"]
        inner = lambda body: [line[len(self.indent) * depth:] for line in self.block(body, depth + 1)]  # noqa: E731
        if isinstance(s, For):
            head = (self.unroll_hint() if s.unroll else []) + [self.for_head(s) + " {"]
            return head + inner(s.body) + ["}"]
        if isinstance(s, If):
            out = [f"if ({self.expr(s.cond, True)}) {{"] + inner(s.then)
            if s.other is not None:
                out += ["} else {"] + inner(s.other)
            return out + ["}"]
        if isinstance(s, Switch):
            out = [f"switch ({self.expr(s.value, True)}) {{"]
            for values, body in s.cases:
                labels = " ".join(f"case {self.literal(v, s.value.dtype)}:" for v in values)
                out += self.case(labels, inner(body))
            out += self.case("default:", inner(s.default or []))
            return out + ["}"]
        raise TypeError(f"unknown statement {s!r}")

    def case(self, labels: str, body: list[str]) -> list[str]:
        ends = body and body[-1].strip() in ("break;", "continue;", "return;")
        return [f"{labels} {{"] + body + ([] if ends else [self.indent + "break;"]) + ["}"]

    def decl(self, name: str, t: DType, init: str, mutable: bool) -> str:
        return f"{'' if mutable else 'const '}{self.type(t)} {name} = {init};"

    def array_decl(self, m: Memory) -> str:
        return f"{self.type(m.dtype)} {m.name}[{m.size}] = {{}};"

    def for_head(self, s: For) -> str:
        v = s.var.arg
        return (f"for ({self.type(s.var.dtype)} {v} = {self.expr(s.start, True)}; {v} < {self.expr(s.end, True)}; "
                f"{v} += {self.expr(s.step, True)})")

    def unroll_hint(self) -> list[str]:
        return ["#pragma unroll"]

    def barrier(self) -> str:
        raise NotImplementedError

    # ---- declarations around the body
    def declarations(self, k: Kernel) -> list[str]:
        """Module-scope lines before the entry point (the parameter struct)."""
        if not k.params:
            return []
        return [f"struct {k.name}_params {{"] + [f"{self.indent}{self.type(t)} {n};" for n, t in k.params] + ["};"]

    def prologue(self, k: Kernel) -> list[str]:
        """Lines opening the body (shared arrays)."""
        return [f"{self.shared_qualifier} {self.type(m.dtype)} {m.name}[{m.size}];" for m in k.shared_arrays]

    shared_qualifier = ""

    def entry(self, k: Kernel) -> str:
        raise NotImplementedError


BUILTIN_VARS = {"global_id": "gid", "local_id": "lid", "group_id": "wid", "num_groups": "nwg", "local_index": "lix"}


class WGSL(CStyle):
    """WGSL for WebGPU: one module per kernel. `f16=True` allows the f16 type (the device must have the
    shader-f16 feature); without it a kernel using f16 is refused: read float16 data as u32 words and
    half_lo / half_hi (unpack2x16float)."""

    name = "wgsl"
    types = {"f32": "f32", "f16": "f16", "i32": "i32", "u32": "u32", "bool": "bool", "vec4f": "vec4<f32>",
             "vec4u": "vec4<u32>"}
    math_names = {"rsqrt": "inverseSqrt"}
    BUILTIN_ATTRS = {"global_id": "global_invocation_id", "local_id": "local_invocation_id",
                     "group_id": "workgroup_id", "num_groups": "num_workgroups",
                     "local_index": "local_invocation_index"}

    def __init__(self, f16: bool = False):
        self.f16 = f16

    def render_all(self, kernels: list[Kernel]) -> str:
        """The modules one after another (a golden file's form); compile them one by one with `render`."""
        return "\n".join(self.render(k) for k in kernels)

    def render(self, kernel: Kernel) -> str:
        if "f16" in kernel.features and not self.f16:
            raise ValueError(f"{kernel.name} uses f16, which WGSL has only with the shader-f16 extension: render "
                             "with WGSL(f16=True) for a device that has it, or read float16 as u32 + half_lo/half_hi")
        head = "enable f16;\n" if "f16" in kernel.features else ""
        return head + self.function(kernel)

    def float_literal(self, s: str, t: DType) -> str:
        return s + ("h" if t is f16 else "f")

    def int_suffix(self, t: DType) -> str:
        return "u" if t is u32 else "i"

    def e_cast(self, e: Expr) -> str:
        return f"{self.type(e.dtype)}({self.expr(e.args[0], True)})"

    def e_select(self, e: Expr) -> str:
        c, a, b = (self.expr(x, True) for x in e.args)
        return f"select({b}, {a}, {c})"

    def e_unpack(self, e: Expr) -> str:
        return f"unpack2x16float({self.expr(e.args[0], True)}).{'xy'[e.arg]}"

    def bitcast_text(self, s: str, src: DType, dst: DType) -> str:
        return f"bitcast<{self.type(dst)}>({s})"

    def decl(self, name: str, t: DType, init: str, mutable: bool) -> str:
        return f"{'var' if mutable else 'let'} {name}: {self.type(t)} = {init};"

    def array_decl(self, m: Memory) -> str:
        # an explicit zero value: wgpu's compiler (naga) zeroes a var without initialiser once per invocation, not
        # each time its declaration runs (inside a loop)
        t = f"array<{self.type(m.dtype)}, {m.size}>"
        return f"var {m.name}: {t} = {t}();"

    def for_head(self, s: For) -> str:
        v = s.var.arg
        return (f"for (var {v}: {self.type(s.var.dtype)} = {self.expr(s.start, True)}; "
                f"{v} < {self.expr(s.end)}; {v} += {self.expr(s.step, True)})")

    def unroll_hint(self) -> list[str]:
        return []  # WGSL has no unroll attribute; drivers decide

    def case(self, labels: str, body: list[str]) -> list[str]:
        return [f"{labels.replace(': case ', ', ')} {{"] + body + ["}"]

    def barrier(self) -> str:
        return "workgroupBarrier();"

    def declarations(self, k: Kernel) -> list[str]:
        out = []
        if k.params:
            out += [f"struct {k.name}_params {{"] + [f"{self.indent}{n}: {self.type(t)}," for n, t in k.params]
            out += ["}"]
        for m in k.buffers:
            access = "read_write" if m.write else "read"
            out.append(f"@group(0) @binding({m.binding}) var<storage, {access}> {m.name}: "
                       f"array<{self.type(m.dtype)}>;")
        if k.params:
            out.append(f"@group(0) @binding({len(k.buffers)}) var<uniform> prm: {k.name}_params;")
        out += [f"var<workgroup> {m.name}: array<{self.type(m.dtype)}, {m.size}>;" for m in k.shared_arrays]
        return out

    def prologue(self, k: Kernel) -> list[str]:
        return []

    def entry(self, k: Kernel) -> str:
        args = [f"@builtin({self.BUILTIN_ATTRS[b]}) {BUILTIN_VARS[b]}: {'u32' if b == 'local_index' else 'vec3<u32>'}"
                for b in BUILTINS if b in k.builtins]
        x, y, z = k.workgroup
        return f"@compute @workgroup_size({x}, {y}, {z})\nfn {k.name}({', '.join(args)})"


class CUDA(CStyle):
    """CUDA C++: `extern "C" __global__` functions launched with blocks of exactly the kernel's workgroup."""

    name = "cuda"
    types = {"f32": "float", "f16": "__half", "i32": "int", "u32": "unsigned int", "bool": "bool",
             "vec4f": "float4", "vec4u": "uint4"}
    F32_MATH = {"exp": "expf", "log": "logf", "sqrt": "sqrtf", "rsqrt": "rsqrtf", "tanh": "tanhf", "sin": "sinf",
                "cos": "cosf", "floor": "floorf", "ceil": "ceilf", "abs": "fabsf", "min": "fminf", "max": "fmaxf"}
    shared_qualifier = "__shared__"

    def header(self, features: set[str]) -> str:
        return "#include <cuda_fp16.h>\n" if features else ""

    def math_name(self, fn: str, t: DType) -> str:
        return self.F32_MATH[fn] if t is f32 else fn

    def float_literal(self, s: str, t: DType) -> str:
        return f"__float2half({s}f)" if t is f16 else s + "f"

    def e_vector(self, e: Expr) -> str:
        return f"make_{self.type(e.dtype)}({', '.join(self.expr(a, True) for a in e.args)})"

    def e_unpack(self, e: Expr) -> str:
        w = self.expr(e.args[0])
        return f"__half2float(__ushort_as_half((unsigned short){f'({w} >> 16)' if e.arg else w}))"

    def bitcast_text(self, s: str, src: DType, dst: DType) -> str:
        if f32 in (src, dst):
            other = {"u32": "uint", "i32": "int"}[(dst if src is f32 else src).name]
            return f"__float_as_{other}({s})" if src is f32 else f"__{other}_as_float({s})"
        return f"(({self.type(dst)})({s}))"

    def e_builtin(self, e: Expr) -> str:
        which, axis = e.arg
        a = AXES[axis]
        if which == "local_index":
            return "(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z))"
        return {"global_id": f"(blockIdx.{a} * blockDim.{a} + threadIdx.{a})", "local_id": f"threadIdx.{a}",
                "group_id": f"blockIdx.{a}", "num_groups": f"gridDim.{a}"}[which]

    def barrier(self) -> str:
        return "__syncthreads();"

    def entry(self, k: Kernel) -> str:
        args = [f"{'' if m.write else 'const '}{self.type(m.dtype)}* __restrict__ {m.name}" for m in k.buffers]
        if k.params:
            args.append(f"const {k.name}_params prm")
        return f'extern "C" __global__ void __launch_bounds__({math.prod(k.workgroup)}) {k.name}({", ".join(args)})'


class Metal(CStyle):
    """Metal Shading Language: `kernel` functions dispatched with threadgroups of exactly the kernel's workgroup.
    Metal compiles with fast math by default (exp, tanh, division are approximate)."""

    name = "metal"
    types = {"f32": "float", "f16": "half", "i32": "int", "u32": "uint", "bool": "bool", "vec4f": "float4",
             "vec4u": "uint4"}
    shared_qualifier = "threadgroup"
    BUILTIN_ATTRS = {"global_id": "thread_position_in_grid", "local_id": "thread_position_in_threadgroup",
                     "group_id": "threadgroup_position_in_grid", "num_groups": "threadgroups_per_grid",
                     "local_index": "thread_index_in_threadgroup"}

    def header(self, features: set[str]) -> str:
        return "#include <metal_stdlib>\nusing namespace metal;\n"

    def float_literal(self, s: str, t: DType) -> str:
        return f"half({s}f)" if t is f16 else s + "f"

    def e_unpack(self, e: Expr) -> str:
        return f"float(as_type<half2>({self.expr(e.args[0], True)}).{'xy'[e.arg]})"

    def bitcast_text(self, s: str, src: DType, dst: DType) -> str:
        return f"as_type<{self.type(dst)}>({s})"

    def barrier(self) -> str:
        return "threadgroup_barrier(mem_flags::mem_threadgroup);"

    def builtin_args(self, k: Kernel) -> list[str]:
        return [b for b in BUILTINS if b in k.builtins]

    def entry(self, k: Kernel) -> str:
        args = [f"device {'' if m.write else 'const '}{self.type(m.dtype)}* {m.name} [[buffer({m.binding})]]"
                for m in k.buffers]
        if k.params:
            args.append(f"constant {k.name}_params& prm [[buffer({len(k.buffers)})]]")
        args += [f"{'uint' if b == 'local_index' else 'uint3'} {BUILTIN_VARS[b]} [[{self.BUILTIN_ATTRS[b]}]]"
                 for b in self.builtin_args(k)]
        head = f"[[max_total_threads_per_threadgroup({math.prod(k.workgroup)})]]\n"
        return head + f"kernel void {k.name}({', '.join(args)})"


PRINTERS = {"wgsl": WGSL, "cuda": CUDA, "metal": Metal}
