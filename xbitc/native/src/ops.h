/* What ops.c (the op table, elementwise and shape ops) and ops_nn.c (the network ops) share: operand and attribute
 * access, output shapes, broadcasting strides and a strided iterator. Not part of the runtime's contract. */
#ifndef XBITC_OPS_H
#define XBITC_OPS_H

#include <math.h>
#include <string.h>

#include "internal.h"

#define XO_MAXR XBITC_MAX_RANK
#define XO_NOPS 4 /* operands one iterator walks at most (output included) */

/* Operand i as one value (a tensor or a scalar), or NULL when it is absent. */
const xb_value *xo_in(const xb_call *c, int i);
/* Operand i as one tensor (rank >= 0), or NULL. */
const xb_value *xo_tensor(const xb_call *c, int i);
/* Attribute i as an integer / a number (an INT attribute reads as a number too); a status. */
int32_t xo_attr_int(const xb_call *c, int i, int64_t *v);
int32_t xo_attr_num(const xb_call *c, int i, double *v);
/* An axis d of a tensor of rank `rank` as ir/core.py's _axis: -rank <= d < max(rank, 1); a status. */
int32_t xo_axis(int64_t d, int32_t rank, int32_t *axis);
/* Set the output's dtype, rank and shape (refusing negative or overflowing sizes). */
int32_t xo_set_out(xb_value *out, int32_t dtype, int32_t rank, const int64_t *shape);
int64_t xo_prod(const int64_t *shape, int32_t n);
/* Row-major strides of a shape, in elements. */
void xo_strides(int32_t rank, const int64_t *shape, int64_t *st);
/* Strides that read a contiguous tensor v broadcast to [rank] oshape (right-aligned, 0 on broadcast axes). */
void xo_bstrides(const xb_value *v, int32_t rank, const int64_t *oshape, int64_t *st);
/* The numpy broadcast of n shapes (NULL or scalar entries count as 0-d); a status. */
int32_t xo_broadcast(int n, const xb_value *const *v, int32_t *rank, int64_t *shape);

/* Walks a shape for up to XO_NOPS operands with their own strides, row by row: a row is `inner` elements with
 * per-operand step istride[k], starting at element offsets off[k]. Axes are coalesced where every operand allows
 * it, so equal shapes become one long row. */
typedef struct xo_iter {
    int32_t nop, rank;
    int64_t rows, inner;
    int64_t istride[XO_NOPS], off[XO_NOPS];
    int64_t shape[XO_MAXR], idx[XO_MAXR], st[XO_NOPS][XO_MAXR];
} xo_iter;
void xo_iter_init(xo_iter *it, int32_t rank, const int64_t *shape, int32_t nop, int64_t st[][XO_MAXR],
                  const int64_t *base);
void xo_iter_next(xo_iter *it);

/* for (i = 0; i < n; i++) { body } as blocks of 8 and a tail: GCC's -O2 cost model leaves a plain loop of unknown
 * count scalar but vectorises a fixed block of 8. The body must not depend on earlier iterations (pointers it
 * writes are restrict). */
#define XO_FOR8(i, n, ...)                                                                                         \
    do {                                                                                                           \
        int64_t i##_b = 0;                                                                                         \
        for (; i##_b + 8 <= (n); i##_b += 8)                                                                       \
            for (int i##_l = 0; i##_l < 8; i##_l++) {                                                              \
                int64_t i = i##_b + i##_l;                                                                         \
                __VA_ARGS__                                                                                        \
            }                                                                                                      \
        for (int64_t i = i##_b; i < (n); i++) {                                                                    \
            __VA_ARGS__                                                                                            \
        }                                                                                                          \
    } while (0)

/* GCC and clang: 4-float vectors (their generic vector extension, compiled to SSE, NEON, wasm SIMD or scalar code)
 * for the kernels that keep several sums at once (dot4, the attention value product). Written as plain loops,
 * GCC -O2 vectorises those well but -O3 interleaves their reductions into shuffles, 4 to 6 times slower. Other
 * compilers take the plain loops. */
#if defined(__GNUC__)
#define XO_V4 1
typedef float xo_v4 __attribute__((vector_size(16)));
static inline xo_v4 xo_load4(const float *p) {
    xo_v4 v;
    memcpy(&v, p, sizeof v);
    return v;
}
#endif

static inline float xo_bits_f(int32_t i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}

/* a where m is all ones, b where it is zero: a select without a branch, so loops around it vectorise */
static inline float xo_sel(int32_t m, float a, float b) {
    int32_t ia, ib;
    memcpy(&ia, &a, 4);
    memcpy(&ib, &b, 4);
    return xo_bits_f((ia & m) | (ib & ~m));
}

/* expf as torch's vectorised CPU kernels compute it (SLEEF's expf_u10: within 1 ulp), in branch-free arithmetic
 * that vectorises (a libm call does not). NaN and +-inf behave as expf; subnormal results round once. */
static inline float xo_expf(float x) {
    int32_t lo = -(int32_t)(x < -104.0f), hi = -(int32_t)(x > 104.0f), nan = -(int32_t)(x != x);
    float d = xo_sel(lo | nan, -104.0f, xo_sel(hi, 104.0f, x));
    float q = (d * 1.442695040888963407f + 12582912.0f) - 12582912.0f; /* rint(d / ln 2) */
    int32_t e = (int32_t)q;
    float s = d - q * 0.693145751953125f;
    s = s - q * 1.428606765330187045e-06f;
    float u = 0.000198527617612853646278381f;
    u = u * s + 0.00139304355252534151077271f;
    u = u * s + 0.00833336077630519866943359f;
    u = u * s + 0.0416664853692054748535156f;
    u = u * s + 0.166666671633720397949219f;
    u = u * s + 0.5f;
    u = s * s * u + (s + 1.0f);
    u = u * xo_bits_f((e / 2 + 127) << 23) * xo_bits_f((e - e / 2 + 127) << 23); /* 2^e in two steps */
    return xo_sel(nan, x, xo_sel(hi, INFINITY, xo_sel(lo, 0.0f, u)));
}

/* The network ops (ops_nn.c). */
#define XO_NN_OPS(X) X(embed) X(linear) X(matmul) X(conv2d) X(rmsnorm) X(layernorm) X(rope) X(attention) X(softmax)
#define XO_DECLARE(name) int32_t xo_shape_##name(xb_call *c); int32_t xo_run_##name(xb_call *c);
XO_NN_OPS(XO_DECLARE)
#undef XO_DECLARE

#endif
