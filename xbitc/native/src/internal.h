/* What the runtime (runtime.c), the core ops (ops.c) and the packed matrix product (packed.c) share.
 * The op codes are the core op set of ir/core.py (docs/core-ops.md), numbered as xbitc/native/modelbin.py writes
 * them; tests/test_native.py checks the two lists agree. */
#ifndef XBITC_INTERNAL_H
#define XBITC_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "xbitc.h"

#define XB_PACKED 16 /* dtype of a packed-matrix parameter (only linear and embed read one) */

#define XB_OP_LIST(X) \
    X(embed) X(linear) X(matmul) X(conv2d) X(rmsnorm) X(layernorm) X(rope) X(attention) X(softmax) X(gelu) \
    X(pow) X(where) X(mean) X(sum) X(reshape) X(expand) X(transpose) X(permute) X(unsqueeze) X(squeeze) \
    X(slice) X(select) X(concat) X(cast) X(arange) X(full) X(gather) X(dim) \
    X(neg) X(abs) X(exp) X(log) X(sqrt) X(rsqrt) X(sin) X(cos) X(tanh) X(sigmoid) X(erf) X(relu) X(silu) \
    X(logical_not) \
    X(add) X(sub) X(mul) X(div) X(maximum) X(minimum) X(eq) X(ne) X(lt) X(le) X(gt) X(ge) X(logical_and) \
    X(logical_or) \
    X(scalar_add) X(scalar_sub) X(scalar_mul) X(scalar_floordiv)

#define XB_ENUM(name) XB_OP_##name,
enum xb_op { XB_OP_LIST(XB_ENUM) XB_NUM_OPS };
#undef XB_ENUM

/* One packed matrix [out, in] as row-lane records (backends/product.py): rec holds nrec records
 * of 7 int64 (kind, ncols, address of codes, scales and zeros of row block 0, x_offset, stride) with absolute
 * addresses into buf; perm (NULL: identity) maps stored column j to input column perm[j]. */
typedef struct xb_packed {
    int64_t out, in, nrec;
    int64_t act; /* 0: f32 layout and kernels; 1: q8 (int8 activations per record; generated x86 kernels only) */
    const int64_t *rec;
    const uint8_t *buf;
    uint64_t buf_bytes;
    const int32_t *perm;
} xb_packed;

/* A value: a tensor (rank >= 0), a scalar (rank -1: dtype I64 or BOOL in .i, F32 in .f), absent (dtype 0) or a
 * packed matrix (dtype XB_PACKED, .packed). Tensors are row-major and contiguous, except the key/value operands of
 * attention, which may be strided views into a cache (stride in elements, innermost stride always 1). */
typedef struct xb_value {
    int32_t dtype;
    int32_t rank;
    int64_t shape[XBITC_MAX_RANK];
    int64_t stride[XBITC_MAX_RANK];
    void *data;
    int64_t i;
    double f;
    const xb_packed *packed;
} xb_value;

/* An operand: absent (n = 0, kind XB_NONE), one value, or a list of values (concat's tensors; reshape, expand and
 * full's sizes as I64 scalars). */
enum { XB_NONE = 0, XB_ONE = 1, XB_LIST = 2 };
typedef struct xb_operand {
    int32_t kind;
    int32_t n;
    const xb_value *v;
} xb_operand;

/* An attribute, in the order of the op's attrs in ir/core.py (defaults filled in by the writer): an integer
 * (bools, dtypes as enum xbitc_dtype, gelu's approximate as 0 none / 1 tanh), a float, a list of integers, or
 * absent (attention's scale: 1/sqrt(head dim)). */
enum { XB_A_NONE = 0, XB_A_INT = 1, XB_A_FLOAT = 2, XB_A_LIST = 3 };
typedef struct xb_attr {
    int32_t kind;
    int32_t n;
    int64_t i;
    double f;
    const int64_t *list;
} xb_attr;

typedef struct xb_call {
    const xb_operand *in;
    int32_t nin;
    const xb_attr *attr;
    int32_t nattr;
    xb_value *out;          /* shape: sets dtype, rank, shape (scalar ops: the value); run: writes out->data */
    uint64_t scratch_bytes; /* shape may ask for scratch; run receives it in scratch (64-byte aligned) */
    void *scratch;
    const xbitc_exec *exec;
} xb_call;

typedef int32_t (*xb_fn)(xb_call *c);
typedef struct xb_opdef {
    const char *name;
    xb_fn shape; /* output dtype and shape from operand shapes; a status (XBITC_E_SHAPE for refused sizes) */
    xb_fn run;   /* NULL: shape alone makes the value (scalars) or the output aliases operand 0 (views) */
    int32_t view; /* 1: the output is operand 0's data with another shape (reshape, unsqueeze, squeeze) */
} xb_opdef;

extern const xb_opdef XB_OPS[XB_NUM_OPS];

/* Every size a value has is at most XB_MAX_SIZE and the product of its nonzero sizes at most XB_MAX_ELEMENTS
 * (checked wherever sizes enter: model.bin, inputs, every op's output), so products of sizes never overflow. */
#define XB_MAX_SIZE ((int64_t)1 << 40)
#define XB_MAX_ELEMENTS ((int64_t)1 << 58)
int xb_sizes_ok(int32_t rank, const int64_t *shape);

/* Helpers the runtime provides to ops. */
int64_t xb_numel(const xb_value *v);
uint64_t xb_nbytes(const xb_value *v); /* bytes of a contiguous tensor */
size_t xb_dtype_size(int32_t dtype);
void xb_contiguous_strides(xb_value *v);
/* Run task(arg, i) for i in [0, n) through exec (serially when exec is NULL or has no parallel_for). */
void xb_parallel(const xbitc_exec *exec, xbitc_task task, void *arg, int64_t n);
int32_t xb_threads(const xbitc_exec *exec);

/* packed.c: y [T, out] = x [T, in] Wᵀ (scratch: xb_packed_scratch bytes); rows of W dequantized into out [n, in]. */
uint64_t xb_packed_scratch(const xb_packed *w, int64_t T);
int32_t xb_packed_matmul(const xb_packed *w, const float *x, int64_t T, float *y, void *scratch,
                         const xbitc_exec *exec);
int32_t xb_packed_rows(const xb_packed *w, const int64_t *rows, int64_t n, float *out);
int xb_packed_runs(int64_t act); /* whether this build has kernels for activation strategy act */

#endif
