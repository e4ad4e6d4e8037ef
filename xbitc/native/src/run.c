/* Running a program of the opened model: an interpreter over the core op list (ops.c implements each op).
 *
 * Why an interpreter and not generated C: sizes (batch, sequence, cache length) are only known per call, and the
 * shape rules that follow them are the op table's; one runtime then serves every model, the library a product links
 * does not change when the model does, and model.bin alone says what runs. Per node it costs a few hundred
 * nanoseconds, against microseconds to milliseconds of work in each node.
 *
 * Memory: the caller's workspace holds every node's value descriptor and an arena. A node's data is placed by
 * first fit among the live blocks and released after its root's last use (views share their root's block);
 * values that are outputs are written straight into the caller's buffers. A session (lm.c) replays the placement
 * planned at its largest sizes instead, so its workspace is fixed when it is made. */
#include <string.h>

#include "run.h"

#define ALIGN64(x) (((x) + 63) & ~(uint64_t)63)

typedef struct block {
    uint64_t off, size;
    int32_t owner;
} block;

typedef struct layout {
    xb_value *values;
    xb_value *items;
    block *blocks;
    int32_t *target; /* output index a node's data is written to, or -1 */
    uint8_t *arena;
} layout;

uint64_t xb_fixed_workspace(const xb_program *p) {
    uint64_t n = (uint64_t)p->n_nodes;
    return ALIGN64(n * sizeof(xb_value)) + ALIGN64(8 * (uint64_t)(p->max_items + 1) * sizeof(xb_value)) +
           ALIGN64(n * sizeof(block)) + ALIGN64(n * sizeof(int32_t));
}

static layout lay_out(const xb_program *p, uint8_t *ws) {
    uint64_t n = (uint64_t)p->n_nodes;
    layout l;
    l.values = (xb_value *)ws;
    ws += ALIGN64(n * sizeof(xb_value));
    l.items = (xb_value *)ws;
    ws += ALIGN64(8 * (uint64_t)(p->max_items + 1) * sizeof(xb_value));
    l.blocks = (block *)ws;
    ws += ALIGN64(n * sizeof(block));
    l.target = (int32_t *)ws;
    ws += ALIGN64(n * sizeof(int32_t));
    l.arena = ws;
    return l;
}

/* ------------------------------------------------------------------------------------------- placement */

typedef struct placer {
    block *b;
    int32_t n;
    uint64_t peak;
    xb_plan *replay; /* a session's recorded offsets (NULL: first fit) */
    int recording;
    uint64_t limit; /* arena bytes the caller gave */
} placer;

static int32_t place(placer *p, uint64_t size, int32_t owner, int32_t node, int scratch, uint64_t *off) {
    size = ALIGN64(size);
    if (p->replay && !p->recording) {
        uint64_t want = scratch ? p->replay[node].scratch_size : p->replay[node].size;
        if (size > want)
            return XBITC_E_MEMORY; /* larger than planned at the session's largest sizes */
        *off = scratch ? p->replay[node].scratch_off : p->replay[node].off;
        return *off + size <= p->limit ? XBITC_OK : XBITC_E_MEMORY;
    }
    uint64_t pos = 0;
    int32_t k = 0;
    for (; k < p->n; k++) {
        if (p->b[k].off >= pos + size)
            break;
        if (p->b[k].off + p->b[k].size > pos)
            pos = p->b[k].off + p->b[k].size;
    }
    memmove(p->b + k + 1, p->b + k, sizeof(block) * (size_t)(p->n - k));
    p->b[k] = (block){pos, size, owner};
    p->n++;
    if (pos + size > p->peak)
        p->peak = pos + size;
    if (pos + size > p->limit)
        return XBITC_E_MEMORY;
    if (p->recording) {
        if (scratch) {
            p->replay[node].scratch_off = pos;
            p->replay[node].scratch_size = size;
        } else {
            p->replay[node].off = pos;
            p->replay[node].size = size;
        }
    }
    *off = pos;
    return XBITC_OK;
}

static void release(placer *p, int32_t owner) {
    if (p->replay && !p->recording)
        return;
    for (int32_t k = 0; k < p->n; k++)
        if (p->b[k].owner == owner) {
            memmove(p->b + k, p->b + k + 1, sizeof(block) * (size_t)(p->n - k - 1));
            p->n--;
            return;
        }
}

/* ------------------------------------------------------------------------------------------- operands */

static int64_t word(const xbitc_model *m, int64_t *pos) { return m->words[(*pos)++]; }

static void literal(xb_value *v, int64_t tag, int64_t w) {
    memset(v, 0, sizeof *v);
    v->rank = -1;
    if (tag == XB_T_FLOAT) {
        v->dtype = XBITC_F32;
        memcpy(&v->f, &w, 8);
    } else {
        v->dtype = tag == XB_T_BOOL ? XBITC_BOOL : XBITC_I64;
        v->i = w;
    }
}

/* Decode a node's operands (checked when the model was opened) against the values computed so far. */
static void operands(const xbitc_model *m, const xb_node *n, const layout *l, xb_operand *ops, xb_value *one) {
    int64_t pos = n->operands;
    xb_value *items = l->items;
    for (int32_t k = 0; k < n->nin; k++) {
        int64_t tag = word(m, &pos);
        if (tag == XB_T_NONE) {
            ops[k] = (xb_operand){XB_NONE, 0, NULL};
        } else if (tag == XB_T_REF) {
            ops[k] = (xb_operand){XB_ONE, 1, &l->values[word(m, &pos)]};
        } else if (tag == XB_T_LIST) {
            int64_t count = word(m, &pos);
            ops[k] = (xb_operand){XB_LIST, (int32_t)count, items};
            for (int64_t i = 0; i < count; i++, items++) {
                int64_t t = word(m, &pos);
                if (t == XB_T_NONE)
                    memset(items, 0, sizeof *items);
                else if (t == XB_T_REF)
                    *items = l->values[word(m, &pos)];
                else
                    literal(items, t, word(m, &pos));
            }
        } else {
            literal(&one[k], tag, word(m, &pos));
            ops[k] = (xb_operand){XB_ONE, 1, &one[k]};
        }
    }
    for (int32_t k = n->nin; k < 8; k++)
        ops[k] = (xb_operand){XB_NONE, 0, NULL};
}

static void attributes(const xbitc_model *m, const xb_node *n, xb_attr *attrs) {
    int64_t pos = n->attrs;
    memset(attrs, 0, sizeof(xb_attr) * 8);
    for (int32_t k = 0; k < n->nattr; k++) {
        int64_t tag = word(m, &pos);
        attrs[k].kind = (int32_t)(tag == XB_T_INT ? XB_A_INT : tag == XB_T_FLOAT ? XB_A_FLOAT
                                  : tag == XB_T_LIST ? XB_A_LIST : XB_A_NONE);
        if (tag == XB_T_INT) {
            attrs[k].i = word(m, &pos);
        } else if (tag == XB_T_FLOAT) {
            int64_t w = word(m, &pos);
            memcpy(&attrs[k].f, &w, 8);
        } else if (tag == XB_T_LIST) {
            attrs[k].n = (int32_t)word(m, &pos);
            attrs[k].list = m->words + pos;
            pos += attrs[k].n;
        }
    }
}

static int same_shape(const xb_value *v, const xbitc_tensor *t) {
    if (v->dtype != t->dtype || v->rank != t->rank)
        return 0;
    for (int32_t k = 0; k < v->rank; k++)
        if (v->shape[k] != t->shape[k])
            return 0;
    return 1;
}

static int32_t bind_input(const xb_node *n, const xbitc_tensor *t, xb_value *v) {
    if (t->dtype != n->in_dtype || t->rank != n->in_rank || t->rank < 0 || t->rank > XBITC_MAX_RANK)
        return XBITC_E_ARGUMENT;
    memset(v, 0, sizeof *v);
    v->dtype = t->dtype;
    v->rank = t->rank;
    if (!xb_sizes_ok(t->rank, t->shape))
        return XBITC_E_SHAPE;
    for (int32_t k = 0; k < t->rank; k++) {
        if (n->in_dims[k] >= 0 && t->shape[k] != n->in_dims[k])
            return XBITC_E_SHAPE;
        v->shape[k] = t->shape[k];
    }
    xb_contiguous_strides(v);
    v->data = t->data;
    return XBITC_OK;
}

/* A session's past keys/values: a view of its cache [1, H, capacity, D] holding the first P positions. */
static void cache_view(const xb_session_io *io, int32_t k, const xbitc_tensor *t, xb_value *v) {
    memset(v, 0, sizeof *v);
    v->dtype = XBITC_F32;
    v->rank = 4;
    memcpy(v->shape, t->shape, sizeof(int64_t) * 4);
    v->stride[3] = 1;
    v->stride[2] = t->shape[3];
    v->stride[1] = io->capacity * t->shape[3];
    v->stride[0] = t->shape[1] * v->stride[1];
    v->data = io->caches ? io->caches[k - 1] : NULL;
}

/* concat(past, new; dim -2) in a session: new is written after the past positions, in place. */
static int32_t cache_append(const xb_session_io *io, const xb_operand *ops, xb_value *out, int running) {
    const xb_value *past = &ops[0].v[0], *fresh = &ops[0].v[1];
    if (fresh->dtype != XBITC_F32 || fresh->rank != 4 || fresh->shape[0] != 1 || fresh->shape[1] != past->shape[1] ||
        fresh->shape[3] != past->shape[3])
        return XBITC_E_SHAPE;
    int64_t P = past->shape[2], S = fresh->shape[2], H = fresh->shape[1], D = fresh->shape[3];
    if (S != io->tokens) /* a step that appends another count would leave positions unwritten */
        return XBITC_E_SHAPE;
    if (P + S > io->capacity)
        return XBITC_E_UNSUPPORTED;
    *out = *past;
    out->shape[2] = P + S;
    if (running) {
        float *dst = past->data;
        const float *src = fresh->data;
        for (int64_t h = 0; h < H; h++)
            memcpy(dst + h * past->stride[1] + P * D, src + h * S * D, sizeof(float) * (size_t)(S * D));
    }
    return XBITC_OK;
}

/* ------------------------------------------------------------------------------------------- the loop */

static void find_targets(const xbitc_model *m, const xb_program *p, const layout *l, const xb_session_io *io) {
    const xb_node *out = &p->nodes[p->n_nodes - 1];
    for (int32_t i = 0; i < p->n_nodes; i++)
        l->target[i] = -1;
    int64_t pos = out->operands;
    for (int32_t k = 0; k < out->nin; k++) {
        word(m, &pos);
        int64_t ref = word(m, &pos);
        const xb_node *src = &p->nodes[ref];
        int direct = src->op >= 0 && src->op < XB_NUM_OPS && !XB_OPS[src->op].view && XB_OPS[src->op].run;
        if (direct && l->target[ref] < 0 && !(io && k > 0))
            l->target[ref] = k;
    }
}

int32_t xb_execute(const xbitc_model *m, int32_t g, const xbitc_tensor *in, int32_t n_in, xbitc_tensor *out,
                   int32_t n_out, void *workspace, uint64_t ws_bytes, const xbitc_exec *exec, int running,
                   const xb_session_io *io, uint64_t *need) {
    if (!m || g < 0 || g >= m->n_programs || (n_in && !in) || (n_out && !out) || !workspace)
        return XBITC_E_ARGUMENT;
    const xb_program *p = &m->prog[g];
    uint64_t fixed = xb_fixed_workspace(p);
    if (n_in != p->n_inputs || n_out != p->n_outputs)
        return XBITC_E_ARGUMENT;
    if (ws_bytes < fixed || ((uintptr_t)workspace & 63))
        return XBITC_E_MEMORY;
    layout l = lay_out(p, workspace);
    placer pl = {l.blocks, 0, 0, io ? io->plan : NULL, io ? io->recording : 0,
                 running ? ws_bytes - fixed : UINT64_MAX};
    find_targets(m, p, &l, io);
    int32_t n_input = 0, st = XBITC_OK;
    for (int32_t i = 0; i < p->n_nodes; i++) {
        const xb_node *n = &p->nodes[i];
        xb_value *v = &l.values[i];
        if (n->op == XB_NODE_INPUT) {
            if (io && n_input > 0) {
                if ((st = bind_input(n, &in[n_input], v)))
                    return st;
                cache_view(io, n_input, &in[n_input], v);
            } else if ((st = bind_input(n, &in[n_input], v))) {
                return st;
            }
            if (running && !v->data && xb_numel(v))
                return XBITC_E_ARGUMENT;
            n_input++;
            continue;
        }
        if (n->op == XB_NODE_PARAM) {
            *v = m->tensors[n->tensor];
            continue;
        }
        if (n->op == XB_NODE_OUTPUT) {
            int64_t pos = n->operands;
            for (int32_t k = 0; k < n->nin; k++) {
                word(m, &pos);
                const xb_value *src = &l.values[word(m, &pos)];
                if (src->rank < 0 || src->dtype == XB_PACKED)
                    return XBITC_E_UNSUPPORTED; /* outputs are tensors */
                if (!running) {
                    out[k].dtype = src->dtype;
                    out[k].rank = src->rank;
                    memcpy(out[k].shape, src->shape, sizeof(int64_t) * (size_t)src->rank);
                } else if (!(io && k > 0)) {
                    if (!same_shape(src, &out[k]) || !out[k].data)
                        return XBITC_E_ARGUMENT;
                    if (src->data != out[k].data && xb_nbytes(src))
                        memcpy(out[k].data, src->data, (size_t)xb_nbytes(src));
                }
            }
            break;
        }
        xb_operand ops[8];
        xb_value one[8];
        xb_attr attrs[8];
        operands(m, n, &l, ops, one);
        attributes(m, n, attrs);
        memset(v, 0, sizeof *v);
        xb_call c = {ops, n->nin, attrs, n->nattr, v, 0, NULL, exec};
        if (io && n->cache) {
            if ((st = cache_append(io, ops, v, running)))
                return st;
        } else {
            for (int32_t k = 0; k < n->nin; k++) /* only attention reads strided (cache) values */
                if (ops[k].kind == XB_ONE && ops[k].v->rank > 0 && ops[k].v->dtype != XB_PACKED &&
                    !(n->op == XB_OP_attention && (k == 1 || k == 2)) &&
                    ops[k].v->stride[ops[k].v->rank - 1] != 1 && xb_numel(ops[k].v) > 1)
                    return XBITC_E_UNSUPPORTED;
            if ((st = XB_OPS[n->op].shape(&c)))
                return st;
            if (v->rank < -1 || v->rank > XBITC_MAX_RANK)
                return XBITC_E_SHAPE;
            if (v->rank >= 0)
                xb_contiguous_strides(v);
            if (XB_OPS[n->op].view) {
                v->data = ops[0].v->data;
            } else if (XB_OPS[n->op].run) {
                uint64_t off, soff = 0;
                int32_t k = l.target[i];
                if (k >= 0 && running) {
                    if (!same_shape(v, &out[k]) || !out[k].data)
                        return XBITC_E_ARGUMENT;
                    v->data = out[k].data;
                } else if (k < 0) {
                    if ((st = place(&pl, xb_nbytes(v), i, i, 0, &off)))
                        return st;
                    v->data = l.arena + off;
                }
                if (c.scratch_bytes) {
                    if ((st = place(&pl, c.scratch_bytes, -2 - i, i, 1, &soff)))
                        return st;
                    c.scratch = l.arena + soff;
                }
                if (running && (st = XB_OPS[n->op].run(&c)))
                    return st;
                if (c.scratch_bytes)
                    release(&pl, -2 - i);
            }
        }
        for (int32_t k = 0; k < n->n_frees; k++)
            release(&pl, n->frees[k]);
    }
    if (need)
        *need = fixed + pl.peak + 64;
    return XBITC_OK;
}

int32_t xbitc_plan(const xbitc_model *m, int32_t graph, const xbitc_tensor *inputs, int32_t n_inputs,
                   xbitc_tensor *outputs, int32_t n_outputs, void *workspace, uint64_t workspace_bytes,
                   uint64_t *run_bytes) {
    if (!run_bytes)
        return XBITC_E_ARGUMENT;
    return xb_execute(m, graph, inputs, n_inputs, outputs, n_outputs, workspace, workspace_bytes, NULL, 0, NULL,
                      run_bytes);
}

int32_t xbitc_run(const xbitc_model *m, int32_t graph, const xbitc_tensor *inputs, int32_t n_inputs,
                  xbitc_tensor *outputs, int32_t n_outputs, void *workspace, uint64_t workspace_bytes,
                  const xbitc_exec *exec) {
    return xb_execute(m, graph, inputs, n_inputs, outputs, n_outputs, workspace, workspace_bytes, exec, 1, NULL,
                      NULL);
}
