/* Test driver for the C runtime: runs a graph or a generating session on tensors in files and writes the results.
 *   driver graph MODEL G THREADS OUT IN...      run graph G on the inputs; write its outputs
 *   driver lm MODEL PROMPT STEPS THREADS OUT    feed the prompt, then STEPS greedy tokens one at a time; write the
 *                                               last-token logits of every feed [STEPS+1, V] and the tokens
 *   driver open MODEL                           open only (status of a corrupt file)
 * Tensor files: int32 dtype, int32 rank, int64 shape[rank], then the data. Exit status: the xbitc status. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xbitc.h"

static void *aligned(uint64_t n) { return aligned_alloc(64, (n + 63) / 64 * 64 + 64); }

static void *slurp(const char *path, uint64_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    *n = (uint64_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    void *b = aligned(*n);
    if (fread(b, 1, *n, f) != *n) {
        fclose(f);
        return NULL;
    }
    fclose(f);
    return b;
}

static size_t esize(int32_t d) { return d == XBITC_F32 ? 4 : d == XBITC_I64 ? 8 : 1; }

static uint64_t numel(const xbitc_tensor *t) {
    uint64_t n = 1;
    for (int k = 0; k < t->rank; k++)
        n *= (uint64_t)t->shape[k];
    return n;
}

static int read_tensor(const char *path, xbitc_tensor *t) {
    FILE *f = fopen(path, "rb");
    if (!f || fread(&t->dtype, 4, 1, f) != 1 || fread(&t->rank, 4, 1, f) != 1 ||
        fread(t->shape, 8, (size_t)t->rank, f) != (size_t)t->rank)
        return 0;
    uint64_t bytes = numel(t) * esize(t->dtype);
    t->data = aligned(bytes);
    int ok = fread(t->data, 1, bytes, f) == bytes;
    fclose(f);
    return ok;
}

static void write_tensor(FILE *f, const xbitc_tensor *t) {
    fwrite(&t->dtype, 4, 1, f);
    fwrite(&t->rank, 4, 1, f);
    fwrite(t->shape, 8, (size_t)t->rank, f);
    fwrite(t->data, esize(t->dtype), numel(t), f);
}

static int fail(int32_t st, const char *what) {
    fprintf(stderr, "%s: %s\n", what, xbitc_status_text(st));
    return st ? st : 99;
}

int main(int argc, char **argv) {
    if (argc < 3)
        return 99;
    uint64_t n, need;
    void *bin = slurp(argv[2], &n);
    if (!bin)
        return 98;
    int32_t st = xbitc_model_bytes(bin, n, &need);
    if (st)
        return fail(st, "model_bytes");
    void *mem = aligned(need);
    xbitc_model *m;
    if ((st = xbitc_model_open(bin, n, mem, need, &m)))
        return fail(st, "open");
    if (!strcmp(argv[1], "open")) {
        printf("%s\n", xbitc_kernels());
        return 0;
    }
    xbitc_info info;
    xbitc_model_info(m, &info);
    int threads = atoi(argv[strcmp(argv[1], "graph") ? 5 : 4]);
    void *pool_mem = aligned(xbitc_pool_bytes(threads));
    xbitc_pool *pool;
    if ((st = xbitc_pool_start(threads, pool_mem, xbitc_pool_bytes(threads), &pool)))
        return fail(st, "pool");
    xbitc_exec exec = xbitc_pool_exec(pool);
    FILE *out = fopen(argv[strcmp(argv[1], "graph") ? 6 : 5], "wb");
    if (!strcmp(argv[1], "graph")) {
        int g = atoi(argv[3]), n_in = argc - 6;
        xbitc_tensor *in = calloc((size_t)n_in + 1, sizeof(xbitc_tensor));
        xbitc_tensor *outs = calloc((size_t)info.n_outputs[g] + 1, sizeof(xbitc_tensor));
        for (int k = 0; k < n_in; k++)
            if (!read_tensor(argv[6 + k], &in[k]))
                return 97;
        void *plan = aligned(info.plan_bytes);
        int n_out = info.n_outputs[g];
        if ((st = xbitc_plan(m, g, in, n_in, outs, n_out, plan, info.plan_bytes, &need)))
            return fail(st, "plan");
        void *ws = aligned(need);
        for (int k = 0; k < n_out; k++)
            outs[k].data = aligned(numel(&outs[k]) * esize(outs[k].dtype));
        if ((st = xbitc_run(m, g, in, n_in, outs, n_out, ws, need, &exec)))
            return fail(st, "run");
        for (int k = 0; k < n_out; k++)
            write_tensor(out, &outs[k]);
    } else if (!strcmp(argv[1], "lm")) {
        xbitc_tensor prompt;
        int steps = atoi(argv[4]);
        if (!read_tensor(argv[3], &prompt))
            return 97;
        int64_t plen = prompt.shape[prompt.rank - 1], cap = plen + steps + 1;
        uint64_t pbytes = info.plan_bytes + 160 * (2 * (uint64_t)info.layers + 1) + 128;
        void *plan = aligned(pbytes);
        if ((st = xbitc_lm_bytes(m, cap, plen, plan, pbytes, &need)))
            return fail(st, "lm_bytes");
        xbitc_lm *lm;
        if ((st = xbitc_lm_init(m, cap, plen, aligned(need), need, &lm)))
            return fail(st, "lm_init");
        xbitc_tensor logits = {XBITC_F32, 2, {steps + 1, info.vocab}, aligned((uint64_t)(steps + 1) * info.vocab * 4)};
        xbitc_tensor tokens = {XBITC_I64, 1, {steps + 1}, aligned((uint64_t)(steps + 1) * 8)};
        float *lg = logits.data;
        int64_t *tok = tokens.data;
        for (int s = 0; s <= steps; s++) {
            float *row = lg + (int64_t)s * info.vocab;
            if (s == 0)
                st = xbitc_lm_feed(lm, prompt.data, plen, row, &exec);
            else
                st = xbitc_lm_feed(lm, &tok[s - 1], 1, row, &exec);
            if (st)
                return fail(st, "feed");
            int64_t best = 0;
            for (int64_t v = 1; v < info.vocab; v++)
                if (row[v] > row[best])
                    best = v;
            tok[s] = best;
        }
        write_tensor(out, &logits);
        write_tensor(out, &tokens);
    }
    fclose(out);
    xbitc_pool_stop(pool);
    return 0;
}
