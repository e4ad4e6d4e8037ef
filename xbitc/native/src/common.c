/* What every part of the runtime shares: sizes, strides, status texts, and handing work to the caller's threads. */
#include <string.h>

#include "internal.h"

int32_t xbitc_abi_version(void) { return XBITC_ABI_VERSION; }

const char *xbitc_status_text(int32_t status) {
    switch (status) {
    case XBITC_OK: return "ok";
    case XBITC_E_FORMAT: return "model.bin is not an xbitc model, or it is truncated or malformed";
    case XBITC_E_VERSION: return "model.bin was written for another format version: export it again";
    case XBITC_E_CHECKSUM: return "model.bin does not match its checksum: the file is corrupt";
    case XBITC_E_ARGUMENT: return "bad argument: a NULL pointer, unknown graph, or inputs of the wrong count, dtype or rank";
    case XBITC_E_MEMORY: return "a buffer is smaller than its *_bytes function said, or not 64-byte aligned";
    case XBITC_E_SHAPE: return "input sizes the model's shape rules refuse (or a token id out of range)";
    case XBITC_E_UNSUPPORTED: return "the model has no graph for this call, the session's cache is full, or this build has no kernels for the model's activations (export with --act f32)";
    case XBITC_E_THREADS: return "a thread could not be started";
    default: return "unknown status";
    }
}

size_t xb_dtype_size(int32_t dtype) {
    return dtype == XBITC_F32 ? 4 : dtype == XBITC_I64 ? 8 : dtype == XBITC_BOOL ? 1 : 0;
}

int64_t xb_numel(const xb_value *v) {
    int64_t n = 1;
    for (int32_t k = 0; k < v->rank; k++)
        n *= v->shape[k];
    return v->rank < 0 ? 0 : n;
}

uint64_t xb_nbytes(const xb_value *v) { return (uint64_t)xb_numel(v) * xb_dtype_size(v->dtype); }

int xb_sizes_ok(int32_t rank, const int64_t *shape) {
    int64_t n = 1;
    for (int32_t d = 0; d < rank; d++) {
        if (shape[d] < 0 || shape[d] > XB_MAX_SIZE)
            return 0;
        if (shape[d] > 0 && n > XB_MAX_ELEMENTS / shape[d])
            return 0;
        n *= shape[d] > 0 ? shape[d] : 1;
    }
    return 1;
}

void xb_contiguous_strides(xb_value *v) {
    int64_t s = 1;
    for (int32_t k = v->rank - 1; k >= 0; k--) {
        v->stride[k] = s;
        s *= v->shape[k];
    }
}

int32_t xb_threads(const xbitc_exec *exec) {
    return exec && exec->parallel_for && exec->threads > 1 ? exec->threads : 1;
}

void xb_parallel(const xbitc_exec *exec, xbitc_task task, void *arg, int64_t n) {
    if (n <= 0)
        return;
    if (n == 1 || xb_threads(exec) == 1) {
        for (int64_t i = 0; i < n; i++)
            task(arg, i);
        return;
    }
    exec->parallel_for(exec->ctx, task, arg, n);
}
