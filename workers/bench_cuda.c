/* bench_cuda.c — GPU engine throughput on random weights of a named shape (see bench_cuda.h).
 *
 * Owns, for one call, the host buffers of the driver (sequence descriptors, block tables,
 * tokens, step times) and, in bench_cuda_run*, the backend it opens. Block ids are handed out
 * afresh for each phase from the bottom of the pool (a phase's blocks are dead once it ends);
 * no call ever writes a block another sequence of the same call reads. Times each forward on
 * the host clock: every timed call carries FWD_SAMPLE, whose ids the backend must have on the
 * host when forward returns, so the clock brackets the device work. Never prints.
 */
#include "bench_cuda.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "checkpoint.h"
#include "cuda_tools.h"
#include "roofline.h"

#define BC_B BACKEND_BLOCK_TOKENS

static const int bc_default_batches[] = {1, 16, 64, 256};

static int bc_blocks(int64_t n_pos)
{
    return (int)((n_pos + BC_B - 1) / BC_B);
}

static double bc_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int bc_max(int a, int b)
{
    return a > b ? a : b;
}

int bench_cuda_plan(const struct model_config *cfg, const struct bench_cuda_params *p,
                    struct bench_cuda_params *out, struct backend_params *bp, char *err,
                    size_t err_len)
{
    struct bench_cuda_params q = *p;
    if (!q.shape)
        q.shape = "llama-3.1-8b";
    if (!q.seed)
        q.seed = 1;
    if (q.n_batches <= 0) {
        q.n_batches = (int)(sizeof bc_default_batches / sizeof bc_default_batches[0]);
        memcpy(q.decode_batches, bc_default_batches, sizeof bc_default_batches);
    }
    if (q.n_batches > BENCH_CUDA_MAX_BATCHES) {
        snprintf(err, err_len, "bench: %d decode batch sizes, at most %d", q.n_batches,
                 BENCH_CUDA_MAX_BATCHES);
        return -1;
    }
    int max_b = 0;
    for (int i = 0; i < q.n_batches; i++) {
        if (q.decode_batches[i] < 1 || q.decode_batches[i] > 65536) {
            snprintf(err, err_len, "bench: decode batch %d: expected 1..65536",
                     q.decode_batches[i]);
            return -1;
        }
        max_b = bc_max(max_b, q.decode_batches[i]);
    }
    if (q.decode_context < 0 || q.warmup_steps < 0 || q.steps < 0 || q.prefill_tokens < 0 ||
        q.prefill_reps < 0 || q.n_samples < 0 || q.shared_prompt < 0 || q.device < 0) {
        snprintf(err, err_len, "bench: negative parameter");
        return -1;
    }
    q.decode_context = q.decode_context ? q.decode_context : 128;
    q.warmup_steps = q.warmup_steps ? q.warmup_steps : 5;
    q.steps = q.steps ? q.steps : 32;
    q.prefill_tokens = q.prefill_tokens ? q.prefill_tokens : 2048;
    q.prefill_reps = q.prefill_reps ? q.prefill_reps : 3;
    q.n_samples = q.n_samples ? q.n_samples : 16;
    q.shared_prompt = q.shared_prompt ? q.shared_prompt : 2048;

    /* Positions a decoding sequence reaches past its context: the warm-up and timed steps, and
     * one more for the id the last step draws (never forwarded, kept for symmetry). */
    const int64_t tail = (int64_t)q.warmup_steps + q.steps + 1;
    if (q.decode_context + tail > cfg->max_seq_len || q.shared_prompt + tail > cfg->max_seq_len ||
        q.prefill_tokens > cfg->max_seq_len) {
        snprintf(err, err_len, "bench: contexts of %d / %d + %lld decode positions or a %d-token "
                 "prefill exceed max_seq_len %d", q.decode_context, q.shared_prompt,
                 (long long)tail, q.prefill_tokens, cfg->max_seq_len);
        return -1;
    }
    const int64_t per_dec = bc_blocks(q.decode_context + tail);
    const int64_t need = bc_blocks(q.shared_prompt + tail);
    const int64_t full = q.shared_prompt / BC_B;
    const int64_t n = q.n_samples;
    int64_t blocks = max_b * per_dec;
    int64_t b2 = bc_blocks(q.prefill_tokens);
    int64_t b3 = bc_blocks(q.shared_prompt) + n * (need - full);
    int64_t b4 = n * need;
    blocks = blocks > b2 ? blocks : b2;
    blocks = blocks > b3 ? blocks : b3;
    blocks = blocks > b4 ? blocks : b4;
    if (blocks > INT32_MAX / 4) {
        snprintf(err, err_len, "bench: %lld KV blocks needed; too many", (long long)blocks);
        return -1;
    }
    memset(bp, 0, sizeof *bp);
    bp->n_kv_blocks = (int)blocks;
    bp->max_batch_seqs = bc_max(max_b, q.n_samples);
    bp->max_batch_tokens = bc_max(q.prefill_tokens, bp->max_batch_seqs);
    bp->device = q.device;
    *out = q;
    return 0;
}

/* One sequence of a phase: its prompt (prefilled in chunks), its block table. */
struct bc_seq {
    const int32_t *prompt;
    int len;
    int done; /* prompt positions forwarded */
    const int32_t *table;
    int n_blocks;
};

/* The driver's state for one bench_cuda_drive call. */
struct bc_run {
    struct backend *be;
    const struct model_config *cfg;
    struct bench_cuda_params q;
    int max_tokens, max_seqs;
    struct fwd_seq *fwd;     /* (max_seqs) */
    struct fwd_sample *samp; /* (max_seqs) */
    int32_t *cur, *next;     /* (max_seqs) the id each sequence forwards next / just drew */
    struct bc_seq *seqs;     /* (max_seqs) */
    int32_t *tables;         /* block tables of the current phase, back to back */
    int32_t *tokens;         /* random prompt ids, enough for the largest phase */
    double *times;           /* (steps) */
    char *err;
    size_t err_len;
};

static struct fwd_sample bc_greedy(const struct bc_run *r, int stream, int step)
{
    return (struct fwd_sample){.temperature = 0.0f, .top_p = 1.0f, .top_k = 0,
                               .seed = r->q.seed, .stream = (uint64_t)stream,
                               .step = (uint64_t)step};
}

/* Forwards one call; checks every drawn id of the sequences [0, n) that sampled. */
static int bc_forward(struct bc_run *r, int n, const char *phase)
{
    char why[400] = "";
    if (r->be->ops->forward(r->be, r->fwd, n, why, sizeof why) != 0) {
        snprintf(r->err, r->err_len, "bench: %s: %s", phase, why);
        return -1;
    }
    for (int s = 0; s < n; s++) {
        if (r->fwd[s].output != FWD_SAMPLE)
            continue;
        int32_t t = *r->fwd[s].token;
        if (t < 0 || t >= r->cfg->vocab_size) {
            snprintf(r->err, r->err_len, "bench: %s: the backend drew id %d for sequence %d "
                     "(vocabulary %d): non-finite logits?", phase, (int)t, s,
                     r->cfg->vocab_size);
            return -1;
        }
    }
    return 0;
}

/* Prefills the prompts of seqs [0, n) in calls of at most max_tokens tokens and max_seqs
 * sequences, oldest first; the call that finishes a prompt draws its first id (greedy) into
 * cur[s]. */
static int bc_prefill(struct bc_run *r, int n, const char *phase)
{
    for (int s = 0; s < n; s++)
        r->seqs[s].done = 0;
    for (;;) {
        int m = 0, budget = r->max_tokens;
        for (int s = 0; s < n && m < r->max_seqs && budget > 0; s++) {
            struct bc_seq *q = &r->seqs[s];
            if (q->done == q->len)
                continue;
            int take = q->len - q->done < budget ? q->len - q->done : budget;
            int last = q->done + take == q->len;
            r->samp[m] = bc_greedy(r, s, 0);
            r->fwd[m] = (struct fwd_seq){.tokens = q->prompt + q->done, .n_tokens = take,
                                         .pos = q->done, .block_table = q->table,
                                         .n_blocks = q->n_blocks,
                                         .output = last ? FWD_SAMPLE : FWD_NONE,
                                         .sample = last ? &r->samp[m] : NULL,
                                         .token = last ? &r->cur[s] : NULL};
            q->done += take;
            budget -= take;
            m++;
        }
        if (m == 0)
            return 0;
        if (bc_forward(r, m, phase) != 0)
            return -1;
    }
}

static int bc_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Decode steps of seqs [0, n), each continuing after its prompt from cur[s]: warm-up steps,
 * then timed ones; *median_s gets the median step time. */
static int bc_decode(struct bc_run *r, int n, const char *phase, double *median_s)
{
    const int warm = r->q.warmup_steps, steps = r->q.steps;
    for (int st = 0; st < warm + steps; st++) {
        for (int s = 0; s < n; s++) {
            const struct bc_seq *q = &r->seqs[s];
            r->samp[s] = bc_greedy(r, s, st + 1);
            r->fwd[s] = (struct fwd_seq){.tokens = &r->cur[s], .n_tokens = 1,
                                         .pos = q->len + st, .block_table = q->table,
                                         .n_blocks = q->n_blocks, .output = FWD_SAMPLE,
                                         .sample = &r->samp[s], .token = &r->next[s]};
        }
        double t0 = bc_now();
        if (bc_forward(r, n, phase) != 0)
            return -1;
        double dt = bc_now() - t0;
        if (st >= warm)
            r->times[st - warm] = dt;
        memcpy(r->cur, r->next, (size_t)n * sizeof *r->cur);
    }
    qsort(r->times, (size_t)steps, sizeof *r->times, bc_cmp_double);
    *median_s = steps % 2 ? r->times[steps / 2]
                          : 0.5 * (r->times[steps / 2 - 1] + r->times[steps / 2]);
    return 0;
}

/* Sequence s of a phase with private blocks [s * per, (s + 1) * per) and prompt `prompt`. */
static void bc_private_seq(struct bc_run *r, int s, int per, const int32_t *prompt, int len)
{
    int32_t *t = r->tables + (size_t)s * (size_t)per;
    for (int i = 0; i < per; i++)
        t[i] = (int32_t)((size_t)s * (size_t)per + (size_t)i);
    r->seqs[s] = (struct bc_seq){.prompt = prompt, .len = len, .table = t, .n_blocks = per};
}

static int bc_phase_prefill(struct bc_run *r, struct bench_cuda_result *res)
{
    const int n_pre = r->q.prefill_tokens;
    bc_private_seq(r, 0, bc_blocks(n_pre), r->tokens, n_pre);
    double best = 0;
    /* rep 0 warms up (first-use costs: kernels loaded, cuBLAS heuristics, graph capture) */
    for (int rep = 0; rep <= r->q.prefill_reps; rep++) {
        double t0 = bc_now();
        if (bc_prefill(r, 1, "prefill") != 0)
            return -1;
        double dt = bc_now() - t0;
        if (rep == 1 || (rep > 1 && dt < best))
            best = dt;
    }
    res->prefill_tokens = n_pre;
    res->prefill_s = best;
    res->prefill_tok_s = n_pre / best;
    return 0;
}

static int bc_phase_decode(struct bc_run *r, struct bench_cuda_result *res)
{
    const int ctx = r->q.decode_context;
    const int per = bc_blocks((int64_t)ctx + r->q.warmup_steps + r->q.steps + 1);
    char phase[64];
    for (int i = 0; i < r->q.n_batches; i++) {
        int nb = r->q.decode_batches[i];
        snprintf(phase, sizeof phase, "decode batch %d", nb);
        for (int s = 0; s < nb; s++)
            bc_private_seq(r, s, per, r->tokens + (size_t)s * (size_t)ctx, ctx);
        double med;
        if (bc_prefill(r, nb, phase) != 0 || bc_decode(r, nb, phase, &med) != 0)
            return -1;
        res->decode[i].batch = nb;
        res->decode[i].step_ms = med * 1e3;
        res->decode[i].tok_s = nb / med;
    }
    res->n_batches = r->q.n_batches;
    return 0;
}

/* n samples over one prompt: full blocks shared, the partial last block copied for all but
 * the last sample (which keeps the original, as the engine's copy-on-write leaves it); then a
 * single sequence at the same context over sample 0's table. */
static int bc_phase_shared(struct bc_run *r, struct bench_cuda_result *res)
{
    const int P = r->q.shared_prompt, n = r->q.n_samples;
    const int need = bc_blocks((int64_t)P + r->q.warmup_steps + r->q.steps + 1);
    const int full = P / BC_B, pblocks = bc_blocks(P);
    const int partial = P % BC_B != 0;
    /* the prompt: blocks [0, pblocks), its table at the start of tables */
    bc_private_seq(r, 0, pblocks, r->tokens, P);
    if (bc_prefill(r, 1, "shared prompt prefill") != 0)
        return -1;
    const int32_t first = r->cur[0];
    const int32_t partial_id = partial ? r->tables[full] : -1;

    /* sample tables after the prompt's table; sample i's own ids from pblocks + i * (need -
     * full) */
    int32_t *st = r->tables + pblocks;
    int copied = 0;
    for (int i = 0; i < n; i++) {
        int32_t *t = st + (size_t)i * (size_t)need;
        for (int b = 0; b < full; b++)
            t[b] = (int32_t)b;
        for (int b = full; b < need; b++)
            t[b] = (int32_t)(pblocks + (size_t)i * (size_t)(need - full) + (size_t)(b - full));
        if (partial) {
            if (i == n - 1) {
                t[full] = partial_id;
            } else {
                char why[400] = "";
                if (r->be->ops->copy_block(r->be, partial_id, t[full], why, sizeof why) != 0) {
                    snprintf(r->err, r->err_len, "bench: shared prompt: copy_block %d -> %d: %s",
                             (int)partial_id, (int)t[full], why);
                    return -1;
                }
                copied++;
            }
        }
        r->seqs[i] = (struct bc_seq){.prompt = NULL, .len = P, .done = P, .table = t,
                                     .n_blocks = need};
        r->cur[i] = first;
    }
    double med;
    if (bc_decode(r, n, "shared samples", &med) != 0)
        return -1;
    res->n_samples = n;
    res->shared_prompt = P;
    res->copied_blocks = copied;
    res->shared_step_ms = med * 1e3;

    /* one sequence at the same context: sample 0's table (positions < P hold the prompt; the
     * steps rewrite its own positions from P on before reading them) */
    r->cur[0] = first;
    if (bc_decode(r, 1, "single sequence at the shared context", &med) != 0)
        return -1;
    res->single_step_ms = med * 1e3;
    return 0;
}

/* n sequences with private copies of a prompt of the same length (different ids each). */
static int bc_phase_unshared(struct bc_run *r, struct bench_cuda_result *res)
{
    const int P = r->q.shared_prompt, n = r->q.n_samples;
    const int need = bc_blocks((int64_t)P + r->q.warmup_steps + r->q.steps + 1);
    for (int i = 0; i < n; i++)
        bc_private_seq(r, i, need, r->tokens + (size_t)i * (size_t)P, P);
    double med;
    if (bc_prefill(r, n, "unshared prompts prefill") != 0 ||
        bc_decode(r, n, "unshared samples", &med) != 0)
        return -1;
    res->unshared_step_ms = med * 1e3;
    return 0;
}

int bench_cuda_drive(struct backend *be, const struct bench_cuda_params *p,
                     struct bench_cuda_result *res, char *err, size_t err_len)
{
    struct bc_run r = {.be = be, .cfg = be->cfg, .err = err, .err_len = err_len};
    struct backend_params bp;
    int rc = -1;
    struct kern_ceilings ceil = res->ceil;
    char shape[sizeof res->shape];
    memcpy(shape, res->shape, sizeof shape);
    memset(res, 0, sizeof *res);
    res->ceil = ceil;
    memcpy(res->shape, shape, sizeof shape);

    if (!(be->caps & BACKEND_CAP_SAMPLE)) {
        snprintf(err, err_len, "bench: backend %s cannot sample on its device (FWD_SAMPLE)",
                 be->ops->name);
        return -1;
    }
    if (bench_cuda_plan(r.cfg, p, &r.q, &bp, err, err_len) != 0)
        return -1;
    if (be->n_kv_blocks < bp.n_kv_blocks) {
        snprintf(err, err_len, "bench: the backend's KV pool has %d blocks; the plan needs %d",
                 be->n_kv_blocks, bp.n_kv_blocks);
        return -1;
    }
    r.max_tokens = bp.max_batch_tokens;
    r.max_seqs = bp.max_batch_seqs;
    int max_b = 0;
    for (int i = 0; i < r.q.n_batches; i++)
        max_b = bc_max(max_b, r.q.decode_batches[i]);
    size_t n_tok = (size_t)max_b * (size_t)r.q.decode_context;
    if ((size_t)r.q.prefill_tokens > n_tok)
        n_tok = (size_t)r.q.prefill_tokens;
    if ((size_t)r.q.n_samples * (size_t)r.q.shared_prompt > n_tok)
        n_tok = (size_t)r.q.n_samples * (size_t)r.q.shared_prompt;
    size_t S = (size_t)r.max_seqs;
    r.fwd = calloc(S, sizeof *r.fwd);
    r.samp = calloc(S, sizeof *r.samp);
    r.cur = calloc(S, sizeof *r.cur);
    r.next = calloc(S, sizeof *r.next);
    r.seqs = calloc(S, sizeof *r.seqs);
    /* Table entries: the shared phase lists the prompt's table and then n whole sample
     * tables (their shared entries repeat the prompt's ids), more entries than blocks. */
    size_t n_entries = (size_t)bp.n_kv_blocks;
    size_t shared_entries =
        (size_t)bc_blocks(r.q.shared_prompt) +
        (size_t)r.q.n_samples *
            (size_t)bc_blocks((int64_t)r.q.shared_prompt + r.q.warmup_steps + r.q.steps + 1);
    if (shared_entries > n_entries)
        n_entries = shared_entries;
    r.tables = calloc(n_entries, sizeof *r.tables);
    r.tokens = malloc(n_tok * sizeof *r.tokens);
    r.times = calloc((size_t)r.q.steps, sizeof *r.times);
    if (!r.fwd || !r.samp || !r.cur || !r.next || !r.seqs || !r.tables || !r.tokens ||
        !r.times) {
        snprintf(err, err_len, "bench: out of memory for the driver's buffers");
        goto out;
    }
    uint64_t x = r.q.seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n_tok; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        r.tokens[i] = (int32_t)(x % (uint64_t)r.cfg->vocab_size);
    }

    res->device = r.q.device;
    res->kv_blocks = bp.n_kv_blocks;
    res->decode_context = r.q.decode_context;
    res->warmup_steps = r.q.warmup_steps;
    res->steps = r.q.steps;
    if (bc_phase_prefill(&r, res) != 0 || bc_phase_decode(&r, res) != 0 ||
        bc_phase_shared(&r, res) != 0 || bc_phase_unshared(&r, res) != 0)
        goto out;

    res->shared_over_single = res->shared_step_ms / res->single_step_ms;
    res->unshared_over_single = res->unshared_step_ms / res->single_step_ms;
    res->weight_bytes_per_step = roofline_decode_bytes(r.cfg, DTYPE_BF16);
    res->flops_per_token = 2.0 * res->weight_bytes_per_step / (double)dtype_size(DTYPE_BF16);
    if (res->ceil.copy_gb_s > 0) {
        res->roofline_b1_tok_s = res->ceil.copy_gb_s * 1e9 / res->weight_bytes_per_step;
        for (int i = 0; i < res->n_batches; i++)
            if (res->decode[i].batch == 1)
                res->b1_ratio = res->decode[i].tok_s / res->roofline_b1_tok_s;
    }
    if (res->ceil.bf16_tflops > 0)
        for (int i = 0; i < res->n_batches; i++)
            res->decode[i].gemm_util =
                res->decode[i].tok_s * res->flops_per_token / (res->ceil.bf16_tflops * 1e12);
    rc = 0;
out:
    free(r.fwd);
    free(r.samp);
    free(r.cur);
    free(r.next);
    free(r.seqs);
    free(r.tables);
    free(r.tokens);
    free(r.times);
    return rc;
}

int bench_cuda_run_config(const struct model_config *cfg, const char *label,
                          const struct bench_cuda_params *p, struct bench_cuda_result *res,
                          char *err, size_t err_len)
{
    struct bench_cuda_params q;
    struct backend_params bp;
    struct backend *be = NULL;
    memset(res, 0, sizeof *res);
    snprintf(res->shape, sizeof res->shape, "%s", label ? label : "?");
    if (bench_cuda_plan(cfg, p, &q, &bp, err, err_len) != 0)
        return -1;
    /* The ceilings first, while the device is empty: they need ~2.4 GiB for a few seconds. */
    if (!q.skip_ceilings && cuda_ceilings(q.device, &res->ceil, err, err_len) != 0)
        return -1;
    char why[512] = "";
    if (backend_open_random("cuda", cfg, q.seed, &bp, &be, why, sizeof why) != 0) {
        snprintf(err, err_len, "bench: %s", why);
        return -1;
    }
    int rc = bench_cuda_drive(be, &q, res, err, err_len);
    backend_destroy(&be);
    return rc;
}

int bench_cuda_run(const struct bench_cuda_params *p, struct bench_cuda_result *res, char *err,
                   size_t err_len)
{
    struct model_config cfg;
    const char *shape = p->shape ? p->shape : "llama-3.1-8b";
    if (model_shape_by_name(shape, &cfg) != 0) {
        snprintf(err, err_len, "bench: unknown shape '%s' (known: %s)", shape,
                 model_shape_names());
        return -1;
    }
    return bench_cuda_run_config(&cfg, shape, p, res, err, err_len);
}
