"""The artifact's `kernels/` for a CPU target family (targets.py): the row-lane kernels (what the runtime calls: any
depth, whole matrices; records built by `llvm.rowlane.pack`) as one relocatable object per micro-architecture level
and activation strategy (f32, q8), symbols suffixed with the level so all of them link into one binary, plus the C
header `kernels/xbitc_kernels.h` (`header_text`). Objects come from the kernel disk cache when they were emitted
before. For x86-64: ~280 KB in all, whatever the model: 0.017 bits per weight of SmolLM2-135M, counted (the planners
reserve them before choosing depths, see `Backend.emitted`), and dominant for toy models."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from xbitc.ir.graph import LINEAR_OPS, Graph

from ..llvm import GENERATOR_VERSION
from ..llvm.render import LLVMRenderer
from ..llvm.rowlane import ROWS_VERSION
from ..product import SIGNATURES, PackedProduct
from .linears import ACTIVATIONS
from .targets import CpuFamily

ABI_VERSION = 1  # of the emitted kernels' C interface (argument list and meaning); bump on any change
HEADER = "xbitc_kernels.h"
def _objects_comment(family: CpuFamily) -> list[str]:
    """The header's paragraph on the objects: format, triple, what each level suffix means, how to pick one."""
    levels = ", ".join(f"{lv.suffix} = {lv.summary}" for lv in family.levels)
    text = (f"Objects: {family.object_format} ({family.triple}), position independent, no external references; "
            f"suffix {levels}. {family.pick_hint}")
    return [" * " + line for line in textwrap.wrap(text, 111, break_long_words=False, break_on_hyphens=False)]


def header_text(rows: list[dict], family: CpuFamily) -> str:
    """The C header declaring every emitted row-lane kernel (the manifest note's entries)."""
    lines = [
        "/* xbitc generated kernels: packed b-bit matrix-vector / matrix-matrix products. Generated file. */",
        "#ifndef XBITC_KERNELS_H",
        "#define XBITC_KERNELS_H",
        "",
        "#include <stdint.h>",
        "",
        f"#define XBITC_KERNELS_ABI_VERSION {ABI_VERSION}",
        f'#define XBITC_KERNELS_GENERATOR "{GENERATOR_VERSION}"',
        f"#define XBITC_ROWS_FORMAT {ROWS_VERSION}",
        "",
        "/*",
        " * Row-lane kernels, what the xbitc Python runtime runs: one call computes a whole packed matrix, every",
        " * segment and depth. y[r] = sum over records of s[r]*(sum_j q[r][j]*x[j]) - s[r]*z[r]*(sum_j x[j]) for rows r",
        " * in [rows_begin, rows_end), rows_begin a multiple of 16; y is written, never read. Disjoint row ranges may run",
        " * on different threads (q8: each with its own scratch).",
        " *   rec   nrec records of 7 int64: kind (1..8 bits packed, 9 one byte per code), ncols, address of the",
        " *         codes, the 16 float16 scales and the 16 uint8 zero points of row block 0, x_offset, stride (bytes",
        " *         between consecutive 16-row blocks). A record is one scale group of one segment.",
        " *   x     float32 input; perm int32 [in] column permutation (NULL = identity): column x_offset + j of a",
        " *         record reads x[perm[x_offset + j]]. gemm reads x already permuted, token t at x + t*ldx, and writes",
        " *         y + t*ldy.",
        " * Codes of a 16-row block, kind b in 1..8, f32: per 32-column block b uint32 words per row (lane l = row l),",
        " * word w holding bits 32w..32w+31 of the row's LSB-first stream of 32 codes; kind 9: [ncols][16] bytes.",
        " * q8 (int8 activations rounded per record as absmax/127, any batch; scratch >= batch*(sum of the records'",
        " * ncols rounded up to 32) + 8*batch*nrec + 64 bytes): codes as bit planes of 1/2/4 bits (3 = 2+1, 5 = 4+1,",
        " * 6 = 4+2, 7 = 4+2+1, 8 = 4+4; a plane of width p is p words per row in which byte i, bits p*s.. hold",
        " * column w*32/p + 4s + i of word w); kinds 1..8 only.",
        " * xbitc.backends.llvm.rowlane.pack builds rec and the buffer from an artifact's segments (weights.safetensors).",
        *_objects_comment(family),
        " */",
        "",
        "#ifdef __cplusplus",
        'extern "C" {',
        "#endif",
        "",
        "static inline int xbitc_kernels_abi_version(void) { return XBITC_KERNELS_ABI_VERSION; }",
        "",
    ]
    for r in rows:
        lines.append(f"/* {r['act']} activations, target {r['target']} ({r['cpu']}), in {r['file']} */")
        for fn in r["functions"]:
            lines.append(f"void {fn}({SIGNATURES[fn.split('_')[2]]});")
        lines.append("")
    lines += ["#ifdef __cplusplus", "}", "#endif", "", "#endif /* XBITC_KERNELS_H */", ""]
    return "\n".join(lines)


def emit_kernels(graph: Graph, folder: Path, family: CpuFamily) -> dict[str, Any]:
    """Write kernels/ (the row-lane objects for every level of `family` and activation strategy + the C header)
    when the graph has linears; return the manifest note. What is written does not depend on the quantization plan
    (the row-lane kernels take any depth and group), so the size planners count it exactly before they choose
    depths."""
    if not any(n.op in LINEAR_OPS for n in graph.nodes):
        return {}
    kdir = Path(folder) / "kernels"
    kdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for level in family.levels:
        for act in ACTIVATIONS:
            rendered = LLVMRenderer(family.triple, level.cpu, level.features).render(PackedProduct(act), level.suffix)
            obj = rendered.payload
            base = f"xbitc_rows_{act}_{level.suffix}"
            (kdir / f"{base}.o").write_bytes(obj)
            rows.append({"name": base, "act": act, "target": level.suffix, "cpu": level.cpu,
                         "file": f"kernels/{base}.o", "bytes": len(obj), "functions": list(rendered.functions)})
    header = header_text(rows, family)
    (kdir / HEADER).write_text(header)
    return {
        "kernels": {
            "abi_version": ABI_VERSION,
            "generator": GENERATOR_VERSION,
            "rows_format": ROWS_VERSION,
            "triple": family.triple,
            "header": f"kernels/{HEADER}",
            "bytes": sum(r["bytes"] for r in rows) + len(header.encode()),
            "rows": rows,
        }
    }
