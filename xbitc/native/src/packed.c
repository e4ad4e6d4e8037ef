/* The packed matrix product over row-lane records (backends/product.py, f32 layout), and packed-table rows.
 *
 * Where the library is built with a CPU family's generated kernels (XBITC_KERNELS_X86_64 / _AARCH64 /
 * _APPLE_ARM64: the export links the objects of every level), the best level the CPU supports runs; elsewhere the C
 * renderer's kernels, which read the same layout, do. Rows are split in ranges of whole 16-row blocks over the caller's threads. */
#include <string.h>

#include "internal.h"
#include "kernel_abi.h"

#define LANES 16 /* rows of a row block (PackedProduct.lanes) */
#define Q8_TASKS 8 /* the most tasks a q8 product is split into: each needs its own scratch, planned per call */
#define GEMM_STACK_BYTES (256 << 10) /* the generated gemm keeps per-token sums on the stack: chunk tokens */

typedef void (*gemv_fn)(const int64_t *rec, int64_t nrec, const float *x, const int32_t *perm, float *y,
                        int64_t rows_begin, int64_t rows_end);
typedef void (*gemm_fn)(const int64_t *rec, int64_t nrec, const float *x, float *y, int64_t rows_begin,
                        int64_t rows_end, int64_t batch, int64_t ldx, int64_t ldy);
typedef void (*q8_fn)(const int64_t *rec, int64_t nrec, const float *x, const int32_t *perm, float *y,
                      int64_t rows_begin, int64_t rows_end, int64_t batch, int64_t ldx, int64_t ldy, int8_t *scratch);

/* Rendered from the packed product's description by backends/cstyle (build.py writes them into the library). */
void xbitc_rows_gemv_portable(const int64_t *, int64_t, const float *, const int32_t *, float *, int64_t, int64_t);
void xbitc_rows_gemm_portable(const int64_t *, int64_t, const float *, float *, int64_t, int64_t, int64_t, int64_t,
                              int64_t);
void xbitc_rows_dequant_portable(const int64_t *, int64_t, const int32_t *, int64_t, int64_t, float *);

#define DECLARE(level) XB_DECLARE_KERNELS(level)
#define PICK(level)                                                                                              \
    do {                                                                                                         \
        *gemv = xbitc_rows_gemv_##level;                                                                         \
        *gemm = xbitc_rows_gemm_##level;                                                                         \
        *q8 = xbitc_rows_q8_##level;                                                                             \
        *name = #level;                                                                                          \
    } while (0)

#if defined(XBITC_KERNELS_X86_64)
DECLARE(x86_64)
DECLARE(avx2)
DECLARE(avx512)

/* The generated kernels for the best level this CPU runs (the levels of backends/cpu/targets.py). */
static void host_kernels(gemv_fn *gemv, gemm_fn *gemm, q8_fn *q8, const char **name) {
    __builtin_cpu_init();
    int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
             __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("f16c");
    int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512cd");
    if (v4)
        PICK(avx512);
    else if (v3)
        PICK(avx2);
    else
        PICK(x86_64);
}

int xb_packed_runs(int64_t act) { return act == 0 || act == 1; }
#elif defined(XBITC_KERNELS_AARCH64)
#include <sys/auxv.h>
DECLARE(neon)
DECLARE(dotprod)
DECLARE(i8mm)

/* The kernels for the best level the CPU reports (Linux and Android: HWCAP_ASIMDDP, HWCAP2_I8MM). */
static void host_kernels(gemv_fn *gemv, gemm_fn *gemm, q8_fn *q8, const char **name) {
    int dot = (getauxval(AT_HWCAP) & (1UL << 20)) != 0;
    int i8mm = dot && (getauxval(AT_HWCAP2) & (1UL << 13)) != 0;
    if (i8mm)
        PICK(i8mm);
    else if (dot)
        PICK(dotprod);
    else
        PICK(neon);
}

int xb_packed_runs(int64_t act) { return act == 0 || act == 1; }
#elif defined(XBITC_KERNELS_APPLE_ARM64)
/* <sys/sysctl.h>'s declaration, written out so the sources also compile (checked) where no Apple SDK is. */
int sysctlbyname(const char *name, void *oldp, size_t *oldlenp, void *newp, size_t newlen);
DECLARE(neon)
DECLARE(dotprod)
DECLARE(i8mm)

static int apple_feature(const char *name) {
    int value = 0;
    size_t size = sizeof value;
    return sysctlbyname(name, &value, &size, NULL, 0) == 0 && value != 0;
}

/* The kernels for the best level the CPU reports (macOS 12+ / iOS 15+ name Arm features in sysctl: M1 has dot
 * products, M2 and later int8 matrix multiply). */
static void host_kernels(gemv_fn *gemv, gemm_fn *gemm, q8_fn *q8, const char **name) {
    int dot = apple_feature("hw.optional.arm.FEAT_DotProd");
    if (dot && apple_feature("hw.optional.arm.FEAT_I8MM"))
        PICK(i8mm);
    else if (dot)
        PICK(dotprod);
    else
        PICK(neon);
}

int xb_packed_runs(int64_t act) { return act == 0 || act == 1; }
#elif defined(XBITC_KERNELS_PINNED)
DECLARE(pinned)

/* One level, chosen when the library was built (--cpu): run whatever this CPU is. */
static void host_kernels(gemv_fn *gemv, gemm_fn *gemm, q8_fn *q8, const char **name) { PICK(pinned); }

int xb_packed_runs(int64_t act) { return act == 0 || act == 1; }
#else
static void host_kernels(gemv_fn *gemv, gemm_fn *gemm, q8_fn *q8, const char **name) {
    *gemv = xbitc_rows_gemv_portable;
    *gemm = xbitc_rows_gemm_portable;
    *q8 = NULL; /* the C renderer renders f32 activations only */
    *name = "portable";
}

int xb_packed_runs(int64_t act) { return act == 0; }
#endif

typedef struct job {
    const xb_packed *w;
    const float *x;  /* unpermuted for gemv / portable; permuted [T, in] for gemm */
    float *y;
    int64_t T, blocks_per_task;
    gemv_fn gemv;
    gemm_fn gemm;
    q8_fn q8;
    uint8_t *scratch; /* q8: q8_task_bytes per task */
    uint64_t task_bytes;
} job;

static void run_range(void *arg, int64_t task) {
    const job *j = arg;
    const xb_packed *w = j->w;
    int64_t rb = task * j->blocks_per_task * LANES, re = rb + j->blocks_per_task * LANES;
    if (re > w->out)
        re = w->out;
    if (rb >= re)
        return;
    if (w->act) {
        j->q8(w->rec, w->nrec, j->x, w->perm, j->y, rb, re, j->T, w->in, w->out,
              (int8_t *)(j->scratch + (uint64_t)task * j->task_bytes));
    } else if (j->T == 1) {
        j->gemv(w->rec, w->nrec, j->x, w->perm, j->y, rb, re);
    } else {
        int64_t chunk = GEMM_STACK_BYTES / (4 * w->nrec + 128);
        if (chunk < 1)
            chunk = 1;
        for (int64_t t0 = 0; t0 < j->T; t0 += chunk) {
            int64_t n = j->T - t0 < chunk ? j->T - t0 : chunk;
            j->gemm(w->rec, w->nrec, j->x + t0 * w->in, j->y + t0 * w->out, rb, re, n, w->in, w->out);
        }
    }
}

/* What one q8 call needs (rowlane.q8_scratch_bytes, 1-bit records counted with room for lookup tables): int8 x
 * per record padded to whole blocks, two floats per record and token; rounded to keep tasks 64-byte aligned. */
static uint64_t q8_task_bytes(const xb_packed *w, int64_t T) {
    uint64_t per = 0;
    for (int64_t k = 0; k < w->nrec; k++) {
        const int64_t *r = w->rec + 7 * k;
        per += (uint64_t)((r[1] + 31) / 32 * 32) * (r[0] == 1 ? 9 : 1) + 8;
    }
    return ((uint64_t)T * per + 64 + 63) / 64 * 64;
}

uint64_t xb_packed_scratch(const xb_packed *w, int64_t T) {
    if (w->act)
        return Q8_TASKS * q8_task_bytes(w, T);
    return w->perm && T > 1 ? (uint64_t)T * (uint64_t)w->in * sizeof(float) : 0;
}

int32_t xb_packed_matmul(const xb_packed *w, const float *x, int64_t T, float *y, void *scratch,
                         const xbitc_exec *exec) {
    job j = {w, x, y, T, 0, NULL, NULL, NULL, scratch, w->act ? q8_task_bytes(w, T) : 0};
    const char *level;
    host_kernels(&j.gemv, &j.gemm, &j.q8, &level);
    if (w->nrec == 0) { /* every column at 0 bits */
        memset(y, 0, (size_t)(T * w->out) * sizeof(float));
        return XBITC_OK;
    }
    if (T > 1 && w->perm && !w->act) { /* gemm reads x already permuted (q8 gathers itself) */
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
    if (w->act && tasks > Q8_TASKS)
        tasks = Q8_TASKS;
    j.blocks_per_task = (blocks + tasks - 1) / tasks;
    tasks = (blocks + j.blocks_per_task - 1) / j.blocks_per_task;
    if (tasks == 1)
        run_range(&j, 0);
    else
        xb_parallel(exec, run_range, &j, tasks);
    return XBITC_OK;
}

int32_t xb_packed_rows(const xb_packed *w, const int64_t *rows, int64_t n, float *out) {
    if (w->act) /* rows decode from the f32 layout; the writer keeps embedding tables in it */
        return XBITC_E_UNSUPPORTED;
    for (int64_t i = 0; i < n; i++) {
        if (rows[i] < 0 || rows[i] >= w->out)
            return XBITC_E_SHAPE;
        xbitc_rows_dequant_portable(w->rec, w->nrec, w->perm, rows[i], w->in, out + i * w->in);
    }
    return XBITC_OK;
}

const char *xbitc_kernels(void) {
    gemv_fn gemv;
    gemm_fn gemm;
    q8_fn q8;
    const char *level;
    host_kernels(&gemv, &gemm, &q8, &level);
    return level;
}
