/* backend_cpu.c — the Llama 3 forward pass on the CPU, exactly as Hugging Face computes it
 * (float32 activations over bf16/f16/f32 weights), behind struct backend_ops.
 *
 * Owns: the KV block pool, f32 copies of the norm weights, RoPE frequencies, scratch buffers
 * sized at open from backend_params, and a persistent thread pool. Borrows the checkpoint's
 * weight matrices (memory-mapped) and reads them in place.
 *
 * One forward call runs every token of every sequence through each layer together, so each
 * weight matrix is streamed from memory once per call. Threads split matrix columns, attention
 * (token, kv head) items, never a reduction, so results do not depend on the batch, the
 * chunking of a prefill or the thread count (see cpu_matmul.h). Never prints, never exits;
 * every bad input is an error return naming the sequence and field.
 */
#include "backend_cpu.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoint.h"
#include "cpu_matmul.h"
#include "cpu_pool.h"
#include "rope.h"
#include "fwd_check.h"

#define CPU_BLOCK BACKEND_BLOCK_TOKENS
/* Thread split points are rounded to this many columns so that tiles stay whole and two
 * threads never write into the same cache line of an output row. */
#define CPU_SPLIT_ALIGN 16
#define CPU_MAX_BATCH_TOKENS (1 << 20)

struct cpu_backend {
    struct backend base; /* first: the engine sees a struct backend * */
    const struct model_config *cfg;
    const struct model_weights *w;
    enum cpu_isa isa;
    struct cpu_pool *pool;
    int n_threads;
    int max_tokens;
    int max_seqs;
    int max_ctx; /* most positions one sequence can attend over: max_seq_len, KV pool */

    int q_dim;   /* n_heads * head_dim */
    int kv_dim;  /* n_kv_heads * head_dim */
    int n_rep;   /* query heads per kv head */
    float attn_scale;

    /* KV pool (n_kv_blocks, n_layers, 2 [K, V], n_kv_heads, BLOCK, head_dim) f32: a block is
     * one contiguous slab, so copy_block is one memcpy. */
    float *kv;
    size_t kv_block_floats;
    size_t kv_layer_floats;
    size_t kv_head_floats;

    float *norms;    /* (2 * n_layers + 1, dim): attn_norm, mlp_norm per layer, final norm */
    float *inv_freq; /* (head_dim / 2) */

    /* Scratch, (max_tokens, ...) unless noted. */
    float *x;        /* (dim) residual stream */
    float *xn;       /* (dim) normed input of a projection */
    float *q;        /* (q_dim) */
    float *k;        /* (kv_dim) */
    float *v;        /* (kv_dim) */
    float *att;      /* (q_dim) attention output */
    float *gate;     /* (ffn_dim) gate, then silu(gate) * up */
    float *up;       /* (ffn_dim) */
    float *xo;       /* (dim) final-normed rows whose logits are wanted */
    float *rope_cos; /* (head_dim / 2) */
    float *rope_sin;
    float **rows;    /* row pointer arrays, carved below */
    float **rows_q, **rows_k, **rows_v, **rows_x, **rows_gate, **rows_up, **rows_out;
    float **rows_l0; /* (max_seqs) FWD_LOGIT0 destinations */
    float *xo_l0;    /* (max_seqs, dim) final-normed rows for FWD_LOGIT0 */
    int *tok_seq;    /* (max_tokens) sequence index of each token of the call */
    int *tok_pos;    /* (max_tokens) absolute position */
    float *scores;   /* (n_threads, n_rep, max_ctx) attention probabilities */

    /* Per-block stamps used to reject calls whose sequences write blocks others use. */
    struct fwd_stamps stamps;
};

static const struct backend_ops cpu_ops;

/* ---- allocation helpers ---------------------------------------------------------------- */

static void *cpu_calloc(size_t a, size_t b, size_t elem, const char *what, char *err,
                        size_t err_len)
{
    size_t n, bytes;
    if (__builtin_mul_overflow(a, b, &n) || __builtin_mul_overflow(n, elem, &bytes)) {
        snprintf(err, err_len, "%s: size overflows (%zu x %zu)", what, a, b);
        return NULL;
    }
    void *p = calloc(bytes ? bytes : 1, 1);
    if (!p)
        snprintf(err, err_len, "%s: out of memory (%zu MiB)", what, bytes >> 20);
    return p;
}

/* ---- open-time setup ------------------------------------------------------------------- */

/* ---- open / destroy ------------------------------------------------------------------- */

static void cpu_destroy(struct backend *base)
{
    struct cpu_backend *be = (struct cpu_backend *)base;
    if (!be)
        return;
    cpu_pool_destroy(&be->pool);
    free(be->kv);
    free(be->norms);
    free(be->inv_freq);
    free(be->x);
    free(be->xn);
    free(be->q);
    free(be->k);
    free(be->v);
    free(be->att);
    free(be->gate);
    free(be->up);
    free(be->xo);
    free(be->rope_cos);
    free(be->rope_sin);
    free(be->rows);
    free(be->xo_l0);
    free(be->tok_seq);
    free(be->tok_pos);
    free(be->scores);
    free(be->stamps.blk_call);
    free(be->stamps.blk_writer);
    free(be);
}

static void cpu_carve_rows(float **rows, float *base, int n, int width)
{
    for (int i = 0; i < n; i++)
        rows[i] = base + (size_t)i * (size_t)width;
}

int backend_cpu_open(const struct checkpoint *ck, const struct backend_params *p,
                     struct backend **out, char *err, size_t err_len)
{
    *out = NULL;
    struct cpu_backend *be = NULL;
    if (!ck || !p) {
        snprintf(err, err_len, "cpu backend: no checkpoint or parameters");
        return -1;
    }
    const struct model_config *c = checkpoint_config(ck);
    const struct model_weights *w = checkpoint_weights(ck);
    if (fwd_check_config(c, err, err_len) || fwd_check_weights(c, w, err, err_len))
        return -1;

    if (p->max_batch_tokens < 1 || p->max_batch_tokens > CPU_MAX_BATCH_TOKENS) {
        snprintf(err, err_len, "max_batch_tokens %d: expected 1..%d", p->max_batch_tokens,
                 CPU_MAX_BATCH_TOKENS);
        return -1;
    }
    if (p->max_batch_seqs < 1 || p->max_batch_seqs > p->max_batch_tokens) {
        snprintf(err, err_len, "max_batch_seqs %d: expected 1..max_batch_tokens (%d)",
                 p->max_batch_seqs, p->max_batch_tokens);
        return -1;
    }
    int64_t n_blocks = p->n_kv_blocks;
    if (n_blocks == 0 && p->kv_tokens > 0)
        n_blocks = ((int64_t)p->kv_tokens + CPU_BLOCK - 1) / CPU_BLOCK;
    if (p->n_kv_blocks < 0 || p->kv_tokens < 0 || n_blocks < 1 || n_blocks > INT32_MAX / 2) {
        snprintf(err, err_len, "KV pool: n_kv_blocks %d / kv_tokens %d: expected a positive size",
                 p->n_kv_blocks, p->kv_tokens);
        return -1;
    }

    enum cpu_isa isa = cpu_isa_best();
    const char *isa_env = getenv("ITS_CPU_ISA");
    if (isa_env && *isa_env) {
        if (cpu_isa_parse(isa_env, &isa) != 0) {
            snprintf(err, err_len, "ITS_CPU_ISA=%s: expected generic, avx2 or avx512", isa_env);
            return -1;
        }
        if (!cpu_isa_supported(isa)) {
            snprintf(err, err_len, "ITS_CPU_ISA=%s: this CPU does not support it", isa_env);
            return -1;
        }
    }

    be = calloc(1, sizeof *be);
    if (!be) {
        snprintf(err, err_len, "cpu backend: out of memory");
        return -1;
    }
    be->base.ops = &cpu_ops;
    be->base.cfg = c;
    be->base.n_kv_blocks = (int)n_blocks;
    be->cfg = c;
    be->w = w;
    be->isa = isa;
    be->max_tokens = p->max_batch_tokens;
    be->max_seqs = p->max_batch_seqs;
    be->q_dim = c->n_heads * c->head_dim;
    be->kv_dim = c->n_kv_heads * c->head_dim;
    be->n_rep = c->n_heads / c->n_kv_heads;
    be->attn_scale = 1.0f / sqrtf((float)c->head_dim);
    int64_t pool_pos = n_blocks * CPU_BLOCK;
    be->max_ctx = pool_pos < c->max_seq_len ? (int)pool_pos : c->max_seq_len;

    if (cpu_pool_new(p->n_threads, &be->pool, err, err_len) != 0)
        goto fail;
    be->n_threads = cpu_pool_size(be->pool);

    size_t T = (size_t)be->max_tokens, S = (size_t)be->max_seqs, dim = (size_t)c->dim;
    be->kv_head_floats = (size_t)CPU_BLOCK * (size_t)c->head_dim;
    be->kv_layer_floats = 2 * (size_t)c->n_kv_heads * be->kv_head_floats;
    be->kv_block_floats = (size_t)c->n_layers * be->kv_layer_floats;
    char what[96];
    snprintf(what, sizeof what, "KV pool of %lld blocks", (long long)n_blocks);
    /* Linux overcommits: a pool larger than RAM would be handed out and the process killed
     * later, mid-request. Refuse it here, where the error can still name the cause. */
    double kv_bytes = (double)n_blocks * (double)be->kv_block_floats * sizeof(float);
    double ram = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGE_SIZE);
    if (ram > 0 && kv_bytes > ram) {
        snprintf(err, err_len, "%s needs %.1f GiB, more than this machine's %.1f GiB of memory",
                 what, kv_bytes / (1 << 30), ram / (1 << 30));
        goto fail;
    }
    if (!(be->kv = cpu_calloc((size_t)n_blocks, be->kv_block_floats, sizeof(float), what, err,
                              err_len)))
        goto fail;

    if (!(be->norms = cpu_calloc(2 * (size_t)c->n_layers + 1, dim, sizeof(float), "norms", err,
                                 err_len)) ||
        !(be->inv_freq = cpu_calloc((size_t)c->head_dim / 2, 1, sizeof(float), "rope", err,
                                    err_len)) ||
        !(be->x = cpu_calloc(T, dim, sizeof(float), "scratch x", err, err_len)) ||
        !(be->xn = cpu_calloc(T, dim, sizeof(float), "scratch xn", err, err_len)) ||
        !(be->q = cpu_calloc(T, (size_t)be->q_dim, sizeof(float), "scratch q", err, err_len)) ||
        !(be->k = cpu_calloc(T, (size_t)be->kv_dim, sizeof(float), "scratch k", err, err_len)) ||
        !(be->v = cpu_calloc(T, (size_t)be->kv_dim, sizeof(float), "scratch v", err, err_len)) ||
        !(be->att = cpu_calloc(T, (size_t)be->q_dim, sizeof(float), "scratch att", err,
                               err_len)) ||
        !(be->gate = cpu_calloc(T, (size_t)c->ffn_dim, sizeof(float), "scratch gate", err,
                                err_len)) ||
        !(be->up = cpu_calloc(T, (size_t)c->ffn_dim, sizeof(float), "scratch up", err,
                              err_len)) ||
        !(be->xo = cpu_calloc(T, dim, sizeof(float), "scratch xo", err, err_len)) ||
        !(be->xo_l0 = cpu_calloc(S, dim, sizeof(float), "scratch xo_l0", err, err_len)) ||
        !(be->rope_cos = cpu_calloc(T, (size_t)c->head_dim / 2, sizeof(float), "scratch rope",
                                    err, err_len)) ||
        !(be->rope_sin = cpu_calloc(T, (size_t)c->head_dim / 2, sizeof(float), "scratch rope",
                                    err, err_len)) ||
        !(be->rows = cpu_calloc(7 * T + S, 1, sizeof(float *), "scratch rows", err, err_len)) ||
        !(be->tok_seq = cpu_calloc(T, 1, sizeof(int), "scratch tokens", err, err_len)) ||
        !(be->tok_pos = cpu_calloc(T, 1, sizeof(int), "scratch tokens", err, err_len)) ||
        !(be->scores = cpu_calloc((size_t)be->n_threads * (size_t)be->n_rep,
                                  (size_t)be->max_ctx, sizeof(float), "attention scores", err,
                                  err_len)) ||
        !(be->stamps.blk_call = cpu_calloc((size_t)n_blocks, 1, sizeof(unsigned),
                                           "block stamps", err, err_len)) ||
        !(be->stamps.blk_writer = cpu_calloc((size_t)n_blocks, 1, sizeof(int), "block stamps",
                                             err, err_len)))
        goto fail;

    be->rows_q = be->rows;
    be->rows_k = be->rows_q + T;
    be->rows_v = be->rows_k + T;
    be->rows_x = be->rows_v + T;
    be->rows_gate = be->rows_x + T;
    be->rows_up = be->rows_gate + T;
    be->rows_out = be->rows_up + T;
    be->rows_l0 = be->rows_out + T;
    cpu_carve_rows(be->rows_q, be->q, (int)T, be->q_dim);
    cpu_carve_rows(be->rows_k, be->k, (int)T, be->kv_dim);
    cpu_carve_rows(be->rows_v, be->v, (int)T, be->kv_dim);
    cpu_carve_rows(be->rows_x, be->x, (int)T, c->dim);
    cpu_carve_rows(be->rows_gate, be->gate, (int)T, c->ffn_dim);
    cpu_carve_rows(be->rows_up, be->up, (int)T, c->ffn_dim);

    for (int l = 0; l < c->n_layers; l++) {
        const struct layer_weights *L = &w->layers[l];
        cpu_to_f32(L->attn_norm.data, L->attn_norm.dtype, 0, be->norms + (size_t)(2 * l) * dim,
                   c->dim);
        cpu_to_f32(L->mlp_norm.data, L->mlp_norm.dtype, 0,
                   be->norms + (size_t)(2 * l + 1) * dim, c->dim);
    }
    cpu_to_f32(w->final_norm.data, w->final_norm.dtype, 0,
               be->norms + (size_t)(2 * c->n_layers) * dim, c->dim);
    rope_inv_freq(c, be->inv_freq);

    *out = &be->base;
    return 0;

fail:
    cpu_destroy(&be->base);
    return -1;
}

const char *backend_cpu_isa(const struct backend *base)
{
    if (!base || base->ops != &cpu_ops)
        return NULL;
    return cpu_isa_name(((const struct cpu_backend *)base)->isa);
}

int backend_cpu_threads(const struct backend *base)
{
    if (!base || base->ops != &cpu_ops)
        return 0;
    return ((const struct cpu_backend *)base)->n_threads;
}

/* ---- per-row math ------------------------------------------------------------------------ */

/* x * rsqrt(mean(x^2) + eps) * w, in f32 as transformers' LlamaRMSNorm; the sum of squares
 * keeps 8 interleaved partial sums (fixed order, vectorisable). */
static void cpu_rmsnorm(const float *x, const float *w, float *y, int n, float eps)
{
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++)
            acc[l] += x[i + l] * x[i + l];
    for (int l = 0; i + l < n; l++)
        acc[l] += x[i + l] * x[i + l];
    float ss = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (i = 0; i < n; i++)
        y[i] = w[i] * (x[i] * r);
}

/* HF rotate_half convention: element i pairs with i + head_dim/2 (not interleaved). */
static void cpu_rope(float *v, const float *cs, const float *sn, int half)
{
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
    }
}

/* ---- parallel jobs ------------------------------------------------------------------------ */

static int cpu_split(int n, int t, int nth)
{
    if (t >= nth)
        return n;
    int v = (int)((int64_t)n * t / nth);
    return v - v % CPU_SPLIT_ALIGN;
}

/* Up to three matmuls over the same input whose output columns are concatenated for the
 * thread split (q, k, v share one pass and one barrier). With `swiglu`, parts 0 and 1 are
 * gate and up of the same width, split alike, and each thread finishes its columns with
 * gate = silu(gate) * up. */
struct cpu_mm_job {
    enum cpu_isa isa;
    int n_parts;
    struct cpu_mm parts[3];
    int swiglu;
};

static void cpu_mm_job_run(void *arg, int tid, int nth)
{
    const struct cpu_mm_job *job = arg;
    if (job->swiglu) {
        const struct cpu_mm *g = &job->parts[0], *u = &job->parts[1];
        int lo = cpu_split(g->n, tid, nth), hi = cpu_split(g->n, tid + 1, nth);
        if (lo >= hi)
            return;
        cpu_mm_cols(job->isa, g, lo, hi);
        cpu_mm_cols(job->isa, u, lo, hi);
        for (int i = 0; i < g->m; i++) {
            float *gr = g->y[i], *ur = u->y[i];
            for (int j = lo; j < hi; j++) {
                float a = gr[j];
                gr[j] = a / (1.0f + expf(-a)) * ur[j];
            }
        }
        return;
    }
    int total = 0;
    for (int p = 0; p < job->n_parts; p++)
        total += job->parts[p].n;
    int lo = cpu_split(total, tid, nth), hi = cpu_split(total, tid + 1, nth);
    int off = 0;
    for (int p = 0; p < job->n_parts && lo < hi; p++) {
        const struct cpu_mm *mm = &job->parts[p];
        int a = lo - off, b = hi - off;
        if (a < 0)
            a = 0;
        if (b > mm->n)
            b = mm->n;
        if (a < b)
            cpu_mm_cols(job->isa, mm, a, b);
        off += mm->n;
    }
}

static void cpu_mm_set(struct cpu_mm *mm, const float *x, size_t ldx, int m,
                       const struct tensor *w, float *const *y, int accumulate)
{
    mm->x = x;
    mm->ldx = ldx;
    mm->m = m;
    mm->w = w->data;
    mm->wtype = w->dtype;
    mm->n = (int)w->shape[0];
    mm->k = (int)w->shape[1];
    mm->y = y;
    mm->accumulate = accumulate;
}

struct cpu_att_job {
    struct cpu_backend *be;
    const struct fwd_seq *seqs;
    int layer;
    int n_items; /* tokens x kv heads */
    _Atomic int next;
};

/* One item = one token's query heads that share kv head g: their scores, softmax and
 * weighted sum of values over positions [0, pos], each K/V row read once for the group. The
 * order over positions is fixed, so chunking a prefill differently changes no bit. */
static void cpu_att_item(struct cpu_backend *be, const struct fwd_seq *seqs, int layer, int t,
                         int g, float *sc)
{
    const struct model_config *c = be->cfg;
    const int hd = c->head_dim, rep = be->n_rep, n_ctx = be->tok_pos[t] + 1;
    const int32_t *table = seqs[be->tok_seq[t]].block_table;
    const float *q = be->q + (size_t)t * (size_t)be->q_dim + (size_t)g * (size_t)rep * hd;
    float *o = be->att + (size_t)t * (size_t)be->q_dim + (size_t)g * (size_t)rep * hd;
    const size_t k_off = (size_t)layer * be->kv_layer_floats + (size_t)g * be->kv_head_floats;
    const size_t v_off = k_off + (size_t)c->n_kv_heads * be->kv_head_floats;
    const size_t stride = (size_t)be->max_ctx;

    for (int j = 0; j < n_ctx; j++) {
        const float *kr = be->kv + (size_t)table[j / CPU_BLOCK] * be->kv_block_floats + k_off +
                          (size_t)(j % CPU_BLOCK) * hd;
        for (int r = 0; r < rep; r++)
            sc[(size_t)r * stride + j] = cpu_dot(be->isa, q + (size_t)r * hd, kr, hd) *
                                         be->attn_scale;
    }
    for (int r = 0; r < rep; r++) {
        float *s = sc + (size_t)r * stride;
        float mx = s[0];
        for (int j = 1; j < n_ctx; j++)
            mx = s[j] > mx ? s[j] : mx;
        float sum = 0.0f;
        for (int j = 0; j < n_ctx; j++) {
            s[j] = expf(s[j] - mx);
            sum += s[j];
        }
        for (int j = 0; j < n_ctx; j++)
            s[j] = s[j] / sum;
    }
    memset(o, 0, (size_t)rep * hd * sizeof *o);
    for (int j = 0; j < n_ctx; j++) {
        const float *vr = be->kv + (size_t)table[j / CPU_BLOCK] * be->kv_block_floats + v_off +
                          (size_t)(j % CPU_BLOCK) * hd;
        for (int r = 0; r < rep; r++)
            cpu_axpy(be->isa, sc[(size_t)r * stride + j], vr, o + (size_t)r * hd, hd);
    }
}

static void cpu_att_job_run(void *arg, int tid, int nth)
{
    struct cpu_att_job *job = arg;
    struct cpu_backend *be = job->be;
    float *sc = be->scores + (size_t)tid * (size_t)be->n_rep * (size_t)be->max_ctx;
    (void)nth;
    for (;;) {
        int it = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (it >= job->n_items)
            return;
        cpu_att_item(be, job->seqs, job->layer, it / be->cfg->n_kv_heads,
                     it % be->cfg->n_kv_heads, sc);
    }
}

/* ---- forward ------------------------------------------------------------------------------- */

static void cpu_run_mm(struct cpu_backend *be, struct cpu_mm_job *job)
{
    job->isa = be->isa;
    cpu_pool_run(be->pool, cpu_mm_job_run, job);
}

static void cpu_layer(struct cpu_backend *be, const struct fwd_seq *seqs, int l, int T)
{
    const struct model_config *c = be->cfg;
    const struct layer_weights *L = &be->w->layers[l];
    const size_t dim = (size_t)c->dim;
    const int hd = c->head_dim, half = hd / 2;

    const float *wn = be->norms + (size_t)(2 * l) * dim;
    for (int t = 0; t < T; t++)
        cpu_rmsnorm(be->x + t * dim, wn, be->xn + t * dim, c->dim, c->norm_eps);

    struct cpu_mm_job job = {.n_parts = 3};
    cpu_mm_set(&job.parts[0], be->xn, dim, T, &L->wq, be->rows_q, 0);
    cpu_mm_set(&job.parts[1], be->xn, dim, T, &L->wk, be->rows_k, 0);
    cpu_mm_set(&job.parts[2], be->xn, dim, T, &L->wv, be->rows_v, 0);
    cpu_run_mm(be, &job);

    /* RoPE, then K/V of the new positions into their blocks before anyone attends. */
    for (int t = 0; t < T; t++) {
        const float *cs = be->rope_cos + (size_t)t * half, *sn = be->rope_sin + (size_t)t * half;
        for (int h = 0; h < c->n_heads; h++)
            cpu_rope(be->rows_q[t] + (size_t)h * hd, cs, sn, half);
        const int p = be->tok_pos[t];
        const size_t blk = (size_t)seqs[be->tok_seq[t]].block_table[p / CPU_BLOCK];
        float *base = be->kv + blk * be->kv_block_floats + (size_t)l * be->kv_layer_floats +
                      (size_t)(p % CPU_BLOCK) * hd;
        for (int g = 0; g < c->n_kv_heads; g++) {
            float *kr = be->rows_k[t] + (size_t)g * hd;
            cpu_rope(kr, cs, sn, half);
            memcpy(base + (size_t)g * be->kv_head_floats, kr, (size_t)hd * sizeof(float));
            memcpy(base + (size_t)(c->n_kv_heads + g) * be->kv_head_floats,
                   be->rows_v[t] + (size_t)g * hd, (size_t)hd * sizeof(float));
        }
    }

    struct cpu_att_job att = {.be = be, .seqs = seqs, .layer = l, .n_items = T * c->n_kv_heads};
    atomic_init(&att.next, 0);
    cpu_pool_run(be->pool, cpu_att_job_run, &att);

    /* x += o_proj(att): the residual add happens in the kernel, after the dot is rounded. */
    job = (struct cpu_mm_job){.n_parts = 1};
    cpu_mm_set(&job.parts[0], be->att, (size_t)be->q_dim, T, &L->wo, be->rows_x, 1);
    cpu_run_mm(be, &job);

    const float *wm = be->norms + (size_t)(2 * l + 1) * dim;
    for (int t = 0; t < T; t++)
        cpu_rmsnorm(be->x + t * dim, wm, be->xn + t * dim, c->dim, c->norm_eps);

    job = (struct cpu_mm_job){.n_parts = 2, .swiglu = 1};
    cpu_mm_set(&job.parts[0], be->xn, dim, T, &L->w_gate, be->rows_gate, 0);
    cpu_mm_set(&job.parts[1], be->xn, dim, T, &L->w_up, be->rows_up, 0);
    cpu_run_mm(be, &job);

    job = (struct cpu_mm_job){.n_parts = 1};
    cpu_mm_set(&job.parts[0], be->gate, (size_t)c->ffn_dim, T, &L->w_down, be->rows_x, 1);
    cpu_run_mm(be, &job);
}

static int cpu_forward(struct backend *base, const struct fwd_seq *seqs, int n_seqs, char *err,
                       size_t err_len)
{
    struct cpu_backend *be = (struct cpu_backend *)base;
    const struct model_config *c = be->cfg;
    const struct model_weights *w = be->w;
    const size_t dim = (size_t)c->dim;
    const int half = c->head_dim / 2;
    int T = 0;
    if (fwd_check_call(&be->base, seqs, n_seqs, be->max_seqs, be->max_tokens, be->max_ctx,
                       &be->stamps, &T, err, err_len) != 0)
        return -1;

    int t = 0;
    for (int s = 0; s < n_seqs; s++) {
        for (int i = 0; i < seqs[s].n_tokens; i++, t++) {
            be->tok_seq[t] = s;
            be->tok_pos[t] = seqs[s].pos + i;
            cpu_to_f32(w->embed.data, w->embed.dtype, (size_t)seqs[s].tokens[i] * dim,
                       be->x + (size_t)t * dim, c->dim);
            /* angle = position * inv_freq in f32, as transformers' rotary embedding */
            for (int j = 0; j < half; j++) {
                float a = (float)be->tok_pos[t] * be->inv_freq[j];
                be->rope_cos[(size_t)t * half + j] = cosf(a);
                be->rope_sin[(size_t)t * half + j] = sinf(a);
            }
        }
    }

    for (int l = 0; l < c->n_layers; l++)
        cpu_layer(be, seqs, l, T);

    /* Final norm only for rows whose logits are wanted; full-vocab rows go through one
     * matmul writing straight into the callers' buffers, FWD_LOGIT0 rows are one column. */
    const float *wf = be->norms + (size_t)(2 * c->n_layers) * dim;
    int n_out = 0, n_l0 = 0;
    t = 0;
    for (int s = 0; s < n_seqs; s++) {
        const struct fwd_seq *q = &seqs[s];
        int last = t + q->n_tokens - 1;
        if (q->output == FWD_ALL) {
            for (int i = 0; i < q->n_tokens; i++, n_out++) {
                cpu_rmsnorm(be->x + (size_t)(t + i) * dim, wf, be->xo + (size_t)n_out * dim,
                            c->dim, c->norm_eps);
                be->rows_out[n_out] = q->out + (size_t)i * (size_t)c->vocab_size;
            }
        } else if (q->output == FWD_LAST) {
            cpu_rmsnorm(be->x + (size_t)last * dim, wf, be->xo + (size_t)n_out * dim, c->dim,
                        c->norm_eps);
            be->rows_out[n_out++] = q->out;
        } else if (q->output == FWD_LOGIT0) {
            cpu_rmsnorm(be->x + (size_t)last * dim, wf, be->xo_l0 + (size_t)n_l0 * dim, c->dim,
                        c->norm_eps);
            be->rows_l0[n_l0++] = q->out;
        }
        t += q->n_tokens;
    }
    if (n_out > 0) {
        struct cpu_mm_job job = {.n_parts = 1};
        cpu_mm_set(&job.parts[0], be->xo, dim, n_out, &w->lm_head, be->rows_out, 0);
        cpu_run_mm(be, &job);
    }
    if (n_l0 > 0) {
        struct cpu_mm mm;
        cpu_mm_set(&mm, be->xo_l0, dim, n_l0, &w->lm_head, be->rows_l0, 0);
        cpu_mm_cols(be->isa, &mm, 0, 1);
    }
    return 0;
}

static int cpu_copy_block(struct backend *base, int src, int dst, char *err, size_t err_len)
{
    struct cpu_backend *be = (struct cpu_backend *)base;
    int n = be->base.n_kv_blocks;
    if (src < 0 || src >= n || dst < 0 || dst >= n) {
        snprintf(err, err_len, "copy_block %d -> %d: block ids must be in 0..%d", src, dst,
                 n - 1);
        return -1;
    }
    if (src != dst)
        memcpy(be->kv + (size_t)dst * be->kv_block_floats,
               be->kv + (size_t)src * be->kv_block_floats, be->kv_block_floats * sizeof(float));
    return 0;
}

static const struct backend_ops cpu_ops = {
    .name = "cpu",
    .forward = cpu_forward,
    .copy_block = cpu_copy_block,
    .destroy = cpu_destroy,
};
