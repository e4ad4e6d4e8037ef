/* Greedy text generation with a model exported by `xbitc export ARTIFACT --c-lib DIR`, in plain C.
 *
 *   ./generate DIR/model.bin [--threads N] [--tokens N] [--eos ID] ID ID ...
 *
 * Token ids in (the prompt) and out (one line, space separated); the README says how to tokenize. Everything the
 * library needs is allocated here: it allocates nothing itself. */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "xbitc.h"

static void *alloc64(uint64_t n) { return aligned_alloc(64, (n + 63) / 64 * 64); }

static int fail(const char *what, int32_t status) {
    fprintf(stderr, "generate: %s: %s\n", what, xbitc_status_text(status));
    return 1;
}

int main(int argc, char **argv) {
    int threads = 1, tokens = 32;
    long long eos = -1;
    int64_t prompt[4096];
    int64_t n_prompt = 0;
    if (argc < 3) {
        fprintf(stderr, "usage: %s model.bin [--threads N] [--tokens N] [--eos ID] ID ID ...\n", argv[0]);
        return 2;
    }
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            tokens = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--eos") && i + 1 < argc)
            eos = atoll(argv[++i]);
        else if (n_prompt < 4096)
            prompt[n_prompt++] = atoll(argv[i]);
    }
    if (n_prompt == 0 || threads < 1 || tokens < 1) {
        fprintf(stderr, "generate: give at least one prompt token id, and positive --threads / --tokens\n");
        return 2;
    }

    /* model.bin is read in place: map it (mmap's pages are 64-byte aligned) */
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st)) {
        perror(argv[1]);
        return 1;
    }
    void *bin = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (bin == MAP_FAILED) {
        perror("mmap");
        return 1;
    }

    uint64_t bytes;
    int32_t s;
    xbitc_model *model;
    if ((s = xbitc_model_bytes(bin, (uint64_t)st.st_size, &bytes)))
        return fail("reading model.bin", s);
    if ((s = xbitc_model_open(bin, (uint64_t)st.st_size, alloc64(bytes), bytes, &model)))
        return fail("opening model.bin", s);
    xbitc_info info;
    xbitc_model_info(model, &info);
    if (info.kind != XBITC_CAUSAL_LM)
        return fail("this model is not a causal language model", XBITC_E_UNSUPPORTED);

    /* a session sized for this prompt and these tokens; planning it takes a scratch buffer once */
    int64_t capacity = n_prompt + tokens;
    uint64_t plan_bytes = info.plan_bytes + 160 * (2 * (uint64_t)info.layers + 1) + 128;
    void *plan = alloc64(plan_bytes);
    if ((s = xbitc_lm_bytes(model, capacity, n_prompt, plan, plan_bytes, &bytes)))
        return fail("sizing the session", s);
    free(plan);
    xbitc_lm *lm;
    if ((s = xbitc_lm_init(model, capacity, n_prompt, alloc64(bytes), bytes, &lm)))
        return fail("making the session", s);

    xbitc_pool *pool;
    if ((s = xbitc_pool_start(threads, alloc64(xbitc_pool_bytes(threads)), xbitc_pool_bytes(threads), &pool)))
        return fail("starting threads", s);
    xbitc_exec exec = xbitc_pool_exec(pool);

    float *logits = malloc(sizeof(float) * (size_t)info.vocab);
    const int64_t *feed = prompt;
    int64_t n_feed = n_prompt, next = 0;
    for (int t = 0; t < tokens; t++) {
        if ((s = xbitc_lm_feed(lm, feed, n_feed, logits, &exec)))
            return fail("running the model", s);
        next = 0;
        for (int64_t v = 1; v < info.vocab; v++)
            if (logits[v] > logits[next])
                next = v;
        printf("%lld%s", (long long)next, t + 1 < tokens && next != eos ? " " : "\n");
        if (next == eos)
            break;
        feed = &next;
        n_feed = 1;
    }
    fflush(stdout);
    xbitc_pool_stop(pool);
    return 0;
}
