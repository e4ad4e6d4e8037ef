/* The core ops (ir/core.py, docs/core-ops.md) for the C runtime: the op table XB_OPS, the helpers ops_nn.c shares
 * (ops.h), the elementwise ops and the shape ops. Every op follows its torch reference: dtypes promote as torch
 * does for tensors and Python scalars, broadcasting follows numpy, and what the shape rule refuses is XBITC_E_SHAPE.
 * Sums accumulate in double. */
#include <math.h>
#include <string.h>

#include "ops.h"

/* ------------------------------------------------------------------------------------ operands and shapes */

const xb_value *xo_in(const xb_call *c, int i) {
    if (i >= c->nin || c->in[i].kind != XB_ONE || c->in[i].n < 1 || !c->in[i].v)
        return NULL;
    const xb_value *v = c->in[i].v;
    return v->dtype == XBITC_F32 || v->dtype == XBITC_I64 || v->dtype == XBITC_BOOL || v->dtype == XB_PACKED ? v
                                                                                                            : NULL;
}

const xb_value *xo_tensor(const xb_call *c, int i) {
    const xb_value *v = xo_in(c, i);
    return v && v->dtype != XB_PACKED && v->rank >= 0 && v->rank <= XO_MAXR ? v : NULL;
}

int32_t xo_attr_int(const xb_call *c, int i, int64_t *v) {
    if (i >= c->nattr || c->attr[i].kind != XB_A_INT)
        return XBITC_E_ARGUMENT;
    *v = c->attr[i].i;
    return XBITC_OK;
}

int32_t xo_attr_num(const xb_call *c, int i, double *v) {
    if (i >= c->nattr || (c->attr[i].kind != XB_A_INT && c->attr[i].kind != XB_A_FLOAT))
        return XBITC_E_ARGUMENT;
    *v = c->attr[i].kind == XB_A_INT ? (double)c->attr[i].i : c->attr[i].f;
    return XBITC_OK;
}

int32_t xo_axis(int64_t d, int32_t rank, int32_t *axis) {
    int32_t r = rank > 1 ? rank : 1;
    if (d < -(int64_t)rank || d >= r)
        return XBITC_E_SHAPE;
    *axis = (int32_t)(d < 0 ? d + r : d);
    return XBITC_OK;
}

int64_t xo_prod(const int64_t *shape, int32_t n) {
    int64_t p = 1;
    for (int32_t i = 0; i < n; i++)
        p *= shape[i];
    return p;
}

void xo_strides(int32_t rank, const int64_t *shape, int64_t *st) {
    int64_t s = 1;
    for (int32_t d = rank - 1; d >= 0; d--) {
        st[d] = s;
        s *= shape[d];
    }
}

int32_t xo_set_out(xb_value *out, int32_t dtype, int32_t rank, const int64_t *shape) {
    if (rank < 0 || rank > XO_MAXR)
        return XBITC_E_SHAPE;
    /* sizes come from the model file and inputs: every size <= 2^40 and the product of the nonzero ones <= 2^58, so
     * no product of sizes an op forms (strides, M*K, scratch) overflows, even next to a zero size */
    if (!xb_sizes_ok(rank, shape))
        return XBITC_E_SHAPE;
    out->dtype = dtype;
    out->rank = rank;
    for (int32_t d = 0; d < rank; d++)
        out->shape[d] = shape[d];
    xo_strides(rank, out->shape, out->stride);
    return XBITC_OK;
}

void xo_bstrides(const xb_value *v, int32_t rank, const int64_t *oshape, int64_t *st) {
    int32_t vr = v->rank < 0 ? 0 : v->rank;
    int64_t vs[XO_MAXR];
    xo_strides(vr, v->shape, vs);
    for (int32_t d = 0; d < rank; d++) {
        int32_t j = d - (rank - vr);
        st[d] = j < 0 || v->shape[j] != oshape[d] ? 0 : vs[j];
    }
}

int32_t xo_broadcast(int n, const xb_value *const *v, int32_t *rank, int64_t *shape) {
    int32_t r = 0;
    for (int i = 0; i < n; i++)
        if (v[i] && v[i]->rank > r)
            r = v[i]->rank;
    if (r > XO_MAXR)
        return XBITC_E_SHAPE;
    for (int32_t d = 0; d < r; d++) {
        int64_t size = 1;
        for (int i = 0; i < n; i++) {
            int32_t vr = v[i] && v[i]->rank > 0 ? v[i]->rank : 0, j = d - (r - vr);
            if (j < 0 || v[i]->shape[j] == 1)
                continue;
            if (size != 1 && size != v[i]->shape[j])
                return XBITC_E_SHAPE;
            size = v[i]->shape[j];
        }
        shape[d] = size;
    }
    *rank = r;
    return XBITC_OK;
}

void xo_iter_init(xo_iter *it, int32_t rank, const int64_t *shape, int32_t nop, int64_t st[][XO_MAXR],
                  const int64_t *base) {
    int32_t n = 0;
    it->nop = nop;
    it->rows = 1;
    for (int k = 0; k < nop; k++)
        it->off[k] = base ? base[k] : 0;
    for (int32_t d = 0; d < rank; d++) {
        if (shape[d] == 0)
            it->rows = 0;
        if (shape[d] == 1)
            continue;
        int merge = n > 0; /* axis d continues the previous one for every operand: one longer axis */
        for (int k = 0; k < nop && merge; k++)
            merge = it->st[k][n - 1] == st[k][d] * shape[d];
        if (merge) {
            it->shape[n - 1] *= shape[d];
        } else {
            it->shape[n] = shape[d];
            it->idx[n++] = 0;
        }
        for (int k = 0; k < nop; k++)
            it->st[k][n - 1] = st[k][d];
    }
    it->inner = n ? it->shape[n - 1] : 1;
    for (int k = 0; k < nop; k++)
        it->istride[k] = n ? it->st[k][n - 1] : 0;
    it->rank = n ? n - 1 : 0;
    if (it->rows)
        it->rows = xo_prod(it->shape, it->rank);
    else
        it->inner = 0;
}

void xo_iter_next(xo_iter *it) {
    for (int32_t d = it->rank - 1; d >= 0; d--) {
        for (int k = 0; k < it->nop; k++)
            it->off[k] += it->st[k][d];
        if (++it->idx[d] < it->shape[d])
            return;
        for (int k = 0; k < it->nop; k++)
            it->off[k] -= it->st[k][d] * it->shape[d];
        it->idx[d] = 0;
    }
}

/* ------------------------------------------------------------------------------------ elements and dtypes */

typedef union xo_scal {
    float f;
    int64_t i;
    uint8_t b;
} xo_scal;

/* v as a tensor: a Python scalar becomes a 0-d tensor of its own dtype held in *s (a float rounds to float32, as
 * torch.tensor(value, dtype=float32) does). */
static const xb_value *tensorize(const xb_value *v, xb_value *t, xo_scal *s) {
    if (v->rank >= 0)
        return v;
    *t = *v;
    t->rank = 0;
    if (v->dtype == XBITC_F32)
        s->f = (float)v->f;
    else if (v->dtype == XBITC_I64)
        s->i = v->i;
    else
        s->b = v->i != 0;
    t->data = s;
    return t;
}

/* float -> int64 truncating toward zero; NaN and out-of-range give INT64_MIN, as x86 (and so torch) does. */
static int64_t f_to_i64(double f) {
    return f >= -9.2233720368547758e18 && f < 9.2233720368547758e18 ? (int64_t)f : INT64_MIN;
}

static float ld_f(const void *p, int32_t dt, int64_t i) {
    if (dt == XBITC_F32)
        return ((const float *)p)[i];
    return dt == XBITC_I64 ? (float)((const int64_t *)p)[i] : (float)((const uint8_t *)p)[i];
}

static int64_t ld_i(const void *p, int32_t dt, int64_t i) {
    if (dt == XBITC_F32)
        return f_to_i64(((const float *)p)[i]);
    return dt == XBITC_I64 ? ((const int64_t *)p)[i] : (int64_t)((const uint8_t *)p)[i];
}

static int nonzero(const void *p, int32_t dt, int64_t i) {
    if (dt == XBITC_F32)
        return ((const float *)p)[i] != 0.0f;
    return dt == XBITC_I64 ? ((const int64_t *)p)[i] != 0 : ((const uint8_t *)p)[i] != 0;
}

static void st_f(void *p, int32_t dt, int64_t i, float v) {
    if (dt == XBITC_F32)
        ((float *)p)[i] = v;
    else if (dt == XBITC_I64)
        ((int64_t *)p)[i] = f_to_i64(v);
    else
        ((uint8_t *)p)[i] = v != 0.0f;
}

static void st_i(void *p, int32_t dt, int64_t i, int64_t v) {
    if (dt == XBITC_F32)
        ((float *)p)[i] = (float)v;
    else if (dt == XBITC_I64)
        ((int64_t *)p)[i] = v;
    else
        ((uint8_t *)p)[i] = v != 0;
}

static void conv_elem(void *d, int32_t ddt, int64_t di, const void *s, int32_t sdt, int64_t si) {
    if (sdt == XBITC_F32)
        st_f(d, ddt, di, ((const float *)s)[si]);
    else
        st_i(d, ddt, di, ld_i(s, sdt, si));
}

/* torch's result dtype for tensors and Python scalars (ir/core.py _with_scalar): the highest kind (bool < int <
 * float) among the tensors, raised by a scalar of a higher kind; scalars alone give their own highest kind. */
static int32_t promote(int n, const xb_value *const *v) {
    int tk = -1, sk = -1;
    for (int i = 0; i < n; i++) {
        int k = v[i]->dtype == XBITC_F32 ? 2 : v[i]->dtype == XBITC_I64 ? 1 : 0;
        if (v[i]->rank < 0)
            sk = k > sk ? k : sk;
        else
            tk = k > tk ? k : tk;
    }
    int k = tk > sk ? tk : sk;
    return k == 2 ? XBITC_F32 : k == 1 ? XBITC_I64 : XBITC_BOOL;
}

/* dst (dtype ddt, strides dst_st from doff) = src (sdt, src_st from soff) over shape, converting dtypes. */
static void copy_strided(void *dst, int32_t ddt, const int64_t *dst_st, int64_t doff, const void *src, int32_t sdt,
                         const int64_t *src_st, int64_t soff, int32_t rank, const int64_t *shape) {
    int64_t st[2][XO_MAXR], base[2] = {doff, soff};
    memcpy(st[0], dst_st, sizeof(int64_t) * (size_t)rank);
    memcpy(st[1], src_st, sizeof(int64_t) * (size_t)rank);
    xo_iter it;
    xo_iter_init(&it, rank, shape, 2, st, base);
    size_t esz = xb_dtype_size(ddt);
    for (int64_t r = 0; r < it.rows; r++, xo_iter_next(&it)) {
        int64_t d = it.off[0], s = it.off[1], ds = it.istride[0], ss = it.istride[1];
        if (ddt != sdt) {
            for (int64_t e = 0; e < it.inner; e++)
                conv_elem(dst, ddt, d + e * ds, src, sdt, s + e * ss);
        } else if (ds == 1 && ss == 1) {
            memcpy((char *)dst + d * (int64_t)esz, (const char *)src + s * (int64_t)esz, (size_t)it.inner * esz);
        } else if (esz == 4) {
            for (int64_t e = 0; e < it.inner; e++)
                ((float *)dst)[d + e * ds] = ((const float *)src)[s + e * ss];
        } else if (esz == 8) {
            for (int64_t e = 0; e < it.inner; e++)
                ((int64_t *)dst)[d + e * ds] = ((const int64_t *)src)[s + e * ss];
        } else {
            for (int64_t e = 0; e < it.inner; e++)
                ((uint8_t *)dst)[d + e * ds] = ((const uint8_t *)src)[s + e * ss];
        }
    }
}

/* ------------------------------------------------------------------------------------ unary ops */

static int unary_to_float(int op) {
    return op != XB_OP_neg && op != XB_OP_abs && op != XB_OP_relu && op != XB_OP_logical_not;
}

static int32_t unary_shape(xb_call *c, int op) {
    const xb_value *x = xo_in(c, 0);
    if (!x || x->dtype == XB_PACKED)
        return XBITC_E_ARGUMENT;
    if ((!unary_to_float(op) && op != XB_OP_logical_not && x->dtype == XBITC_BOOL) ||
        (op == XB_OP_silu && x->dtype != XBITC_F32))
        return XBITC_E_SHAPE; /* torch refuses neg, abs and relu of bool, silu of integers */
    int32_t dt = op == XB_OP_logical_not ? XBITC_BOOL : unary_to_float(op) ? XBITC_F32 : x->dtype;
    return xo_set_out(c->out, dt, x->rank < 0 ? 0 : x->rank, x->shape);
}

static float unary_f(int op, float v) {
    switch (op) {
    case XB_OP_neg: return -v;
    case XB_OP_abs: return fabsf(v);
    case XB_OP_exp: return xo_expf(v);
    case XB_OP_log: return logf(v);
    case XB_OP_sqrt: return sqrtf(v);
    case XB_OP_rsqrt: return 1.0f / sqrtf(v);
    case XB_OP_sin: return sinf(v);
    case XB_OP_cos: return cosf(v);
    case XB_OP_tanh: return tanhf(v);
    case XB_OP_sigmoid: return 1.0f / (1.0f + xo_expf(-v));
    case XB_OP_erf: return erff(v);
    case XB_OP_relu: return v < 0.0f ? 0.0f : v; /* NaN stays NaN */
    case XB_OP_silu: return v / (1.0f + xo_expf(-v));
    default: return v == 0.0f;
    }
}

/* float32 to float32: the common cases as loops the compiler vectorises. */
static void f32_unary(int op, int64_t n, const float *restrict a, float *restrict o) {
    switch (op) {
    case XB_OP_neg: XO_FOR8(i, n, o[i] = -a[i];); break;
    case XB_OP_abs: XO_FOR8(i, n, o[i] = fabsf(a[i]);); break;
    case XB_OP_relu: XO_FOR8(i, n, o[i] = a[i] < 0.0f ? 0.0f : a[i];); break;
    case XB_OP_exp: XO_FOR8(i, n, o[i] = xo_expf(a[i]);); break;
    case XB_OP_sigmoid: XO_FOR8(i, n, o[i] = 1.0f / (1.0f + xo_expf(-a[i]));); break;
    case XB_OP_silu: XO_FOR8(i, n, o[i] = a[i] / (1.0f + xo_expf(-a[i]));); break;
    default:
        for (int64_t i = 0; i < n; i++)
            o[i] = unary_f(op, a[i]);
    }
}

static int32_t unary_run(xb_call *c, int op) {
    xb_value tx;
    xo_scal sx;
    const xb_value *x = tensorize(xo_in(c, 0), &tx, &sx);
    int64_t n = xb_numel(c->out);
    void *y = c->out->data;
    if (x->dtype == XBITC_F32 && c->out->dtype == XBITC_F32) {
        f32_unary(op, n, x->data, y);
        return XBITC_OK;
    }
    for (int64_t i = 0; i < n; i++) {
        if (op == XB_OP_logical_not) {
            ((uint8_t *)y)[i] = !nonzero(x->data, x->dtype, i);
        } else if (c->out->dtype == XBITC_I64) { /* neg, abs, relu of int64 (wrapping like torch) */
            int64_t v = ld_i(x->data, x->dtype, i);
            uint64_t m = (uint64_t)0 - (uint64_t)v;
            ((int64_t *)y)[i] = op == XB_OP_relu ? (v < 0 ? 0 : v) : (op == XB_OP_neg || v < 0) ? (int64_t)m : v;
        } else {
            ((float *)y)[i] = unary_f(op, ld_f(x->data, x->dtype, i));
        }
    }
    return XBITC_OK;
}

static void f32_binary_row(int op, int64_t n, const float *restrict a, int64_t sa, const float *restrict b,
                           int64_t sb, float *restrict o);

/* pow(x; exponent): torch's fast cases (x*x, sqrt, ...) exactly, powf otherwise; integers stay integers for an
 * integer exponent. */
static int32_t pow_shape(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    double e;
    if (!x || xo_attr_num(c, 0, &e))
        return XBITC_E_ARGUMENT;
    int int_exp = c->attr[0].kind == XB_A_INT;
    if (x->dtype != XBITC_F32 && int_exp && c->attr[0].i < 0)
        return XBITC_E_SHAPE; /* torch: integers to negative integer powers are not allowed */
    return xo_set_out(c->out, x->dtype == XBITC_F32 || !int_exp ? XBITC_F32 : XBITC_I64, x->rank, x->shape);
}

static float pow_f(float x, double e) {
    if (e == 2.0)
        return x * x;
    if (e == 0.5)
        return sqrtf(x);
    if (e == 1.0)
        return x;
    if (e == 0.0)
        return 1.0f;
    if (e == 3.0)
        return x * x * x;
    if (e == -0.5)
        return 1.0f / sqrtf(x);
    if (e == -1.0)
        return 1.0f / x;
    if (e == -2.0)
        return 1.0f / (x * x);
    return powf(x, (float)e);
}

static int32_t pow_run(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    int64_t n = xb_numel(x);
    if (c->out->dtype == XBITC_F32) {
        double e = c->attr[0].kind == XB_A_INT ? (double)c->attr[0].i : c->attr[0].f;
        float *o = c->out->data;
        if (x->dtype == XBITC_F32 && e == 2.0) {
            f32_binary_row(XB_OP_mul, n, x->data, 1, x->data, 1, o);
        } else {
            for (int64_t i = 0; i < n; i++)
                o[i] = pow_f(ld_f(x->data, x->dtype, i), e);
        }
        return XBITC_OK;
    }
    int64_t *o = c->out->data;
    for (int64_t i = 0; i < n; i++) { /* square and multiply, wrapping like torch's int64 */
        uint64_t b = (uint64_t)ld_i(x->data, x->dtype, i), r = 1;
        for (int64_t e = c->attr[0].i; e > 0; e >>= 1, b *= b)
            if (e & 1)
                r *= b;
        o[i] = (int64_t)r;
    }
    return XBITC_OK;
}

/* gelu(x; approximate): torch's formulas, exact (erf) or tanh. */
static int32_t gelu_shape(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    int64_t a;
    if (!x || xo_attr_int(c, 0, &a))
        return XBITC_E_ARGUMENT;
    if (x->dtype != XBITC_F32 || (a != 0 && a != 1))
        return XBITC_E_SHAPE;
    return xo_set_out(c->out, XBITC_F32, x->rank, x->shape);
}

static int32_t gelu_run(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    const float *a = x->data;
    float *o = c->out->data;
    int64_t n = xb_numel(x);
    if (c->attr[0].i == 1) {
        const float beta = 0.7978845608028654f, kappa = 0.044715f; /* sqrt(2/pi) */
        for (int64_t i = 0; i < n; i++) {
            float v = a[i], inner = beta * (v + kappa * (v * v * v));
            o[i] = 0.5f * v * (1.0f + tanhf(inner));
        }
    } else {
        for (int64_t i = 0; i < n; i++)
            o[i] = a[i] * 0.5f * (1.0f + erff(a[i] * 0.70710678118654752f));
    }
    return XBITC_OK;
}

/* ------------------------------------------------------------------------------------ binary ops */

static int is_compare(int op) {
    return op == XB_OP_eq || op == XB_OP_ne || op == XB_OP_lt || op == XB_OP_le || op == XB_OP_gt || op == XB_OP_ge;
}

static int is_logical(int op) {
    return op == XB_OP_logical_and || op == XB_OP_logical_or;
}

static int32_t binary_shape(xb_call *c, int op) {
    const xb_value *v[2] = {xo_in(c, 0), xo_in(c, 1)};
    if (!v[0] || !v[1] || v[0]->dtype == XB_PACKED || v[1]->dtype == XB_PACKED)
        return XBITC_E_ARGUMENT;
    int32_t ct = promote(2, v), rank, ot;
    int64_t shape[XO_MAXR];
    if (op == XB_OP_sub && ct == XBITC_BOOL)
        return XBITC_E_SHAPE; /* torch refuses bool subtraction */
    ot = is_compare(op) || is_logical(op) ? XBITC_BOOL : op == XB_OP_div ? XBITC_F32 : ct;
    int32_t st = xo_broadcast(2, v, &rank, shape);
    return st ? st : xo_set_out(c->out, ot, rank, shape);
}

static float arith_f(int op, float x, float y) {
    switch (op) {
    case XB_OP_add: return x + y;
    case XB_OP_sub: return x - y;
    case XB_OP_mul: return x * y;
    case XB_OP_div: return x / y;
    case XB_OP_maximum: return isnan(x) || isnan(y) ? NAN : x > y ? x : y;
    default: return isnan(x) || isnan(y) ? NAN : x < y ? x : y;
    }
}

static int64_t arith_i(int op, int64_t x, int64_t y) {
    switch (op) { /* wrapping, as torch's int64 */
    case XB_OP_add: return (int64_t)((uint64_t)x + (uint64_t)y);
    case XB_OP_sub: return (int64_t)((uint64_t)x - (uint64_t)y);
    case XB_OP_mul: return (int64_t)((uint64_t)x * (uint64_t)y);
    case XB_OP_maximum: return x > y ? x : y;
    default: return x < y ? x : y;
    }
}

/* A comparison from x < y, x == y and x > y (all false when a float is NaN: only ne holds). */
static uint8_t compare(int op, int lt, int eq, int gt) {
    switch (op) {
    case XB_OP_eq: return (uint8_t)eq;
    case XB_OP_ne: return (uint8_t)!eq;
    case XB_OP_lt: return (uint8_t)lt;
    case XB_OP_le: return (uint8_t)(lt || eq);
    case XB_OP_gt: return (uint8_t)gt;
    default: return (uint8_t)(gt || eq);
    }
}

/* One row of a float32 binary op; a unit or zero step on either side gets its own loop so it vectorises. */
static void f32_binary_row(int op, int64_t n, const float *restrict a, int64_t sa, const float *restrict b,
                           int64_t sb, float *restrict o) {
#define ROW(EXPR)                                                                                                  \
    if (sa == 1 && sb == 1)                                                                                        \
        XO_FOR8(i, n, float x = a[i], y = b[i]; o[i] = (EXPR););                                                   \
    else if (sa == 1 && sb == 0)                                                                                   \
        XO_FOR8(i, n, float x = a[i], y = b[0]; o[i] = (EXPR););                                                   \
    else if (sa == 0 && sb == 1)                                                                                   \
        XO_FOR8(i, n, float x = a[0], y = b[i]; o[i] = (EXPR););                                                   \
    else                                                                                                           \
        for (int64_t i = 0; i < n; i++) {                                                                          \
            float x = a[i * sa], y = b[i * sb];                                                                    \
            o[i] = (EXPR);                                                                                         \
        }                                                                                                          \
    break;
    switch (op) {
    case XB_OP_add: ROW(x + y)
    case XB_OP_sub: ROW(x - y)
    case XB_OP_mul: ROW(x * y)
    case XB_OP_div: ROW(x / y)
    default: ROW(arith_f(op, x, y))
    }
#undef ROW
}

static int32_t binary_run(xb_call *c, int op) {
    const xb_value *v0[2] = {xo_in(c, 0), xo_in(c, 1)};
    xb_value t[2];
    xo_scal s[2];
    const xb_value *a = tensorize(v0[0], &t[0], &s[0]), *b = tensorize(v0[1], &t[1], &s[1]);
    int32_t ct = op == XB_OP_div ? XBITC_F32 : promote(2, v0);
    xb_value *o = c->out;
    int64_t st[3][XO_MAXR];
    xo_strides(o->rank, o->shape, st[0]);
    xo_bstrides(a, o->rank, o->shape, st[1]);
    xo_bstrides(b, o->rank, o->shape, st[2]);
    xo_iter it;
    xo_iter_init(&it, o->rank, o->shape, 3, st, NULL);
    if (o->dtype == XBITC_F32 && a->dtype == XBITC_F32 && b->dtype == XBITC_F32) {
        for (int64_t r = 0; r < it.rows; r++, xo_iter_next(&it))
            f32_binary_row(op, it.inner, (const float *)a->data + it.off[1], it.istride[1],
                           (const float *)b->data + it.off[2], it.istride[2], (float *)o->data + it.off[0]);
        return XBITC_OK;
    }
    for (int64_t r = 0; r < it.rows; r++, xo_iter_next(&it)) {
        for (int64_t e = 0; e < it.inner; e++) {
            int64_t io = it.off[0] + e, ia = it.off[1] + e * it.istride[1], ib = it.off[2] + e * it.istride[2];
            if (is_logical(op)) {
                int x = nonzero(a->data, a->dtype, ia), y = nonzero(b->data, b->dtype, ib);
                ((uint8_t *)o->data)[io] = op == XB_OP_logical_and ? x && y : x || y;
            } else if (ct == XBITC_F32) {
                float x = ld_f(a->data, a->dtype, ia), y = ld_f(b->data, b->dtype, ib);
                if (is_compare(op))
                    ((uint8_t *)o->data)[io] = compare(op, x < y, x == y, x > y);
                else
                    st_f(o->data, o->dtype, io, arith_f(op, x, y));
            } else { /* int64 and bool compute as int64 (bool results store nonzero) */
                int64_t x = ld_i(a->data, a->dtype, ia), y = ld_i(b->data, b->dtype, ib);
                if (is_compare(op))
                    ((uint8_t *)o->data)[io] = compare(op, x < y, x == y, x > y);
                else
                    st_i(o->data, o->dtype, io, arith_i(op, x, y));
            }
        }
    }
    return XBITC_OK;
}

/* where(cond, a, b): a and b may be Python scalars; the result dtype promotes a and b. */
static int32_t where_shape(xb_call *c) {
    const xb_value *v[3] = {xo_in(c, 0), xo_in(c, 1), xo_in(c, 2)};
    if (!v[0] || !v[1] || !v[2] || v[0]->dtype == XB_PACKED || v[1]->dtype == XB_PACKED || v[2]->dtype == XB_PACKED)
        return XBITC_E_ARGUMENT;
    int32_t rank;
    int64_t shape[XO_MAXR];
    int32_t st = xo_broadcast(3, v, &rank, shape);
    return st ? st : xo_set_out(c->out, promote(2, v + 1), rank, shape);
}

static int32_t where_run(xb_call *c) {
    xb_value t[3];
    xo_scal s[3];
    const xb_value *v[3];
    xb_value *o = c->out;
    int64_t st[4][XO_MAXR];
    xo_strides(o->rank, o->shape, st[0]);
    for (int k = 0; k < 3; k++) {
        v[k] = tensorize(xo_in(c, k), &t[k], &s[k]);
        xo_bstrides(v[k], o->rank, o->shape, st[k + 1]);
    }
    xo_iter it;
    xo_iter_init(&it, o->rank, o->shape, 4, st, NULL);
    int fast = o->dtype == XBITC_F32 && v[1]->dtype == XBITC_F32 && v[2]->dtype == XBITC_F32;
    for (int64_t r = 0; r < it.rows; r++, xo_iter_next(&it)) {
        for (int64_t e = 0; e < it.inner; e++) {
            int64_t io = it.off[0] + e, ic = it.off[1] + e * it.istride[1];
            int k = nonzero(v[0]->data, v[0]->dtype, ic) ? 1 : 2;
            int64_t i = it.off[k + 1] + e * it.istride[k + 1];
            if (fast)
                ((float *)o->data)[io] = ((const float *)v[k]->data)[i];
            else
                conv_elem(o->data, o->dtype, io, v[k]->data, v[k]->dtype, i);
        }
    }
    return XBITC_OK;
}

/* cast(x; dtype): bool is x != 0, float to int64 truncates toward zero. */
static int32_t cast_shape(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    int64_t dt;
    if (!x || xo_attr_int(c, 0, &dt) || dt < XBITC_F32 || dt > XBITC_BOOL)
        return XBITC_E_ARGUMENT;
    return xo_set_out(c->out, (int32_t)dt, x->rank, x->shape);
}

static int32_t cast_run(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    int64_t n = xb_numel(x);
    if (x->dtype == c->out->dtype && n > 0)
        memcpy(c->out->data, x->data, xb_nbytes(x));
    else
        for (int64_t i = 0; i < n; i++)
            conv_elem(c->out->data, c->out->dtype, i, x->data, x->dtype, i);
    return XBITC_OK;
}

/* ------------------------------------------------------------------------------------ views and copies */

/* An integer operand: an int64 or bool scalar. */
static int32_t scalar_int(const xb_value *v, int64_t *i) {
    if (!v)
        return XBITC_E_ARGUMENT;
    if (v->rank >= 0 || (v->dtype != XBITC_I64 && v->dtype != XBITC_BOOL))
        return XBITC_E_SHAPE;
    *i = v->i;
    return XBITC_OK;
}

/* A list operand of sizes (reshape, expand, full): int64 scalars. */
static int32_t read_sizes(const xb_call *c, int i, int64_t *sizes, int32_t *n) {
    if (i >= c->nin || (c->in[i].kind != XB_LIST && c->in[i].kind != XB_ONE) || !c->in[i].v)
        return XBITC_E_ARGUMENT;
    if (c->in[i].n > XO_MAXR || c->in[i].n < 0)
        return XBITC_E_SHAPE;
    for (int32_t k = 0; k < c->in[i].n; k++) {
        int32_t st = scalar_int(&c->in[i].v[k], &sizes[k]);
        if (st)
            return st;
    }
    *n = c->in[i].n;
    return XBITC_OK;
}

static int32_t reshape_shape(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    int64_t s[XO_MAXR], known = 1;
    int32_t n, st, infer = -1;
    if (!x)
        return XBITC_E_ARGUMENT;
    if ((st = read_sizes(c, 1, s, &n)))
        return st;
    for (int32_t d = 0; d < n; d++) {
        if (s[d] == -1 && infer < 0)
            infer = d;
        else if (s[d] < 0 || (s[d] > 0 && known > ((int64_t)1 << 58) / s[d]))
            return XBITC_E_SHAPE;
        else
            known *= s[d];
    }
    int64_t total = xb_numel(x);
    if (infer >= 0) {
        if (known == 0)
            return XBITC_E_SHAPE;
        s[infer] = total / known;
        known *= s[infer];
    }
    return known == total ? xo_set_out(c->out, x->dtype, n, s) : XBITC_E_SHAPE;
}

static int32_t unsqueeze_shape(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    int64_t dim, s[XO_MAXR + 1];
    int32_t d;
    if (!x || xo_attr_int(c, 0, &dim))
        return XBITC_E_ARGUMENT;
    if (xo_axis(dim, x->rank + 1, &d) || x->rank >= XO_MAXR)
        return XBITC_E_SHAPE;
    for (int32_t i = 0, j = 0; i <= x->rank; i++)
        s[i] = i == d ? 1 : x->shape[j++];
    return xo_set_out(c->out, x->dtype, x->rank + 1, s);
}

static int32_t squeeze_shape(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    int64_t dim, s[XO_MAXR];
    int32_t d, r = 0;
    if (!x || xo_attr_int(c, 0, &dim))
        return XBITC_E_ARGUMENT;
    if (xo_axis(dim, x->rank, &d))
        return XBITC_E_SHAPE;
    for (int32_t i = 0; i < x->rank; i++)
        if (i != d || x->shape[i] != 1)
            s[r++] = x->shape[i];
    return xo_set_out(c->out, x->dtype, r, s);
}

static int32_t expand_shape(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    int64_t s[XO_MAXR];
    int32_t n, st;
    if (!x)
        return XBITC_E_ARGUMENT;
    if ((st = read_sizes(c, 1, s, &n)))
        return st;
    int32_t lead = n - x->rank;
    if (lead < 0)
        return XBITC_E_SHAPE;
    for (int32_t d = 0; d < n; d++) {
        int64_t have = d < lead ? -1 : x->shape[d - lead];
        if (s[d] == -1 && d >= lead)
            s[d] = have;
        else if (s[d] < 0 || (d >= lead && have != 1 && have != s[d]))
            return XBITC_E_SHAPE;
    }
    return xo_set_out(c->out, x->dtype, n, s);
}

static int32_t expand_run(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    xb_value *o = c->out;
    int64_t sst[XO_MAXR], dst[XO_MAXR];
    xo_bstrides(x, o->rank, o->shape, sst);
    xo_strides(o->rank, o->shape, dst);
    copy_strided(o->data, o->dtype, dst, 0, x->data, x->dtype, sst, 0, o->rank, o->shape);
    return XBITC_OK;
}

/* The axis order of permute (dims) or transpose (dim0, dim1). */
static int32_t axis_order(const xb_call *c, const xb_value *x, int transpose, int32_t *perm) {
    int32_t r = x->rank;
    if (transpose) {
        int64_t d0, d1;
        int32_t a, b;
        if (xo_attr_int(c, 0, &d0) || xo_attr_int(c, 1, &d1))
            return XBITC_E_ARGUMENT;
        if (xo_axis(d0, r, &a) || xo_axis(d1, r, &b))
            return XBITC_E_SHAPE;
        for (int32_t i = 0; i < r; i++)
            perm[i] = i == a ? b : i == b ? a : i;
        return XBITC_OK;
    }
    if (c->nattr < 1 || c->attr[0].kind != XB_A_LIST || (c->attr[0].n > 0 && !c->attr[0].list))
        return XBITC_E_ARGUMENT;
    if (c->attr[0].n != r)
        return XBITC_E_SHAPE;
    int seen[XO_MAXR] = {0};
    for (int32_t i = 0; i < r; i++) {
        if (xo_axis(c->attr[0].list[i], r, &perm[i]) || seen[perm[i]]++)
            return XBITC_E_SHAPE;
    }
    return XBITC_OK;
}

static int32_t permute_common(xb_call *c, int transpose, int run) {
    const xb_value *x = xo_tensor(c, 0);
    int32_t perm[XO_MAXR], st;
    int64_t s[XO_MAXR], xs[XO_MAXR], sst[XO_MAXR];
    if (!x)
        return XBITC_E_ARGUMENT;
    if ((st = axis_order(c, x, transpose, perm)))
        return st;
    xo_strides(x->rank, x->shape, xs);
    for (int32_t i = 0; i < x->rank; i++) {
        s[i] = x->shape[perm[i]];
        sst[i] = xs[perm[i]];
    }
    if (!run)
        return xo_set_out(c->out, x->dtype, x->rank, s);
    xo_strides(x->rank, s, xs);
    copy_strided(c->out->data, x->dtype, xs, 0, x->data, x->dtype, sst, 0, x->rank, s);
    return XBITC_OK;
}

static int32_t transpose_shape(xb_call *c) { return permute_common(c, 1, 0); }
static int32_t transpose_run(xb_call *c) { return permute_common(c, 1, 1); }
static int32_t permute_shape(xb_call *c) { return permute_common(c, 0, 0); }
static int32_t permute_run(xb_call *c) { return permute_common(c, 0, 1); }

/* slice(x, start, stop; dim, step) clamped as Python slicing (step > 0); select(x; dim, index). Both copy the
 * strided view: the source strides scaled by step, the start as an offset. */
static int32_t slice_common(xb_call *c, int select, int run) {
    const xb_value *x = xo_tensor(c, 0);
    int64_t dim, start = 0, stop, step = 1, s[XO_MAXR] = {0}, xs[XO_MAXR] = {0};
    int32_t d, st;
    if (!x || xo_attr_int(c, 0, &dim) || xo_attr_int(c, 1, select ? &start : &step))
        return XBITC_E_ARGUMENT;
    if (xo_axis(dim, x->rank, &d) || x->rank == 0 || step <= 0 || step > XB_MAX_SIZE)
        return XBITC_E_SHAPE;
    int64_t n = x->shape[d], len = 1;
    if (select) {
        start = start < 0 ? start + n : start;
        if (start < 0 || start >= n)
            return XBITC_E_SHAPE;
    } else {
        stop = n;
        const xb_value *a = xo_in(c, 1), *b = xo_in(c, 2); /* absent: the whole axis */
        if ((a && (st = scalar_int(a, &start))) || (b && (st = scalar_int(b, &stop))))
            return st;
        start = start < 0 ? (start + n < 0 ? 0 : start + n) : start > n ? n : start;
        stop = stop < 0 ? (stop + n < 0 ? 0 : stop + n) : stop > n ? n : stop;
        len = stop > start ? (stop - start - 1) / step + 1 : 0;
    }
    xo_strides(x->rank, x->shape, xs);
    int64_t base = start * xs[d];
    for (int32_t i = 0; i < x->rank; i++)
        s[i] = x->shape[i];
    s[d] = len;
    xs[d] *= step;
    if (select) { /* the axis disappears */
        memmove(s + d, s + d + 1, sizeof(int64_t) * (size_t)(x->rank - d - 1));
        memmove(xs + d, xs + d + 1, sizeof(int64_t) * (size_t)(x->rank - d - 1));
    }
    int32_t r = x->rank - (select ? 1 : 0);
    if (!run)
        return xo_set_out(c->out, x->dtype, r, s);
    int64_t os[XO_MAXR];
    xo_strides(r, s, os);
    copy_strided(c->out->data, x->dtype, os, 0, x->data, x->dtype, xs, base, r, s);
    return XBITC_OK;
}

static int32_t slice_shape(xb_call *c) { return slice_common(c, 0, 0); }
static int32_t slice_run(xb_call *c) { return slice_common(c, 0, 1); }
static int32_t select_shape(xb_call *c) { return slice_common(c, 1, 0); }
static int32_t select_run(xb_call *c) { return slice_common(c, 1, 1); }

/* concat(xs; dim): empty 1-D operands are skipped (as torch does); dtypes promote. */
static int skipped(const xb_value *v) {
    return v->rank == 1 && v->shape[0] == 0;
}

static int32_t concat_common(xb_call *c, int run) {
    if (c->nin < 1 || (c->in[0].kind != XB_LIST && c->in[0].kind != XB_ONE) || c->in[0].n < 1 || !c->in[0].v)
        return XBITC_E_ARGUMENT;
    const xb_value *xs = c->in[0].v, *first = NULL;
    int32_t n = c->in[0].n, d = 0, kind = -1;
    int64_t dim, s[XO_MAXR];
    if (xo_attr_int(c, 0, &dim))
        return XBITC_E_ARGUMENT;
    for (int32_t i = 0; i < n; i++) {
        const xb_value *v = &xs[i];
        if (v->rank < 0 || v->rank > XO_MAXR || v->dtype < XBITC_F32 || v->dtype > XBITC_BOOL)
            return XBITC_E_SHAPE;
        int k = v->dtype == XBITC_F32 ? 2 : v->dtype == XBITC_I64 ? 1 : 0;
        kind = k > kind ? k : kind;
        if (skipped(v) && n > 1)
            continue;
        if (!first) {
            first = v;
            if (xo_axis(dim, v->rank, &d) || v->rank == 0)
                return XBITC_E_SHAPE;
            memcpy(s, v->shape, sizeof(int64_t) * (size_t)v->rank);
            s[d] = 0;
        }
        if (v->rank != first->rank)
            return XBITC_E_SHAPE;
        for (int32_t j = 0; j < v->rank; j++)
            if (j != d && v->shape[j] != s[j])
                return XBITC_E_SHAPE;
        if (run && v->shape[d] > 0) {
            int64_t vs[XO_MAXR], os[XO_MAXR];
            xo_strides(v->rank, v->shape, vs);
            xo_strides(c->out->rank, c->out->shape, os);
            copy_strided(c->out->data, c->out->dtype, os, s[d] * os[d], v->data, v->dtype, vs, 0, v->rank, v->shape);
        }
        s[d] += v->shape[d];
    }
    if (!first) { /* every operand was an empty 1-D tensor */
        s[0] = 0;
        first = &xs[0];
    }
    int32_t dt = kind == 2 ? XBITC_F32 : kind == 1 ? XBITC_I64 : XBITC_BOOL;
    return run ? XBITC_OK : xo_set_out(c->out, dt, first->rank, s);
}

static int32_t concat_shape(xb_call *c) { return concat_common(c, 0); }
static int32_t concat_run(xb_call *c) { return concat_common(c, 1); }

/* gather(x, index; dim) as torch.gather: out has index's shape; index values must lie in [0, x.shape[dim]). */
static int32_t gather_shape(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0), *ix = xo_tensor(c, 1);
    int64_t dim;
    int32_t d;
    if (!x || !ix || xo_attr_int(c, 0, &dim))
        return XBITC_E_ARGUMENT;
    if (ix->dtype != XBITC_I64 || ix->rank != x->rank || xo_axis(dim, x->rank, &d))
        return XBITC_E_SHAPE;
    for (int32_t j = 0; j < x->rank; j++)
        if (j != d && ix->shape[j] > x->shape[j])
            return XBITC_E_SHAPE;
    return xo_set_out(c->out, x->dtype, ix->rank, ix->shape);
}

static int32_t gather_run(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0), *ix = xo_tensor(c, 1);
    int32_t d = 0, r = x->rank;
    xo_axis(c->attr[0].i, r, &d);
    int64_t st[2][XO_MAXR], xs[XO_MAXR], size = r ? x->shape[d] : 1, dstride;
    xo_strides(r, ix->shape, st[0]);
    xo_strides(r, x->shape, xs);
    memcpy(st[1], xs, sizeof(int64_t) * (size_t)r);
    dstride = r ? xs[d] : 0;
    if (r)
        st[1][d] = 0; /* the index supplies the position along dim */
    const int64_t *idx = ix->data;
    size_t esz = xb_dtype_size(x->dtype);
    xo_iter it;
    xo_iter_init(&it, r, ix->shape, 2, st, NULL);
    for (int64_t row = 0; row < it.rows; row++, xo_iter_next(&it)) {
        for (int64_t e = 0; e < it.inner; e++) {
            int64_t o = it.off[0] + e * it.istride[0], k = idx[o];
            if (k < 0 || k >= size)
                return XBITC_E_SHAPE;
            memcpy((char *)c->out->data + o * (int64_t)esz,
                   (const char *)x->data + (it.off[1] + e * it.istride[1] + k * dstride) * (int64_t)esz, esz);
        }
    }
    return XBITC_OK;
}

/* ------------------------------------------------------------------------------------ constructors, sizes */

static int32_t full_shape(xb_call *c) {
    int64_t s[XO_MAXR], dt;
    double v;
    int32_t n, st;
    if ((st = read_sizes(c, 0, s, &n)))
        return st;
    if (xo_attr_num(c, 0, &v) || xo_attr_int(c, 1, &dt) || dt < XBITC_F32 || dt > XBITC_BOOL)
        return XBITC_E_ARGUMENT;
    return xo_set_out(c->out, (int32_t)dt, n, s);
}

static int32_t full_run(xb_call *c) {
    const xb_attr *a = &c->attr[0];
    int64_t n = xb_numel(c->out);
    for (int64_t i = 0; i < n; i++) {
        if (a->kind == XB_A_INT)
            st_i(c->out->data, c->out->dtype, i, a->i);
        else if (c->out->dtype == XBITC_I64)
            ((int64_t *)c->out->data)[i] = f_to_i64(a->f);
        else
            st_f(c->out->data, c->out->dtype, i, (float)a->f);
    }
    return XBITC_OK;
}

static int32_t arange_shape(xb_call *c) {
    const xb_value *e = xo_in(c, 0);
    int64_t dt, end;
    if (!e || xo_attr_int(c, 0, &dt))
        return XBITC_E_ARGUMENT;
    if (e->rank >= 0 || (dt != XBITC_F32 && dt != XBITC_I64))
        return XBITC_E_SHAPE;
    end = e->dtype == XBITC_F32 ? f_to_i64(e->f) : e->i;
    return end < 0 ? XBITC_E_SHAPE : xo_set_out(c->out, (int32_t)dt, 1, &end);
}

static int32_t arange_run(xb_call *c) {
    for (int64_t i = 0; i < c->out->shape[0]; i++)
        st_i(c->out->data, c->out->dtype, i, i);
    return XBITC_OK;
}

static int32_t dim_shape(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    int64_t axis;
    int32_t d;
    if (!x || xo_attr_int(c, 0, &axis))
        return XBITC_E_ARGUMENT;
    if (x->rank == 0 || xo_axis(axis, x->rank, &d))
        return XBITC_E_SHAPE;
    c->out->dtype = XBITC_I64;
    c->out->rank = -1;
    c->out->i = x->shape[d];
    return XBITC_OK;
}

/* Size arithmetic on int64 scalars (Python ints: floordiv rounds toward minus infinity). */
static int32_t scalar_shape(xb_call *c, int op) {
    int64_t a, b, r;
    int32_t st;
    if ((st = scalar_int(xo_in(c, 0), &a)) || (st = scalar_int(xo_in(c, 1), &b)))
        return st;
    if (op == XB_OP_scalar_floordiv) {
        if (b == 0 || (a == INT64_MIN && b == -1))
            return XBITC_E_SHAPE;
        r = a / b - (a % b != 0 && (a < 0) != (b < 0));
    } else {
        r = arith_i(op == XB_OP_scalar_add ? XB_OP_add : op == XB_OP_scalar_sub ? XB_OP_sub : XB_OP_mul, a, b);
    }
    c->out->dtype = XBITC_I64;
    c->out->rank = -1;
    c->out->i = r;
    return XBITC_OK;
}

/* ------------------------------------------------------------------------------------ reductions */

/* The axes mean/sum reduce (an empty list: all of them, as torch does) and how many elements each output sums. */
static int32_t reduce_axes(const xb_call *c, const xb_value *x, int *mask, int64_t *count) {
    const xb_attr *a = c->nattr >= 1 ? &c->attr[0] : NULL;
    if (!a || a->kind != XB_A_LIST || (a->n > 0 && !a->list))
        return XBITC_E_ARGUMENT;
    for (int32_t d = 0; d < XO_MAXR; d++)
        mask[d] = a->n == 0;
    for (int32_t i = 0; i < a->n; i++) {
        int32_t d;
        if (xo_axis(a->list[i], x->rank, &d) || (x->rank > 0 && mask[d]++))
            return XBITC_E_SHAPE;
    }
    *count = 1;
    for (int32_t d = 0; d < x->rank; d++)
        *count *= mask[d] ? x->shape[d] : 1;
    return XBITC_OK;
}

static int32_t reduce_shape(xb_call *c, int mean) {
    const xb_value *x = xo_tensor(c, 0);
    int mask[XO_MAXR];
    int64_t keep, count, s[XO_MAXR];
    int32_t st, r = 0;
    if (!x || xo_attr_int(c, 1, &keep))
        return XBITC_E_ARGUMENT;
    if ((st = reduce_axes(c, x, mask, &count)))
        return st;
    if (mean && x->dtype != XBITC_F32)
        return XBITC_E_SHAPE; /* torch: mean needs a floating dtype */
    for (int32_t d = 0; d < x->rank; d++)
        if (keep || !mask[d])
            s[r++] = mask[d] ? 1 : x->shape[d];
    if ((st = xo_set_out(c->out, x->dtype == XBITC_F32 ? XBITC_F32 : XBITC_I64, r, s)))
        return st;
    c->scratch_bytes = x->dtype == XBITC_F32 ? (uint64_t)xb_numel(c->out) * sizeof(double) : 0;
    return XBITC_OK;
}

static int32_t reduce_run(xb_call *c, int mean) {
    const xb_value *x = xo_tensor(c, 0);
    int mask[XO_MAXR];
    int64_t count, st[2][XO_MAXR], ks[XO_MAXR], kshape[XO_MAXR] = {0}, nout = xb_numel(c->out);
    reduce_axes(c, x, mask, &count);
    for (int32_t d = 0; d < x->rank; d++) /* the output as a keepdim shape: reduced axes step 0 */
        kshape[d] = mask[d] ? 1 : x->shape[d];
    xo_strides(x->rank, kshape, ks);
    xo_strides(x->rank, x->shape, st[0]);
    for (int32_t d = 0; d < x->rank; d++)
        st[1][d] = mask[d] ? 0 : ks[d];
    xo_iter it;
    xo_iter_init(&it, x->rank, x->shape, 2, st, NULL);
    if (x->dtype == XBITC_F32) {
        double *acc = c->scratch;
        const float *a = x->data;
        for (int64_t i = 0; i < nout; i++)
            acc[i] = 0.0;
        for (int64_t r = 0; r < it.rows; r++, xo_iter_next(&it)) {
            const float *p = a + it.off[0];
            double *q = acc + it.off[1];
            if (it.istride[1] == 0) {
                double s = 0.0;
                for (int64_t e = 0; e < it.inner; e++)
                    s += p[e];
                *q += s;
            } else {
                for (int64_t e = 0; e < it.inner; e++)
                    q[e * it.istride[1]] += p[e];
            }
        }
        float *o = c->out->data;
        for (int64_t i = 0; i < nout; i++)
            o[i] = (float)(mean ? acc[i] / (double)count : acc[i]);
        return XBITC_OK;
    }
    int64_t *o = c->out->data;
    for (int64_t i = 0; i < nout; i++)
        o[i] = 0;
    for (int64_t r = 0; r < it.rows; r++, xo_iter_next(&it))
        for (int64_t e = 0; e < it.inner; e++)
            o[it.off[1] + e * it.istride[1]] =
                arith_i(XB_OP_add, o[it.off[1] + e * it.istride[1]], ld_i(x->data, x->dtype, it.off[0] + e));
    return XBITC_OK;
}

static int32_t mean_shape(xb_call *c) { return reduce_shape(c, 1); }
static int32_t mean_run(xb_call *c) { return reduce_run(c, 1); }
static int32_t sum_shape(xb_call *c) { return reduce_shape(c, 0); }
static int32_t sum_run(xb_call *c) { return reduce_run(c, 0); }

/* ------------------------------------------------------------------------------------ the table */

#define UNARY_OPS(X) X(neg) X(abs) X(exp) X(log) X(sqrt) X(rsqrt) X(sin) X(cos) X(tanh) X(sigmoid) X(erf) X(relu) \
    X(silu) X(logical_not)
#define BINARY_OPS(X) X(add) X(sub) X(mul) X(div) X(maximum) X(minimum) X(eq) X(ne) X(lt) X(le) X(gt) X(ge) \
    X(logical_and) X(logical_or)
#define SCALAR_OPS(X) X(scalar_add) X(scalar_sub) X(scalar_mul) X(scalar_floordiv)

#define UNARY_FNS(name)                                                                                            \
    static int32_t name##_shape(xb_call *c) { return unary_shape(c, XB_OP_##name); }                               \
    static int32_t name##_run(xb_call *c) { return unary_run(c, XB_OP_##name); }
#define BINARY_FNS(name)                                                                                           \
    static int32_t name##_shape(xb_call *c) { return binary_shape(c, XB_OP_##name); }                              \
    static int32_t name##_run(xb_call *c) { return binary_run(c, XB_OP_##name); }
#define SCALAR_FNS(name) static int32_t name##_shape(xb_call *c) { return scalar_shape(c, XB_OP_##name); }
UNARY_OPS(UNARY_FNS)
BINARY_OPS(BINARY_FNS)
SCALAR_OPS(SCALAR_FNS)

#define RUNS(name) [XB_OP_##name] = {#name, name##_shape, name##_run, 0},
#define NN(name) [XB_OP_##name] = {#name, xo_shape_##name, xo_run_##name, 0},
#define SCALAR(name) [XB_OP_##name] = {#name, name##_shape, NULL, 0},
#define VIEW(name) [XB_OP_##name] = {#name, name##_shape, NULL, 1},

const xb_opdef XB_OPS[XB_NUM_OPS] = {
    XO_NN_OPS(NN)
    RUNS(gelu) RUNS(pow) RUNS(where) RUNS(mean) RUNS(sum) RUNS(expand) RUNS(transpose) RUNS(permute) RUNS(slice)
    RUNS(select) RUNS(concat) RUNS(cast) RUNS(arange) RUNS(full) RUNS(gather)
    VIEW(reshape) VIEW(unsqueeze) VIEW(squeeze)
    SCALAR(dim) SCALAR_OPS(SCALAR)
    UNARY_OPS(RUNS) BINARY_OPS(RUNS)
};
