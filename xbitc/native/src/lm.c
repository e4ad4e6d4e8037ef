/* Causal LM sessions: the decode step with its key/value caches held in the session and appended in place.
 *
 * The step graph (xbitc/stepgraph.py) returns concat(past, new) for every cache. When each such concat reads its
 * past input and nothing else reads either but attention (as keys or values), the output and size queries, a
 * session can keep the caches at a fixed capacity and write only the new positions: the past input becomes a
 * view of the cache and the concat an append (run.c). Program 2 is the step with last-token logits (xbitc/native/modelbin.py). */
#include <string.h>

#include "run.h"

#define ALIGN64(x) (((x) + 63) & ~(uint64_t)63)
#define LM_PROGRAM 2

typedef struct uses {
    const xb_program *p;
    int32_t user, watched_input, watched_concat, ok;
} uses;

static void check_use(void *ctx, int32_t ref, int32_t k) {
    uses *u = ctx;
    const xb_node *user = &u->p->nodes[u->user];
    if (ref == u->watched_input && u->user != u->watched_concat && user->op != XB_OP_dim) /* dim reads sizes */
        u->ok = 0;
    if (ref == u->watched_concat && user->op != XB_NODE_OUTPUT && !(user->op == XB_OP_attention && (k == 1 || k == 2)))
        u->ok = 0;
}

static int64_t attr_int(const xbitc_model *m, const xb_node *n, int32_t k, int *ok) {
    int64_t pos = n->attrs;
    for (int32_t i = 0; i < n->nattr; i++) {
        int64_t tag = m->words[pos++];
        if (i == k) {
            *ok = *ok && tag == XB_T_INT;
            return tag == XB_T_INT ? m->words[pos] : 0;
        }
        pos += tag == XB_T_LIST ? 1 + m->words[pos] : tag == XB_T_NONE ? 0 : 1;
    }
    *ok = 0;
    return 0;
}

static int cache_pattern(xbitc_model *m, xb_program *p) {
    int32_t caches = (int32_t)(2 * m->layers);
    xb_node *out = &p->nodes[p->n_nodes - 1];
    if (m->kind != XBITC_CAUSAL_LM || caches < 1 || p->n_inputs != 1 + caches || out->nin != 1 + caches)
        return 0;
    int64_t pos = out->operands + 2; /* past output 0 (logits): [REF, slot] */
    for (int32_t k = 1; k <= caches; k++, pos += 2) {
        int32_t c = (int32_t)m->words[pos + 1], input = p->inputs[k];
        xb_node *cat = &p->nodes[c], *past = &p->nodes[input];
        int ok = cat->op == XB_OP_concat && cat->nin == 1 && past->in_rank == 4 && past->in_dtype == XBITC_F32 &&
                 past->in_dims[1] == m->kv_heads && past->in_dims[3] == m->head_dim;
        int64_t dim = ok ? attr_int(m, cat, 0, &ok) : 0;
        const int64_t *w = m->words + cat->operands; /* [LIST, 2, REF, past, REF, new] */
        ok = ok && (dim == -2 || dim == 2) && w[0] == XB_T_LIST && w[1] == 2 && w[2] == XB_T_REF &&
             w[3] == input && w[4] == XB_T_REF && w[5] != input && cat->cache == 0;
        uses u = {p, 0, input, c, ok};
        for (u.user = 0; u.ok && u.user < p->n_nodes; u.user++)
            xb_refs(m, &p->nodes[u.user], check_use, &u);
        if (!u.ok)
            return 0;
        cat->cache = k;
    }
    return 1;
}

void xb_find_caches(xbitc_model *m) {
    if (m->n_programs > LM_PROGRAM)
        m->prog[LM_PROGRAM].caches_in_place = cache_pattern(m, &m->prog[LM_PROGRAM]);
}

struct xbitc_lm {
    const xbitc_model *m;
    int64_t capacity, max_feed, pos;
    int32_t n_io;
    xbitc_tensor *in, *out;
    float **caches;
    xb_plan *plan;
    float *logits;
    uint8_t *ws;
    uint64_t ws_bytes;
};

typedef struct lm_sizes {
    uint64_t head, io, cache_ptrs, plan, caches, logits, fixed;
} lm_sizes;

static lm_sizes sizes(const xbitc_model *m, int64_t capacity) {
    const xb_program *p = &m->prog[LM_PROGRAM];
    lm_sizes s;
    s.head = ALIGN64(sizeof(struct xbitc_lm));
    s.io = ALIGN64(2 * (uint64_t)p->n_inputs * sizeof(xbitc_tensor));
    s.cache_ptrs = ALIGN64(2 * (uint64_t)m->layers * sizeof(float *));
    s.plan = ALIGN64((uint64_t)p->n_nodes * sizeof(xb_plan));
    s.caches = 2 * (uint64_t)m->layers * ALIGN64((uint64_t)(m->kv_heads * capacity * m->head_dim) * sizeof(float));
    s.logits = ALIGN64((uint64_t)m->vocab * sizeof(float));
    s.fixed = s.head + s.io + s.cache_ptrs + s.plan + s.caches + s.logits;
    return s;
}

/* Inputs and outputs of a feed of n tokens after pos cached ones. */
static void shapes(const xbitc_model *m, xbitc_tensor *in, xbitc_tensor *out, int32_t n_io, int64_t pos, int64_t n) {
    memset(in, 0, sizeof(xbitc_tensor) * (size_t)n_io);
    memset(out, 0, sizeof(xbitc_tensor) * (size_t)n_io);
    in[0] = (xbitc_tensor){XBITC_I64, 2, {1, n}, NULL};
    out[0] = (xbitc_tensor){XBITC_F32, 3, {1, 1, m->vocab}, NULL};
    for (int32_t k = 1; k < n_io; k++) {
        in[k] = (xbitc_tensor){XBITC_F32, 4, {1, m->kv_heads, pos, m->head_dim}, NULL};
        out[k] = in[k];
        out[k].shape[2] = pos + n;
    }
}

static int32_t check(const xbitc_model *m, int64_t capacity, int64_t max_feed) {
    if (!m || capacity < 1 || max_feed < 1 || max_feed > capacity || capacity > ((int64_t)1 << 24))
        return XBITC_E_ARGUMENT;
    if (m->n_programs <= LM_PROGRAM || !m->prog[LM_PROGRAM].caches_in_place)
        return XBITC_E_UNSUPPORTED;
    return XBITC_OK;
}

/* Plan the largest feed (max_feed tokens filling the cache): every size the step computes grows with the tokens
 * fed and the positions cached, so the placement made there holds every smaller call. */
static int32_t plan_largest(const xbitc_model *m, int64_t capacity, int64_t max_feed, xbitc_tensor *in,
                            xbitc_tensor *out, void *ws, uint64_t ws_bytes, xb_plan *plan, uint64_t *need) {
    const xb_program *p = &m->prog[LM_PROGRAM];
    shapes(m, in, out, p->n_inputs, capacity - max_feed, max_feed);
    xb_session_io io = {capacity, max_feed, NULL, plan, plan != NULL};
    return xb_execute(m, LM_PROGRAM, in, p->n_inputs, out, p->n_inputs, ws, ws_bytes, NULL, 0, &io, need);
}

int32_t xbitc_lm_bytes(const xbitc_model *m, int64_t max_tokens, int64_t max_feed, void *plan_ws,
                       uint64_t plan_ws_bytes, uint64_t *bytes) {
    int32_t st = check(m, max_tokens, max_feed);
    if (st || !bytes)
        return st ? st : XBITC_E_ARGUMENT;
    /* the tensors and inputs this needs sit at the front of plan_ws, the plan's workspace after them */
    const xb_program *p = &m->prog[LM_PROGRAM];
    uint64_t io = ALIGN64(2 * (uint64_t)p->n_inputs * sizeof(xbitc_tensor)), need;
    if (!plan_ws || plan_ws_bytes < io + m->plan_bytes + 64 || ((uintptr_t)plan_ws & 63))
        return XBITC_E_MEMORY;
    xbitc_tensor *in = plan_ws, *out = in + p->n_inputs;
    if ((st = plan_largest(m, max_tokens, max_feed, in, out, (uint8_t *)plan_ws + io, plan_ws_bytes - io, NULL,
                           &need)))
        return st;
    *bytes = sizes(m, max_tokens).fixed + need;
    return XBITC_OK;
}

int32_t xbitc_lm_init(const xbitc_model *m, int64_t max_tokens, int64_t max_feed, void *mem, uint64_t mem_bytes,
                      xbitc_lm **lm) {
    int32_t st = check(m, max_tokens, max_feed);
    if (st || !lm || !mem)
        return st ? st : XBITC_E_ARGUMENT;
    *lm = NULL;
    lm_sizes s = sizes(m, max_tokens);
    if (((uintptr_t)mem & 63) || mem_bytes < s.fixed + m->plan_bytes)
        return XBITC_E_MEMORY;
    uint8_t *b = mem;
    struct xbitc_lm *l = (struct xbitc_lm *)b;
    memset(l, 0, sizeof *l);
    l->m = m;
    l->capacity = max_tokens;
    l->max_feed = max_feed;
    l->n_io = m->prog[LM_PROGRAM].n_inputs;
    b += s.head;
    l->in = (xbitc_tensor *)b;
    l->out = l->in + l->n_io;
    b += s.io;
    l->caches = (float **)b;
    b += s.cache_ptrs;
    l->plan = (xb_plan *)b;
    memset(l->plan, 0, s.plan); /* nodes the largest call places nothing for may place nothing later either */
    b += s.plan;
    uint64_t one = ALIGN64((uint64_t)(m->kv_heads * max_tokens * m->head_dim) * sizeof(float));
    for (int64_t k = 0; k < 2 * m->layers; k++)
        l->caches[k] = (float *)(b + (uint64_t)k * one);
    b += s.caches;
    l->logits = (float *)b;
    b += s.logits;
    l->ws = b;
    l->ws_bytes = mem_bytes - s.fixed;
    uint64_t need;
    if ((st = plan_largest(m, max_tokens, max_feed, l->in, l->out, l->ws, l->ws_bytes, l->plan, &need)))
        return st;
    if (need > l->ws_bytes)
        return XBITC_E_MEMORY;
    *lm = l;
    return XBITC_OK;
}

int32_t xbitc_lm_feed(xbitc_lm *l, const int64_t *ids, int64_t n, float *logits, const xbitc_exec *exec) {
    if (!l || !ids || n < 1 || n > l->max_feed)
        return XBITC_E_ARGUMENT;
    if (l->pos + n > l->capacity)
        return XBITC_E_UNSUPPORTED;
    shapes(l->m, l->in, l->out, l->n_io, l->pos, n);
    l->in[0].data = (void *)ids;
    l->out[0].data = l->logits;
    xb_session_io io = {l->capacity, n, l->caches, l->plan, 0};
    int32_t st = xb_execute(l->m, LM_PROGRAM, l->in, l->n_io, l->out, l->n_io, l->ws, l->ws_bytes, exec, 1, &io,
                            NULL);
    if (st)
        return st;
    l->pos += n;
    if (logits)
        memcpy(logits, l->logits, sizeof(float) * (size_t)l->m->vocab);
    return XBITC_OK;
}

int64_t xbitc_lm_tokens(const xbitc_lm *l) { return l ? l->pos : 0; }

void xbitc_lm_reset(xbitc_lm *l) {
    if (l)
        l->pos = 0;
}
