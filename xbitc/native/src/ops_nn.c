/* The network ops of the core set (ir/core.py): embed, linear, matmul, conv2d, rmsnorm, layernorm, rope, attention
 * and softmax, all in float32 as torch computes them. The heavy ones (dense linear, matmul, attention, conv2d)
 * split their work with xb_parallel; dot products keep partial sums in registers and elementwise loops run in
 * blocks of 8 (XO_FOR8) so that GCC vectorises them at -O2. Norms sum in double; softmax and attention in float,
 * as torch's kernels. */
#include <math.h>
#include <string.h>

#include "ops.h"

#define ATT_QB 4     /* query rows per attention work unit: they share every key and value row read (dot4) */
_Static_assert(ATT_QB == 4, "dot4 and att_pv take four rows");
#define ATT_TASKS 64 /* attention tasks at most, so its scratch (a slice per task) is bounded */
#define LIN_TB 16    /* dense linear tile: tokens x weight rows per task */
#define LIN_NB 32
#define MM_MB 16     /* matmul rows per task */
#define CONV_PB 4    /* conv2d output positions per unit (one dot4 per filter) */
#define CONV_TASKS 64
#define PAR_MIN_WORK (1 << 18) /* multiply-adds below which splitting costs more than it gains */

static float dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++)
            acc[l] += a[i + l] * b[i + l];
    for (int l = 0; i < n; i++, l++)
        acc[l] += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static void axpy(float *restrict y, float a, const float *restrict x, int64_t n) {
    XO_FOR8(i, n, y[i] += a * x[i];);
}

/* The largest of s[0..n) (-inf for none); eight running maxima, branch-free so they vectorise. */
static float row_max(const float *s, int64_t n) {
    float mx[8];
    int64_t i = 0;
    for (int l = 0; l < 8; l++)
        mx[l] = -INFINITY;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++)
            mx[l] = xo_sel(-(int32_t)(s[i + l] > mx[l]), s[i + l], mx[l]);
    for (int l = 0; i < n; i++, l++)
        mx[l & 7] = s[i] > mx[l & 7] ? s[i] : mx[l & 7];
    float m = mx[0];
    for (int l = 1; l < 8; l++)
        m = mx[l] > m ? mx[l] : m;
    return m;
}

/* s[i] = exp(s[i] - m) in place; their sum (eight partial sums, in float as torch's kernels). */
static float exp_sum(float *restrict s, int64_t n, float m) {
    float sum[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) {
            s[i + l] = xo_expf(s[i + l] - m);
            sum[l] += s[i + l];
        }
    for (int l = 0; i < n; i++, l++) {
        s[i] = xo_expf(s[i] - m);
        sum[l & 7] += s[i];
    }
    return ((sum[0] + sum[4]) + (sum[1] + sum[5])) + ((sum[2] + sum[6]) + (sum[3] + sum[7]));
}

/* Four dot products sharing x: out[r] = x · w[r]. Each element of x loaded feeds four products; four partial sums
 * per output stay in registers. */
static void dot4(const float *x, const float *const *w, int64_t n, float *out) {
    float a[4][4] = {{0}};
    int64_t k = 0;
#ifdef XO_V4
    xo_v4 v0 = {0}, v1 = {0}, v2 = {0}, v3 = {0};
    for (; k + 4 <= n; k += 4) {
        xo_v4 xv = xo_load4(x + k);
        v0 += xv * xo_load4(w[0] + k);
        v1 += xv * xo_load4(w[1] + k);
        v2 += xv * xo_load4(w[2] + k);
        v3 += xv * xo_load4(w[3] + k);
    }
    memcpy(a[0], &v0, sizeof v0);
    memcpy(a[1], &v1, sizeof v1);
    memcpy(a[2], &v2, sizeof v2);
    memcpy(a[3], &v3, sizeof v3);
#else
    for (; k + 4 <= n; k += 4)
        for (int r = 0; r < 4; r++)
            for (int l = 0; l < 4; l++)
                a[r][l] += x[k + l] * w[r][k + l];
#endif
    for (int l = 0; k < n; k++, l++)
        for (int r = 0; r < 4; r++)
            a[r][l & 3] += x[k] * w[r][k];
    for (int r = 0; r < 4; r++)
        out[r] = (a[r][0] + a[r][2]) + (a[r][1] + a[r][3]);
}

static int is_f32(const xb_value *v, int32_t rank) {
    return v && v->dtype == XBITC_F32 && v->rank >= 0 && (rank < 0 || v->rank == rank);
}

/* An optional operand: absent (NULL, OK) or a float32 vector of n elements. */
static int32_t opt_vector(const xb_call *c, int i, int64_t n, const xb_value **v) {
    *v = xo_in(c, i);
    if (!*v)
        return XBITC_OK;
    return is_f32(*v, 1) && (*v)->shape[0] == n ? XBITC_OK : XBITC_E_SHAPE;
}

/* ------------------------------------------------------------------------------------ embed */

int32_t xo_shape_embed(xb_call *c) {
    const xb_value *ids = xo_tensor(c, 0), *t = xo_in(c, 1);
    int64_t s[XO_MAXR];
    if (!ids || !t || (t->dtype == XB_PACKED && !t->packed))
        return XBITC_E_ARGUMENT;
    if (ids->dtype != XBITC_I64 || ids->rank >= XO_MAXR || (t->dtype != XB_PACKED && !is_f32(t, 2)))
        return XBITC_E_SHAPE;
    memcpy(s, ids->shape, sizeof(int64_t) * (size_t)ids->rank);
    s[ids->rank] = t->dtype == XB_PACKED ? t->packed->in : t->shape[1];
    return xo_set_out(c->out, XBITC_F32, ids->rank + 1, s);
}

int32_t xo_run_embed(xb_call *c) {
    const xb_value *ids = xo_tensor(c, 0), *t = xo_in(c, 1);
    const int64_t *id = ids->data;
    int64_t n = xb_numel(ids), V = t->dtype == XB_PACKED ? t->packed->out : t->shape[0];
    for (int64_t i = 0; i < n; i++)
        if (id[i] < 0 || id[i] >= V)
            return XBITC_E_SHAPE;
    if (t->dtype == XB_PACKED)
        return n ? xb_packed_rows(t->packed, id, n, c->out->data) : XBITC_OK;
    int64_t D = t->shape[1];
    for (int64_t i = 0; i < n; i++)
        memcpy((float *)c->out->data + i * D, (const float *)t->data + id[i] * D, sizeof(float) * (size_t)D);
    return XBITC_OK;
}

/* ------------------------------------------------------------------------------------ linear */

int32_t xo_shape_linear(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0), *w = xo_in(c, 1), *b;
    if (!x || !w || (w->dtype == XB_PACKED && !w->packed))
        return XBITC_E_ARGUMENT;
    int packed = w->dtype == XB_PACKED;
    if (!is_f32(x, -1) || x->rank < 1 || (!packed && !is_f32(w, 2)))
        return XBITC_E_SHAPE;
    int64_t N = packed ? w->packed->out : w->shape[0], K = packed ? w->packed->in : w->shape[1], s[XO_MAXR];
    int32_t st;
    if (x->shape[x->rank - 1] != K || (st = opt_vector(c, 2, N, &b)))
        return XBITC_E_SHAPE;
    memcpy(s, x->shape, sizeof(int64_t) * (size_t)x->rank);
    s[x->rank - 1] = N;
    if ((st = xo_set_out(c->out, XBITC_F32, x->rank, s)))
        return st;
    c->scratch_bytes = packed ? xb_packed_scratch(w->packed, xb_numel(x) / (K ? K : 1)) : 0;
    return XBITC_OK;
}

typedef struct lin_job {
    const float *x, *w, *b;
    float *y;
    int64_t T, N, K, nblocks;
} lin_job;

/* Task i: a tile of LIN_TB tokens by LIN_NB weight rows, four weight rows per dot4 (a short last group by dot). */
static void lin_task(void *arg, int64_t i) {
    const lin_job *j = arg;
    int64_t t0 = i / j->nblocks * LIN_TB, n0 = i % j->nblocks * LIN_NB, K = j->K, N = j->N;
    int64_t t1 = t0 + LIN_TB < j->T ? t0 + LIN_TB : j->T, n1 = n0 + LIN_NB < N ? n0 + LIN_NB : N;
    for (int64_t n = n0; n < n1; n += 4) {
        const float *w[4];
        for (int64_t m = 0; m < 4; m++) /* rows past the tile repeat its first (not used) */
            w[m] = j->w + (n + m < n1 ? n + m : n) * K;
        for (int64_t t = t0; t < t1; t++) {
            float s[4], *y = j->y + t * N + n;
            if (n + 4 <= n1)
                dot4(j->x + t * K, w, K, s);
            else
                for (int64_t m = 0; m < n1 - n; m++)
                    s[m] = dot(j->x + t * K, w[m], K);
            for (int64_t m = 0; m < 4 && n + m < n1; m++)
                y[m] = j->b ? s[m] + j->b[n + m] : s[m];
        }
    }
}

int32_t xo_run_linear(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0), *w = xo_in(c, 1), *b = xo_in(c, 2);
    lin_job j = {x->data, NULL, b ? b->data : NULL, c->out->data, 0, c->out->shape[c->out->rank - 1],
                 x->shape[x->rank - 1], 0};
    j.T = j.K ? xb_numel(x) / j.K : xb_numel(c->out) / (j.N ? j.N : 1);
    if (j.T == 0 || j.N == 0)
        return XBITC_OK;
    if (w->dtype == XB_PACKED) {
        int32_t st = xb_packed_matmul(w->packed, j.x, j.T, j.y, c->scratch, c->exec);
        if (st || !j.b)
            return st;
        for (int64_t t = 0; t < j.T; t++)
            for (int64_t n = 0; n < j.N; n++)
                j.y[t * j.N + n] += j.b[n];
        return XBITC_OK;
    }
    j.w = w->data;
    j.nblocks = (j.N + LIN_NB - 1) / LIN_NB;
    int64_t tasks = (j.T + LIN_TB - 1) / LIN_TB * j.nblocks;
    if ((double)j.T * (double)j.N * (double)j.K < PAR_MIN_WORK)
        for (int64_t i = 0; i < tasks; i++)
            lin_task(&j, i);
    else
        xb_parallel(c->exec, lin_task, &j, tasks);
    return XBITC_OK;
}

/* ------------------------------------------------------------------------------------ matmul */

/* numpy matmul as ir/core.py's shape rule: b 1-D (a vector product over a's last axis), else batched a [.., M, K]
 * by b [.., K, N] with the batch axes broadcast. A 1-D a with a matrix b is refused, as the rule does. */
typedef struct mm_job {
    const float *a, *b;
    float *y;
    int64_t M, K, N, mblocks;
    int32_t brank;
    int64_t bshape[XO_MAXR], ast[XO_MAXR], bst[XO_MAXR];
} mm_job;

static int32_t mm_plan(const xb_call *c, mm_job *j, int32_t *rank, int64_t *shape) {
    const xb_value *a = xo_tensor(c, 0), *b = xo_tensor(c, 1);
    if (!a || !b)
        return XBITC_E_ARGUMENT;
    if (!is_f32(a, -1) || !is_f32(b, -1) || a->rank < 1 || b->rank < 1)
        return XBITC_E_SHAPE;
    memset(j, 0, sizeof *j);
    j->a = a->data;
    j->b = b->data;
    if (b->rank == 1) {
        j->K = b->shape[0];
        j->M = a->rank > 1 ? xo_prod(a->shape, a->rank - 1) : 1;
        *rank = a->rank - 1;
        memcpy(shape, a->shape, sizeof(int64_t) * (size_t)*rank);
        return a->shape[a->rank - 1] == j->K ? XBITC_OK : XBITC_E_SHAPE;
    }
    if (a->rank < 2 || a->shape[a->rank - 1] != b->shape[b->rank - 2])
        return XBITC_E_SHAPE;
    j->M = a->shape[a->rank - 2];
    j->K = b->shape[b->rank - 2];
    j->N = b->shape[b->rank - 1];
    xb_value ab = *a, bb = *b; /* the batch axes alone, to broadcast them */
    ab.rank -= 2;
    bb.rank -= 2;
    const xb_value *v[2] = {&ab, &bb};
    int32_t st = xo_broadcast(2, v, &j->brank, j->bshape);
    if (st || j->brank + 2 > XO_MAXR)
        return XBITC_E_SHAPE;
    xo_bstrides(&ab, j->brank, j->bshape, j->ast);
    xo_bstrides(&bb, j->brank, j->bshape, j->bst);
    for (int32_t d = 0; d < j->brank; d++) {
        j->ast[d] *= j->M * j->K;
        j->bst[d] *= j->K * j->N;
    }
    *rank = j->brank + 2;
    memcpy(shape, j->bshape, sizeof(int64_t) * (size_t)j->brank);
    shape[j->brank] = j->M;
    shape[j->brank + 1] = j->N;
    j->mblocks = (j->M + MM_MB - 1) / MM_MB;
    return XBITC_OK;
}

int32_t xo_shape_matmul(xb_call *c) {
    mm_job j;
    int32_t rank, st;
    int64_t shape[XO_MAXR];
    return (st = mm_plan(c, &j, &rank, shape)) ? st : xo_set_out(c->out, XBITC_F32, rank, shape);
}

#ifdef XO_V4
/* y[4][8] = a[4][K] b[K][8] (row strides K and N): 4 x 8 sums in registers, summed in k order like axpy. */
static void mm_tile(const float *a, int64_t K, const float *b, int64_t N, float *y) {
    xo_v4 c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0}, c4 = {0}, c5 = {0}, c6 = {0}, c7 = {0};
    for (int64_t k = 0; k < K; k++) { /* rows written out: GCC -O2 keeps a looped accumulator array in memory */
        xo_v4 b0 = xo_load4(b + k * N), b1 = xo_load4(b + k * N + 4);
        c0 += a[k] * b0, c1 += a[k] * b1;
        c2 += a[K + k] * b0, c3 += a[K + k] * b1;
        c4 += a[2 * K + k] * b0, c5 += a[2 * K + k] * b1;
        c6 += a[3 * K + k] * b0, c7 += a[3 * K + k] * b1;
    }
    xo_v4 c[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
    for (int r = 0; r < 4; r++)
        memcpy(y + r * N, &c[2 * r], 8 * sizeof(float));
}
#endif

/* Task i: MM_MB rows of one batch entry: 4 x 8 tiles where the vector kernel exists, the rest as rows of b
 * scaled and added (unit stride, vectorised). */
static void mm_task(void *arg, int64_t i) {
    const mm_job *j = arg;
    int64_t batch = i / j->mblocks, m0 = i % j->mblocks * MM_MB, m1 = m0 + MM_MB < j->M ? m0 + MM_MB : j->M;
    int64_t ao = 0, bo = 0, rest = batch;
    for (int32_t d = j->brank - 1; d >= 0; d--) {
        int64_t k = rest % j->bshape[d];
        rest /= j->bshape[d];
        ao += k * j->ast[d];
        bo += k * j->bst[d];
    }
    const float *a = j->a + ao, *b = j->b + bo;
    float *y = j->y + batch * j->M * j->N;
    for (int64_t m = m0; m < m1; m += 4) {
        int64_t rows = m1 - m < 4 ? m1 - m : 4, n0 = 0;
#ifdef XO_V4
        for (; rows == 4 && n0 + 8 <= j->N; n0 += 8)
            mm_tile(a + m * j->K, j->K, b + n0, j->N, y + m * j->N + n0);
#endif
        for (int64_t r = m; r < m + rows; r++) {
            float *row = y + r * j->N;
            for (int64_t n = n0; n < j->N; n++)
                row[n] = 0.0f;
            for (int64_t k = 0; k < j->K; k++)
                axpy(row + n0, a[r * j->K + k], b + k * j->N + n0, j->N - n0);
        }
    }
}

int32_t xo_run_matmul(xb_call *c) {
    mm_job j;
    int32_t rank;
    int64_t shape[XO_MAXR] = {0};
    mm_plan(c, &j, &rank, shape);
    j.y = c->out->data;
    if (xo_tensor(c, 1)->rank == 1) {
        for (int64_t m = 0; m < j.M; m++)
            j.y[m] = dot(j.a + m * j.K, j.b, j.K);
        return XBITC_OK;
    }
    int64_t tasks = xo_prod(j.bshape, j.brank) * j.mblocks;
    if ((double)tasks * MM_MB * (double)j.N * (double)j.K < PAR_MIN_WORK)
        for (int64_t i = 0; i < tasks; i++)
            mm_task(&j, i);
    else
        xb_parallel(c->exec, mm_task, &j, tasks);
    return XBITC_OK;
}

/* ------------------------------------------------------------------------------------ conv2d */

/* conv2d(x [N,C,H,W], w [O,C,KH,KW], bias?; stride, padding), one group. A unit is CONV_PB output positions of
 * one image: their input patches (C*KH*KW, zero-padded) are gathered into the task's scratch slice, then each
 * filter row is one dot4 against the four patches. Task t takes units t, t + tasks, ... */
typedef struct conv_job {
    const float *x, *w, *b;
    float *y, *scratch;
    int64_t C, H, W, O, KH, KW, OH, OW, sh, sw, ph, pw, ckk, blocks, units, tasks, slice;
} conv_job;

static int32_t conv_pair(const xb_call *c, int i, int64_t *p0, int64_t *p1) {
    const xb_attr *a = i < c->nattr ? &c->attr[i] : NULL;
    if (!a || a->kind != XB_A_LIST || a->n < 1 || a->n > 2 || !a->list)
        return XBITC_E_ARGUMENT;
    *p0 = a->list[0];
    *p1 = a->list[a->n - 1];
    return XBITC_OK;
}

static int32_t conv_plan(const xb_call *c, conv_job *j, int64_t *shape) {
    const xb_value *x = xo_tensor(c, 0), *w = xo_tensor(c, 1), *b;
    memset(j, 0, sizeof *j);
    if (!x || !w || conv_pair(c, 0, &j->sh, &j->sw) || conv_pair(c, 1, &j->ph, &j->pw))
        return XBITC_E_ARGUMENT;
    if (!is_f32(x, 4) || !is_f32(w, 4) || x->shape[1] != w->shape[1] || j->sh < 1 || j->sw < 1 || j->ph < 0 ||
        j->pw < 0 || opt_vector(c, 2, w->shape[0], &b))
        return XBITC_E_SHAPE;
    j->x = x->data;
    j->w = w->data;
    j->b = b ? b->data : NULL;
    j->C = x->shape[1], j->H = x->shape[2], j->W = x->shape[3];
    j->O = w->shape[0], j->KH = w->shape[2], j->KW = w->shape[3];
    /* a patch (C*KH*KW floats) and the padding must stay far from overflow whatever sizes the file gives */
    if (j->ph > XB_MAX_SIZE || j->pw > XB_MAX_SIZE || j->sh > XB_MAX_SIZE || j->sw > XB_MAX_SIZE ||
        j->C * j->KH * j->KW > ((int64_t)1 << 40)) /* the product is <= XB_MAX_ELEMENTS: w's sizes were checked */
        return XBITC_E_SHAPE;
    if (j->H + 2 * j->ph < j->KH || j->W + 2 * j->pw < j->KW)
        return XBITC_E_SHAPE;
    j->OH = (j->H + 2 * j->ph - j->KH) / j->sh + 1;
    j->OW = (j->W + 2 * j->pw - j->KW) / j->sw + 1;
    shape[0] = x->shape[0], shape[1] = j->O, shape[2] = j->OH, shape[3] = j->OW;
    j->ckk = j->C * j->KH * j->KW;
    j->blocks = (j->OH * j->OW + CONV_PB - 1) / CONV_PB;
    j->units = shape[0] * j->blocks;
    j->tasks = j->units < CONV_TASKS ? j->units : CONV_TASKS;
    j->slice = (CONV_PB * j->ckk + 15) / 16 * 16;
    return XBITC_OK;
}

int32_t xo_shape_conv2d(xb_call *c) {
    conv_job j;
    int64_t shape[4];
    int32_t st = conv_plan(c, &j, shape);
    if (st || (st = xo_set_out(c->out, XBITC_F32, 4, shape)))
        return st;
    c->scratch_bytes = (uint64_t)j.tasks * (uint64_t)j.slice * sizeof(float);
    return XBITC_OK;
}

/* The input patch under output position pos of image n, as C*KH*KW floats (zero outside the input). */
static void conv_patch(const conv_job *j, int64_t n, int64_t pos, float *patch) {
    int64_t oh = pos / j->OW, ow = pos % j->OW;
    for (int64_t ch = 0; ch < j->C; ch++)
        for (int64_t kh = 0; kh < j->KH; kh++) {
            int64_t ih = oh * j->sh - j->ph + kh;
            float *dst = patch + (ch * j->KH + kh) * j->KW;
            for (int64_t kw = 0; kw < j->KW; kw++) {
                int64_t iw = ow * j->sw - j->pw + kw;
                int in = ih >= 0 && ih < j->H && iw >= 0 && iw < j->W;
                dst[kw] = in ? j->x[((n * j->C + ch) * j->H + ih) * j->W + iw] : 0.0f;
            }
        }
}

static void conv_task(void *arg, int64_t t) {
    const conv_job *j = arg;
    float *scratch = j->scratch + t * j->slice;
    for (int64_t u = t; u < j->units; u += j->tasks) {
        int64_t n = u / j->blocks, p0 = u % j->blocks * CONV_PB, np = j->OH * j->OW - p0;
        const float *patch[CONV_PB];
        np = np < CONV_PB ? np : CONV_PB;
        for (int64_t q = 0; q < CONV_PB; q++) { /* a short unit repeats its last position; the copies are dropped */
            patch[q] = scratch + q * j->ckk;
            conv_patch(j, n, p0 + (q < np ? q : np - 1), scratch + q * j->ckk);
        }
        for (int64_t o = 0; o < j->O; o++) {
            float s[CONV_PB], *y = j->y + (n * j->O + o) * j->OH * j->OW + p0;
            dot4(j->w + o * j->ckk, patch, j->ckk, s);
            for (int64_t q = 0; q < np; q++)
                y[q] = j->b ? s[q] + j->b[o] : s[q];
        }
    }
}

int32_t xo_run_conv2d(xb_call *c) {
    conv_job j;
    int64_t shape[4] = {0};
    conv_plan(c, &j, shape);
    j.y = c->out->data;
    j.scratch = c->scratch;
    if (j.units > 0)
        xb_parallel(c->exec, conv_task, &j, j.tasks);
    return XBITC_OK;
}

/* ------------------------------------------------------------------------------------ norms */

/* rmsnorm(x [.., D], weight [D]; eps) as torch computes it in float32: x * rsqrt(mean(x*x) + eps) * w. */
int32_t xo_shape_rmsnorm(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0), *w = xo_tensor(c, 1);
    double eps;
    if (!x || !w || xo_attr_num(c, 0, &eps))
        return XBITC_E_ARGUMENT;
    if (!is_f32(x, -1) || x->rank < 1 || !is_f32(w, 1) || w->shape[0] != x->shape[x->rank - 1])
        return XBITC_E_SHAPE;
    return xo_set_out(c->out, XBITC_F32, x->rank, x->shape);
}

static void rms_row(const float *restrict a, const float *restrict w, float *restrict o, int64_t D, float eps) {
    double acc[8] = {0}; /* x*x rounds to float as torch's pow(2) does, then sums in double */
    int64_t i = 0;
    for (; i + 8 <= D; i += 8)
        for (int l = 0; l < 8; l++)
            acc[l] += (double)(a[i + l] * a[i + l]);
    for (int l = 0; i < D; i++, l++)
        acc[l] += (double)(a[i] * a[i]);
    double ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    float inv = 1.0f / sqrtf((float)(ss / (double)D) + eps);
    XO_FOR8(k, D, o[k] = a[k] * inv * w[k];);
}

int32_t xo_run_rmsnorm(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0), *w = xo_tensor(c, 1);
    double eps;
    xo_attr_num(c, 0, &eps);
    int64_t D = x->shape[x->rank - 1], rows = D ? xb_numel(x) / D : 0;
    for (int64_t r = 0; r < rows; r++)
        rms_row((const float *)x->data + r * D, w->data, (float *)c->out->data + r * D, D, (float)eps);
    return XBITC_OK;
}

/* layernorm(x [.., D], weight?, bias?; eps) over the last axis; biased variance, as torch. */
int32_t xo_shape_layernorm(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0), *w, *b;
    double eps;
    if (!x || xo_attr_num(c, 0, &eps))
        return XBITC_E_ARGUMENT;
    if (!is_f32(x, -1) || x->rank < 1 || opt_vector(c, 1, x->shape[x->rank - 1], &w) ||
        opt_vector(c, 2, x->shape[x->rank - 1], &b))
        return XBITC_E_SHAPE;
    return xo_set_out(c->out, XBITC_F32, x->rank, x->shape);
}

int32_t xo_run_layernorm(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0), *wv = xo_in(c, 1), *bv = xo_in(c, 2);
    const float *w = wv ? wv->data : NULL, *b = bv ? bv->data : NULL;
    double eps;
    xo_attr_num(c, 0, &eps);
    int64_t D = x->shape[x->rank - 1], rows = D ? xb_numel(x) / D : 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *a = (const float *)x->data + r * D;
        float *o = (float *)c->out->data + r * D;
        double sum = 0.0, var = 0.0;
        for (int64_t i = 0; i < D; i++)
            sum += a[i];
        double mean = sum / (double)D;
        for (int64_t i = 0; i < D; i++)
            var += (a[i] - mean) * (a[i] - mean);
        float m = (float)mean, rstd = (float)(1.0 / sqrt(var / (double)D + eps));
        for (int64_t i = 0; i < D; i++) {
            float y = (a[i] - m) * rstd;
            y = w ? y * w[i] : y;
            o[i] = b ? y + b[i] : y;
        }
    }
    return XBITC_OK;
}

/* ------------------------------------------------------------------------------------ rope */

/* rope(x, cos, sin) = x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x[.., h:], x[.., :h]); the output is the
 * broadcast of the three, whose last axis must be x's (D, even). */
int32_t xo_shape_rope(xb_call *c) {
    const xb_value *v[3] = {xo_tensor(c, 0), xo_tensor(c, 1), xo_tensor(c, 2)};
    int32_t rank, st;
    int64_t shape[XO_MAXR];
    if (!v[0] || !v[1] || !v[2])
        return XBITC_E_ARGUMENT;
    if (!is_f32(v[0], -1) || !is_f32(v[1], -1) || !is_f32(v[2], -1) || v[0]->rank < 1)
        return XBITC_E_SHAPE;
    if ((st = xo_broadcast(3, v, &rank, shape)))
        return st;
    if (shape[rank - 1] != v[0]->shape[v[0]->rank - 1] || shape[rank - 1] % 2)
        return XBITC_E_SHAPE;
    return xo_set_out(c->out, XBITC_F32, rank, shape);
}

/* One row of D: y = x*cos + rotate_half(x)*sin; cos and sin step cs, ss along it (1, or 0 when broadcast). */
static void rope_row(const float *restrict x, const float *restrict co, int64_t cs, const float *restrict si,
                     int64_t ss, float *restrict y, int64_t D) {
    int64_t h = D / 2;
    if (cs == 1 && ss == 1) {
        XO_FOR8(i, h, y[i] = x[i] * co[i] + -x[i + h] * si[i];);
        XO_FOR8(i, h, y[i + h] = x[i + h] * co[i + h] + x[i] * si[i + h];);
        return;
    }
    for (int64_t i = 0; i < h; i++)
        y[i] = x[i] * co[i * cs] + -x[i + h] * si[i * ss];
    for (int64_t i = h; i < D; i++)
        y[i] = x[i] * co[i * cs] + x[i - h] * si[i * ss];
}

int32_t xo_run_rope(xb_call *c) {
    const xb_value *v[3] = {xo_tensor(c, 0), xo_tensor(c, 1), xo_tensor(c, 2)};
    xb_value *o = c->out;
    int32_t r = o->rank - 1;
    int64_t D = o->shape[r], st[4][XO_MAXR];
    xo_strides(o->rank, o->shape, st[0]);
    for (int k = 0; k < 3; k++)
        xo_bstrides(v[k], o->rank, o->shape, st[k + 1]);
    int64_t cs = st[2][r], ss = st[3][r]; /* cos and sin along D: 1, or 0 when broadcast */
    xo_iter it;
    xo_iter_init(&it, r, o->shape, 4, st, NULL); /* one element of this walk: one row of D */
    for (int64_t row = 0; row < it.rows; row++, xo_iter_next(&it)) {
        for (int64_t e = 0; e < it.inner; e++)
            rope_row((const float *)v[0]->data + it.off[1] + e * it.istride[1],
                     (const float *)v[1]->data + it.off[2] + e * it.istride[2], cs,
                     (const float *)v[2]->data + it.off[3] + e * it.istride[3], ss,
                     (float *)o->data + it.off[0] + e * it.istride[0], D);
    }
    return XBITC_OK;
}

/* ------------------------------------------------------------------------------------ softmax */

int32_t xo_shape_softmax(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    int64_t dim;
    int32_t d;
    if (!x || xo_attr_int(c, 0, &dim))
        return XBITC_E_ARGUMENT;
    if (!is_f32(x, -1) || xo_axis(dim, x->rank, &d))
        return XBITC_E_SHAPE;
    return xo_set_out(c->out, XBITC_F32, x->rank, x->shape);
}

int32_t xo_run_softmax(xb_call *c) {
    const xb_value *x = xo_tensor(c, 0);
    int32_t d = 0;
    xo_axis(c->attr[0].i, x->rank, &d);
    int64_t n = x->rank ? x->shape[d] : 1, inner = x->rank ? xo_prod(x->shape + d + 1, x->rank - d - 1) : 1;
    int64_t outer = x->rank ? xo_prod(x->shape, d) : 1;
    if (inner == 1) { /* the last axis: contiguous rows (a NaN gives a NaN row through the sum, as torch) */
        for (int64_t a = 0; a < outer; a++) {
            float *o = (float *)c->out->data + a * n;
            memcpy(o, (const float *)x->data + a * n, sizeof(float) * (size_t)n);
            float inv = 1.0f / exp_sum(o, n, row_max(o, n));
            XO_FOR8(i, n, o[i] *= inv;);
        }
        return XBITC_OK;
    }
    for (int64_t a = 0; a < outer; a++) {
        for (int64_t b = 0; b < inner; b++) {
            const float *p = (const float *)x->data + a * n * inner + b;
            float *o = (float *)c->out->data + a * n * inner + b, m = -INFINITY;
            for (int64_t i = 0; i < n; i++) /* a NaN anywhere makes the row NaN, as torch */
                m = p[i * inner] > m || isnan(p[i * inner]) ? p[i * inner] : m;
            double sum = 0.0;
            for (int64_t i = 0; i < n; i++) {
                o[i * inner] = xo_expf(p[i * inner] - m);
                sum += o[i * inner];
            }
            float inv = (float)(1.0 / sum);
            for (int64_t i = 0; i < n; i++)
                o[i * inner] *= inv;
        }
    }
    return XBITC_OK;
}

/* ------------------------------------------------------------------------------------ attention */

/* attention(q [B,Hq,S,D], k [B,Hk,T,D], v [B,Hk,T,Dv], mask?; scale, causal, window): softmax(q kᵀ scale + mask)
 * v. Query head h reads key head h / (Hq/Hk); query i sits at position T-S+i. A query with no key allowed gives
 * zeros, as torch 2.13's sdpa does (ir/core.py's docstring says NaN, which older torch gave).
 * The query rows that share a key head (its Hq/Hk heads, in query order) are split into units of ATT_QB rows, so a
 * decode step still fills a unit. Task t takes units t, t + tasks, ... (early and late queries alike, so causal work
 * balances) with its own scratch slice: ATT_QB rows of T scores. */
typedef struct att_job {
    const float *q, *k, *v;
    const void *mask;
    int32_t mask_dt, causal;
    float *out, *scratch;
    float scale;
    int64_t B, Hq, Hk, S, T, D, Dv, window, qblocks, units, tasks, slice;
    int64_t ks[4], vs[4], ms[4];
} att_job;

static int32_t att_plan(const xb_call *c, att_job *j) {
    const xb_value *q = xo_tensor(c, 0), *k = xo_tensor(c, 1), *v = xo_tensor(c, 2), *m = xo_in(c, 3);
    int64_t causal, window;
    double scale = 0.0;
    if (!q || !k || !v || xo_attr_int(c, 1, &causal) || xo_attr_int(c, 2, &window) ||
        (c->nattr < 1 || (c->attr[0].kind != XB_A_NONE && xo_attr_num(c, 0, &scale))))
        return XBITC_E_ARGUMENT;
    if (!is_f32(q, 4) || !is_f32(k, 4) || !is_f32(v, 4) || window < 0)
        return XBITC_E_SHAPE;
    memset(j, 0, sizeof *j);
    j->B = q->shape[0], j->Hq = q->shape[1], j->S = q->shape[2], j->D = q->shape[3];
    j->Hk = k->shape[1], j->T = k->shape[2], j->Dv = v->shape[3];
    if (k->shape[0] != j->B || v->shape[0] != j->B || v->shape[1] != j->Hk || v->shape[2] != j->T ||
        k->shape[3] != j->D || j->Hk < 1 || j->Hq % j->Hk)
        return XBITC_E_SHAPE;
    int64_t full[4] = {j->B, j->Hq, j->S, j->T};
    if (m) {
        if (m->rank < 0 || m->rank > 4 || (m->dtype != XBITC_BOOL && m->dtype != XBITC_F32))
            return XBITC_E_SHAPE;
        for (int32_t d = 0; d < m->rank; d++)
            if (m->shape[d] != 1 && m->shape[d] != full[4 - m->rank + d])
                return XBITC_E_SHAPE;
        xo_bstrides(m, 4, full, j->ms);
        j->mask = m->data;
        j->mask_dt = m->dtype;
    }
    /* views into a cache carry strides (innermost 1); a value without them (innermost 0) is contiguous */
    if (k->stride[3] == 1)
        memcpy(j->ks, k->stride, sizeof j->ks);
    else
        xo_strides(4, k->shape, j->ks);
    if (v->stride[3] == 1)
        memcpy(j->vs, v->stride, sizeof j->vs);
    else
        xo_strides(4, v->shape, j->vs);
    j->q = q->data, j->k = k->data, j->v = v->data;
    j->causal = causal != 0;
    j->window = window;
    j->scale = c->attr[0].kind == XB_A_NONE ? (float)(1.0 / sqrt((double)j->D)) : (float)scale;
    j->qblocks = (j->Hq / j->Hk * j->S + ATT_QB - 1) / ATT_QB;
    j->units = j->B * j->Hk * j->qblocks;
    j->tasks = j->units < ATT_TASKS ? j->units : ATT_TASKS;
    j->slice = (ATT_QB * j->T + 15) / 16 * 16; /* floats, a multiple of 64 bytes */
    return XBITC_OK;
}

int32_t xo_shape_attention(xb_call *c) {
    att_job j;
    int32_t st = att_plan(c, &j);
    if (st)
        return st;
    int64_t shape[4] = {j.B, j.Hq, j.S, j.Dv};
    if ((st = xo_set_out(c->out, XBITC_F32, 4, shape)))
        return st;
    c->scratch_bytes = (uint64_t)j.tasks * (uint64_t)j.slice * sizeof(float);
    return XBITC_OK;
}

/* Softmax in place of one query's scores over keys [lo, hi) of its unit: keys outside what causal and window let
 * it read, or where the mask says no, get weight 0 (a float mask adds to the scores); returns 1 / sum. */
static float att_softmax(const att_job *j, float *restrict s, const char *mrow, int64_t qpos, int64_t lo,
                         int64_t hi) {
    int64_t a = lo, b = hi;
    if (j->causal && qpos + 1 < b)
        b = qpos + 1 > a ? qpos + 1 : a;
    if (j->window > 0 && qpos - j->window + 1 > a)
        a = qpos - j->window + 1 < b ? qpos - j->window + 1 : b;
    if (mrow && j->mask_dt == XBITC_BOOL) {
        for (int64_t key = a; key < b; key++)
            s[key] = ((const uint8_t *)mrow)[key * j->ms[3]] ? s[key] : -INFINITY;
    } else if (mrow) {
        for (int64_t key = a; key < b; key++)
            s[key] += ((const float *)mrow)[key * j->ms[3]];
    }
    for (int64_t key = lo; key < a; key++)
        s[key] = 0.0f;
    for (int64_t key = b; key < hi; key++)
        s[key] = 0.0f;
    float m = row_max(s + a, b - a);
    if (m == -INFINITY) { /* nothing allowed: zeros, as torch's sdpa */
        for (int64_t key = a; key < b; key++)
            s[key] = 0.0f;
        return 0.0f;
    }
    return 1.0f / exp_sum(s + a, b - a, m);
}

/* acc[qi][l] = sum over keys [lo, hi) of p[qi * T + key] * v[key * vstride + l], l < w <= 8: for w = 8 the
 * four rows' sums stay in registers, each v element loaded feeding four products. */
static void att_pv(const float *p, int64_t T, const float *v, int64_t vstride, int64_t lo, int64_t hi, int64_t w,
                   float acc[ATT_QB][8]) {
    memset(acc, 0, sizeof(float) * ATT_QB * 8);
#ifdef XO_V4
    if (w == 8) {
        xo_v4 c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0}, c4 = {0}, c5 = {0}, c6 = {0}, c7 = {0};
        for (int64_t key = lo; key < hi; key++) { /* rows written out, as in mm_tile */
            xo_v4 v0 = xo_load4(v + key * vstride), v1 = xo_load4(v + key * vstride + 4);
            c0 += p[key] * v0, c1 += p[key] * v1;
            c2 += p[T + key] * v0, c3 += p[T + key] * v1;
            c4 += p[2 * T + key] * v0, c5 += p[2 * T + key] * v1;
            c6 += p[3 * T + key] * v0, c7 += p[3 * T + key] * v1;
        }
        xo_v4 c[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
        memcpy(acc, c, sizeof c);
        return;
    }
#endif
    for (int64_t key = lo; key < hi; key++)
        for (int qi = 0; qi < ATT_QB; qi++)
            for (int64_t l = 0; l < w; l++)
                acc[qi][l] += p[qi * T + key] * v[key * vstride + l];
}

static void att_unit(const att_job *j, int64_t u, float *sc) {
    int64_t g = j->Hq / j->Hk, rows = g * j->S, b = u / (j->Hk * j->qblocks), kh = u / j->qblocks % j->Hk;
    int64_t r0 = u % j->qblocks * ATT_QB, nq = rows - r0 < ATT_QB ? rows - r0 : ATT_QB, T = j->T, Dv = j->Dv;
    int64_t lo = 0, hi = T, qpos[ATT_QB];
    const float *kb = j->k + b * j->ks[0] + kh * j->ks[1], *vb = j->v + b * j->vs[0] + kh * j->vs[1], *q[ATT_QB];
    float *o[ATT_QB], inv[ATT_QB] = {0};
    for (int64_t qi = 0; qi < ATT_QB; qi++) { /* a short unit repeats its last row; the copies are dropped */
        int64_t r = r0 + (qi < nq ? qi : nq - 1), i = r / g, h = kh * g + r % g;
        qpos[qi] = T - j->S + i;
        q[qi] = j->q + ((b * j->Hq + h) * j->S + i) * j->D;
        o[qi] = j->out + ((b * j->Hq + h) * j->S + i) * Dv;
    }
    if (j->causal) /* keys any row of the unit may read: rows run in query order */
        hi = qpos[nq - 1] + 1 < T ? (qpos[nq - 1] + 1 > 0 ? qpos[nq - 1] + 1 : 0) : T;
    if (j->window > 0 && qpos[0] - j->window + 1 > 0)
        lo = qpos[0] - j->window + 1 < hi ? qpos[0] - j->window + 1 : hi;
    for (int64_t key = lo; key < hi; key++) { /* each key row read once for the unit's ATT_QB rows */
        float d[ATT_QB];
        dot4(kb + key * j->ks[2], q, j->D, d);
        for (int qi = 0; qi < ATT_QB; qi++)
            sc[qi * T + key] = d[qi] * j->scale;
    }
    for (int64_t qi = 0; qi < nq; qi++) {
        int64_t r = r0 + qi, i = r / g, h = kh * g + r % g, moff = b * j->ms[0] + h * j->ms[1] + i * j->ms[2];
        const char *mrow = j->mask ? (const char *)j->mask + moff * (j->mask_dt == XBITC_F32 ? 4 : 1) : NULL;
        inv[qi] = att_softmax(j, sc + qi * T, mrow, qpos[qi], lo, hi);
    }
    for (int64_t d0 = 0; d0 < Dv; d0 += 8) { /* out = p v, eight columns of the unit's rows at a time */
        float acc[ATT_QB][8];
        att_pv(sc, T, vb + d0, j->vs[2], lo, hi, Dv - d0 < 8 ? Dv - d0 : 8, acc);
        for (int64_t qi = 0; qi < nq; qi++)
            for (int64_t l = 0; l < 8 && d0 + l < Dv; l++)
                o[qi][d0 + l] = acc[qi][l] * inv[qi];
    }
}

static void att_task(void *arg, int64_t t) {
    const att_job *j = arg;
    for (int64_t u = t; u < j->units; u += j->tasks)
        att_unit(j, u, j->scratch + t * j->slice);
}

int32_t xo_run_attention(xb_call *c) {
    att_job j;
    att_plan(c, &j);
    j.out = c->out->data;
    j.scratch = c->scratch;
    if (j.units > 0)
        xb_parallel(c->exec, att_task, &j, j.tasks);
    return XBITC_OK;
}
