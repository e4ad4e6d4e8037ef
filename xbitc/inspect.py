"""`xbitc inspect`: size, bit allocation and provenance of an artifact, from its manifest."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from xbitc.artifact import read_manifest


def report(path: Path) -> str:
    m = read_manifest(path)
    s = m.size
    lines = [
        f"{path}: {m.kind} model from {m.source.path}",
        f"  backend {m.backend}; pipeline {m.pipeline}",
        f"  size {s.counted_bytes:,} bytes = {s.bits_per_weight:.4f} bits per weight over {m.source.param_count:,} "
        f"source parameters (target {s.target_bpw})",
    ]
    if s.linear_bits_per_weight is not None:
        lines.append(f"  quantized linears alone: {s.linear_bits_per_weight:.4f} bits per weight")
    for f, b in sorted(s.files.items()):
        lines.append(f"    {f:24s} {b:>14,} bytes")
    if s.uncounted:
        lines.append(f"  not counted (tokenizer, not needed to compute outputs): {sum(s.uncounted.values()):,} bytes")
    depth: Counter = Counter()
    for e in m.tensors.values():
        if e.storage == "packed":
            for bits, group, start, stop in e.segments or []:
                depth[(bits, group if group < e.shape[1] else 0)] += e.shape[0] * (stop - start)
        else:
            depth[("float", e.dtype)] += int(np.prod(e.shape))
    lines.append("  weights by storage:")
    total = sum(depth.values())
    for key, n in sorted(depth.items(), key=lambda kv: -kv[1]):
        label = f"{key[0]}-bit, {'per-channel' if key[1] == 0 else f'group {key[1]}'}" if key[0] != "float" else f"float ({key[1]})"
        lines.append(f"    {label:24s} {n:>14,} weights ({100 * n / total:.1f}%)")
    for p in m.passes:
        lines.append(f"  pass {p['pass']:40s} {p['seconds']:8.2f} s")
    return "\n".join(lines)
