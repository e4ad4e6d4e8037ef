"""model.bin: a compiled artifact as the C runtime reads it (xbitc/native/include/xbitc.h).

One file, read in place (mmap-able), little-endian:

    header (64 bytes)  "XBITCBIN", u32 version, u32 header bytes, u64 file bytes, u64 words offset, u64 word
                       count, u64 data offset, u64 data bytes, u32 CRC-32 (zlib's) of every byte after the header,
                       u32 zero
    words (int64)      model: kind, vocab, layers, kv heads, head dim, tensor count, program count
                       tensors: dense [0, dtype, rank, *shape, data offset, bytes] or packed [1, out, in, record
                       count, activations (0 f32, 1 q8), records offset, buffer offset, buffer bytes,
                       permutation offset or -1]
                       programs: [node count] then nodes [op, operand count, attr count, *operands, *attrs]
    data               64-byte aligned blocks at the offsets the words give (from the file start)

Programs are the legalized core graphs (passes/legalize.py): 0 the main graph, and for causal LMs with a decode
step 1 the step and 2 the step giving only the last token's logits (what a generating session needs: the output
layer runs on one row instead of every prompt token). A node's value is its index; operands are tagged: 0 absent,
1 a node, 2 an int, 3 a float (its bits), 4 a bool, 5 a list (count, then tagged items). Attributes follow the
op's attrs in ir/core.py with defaults filled: 0 absent, 2 int, 3 float, 5 int list (count, then raw ints).
Nodes 1000 (input: dtype, rank, sizes with -1 for a dynamic one), 1001 (param: tensor index), 1002 (output).

Float parameters are stored as float32 and packed matrices in the row-lane layout of the activation strategy the
export chose (backends/product.py: "f32" exact, or "q8", int8 activations per record, what the x86 kernels run
fastest), record addresses as offsets into their buffer: the runtime adds the mapped address.
"""
from __future__ import annotations

import inspect
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xbitc.ir.core import CORE_OPS
from xbitc.ir.coregraph import CoreGraph, CoreNode
from xbitc.ir.graph import Ref
from xbitc.quant.packed import PackedMatrix

VERSION = 1
MAGIC = b"XBITCBIN"
HEADER = struct.Struct("<8sIIQQQQQII")
ALIGN = 64
# numbered as XB_OP_LIST in xbitc/native/src/internal.h (tests/test_native.py keeps the two equal)
OPS = ("embed linear matmul conv2d rmsnorm layernorm rope attention softmax gelu pow where mean sum reshape expand "
       "transpose permute unsqueeze squeeze slice select concat cast arange full gather dim neg abs exp log sqrt "
       "rsqrt sin cos tanh sigmoid erf relu silu logical_not add sub mul div maximum minimum eq ne lt le gt ge "
       "logical_and logical_or scalar_add scalar_sub scalar_mul scalar_floordiv").split()
OP_INPUT, OP_PARAM, OP_OUTPUT = 1000, 1001, 1002
DTYPES = {"float32": 1, "int64": 2, "bool": 3}
KINDS = {"causal-lm": 1, "encoder": 2}
T_NONE, T_REF, T_INT, T_FLOAT, T_BOOL, T_LIST = 0, 1, 2, 3, 4, 5
GELU = {"none": 0, "tanh": 1}
ACTS = {"f32": 0, "q8": 1}
# what the runtime accepts per packed matrix (xbitc/native/src/model.c): the generated kernels keep per-column and
# per-record state on the stack
KERNEL_STACK_COLUMNS = 1 << 17
MAX_RECORDS = 1 << 16


class ExportError(ValueError):
    """The artifact holds something the C runtime cannot run; the message says what and where."""


def _float_bits(v: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def _attr_defaults(op: str) -> dict[str, Any]:
    """The defaults an op's reference implementation declares (what a node that omits an attribute means)."""
    if not CORE_OPS[op].attrs:
        return {}
    params = inspect.signature(CORE_OPS[op].reference).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


class _Writer:
    def __init__(self, act: str = "f32", rows_read: frozenset = frozenset()):
        self.act = act
        self.rows_read = rows_read  # packed tables an embed reads rows of: the f32 layout (rows decode from it)
        self.words: list[int] = []
        self.blocks: list[bytes] = []
        self.data_size = 0
        self.tensors: dict[str, int] = {}
        self.tensor_words: list[list[int]] = []

    def block(self, data: bytes) -> int:
        """Place data at the next aligned offset of the data section; its offset there."""
        off = self.data_size
        self.blocks.append(data + b"\0" * (-len(data) % ALIGN))
        self.data_size += len(self.blocks[-1])
        return off

    def tensor(self, name: str, value: Any) -> int:
        if name in self.tensors:
            return self.tensors[name]
        if isinstance(value, PackedMatrix):
            words = _packed_words(self, name, value)
        else:
            t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
            if t.is_floating_point():
                t = t.to(torch.float32)
            elif t.dtype is not torch.bool:
                t = t.to(torch.int64)
            dtype = {torch.float32: 1, torch.int64: 2, torch.bool: 3}[t.dtype]
            raw = t.contiguous().numpy().tobytes()
            words = [0, dtype, t.dim(), *t.shape, self.block(raw), len(raw)]
        self.tensors[name] = len(self.tensor_words)
        self.tensor_words.append(words)
        return self.tensors[name]


def _packed_words(w: _Writer, name: str, pm: PackedMatrix) -> list[int]:
    from xbitc.backends.cpu.rows import rowlane_records
    from xbitc.backends.llvm.rowlane import pack

    out, inp = pm.shape
    records = rowlane_records([ps for ps in pm.segments if ps.seg.bits and ps.seg.ncols], out)
    act = "f32" if name in w.rows_read else w.act
    stack = sum(-(-r[0].shape[1] // 32) * 32 * (9 if act == "q8" and r[4] == 1 else 1) for r in records)
    if stack > KERNEL_STACK_COLUMNS or len(records) > MAX_RECORDS:
        raise ExportError(f"{name}: {len(records)} records over {stack} padded columns is more than the kernels keep on "
                          f"the stack ({MAX_RECORDS} records, {KERNEL_STACK_COLUMNS} columns, 1-bit q8 columns x9)"
                          + ("; export with --act f32" if act == "q8" else ""))
    buf, table = pack(records, out, act)
    table = table.copy()
    table[:, 2:5] -= buf.ctypes.data  # addresses -> offsets into the buffer
    rec_off = w.block(table.astype("<i8").tobytes())
    buf_off = w.block(buf.tobytes())
    perm_off = -1 if pm.perm is None else w.block(np.asarray(pm.perm, dtype="<i4").tobytes())
    return [1, out, inp, len(records), ACTS[act], rec_off, buf_off, int(buf.nbytes), perm_off]


def _operand(v: Any, slot: dict[str, int], where: str) -> list[int]:
    if v is None:
        return [T_NONE]
    if isinstance(v, Ref):
        return [T_REF, slot[v.name]]
    if isinstance(v, bool):
        return [T_BOOL, int(v)]
    if isinstance(v, int):
        return [T_INT, v]
    if isinstance(v, float):
        return [T_FLOAT, _float_bits(v)]
    if isinstance(v, (list, tuple)):
        out = [T_LIST, len(v)]
        for x in v:
            if isinstance(x, (list, tuple)):
                raise ExportError(f"{where}: nested list operands are not part of the format")
            out += _operand(x, slot, where)
        return out
    raise ExportError(f"{where}: operand {v!r} ({type(v).__name__}) has no encoding")


def _attr(name: str, v: Any, where: str) -> list[int]:
    if v is None:
        return [T_NONE]
    if name == "dtype":
        if v not in DTYPES:
            raise ExportError(f"{where}: dtype {v} is not one the C runtime computes in ({', '.join(DTYPES)})")
        return [T_INT, DTYPES[v]]
    if name == "approximate":
        return [T_INT, GELU[v]]
    if isinstance(v, (bool, int)):
        return [T_INT, int(v)]
    if isinstance(v, float):
        return [T_FLOAT, _float_bits(v)]
    if isinstance(v, (list, tuple)):
        return [T_LIST, len(v), *(int(x) for x in v)]
    raise ExportError(f"{where}: attribute {name}={v!r} has no encoding")


def _program(w: _Writer, g: CoreGraph) -> list[int]:
    slot: dict[str, int] = {}
    words = [len(g.nodes)]
    for i, n in enumerate(g.nodes):
        where = f"node {n.name} ({n.op})"
        if n.op == "input":
            t = n.attrs["type"]
            if t.dtype not in DTYPES:
                raise ExportError(f"{where}: input dtype {t.dtype} is not one the C runtime takes")
            dims = [d if isinstance(d, int) else -1 for d in t.shape]
            words += [OP_INPUT, 0, 3, T_INT, DTYPES[t.dtype], T_INT, len(dims), T_LIST, len(dims), *dims]
        elif n.op == "param":
            words += [OP_PARAM, 0, 1, T_INT, w.tensor(n.attrs["name"], g.params[n.attrs["name"]])]
        elif n.op == "output":
            words += [OP_OUTPUT, len(n.args), 0]
            for a in n.args:
                words += _operand(a, slot, where)
        else:
            op = CORE_OPS[n.op]
            attrs = {**_attr_defaults(n.op), **n.attrs}
            args = list(n.args)
            words += [OPS.index(n.op), len(args), len(op.attrs)]
            for a in args:
                words += _operand(a, slot, where)
            for name in op.attrs:
                words += _attr(name, attrs.get(name), where)
        slot[n.name] = i
    return words


def last_token_step(step: CoreGraph) -> CoreGraph:
    """The decode step with logits for the last token only: the output layer (a row-wise linear) reads the last
    row of its input. The caches it returns are the step's."""
    out = step.nodes[-1]
    producer = next(n for n in step.nodes if isinstance(out.args[0], Ref) and n.name == out.args[0].name)
    if producer.op != "linear":
        raise ExportError(f"the decode step's logits come from {producer.op}, not a linear layer")
    last = CoreNode(producer.name + "_last_row", "slice", (producer.args[0], -1, 1 << 62), {"dim": -2, "step": 1})
    nodes = []
    for n in step.nodes:
        if n is producer:
            nodes += [last, CoreNode(n.name, n.op, (Ref(last.name), *n.args[1:]), dict(n.attrs))]
        else:
            nodes.append(n)
    return CoreGraph(nodes, step.params)


def write(path: Path, programs: list[CoreGraph], *, kind: str, vocab: int = 0,
          cache: dict | None = None, act: str = "f32") -> int:
    """Write model.bin for `programs` (main first, then the decode step and its last-token form); its size."""
    if act not in ACTS:
        raise ExportError(f"activations {act!r}: one of {', '.join(ACTS)}")
    tables = set()
    for g in programs:
        by_name = {n.name: n for n in g.nodes}
        tables |= {by_name[n.args[1].name].attrs["name"] for n in g.nodes if n.op == "embed"
                   and isinstance(n.args[1], Ref) and by_name[n.args[1].name].op == "param"}
    w = _Writer(act, frozenset(tables))
    bodies = [_program(w, g) for g in programs]
    cache = cache or {}
    words = [KINDS.get(kind, 3), vocab, cache.get("layers", 0), cache.get("kv_heads", 0), cache.get("head_dim", 0),
             len(w.tensor_words), len(bodies)]
    for t in w.tensor_words:
        words += t
    for b in bodies:
        words += b
    word_bytes = np.asarray(words, dtype="<i8").tobytes()
    words_off = HEADER.size
    data_off = -(-(words_off + len(word_bytes)) // ALIGN) * ALIGN
    body = word_bytes + b"\0" * (data_off - words_off - len(word_bytes)) + b"".join(w.blocks)
    total = HEADER.size + len(body)
    header = HEADER.pack(MAGIC, VERSION, HEADER.size, total, words_off, len(words), data_off, w.data_size,
                         zlib.crc32(body), 0)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_bytes(header + body)
    tmp.replace(path)
    return total
