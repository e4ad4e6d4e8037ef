"""The LLVM renderer of the packed product (backends/product.py): the row-lane generator (rowlane.py) emitting a
relocatable object for one target triple, CPU and feature set, through the verified kernel disk cache."""
from __future__ import annotations

from dataclasses import dataclass

from ..product import PackedProduct, Rendered
from .jit import emit_object
from .rowlane import BLOCK_COLS, BYTES_KIND, LANES, RowLaneSpec


@dataclass(frozen=True)
class LLVMRenderer:
    triple: str
    cpu: str = ""
    features: str = ""
    name: str = "llvm"

    def render(self, product: PackedProduct, suffix: str = "") -> Rendered:
        fixed = (product.lanes, product.block_cols, product.word_bits, product.bytes_kind)
        if fixed != (LANES, BLOCK_COLS, 32, BYTES_KIND) or product.extra_roles:
            raise ValueError(f"the LLVM row-lane generator implements lanes={LANES}, block_cols={BLOCK_COLS}, 32-bit "
                             f"words and kinds 1..8 + {BYTES_KIND}, entry points {product.roles()[:2]}; asked for "
                             f"{fixed}, {product.roles()}")
        spec = RowLaneSpec(act=product.act, symbol_suffix=suffix)
        obj = emit_object(self.triple, self.cpu, self.features, spec=spec, use_disk_cache=True)
        assert spec.names() == product.functions(suffix)
        return Rendered("object", obj, spec.names())
