"""`xbitc inspect --plot`: where the bits went, per component type and layer, and the depths inside weights."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from xbitc.artifact import read_manifest

_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|layer)\.(\d+)\.")


def component(name: str, role: str) -> tuple[str, int | None]:
    """('q', 3) for model.layers.3.self_attn.q_proj.weight; ('embedding', None) for tables."""
    if role in ("embedding", "output"):
        return role, None
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    parts = name.removesuffix(".weight").split(".")
    if parts[-1].isdigit() and len(parts) > 1:  # ModuleList members: up.0.weight -> ('up', 0)
        return parts[-2], int(parts[-1]) if layer is None else layer
    return parts[-1].removesuffix("_proj"), layer


def allocation_table(path: Path) -> tuple[dict, np.ndarray, float]:
    """{component: {layer: bits per weight}}, the weight-count histogram of column depths 0..8, whole-model bpw."""
    m = read_manifest(path)
    table: dict[str, dict] = {}
    hist = np.zeros(9)
    for name, e in m.tensors.items():
        if e.storage != "packed":
            continue
        comp, layer = component(name, e.role)
        n = int(np.prod(e.shape))
        table.setdefault(comp, {})[layer if layer is not None else -1] = 8 * e.bytes / n
        for bits, _group, start, stop in e.segments or []:
            hist[bits] += e.shape[0] * (stop - start)
    return table, hist, m.size.bits_per_weight


def plot(paths: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(paths), 2, figsize=(13, 3.6 * len(paths)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]})
    for row, path in enumerate(paths):
        table, hist, bpw = allocation_table(path)
        ax = axes[row][0]
        for comp in sorted(table):
            layers = table[comp]
            if set(layers) == {-1}:
                ax.axhline(layers[-1], linestyle="--", linewidth=1.2, label=f"{comp} ({layers[-1]:.2f})",
                           color="black" if comp == "embedding" else "gray")
            else:
                xs = sorted(k for k in layers if k >= 0)
                ax.plot(xs, [layers[k] for k in xs], marker="o", markersize=3, linewidth=1, label=comp)
        ax.set_title(f"{path.name}: {bpw:.3f} bits per weight (whole model)", fontsize=10)
        top = max(v for layers in table.values() for v in layers.values()) if table else 8
        ax.set_ylim(0, max(4.0, top + 0.5))  # from zero, so rows at different budgets compare by eye
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("layer")
        ax.set_ylabel("bits per weight (codes+scales+zeros)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="upper right")
        hx = axes[row][1]
        total = hist.sum() or 1
        hx.bar(range(9), 100 * hist / total, color="tab:blue")
        hx.set_xticks(range(9))
        hx.set_xlabel("column depth (bits; 0 = dropped)")
        hx.set_ylabel("% of quantized weights")
        hx.set_title("depths inside weights", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
