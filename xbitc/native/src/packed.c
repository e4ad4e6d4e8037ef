/* The packed matrix product over row-lane records (backends/llvm/rowlane.py, f32 layout), and packed-table rows.
 *
 * Where the library is built with the generated x86-64 kernels (XBITC_KERNELS_X86_64: the export links the
 * objects of every level), the best level the CPU supports runs; elsewhere the portable loops below, which read the
 * same layout, do. Rows are split in ranges of whole 16-row blocks over the caller's threads. */
#include <string.h>

#include "internal.h"

#define LANES 16
#define BLOCK_COLS 32
#define BYTES_KIND 9
#define GEMM_STACK_BYTES (256 << 10) /* the generated gemm keeps per-token sums on the stack: chunk tokens */

typedef void (*gemv_fn)(const int64_t *rec, int64_t nrec, const float *x, const int32_t *perm, float *y,
                        int64_t rows_begin, int64_t rows_end);
typedef void (*gemm_fn)(const int64_t *rec, int64_t nrec, const float *x, float *y, int64_t rows_begin,
                        int64_t rows_end, int64_t batch, int64_t ldx, int64_t ldy);

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalise */
        exp = 113;
        while (!(man & 1024)) {
            man <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((man & 1023) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Code j (0 <= j < ncols) of lane `lane` in a record's row block starting at `codes`. */
static uint32_t code_at(const uint8_t *codes, int64_t kind, int64_t j, int lane) {
    if (kind == BYTES_KIND)
        return codes[j * LANES + lane];
    int64_t cb = j / BLOCK_COLS, bit = (j % BLOCK_COLS) * kind;
    const uint8_t *base = codes + (cb * kind * LANES + lane) * 4;
    uint32_t w0, w1 = 0;
    int64_t w = bit / 32, shift = bit % 32;
    memcpy(&w0, base + w * LANES * 4, 4);
    if (shift + kind > 32)
        memcpy(&w1, base + (w + 1) * LANES * 4, 4);
    uint64_t both = ((uint64_t)w1 << 32) | w0;
    return (uint32_t)(both >> shift) & ((1u << kind) - 1);
}

static void record_scale_zero(const int64_t *r, int64_t rb, int lane, float *s, float *z) {
    uint16_t h;
    memcpy(&h, (const uint8_t *)(intptr_t)r[3] + rb * r[6] + 2 * lane, 2);
    *s = half_to_float(h);
    *z = (float)((const uint8_t *)(intptr_t)r[4])[rb * r[6] + lane];
}

/* Portable product of rows [rb, re) for one token; x unpermuted (perm gathers). */
static void portable_gemv(const xb_packed *w, const float *x, float *y, int64_t rb, int64_t re) {
    for (int64_t row = rb; row < re && row < w->out; row++) {
        int64_t blk = row / LANES;
        int lane = (int)(row % LANES);
        float acc = 0;
        for (int64_t k = 0; k < w->nrec; k++) {
            const int64_t *r = w->rec + 7 * k;
            const uint8_t *codes = (const uint8_t *)(intptr_t)r[2] + blk * r[6];
            float s, z, dot = 0, sum = 0;
            record_scale_zero(r, blk, lane, &s, &z);
            for (int64_t j = 0; j < r[1]; j++) {
                int64_t col = r[5] + j;
                float xv = x[w->perm ? w->perm[col] : col];
                dot += (float)code_at(codes, r[0], j, lane) * xv;
                sum += xv;
            }
            acc += s * dot - s * z * sum;
        }
        y[row] = acc;
    }
}

#ifdef XBITC_KERNELS_X86_64
#define DECLARE(level)                                                                                           \
    void xbitc_rows_gemv_##level(const int64_t *, int64_t, const float *, const int32_t *, float *, int64_t,    \
                                 int64_t);                                                                       \
    void xbitc_rows_gemm_##level(const int64_t *, int64_t, const float *, float *, int64_t, int64_t, int64_t,   \
                                 int64_t, int64_t);
DECLARE(x86_64)
DECLARE(avx2)
DECLARE(avx512)

/* The generated kernels for the best level this CPU runs (the levels of backends/cpu/targets.py). */
static void host_kernels(gemv_fn *gemv, gemm_fn *gemm) {
    __builtin_cpu_init();
    int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
             __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
    int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512cd");
    *gemv = v4 ? xbitc_rows_gemv_avx512 : v3 ? xbitc_rows_gemv_avx2 : xbitc_rows_gemv_x86_64;
    *gemm = v4 ? xbitc_rows_gemm_avx512 : v3 ? xbitc_rows_gemm_avx2 : xbitc_rows_gemm_x86_64;
}
#else
static void host_kernels(gemv_fn *gemv, gemm_fn *gemm) {
    *gemv = NULL;
    *gemm = NULL;
}
#endif

typedef struct job {
    const xb_packed *w;
    const float *x;  /* unpermuted for gemv / portable; permuted [T, in] for gemm */
    float *y;
    int64_t T, blocks_per_task;
    gemv_fn gemv;
    gemm_fn gemm;
} job;

static void run_range(void *arg, int64_t task) {
    const job *j = arg;
    const xb_packed *w = j->w;
    int64_t rb = task * j->blocks_per_task * LANES, re = rb + j->blocks_per_task * LANES;
    if (re > w->out)
        re = w->out;
    if (rb >= re)
        return;
    if (j->T == 1 && j->gemv) {
        j->gemv(w->rec, w->nrec, j->x, w->perm, j->y, rb, re);
    } else if (j->gemm) {
        int64_t chunk = GEMM_STACK_BYTES / (4 * w->nrec + 128);
        if (chunk < 1)
            chunk = 1;
        for (int64_t t0 = 0; t0 < j->T; t0 += chunk) {
            int64_t n = j->T - t0 < chunk ? j->T - t0 : chunk;
            j->gemm(w->rec, w->nrec, j->x + t0 * w->in, j->y + t0 * w->out, rb, re, n, w->in, w->out);
        }
    } else {
        for (int64_t t = 0; t < j->T; t++)
            portable_gemv(w, j->x + t * w->in, j->y + t * w->out, rb, re);
    }
}

uint64_t xb_packed_scratch(const xb_packed *w, int64_t T) {
    return w->perm && T > 1 ? (uint64_t)T * (uint64_t)w->in * sizeof(float) : 0;
}

int32_t xb_packed_matmul(const xb_packed *w, const float *x, int64_t T, float *y, void *scratch,
                         const xbitc_exec *exec) {
    job j = {w, x, y, T, 0, NULL, NULL};
    host_kernels(&j.gemv, &j.gemm);
    if (w->nrec == 0) { /* every column at 0 bits */
        memset(y, 0, (size_t)(T * w->out) * sizeof(float));
        return XBITC_OK;
    }
    if (T > 1 && j.gemm && w->perm) { /* the generated gemm reads x already permuted */
        float *xp = scratch;
        for (int64_t t = 0; t < T; t++)
            for (int64_t c = 0; c < w->in; c++)
                xp[t * w->in + c] = x[t * w->in + w->perm[c]];
        j.x = xp;
    }
    int64_t blocks = (w->out + LANES - 1) / LANES;
    /* ~64k multiply-adds a task at least: smaller tasks cost more to hand out than they save */
    int64_t work = T * w->in * LANES, tasks = xb_threads(exec);
    if (tasks > blocks)
        tasks = blocks;
    if (tasks > 1 && work * blocks / tasks < 65536)
        tasks = work * blocks / 65536 > 1 ? work * blocks / 65536 : 1;
    if (tasks < 1)
        tasks = 1;
    j.blocks_per_task = (blocks + tasks - 1) / tasks;
    tasks = (blocks + j.blocks_per_task - 1) / j.blocks_per_task;
    if (tasks == 1)
        run_range(&j, 0);
    else
        xb_parallel(exec, run_range, &j, tasks);
    return XBITC_OK;
}

int32_t xb_packed_rows(const xb_packed *w, const int64_t *rows, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        int64_t row = rows[i];
        if (row < 0 || row >= w->out)
            return XBITC_E_SHAPE;
        float *dst = out + i * w->in;
        memset(dst, 0, (size_t)w->in * sizeof(float)); /* 0-bit columns have no record: weight 0 */
        int64_t blk = row / LANES;
        int lane = (int)(row % LANES);
        for (int64_t k = 0; k < w->nrec; k++) {
            const int64_t *r = w->rec + 7 * k;
            const uint8_t *codes = (const uint8_t *)(intptr_t)r[2] + blk * r[6];
            float s, z;
            record_scale_zero(r, blk, lane, &s, &z);
            for (int64_t j = 0; j < r[1]; j++) {
                int64_t col = r[5] + j;
                dst[w->perm ? w->perm[col] : col] = s * ((float)code_at(codes, r[0], j, lane) - z);
            }
        }
    }
    return XBITC_OK;
}
