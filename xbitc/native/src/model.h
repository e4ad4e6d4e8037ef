/* The opened model (model.c builds it, run.c executes it): what model.bin holds, checked and indexed. */
#ifndef XBITC_MODEL_H
#define XBITC_MODEL_H

#include "internal.h"

#define XB_MAX_PROGRAMS 3 /* main, decode step, decode step with the last token's logits */
enum { XB_T_NONE = 0, XB_T_REF = 1, XB_T_INT = 2, XB_T_FLOAT = 3, XB_T_BOOL = 4, XB_T_LIST = 5 };
enum { XB_NODE_INPUT = 1000, XB_NODE_PARAM = 1001, XB_NODE_OUTPUT = 1002 };

typedef struct xb_node {
    int32_t op; /* enum xb_op, or XB_NODE_* */
    int32_t nin, nattr;
    int64_t operands, attrs; /* word positions of the (checked) encoded operands and attributes */
    int32_t root;            /* the node whose data this value is (itself, or a view's source) */
    int32_t n_frees;         /* roots whose data dies after this node */
    const int32_t *frees;
    int32_t tensor;          /* param: tensor index */
    int32_t in_dtype, in_rank; /* input: what the caller passes (-1 sizes are dynamic) */
    int64_t in_dims[XBITC_MAX_RANK];
    int32_t cache;           /* decode step: the cache (output index) this concat appends to in a session, or 0 */
} xb_node;

typedef struct xb_program {
    int32_t n_nodes, n_inputs, n_outputs, max_items;
    xb_node *nodes;
    int32_t *inputs; /* node index of each input */
    int32_t caches_in_place; /* every cache output is a concat of its past input that only attention reads */
} xb_program;

struct xbitc_model {
    const int64_t *words;
    int64_t n_words;
    const uint8_t *data;
    uint64_t data_bytes;
    int32_t kind, n_tensors, n_programs;
    int64_t vocab, layers, kv_heads, head_dim;
    xb_value *tensors;
    xb_program prog[XB_MAX_PROGRAMS];
    uint64_t plan_bytes;
};

void xb_refs(const xbitc_model *m, const xb_node *n, void (*visit)(void *, int32_t, int32_t), void *ctx);
uint64_t xb_fixed_workspace(const xb_program *p);
void xb_find_caches(xbitc_model *m);

#endif
