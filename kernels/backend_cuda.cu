/* backend_cuda.cu — the Llama forward pass on one CUDA device behind struct backend_ops.
 *
 * Owns: the device weights (one slab, bf16 matrices with q|k|v and gate|up concatenated at
 * load, f32 norm weights), the bf16 KV pool (attention.h layout), the f32 residual stream and
 * bf16 scratch sized from backend_params at open, the descriptor buffer (device + pinned host
 * mirror), the attention and sampling workspaces, a cuBLAS handle (gemm.h), one stream and the
 * cache of captured decode graphs. Borrows nothing after open: cfg is copied and host weight
 * views are only read during open.
 *
 * One forward call: validate exactly as the CPU backend (fwd_check.c), lay out the
 * descriptors on the host, upload them in one copy, run every layer on the stream, copy the
 * wanted logits / sampled ids / FWD_LOGIT0 values back, synchronise once. Errors: open reports
 * through err (KTRY); a CUDA or cuBLAS failure in forward or copy_block aborts the worker with
 * file:line and the call (kcheck.h), since device state is unknown after one.
 */
#include "backend_cuda.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "fwd_check.h"
#include "gemm.h"
#include "kcheck.h"
#include "kenv.h"
#include "rope.h"
#include "ops.h"
#include "sample.h"

#define CUDA_BLOCK BACKEND_BLOCK_TOKENS
#define CUDA_MAX_BATCH_TOKENS (1 << 20) /* as the CPU backend */
#define CUDA_ALIGN 256                  /* every carved buffer starts on this many bytes */
#define CUDA_STAGE_BYTES ((size_t)32 << 20) /* each of the two upload staging buffers */
#define CUDA_MAX_GRAPHS 32              /* cached decode graphs; least recently used evicted */
#define CUDA_GRAPH_MIN_CTX 256          /* smallest ctx_bound bucket of a graph key */
#define CUDA_HEAD_MIN_ROWS 64           /* LM head rows per chunk, at least (FWD_ALL) */
/* Memory the derived KV pool leaves free: 5% of the device plus 512 MiB, for cuBLAS's and
 * the driver's own allocations, graphs and fragmentation. */
#define CUDA_RESERVE_FRACTION 20
#define CUDA_RESERVE_BYTES ((size_t)512 << 20)

struct cuda_layer {
    float *attn_norm, *mlp_norm; /* (dim) f32 */
    __nv_bfloat16 *wqkv;         /* (q_dim + 2*kv_dim, dim): q_proj | k_proj | v_proj rows */
    __nv_bfloat16 *wo;           /* (dim, q_dim) */
    __nv_bfloat16 *wgu;          /* (2*ffn_dim, dim): gate_proj | up_proj rows */
    __nv_bfloat16 *wdown;        /* (dim, ffn_dim) */
};

enum cuda_graph_mode {
    CUDA_GRAPH_LAST = 0,   /* every sequence FWD_LAST: logits rows copied after replay */
    CUDA_GRAPH_SAMPLE = 1, /* every sequence FWD_SAMPLE: ksample inside the graph */
};

struct cuda_graph {
    int n_seqs, ctx_bound, mode; /* the key; n_seqs 0 = empty slot */
    cudaGraphExec_t exec;
    unsigned long long last_use;
};

struct cuda_backend {
    struct backend base; /* first: the engine sees a struct backend * */
    struct model_config cfg;
    int device;
    int max_tokens, max_seqs;
    int max_ctx;       /* most positions one sequence attends over: max_seq_len, KV pool */
    int ctx_cap;       /* max_ctx bound the scratch was sized for (>= max_ctx) */
    int max_table;     /* block-table entries per sequence: ceil(ctx_cap / CUDA_BLOCK) */
    int head_rows;     /* rows of the logits buffer: LM head chunk */
    int q_dim, kv_dim, qkv_dim;
    cudaStream_t stream;
    struct kgemm gemm;

    /* weights */
    void *wslab;
    __nv_bfloat16 *embed;   /* (vocab, dim) */
    __nv_bfloat16 *lm_head; /* (vocab, dim); == embed when tied */
    float *final_norm;      /* (dim) */
    struct cuda_layer *layers; /* host array of n_layers device-pointer sets */
    float *inv_freq;        /* (head_dim / 2) device, from rope_inv_freq */

    /* KV pool */
    __nv_bfloat16 *kv;
    size_t head_stride, layer_stride, block_stride; /* elements (attention.h) */

    /* scratch, one slab */
    void *sslab;
    float *x;             /* (T, dim) f32 residual stream */
    __nv_bfloat16 *xn;    /* (T, dim) normed input of a projection */
    __nv_bfloat16 *qkv;   /* (T, qkv_dim) */
    __nv_bfloat16 *q;     /* (T, q_dim) after RoPE */
    __nv_bfloat16 *att;   /* (T, q_dim) attention output */
    __nv_bfloat16 *gu;    /* (T, 2*ffn_dim) gate | up */
    __nv_bfloat16 *h;     /* (T, ffn_dim) silu(gate) * up */
    __nv_bfloat16 *xo;    /* (T, dim) final-normed rows whose outputs are wanted */
    float *logits;        /* (head_rows, vocab) */
    float *logit0;        /* (S) FWD_LOGIT0 values */
    int32_t *tokens;      /* (S) sampled ids */
    void *att_ws, *smp_ws;

    /* descriptors: the same layout on the device and in pinned host memory */
    char *desc_d, *desc_h;
    size_t desc_bytes;
    size_t off_ids, off_pos, off_blk, off_seqs, off_groups, off_fin, off_smp, off_tables;

    /* pinned host landing places for small outputs */
    int32_t *tokens_h;   /* (S) */
    float *logit0_h;     /* (S) */

    /* host plan of one call */
    int *tok0;           /* (S) first row of each sequence */
    long long *order;    /* (S) sort keys: decode sequences by first block */
    float **row_dst;     /* (T) caller's destination of each full-logits row */
    float **l0_dst;      /* (S) */
    int32_t **smp_dst;   /* (S) */
    struct fwd_stamps stamps;

    /* graphs */
    int use_graphs;
    struct cuda_graph graphs[CUDA_MAX_GRAPHS];
    unsigned long long clock;
};

static int cuda_forward(struct backend *base, const struct fwd_seq *seqs, int n_seqs, char *err,
                        size_t err_len);
static int cuda_copy_block(struct backend *base, int src, int dst, char *err, size_t err_len);
static void cuda_destroy(struct backend *base);

static const struct backend_ops cuda_ops = {
    "cuda",
    cuda_forward,
    cuda_copy_block,
    cuda_destroy,
};

/* ---- small helpers --------------------------------------------------------------------------- */

static size_t cuda_round(size_t n)
{
    return (n + CUDA_ALIGN - 1) / CUDA_ALIGN * CUDA_ALIGN;
}

/* Reserves `bytes` at *off in a slab being laid out; returns the offset. */
static size_t cuda_carve(size_t *off, size_t bytes)
{
    size_t at = *off;
    *off += cuda_round(bytes);
    return at;
}

static double cuda_mib(size_t b)
{
    return (double)b / (1024.0 * 1024.0);
}

/* ---- destroy --------------------------------------------------------------------------------- */

static void cuda_destroy(struct backend *base)
{
    struct cuda_backend *be = (struct cuda_backend *)base;
    if (!be)
        return;
    /* Errors are ignored here: destroy runs after failed opens and must free what exists. */
    cudaSetDevice(be->device);
    if (be->stream)
        cudaStreamSynchronize(be->stream);
    for (int i = 0; i < CUDA_MAX_GRAPHS; i++)
        if (be->graphs[i].exec)
            cudaGraphExecDestroy(be->graphs[i].exec);
    kgemm_deinit(&be->gemm);
    cudaFree(be->wslab);
    cudaFree(be->kv);
    cudaFree(be->sslab);
    cudaFree(be->att_ws);
    cudaFree(be->smp_ws);
    cudaFree(be->desc_d);
    cudaFree(be->inv_freq);
    cudaFreeHost(be->desc_h);
    cudaFreeHost(be->tokens_h);
    cudaFreeHost(be->logit0_h);
    if (be->stream)
        cudaStreamDestroy(be->stream);
    free(be->layers);
    free(be->tok0);
    free(be->order);
    free(be->row_dst);
    free(be->l0_dst);
    free(be->smp_dst);
    free(be->stamps.blk_call);
    free(be->stamps.blk_writer);
    free(be);
}

/* ---- weights --------------------------------------------------------------------------------- */

/* Lays out (and with `base` set, assigns) every weight in one slab; returns its bytes. */
static size_t cuda_weight_layout(struct cuda_backend *be, char *base, int tied)
{
    const struct model_config *c = &be->cfg;
    const size_t dim = (size_t)c->dim, ffn = (size_t)c->ffn_dim, V = (size_t)c->vocab_size;
    const size_t B = sizeof(__nv_bfloat16), F = sizeof(float);
    size_t off = 0, at;
    at = cuda_carve(&off, V * dim * B);
    if (base)
        be->embed = (__nv_bfloat16 *)(base + at);
    if (!tied) {
        at = cuda_carve(&off, V * dim * B);
        if (base)
            be->lm_head = (__nv_bfloat16 *)(base + at);
    } else if (base) {
        be->lm_head = be->embed;
    }
    at = cuda_carve(&off, dim * F);
    if (base)
        be->final_norm = (float *)(base + at);
    for (int l = 0; l < c->n_layers; l++) {
        struct cuda_layer *L = &be->layers[l];
        size_t a0 = cuda_carve(&off, dim * F), a1 = cuda_carve(&off, dim * F);
        size_t a2 = cuda_carve(&off, (size_t)be->qkv_dim * dim * B);
        size_t a3 = cuda_carve(&off, dim * (size_t)be->q_dim * B);
        size_t a4 = cuda_carve(&off, 2 * ffn * dim * B);
        size_t a5 = cuda_carve(&off, dim * ffn * B);
        if (base) {
            L->attn_norm = (float *)(base + a0);
            L->mlp_norm = (float *)(base + a1);
            L->wqkv = (__nv_bfloat16 *)(base + a2);
            L->wo = (__nv_bfloat16 *)(base + a3);
            L->wgu = (__nv_bfloat16 *)(base + a4);
            L->wdown = (__nv_bfloat16 *)(base + a5);
        }
    }
    return off;
}

/* Upload state: two pinned host buffers and two device staging buffers used in turn, so that
 * the host copy of one chunk overlaps the transfer and conversion of the previous one. */
struct cuda_upload {
    void *host[2];
    void *dev[2];
    cudaEvent_t done[2];
    int used[2];
    int next;
};

static void cuda_upload_free(struct cuda_upload *u)
{
    for (int i = 0; i < 2; i++) {
        if (u->done[i])
            cudaEventDestroy(u->done[i]);
        cudaFreeHost(u->host[i]);
        cudaFree(u->dev[i]);
    }
    memset(u, 0, sizeof *u);
}

/* Copies n elements of host view t into dst (bf16, or f32 with to_f32), converting on the
 * device. The host view is read once, chunk by chunk: host memory never holds a second copy. */
static int cuda_upload_tensor(struct cuda_backend *be, struct cuda_upload *u,
                              const struct tensor *t, size_t n, void *dst, int to_f32,
                              char *err, size_t err_len)
{
    const size_t esz = t->dtype == DTYPE_F32 ? 4 : 2;
    const size_t total = n * esz;
    const size_t chunk = CUDA_STAGE_BYTES / 4 * 4; /* whole elements of either size */
    for (size_t off = 0; off < total; off += chunk) {
        const size_t len = total - off < chunk ? total - off : chunk;
        const int i = u->next;
        u->next ^= 1;
        if (u->used[i])
            KTRY(cudaEventSynchronize(u->done[i])); /* its last chunk has been converted */
        memcpy(u->host[i], (const char *)t->data + off, len);
        KTRY(cudaMemcpyAsync(u->dev[i], u->host[i], len, cudaMemcpyHostToDevice, be->stream));
        const size_t e0 = off / esz, ne = len / esz;
        if (to_f32)
            kops_to_f32(u->dev[i], t->dtype, ne, (float *)dst + e0, be->stream);
        else
            kops_to_bf16(u->dev[i], t->dtype, ne, (__nv_bfloat16 *)dst + e0, be->stream);
        KTRY(cudaEventRecord(u->done[i], be->stream));
        u->used[i] = 1;
    }
    return 0;
fail:
    return -1;
}

static int cuda_load_weights(struct cuda_backend *be, const struct model_weights *w, char *err,
                             size_t err_len)
{
    const struct model_config *c = &be->cfg;
    const size_t dim = (size_t)c->dim, ffn = (size_t)c->ffn_dim, V = (size_t)c->vocab_size;
    const size_t qd = (size_t)be->q_dim, kvd = (size_t)be->kv_dim;
    struct cuda_upload u;
    memset(&u, 0, sizeof u);
    for (int i = 0; i < 2; i++) {
        KTRY(cudaHostAlloc(&u.host[i], CUDA_STAGE_BYTES, cudaHostAllocDefault));
        KTRY(cudaMalloc(&u.dev[i], CUDA_STAGE_BYTES));
        KTRY(cudaEventCreateWithFlags(&u.done[i], cudaEventDisableTiming));
    }
    if (cuda_upload_tensor(be, &u, &w->embed, V * dim, be->embed, 0, err, err_len) ||
        (be->lm_head != be->embed &&
         cuda_upload_tensor(be, &u, &w->lm_head, V * dim, be->lm_head, 0, err, err_len)) ||
        cuda_upload_tensor(be, &u, &w->final_norm, dim, be->final_norm, 1, err, err_len))
        goto fail;
    for (int l = 0; l < c->n_layers; l++) {
        const struct layer_weights *S = &w->layers[l];
        const struct cuda_layer *L = &be->layers[l];
        if (cuda_upload_tensor(be, &u, &S->attn_norm, dim, L->attn_norm, 1, err, err_len) ||
            cuda_upload_tensor(be, &u, &S->mlp_norm, dim, L->mlp_norm, 1, err, err_len) ||
            cuda_upload_tensor(be, &u, &S->wq, qd * dim, L->wqkv, 0, err, err_len) ||
            cuda_upload_tensor(be, &u, &S->wk, kvd * dim, L->wqkv + qd * dim, 0, err, err_len) ||
            cuda_upload_tensor(be, &u, &S->wv, kvd * dim, L->wqkv + (qd + kvd) * dim, 0, err,
                               err_len) ||
            cuda_upload_tensor(be, &u, &S->wo, dim * qd, L->wo, 0, err, err_len) ||
            cuda_upload_tensor(be, &u, &S->w_gate, ffn * dim, L->wgu, 0, err, err_len) ||
            cuda_upload_tensor(be, &u, &S->w_up, ffn * dim, L->wgu + ffn * dim, 0, err,
                               err_len) ||
            cuda_upload_tensor(be, &u, &S->w_down, dim * ffn, L->wdown, 0, err, err_len))
            goto fail;
    }
    KTRY(cudaStreamSynchronize(be->stream));
    cuda_upload_free(&u);
    return 0;
fail:
    if (be->stream)
        cudaStreamSynchronize(be->stream); /* no copy may still read a buffer freed below */
    cuda_upload_free(&u);
    return -1;
}

/* Random weights drawn on the device: norms 1 +- 0.05, matrices U(-a, a) with a =
 * sqrt(3 / fan_in) (unit-variance outputs for unit-variance inputs), embeddings ~N(0, 1). */
static int cuda_random_weights(struct cuda_backend *be, unsigned long long seed, char *err,
                               size_t err_len)
{
    const struct model_config *c = &be->cfg;
    const size_t dim = (size_t)c->dim, ffn = (size_t)c->ffn_dim, V = (size_t)c->vocab_size;
    const float a_dim = sqrtf(3.0f / (float)c->dim), a_q = sqrtf(3.0f / (float)be->q_dim),
                a_ffn = sqrtf(3.0f / (float)c->ffn_dim);
    cudaStream_t s = be->stream;
    unsigned long long id = 1;
    kops_fill_bf16(be->embed, V * dim, seed, id++, KOPS_NORMAL, 1.0f, 0.0f, s);
    if (be->lm_head != be->embed)
        kops_fill_bf16(be->lm_head, V * dim, seed, id++, KOPS_UNIFORM, a_dim, 0.0f, s);
    kops_fill_f32(be->final_norm, dim, seed, id++, KOPS_UNIFORM, 0.05f, 1.0f, s);
    for (int l = 0; l < c->n_layers; l++) {
        const struct cuda_layer *L = &be->layers[l];
        id = 16 + 8 * (unsigned long long)l;
        kops_fill_f32(L->attn_norm, dim, seed, id + 0, KOPS_UNIFORM, 0.05f, 1.0f, s);
        kops_fill_f32(L->mlp_norm, dim, seed, id + 1, KOPS_UNIFORM, 0.05f, 1.0f, s);
        kops_fill_bf16(L->wqkv, (size_t)be->qkv_dim * dim, seed, id + 2, KOPS_UNIFORM, a_dim,
                       0.0f, s);
        kops_fill_bf16(L->wo, dim * (size_t)be->q_dim, seed, id + 3, KOPS_UNIFORM, a_q, 0.0f, s);
        kops_fill_bf16(L->wgu, 2 * ffn * dim, seed, id + 4, KOPS_UNIFORM, a_dim, 0.0f, s);
        kops_fill_bf16(L->wdown, dim * ffn, seed, id + 5, KOPS_UNIFORM, a_ffn, 0.0f, s);
    }
    KTRY(cudaStreamSynchronize(s));
    return 0;
fail:
    return -1;
}

/* ---- open ------------------------------------------------------------------------------------ */

static void cuda_desc_layout(struct cuda_backend *be)
{
    const size_t T = (size_t)be->max_tokens, S = (size_t)be->max_seqs;
    size_t off = 0;
    be->off_ids = cuda_carve(&off, T * sizeof(int32_t));
    be->off_pos = cuda_carve(&off, T * sizeof(int32_t));
    be->off_blk = cuda_carve(&off, T * sizeof(int32_t));
    be->off_seqs = cuda_carve(&off, S * sizeof(struct katt_seq));
    be->off_groups = cuda_carve(&off, S * sizeof(struct katt_group));
    be->off_fin = cuda_carve(&off, T * sizeof(int32_t));
    be->off_smp = cuda_carve(&off, S * sizeof(struct ksample_row));
    /* last, so that an upload stops at the tables this call uses */
    be->off_tables = cuda_carve(&off, S * (size_t)be->max_table * sizeof(int32_t));
    be->desc_bytes = off;
}

static int cuda_alloc_scratch(struct cuda_backend *be, char *err, size_t err_len)
{
    const struct model_config *c = &be->cfg;
    const size_t T = (size_t)be->max_tokens, S = (size_t)be->max_seqs, dim = (size_t)c->dim;
    const size_t ffn = (size_t)c->ffn_dim, B = sizeof(__nv_bfloat16);
    size_t off = 0;
    size_t o_x = cuda_carve(&off, T * dim * sizeof(float));
    size_t o_xn = cuda_carve(&off, T * dim * B);
    size_t o_qkv = cuda_carve(&off, T * (size_t)be->qkv_dim * B);
    size_t o_q = cuda_carve(&off, T * (size_t)be->q_dim * B);
    size_t o_att = cuda_carve(&off, T * (size_t)be->q_dim * B);
    size_t o_gu = cuda_carve(&off, T * 2 * ffn * B);
    size_t o_h = cuda_carve(&off, T * ffn * B);
    size_t o_xo = cuda_carve(&off, T * dim * B);
    size_t o_lg = cuda_carve(&off, (size_t)be->head_rows * (size_t)c->vocab_size * sizeof(float));
    size_t o_l0 = cuda_carve(&off, S * sizeof(float));
    size_t o_tk = cuda_carve(&off, S * sizeof(int32_t));
    char *p = NULL;
    size_t aw = 0, sw = 0;
    KTRY(cudaMalloc((void **)&p, off));
    be->sslab = p;
    be->x = (float *)(p + o_x);
    be->xn = (__nv_bfloat16 *)(p + o_xn);
    be->qkv = (__nv_bfloat16 *)(p + o_qkv);
    be->q = (__nv_bfloat16 *)(p + o_q);
    be->att = (__nv_bfloat16 *)(p + o_att);
    be->gu = (__nv_bfloat16 *)(p + o_gu);
    be->h = (__nv_bfloat16 *)(p + o_h);
    be->xo = (__nv_bfloat16 *)(p + o_xo);
    be->logits = (float *)(p + o_lg);
    be->logit0 = (float *)(p + o_l0);
    be->tokens = (int32_t *)(p + o_tk);
    /* Defined contents from the start: a stale row is then a wrong number, never garbage
     * that sanitizers flag as uninitialised. On be->stream, not the legacy default stream: a
     * non-blocking stream does not wait for legacy-stream work, so a plain cudaMemset could
     * still be running when the first forward's kernels start. */
    KTRY(cudaMemsetAsync(p, 0, off, be->stream));

    aw = katt_workspace_bytes(be->max_seqs, be->max_tokens, c->n_heads, c->head_dim,
                                     be->ctx_cap);
    sw = ksample_workspace_bytes(be->max_seqs, c->vocab_size);
    KTRY(cudaMalloc(&be->att_ws, aw ? aw : 1));
    KTRY(cudaMalloc(&be->smp_ws, sw ? sw : 1));

    cuda_desc_layout(be);
    KTRY(cudaMalloc((void **)&be->desc_d, be->desc_bytes));
    KTRY(cudaHostAlloc((void **)&be->desc_h, be->desc_bytes, cudaHostAllocDefault));
    memset(be->desc_h, 0, be->desc_bytes);
    KTRY(cudaMemsetAsync(be->desc_d, 0, be->desc_bytes, be->stream));
    KTRY(cudaHostAlloc((void **)&be->tokens_h, S * sizeof(int32_t), cudaHostAllocDefault));
    KTRY(cudaHostAlloc((void **)&be->logit0_h, S * sizeof(float), cudaHostAllocDefault));
    return 0;
fail:
    return -1;
}

/* Sizes and allocates the KV pool from what is left on the device. */
static int cuda_alloc_kv(struct cuda_backend *be, const struct backend_params *p, char *err,
                         size_t err_len)
{
    const struct model_config *c = &be->cfg;
    be->head_stride = (size_t)CUDA_BLOCK * (size_t)c->head_dim;
    be->layer_stride = 2 * (size_t)c->n_kv_heads * be->head_stride;
    be->block_stride = (size_t)c->n_layers * be->layer_stride;
    const size_t block_bytes = be->block_stride * sizeof(__nv_bfloat16);
    size_t free_b = 0, total_b = 0, bytes = 0;
    long long n_blocks = p->n_kv_blocks, pool_pos = 0;
    cudaError_t rc = cudaSuccess;
    KTRY(cudaMemGetInfo(&free_b, &total_b));

    if (n_blocks == 0 && p->kv_tokens > 0)
        n_blocks = ((long long)p->kv_tokens + CUDA_BLOCK - 1) / CUDA_BLOCK;
    if (n_blocks > 0) {
        double need = (double)n_blocks * (double)block_bytes;
        if (need > (double)free_b) {
            snprintf(err, err_len,
                     "KV pool of %lld blocks (%lld positions) needs %.1f MiB, but only %.1f MiB "
                     "of device %d memory is free after the weights and scratch",
                     n_blocks, n_blocks * CUDA_BLOCK, need / (1024.0 * 1024.0), cuda_mib(free_b),
                     be->device);
            return -1;
        }
    } else {
        size_t reserve = total_b / CUDA_RESERVE_FRACTION + CUDA_RESERVE_BYTES;
        size_t avail = free_b > reserve ? free_b - reserve : 0;
        n_blocks = (long long)(avail / block_bytes);
        if (n_blocks > INT32_MAX / 2)
            n_blocks = INT32_MAX / 2;
        if (n_blocks < 1) {
            snprintf(err, err_len,
                     "no device memory left for the KV cache: %.1f MiB free after the weights "
                     "and scratch, %.1f MiB kept in reserve, one block needs %.1f MiB",
                     cuda_mib(free_b), cuda_mib(reserve), cuda_mib(block_bytes));
            return -1;
        }
    }
    be->base.n_kv_blocks = (int)n_blocks;
    pool_pos = n_blocks * CUDA_BLOCK;
    be->max_ctx = pool_pos < c->max_seq_len ? (int)pool_pos : c->max_seq_len;
    if (be->max_ctx > be->ctx_cap)
        be->max_ctx = be->ctx_cap; /* cannot happen: ctx_cap >= both bounds; kept as a guard */
    bytes = (size_t)n_blocks * block_bytes;
    rc = cudaMalloc((void **)&be->kv, bytes);
    if (rc != cudaSuccess) {
        snprintf(err, err_len, "KV pool of %lld blocks: cudaMalloc(%.1f MiB): %s (%s)", n_blocks,
                 cuda_mib(bytes), cudaGetErrorString(rc), cudaGetErrorName(rc));
        return -1;
    }
    KTRY(cudaMemsetAsync(be->kv, 0, bytes, be->stream));
    if (!(be->stamps.blk_call = (unsigned *)calloc((size_t)n_blocks, sizeof(unsigned))) ||
        !(be->stamps.blk_writer = (int *)calloc((size_t)n_blocks, sizeof(int)))) {
        snprintf(err, err_len, "block stamps of %lld blocks: out of memory", n_blocks);
        return -1;
    }
    return 0;
fail:
    return -1;
}

int cuda_backend_open(const struct model_config *cfg, const struct model_weights *w,
                      unsigned long long seed, const struct backend_params *p,
                      struct backend **out, char *err, size_t err_len)
{
    *out = NULL;
    struct cuda_backend *be = NULL;
    if (!cfg || !p) {
        snprintf(err, err_len, "cuda backend: no model config or parameters");
        return -1;
    }
    if (fwd_check_config(cfg, err, err_len) || (w && fwd_check_weights(cfg, w, err, err_len)))
        return -1;
    if (cfg->head_dim != 16 && cfg->head_dim != 32 && cfg->head_dim != 64 &&
        cfg->head_dim != 128) {
        snprintf(err, err_len, "model config: head_dim %d: the cuda attention kernels take 16, "
                 "32, 64 or 128", cfg->head_dim);
        return -1;
    }
    if (p->max_batch_tokens < 1 || p->max_batch_tokens > CUDA_MAX_BATCH_TOKENS) {
        snprintf(err, err_len, "max_batch_tokens %d: expected 1..%d", p->max_batch_tokens,
                 CUDA_MAX_BATCH_TOKENS);
        return -1;
    }
    if (p->max_batch_seqs < 1 || p->max_batch_seqs > p->max_batch_tokens) {
        snprintf(err, err_len, "max_batch_seqs %d: expected 1..max_batch_tokens (%d)",
                 p->max_batch_seqs, p->max_batch_tokens);
        return -1;
    }
    if (p->n_kv_blocks < 0 || p->kv_tokens < 0 || p->n_kv_blocks > INT32_MAX / 2 ||
        p->kv_tokens > INT32_MAX / 2) {
        snprintf(err, err_len, "KV pool: n_kv_blocks %d / kv_tokens %d: expected a positive size "
                 "(or both 0: as much as the device holds)", p->n_kv_blocks, p->kv_tokens);
        return -1;
    }
    /* The forward path checks launches with cudaGetLastError (KLAUNCH): an error some earlier
     * call on this thread left behind (a failed open's cudaMalloc, say) must not abort our first
     * launch. Sticky errors are not cleared by this and still fail the calls below. */
    (void)cudaGetLastError();
    {
        int n_dev = 0;
        KTRY(cudaGetDeviceCount(&n_dev));
        if (p->device < 0 || p->device >= n_dev) {
            snprintf(err, err_len, "device %d does not exist (%d CUDA device%s)", p->device,
                     n_dev, n_dev == 1 ? "" : "s");
            return -1;
        }
    }
    KTRY(cudaSetDevice(p->device));

    be = (struct cuda_backend *)calloc(1, sizeof *be);
    if (!be) {
        snprintf(err, err_len, "cuda backend: out of memory");
        return -1;
    }
    be->base.ops = &cuda_ops;
    be->cfg = *cfg;
    be->base.cfg = &be->cfg;
    /* ksample's fixed-point masses hold rows of at most 2^20 logits (sample.cu) and it aborts
     * past that; a larger vocabulary samples on the host from FWD_LAST rows instead. */
    be->base.caps = cfg->vocab_size <= (1 << 20) ? BACKEND_CAP_SAMPLE : 0;
    be->device = p->device;
    be->max_tokens = p->max_batch_tokens;
    be->max_seqs = p->max_batch_seqs;
    be->q_dim = cfg->n_heads * cfg->head_dim;
    be->kv_dim = cfg->n_kv_heads * cfg->head_dim;
    be->qkv_dim = be->q_dim + 2 * be->kv_dim;
    be->use_graphs = !kenv_off("ITS_CUDA_GRAPHS") && !kenv_on("ITS_CUDA_SIMPLE");
    {
        long long explicit_blocks = p->n_kv_blocks ? p->n_kv_blocks
                                    : p->kv_tokens ? ((long long)p->kv_tokens + CUDA_BLOCK - 1) /
                                                         CUDA_BLOCK
                                                   : 0;
        long long cap = cfg->max_seq_len;
        if (explicit_blocks > 0 && explicit_blocks * CUDA_BLOCK < cap)
            cap = explicit_blocks * CUDA_BLOCK;
        be->ctx_cap = (int)cap;
        be->max_table = (be->ctx_cap + CUDA_BLOCK - 1) / CUDA_BLOCK;
    }
    {
        int rows = be->max_tokens < CUDA_HEAD_MIN_ROWS ? be->max_tokens : CUDA_HEAD_MIN_ROWS;
        be->head_rows = rows > be->max_seqs ? rows : be->max_seqs;
    }
    {
        const size_t T = (size_t)be->max_tokens, S = (size_t)be->max_seqs;
        if (!(be->layers = (struct cuda_layer *)calloc((size_t)cfg->n_layers,
                                                       sizeof(struct cuda_layer))) ||
            !(be->tok0 = (int *)calloc(S, sizeof(int))) ||
            !(be->order = (long long *)calloc(S, sizeof(long long))) ||
            !(be->row_dst = (float **)calloc(T, sizeof(float *))) ||
            !(be->l0_dst = (float **)calloc(S, sizeof(float *))) ||
            !(be->smp_dst = (int32_t **)calloc(S, sizeof(int32_t *)))) {
            snprintf(err, err_len, "cuda backend: out of host memory for %zu tokens", T);
            goto fail;
        }
    }

    KTRY(cudaStreamCreateWithFlags(&be->stream, cudaStreamNonBlocking));
    if (kgemm_init(&be->gemm, be->stream, err, err_len) != 0)
        goto fail;

    {
        int tied = w ? (cfg->tied_embeddings || w->lm_head.data == w->embed.data)
                     : cfg->tied_embeddings;
        size_t wbytes = cuda_weight_layout(be, NULL, tied);
        cudaError_t rc = cudaMalloc(&be->wslab, wbytes);
        if (rc != cudaSuccess) {
            size_t fb = 0, tb = 0;
            cudaMemGetInfo(&fb, &tb);
            snprintf(err, err_len, "weights need %.1f MiB of device %d memory, %.1f MiB free: "
                     "cudaMalloc: %s", cuda_mib(wbytes), be->device, cuda_mib(fb),
                     cudaGetErrorString(rc));
            goto fail;
        }
        cuda_weight_layout(be, (char *)be->wslab, tied);
    }
    if (cuda_alloc_scratch(be, err, err_len) != 0)
        goto fail;
    {
        float *inv = (float *)malloc(sizeof(float) * (size_t)(cfg->head_dim / 2));
        if (!inv) {
            snprintf(err, err_len, "cuda backend: out of host memory");
            goto fail;
        }
        rope_inv_freq(cfg, inv);
        cudaError_t rc = cudaMalloc((void **)&be->inv_freq, sizeof(float) * (cfg->head_dim / 2));
        /* On be->stream (ordered before every kernel that reads it and the final sync); a
         * pageable source is staged before the call returns, so `inv` may be freed at once. */
        if (rc == cudaSuccess)
            rc = cudaMemcpyAsync(be->inv_freq, inv, sizeof(float) * (cfg->head_dim / 2),
                                 cudaMemcpyHostToDevice, be->stream);
        free(inv);
        KTRY(rc);
    }
    if (w ? cuda_load_weights(be, w, err, err_len) : cuda_random_weights(be, seed, err, err_len))
        goto fail;
    if (cuda_alloc_kv(be, p, err, err_len) != 0)
        goto fail;
    KTRY(cudaStreamSynchronize(be->stream));
    *out = &be->base;
    return 0;

fail:
    if (be)
        cuda_destroy(&be->base);
    (void)cudaGetLastError(); /* reported through err; not left for a later KLAUNCH to find */
    return -1;
}

/* ---- forward --------------------------------------------------------------------------------- */

/* The call's shape as the device work sees it; everything else lives in the descriptors. */
struct cuda_plan {
    int n_tokens, n_seqs, ctx_bound;
    int n_out;  /* full-logits rows: FWD_SAMPLE rows first, then FWD_LAST, then FWD_ALL */
    int n_smp;  /* FWD_SAMPLE rows (the first n_smp of the n_out) */
    int n_l0;   /* FWD_LOGIT0 rows, after the n_out in the final-norm row list */
    size_t upload_bytes;
};

static int cuda_cmp_ll(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return x < y ? -1 : x > y;
}

/* Fills the pinned descriptor mirror for a validated call. */
static void cuda_plan_call(struct cuda_backend *be, const struct fwd_seq *seqs, int n_seqs,
                           int T, struct cuda_plan *pl)
{
    char *d = be->desc_h;
    int32_t *ids = (int32_t *)(d + be->off_ids), *pos = (int32_t *)(d + be->off_pos);
    int32_t *blk = (int32_t *)(d + be->off_blk), *fin = (int32_t *)(d + be->off_fin);
    int32_t *tables = (int32_t *)(d + be->off_tables);
    struct katt_seq *ks = (struct katt_seq *)(d + be->off_seqs);
    struct katt_group *kg = (struct katt_group *)(d + be->off_groups);
    struct ksample_row *kr = (struct ksample_row *)(d + be->off_smp);
    const size_t V = (size_t)be->cfg.vocab_size;

    memset(pl, 0, sizeof *pl);
    pl->n_tokens = T;
    pl->n_seqs = n_seqs;
    int t = 0, max_end = 1;
    for (int s = 0; s < n_seqs; s++) {
        const struct fwd_seq *q = &seqs[s];
        be->tok0[s] = t;
        for (int i = 0; i < q->n_tokens; i++, t++) {
            int p = q->pos + i;
            ids[t] = q->tokens[i];
            pos[t] = p;
            blk[t] = q->block_table[p / CUDA_BLOCK];
        }
        if (q->pos + q->n_tokens > max_end)
            max_end = q->pos + q->n_tokens;
    }

    /* Attention order: decode sequences sorted by their first block, so that the samples of
     * one prompt (and candidates after one prefix) sit together and form groups; then the
     * prefill sequences in call order. Rows in q/out do not move: katt_seq.tok0 points. */
    int n_dec = 0;
    for (int s = 0; s < n_seqs; s++)
        if (seqs[s].n_tokens == 1)
            be->order[n_dec++] = ((long long)seqs[s].block_table[0] << 32) | s;
    qsort(be->order, (size_t)n_dec, sizeof *be->order, cuda_cmp_ll);
    int n_ord = n_dec;
    for (int s = 0; s < n_seqs; s++)
        if (seqs[s].n_tokens != 1)
            be->order[n_ord++] = s;
    int used = 0;
    for (int k = 0; k < n_seqs; k++) {
        const int s = (int)(be->order[k] & 0xFFFFFFFF);
        const struct fwd_seq *q = &seqs[s];
        const int nb = (q->pos + q->n_tokens + CUDA_BLOCK - 1) / CUDA_BLOCK;
        ks[k].tok0 = be->tok0[s];
        ks[k].n_new = q->n_tokens;
        ks[k].pos = q->pos;
        ks[k].table0 = used;
        memcpy(tables + used, q->block_table, (size_t)nb * sizeof(int32_t));
        used += nb;
    }
    int n_groups = 0;
    for (int k = 0; k < n_seqs;) {
        int j = k + 1, shared = 0;
        if (k < n_dec) {
            const int32_t *t0 = tables + ks[k].table0;
            while (j < n_dec && tables[ks[j].table0] == t0[0])
                j++;
            /* Blocks strictly below every member's write position, identical in all. */
            int limit = ks[k].pos / CUDA_BLOCK;
            for (int m = k + 1; m < j; m++)
                if (ks[m].pos / CUDA_BLOCK < limit)
                    limit = ks[m].pos / CUDA_BLOCK;
            for (; shared < limit; shared++) {
                int same = 1;
                for (int m = k + 1; m < j && same; m++)
                    same = tables[ks[m].table0 + shared] == t0[shared];
                if (!same)
                    break;
            }
        }
        if (j - k >= 2 && shared > 0) {
            kg[n_groups].seq0 = k;
            kg[n_groups].n_seqs = j - k;
            kg[n_groups].n_shared_blocks = shared;
            n_groups++;
            k = j;
        } else {
            kg[n_groups].seq0 = k;
            kg[n_groups].n_seqs = 1;
            kg[n_groups].n_shared_blocks = 0;
            n_groups++;
            k++;
        }
    }
    for (int g = n_groups; g < n_seqs; g++)
        kg[g].seq0 = kg[g].n_seqs = kg[g].n_shared_blocks = 0;

    /* Output rows in final-norm order: SAMPLE, LAST, ALL (full LM head), then LOGIT0. */
    int n = 0;
    for (int s = 0; s < n_seqs; s++) {
        const struct fwd_seq *q = &seqs[s];
        if (q->output != FWD_SAMPLE)
            continue;
        const struct fwd_sample *sp = q->sample;
        fin[n] = be->tok0[s] + q->n_tokens - 1;
        kr[n].temperature = sp->temperature;
        kr[n].top_p = sp->top_p;
        kr[n].top_k = sp->top_k;
        kr[n].pad_ = 0;
        kr[n].seed = sp->seed;
        kr[n].stream = sp->stream;
        kr[n].step = sp->step;
        be->smp_dst[n] = q->token;
        be->row_dst[n] = NULL;
        n++;
    }
    pl->n_smp = n;
    for (int s = 0; s < n_seqs; s++) {
        const struct fwd_seq *q = &seqs[s];
        if (q->output != FWD_LAST)
            continue;
        fin[n] = be->tok0[s] + q->n_tokens - 1;
        be->row_dst[n++] = q->out;
    }
    for (int s = 0; s < n_seqs; s++) {
        const struct fwd_seq *q = &seqs[s];
        if (q->output != FWD_ALL)
            continue;
        for (int i = 0; i < q->n_tokens; i++) {
            fin[n] = be->tok0[s] + i;
            be->row_dst[n++] = q->out + (size_t)i * V;
        }
    }
    pl->n_out = n;
    for (int s = 0; s < n_seqs; s++) {
        const struct fwd_seq *q = &seqs[s];
        if (q->output != FWD_LOGIT0)
            continue;
        fin[n] = be->tok0[s] + q->n_tokens - 1;
        be->l0_dst[pl->n_l0++] = q->out;
        n++;
    }
    pl->ctx_bound = max_end;
    pl->upload_bytes = be->off_tables + (size_t)used * sizeof(int32_t);
}

/* Embedding and every decoder layer over the call's T rows. */
static void cuda_layers(struct cuda_backend *be, const struct cuda_plan *pl)
{
    const struct model_config *c = &be->cfg;
    const int T = pl->n_tokens, dim = c->dim, ffn = c->ffn_dim;
    const int32_t *ids = (const int32_t *)(be->desc_d + be->off_ids);
    const int32_t *pos = (const int32_t *)(be->desc_d + be->off_pos);
    const int32_t *blk = (const int32_t *)(be->desc_d + be->off_blk);
    cudaStream_t s = be->stream;
    const struct kgemm *g = &be->gemm;

    kops_embed(be->embed, ids, T, dim, be->x, s);

    struct katt_args a;
    memset(&a, 0, sizeof a);
    a.q = be->q;
    a.out = be->att;
    a.kv = be->kv;
    a.block_stride = be->block_stride;
    a.layer_stride = be->layer_stride;
    a.head_stride = be->head_stride;
    a.tables = (const int32_t *)(be->desc_d + be->off_tables);
    a.seqs = (const struct katt_seq *)(be->desc_d + be->off_seqs);
    a.n_seqs = pl->n_seqs;
    a.n_tokens = T;
    a.groups = (const struct katt_group *)(be->desc_d + be->off_groups);
    a.ctx_bound = pl->ctx_bound;
    a.n_heads = c->n_heads;
    a.n_kv_heads = c->n_kv_heads;
    a.head_dim = c->head_dim;
    a.scale = 1.0f / sqrtf((float)c->head_dim);
    a.workspace = be->att_ws;

    struct kops_kv_dst dst;
    dst.kv = be->kv;
    dst.block_stride = be->block_stride;
    dst.layer_stride = be->layer_stride;
    dst.head_stride = be->head_stride;

    for (int l = 0; l < c->n_layers; l++) {
        const struct cuda_layer *L = &be->layers[l];
        kops_rmsnorm(be->x, NULL, T, dim, L->attn_norm, c->norm_eps, be->xn, s);
        kgemm_run(g, be->xn, T, dim, L->wqkv, be->qkv_dim, be->qkv, KGEMM_OUT_BF16, 0);
        dst.layer = l;
        kops_rope_kv(be->qkv, T, pos, blk, be->inv_freq, c->n_heads, c->n_kv_heads, c->head_dim,
                     be->q, &dst, s);
        a.layer = l;
        katt_forward(&a, s);
        /* x += o_proj(att): the residual add is the GEMM's beta = 1 on the f32 stream */
        kgemm_run(g, be->att, T, be->q_dim, L->wo, dim, be->x, KGEMM_OUT_F32, 1);
        kops_rmsnorm(be->x, NULL, T, dim, L->mlp_norm, c->norm_eps, be->xn, s);
        kgemm_run(g, be->xn, T, dim, L->wgu, 2 * ffn, be->gu, KGEMM_OUT_BF16, 0);
        kops_swiglu(be->gu, T, ffn, be->h, s);
        kgemm_run(g, be->h, T, ffn, L->wdown, dim, be->x, KGEMM_OUT_F32, 1);
    }
}

/* Final norm of the wanted rows, LOGIT0 dots, and the first LM-head chunk (with sampling).
 * Everything here is capturable: no host sync, no allocation, no pageable copy. */
static void cuda_head_first(struct cuda_backend *be, const struct cuda_plan *pl)
{
    const struct model_config *c = &be->cfg;
    const int dim = c->dim;
    cudaStream_t s = be->stream;
    const int n_fin = pl->n_out + pl->n_l0;
    kops_rmsnorm(be->x, (const int32_t *)(be->desc_d + be->off_fin), n_fin, dim, be->final_norm,
                 c->norm_eps, be->xo, s);
    if (pl->n_l0 > 0) /* one column of the LM head: row 0 of lm_head, no full product */
        kops_row_dot(be->xo + (size_t)pl->n_out * dim, pl->n_l0, dim, be->lm_head, be->logit0, s);
    const int n0 = pl->n_out < be->head_rows ? pl->n_out : be->head_rows;
    if (n0 > 0)
        kgemm_run(&be->gemm, be->xo, n0, dim, be->lm_head, c->vocab_size, be->logits,
                  KGEMM_OUT_F32, 0);
    if (pl->n_smp > 0)
        ksample(be->logits, pl->n_smp, c->vocab_size,
                (const struct ksample_row *)(be->desc_d + be->off_smp), be->tokens, be->smp_ws,
                s);
}

/* Copies full-logits rows [r0, r1) of the current chunk (starting at row c0) to the callers,
 * merging rows whose destinations are contiguous (FWD_ALL) into one copy. */
static void cuda_copy_rows(struct cuda_backend *be, int c0, int r0, int r1)
{
    const size_t V = (size_t)be->cfg.vocab_size;
    for (int r = r0; r < r1;) {
        int e = r + 1;
        while (e < r1 && be->row_dst[e] == be->row_dst[e - 1] + V)
            e++;
        KCUDA(cudaMemcpyAsync(be->row_dst[r], be->logits + (size_t)(r - c0) * V,
                              (size_t)(e - r) * V * sizeof(float), cudaMemcpyDeviceToHost,
                              be->stream));
        r = e;
    }
}

/* The cached graph for this decode shape, captured on first use. */
static cudaGraphExec_t cuda_graph_get(struct cuda_backend *be, const struct cuda_plan *pl,
                                      int mode)
{
    struct cuda_graph *slot = NULL, *lru = &be->graphs[0];
    for (int i = 0; i < CUDA_MAX_GRAPHS; i++) {
        struct cuda_graph *gr = &be->graphs[i];
        if (gr->exec && gr->n_seqs == pl->n_seqs && gr->ctx_bound == pl->ctx_bound &&
            gr->mode == mode) {
            gr->last_use = ++be->clock;
            return gr->exec;
        }
        if (!gr->exec && !slot)
            slot = gr;
        if (gr->last_use < lru->last_use)
            lru = gr;
    }
    if (!slot) {
        slot = lru;
        KCUDA(cudaGraphExecDestroy(slot->exec));
        slot->exec = NULL;
    }
    cudaGraph_t graph = NULL;
    KCUDA(cudaStreamBeginCapture(be->stream, cudaStreamCaptureModeThreadLocal));
    cuda_layers(be, pl);
    cuda_head_first(be, pl);
    cudaError_t rc = cudaStreamEndCapture(be->stream, &graph);
    if (rc != cudaSuccess) {
        fprintf(stderr, "itsw: cuda: %s:%d: capturing a decode step (%d sequences, context %d) "
                "failed: %s (%s); ITS_CUDA_GRAPHS=0 runs without graphs\n", __FILE__, __LINE__,
                pl->n_seqs, pl->ctx_bound, cudaGetErrorString(rc), cudaGetErrorName(rc));
        abort();
    }
    KCUDA(cudaGraphInstantiate(&slot->exec, graph, 0));
    KCUDA(cudaGraphDestroy(graph));
    slot->n_seqs = pl->n_seqs;
    slot->ctx_bound = pl->ctx_bound;
    slot->mode = mode;
    slot->last_use = ++be->clock;
    return slot->exec;
}

static int cuda_forward(struct backend *base, const struct fwd_seq *seqs, int n_seqs, char *err,
                        size_t err_len)
{
    struct cuda_backend *be = (struct cuda_backend *)base;
    int T = 0;
    if (fwd_check_call(&be->base, seqs, n_seqs, be->max_seqs, be->max_tokens, be->max_ctx,
                       &be->stamps, &T, err, err_len) != 0)
        return -1;
    KCUDA(cudaSetDevice(be->device));

    struct cuda_plan pl;
    cuda_plan_call(be, seqs, n_seqs, T, &pl);

    /* Graph path: a pure decode step whose outputs are all LAST or all SAMPLE. */
    int mode = -1;
    if (be->use_graphs && T == n_seqs) {
        int n_last = 0, n_smp = 0;
        for (int s = 0; s < n_seqs; s++) {
            n_last += seqs[s].output == FWD_LAST;
            n_smp += seqs[s].output == FWD_SAMPLE;
        }
        if (n_last == n_seqs)
            mode = CUDA_GRAPH_LAST;
        else if (n_smp == n_seqs)
            mode = CUDA_GRAPH_SAMPLE;
    }
    if (mode >= 0) {
        int b = CUDA_GRAPH_MIN_CTX;
        while (b < pl.ctx_bound && b < be->max_ctx)
            b *= 2;
        pl.ctx_bound = b < be->max_ctx ? b : be->max_ctx;
    }

    KCUDA(cudaMemcpyAsync(be->desc_d, be->desc_h, pl.upload_bytes, cudaMemcpyHostToDevice,
                          be->stream));
    if (mode >= 0) {
        cudaGraphExec_t exec = cuda_graph_get(be, &pl, mode);
        KCUDA(cudaGraphLaunch(exec, be->stream));
    } else {
        cuda_layers(be, &pl);
        cuda_head_first(be, &pl);
    }

    /* Results. The first chunk is computed; later FWD_ALL chunks (eager only) follow. */
    const struct model_config *c = &be->cfg;
    if (pl.n_smp > 0)
        KCUDA(cudaMemcpyAsync(be->tokens_h, be->tokens, (size_t)pl.n_smp * sizeof(int32_t),
                              cudaMemcpyDeviceToHost, be->stream));
    if (pl.n_l0 > 0)
        KCUDA(cudaMemcpyAsync(be->logit0_h, be->logit0, (size_t)pl.n_l0 * sizeof(float),
                              cudaMemcpyDeviceToHost, be->stream));
    for (int c0 = 0; c0 < pl.n_out; c0 += be->head_rows) {
        const int n = pl.n_out - c0 < be->head_rows ? pl.n_out - c0 : be->head_rows;
        if (c0 > 0)
            kgemm_run(&be->gemm, be->xo + (size_t)c0 * c->dim, n, c->dim, be->lm_head,
                      c->vocab_size, be->logits, KGEMM_OUT_F32, 0);
        cuda_copy_rows(be, c0, c0 > pl.n_smp ? c0 : pl.n_smp, c0 + n);
    }
    KCUDA(cudaStreamSynchronize(be->stream));
    for (int i = 0; i < pl.n_smp; i++)
        *be->smp_dst[i] = be->tokens_h[i];
    for (int i = 0; i < pl.n_l0; i++)
        *be->l0_dst[i] = be->logit0_h[i];
    return 0;
}

static int cuda_copy_block(struct backend *base, int src, int dst, char *err, size_t err_len)
{
    struct cuda_backend *be = (struct cuda_backend *)base;
    int n = be->base.n_kv_blocks;
    if (src < 0 || src >= n || dst < 0 || dst >= n) {
        snprintf(err, err_len, "copy_block %d -> %d: block ids must be in 0..%d", src, dst,
                 n - 1);
        return -1;
    }
    if (src == dst)
        return 0;
    KCUDA(cudaSetDevice(be->device));
    /* Ordered before the next forward on the same stream: no sync needed. */
    KCUDA(cudaMemcpyAsync(be->kv + (size_t)dst * be->block_stride,
                          be->kv + (size_t)src * be->block_stride,
                          be->block_stride * sizeof(__nv_bfloat16), cudaMemcpyDeviceToDevice,
                          be->stream));
    return 0;
}
