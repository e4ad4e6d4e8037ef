/* xbitc runtime: runs a model compiled by xbitc (model.bin) from C, with no Python.
 *
 * Conventions: fixed-width types; every function returns an xbitc status (0 = XBITC_OK) and never aborts or
 * prints; the library allocates nothing: the caller provides every buffer, sized by the *_bytes functions; there is
 * no global state, so handles from different buffers are independent. A model handle is read-only after
 * xbitc_model_open and may be shared by threads; a session (xbitc_lm) belongs to one thread at a time.
 *
 * model.bin is read in place (mmap it or read it into memory aligned to 64 bytes); it must outlive the model.
 * It is checked when opened: magic, version, size, checksum, and every offset, shape and operand it holds, so a
 * corrupt or truncated file gives a status, never a crash.
 */
#ifndef XBITC_H
#define XBITC_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define XBITC_ABI_VERSION 1

enum xbitc_status {
    XBITC_OK = 0,
    XBITC_E_FORMAT = 1,      /* model.bin is not an xbitc model, or it is truncated or malformed */
    XBITC_E_VERSION = 2,     /* model.bin was written for another format version: export it again */
    XBITC_E_CHECKSUM = 3,    /* model.bin's contents do not match its checksum (corrupt file) */
    XBITC_E_ARGUMENT = 4,    /* a NULL pointer, an unknown graph, wrong input count, dtype or rank */
    XBITC_E_MEMORY = 5,      /* a caller buffer is smaller than the *_bytes function said, or misaligned */
    XBITC_E_SHAPE = 6,       /* inputs whose sizes the model's shape rules refuse */
    XBITC_E_UNSUPPORTED = 7, /* the model has no graph for this call (e.g. no decode step), a full cache, or
                                int8-activation (q8) kernels this build lacks (export with --act f32) */
    XBITC_E_THREADS = 8      /* a thread could not be started */
};

enum xbitc_dtype { XBITC_F32 = 1, XBITC_I64 = 2, XBITC_BOOL = 3 };

enum xbitc_kind { XBITC_CAUSAL_LM = 1, XBITC_ENCODER = 2, XBITC_OTHER = 3 };

#define XBITC_MAX_RANK 8

/* A dense row-major tensor the caller owns. */
typedef struct xbitc_tensor {
    int32_t dtype; /* enum xbitc_dtype */
    int32_t rank;
    int64_t shape[XBITC_MAX_RANK];
    void *data;
} xbitc_tensor;

/* How a call may use threads: task(arg, i) must run once for every i in [0, n), in any order and on any
 * threads, and parallel_for returns when all have finished. NULL runs everything on the calling thread. */
typedef void (*xbitc_task)(void *arg, int64_t i);
typedef void (*xbitc_parallel_for)(void *ctx, xbitc_task task, void *arg, int64_t n);
typedef struct xbitc_exec {
    xbitc_parallel_for parallel_for;
    void *ctx;
    int32_t threads; /* how many tasks to split work into (1: no splitting) */
} xbitc_exec;

typedef struct xbitc_model xbitc_model;

typedef struct xbitc_info {
    int32_t kind;         /* enum xbitc_kind */
    int32_t graphs;       /* 1, or 2 when the model has a decode step (graph 1) */
    int64_t vocab;        /* causal LMs: logits per token */
    int64_t layers;       /* causal LMs with a decode step: cache geometry */
    int64_t kv_heads;
    int64_t head_dim;
    uint64_t plan_bytes;  /* the least workspace xbitc_plan takes */
    int32_t n_inputs[2];  /* per graph */
    int32_t n_outputs[2];
} xbitc_info;

int32_t xbitc_abi_version(void);
const char *xbitc_status_text(int32_t status);
/* Which packed-product kernels this CPU runs: a level of the build's CPU family ("avx2", "neon", "i8mm", ...) or
 * "portable" (the C renderer's loops, in builds for other CPUs). */
const char *xbitc_kernels(void);

/* Memory a model handle needs for this file (parsed program, kernel record tables): *bytes. Checks the file's
 * structure; xbitc_model_open also verifies its checksum. */
int32_t xbitc_model_bytes(const void *bin, uint64_t bin_bytes, uint64_t *bytes);
/* Check model.bin (structure and checksum) and build the handle in mem (>= xbitc_model_bytes, 64-byte aligned). */
int32_t xbitc_model_open(const void *bin, uint64_t bin_bytes, void *mem, uint64_t mem_bytes, xbitc_model **model);
int32_t xbitc_model_info(const xbitc_model *model, xbitc_info *info);

/* The general call: run graph g (0 = main, 1 = decode step) on inputs. xbitc_plan (given a workspace of at least
 * info.plan_bytes) fills each output's dtype, rank and shape (data untouched) and the workspace xbitc_run needs
 * for these inputs (*run_bytes); xbitc_run writes outputs[i].data (caller buffers of those shapes). Decode step inputs: ids [B, S] int64, then past keys and values [B, kv_heads, P, head_dim]
 * per layer; outputs: logits [B, S, vocab], then the keys and values [B, kv_heads, P + S, head_dim]. */
int32_t xbitc_plan(const xbitc_model *model, int32_t graph, const xbitc_tensor *inputs, int32_t n_inputs,
                   xbitc_tensor *outputs, int32_t n_outputs, void *workspace, uint64_t workspace_bytes,
                   uint64_t *run_bytes);
int32_t xbitc_run(const xbitc_model *model, int32_t graph, const xbitc_tensor *inputs, int32_t n_inputs,
                  xbitc_tensor *outputs, int32_t n_outputs, void *workspace, uint64_t workspace_bytes,
                  const xbitc_exec *exec);

/* A causal LM session with its own key/value cache (batch 1): feed prompt tokens, then one token at a time.
 * The cache is appended in place, never copied. max_tokens: the cache capacity; max_feed: the most tokens one
 * xbitc_lm_feed takes. */
typedef struct xbitc_lm xbitc_lm;
/* plan_ws: a scratch buffer of at least info.plan_bytes + 160 * (2 * info.layers + 1) + 128 bytes, used only
 * during the call. */
int32_t xbitc_lm_bytes(const xbitc_model *model, int64_t max_tokens, int64_t max_feed, void *plan_ws,
                       uint64_t plan_ws_bytes, uint64_t *bytes);
int32_t xbitc_lm_init(const xbitc_model *model, int64_t max_tokens, int64_t max_feed, void *mem, uint64_t mem_bytes,
                      xbitc_lm **lm);
/* Feed n tokens; logits (vocab floats, may be NULL) receive the last token's. */
int32_t xbitc_lm_feed(xbitc_lm *lm, const int64_t *ids, int64_t n, float *logits, const xbitc_exec *exec);
int64_t xbitc_lm_tokens(const xbitc_lm *lm);
void xbitc_lm_reset(xbitc_lm *lm);

/* An optional thread pool for xbitc_exec (the caller may pass its own parallel_for instead): threads - 1 workers
 * over pthreads, in caller memory. Fill an xbitc_exec with xbitc_pool_exec. */
typedef struct xbitc_pool xbitc_pool;
uint64_t xbitc_pool_bytes(int32_t threads);
int32_t xbitc_pool_start(int32_t threads, void *mem, uint64_t mem_bytes, xbitc_pool **pool);
xbitc_exec xbitc_pool_exec(xbitc_pool *pool);
void xbitc_pool_stop(xbitc_pool *pool);

#ifdef __cplusplus
}
#endif

#endif /* XBITC_H */
