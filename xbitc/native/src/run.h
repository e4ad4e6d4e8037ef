/* The interpreter's entry (run.c) as the session code (lm.c) calls it. */
#ifndef XBITC_RUN_H
#define XBITC_RUN_H

#include "model.h"

/* Where a node's data and scratch were placed when a session planned its largest call. */
typedef struct xb_plan {
    uint64_t off, size, scratch_off, scratch_size;
} xb_plan;

/* A session's view of a decode step: inputs 1.. are its caches (capacity positions each), appended in place. */
typedef struct xb_session_io {
    int64_t capacity;
    int64_t tokens;       /* fed in this call: every cache grows by exactly this many positions */
    float *const *caches; /* NULL while planning */
    xb_plan *plan;
    int recording; /* 1: plan by first fit and record; 0: replay the recorded placement */
} xb_session_io;

int32_t xb_execute(const xbitc_model *m, int32_t g, const xbitc_tensor *in, int32_t n_in, xbitc_tensor *out,
                   int32_t n_out, void *workspace, uint64_t ws_bytes, const xbitc_exec *exec, int running,
                   const xb_session_io *io, uint64_t *need);

#endif
