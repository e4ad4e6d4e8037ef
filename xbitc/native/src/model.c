/* Opening model.bin (format: xbitc/native/modelbin.py): every byte is checked before anything is built from it,
 * then the handle (tensors, packed matrices with absolute record addresses, programs with their liveness) is laid
 * out in the caller's memory. The same walk runs twice: once counting bytes (mem NULL), once building. */
#include <string.h>

#include "model.h"

#define MAGIC "XBITCBIN"
#define VERSION 1
#define HEADER_BYTES 64
#define MAX_NODES (1 << 18) /* placement is linear in live blocks per node: bound the work a file can ask for */

/* operands (min, max) and attribute counts of each core op, as ir/core.py declares them */
static const int8_t OP_ARITY[XB_NUM_OPS][3] = {
    [XB_OP_embed] = {2, 2, 0},    [XB_OP_linear] = {2, 3, 0},   [XB_OP_matmul] = {2, 2, 0},
    [XB_OP_conv2d] = {2, 3, 2},   [XB_OP_rmsnorm] = {2, 2, 1},  [XB_OP_layernorm] = {1, 3, 1},
    [XB_OP_rope] = {3, 3, 0},     [XB_OP_attention] = {3, 4, 3}, [XB_OP_softmax] = {1, 1, 1},
    [XB_OP_gelu] = {1, 1, 1},     [XB_OP_pow] = {1, 1, 1},      [XB_OP_where] = {3, 3, 0},
    [XB_OP_mean] = {1, 1, 2},     [XB_OP_sum] = {1, 1, 2},      [XB_OP_reshape] = {2, 2, 0},
    [XB_OP_expand] = {2, 2, 0},   [XB_OP_transpose] = {1, 1, 2}, [XB_OP_permute] = {1, 1, 1},
    [XB_OP_unsqueeze] = {1, 1, 1}, [XB_OP_squeeze] = {1, 1, 1}, [XB_OP_slice] = {3, 3, 2},
    [XB_OP_select] = {1, 1, 2},   [XB_OP_concat] = {1, 1, 1},   [XB_OP_cast] = {1, 1, 1},
    [XB_OP_arange] = {1, 1, 1},   [XB_OP_full] = {1, 1, 2},     [XB_OP_gather] = {2, 2, 1},
    [XB_OP_dim] = {1, 1, 1},
};

static int arity(int op, int k) {
    if (op >= XB_OP_neg && op <= XB_OP_logical_not)
        return k == 2 ? 0 : 1;
    if (op >= XB_OP_add)
        return k == 2 ? 0 : 2;
    return OP_ARITY[op][k];
}

typedef struct reader {
    const int64_t *w;
    int64_t n, pos;
} reader;

static int take(reader *r, int64_t *v) {
    if (r->pos >= r->n)
        return 0;
    *v = r->w[r->pos++];
    return 1;
}

typedef struct arena {
    uint8_t *base; /* NULL: count only */
    uint64_t used, cap;
} arena;

static void *alloc(arena *a, uint64_t bytes) {
    uint64_t at = (a->used + 63) & ~(uint64_t)63;
    a->used = at + bytes;
    return a->base && a->used <= a->cap ? a->base + at : NULL;
}

static uint32_t crc32(const uint8_t *p, uint64_t n) {
    uint32_t table[256];
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
        table[i] = c;
    }
    uint32_t c = 0xffffffffu;
    for (uint64_t i = 0; i < n; i++)
        c = table[(c ^ p[i]) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

static uint64_t u64_at(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static uint32_t u32_at(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* A block of the data section: [off, off + bytes) inside it and aligned as the format promises. */
static int in_data(const xbitc_model *m, int64_t off, int64_t bytes) {
    return off >= 0 && bytes >= 0 && off % 64 == 0 && (uint64_t)off <= m->data_bytes &&
           (uint64_t)bytes <= m->data_bytes - (uint64_t)off;
}

static int64_t record_bytes(int64_t kind, int64_t ncols) {
    return (kind == 9 ? ncols * 16 : (ncols + 31) / 32 * kind * 64) + 48;
}

static int32_t read_packed(xbitc_model *m, reader *r, arena *a, xb_value *v) {
    int64_t f[8];
    for (int k = 0; k < 8; k++)
        if (!take(r, &f[k]))
            return XBITC_E_FORMAT;
    int64_t out = f[0], in = f[1], nrec = f[2], act = f[3], rec_off = f[4], buf_off = f[5], buf_bytes = f[6];
    int64_t perm_off = f[7];
    if (act != 0 && act != 1)
        return XBITC_E_FORMAT;
    if (!xb_packed_runs(act))
        return XBITC_E_UNSUPPORTED;
    if (out < 1 || in < 1 || out > (1 << 30) || in > (1 << 30) || nrec < 0 || nrec > (1 << 24) ||
        !in_data(m, rec_off, nrec * 56) || !in_data(m, buf_off, buf_bytes) ||
        (perm_off != -1 && !in_data(m, perm_off, in * 4)))
        return XBITC_E_FORMAT;
    const int64_t *rec = (const int64_t *)(m->data + rec_off);
    const int32_t *perm = perm_off == -1 ? NULL : (const int32_t *)(m->data + perm_off);
    /* the layout rowlane.pack writes, exactly: every read a kernel makes stays inside the buffer */
    /* the generated kernels keep per-column and per-record state on the stack (~4 bytes a padded column, 36 for
     * 1-bit q8 records, 4 a record): bounded here so no file can overflow a thread's stack */
    int64_t stride = 0, stack = 0;
    if (nrec > (1 << 16))
        return XBITC_E_FORMAT;
    for (int64_t k = 0; k < nrec; k++) {
        const int64_t *e = rec + 7 * k;
        if (e[0] < 1 || e[0] > (act ? 8 : 9) || e[1] < 1 || e[1] > in || e[5] < 0 || e[5] > in - e[1])
            return XBITC_E_FORMAT;
        stack += (e[1] + 31) / 32 * 32 * (e[0] == 1 && act ? 9 : 1);
        if (stack > (1 << 17))
            return XBITC_E_FORMAT;
        int64_t codes = record_bytes(e[0], e[1]) - 48;
        if (e[2] != stride || e[3] != stride + codes || e[4] != stride + codes + 32)
            return XBITC_E_FORMAT;
        stride += codes + 48;
    }
    for (int64_t k = 0; k < nrec; k++)
        if (rec[7 * k + 6] != stride)
            return XBITC_E_FORMAT;
    if (nrec && (out + 15) / 16 * stride != buf_bytes)
        return XBITC_E_FORMAT;
    if (perm)
        for (int64_t c = 0; c < in; c++)
            if (perm[c] < 0 || perm[c] >= in)
                return XBITC_E_FORMAT;
    xb_packed *p = alloc(a, sizeof(xb_packed));
    int64_t *table = alloc(a, (uint64_t)nrec * 56);
    if (p && v) {
        const uint8_t *buf = m->data + buf_off;
        for (int64_t k = 0; k < 7 * nrec; k++) /* offsets -> addresses */
            table[k] = rec[k] + (k % 7 >= 2 && k % 7 <= 4 ? (int64_t)(intptr_t)buf : 0);
        *p = (xb_packed){out, in, nrec, act, table, buf, (uint64_t)buf_bytes, perm};
        memset(v, 0, sizeof *v);
        v->dtype = XB_PACKED;
        v->rank = 2;
        v->shape[0] = out;
        v->shape[1] = in;
        v->packed = p;
    }
    return XBITC_OK;
}

static int32_t read_tensor(xbitc_model *m, reader *r, arena *a, xb_value *v) {
    int64_t kind, dtype, rank, dims[XBITC_MAX_RANK], off, bytes;
    if (!take(r, &kind))
        return XBITC_E_FORMAT;
    if (kind == 1)
        return read_packed(m, r, a, v);
    if (kind != 0 || !take(r, &dtype) || !take(r, &rank) || dtype < 1 || dtype > 3 || rank < 0 ||
        rank > XBITC_MAX_RANK)
        return XBITC_E_FORMAT;
    int64_t count = 1;
    for (int k = 0; k < rank; k++) {
        if (!take(r, &dims[k]) || dims[k] < 0 || dims[k] > ((int64_t)1 << 40))
            return XBITC_E_FORMAT;
        if (dims[k] && count > ((int64_t)1 << 40) / dims[k])
            return XBITC_E_FORMAT;
        count *= dims[k];
    }
    if (!xb_sizes_ok((int32_t)rank, dims))
        return XBITC_E_FORMAT;
    if (!take(r, &off) || !take(r, &bytes) || bytes != count * (int64_t)xb_dtype_size((int32_t)dtype) ||
        !in_data(m, off, bytes))
        return XBITC_E_FORMAT;
    if (v) {
        memset(v, 0, sizeof *v);
        v->dtype = (int32_t)dtype;
        v->rank = (int32_t)rank;
        memcpy(v->shape, dims, sizeof(int64_t) * (size_t)rank);
        xb_contiguous_strides(v);
        v->data = (void *)(m->data + off);
    }
    return XBITC_OK;
}

/* One operand: its tag and payload checked (refs to earlier value-making nodes); lists hold no lists. */
static int check_operand(reader *r, const xb_node *nodes, int64_t at, int depth, int32_t *items, int checking) {
    int64_t tag, v;
    if (!take(r, &tag))
        return 0;
    switch (tag) {
    case XB_T_NONE:
        return 1;
    case XB_T_REF:
        if (!take(r, &v) || v < 0 || v >= at)
            return 0;
        return !checking || nodes[v].op != XB_NODE_OUTPUT;
    case XB_T_INT:
    case XB_T_FLOAT:
    case XB_T_BOOL:
        return take(r, &v);
    case XB_T_LIST:
        if (depth || !take(r, &v) || v < 0 || v > 4096)
            return 0;
        if (v > *items)
            *items = (int32_t)v;
        for (int64_t k = 0; k < v; k++)
            if (!check_operand(r, nodes, at, 1, items, checking))
                return 0;
        return 1;
    default:
        return 0;
    }
}

static int check_attr(reader *r) {
    int64_t tag, v;
    if (!take(r, &tag))
        return 0;
    if (tag == XB_T_NONE)
        return 1;
    if (tag == XB_T_INT || tag == XB_T_FLOAT)
        return take(r, &v);
    if (tag != XB_T_LIST || !take(r, &v) || v < 0 || v > XBITC_MAX_RANK)
        return 0;
    for (int64_t k = 0; k < v; k++)
        if (!take(r, &tag))
            return 0;
    return 1;
}

/* Visit every REF among a node's operands (visit(ctx, node index of the operand, operand position)). */
void xb_refs(const xbitc_model *m, const xb_node *n, void (*visit)(void *, int32_t, int32_t), void *ctx) {
    reader r = {m->words, m->n_words, n->operands};
    int64_t tag = 0, v = 0, count = 0;
    for (int32_t k = 0; k < n->nin; k++) {
        take(&r, &tag);
        if (tag == XB_T_REF) {
            take(&r, &v);
            visit(ctx, (int32_t)v, k);
        } else if (tag == XB_T_LIST) {
            take(&r, &count);
            for (int64_t i = 0; i < count; i++) {
                take(&r, &tag);
                if (tag != XB_T_NONE)
                    take(&r, &v);
                if (tag == XB_T_REF)
                    visit(ctx, (int32_t)v, k);
            }
        } else if (tag != XB_T_NONE) {
            take(&r, &v);
        }
    }
}

static void note_use(void *ctx, int32_t ref, int32_t k) {
    int32_t *args = ctx; /* [user index, last_use array...] */
    (void)k;
    int32_t *last = args + 1;
    if (last[ref] < args[0])
        last[ref] = args[0];
}

static int32_t read_program(xbitc_model *m, reader *r, arena *a, xb_program *p, int building) {
    int64_t n;
    if (!take(r, &n) || n < 1 || n > MAX_NODES)
        return XBITC_E_FORMAT;
    xb_node *nodes = alloc(a, sizeof(xb_node) * (uint64_t)n);
    int32_t *last = alloc(a, sizeof(int32_t) * (uint64_t)(n + 1)); /* [user, last use...] while counting uses */
    int32_t *frees = alloc(a, sizeof(int32_t) * (uint64_t)n);
    int32_t *free_at = alloc(a, sizeof(int32_t) * (uint64_t)n);
    int32_t *inputs = alloc(a, sizeof(int32_t) * (uint64_t)n);
    xb_node scratch;
    int32_t n_inputs = 0, max_items = 0, output = -1;
    for (int64_t i = 0; i < n; i++) {
        xb_node *node = building ? &nodes[i] : &scratch;
        int64_t op, nin, nattr;
        if (!take(r, &op) || !take(r, &nin) || !take(r, &nattr) || nin < 0 || nattr < 0 || nattr > 8 ||
            nin > (op == XB_NODE_OUTPUT ? 65536 : 8))
            return XBITC_E_FORMAT;
        memset(node, 0, sizeof *node);
        node->op = (int32_t)op;
        node->nin = (int32_t)nin;
        node->nattr = (int32_t)nattr;
        node->operands = r->pos;
        if (output >= 0)
            return XBITC_E_FORMAT; /* the output node comes last */
        if (op == XB_NODE_INPUT) {
            int64_t tag, dtype, rank, len;
            if (nin || nattr != 3 || !take(r, &tag) || tag != XB_T_INT || !take(r, &dtype) || dtype < 1 ||
                dtype > 3 || !take(r, &tag) || tag != XB_T_INT || !take(r, &rank) || rank < 0 ||
                rank > XBITC_MAX_RANK || !take(r, &tag) || tag != XB_T_LIST || !take(r, &len) || len != rank)
                return XBITC_E_FORMAT;
            node->in_dtype = (int32_t)dtype;
            node->in_rank = (int32_t)rank;
            for (int k = 0; k < rank; k++)
                if (!take(r, &node->in_dims[k]) || node->in_dims[k] < -1)
                    return XBITC_E_FORMAT;
            if (building)
                inputs[n_inputs] = (int32_t)i;
            n_inputs++;
        } else if (op == XB_NODE_PARAM) {
            int64_t tag, t;
            if (nin || nattr != 1 || !take(r, &tag) || tag != XB_T_INT || !take(r, &t) || t < 0 ||
                t >= m->n_tensors)
                return XBITC_E_FORMAT;
            node->tensor = (int32_t)t;
        } else if (op == XB_NODE_OUTPUT) {
            if (nattr)
                return XBITC_E_FORMAT;
            for (int64_t k = 0; k < nin; k++) {
                int64_t tag;
                if (!take(r, &tag) || tag != XB_T_REF)
                    return XBITC_E_FORMAT;
                r->pos--;
                if (!check_operand(r, nodes, i, 0, &max_items, building))
                    return XBITC_E_FORMAT;
            }
            output = (int32_t)i;
        } else {
            if (op < 0 || op >= XB_NUM_OPS || nin < arity((int)op, 0) || nin > arity((int)op, 1) ||
                nattr != arity((int)op, 2))
                return XBITC_E_FORMAT;
            if (XB_OPS[op].view && (nin < 1 || r->pos >= r->n || r->w[r->pos] != XB_T_REF))
                return XBITC_E_FORMAT; /* a view aliases a node's data: operand 0 must be one */
            for (int64_t k = 0; k < nin; k++)
                if (!check_operand(r, nodes, i, 0, &max_items, building))
                    return XBITC_E_FORMAT;
            node->attrs = r->pos;
            for (int64_t k = 0; k < nattr; k++)
                if (!check_attr(r))
                    return XBITC_E_FORMAT;
        }
    }
    if (output != n - 1)
        return XBITC_E_FORMAT;
    if (building) {
        /* liveness: a value lives to its last use; a view keeps its root's data alive as long */
        last[0] = 0;
        for (int64_t i = 0; i < n; i++)
            last[1 + i] = (int32_t)i;
        for (int64_t i = 0; i < n; i++) {
            last[0] = (int32_t)i;
            xb_refs(m, &nodes[i], note_use, last);
            nodes[i].root = (int32_t)i;
        }
        for (int64_t i = 0; i < n; i++) {
            int op = nodes[i].op;
            if (op >= 0 && op < XB_NUM_OPS && XB_OPS[op].view) {
                reader rr = {m->words, m->n_words, nodes[i].operands};
                int64_t tag, v;
                take(&rr, &tag);
                if (tag != XB_T_REF || !take(&rr, &v))
                    return XBITC_E_FORMAT;
                nodes[i].root = nodes[v].root;
            }
        }
        for (int64_t i = 0; i < n; i++)
            free_at[i] = -1;
        for (int64_t i = 0; i < n; i++)
            if (free_at[nodes[i].root] < last[1 + i])
                free_at[nodes[i].root] = last[1 + i];
        /* bucket roots by the node after which they are freed */
        int32_t *count = last; /* the uses are counted: reuse the array */
        memset(count, 0, sizeof(int32_t) * (size_t)(n + 1));
        for (int64_t i = 0; i < n; i++)
            if (nodes[i].root == i && free_at[i] >= 0)
                count[free_at[i]]++;
        int32_t total = 0;
        for (int64_t i = 0; i < n; i++) {
            nodes[i].frees = frees + total;
            total += count[i];
        }
        for (int64_t i = 0; i < n; i++)
            if (nodes[i].root == i && free_at[i] >= 0) {
                xb_node *at = &nodes[free_at[i]];
                ((int32_t *)at->frees)[at->n_frees++] = (int32_t)i;
            }
    }
    p->n_nodes = (int32_t)n;
    p->nodes = nodes;
    p->inputs = inputs;
    p->n_inputs = n_inputs;
    p->n_outputs = building ? nodes[n - 1].nin : 0;
    p->max_items = max_items;
    return XBITC_OK;
}

static int32_t check_header(const void *bin, uint64_t size, xbitc_model *m, int crc) {
    const uint8_t *b = bin;
    if (!bin || ((uintptr_t)bin & 63))
        return XBITC_E_ARGUMENT;
    if (size < HEADER_BYTES || memcmp(b, MAGIC, 8))
        return XBITC_E_FORMAT;
    if (u32_at(b + 8) != VERSION)
        return XBITC_E_VERSION;
    uint64_t file = u64_at(b + 16), words_off = u64_at(b + 24), n_words = u64_at(b + 32);
    uint64_t data_off = u64_at(b + 40), data_bytes = u64_at(b + 48);
    if (u32_at(b + 12) != HEADER_BYTES || file != size || words_off != HEADER_BYTES || n_words > size / 8 ||
        data_off % 64 || data_off < words_off + 8 * n_words || data_off > size || data_bytes != size - data_off)
        return XBITC_E_FORMAT;
    if (crc && crc32(b + HEADER_BYTES, size - HEADER_BYTES) != u32_at(b + 56))
        return XBITC_E_CHECKSUM;
    m->words = (const int64_t *)(b + words_off);
    m->n_words = (int64_t)n_words;
    m->data = b + data_off;
    m->data_bytes = data_bytes;
    return XBITC_OK;
}

/* The whole walk; builds into a when a->base is set. */
static int32_t build(const void *bin, uint64_t size, arena *a, xbitc_model **out, int crc) {
    xbitc_model scratch, *m = alloc(a, sizeof(xbitc_model));
    int building = m != NULL;
    if (!building)
        m = &scratch;
    memset(m, 0, sizeof *m);
    int32_t st = check_header(bin, size, m, crc);
    if (st)
        return st;
    reader r = {m->words, m->n_words, 0};
    int64_t head[7];
    for (int k = 0; k < 7; k++)
        if (!take(&r, &head[k]))
            return XBITC_E_FORMAT;
    if (head[0] < 1 || head[0] > 3 || head[5] < 0 || head[5] > (1 << 24) || head[6] < 1 || head[6] > XB_MAX_PROGRAMS)
        return XBITC_E_FORMAT;
    for (int k = 1; k <= 4; k++) /* vocabulary, layers, kv heads, head dim */
        if (head[k] < 0 || head[k] > (k == 1 ? ((int64_t)1 << 32) : ((int64_t)1 << 20)))
            return XBITC_E_FORMAT;
    m->kind = (int32_t)head[0];
    m->vocab = head[1];
    m->layers = head[2];
    m->kv_heads = head[3];
    m->head_dim = head[4];
    m->n_tensors = (int32_t)head[5];
    m->n_programs = (int32_t)head[6];
    m->tensors = alloc(a, sizeof(xb_value) * (uint64_t)m->n_tensors);
    for (int32_t t = 0; t < m->n_tensors; t++)
        if ((st = read_tensor(m, &r, a, building ? &m->tensors[t] : NULL)))
            return st;
    for (int32_t g = 0; g < m->n_programs; g++)
        if ((st = read_program(m, &r, a, &m->prog[g], building)))
            return st;
    if (r.pos != r.n)
        return XBITC_E_FORMAT;
    if (building) {
        for (int32_t g = 0; g < m->n_programs; g++) {
            uint64_t need = xb_fixed_workspace(&m->prog[g]);
            if (need > m->plan_bytes)
                m->plan_bytes = need;
        }
        xb_find_caches(m);
        *out = m;
    }
    return XBITC_OK;
}

int32_t xbitc_model_bytes(const void *bin, uint64_t bin_bytes, uint64_t *bytes) {
    if (!bytes)
        return XBITC_E_ARGUMENT;
    arena a = {NULL, 0, 0};
    int32_t st = build(bin, bin_bytes, &a, NULL, 0); /* the checksum (one pass over the weights) is open's */
    *bytes = st ? 0 : a.used + 64;
    return st;
}

int32_t xbitc_model_open(const void *bin, uint64_t bin_bytes, void *mem, uint64_t mem_bytes, xbitc_model **model) {
    uint64_t need;
    if (!model || !mem)
        return XBITC_E_ARGUMENT;
    *model = NULL;
    int32_t st = xbitc_model_bytes(bin, bin_bytes, &need);
    if (st)
        return st;
    if (mem_bytes < need || ((uintptr_t)mem & 63))
        return XBITC_E_MEMORY;
    arena a = {mem, 0, mem_bytes};
    return build(bin, bin_bytes, &a, model, 1);
}

int32_t xbitc_model_info(const xbitc_model *m, xbitc_info *info) {
    if (!m || !info)
        return XBITC_E_ARGUMENT;
    memset(info, 0, sizeof *info);
    info->kind = m->kind;
    info->graphs = m->n_programs;
    info->vocab = m->vocab;
    info->layers = m->layers;
    info->kv_heads = m->kv_heads;
    info->head_dim = m->head_dim;
    info->plan_bytes = m->plan_bytes;
    for (int g = 0; g < m->n_programs && g < 2; g++) {
        info->n_inputs[g] = m->prog[g].n_inputs;
        info->n_outputs[g] = m->prog[g].n_outputs;
    }
    return XBITC_OK;
}
