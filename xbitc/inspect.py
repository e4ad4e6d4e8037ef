"""`xbitc inspect`: size, bit allocation and provenance of an artifact, from its manifest, after checking that the
files are what the manifest says (as loading does), unless the user asks for the manifest's claims alone."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from xbitc.artifact import load_graph, read_manifest


def _printable(text: str) -> str:
    """A manifest string as data: control characters (terminal escapes that could redraw the lines above) shown
    escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def report(path: Path, verify: bool = True) -> str:
    if verify:  # everything loading checks: files, sizes, hashes, operators, that both graphs can run
        _, m = load_graph(path)
    else:
        m = read_manifest(path)
    s = m.size
    lines = [
        f"{path}: {_printable(m.kind)} model from {_printable(m.source.path)}",
        "  verified: files, sizes and sha256 match the manifest, and the graphs load" if verify else
        "  NOT VERIFIED (--no-verify): what follows is what the manifest claims; the files were not checked",
        f"  backend {_printable(m.backend)}; pipeline {_printable(m.pipeline)}",
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
    groups: Counter = Counter()
    for e in m.tensors.values():
        if e.storage == "packed":
            segs = e.segments or []
            for bits, _group, start, stop in segs:
                depth[bits] += e.shape[0] * (stop - start)
            # a segment narrower than the tensor's group size stores min(group, width)
            live = [(grp, stop - start) for bits, grp, start, stop in segs if bits]
            per_channel = all(grp >= width for grp, width in live)
            g = max((grp for grp, _ in live), default=0)
            groups["per-channel" if per_channel else f"group {g}"] += int(np.prod(e.shape))
        else:
            depth[f"float ({e.dtype})"] += int(np.prod(e.shape))
    lines.append("  weights by storage:")
    total = sum(depth.values()) or 1  # a model of zero-element tensors still prints
    for key, n in sorted(depth.items(), key=lambda kv: -kv[1]):
        label = key if isinstance(key, str) else ("dropped (0-bit)" if key == 0 else f"{key}-bit")
        lines.append(f"    {label:24s} {n:>14,} weights ({100 * n / total:.1f}%)")
    if groups:
        lines.append("  quantized tensors by group size: " + ", ".join(f"{k}: {v:,} weights" for k, v in groups.most_common()))
    for p in m.passes:
        lines.append(f"  pass {_printable(p['pass']):40s} {p['seconds']:8.2f} s")
    return "\n".join(lines)
