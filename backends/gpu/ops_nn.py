"""The core ops with a contraction, as lang.py kernels: matmul and linear (float weights: a tiled product, or a
per-output reduction for a few rows; packed weights: backends/gpu/packed.py's kernels), attention and conv2d.
Conventions (Call, bindings, read_write declarations) are ops.py's.
"""
from __future__ import annotations

from functools import lru_cache

from .lang import Kernel, const, exp, f32, i32, maximum, minimum, select, u32
from .ops import (MAX_GROUPS, MAX_RANK, ROW_WG, WG, Call, Env, GpuOpError, Packed, Scratch, collapse, contiguous,
                  coords, dot, flat_group, flat_thread, grid, numel, packed_kernels, pad3, tree)

TILE = 16  # the tiled product: TILE x TILE outputs per workgroup, K in steps of TILE
FEW_ROWS = 4  # up to this many rows a product reduces each output with a workgroup instead
AT = 64  # attention: threads per query row, and keys per step
HEAD_MAX = 256  # attention: the largest head dim (the query row is held in shared memory)
NEG = -3.4028234663852886e38


# ------------------------------------------------------------------------------------------------ products


@lru_cache(maxsize=None)
def product_kernel(brank: int, bias: bool, few: bool) -> Kernel:
    """out[z, m, n] = sum_k a[z: m, k] b[z: k, n] (+ bias[n]): a and b read through row / column strides and batch
    strides (numpy's broadcast batch dims: stride 0). `few`: a workgroup per output, threads splitting K (a
    decode step's one row); else TILE x TILE outputs per workgroup through shared-memory tiles."""
    name = f"{'gemv' if few else 'gemm'}_f_b{brank}" + ("_bias" if bias else "")
    k = Kernel(name, (ROW_WG,) if few else (TILE, TILE), doc="batched float matrix product (backends/gpu/ops_nn.py)")
    a, b = k.buffer("a", f32, write=True), k.buffer("b", f32, write=True)
    bb = k.buffer("bias", f32, write=True) if bias else None
    out = k.buffer("out", f32, write=True)
    M, N, K = k.param("M", u32), k.param("N", u32), k.param("K", u32)
    a_rs, a_ks, b_ks, b_ns = (k.param(nm, u32) for nm in ("a_rs", "a_ks", "b_ks", "b_ns"))
    bd = [k.param(f"bd{j}", u32) for j in range(1, brank)]
    a_bs = [k.param(f"a_b{j}", u32) for j in range(brank)]
    b_bs = [k.param(f"b_b{j}", u32) for j in range(brank)]
    if few:
        count = k.param("count", u32)
        g = flat_group(k)
        t = k.local_id(0)
        red = k.shared("red", f32, ROW_WG)
        with k.if_(g < count):  # uniform: one output per workgroup
            n = k.let("n", g % N)
            m = k.let("m", (g / N) % M)
            # the batch index only where there are batch dims (an unused local fails nvcc -Werror)
            cs = coords(k, k.let("z", g / (N * M)), bd, "z") if brank else []
            arow = k.let("arow", dot(cs, a_bs, m * a_rs))
            bcol = k.let("bcol", dot(cs, b_bs, n * b_ns))
            acc = k.var("acc", 0.0)
            with k.loop("kk", t, K, ROW_WG) as kk:
                acc.set(acc + a[arow + kk * a_ks] * b[bcol + kk * b_ks])
            red[t] = acc
            total = tree(k, red, t, ROW_WG, lambda x, y: x + y)
            with k.if_(t.eq(0)):
                out[g] = total + bb[n] if bias else total
        return k
    tx, ty = k.local_id(0), k.local_id(1)
    n = k.let("n", k.group_id(0) * TILE + tx)
    m = k.let("m", k.group_id(1) * TILE + ty)
    z = k.let("z", k.group_id(2))
    cs = coords(k, z, bd, "z") if brank else []
    abase = k.let("abase", dot(cs, a_bs, m * a_rs))
    bbase = k.let("bbase", dot(cs, b_bs, n * b_ns))
    ta, tb = k.shared("ta", f32, TILE * TILE), k.shared("tb", f32, TILE * TILE)
    acc = k.var("acc", 0.0)
    with k.loop("k0", 0, K, TILE) as k0:
        va, vb = k.var("va", 0.0), k.var("vb", 0.0)
        with k.if_((m < M) & (k0 + tx < K)):
            va.set(a[abase + (k0 + tx) * a_ks])
        with k.if_((n < N) & (k0 + ty < K)):
            vb.set(b[bbase + (k0 + ty) * b_ks])
        ta[ty * TILE + tx] = va
        tb[ty * TILE + tx] = vb
        k.barrier()
        for j in range(TILE):
            acc.set(acc + ta[ty * TILE + j] * tb[j * TILE + tx])
        k.barrier()
    with k.if_((m < M) & (n < N)):
        out[(z * M + m) * N + n] = acc + bb[n] if bias else acc
    return k


def _product(node: str, a, b, bias, out, M: int, N: int, K: int, strides: tuple, batch: list[int],
             a_b: list[int], b_b: list[int]) -> list[Call]:
    if numel(out.shape) == 0:
        return []
    if batch:
        batch, (a_b, b_b) = collapse(batch, [a_b, b_b])
    nb = numel(batch)
    if len(batch) > MAX_RANK - 2:
        raise GpuOpError(f"{node}: {len(batch)} batch dims after merging, above {MAX_RANK - 2}")
    few = M <= FEW_ROWS
    brank = len(batch) if nb > 1 else 0
    k = product_kernel(brank, bias is not None, few)
    params = dict(zip(("M", "N", "K", "a_rs", "a_ks", "b_ks", "b_ns"), (M, N, K, *strides)))
    params.update({f"bd{j}": batch[j] for j in range(1, brank)})
    params.update({f"a_b{j}": a_b[j] for j in range(brank)})
    params.update({f"b_b{j}": b_b[j] for j in range(brank)})
    bind = [a, b] + ([bias] if bias is not None else []) + [out]
    if few:
        params["count"] = nb * M * N
        return [Call(k, bind, params, grid(nb * M * N))]
    groups = (-(-N // TILE), -(-M // TILE), nb)
    if max(groups) > MAX_GROUPS:
        raise GpuOpError(f"{node}: grid {groups} exceeds {MAX_GROUPS} workgroups in a dimension")
    return [Call(k, bind, params, groups)]


def matmul(launch, env: Env) -> list[Call]:
    a, b = launch.operands[:2]
    if len(a.shape) < 2:
        raise GpuOpError(f"{launch.node}: matmul of a {len(a.shape)}-D left operand")
    M, K = a.shape[-2], a.shape[-1]
    if len(b.shape) == 1:  # a [..., M, K] @ b [K]: one column
        N, b_strides, b_batch = 1, (1, 0), []
        batch = list(a.shape[:-2])
    else:
        N = b.shape[-1]
        b_strides = (N, 1)
        batch = list(launch.out.shape[:-2])
        b_batch = b.shape[:-2]
    a_st, b_st = contiguous(a.shape), contiguous(b.shape)

    def batch_strides(shape, st) -> list[int]:
        lead = len(batch) - len(shape)
        return [0 if i < lead or shape[i - lead] == 1 else st[i - lead] for i in range(len(batch))]

    return _product(launch.node, a, b, None, launch.out, M, N, K, (K, 1, *b_strides), batch,
                    batch_strides(a.shape[:-2], a_st[:-2]), batch_strides(list(b_batch), b_st[:-2]))


@lru_cache(maxsize=None)
def bias_kernel() -> Kernel:
    k = Kernel("add_bias_f", (WG,), doc="y[i] += bias[i % N], in place")
    y, b = k.buffer("y", f32, write=True), k.buffer("bias", f32, write=True)
    n, N = k.param("n", u32), k.param("N", u32)
    i = flat_thread(k)
    with k.if_(i < n):
        y[i] = y[i] + b[i % N]
    return k


def linear(launch, env: Env) -> list[Call]:
    x, w = launch.operands[:2]
    bias = launch.operands[2] if len(launch.operands) > 2 else None
    out = launch.out
    N, K = w.shape
    rows = numel(x.shape) // K if K else 0
    if numel(out.shape) == 0:
        return []
    packed = env.matrix(w)
    if packed is None:  # b[k, n] = W[n, k]
        return _product(launch.node, x, w, bias, out, rows, N, K, (K, 1, 1, K), [], [], [])
    name, m = packed
    gather_k, gemv_k, gemm_k, _ = packed_kernels()
    from .packed import GEMM_TOKENS

    tile = 1 if rows == 1 else GEMM_TOKENS
    xp = Scratch(0, m.xp_floats(rows, tile) * 4)
    gp, gg = m.gather_args(rows, tile)
    pp, pg = m.product_args(rows, tile)
    words = Packed(name, "words")
    calls = [Call(gather_k, [x, Packed(name, "src"), xp], gp, pad3(gg)),
             Call(gemv_k if tile == 1 else gemm_k, [words, words, Packed(name, "pieces"), xp, out], pp, pad3(pg))]
    if bias is not None:
        calls.append(Call(bias_kernel(), [out, bias], {"n": rows * N, "N": N}, grid(-(-rows * N // WG))))
    return calls


# ------------------------------------------------------------------------------------------------ attention


@lru_cache(maxsize=None)
def attention_kernel(mask: str, per_thread: int) -> Kernel:
    """One query row per workgroup: its keys in steps of AT (one per thread: a dot product over D), an online
    softmax (running max and sum, earlier partial sums rescaled), and the weighted sum of values, each thread
    holding `per_thread` of the Dv outputs. `mask`: "none", "bool" (allowed where nonzero) or "float" (added)."""
    k = Kernel(f"attention_{mask}_{per_thread}", (AT,), doc="scaled dot-product attention, a workgroup per query "
               "row (backends/gpu/ops_nn.py)")
    q, kk, v = (k.buffer(nm, f32, write=True) for nm in ("q", "k", "v"))
    mk = k.buffer("mask", u32 if mask == "bool" else f32, write=True) if mask != "none" else None
    out = k.buffer("out", f32, write=True)
    S, T, D, Dv, Hq, Hk, group = (k.param(nm, u32) for nm in ("S", "T", "D", "Dv", "Hq", "Hk", "grp"))
    scale, causal, window = k.param("scale", f32), k.param("causal", u32), k.param("window", u32)
    ms = [k.param(f"ms{j}", u32) for j in range(4)] if mk is not None else []
    t = k.let("t", k.local_id(0))
    i, h, b = k.let("qi", k.group_id(0)), k.let("h", k.group_id(1)), k.let("b", k.group_id(2))
    qs, sc, pw = k.shared("qs", f32, HEAD_MAX), k.shared("sc", f32, AT), k.shared("pw", f32, AT)
    qbase = k.let("qbase", ((b * Hq + h) * S + i) * D)
    with k.loop("d", t, D, AT) as d:
        qs[d] = q[qbase + d]
    k.barrier()
    kh = k.let("kh", h / group)
    kbase, vbase = k.let("kbase", (b * Hk + kh) * T * D), k.let("vbase", (b * Hk + kh) * T * Dv)
    qpos = k.let("qpos", T - S + i)  # keys before the S queries come from a cache
    hi = k.let("hi", select(causal.ne(0), minimum(T, qpos + 1), T))
    lo = k.let("lo", select(window.ne(0) & (qpos + 1 > window), qpos + 1 - window, const(0, u32)))
    mbase = k.let("mbase", b * ms[0] + h * ms[1] + i * ms[2]) if mk is not None else None
    m, total = k.var("m", NEG), k.var("l", 0.0)
    acc = k.array("acc", f32, per_thread)
    with k.loop("c0", lo, hi, AT) as c0:
        key = k.let("key", c0 + t)
        s = k.var("s", NEG)
        with k.if_(key < hi):
            dp = k.var("dp", 0.0)
            with k.loop("d", 0, D) as d:
                dp.set(dp + qs[d] * kk[kbase + key * D + d])
            s.set(dp * scale)
            if mask == "bool":
                with k.if_(mk[mbase + key * ms[3]].eq(0)):
                    s.set(NEG)
            elif mask == "float":
                s.set(s + mk[mbase + key * ms[3]])
        sc[t] = s
        k.barrier()
        n = k.let("n", minimum(hi - c0, AT))
        cm = k.var("cm", m)
        with k.loop("j", 0, n) as j:
            cm.set(maximum(cm, sc[j]))
        corr = k.let("corr", exp(m - cm))
        pw[t] = select((t < n) & (s > NEG), exp(s - cm), 0.0)  # masked keys weigh nothing, even with cm = NEG
        k.barrier()
        psum = k.var("psum", 0.0)
        with k.loop("j", 0, n) as j:
            psum.set(psum + pw[j])
        total.set(total * corr + psum)
        for u in range(per_thread):
            col = k.let(f"col{u}", t + u * AT)
            with k.if_(col < Dv):
                a = k.var("a", acc[u] * corr)
                with k.loop("j", 0, n) as j:
                    a.set(a + pw[j] * v[vbase + (c0 + j) * Dv + col])
                acc[u] = a
        m.set(cm)
        k.barrier()
    obase = k.let("obase", ((b * Hq + h) * S + i) * Dv)
    for u in range(per_thread):
        col = k.let(f"ocol{u}", t + u * AT)
        with k.if_(col < Dv):
            out[obase + col] = select(total > 0.0, acc[u] / total, 0.0)  # nothing allowed: zeros, as torch's sdpa
    return k


def attention(launch, env: Env) -> list[Call]:
    q, kv, v = launch.operands[:3]
    mask = launch.operands[3] if len(launch.operands) > 3 else None
    B, Hq, S, D = q.shape
    Hk, T, Dv = kv.shape[1], kv.shape[2], v.shape[3]
    if numel(launch.out.shape) == 0:
        return []
    if D > HEAD_MAX or Hq % Hk:
        raise GpuOpError(f"{launch.node}: head dim {D} (at most {HEAD_MAX}) or {Hq} query heads over {Hk} key heads")
    if max(S, Hq, B) > MAX_GROUPS:
        raise GpuOpError(f"{launch.node}: {B} x {Hq} x {S} query rows exceed the grid")
    scale = launch.attrs.get("scale")
    params = {"S": S, "T": T, "D": D, "Dv": Dv, "Hq": Hq, "Hk": Hk, "grp": Hq // Hk,
              "scale": float(scale) if scale is not None else D ** -0.5,
              "causal": int(bool(launch.attrs.get("causal"))), "window": int(launch.attrs.get("window") or 0)}
    kind = "none"
    bind = [q, kv, v]
    if mask is not None:
        kind = "bool" if mask.dtype == "bool" else "float"
        lead = 4 - len(mask.shape)
        st = contiguous(mask.shape)
        full = (B, Hq, S, T)
        params.update({f"ms{j}": 0 if j < lead or mask.shape[j - lead] == 1 and full[j] != 1 else st[j - lead]
                       for j in range(4)})
        bind.append(mask)
    return [Call(attention_kernel(kind, -(-Dv // AT)), bind + [launch.out], params, (S, Hq, B))]


# ------------------------------------------------------------------------------------------------ conv2d


@lru_cache(maxsize=None)
def conv2d_kernel(bias: bool) -> Kernel:
    k = Kernel("conv2d_f" + ("_bias" if bias else ""), (WG,), doc="direct 2-D convolution, NCHW, a thread per output")
    x, w = k.buffer("x", f32, write=True), k.buffer("w", f32, write=True)
    bb = k.buffer("bias", f32, write=True) if bias else None
    out = k.buffer("out", f32, write=True)
    n, C, H, W, O, KH, KW, OH, OW, sh, sw = (k.param(nm, u32) for nm in
                                             ("n", "C", "H", "W", "O", "KH", "KW", "OH", "OW", "sh", "sw"))
    ph, pw = k.param("ph", i32), k.param("pw", i32)
    i = flat_thread(k)
    with k.if_(i < n):
        ow, oh = k.let("ow", i % OW), k.let("oh", (i / OW) % OH)
        o, nb = k.let("o", (i / (OW * OH)) % O), k.let("nb", i / (OW * OH * O))
        acc = k.var("acc", bb[o] if bias else 0.0)
        with k.loop("c", 0, C) as c:
            with k.loop("ky", 0, KH) as ky:
                ih = k.let("ih", (oh * sh + ky).cast(i32) - ph)
                with k.if_((ih >= 0) & (ih < H.cast(i32))):
                    with k.loop("kx", 0, KW) as kx:
                        iw = k.let("iw", (ow * sw + kx).cast(i32) - pw)
                        with k.if_((iw >= 0) & (iw < W.cast(i32))):
                            xv = x[((nb * C + c) * H + ih.cast(u32)) * W + iw.cast(u32)]
                            acc.set(acc + w[((o * C + c) * KH + ky) * KW + kx] * xv)
        out[i] = acc
    return k


def conv2d(launch, env: Env) -> list[Call]:
    x, w = launch.operands[:2]
    bias = launch.operands[2] if len(launch.operands) > 2 else None
    out = launch.out
    total = numel(out.shape)
    if total == 0:
        return []
    sh, sw = launch.attrs.get("stride", (1, 1))
    ph, pw = launch.attrs.get("padding", (0, 0))
    N, C, H, W = x.shape
    O, _, KH, KW = w.shape
    params = {"n": total, "C": C, "H": H, "W": W, "O": O, "KH": KH, "KW": KW, "OH": out.shape[2],
              "OW": out.shape[3], "sh": sh, "sw": sw, "ph": ph, "pw": pw}
    bind = [x, w] + ([bias] if bias is not None else []) + [out]
    return [Call(conv2d_kernel(bias is not None), bind, params, grid(-(-total // WG)))]
