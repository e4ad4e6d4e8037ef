/* Speed of an exported model through the C library: prefill and decode tokens per second, as llama-bench measures
 * them (pp: one feed of P prompt tokens into an empty session; tg: D tokens generated one at a time from an empty
 * session), medians of REPS runs.
 *   speed MODEL.bin THREADS P D REPS     prints: prefill_tok_s decode_tok_s */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "xbitc.h"

static void *alloc64(uint64_t n) { return aligned_alloc(64, (n + 63) / 64 * 64); }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#define CHECK(call)                                                                                               \
    do {                                                                                                          \
        int32_t s_ = (call);                                                                                      \
        if (s_) {                                                                                                 \
            fprintf(stderr, "%s: %s\n", #call, xbitc_status_text(s_));                                            \
            return 1;                                                                                             \
        }                                                                                                         \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 6)
        return 2;
    int threads = atoi(argv[2]), P = atoi(argv[3]), D = atoi(argv[4]), reps = atoi(argv[5]);
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st))
        return 1;
    void *bin = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    uint64_t bytes;
    xbitc_model *m;
    CHECK(xbitc_model_bytes(bin, (uint64_t)st.st_size, &bytes));
    CHECK(xbitc_model_open(bin, (uint64_t)st.st_size, alloc64(bytes), bytes, &m));
    xbitc_info info;
    xbitc_model_info(m, &info);
    uint64_t pb = info.plan_bytes + 160 * (2 * (uint64_t)info.layers + 1) + 128;
    int64_t cap = P > D ? P : D;
    CHECK(xbitc_lm_bytes(m, cap, P, alloc64(pb), pb, &bytes));
    xbitc_lm *lm;
    CHECK(xbitc_lm_init(m, cap, P, alloc64(bytes), bytes, &lm));
    xbitc_pool *pool;
    CHECK(xbitc_pool_start(threads, alloc64(xbitc_pool_bytes(threads)), xbitc_pool_bytes(threads), &pool));
    xbitc_exec exec = xbitc_pool_exec(pool);
    int64_t *ids = malloc(sizeof(int64_t) * (size_t)cap);
    for (int64_t i = 0; i < cap; i++)
        ids[i] = (i * 7919 + 13) % info.vocab;
    float *logits = malloc(sizeof(float) * (size_t)info.vocab);
    double *pre = malloc(sizeof(double) * (size_t)(reps + 1)), *step = malloc(sizeof(double) * (size_t)(reps * D + 1));
    int n_step = 0;
    for (int r = -1; r < reps; r++) { /* r = -1 warms up (page faults of the mapped weights) */
        xbitc_lm_reset(lm);
        double t = now();
        CHECK(xbitc_lm_feed(lm, ids, P, logits, &exec));
        if (r >= 0)
            pre[r] = now() - t;
        xbitc_lm_reset(lm);
        for (int d = 0; d < D; d++) {
            t = now();
            CHECK(xbitc_lm_feed(lm, &ids[d], 1, logits, &exec));
            if (r >= 0)
                step[n_step++] = now() - t;
        }
    }
    printf("%.3f %.3f\n", P / median(pre, reps), 1.0 / median(step, n_step));
    xbitc_pool_stop(pool);
    return 0;
}
