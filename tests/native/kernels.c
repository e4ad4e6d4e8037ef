/* Calls one level's generated row-lane kernels on many cases from a file, so a whole property test is one launch
 * (under qemu for another ISA). Written by tests/test_native_arm.py:
 *   kernels LEVEL CASES OUT
 * CASES: int64 count, then per case int64 act (0 f32, 1 q8), rows, in, nrec, batch, has_perm, buf_bytes; the records
 * (nrec x 7 int64, addresses as offsets into the buffer); the buffer (padded to 8 bytes); the permutation (int32,
 * padded to 8 bytes) if any; x (batch x in float32). OUT: y (batch x rows float32) per case. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_abi.h" /* from xbitc/native/src */
#define DECLARE(level) XB_DECLARE_KERNELS(level)
#define ENTRY(level) {#level, xbitc_rows_gemv_##level, xbitc_rows_gemm_##level, xbitc_rows_q8_##level},
#include "kernel_levels.h" /* LEVELS(X): the family's levels, written by the test */
LEVELS(DECLARE)

typedef struct level {
    const char *name;
    void (*gemv)(const int64_t *, int64_t, const float *, const int32_t *, float *, int64_t, int64_t);
    void (*gemm)(const int64_t *, int64_t, const float *, float *, int64_t, int64_t, int64_t, int64_t, int64_t);
    void (*q8)(const int64_t *, int64_t, const float *, const int32_t *, float *, int64_t, int64_t, int64_t, int64_t,
               int64_t, int8_t *);
} level;
static const level LEVEL_TABLE[] = {LEVELS(ENTRY)};

static void *read_all(FILE *f, size_t n) {
    void *p = aligned_alloc(64, (n + 63) / 64 * 64 + 64);
    if (fread(p, 1, n, f) != n)
        exit(3);
    return p;
}

int main(int argc, char **argv) {
    if (argc != 4)
        return 2;
    const level *lv = NULL;
    for (size_t i = 0; i < sizeof LEVEL_TABLE / sizeof *LEVEL_TABLE; i++)
        if (!strcmp(LEVEL_TABLE[i].name, argv[1]))
            lv = &LEVEL_TABLE[i];
    FILE *in = fopen(argv[2], "rb"), *out = fopen(argv[3], "wb");
    if (!lv || !in || !out)
        return 2;
    int64_t count;
    if (fread(&count, 8, 1, in) != 1)
        return 3;
    for (int64_t c = 0; c < count; c++) {
        int64_t h[7];
        if (fread(h, 8, 7, in) != 7)
            return 3;
        int64_t act = h[0], rows = h[1], inp = h[2], nrec = h[3], batch = h[4], has_perm = h[5], nbuf = h[6];
        int64_t *rec = read_all(in, (size_t)(nrec * 56));
        uint8_t *buf = read_all(in, (size_t)((nbuf + 7) / 8 * 8));
        int32_t *perm = has_perm ? read_all(in, (size_t)((inp * 4 + 7) / 8 * 8)) : NULL;
        float *x = read_all(in, (size_t)(batch * inp * 4)), *y = calloc((size_t)(batch * rows), 4);
        for (int64_t k = 0; k < nrec; k++) /* offsets -> addresses */
            for (int f = 2; f <= 4; f++)
                rec[7 * k + f] += (int64_t)(intptr_t)buf;
        if (act) {
            int64_t per = 0;
            for (int64_t k = 0; k < nrec; k++)
                per += (rec[7 * k + 1] + 31) / 32 * 32 * (rec[7 * k] == 1 ? 9 : 1) + 8;
            int8_t *scratch = aligned_alloc(64, (size_t)((batch * per + 64 + 63) / 64 * 64));
            lv->q8(rec, nrec, x, perm, y, 0, rows, batch, inp, rows, scratch);
            free(scratch);
        } else if (batch == 1) {
            lv->gemv(rec, nrec, x, perm, y, 0, rows);
        } else {
            float *xp = malloc((size_t)(batch * inp) * 4);
            for (int64_t t = 0; t < batch; t++)
                for (int64_t j = 0; j < inp; j++)
                    xp[t * inp + j] = x[t * inp + (perm ? perm[j] : j)];
            lv->gemm(rec, nrec, xp, y, 0, rows, batch, inp, rows);
            free(xp);
        }
        fwrite(y, 4, (size_t)(batch * rows), out);
        free(rec), free(buf), free(perm), free(x), free(y);
    }
    fclose(out);
    return 0;
}
