/* engine.c — jobs, sequence slots, paged KV with prefix sharing and copy-on-write, the
 * continuous-batching step, and the synchronous helpers (see engine.h for the contract).
 *
 * Owns the backend, the block allocator, the sampler, every job and every untaken result.
 * Scheduling model, in one place:
 * - A job is admitted (FIFO) when enough sequence slots are free: n for a generate job (its
 *   samples fork into them), one or more for a score job. Slots stay with the job until its
 *   item (sample, conversation) finishes.
 * - A job first runs its PREFIX phase: its lead slot alone computes the shared prefix (the
 *   whole prompt of a generate job; the block-aligned common prefix of a score job); then the
 *   job holds references to the prefix's full blocks and every slot continues from there (SEQS
 *   phase). A generate job forks at the end of its first prefill: the samples copy the lead's
 *   block table with a reference on each block and draw their first ids from its logits.
 * - A write into a block that is still shared (refcount > 1) first copies it (copy_block).
 * - Prefix cache: a block is published (kvblocks) once its 16 positions are computed, keyed by
 *   the chain of its tokens and all before it. A sequence about to prefill from a block
 *   boundary first takes every following block the cache already holds, always leaving at
 *   least its phase's last position to compute (its logits are wanted).
 * - Priority is admission order, then slot order. Each step takes single-token work (decodes)
 *   first, then prefill chunks, within max_batch_tokens. Chunks break at fixed positions
 *   (multiples of chunk_tokens), so how a prompt is cut never depends on other jobs.
 * - Out of blocks, a sequence preempts younger work: a whole younger job first (all its blocks
 *   dropped; it recomputes later from its tokens), else a younger slot of its own job (back to
 *   the job's shared prefix). The oldest job thus always progresses, and admission checks that
 *   any one sequence of a job fits the pool, so memory pressure never fails a job.
 * Never prints, never exits; the backend's errors become the failed jobs' errors.
 */
#include "engine.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvblocks.h"
#include "sampler.h"

#define B BACKEND_BLOCK_TOKENS
#define ENGINE_RESERVED_IDS (1ull << 63)

enum engine_phase {
    ENGINE_QUEUED = 0,
    ENGINE_PREFIX = 1, /* the lead slot computes [0, prefix_target); other slots wait */
    ENGINE_SEQS = 2,   /* every slot computes its own tokens past the shared prefix */
    ENGINE_FINISHED = 3,
};

struct engine_job;

struct engine_seq {
    struct engine_job *job; /* NULL: the slot is free */
    int item;               /* sample or conversation index */
    int32_t *tokens;        /* job-owned: positions [0, n_tokens) */
    int n_tokens;
    int n_computed;         /* positions whose K/V are in the blocks */
    int32_t *table;         /* (max_blocks_per_seq) engine-owned block table */
    int n_table;
    uint64_t *keys;         /* (max_blocks_per_seq) content keys of full blocks of tokens */
    int n_keys;
    int batch_idx;          /* this step's item, or -1 */
};

struct engine_job {
    uint64_t id;
    enum engine_job_kind kind;
    enum engine_phase phase;
    struct engine_job *prev, *next; /* in exactly one of queued / running / done */
    struct engine_result *res;      /* built at submission, handed out when taken */

    int32_t *ids;      /* score / logits: inputs, conversations back to back */
    int n_ids;         /* generate: prompt length; otherwise total input ids */
    int n_items;       /* samples or conversations */
    int *item_off;     /* score: where conversation i starts in ids */
    int *item_len;

    struct engine_sampling sampling;
    struct sampler_params sp; /* generate: sample i's token t is drawn with key (seed, i, t) */
    int cap;                  /* generate: token capacity per sample */
    unsigned char *item_done;
    int n_done;
    int next_item;            /* score: next conversation to give a slot */

    int forked;               /* generate: the first prefill has been shared out */
    int prefix_target;        /* tokens the PREFIX phase computes */
    int32_t *prefix_blocks;   /* (prefix_target / B) references held by the job */
    int n_prefix_blocks;

    int *slots;               /* (slot_cap) engine slot per job slot; -1 = released */
    int n_slots, slot_cap;
};

struct engine_list {
    struct engine_job *head, *tail;
    int n;
};

struct engine_item {
    int slot;
    int n;      /* tokens forwarded */
    int dead;   /* dropped from the batch by a preemption */
};

struct engine {
    struct backend *be;
    const struct model_config *cfg;
    struct kvblocks *kv;
    struct sampler *sampler;
    int max_seqs;
    int max_batch_tokens;
    int chunk_tokens;        /* longest prefill chunk: max_batch_tokens - max_seqs */
    int max_ctx;
    int max_blocks_per_seq;

    struct engine_seq *seqs; /* (max_seqs) */
    int32_t *tables;         /* (max_seqs, max_blocks_per_seq) */
    uint64_t *keys;          /* (max_seqs, max_blocks_per_seq) */
    int cache_on;
    int n_free_slots;

    struct engine_item *items; /* (max_seqs) this step's batch */
    int n_items;
    int budget;                /* tokens left in this step */
    struct fwd_seq *fwd;       /* (max_seqs) */
    struct fwd_sample *draws;  /* (max_seqs) FWD_SAMPLE parameters, by batch item */
    int32_t *drawn;            /* (max_seqs) FWD_SAMPLE results, by batch item */
    float *logits;             /* (max_seqs, vocab_size) */
    float *logit0;             /* (max_seqs) */
    int mem_wait;              /* last step left a sequence waiting for blocks */

    struct engine_list queued, running, done;
    struct engine_stats stats;
    engine_token_fn on_token;
    void *on_token_ud;
    uint64_t next_sync_id;
};

/* ---------------------------------------------------------------------------------------- */
/* lists and small helpers                                                                   */

static void engine_list_push(struct engine_list *l, struct engine_job *j)
{
    j->prev = l->tail;
    j->next = NULL;
    if (l->tail)
        l->tail->next = j;
    else
        l->head = j;
    l->tail = j;
    l->n++;
}

static void engine_list_remove(struct engine_list *l, struct engine_job *j)
{
    if (j->prev)
        j->prev->next = j->next;
    else
        l->head = j->next;
    if (j->next)
        j->next->prev = j->prev;
    else
        l->tail = j->prev;
    j->prev = j->next = NULL;
    l->n--;
}

static int engine_ceil_blocks(int tokens)
{
    return (tokens + B - 1) / B;
}

const char *engine_finish_name(enum engine_finish f)
{
    switch (f) {
    case ENGINE_FINISH_STOP:
        return "stop";
    case ENGINE_FINISH_LENGTH:
        return "length";
    case ENGINE_FINISH_CANCELLED:
        return "cancelled";
    }
    return "?";
}

void engine_result_free(struct engine_result **r)
{
    if (!r || !*r)
        return;
    free((*r)->outputs);
    free((*r)->scores);
    free((*r)->logits);
    free((*r)->ids_storage_);
    free(*r);
    *r = NULL;
}

static void engine_job_free(struct engine_job **jp)
{
    struct engine_job *j = *jp;
    if (!j)
        return;
    engine_result_free(&j->res);
    free(j->ids);
    free(j->item_off);
    free(j->item_len);
    free(j->item_done);
    free(j->prefix_blocks);
    free(j->slots);
    free(j);
    *jp = NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* construction                                                                              */

/* Fills defaults into max_seqs and max_batch_tokens and checks them. */
static int engine_resolve_params(struct engine_params *p, char *err, size_t err_len)
{
    if (p->max_seqs == 0)
        p->max_seqs = ENGINE_DEFAULT_MAX_SEQS;
    if (p->max_batch_tokens == 0 && p->max_seqs > 0 && p->max_seqs <= 65536)
        p->max_batch_tokens = p->max_seqs * 2 > ENGINE_DEFAULT_MAX_BATCH_TOKENS
                                  ? p->max_seqs * 2 : ENGINE_DEFAULT_MAX_BATCH_TOKENS;
    if (p->max_seqs < 1 || p->max_seqs > 65536) {
        snprintf(err, err_len, "max_seqs is %d; it must be in 1..65536", p->max_seqs);
        return -1;
    }
    if (p->max_batch_tokens <= p->max_seqs || p->max_batch_tokens > (1 << 24)) {
        snprintf(err, err_len,
                 "max_batch_tokens is %d; it must exceed max_seqs (%d), which each step keeps "
                 "free for decodes, and be at most %d", p->max_batch_tokens, p->max_seqs,
                 1 << 24);
        return -1;
    }
    return 0;
}

int engine_new_with_backend(struct backend **bep, const struct engine_params *params,
                            struct engine **out, char *err, size_t err_len)
{
    *out = NULL;
    struct backend *be = *bep;
    *bep = NULL;
    struct engine_params p = {0};
    if (params)
        p = *params;
    struct engine *e = NULL;
    if (!be) {
        snprintf(err, err_len, "engine: no backend");
        return -1;
    }
    if (engine_resolve_params(&p, err, err_len) != 0)
        goto fail_be;
    const struct model_config *cfg = be->cfg;
    if (!cfg || cfg->vocab_size < 1 || cfg->max_seq_len < 2 || be->n_kv_blocks < 1) {
        snprintf(err, err_len, "engine: the backend has no usable model config or KV pool");
        goto fail_be;
    }

    e = calloc(1, sizeof *e);
    if (!e)
        goto oom;
    e->be = be;
    be = NULL;
    e->cfg = cfg;
    e->max_seqs = p.max_seqs;
    e->max_batch_tokens = p.max_batch_tokens;
    e->chunk_tokens = p.max_batch_tokens - p.max_seqs;
    int pool_tokens = e->be->n_kv_blocks > INT_MAX / B ? INT_MAX : e->be->n_kv_blocks * B;
    e->max_ctx = cfg->max_seq_len < pool_tokens ? cfg->max_seq_len : pool_tokens;
    e->max_blocks_per_seq = engine_ceil_blocks(e->max_ctx);
    e->n_free_slots = p.max_seqs;
    e->cache_on = !p.prefix_cache_off;
    if (kvblocks_new(e->be->n_kv_blocks, &e->kv, err, err_len) != 0)
        goto fail;
    if (sampler_new(cfg->vocab_size, &e->sampler, err, err_len) != 0)
        goto fail;
    size_t ns = (size_t)p.max_seqs;
    e->seqs = calloc(ns, sizeof *e->seqs);
    e->tables = malloc(ns * (size_t)e->max_blocks_per_seq * sizeof *e->tables);
    e->keys = malloc(ns * (size_t)e->max_blocks_per_seq * sizeof *e->keys);
    e->items = calloc(ns, sizeof *e->items);
    e->fwd = calloc(ns, sizeof *e->fwd);
    e->draws = calloc(ns, sizeof *e->draws);
    e->drawn = calloc(ns, sizeof *e->drawn);
    e->logits = malloc(ns * (size_t)cfg->vocab_size * sizeof *e->logits);
    e->logit0 = malloc(ns * sizeof *e->logit0);
    if (!e->seqs || !e->tables || !e->keys || !e->items || !e->fwd || !e->draws || !e->drawn ||
        !e->logits || !e->logit0)
        goto oom;
    for (int i = 0; i < p.max_seqs; i++) {
        e->seqs[i].table = e->tables + (size_t)i * (size_t)e->max_blocks_per_seq;
        e->seqs[i].keys = e->keys + (size_t)i * (size_t)e->max_blocks_per_seq;
        e->seqs[i].batch_idx = -1;
    }
    *out = e;
    return 0;
oom:
    snprintf(err, err_len, "engine: out of memory for %d sequences of up to %d tokens",
             p.max_seqs, e ? e->max_ctx : 0);
fail:
    engine_destroy(&e);
fail_be:
    backend_destroy(&be);
    return -1;
}

int engine_new(const struct checkpoint *ck, const struct engine_params *params,
               struct engine **out, char *err, size_t err_len)
{
    *out = NULL;
    struct engine_params p = {0};
    if (params)
        p = *params;
    if (p.kv_tokens == 0)
        p.kv_tokens = ENGINE_DEFAULT_KV_TOKENS;
    if (p.kv_tokens < 0) {
        snprintf(err, err_len, "kv_tokens is %d; it must be > 0", p.kv_tokens);
        return -1;
    }
    if (engine_resolve_params(&p, err, err_len) != 0)
        return -1;
    struct backend_params bp = {
        .n_kv_blocks = 0,
        .kv_tokens = p.kv_tokens,
        .max_batch_tokens = p.max_batch_tokens,
        .max_batch_seqs = p.max_seqs,
        .n_threads = p.n_threads,
        .device = p.device,
    };
    struct backend *be = NULL;
    if (backend_open(p.backend ? p.backend : "cpu", ck, &bp, &be, err, err_len) != 0)
        return -1;
    return engine_new_with_backend(&be, &p, out, err, err_len);
}

void engine_destroy(struct engine **ep)
{
    if (!ep || !*ep)
        return;
    struct engine *e = *ep;
    struct engine_list *lists[3] = {&e->queued, &e->running, &e->done};
    for (int i = 0; i < 3; i++) {
        while (lists[i]->head) {
            struct engine_job *j = lists[i]->head;
            engine_list_remove(lists[i], j);
            engine_job_free(&j);
        }
    }
    kvblocks_destroy(&e->kv);
    sampler_destroy(&e->sampler);
    free(e->seqs);
    free(e->tables);
    free(e->keys);
    free(e->items);
    free(e->fwd);
    free(e->draws);
    free(e->drawn);
    free(e->logits);
    free(e->logit0);
    backend_destroy(&e->be);
    free(e);
    *ep = NULL;
}

const struct model_config *engine_config(const struct engine *e)
{
    return e->cfg;
}

int engine_max_seqs(const struct engine *e)
{
    return e->max_seqs;
}

int engine_max_context(const struct engine *e)
{
    return e->max_ctx;
}

int engine_kv_tokens(const struct engine *e)
{
    int n = kvblocks_n_total(e->kv);
    return n > INT_MAX / B ? INT_MAX : n * B;
}

int engine_kv_blocks_total(const struct engine *e)
{
    return kvblocks_n_total(e->kv);
}

int engine_kv_blocks_free(const struct engine *e)
{
    return kvblocks_n_free(e->kv);
}

const char *engine_backend_name(const struct engine *e)
{
    return e->be->ops->name;
}

void engine_get_stats(const struct engine *e, struct engine_stats *out)
{
    *out = e->stats;
}

void engine_set_token_callback(struct engine *e, engine_token_fn fn, void *ud)
{
    e->on_token = fn;
    e->on_token_ud = ud;
}

int engine_pending(const struct engine *e)
{
    return e->queued.n + e->running.n;
}

/* ---------------------------------------------------------------------------------------- */
/* submission                                                                                */

static struct engine_job *engine_find(struct engine *e, uint64_t id, struct engine_list **in)
{
    struct engine_list *lists[3] = {&e->queued, &e->running, &e->done};
    for (int i = 0; i < 3; i++)
        for (struct engine_job *j = lists[i]->head; j; j = j->next)
            if (j->id == id) {
                if (in)
                    *in = lists[i];
                return j;
            }
    return NULL;
}

static int engine_check_id(struct engine *e, uint64_t id, int internal, char *err,
                           size_t err_len)
{
    if (!internal && id >= ENGINE_RESERVED_IDS) {
        snprintf(err, err_len, "job_id %llu is reserved (ids must be below 2^63)",
                 (unsigned long long)id);
        return -1;
    }
    if (engine_find(e, id, NULL)) {
        snprintf(err, err_len, "job_id %llu is already in use", (unsigned long long)id);
        return -1;
    }
    return 0;
}

/* Checks ids and length of one input sequence: what = "prompt" or "conversation 3". `room`
 * is how many positions past the input must still fit the model (1 for a prompt to be
 * continued, 0 for one only read). */
static int engine_check_input(const struct engine *e, const char *what, const int32_t *ids,
                              int n, int room, char *err, size_t err_len)
{
    const struct model_config *cfg = e->cfg;
    if (!ids || n < 1) {
        snprintf(err, err_len, "%s is empty; it needs at least one token", what);
        return -1;
    }
    if (n + room > cfg->max_seq_len) {
        snprintf(err, err_len, "%s is %d tokens; the model's limit is %d "
                 "(max_position_embeddings)%s", what, n, cfg->max_seq_len,
                 room ? ", which must leave room for one generated token" : "");
        return -1;
    }
    int pool = engine_kv_tokens(e);
    if (n > pool) { /* every input position is forwarded into the cache */
        snprintf(err, err_len, "%s is %d tokens; the KV cache holds %d (kv_tokens)", what, n,
                 pool);
        return -1;
    }
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= cfg->vocab_size) {
            snprintf(err, err_len, "%s: id %d at index %d is outside the vocabulary (0..%d)",
                     what, (int)ids[i], i, cfg->vocab_size - 1);
            return -1;
        }
    return 0;
}

static struct engine_job *engine_job_alloc(uint64_t id, enum engine_job_kind kind, int n_items,
                                           int slot_cap)
{
    struct engine_job *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    j->id = id;
    j->kind = kind;
    j->n_items = n_items;
    j->slot_cap = slot_cap;
    j->res = calloc(1, sizeof *j->res);
    j->item_done = calloc((size_t)n_items, 1);
    j->slots = malloc((size_t)slot_cap * sizeof *j->slots);
    if (!j->res || !j->item_done || !j->slots) {
        engine_job_free(&j);
        return NULL;
    }
    for (int k = 0; k < slot_cap; k++)
        j->slots[k] = -1;
    j->res->job_id = id;
    j->res->kind = kind;
    return j;
}

static int engine_add_generate_id(struct engine *e, uint64_t job_id, int internal,
                                  const int32_t *prompt, int n_prompt, int n,
                                  const struct engine_sampling *sampling, char *err,
                                  size_t err_len)
{
    if (engine_check_id(e, job_id, internal, err, err_len) != 0)
        return -1;
    if (!sampling) {
        snprintf(err, err_len, "sampling parameters are missing");
        return -1;
    }
    if (n < 1 || n > e->max_seqs) {
        snprintf(err, err_len, "n is %d; it must be in 1..%d (max_seqs)", n, e->max_seqs);
        return -1;
    }
    if (sampling->max_tokens < 1) {
        snprintf(err, err_len, "max_tokens is %d; it must be >= 1", sampling->max_tokens);
        return -1;
    }
    struct sampler_params sp = {
        .temperature = sampling->temperature,
        .top_p = sampling->top_p,
        .top_k = sampling->top_k,
    };
    if (sampler_check_params(&sp, err, err_len) != 0)
        return -1;
    if (engine_check_input(e, "prompt", prompt, n_prompt, 1, err, err_len) != 0)
        return -1;
    const struct model_config *cfg = e->cfg;
    long long want = (long long)n_prompt + sampling->max_tokens;
    int cap = want < cfg->max_seq_len ? (int)want : cfg->max_seq_len;
    /* The last id drawn is never forwarded, so a sample occupies at most cap - 1 positions. */
    if (cap - 1 > engine_kv_tokens(e)) {
        snprintf(err, err_len, "prompt (%d tokens) plus max_tokens (%d) needs %d KV positions; "
                 "the KV cache holds %d (kv_tokens): lower max_tokens", n_prompt,
                 sampling->max_tokens, cap - 1, engine_kv_tokens(e));
        return -1;
    }

    struct engine_job *j = engine_job_alloc(job_id, ENGINE_JOB_GENERATE, n, n);
    if (!j)
        goto oom;
    j->sampling = *sampling;
    j->sp = sp;
    j->cap = cap;
    j->n_ids = n_prompt;
    j->res->outputs = calloc((size_t)n, sizeof *j->res->outputs);
    j->res->ids_storage_ = malloc((size_t)n * (size_t)cap * sizeof(int32_t));
    if (!j->res->outputs || !j->res->ids_storage_)
        goto oom;
    j->res->n_outputs = n;
    j->res->prompt_tokens = n_prompt;
    for (int i = 0; i < n; i++) {
        int32_t *buf = j->res->ids_storage_ + (size_t)i * (size_t)cap;
        memcpy(buf, prompt, (size_t)n_prompt * sizeof *buf);
        j->res->outputs[i].ids = buf + n_prompt;
        j->res->outputs[i].finish = ENGINE_FINISH_CANCELLED;
    }
    j->prefix_target = n_prompt;
    j->phase = ENGINE_QUEUED;
    engine_list_push(&e->queued, j);
    return 0;
oom:
    engine_job_free(&j);
    snprintf(err, err_len, "out of memory for %d samples of up to %d tokens", n, cap);
    return -1;
}

int engine_add_generate(struct engine *e, uint64_t job_id, const int32_t *prompt, int n_prompt,
                        int n, const struct engine_sampling *sampling, char *err,
                        size_t err_len)
{
    return engine_add_generate_id(e, job_id, 0, prompt, n_prompt, n, sampling, err, err_len);
}

/* Score and logits jobs: items are read-only inputs copied back to back into j->ids. */
static int engine_add_inputs_id(struct engine *e, uint64_t job_id, int internal,
                                enum engine_job_kind kind, const int32_t *const *convs,
                                const int *lens, int n_convs, char *err, size_t err_len)
{
    const char *noun = kind == ENGINE_JOB_SCORE ? "conversation" : "prompt";
    if (engine_check_id(e, job_id, internal, err, err_len) != 0)
        return -1;
    if (n_convs < 1 || !convs || !lens) {
        snprintf(err, err_len, "%s list is empty", noun);
        return -1;
    }
    long long total = 0;
    int min_len = INT_MAX;
    for (int i = 0; i < n_convs; i++) {
        char what[64];
        if (kind == ENGINE_JOB_SCORE)
            snprintf(what, sizeof what, "conversation %d", i);
        else
            snprintf(what, sizeof what, "prompt");
        if (engine_check_input(e, what, convs[i], lens[i], 0, err, err_len) != 0)
            return -1;
        total += lens[i];
        if (lens[i] < min_len)
            min_len = lens[i];
    }
    if (total > INT_MAX) {
        snprintf(err, err_len, "%d %ss hold %lld tokens in all; at most %d per job", n_convs,
                 noun, total, INT_MAX);
        return -1;
    }
    int slot_cap = n_convs < e->max_seqs ? n_convs : e->max_seqs;
    struct engine_job *j = engine_job_alloc(job_id, kind, n_convs, slot_cap);
    if (!j)
        goto oom;
    j->ids = malloc((size_t)total * sizeof *j->ids);
    j->item_off = malloc((size_t)n_convs * sizeof *j->item_off);
    j->item_len = malloc((size_t)n_convs * sizeof *j->item_len);
    if (!j->ids || !j->item_off || !j->item_len)
        goto oom;
    int off = 0;
    for (int i = 0; i < n_convs; i++) {
        j->item_off[i] = off;
        j->item_len[i] = lens[i];
        memcpy(j->ids + off, convs[i], (size_t)lens[i] * sizeof *j->ids);
        off += lens[i];
    }
    j->n_ids = (int)total;
    j->res->prompt_tokens = (int)total;
    if (kind == ENGINE_JOB_SCORE) {
        j->res->scores = malloc((size_t)n_convs * sizeof *j->res->scores);
        if (!j->res->scores)
            goto oom;
        j->res->n_scores = n_convs;
        for (int i = 0; i < n_convs; i++)
            j->res->scores[i] = NAN;
        /* Longest prefix common to every conversation, leaving each at least one token of
         * its own (its last position must be computed for its score), in whole blocks so
         * that no conversation ever writes into a shared block. */
        int lcp = min_len - 1;
        for (int i = 1; i < n_convs && lcp > 0; i++) {
            const int32_t *a = j->ids, *b = j->ids + j->item_off[i];
            int k = 0;
            while (k < lcp && a[k] == b[k])
                k++;
            lcp = k;
        }
        j->prefix_target = n_convs > 1 ? lcp / B * B : 0;
    } else {
        j->res->logits = malloc((size_t)e->cfg->vocab_size * sizeof *j->res->logits);
        if (!j->res->logits)
            goto oom;
        j->res->n_logits = e->cfg->vocab_size;
        j->prefix_target = 0;
    }
    j->phase = ENGINE_QUEUED;
    engine_list_push(&e->queued, j);
    return 0;
oom:
    engine_job_free(&j);
    snprintf(err, err_len, "out of memory for %d %ss of %lld tokens", n_convs, noun, total);
    return -1;
}

int engine_add_score(struct engine *e, uint64_t job_id, const int32_t *const *convs,
                     const int *conv_lens, int n_convs, char *err, size_t err_len)
{
    return engine_add_inputs_id(e, job_id, 0, ENGINE_JOB_SCORE, convs, conv_lens, n_convs, err,
                                err_len);
}

int engine_add_logits(struct engine *e, uint64_t job_id, const int32_t *prompt, int n_prompt,
                      char *err, size_t err_len)
{
    const int32_t *convs[1] = {prompt};
    int lens[1] = {n_prompt};
    return engine_add_inputs_id(e, job_id, 0, ENGINE_JOB_LOGITS, convs, lens, 1, err, err_len);
}

/* ---------------------------------------------------------------------------------------- */
/* blocks, slots, preemption                                                                 */

static void engine_batch_drop(struct engine *e, struct engine_seq *q)
{
    if (q->batch_idx < 0)
        return;
    struct engine_item *it = &e->items[q->batch_idx];
    it->dead = 1;
    e->budget += it->n;
    q->batch_idx = -1;
}

/* Drops the sequence's references to table[keep..n_table). */
static void engine_seq_trim(struct engine *e, struct engine_seq *q, int keep)
{
    for (int i = keep; i < q->n_table; i++)
        kvblocks_unref(e->kv, q->table[i]);
    if (q->n_table > keep)
        q->n_table = keep;
}

/* Points the sequence at the job's shared prefix: the state right after the PREFIX phase. */
static void engine_seq_to_prefix(struct engine *e, struct engine_job *j, struct engine_seq *q)
{
    engine_seq_trim(e, q, 0);
    for (int i = 0; i < j->n_prefix_blocks; i++) {
        kvblocks_ref(e->kv, j->prefix_blocks[i]);
        q->table[i] = j->prefix_blocks[i];
    }
    q->n_table = j->n_prefix_blocks;
    q->n_computed = j->n_prefix_blocks * B;
}

static void engine_slot_release(struct engine *e, struct engine_job *j, int k)
{
    int s = j->slots[k];
    if (s < 0)
        return;
    struct engine_seq *q = &e->seqs[s];
    engine_batch_drop(e, q);
    engine_seq_trim(e, q, 0);
    q->job = NULL;
    q->tokens = NULL;
    q->n_tokens = q->n_computed = q->n_keys = 0;
    j->slots[k] = -1;
    e->n_free_slots++;
}

static void engine_job_drop_prefix(struct engine *e, struct engine_job *j)
{
    for (int i = 0; i < j->n_prefix_blocks; i++)
        kvblocks_unref(e->kv, j->prefix_blocks[i]);
    j->n_prefix_blocks = 0;
}

static int engine_job_holds_blocks(const struct engine *e, const struct engine_job *j)
{
    if (j->n_prefix_blocks > 0)
        return 1;
    for (int k = 0; k < j->n_slots; k++)
        if (j->slots[k] >= 0 && e->seqs[j->slots[k]].n_table > 0)
            return 1;
    return 0;
}

/* Whole-job preemption: every block dropped; the job restarts with its PREFIX phase (or
 * straight from position 0 when it shares nothing) and recomputes from its tokens. */
static void engine_preempt_job(struct engine *e, struct engine_job *j)
{
    for (int k = 0; k < j->n_slots; k++) {
        if (j->slots[k] < 0)
            continue;
        struct engine_seq *q = &e->seqs[j->slots[k]];
        engine_batch_drop(e, q);
        engine_seq_trim(e, q, 0);
        q->n_computed = 0;
        e->stats.preemptions++;
    }
    engine_job_drop_prefix(e, j);
    j->phase = j->prefix_target > 0 ? ENGINE_PREFIX : ENGINE_SEQS;
}

/* Frees blocks for job j's slot k_req by preempting younger work. Returns 1 when something
 * was preempted, 0 when nothing younger holds blocks. */
static int engine_preempt_younger(struct engine *e, struct engine_job *j, int k_req)
{
    for (struct engine_job *v = e->running.tail; v && v != j; v = v->prev)
        if (engine_job_holds_blocks(e, v)) {
            engine_preempt_job(e, v);
            return 1;
        }
    for (int k = j->n_slots - 1; k > k_req; k--) {
        if (j->slots[k] < 0)
            continue;
        struct engine_seq *q = &e->seqs[j->slots[k]];
        if (q->n_table > j->n_prefix_blocks) {
            engine_batch_drop(e, q);
            engine_seq_to_prefix(e, j, q);
            e->stats.preemptions++;
            return 1;
        }
    }
    return 0;
}

/* Makes positions [n_computed, end) of job j's slot k writable: a private copy of a shared
 * block being appended to, and fresh blocks past the table. Preempts younger work when the
 * pool is short. Returns 0 when ready, 1 when the sequence must wait, negative on a backend
 * error (copy_block failed; err filled). */
static int engine_reserve(struct engine *e, struct engine_job *j, int k, int end, char *err,
                          size_t err_len)
{
    struct engine_seq *q = &e->seqs[j->slots[k]];
    for (;;) {
        int first = q->n_computed / B;
        int grow = engine_ceil_blocks(end) - q->n_table;
        if (grow < 0)
            grow = 0;
        int cow = first < q->n_table && kvblocks_refcount(e->kv, q->table[first]) > 1;
        if (kvblocks_n_free(e->kv) >= grow + cow) {
            if (cow) {
                int dst = kvblocks_alloc(e->kv);
                int src = q->table[first];
                if (e->be->ops->copy_block(e->be, src, dst, err, err_len) != 0) {
                    kvblocks_unref(e->kv, dst);
                    return -1;
                }
                kvblocks_unref(e->kv, src);
                q->table[first] = dst;
                e->stats.copied_blocks++;
            }
            for (int i = 0; i < grow; i++)
                q->table[q->n_table++] = kvblocks_alloc(e->kv);
            return 0;
        }
        if (!engine_preempt_younger(e, j, k))
            return 1;
        /* A preempted sibling may have released our shared block: recompute the need. */
    }
}

/* ---------------------------------------------------------------------------------------- */
/* admission                                                                                 */

static int engine_take_slot(struct engine *e)
{
    for (int s = 0; s < e->max_seqs; s++)
        if (!e->seqs[s].job) {
            e->n_free_slots--;
            return s;
        }
    return -1;
}

/* Gives job slot k (engine slot s) item `item` of a score or logits job. */
static void engine_assign_item(struct engine_job *j, struct engine_seq *q, int item)
{
    q->item = item;
    q->tokens = j->ids + j->item_off[item];
    q->n_tokens = j->item_len[item];
    q->n_computed = 0;
    q->n_table = 0;
    q->n_keys = 0;
}

/* Admits job j when slots and *avail_blocks allow (blocks are taken lazily, chunk by chunk,
 * so admission debits what the job's first prefill will want from a running estimate). */
static int engine_admit_one(struct engine *e, struct engine_job *j, int *avail_blocks)
{
    int slots_wanted = j->kind == ENGINE_JOB_GENERATE ? j->n_items : 1;
    if (e->n_free_slots < slots_wanted)
        return 0;
    int lead_tokens = j->kind == ENGINE_JOB_GENERATE ? j->n_ids
                      : j->prefix_target > 0       ? j->prefix_target
                                                   : j->item_len[0];
    int want = engine_ceil_blocks(lead_tokens);
    if (*avail_blocks < want)
        return 0;
    *avail_blocks -= want;
    int n = j->kind == ENGINE_JOB_GENERATE ? j->n_items
            : (e->n_free_slots < j->slot_cap ? e->n_free_slots : j->slot_cap);
    for (int k = 0; k < n; k++) {
        int s = engine_take_slot(e);
        struct engine_seq *q = &e->seqs[s];
        q->job = j;
        q->batch_idx = -1;
        j->slots[k] = s;
        if (j->kind == ENGINE_JOB_GENERATE) {
            q->item = k;
            q->tokens = j->res->ids_storage_ + (size_t)k * (size_t)j->cap;
            q->n_tokens = k == 0 ? j->n_ids : 0; /* the others are filled at the fork */
            q->n_computed = 0;
            q->n_table = 0;
            q->n_keys = 0;
        } else {
            engine_assign_item(j, q, k);
        }
    }
    j->n_slots = n;
    j->next_item = n;
    j->phase = j->prefix_target > 0 ? ENGINE_PREFIX : ENGINE_SEQS;
    engine_list_remove(&e->queued, j);
    engine_list_push(&e->running, j);
    return 1;
}

static void engine_admit(struct engine *e)
{
    if (e->mem_wait && e->running.n)
        return; /* admitted work waits for blocks: newcomers would only compete */
    int avail = kvblocks_n_free(e->kv);
    while (e->queued.head && engine_admit_one(e, e->queued.head, &avail))
        ;
}

/* ---------------------------------------------------------------------------------------- */
/* finishing                                                                                 */

static void engine_job_finish(struct engine *e, struct engine_job *j, enum engine_status st,
                              const char *why)
{
    for (int k = 0; k < j->n_slots; k++)
        engine_slot_release(e, j, k);
    engine_job_drop_prefix(e, j);
    j->res->status = st;
    if (why)
        snprintf(j->res->error, sizeof j->res->error, "%s", why);
    /* Unfinished outputs keep their ids so far with finish "cancelled" (set at submission). */
    engine_list_remove(j->phase == ENGINE_QUEUED ? &e->queued : &e->running, j);
    j->phase = ENGINE_FINISHED;
    engine_list_push(&e->done, j);
    e->stats.jobs_done++;
}

static void engine_item_done(struct engine *e, struct engine_job *j, int k)
{
    struct engine_seq *q = &e->seqs[j->slots[k]];
    j->item_done[q->item] = 1;
    j->n_done++;
    if (j->n_done == j->n_items) {
        engine_job_finish(e, j, ENGINE_JOB_OK, NULL);
        return;
    }
    if (j->kind == ENGINE_JOB_SCORE && j->next_item < j->n_items) {
        /* The slot moves on to the next conversation, starting past the shared prefix. */
        engine_batch_drop(e, q);
        engine_seq_trim(e, q, 0);
        engine_assign_item(j, q, j->next_item++);
        if (j->phase == ENGINE_SEQS)
            engine_seq_to_prefix(e, j, q);
        return;
    }
    engine_slot_release(e, j, k);
}

static int engine_is_eos(const struct model_config *cfg, int32_t t)
{
    for (int i = 0; i < cfg->n_eos; i++)
        if (cfg->eos_ids[i] == t)
            return 1;
    return 0;
}

/* The key of sample q's next draw: (seed, the sample's index, the index of the token being
 * drawn). Every draw either appends a token or ends the sample, so the tokens past the
 * prompt count the draws made: the key survives preemption and recomputation unchanged. */
static struct sampler_key engine_draw_key(const struct engine_job *j,
                                          const struct engine_seq *q)
{
    return (struct sampler_key){.seed = j->sampling.seed,
                                .stream = (uint64_t)q->item,
                                .step = (uint64_t)(q->n_tokens - j->n_ids)};
}

/* Whether generate job j's next ids are drawn by the backend (FWD_SAMPLE) rather than from
 * logits on the host: when the backend can, except at the fork of a job of several samples,
 * whose first ids all come from the one row of logits the shared prefill gives. */
static int engine_backend_draws(const struct engine *e, const struct engine_job *j)
{
    return (e->be->caps & BACKEND_CAP_SAMPLE) && (j->forked || j->n_items == 1);
}

/* Sample (job slot k)'s next id: *drawn when the backend drew it (FWD_SAMPLE), else drawn
 * from `logits` by the host sampler; then appended, or the sample finished. Returns 0, or -1
 * with err filled when no id could be drawn (the caller fails the job). */
static int engine_draw(struct engine *e, struct engine_job *j, int k, const float *logits,
                       const int32_t *drawn, char *err, size_t err_len)
{
    struct engine_seq *q = &e->seqs[j->slots[k]];
    int32_t t;
    if (drawn) {
        t = *drawn;
        if (t < 0 || t >= e->cfg->vocab_size) {
            snprintf(err, err_len, "backend %s drew id %d, outside the vocabulary 0..%d (the "
                     "logits hold no finite value?)", e->be->ops->name, (int)t,
                     e->cfg->vocab_size - 1);
            return -1;
        }
    } else {
        struct sampler_key key = engine_draw_key(j, q);
        if (sampler_sample(e->sampler, logits, &j->sp, &key, &t, err, err_len) != 0)
            return -1;
    }
    struct engine_output *o = &j->res->outputs[q->item];
    j->res->completion_tokens++;
    int finished = 0;
    if (!j->sampling.ignore_eos && engine_is_eos(e->cfg, t)) {
        o->finish = ENGINE_FINISH_STOP;
        finished = 1;
    } else {
        q->tokens[q->n_tokens++] = t;
        o->n_ids = q->n_tokens - j->n_ids;
        if (o->n_ids >= j->sampling.max_tokens || q->n_tokens >= j->cap) {
            o->finish = ENGINE_FINISH_LENGTH;
            finished = 1;
        }
    }
    if (e->on_token)
        e->on_token(e->on_token_ud, j->id, q->item, t, finished, o->finish);
    if (finished)
        engine_item_done(e, j, k);
    return 0;
}

/* The lead finished the PREFIX phase: share its blocks. For a generate job's first prefill this
 * is the fork: every sample copies the lead's table (one reference per block, the partial last
 * block included: copy-on-write happens at its first write) and draws its first id, from
 * `logits`, or (a job of one sample on a backend that samples) *drawn. */
static int engine_prefix_done(struct engine *e, struct engine_job *j, int k_lead,
                              const float *logits, const int32_t *drawn, char *err,
                              size_t err_len)
{
    struct engine_seq *lead = &e->seqs[j->slots[k_lead]];
    int nb = j->prefix_target / B;
    if (j->kind == ENGINE_JOB_GENERATE && !j->forked) {
        nb = j->n_ids / B;
        for (int k = 0; k < j->n_slots; k++) {
            if (k == k_lead || j->slots[k] < 0)
                continue;
            struct engine_seq *q = &e->seqs[j->slots[k]];
            for (int i = 0; i < lead->n_table; i++) {
                kvblocks_ref(e->kv, lead->table[i]);
                q->table[i] = lead->table[i];
            }
            q->n_table = lead->n_table;
            q->n_tokens = q->n_computed = j->n_ids;
        }
    }
    if (!j->prefix_blocks && nb > 0) {
        j->prefix_blocks = malloc((size_t)nb * sizeof *j->prefix_blocks);
        if (!j->prefix_blocks) {
            snprintf(err, err_len, "out of memory for a prefix of %d blocks", nb);
            return -1;
        }
    }
    for (int i = 0; i < nb; i++) {
        kvblocks_ref(e->kv, lead->table[i]);
        j->prefix_blocks[i] = lead->table[i];
    }
    j->n_prefix_blocks = nb;
    j->phase = ENGINE_SEQS;
    if (j->kind == ENGINE_JOB_GENERATE && !j->forked) {
        j->forked = 1;
        j->prefix_target = nb * B; /* what a restart after preemption recomputes first */
        for (int k = 0; k < j->n_slots && j->phase != ENGINE_FINISHED; k++)
            if (j->slots[k] >= 0 && engine_draw(e, j, k, logits, drawn, err, err_len) != 0)
                return -1;
        return 0;
    }
    for (int k = 0; k < j->n_slots; k++)
        if (k != k_lead && j->slots[k] >= 0)
            engine_seq_to_prefix(e, j, &e->seqs[j->slots[k]]);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* the step                                                                                  */

static int engine_lead(const struct engine_job *j)
{
    for (int k = 0; k < j->n_slots; k++)
        if (j->slots[k] >= 0)
            return k;
    return -1;
}

/* Where job slot k's work this phase ends, or -1 when it has none. */
static int engine_seq_end(const struct engine *e, const struct engine_job *j, int k)
{
    if (j->slots[k] < 0)
        return -1;
    const struct engine_seq *q = &e->seqs[j->slots[k]];
    int end;
    if (j->phase == ENGINE_PREFIX) {
        if (k != engine_lead(j))
            return -1;
        end = j->prefix_target;
    } else {
        end = q->n_tokens;
    }
    return q->n_computed < end ? end : -1;
}

/* Content key of the sequence's block i (tokens [i*B, (i+1)*B) must exist). */
static uint64_t engine_block_key(struct engine_seq *q, int i)
{
    while (q->n_keys <= i) {
        uint64_t prev = q->n_keys ? q->keys[q->n_keys - 1] : 0;
        q->keys[q->n_keys] = kvblocks_key(prev, q->tokens + (size_t)q->n_keys * B);
        q->n_keys++;
    }
    return q->keys[i];
}

/* Takes from the prefix cache every block that continues the sequence from n_computed, as
 * long as at least the position before `end` is left to compute. */
static void engine_cache_take(struct engine *e, struct engine_seq *q, int end)
{
    if (!e->cache_on)
        return;
    while (q->n_computed % B == 0 && q->n_table == q->n_computed / B &&
           q->n_computed + B <= end - 1) {
        int i = q->n_table;
        uint64_t prev = i ? engine_block_key(q, i - 1) : 0;
        int id = kvblocks_lookup(e->kv, engine_block_key(q, i), prev, q->tokens + (size_t)i * B);
        if (id < 0)
            return;
        q->table[q->n_table++] = id;
        q->n_computed += B;
        e->stats.cached_tokens += B;
    }
}

/* Publishes the blocks that positions [from, to) just completed. */
static void engine_cache_publish(struct engine *e, struct engine_seq *q, int from, int to)
{
    if (!e->cache_on)
        return;
    for (int i = from / B; (i + 1) * B <= to; i++) {
        uint64_t prev = i ? engine_block_key(q, i - 1) : 0;
        kvblocks_publish(e->kv, q->table[i], engine_block_key(q, i), prev,
                         q->tokens + (size_t)i * B);
    }
}

/* Tries to put job slot k's next piece of work (up to `end`, at most `max_n` tokens, ending
 * at a chunk boundary) into the batch. Returns 0 added or skipped, 1 waiting for blocks,
 * negative on a backend error. */
static int engine_plan(struct engine *e, struct engine_job *j, int k, int end, char *err,
                       size_t err_len)
{
    struct engine_seq *q = &e->seqs[j->slots[k]];
    engine_cache_take(e, q, end);
    int c = e->chunk_tokens;
    int boundary = (q->n_computed / c + 1) * c;
    int stop = end < boundary ? end : boundary;
    int n = stop - q->n_computed;
    if (n > e->budget)
        return 0;
    int rc = engine_reserve(e, j, k, stop, err, err_len);
    if (rc != 0)
        return rc;
    struct engine_item *it = &e->items[e->n_items];
    it->slot = j->slots[k];
    it->n = n;
    it->dead = 0;
    q->batch_idx = e->n_items++;
    e->budget -= n;
    return 0;
}

static int engine_build_batch(struct engine *e, char *err, size_t err_len)
{
    e->n_items = 0;
    e->budget = e->max_batch_tokens;
    e->mem_wait = 0;
    /* Pass 1: single-token work (decodes), oldest first. A running job's list position never
     * changes, and preemption only moves younger jobs' state, so walking on is safe. */
    for (struct engine_job *j = e->running.head; j; j = j->next)
        for (int k = 0; k < j->n_slots; k++) {
            int end = engine_seq_end(e, j, k);
            if (end < 0 || end - e->seqs[j->slots[k]].n_computed != 1)
                continue;
            int rc = engine_plan(e, j, k, end, err, err_len);
            if (rc < 0)
                return rc;
            if (rc > 0)
                e->mem_wait = 1;
        }
    /* Pass 2: prefill chunks. Once an older one waits for blocks, younger ones may not take
     * any before it. */
    int blocked = 0;
    for (struct engine_job *j = e->running.head; j && !blocked; j = j->next)
        for (int k = 0; k < j->n_slots && !blocked; k++) {
            int end = engine_seq_end(e, j, k);
            if (end < 0 || e->seqs[j->slots[k]].batch_idx >= 0)
                continue;
            int rc = engine_plan(e, j, k, end, err, err_len);
            if (rc < 0)
                return rc;
            if (rc > 0)
                blocked = e->mem_wait = 1;
        }
    return 0;
}

/* Counts forwarded positions as input (prompt) or generated (decode). */
static void engine_count(struct engine *e, const struct engine_job *j,
                         const struct engine_seq *q, int n)
{
    int input = j->kind == ENGINE_JOB_GENERATE ? j->n_ids : q->n_tokens;
    int a = q->n_computed, b = q->n_computed + n;
    int in = (b < input ? b : input) - a;
    if (in < 0)
        in = 0;
    e->stats.prompt_tokens += (uint64_t)in;
    e->stats.decode_tokens += (uint64_t)(n - in);
}

/* The job slot index that engine slot s holds in j. */
static int engine_job_slot(const struct engine_job *j, int s)
{
    for (int k = 0; k < j->n_slots; k++)
        if (j->slots[k] == s)
            return k;
    return -1;
}

static void engine_fail_batch_jobs(struct engine *e, const char *why)
{
    for (int i = 0; i < e->n_items; i++) {
        struct engine_item *it = &e->items[i];
        if (it->dead)
            continue;
        struct engine_job *j = e->seqs[it->slot].job;
        if (j && j->phase != ENGINE_FINISHED)
            engine_job_finish(e, j, ENGINE_JOB_FAILED, why);
    }
}

int engine_step(struct engine *e, char *err, size_t err_len)
{
    engine_admit(e);
    if (!e->running.n)
        return 0;
    int rc = engine_build_batch(e, err, err_len);
    if (rc < 0) {
        /* copy_block failed: drop the batch; blocks already reserved stay in their tables */
        for (int i = 0; i < e->n_items; i++)
            if (!e->items[i].dead)
                e->seqs[e->items[i].slot].batch_idx = -1;
        e->n_items = 0;
        return rc;
    }

    int n_fwd = 0;
    for (int i = 0; i < e->n_items; i++) {
        struct engine_item *it = &e->items[i];
        if (it->dead)
            continue;
        struct engine_seq *q = &e->seqs[it->slot];
        struct engine_job *j = q->job;
        struct fwd_seq *f = &e->fwd[n_fwd];
        f->tokens = q->tokens + q->n_computed;
        f->n_tokens = it->n;
        f->pos = q->n_computed;
        f->block_table = q->table;
        f->n_blocks = q->n_table;
        f->output = FWD_NONE;
        f->out = NULL;
        f->sample = NULL;
        f->token = NULL;
        int stop = q->n_computed + it->n;
        int at_end = j->phase == ENGINE_PREFIX ? stop == j->prefix_target : stop == q->n_tokens;
        if (at_end) {
            if (j->kind == ENGINE_JOB_SCORE && j->phase == ENGINE_SEQS) {
                f->output = FWD_LOGIT0;
                f->out = &e->logit0[i];
            } else if (j->kind == ENGINE_JOB_LOGITS) {
                f->output = FWD_LAST;
                f->out = j->res->logits;
            } else if (j->kind == ENGINE_JOB_GENERATE &&
                       (j->phase == ENGINE_SEQS || !j->forked)) {
                if (engine_backend_draws(e, j)) {
                    struct sampler_key key = engine_draw_key(j, q);
                    e->draws[i] = (struct fwd_sample){.temperature = j->sp.temperature,
                                                      .top_p = j->sp.top_p,
                                                      .top_k = j->sp.top_k,
                                                      .seed = key.seed,
                                                      .stream = key.stream,
                                                      .step = key.step};
                    e->drawn[i] = -1;
                    f->output = FWD_SAMPLE;
                    f->sample = &e->draws[i];
                    f->token = &e->drawn[i];
                } else {
                    f->output = FWD_LAST;
                    f->out = e->logits + (size_t)i * (size_t)e->cfg->vocab_size;
                }
            }
        }
        n_fwd++;
    }
    if (n_fwd == 0) {
        snprintf(err, err_len, "engine stalled: %d running jobs but no sequence could be "
                 "scheduled (internal error)", e->running.n);
        return -1;
    }
    rc = e->be->ops->forward(e->be, e->fwd, n_fwd, err, err_len);
    if (rc != 0) {
        engine_fail_batch_jobs(e, err);
        for (int i = 0; i < e->n_items; i++)
            e->items[i].dead = 1;
        return rc < 0 ? rc : -1;
    }
    e->stats.steps++;

    /* Retire in batch (priority) order. Finishing a job may release slots that later items
     * name; those items are marked dead by the release. */
    for (int i = 0; i < e->n_items; i++) {
        struct engine_item *it = &e->items[i];
        if (it->dead)
            continue;
        struct engine_seq *q = &e->seqs[it->slot];
        struct engine_job *j = q->job;
        q->batch_idx = -1;
        engine_count(e, j, q, it->n);
        engine_cache_publish(e, q, q->n_computed, q->n_computed + it->n);
        q->n_computed += it->n;
        int k = engine_job_slot(j, it->slot);
        const float *row = e->logits + (size_t)i * (size_t)e->cfg->vocab_size;
        /* The batch item's output kind was chosen when the batch was built (nothing between
         * there and here changes what engine_backend_draws says for this job). */
        const int32_t *drawn = j->kind == ENGINE_JOB_GENERATE && engine_backend_draws(e, j)
                                   ? &e->drawn[i] : NULL;
        char why[256] = "";
        int bad = 0;
        if (j->phase == ENGINE_PREFIX) {
            if (q->n_computed == j->prefix_target)
                bad = engine_prefix_done(e, j, k, row, drawn, why, sizeof why);
        } else if (q->n_computed == q->n_tokens) {
            if (j->kind == ENGINE_JOB_GENERATE) {
                bad = engine_draw(e, j, k, row, drawn, why, sizeof why);
            } else {
                if (j->kind == ENGINE_JOB_SCORE)
                    j->res->scores[q->item] = e->logit0[i];
                engine_item_done(e, j, k);
            }
        }
        if (bad && j->phase != ENGINE_FINISHED)
            engine_job_finish(e, j, ENGINE_JOB_FAILED, why);
    }
    e->n_items = 0;
    return 1;
}

/* ---------------------------------------------------------------------------------------- */
/* results, cancel                                                                           */

int engine_cancel(struct engine *e, uint64_t job_id)
{
    struct engine_list *in = NULL;
    struct engine_job *j = engine_find(e, job_id, &in);
    if (!j)
        return -1;
    if (in == &e->done)
        return 1;
    engine_job_finish(e, j, ENGINE_JOB_CANCELLED, NULL);
    return 0;
}

static struct engine_result *engine_hand_out(struct engine *e, struct engine_job *j)
{
    engine_list_remove(&e->done, j);
    struct engine_result *r = j->res;
    j->res = NULL;
    engine_job_free(&j);
    return r;
}

int engine_take_result(struct engine *e, uint64_t job_id, struct engine_result **out)
{
    *out = NULL;
    struct engine_list *in = NULL;
    struct engine_job *j = engine_find(e, job_id, &in);
    if (!j)
        return -1;
    if (in != &e->done)
        return 0;
    *out = engine_hand_out(e, j);
    return 1;
}

int engine_next_result(struct engine *e, struct engine_result **out)
{
    *out = NULL;
    if (!e->done.head)
        return 0;
    *out = engine_hand_out(e, e->done.head);
    return 1;
}

/* ---------------------------------------------------------------------------------------- */
/* synchronous helpers                                                                       */

/* Steps until job `id` finishes; returns its result, or NULL with err filled. */
static struct engine_result *engine_run_until(struct engine *e, uint64_t id, char *err,
                                              size_t err_len)
{
    struct engine_result *r = NULL;
    for (;;) {
        int rc = engine_take_result(e, id, &r);
        if (rc == 1)
            break;
        if (rc < 0) {
            snprintf(err, err_len, "engine: job vanished (internal error)");
            return NULL;
        }
        char why[256] = "";
        int step = engine_step(e, why, sizeof why);
        if (step == 0) {
            snprintf(err, err_len, "engine: idle with the job unfinished (internal error)");
            return NULL;
        }
        if (step < 0 && engine_take_result(e, id, &r) != 1) {
            /* Our job was not in the failed batch: the failure is still the engine's. */
            snprintf(err, err_len, "%s", why);
            engine_cancel(e, id);
            engine_take_result(e, id, &r);
            engine_result_free(&r);
            return NULL;
        }
        if (r)
            break;
    }
    if (r->status != ENGINE_JOB_OK) {
        snprintf(err, err_len, "%s", r->status == ENGINE_JOB_FAILED ? r->error : "cancelled");
        engine_result_free(&r);
        return NULL;
    }
    return r;
}

int engine_generate(struct engine *e, const int32_t *prompt, int n_prompt, int n,
                    const struct engine_sampling *sampling, struct engine_result **out,
                    char *err, size_t err_len)
{
    *out = NULL;
    uint64_t id = ENGINE_RESERVED_IDS | e->next_sync_id++;
    if (engine_add_generate_id(e, id, 1, prompt, n_prompt, n, sampling, err, err_len) != 0)
        return -1;
    *out = engine_run_until(e, id, err, err_len);
    return *out ? 0 : -1;
}

int engine_score(struct engine *e, const int32_t *const *convs, const int *conv_lens,
                 int n_convs, float *scores_out, char *err, size_t err_len)
{
    uint64_t id = ENGINE_RESERVED_IDS | e->next_sync_id++;
    if (engine_add_inputs_id(e, id, 1, ENGINE_JOB_SCORE, convs, conv_lens, n_convs, err,
                             err_len) != 0)
        return -1;
    struct engine_result *r = engine_run_until(e, id, err, err_len);
    if (!r)
        return -1;
    memcpy(scores_out, r->scores, (size_t)n_convs * sizeof *scores_out);
    engine_result_free(&r);
    return 0;
}

int engine_logits(struct engine *e, const int32_t *prompt, int n_prompt, float *logits_out,
                  char *err, size_t err_len)
{
    uint64_t id = ENGINE_RESERVED_IDS | e->next_sync_id++;
    const int32_t *convs[1] = {prompt};
    int lens[1] = {n_prompt};
    if (engine_add_inputs_id(e, id, 1, ENGINE_JOB_LOGITS, convs, lens, 1, err, err_len) != 0)
        return -1;
    struct engine_result *r = engine_run_until(e, id, err, err_len);
    if (!r)
        return -1;
    memcpy(logits_out, r->logits, (size_t)r->n_logits * sizeof *logits_out);
    engine_result_free(&r);
    return 0;
}
