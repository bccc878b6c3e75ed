/* test_engine.c — the engine's scheduler, KV block sharing and job API.
 *
 * Two backends drive it:
 * - a fake one defined here, whose "KV" at each position is a hash chained over every token
 *   before it and whose logits are hashes of that: any mistake in block tables, sharing or
 *   copy-on-write changes the outputs, and it checks the backend contract on every call
 *   (batch limits, no write into a block another sequence of the call can see). Exact and
 *   fast, it carries the scheduling tests: preemption storms, cancel, continuous batching.
 * - the real CPU backend on the tiny Hugging Face checkpoints, compared with transformers'
 *   greedy continuations and reward scores from ../shared/hf-reference, and for the
 *   batch-invariance and prefix-sharing properties.
 */
#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "checkpoint.h"
#include "engine.h"
#include "kvblocks.h"
#include "hfref.h"
#include "testutil.h"

#define BT BACKEND_BLOCK_TOKENS

/* ======================================================================================== */
/* the fake backend                                                                          */

struct fake {
    struct backend base;
    struct model_config cfg;
    uint64_t *kv; /* (n_kv_blocks * BT) one hash per position */
    int max_batch_tokens, max_batch_seqs;
    int fail_at;          /* forward call number that fails; -1 = never */
    int n_forward;
    int max_seqs_seen;    /* most sequences one call carried */
    char violation[256];  /* the first broken contract rule */
};

static uint64_t fk_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static float fk_logit(uint64_t h, int v)
{
    return (float)(fk_mix(h ^ ((uint64_t)(v + 1) * 0xD1B54A32D192ED03ull)) >> 40) *
           (8.0f / 16777216.0f);
}

static int fk_violate(struct fake *f, char *err, size_t err_len, const char *msg)
{
    if (!f->violation[0])
        snprintf(f->violation, sizeof f->violation, "%s", msg);
    snprintf(err, err_len, "fake backend: %s", msg);
    return -1;
}

static int fk_forward(struct backend *be, const struct fwd_seq *seqs, int n_seqs, char *err,
                      size_t err_len)
{
    struct fake *f = (struct fake *)be;
    char msg[200];
    if (f->n_forward++ == f->fail_at) {
        snprintf(err, err_len, "fake backend: injected failure");
        return -1;
    }
    if (n_seqs < 1 || n_seqs > f->max_batch_seqs) {
        snprintf(msg, sizeof msg, "%d sequences in one call (limit %d)", n_seqs,
                 f->max_batch_seqs);
        return fk_violate(f, err, err_len, msg);
    }
    if (n_seqs > f->max_seqs_seen)
        f->max_seqs_seen = n_seqs;
    /* Every table's length first: the overlap check below reads other sequences' tables. */
    for (int s = 0; s < n_seqs; s++) {
        const struct fwd_seq *q = &seqs[s];
        if (q->n_tokens < 1 || q->pos < 0 ||
            q->n_blocks < (q->pos + q->n_tokens + BT - 1) / BT) {
            snprintf(msg, sizeof msg, "sequence %d: n_blocks %d does not cover positions "
                     "0..%d", s, q->n_blocks, q->pos + q->n_tokens - 1);
            return fk_violate(f, err, err_len, msg);
        }
    }
    int total = 0;
    for (int s = 0; s < n_seqs; s++) {
        const struct fwd_seq *q = &seqs[s];
        if (q->n_tokens < 1 || q->pos < 0 || q->pos + q->n_tokens > f->cfg.max_seq_len)
            return fk_violate(f, err, err_len, "bad n_tokens or pos");
        total += q->n_tokens;
        for (int i = 0; i < q->n_tokens; i++)
            if (q->tokens[i] < 0 || q->tokens[i] >= f->cfg.vocab_size)
                return fk_violate(f, err, err_len, "token outside the vocabulary");
        int nb = (q->pos + q->n_tokens + BT - 1) / BT;
        for (int i = 0; i < nb; i++)
            if (q->block_table[i] < 0 || q->block_table[i] >= f->base.n_kv_blocks)
                return fk_violate(f, err, err_len, "block id out of range");
        /* No block this sequence writes may be visible to another sequence of the call. */
        for (int b = q->pos / BT; b < nb; b++)
            for (int o = 0; o < n_seqs; o++) {
                if (o == s)
                    continue;
                int onb = (seqs[o].pos + seqs[o].n_tokens + BT - 1) / BT;
                for (int i = 0; i < onb; i++)
                    if (seqs[o].block_table[i] == q->block_table[b]) {
                        snprintf(msg, sizeof msg, "block %d written by sequence %d is in "
                                 "sequence %d's table", q->block_table[b], s, o);
                        return fk_violate(f, err, err_len, msg);
                    }
            }
    }
    if (total > f->max_batch_tokens) {
        snprintf(msg, sizeof msg, "%d tokens in one call (limit %d)", total,
                 f->max_batch_tokens);
        return fk_violate(f, err, err_len, msg);
    }
    for (int s = 0; s < n_seqs; s++) {
        const struct fwd_seq *q = &seqs[s];
        uint64_t h = 0;
        for (int i = 0; i < q->n_tokens; i++) {
            int p = q->pos + i;
            uint64_t prev = 0x1234;
            if (p > 0)
                prev = f->kv[(size_t)q->block_table[(p - 1) / BT] * BT + (size_t)((p - 1) % BT)];
            h = fk_mix(prev ^ fk_mix((uint64_t)q->tokens[i] * 0x9E3779B97F4A7C15ull + (uint64_t)p));
            f->kv[(size_t)q->block_table[p / BT] * BT + (size_t)(p % BT)] = h;
        }
        if (q->output == FWD_LAST) {
            for (int v = 0; v < f->cfg.vocab_size; v++)
                q->out[v] = fk_logit(h, v);
        } else if (q->output == FWD_LOGIT0) {
            q->out[0] = fk_logit(h, 0);
        } else if (q->output != FWD_NONE) {
            return fk_violate(f, err, err_len, "unexpected output kind");
        }
    }
    return 0;
}

static int fk_copy_block(struct backend *be, int src, int dst, char *err, size_t err_len)
{
    struct fake *f = (struct fake *)be;
    if (src < 0 || dst < 0 || src >= be->n_kv_blocks || dst >= be->n_kv_blocks || src == dst)
        return fk_violate(f, err, err_len, "bad copy_block ids");
    memcpy(f->kv + (size_t)dst * BT, f->kv + (size_t)src * BT, BT * sizeof *f->kv);
    return 0;
}

static void fk_destroy(struct backend *be)
{
    struct fake *f = (struct fake *)be;
    free(f->kv);
    free(f);
}

static const struct backend_ops fk_ops = {
    .name = "fake",
    .forward = fk_forward,
    .copy_block = fk_copy_block,
    .destroy = fk_destroy,
};

#define FK_VOCAB 512
#define FK_EOS 511

/* An engine on a fake backend of n_blocks KV blocks; *fk (optional) keeps a view of the
 * backend, valid until the engine is destroyed. eos < 0 = the default FK_EOS. */
static struct engine *fk_engine_opt(int n_blocks, int max_seqs, int max_batch_tokens, int eos,
                                    int cache_off, struct fake **fk)
{
    struct fake *f = calloc(1, sizeof *f);
    cr_assert_not_null(f);
    f->cfg.vocab_size = FK_VOCAB;
    f->cfg.max_seq_len = 2048;
    f->cfg.n_eos = 1;
    f->cfg.eos_ids[0] = eos < 0 ? FK_EOS : eos;
    f->kv = calloc((size_t)n_blocks * BT, sizeof *f->kv);
    cr_assert_not_null(f->kv);
    f->base.ops = &fk_ops;
    f->base.cfg = &f->cfg;
    f->base.n_kv_blocks = n_blocks;
    f->max_batch_tokens = max_batch_tokens;
    f->max_batch_seqs = max_seqs;
    f->fail_at = -1;
    if (fk)
        *fk = f;
    struct backend *be = &f->base;
    struct engine_params p = {.max_seqs = max_seqs, .max_batch_tokens = max_batch_tokens,
                              .prefix_cache_off = cache_off};
    struct engine *e = NULL;
    char err[256] = "";
    cr_assert_eq(engine_new_with_backend(&be, &p, &e, err, sizeof err), 0, "%s", err);
    cr_assert_null(be, "the engine did not take the backend over");
    return e;
}

static struct engine *fk_engine(int n_blocks, int max_seqs, int max_batch_tokens, int eos,
                                struct fake **fk)
{
    return fk_engine_opt(n_blocks, max_seqs, max_batch_tokens, eos, 0, fk);
}

/* ======================================================================================== */
/* job specs, running and comparing                                                          */

enum { TE_MAX_CONVS = 8, TE_MAX_LEN = 400 };

struct te_job {
    uint64_t id;
    enum engine_job_kind kind;
    int n;                          /* generate: samples */
    struct engine_sampling sp;
    int n_convs;                    /* score: conversations; generate/logits: 1 */
    int lens[TE_MAX_CONVS];
    int32_t ids[TE_MAX_CONVS][TE_MAX_LEN];
};

static void te_tokens(int32_t *out, int n, uint64_t seed, int vocab)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (int i = 0; i < n; i++) {
        x = fk_mix(x + 0x632BE59BD9B4E019ull);
        out[i] = (int32_t)(x % (uint64_t)(vocab - 1)); /* never the fake EOS */
    }
}

static void te_add(struct engine *e, const struct te_job *j)
{
    char err[256] = "";
    int rc = -1;
    if (j->kind == ENGINE_JOB_GENERATE) {
        rc = engine_add_generate(e, j->id, j->ids[0], j->lens[0], j->n, &j->sp, err, sizeof err);
    } else if (j->kind == ENGINE_JOB_SCORE) {
        const int32_t *convs[TE_MAX_CONVS];
        for (int i = 0; i < j->n_convs; i++)
            convs[i] = j->ids[i];
        rc = engine_add_score(e, j->id, convs, j->lens, j->n_convs, err, sizeof err);
    } else {
        rc = engine_add_logits(e, j->id, j->ids[0], j->lens[0], err, sizeof err);
    }
    cr_assert_eq(rc, 0, "job %llu: %s", (unsigned long long)j->id, err);
}

static int te_step(struct engine *e)
{
    char err[256] = "";
    int rc = engine_step(e, err, sizeof err);
    cr_assert_geq(rc, 0, "engine_step: %s", err);
    return rc;
}

static void te_drain(struct engine *e)
{
    for (int i = 0; engine_pending(e) > 0; i++) {
        cr_assert_lt(i, 200000, "the engine did not finish its jobs");
        te_step(e);
    }
}

static struct engine_result *te_take(struct engine *e, uint64_t id)
{
    struct engine_result *r = NULL;
    cr_assert_eq(engine_take_result(e, id, &r), 1, "job %llu has no result",
                 (unsigned long long)id);
    return r;
}

static void te_same_result(const struct engine_result *a, const struct engine_result *b,
                           const char *what)
{
    cr_assert_eq(a->status, b->status, "%s: status", what);
    cr_assert_eq(a->n_outputs, b->n_outputs, "%s: outputs", what);
    for (int i = 0; i < a->n_outputs; i++) {
        cr_assert_eq(a->outputs[i].finish, b->outputs[i].finish, "%s: sample %d finish", what, i);
        cr_assert_eq(a->outputs[i].n_ids, b->outputs[i].n_ids, "%s: sample %d length %d vs %d",
                     what, i, a->outputs[i].n_ids, b->outputs[i].n_ids);
        for (int t = 0; t < a->outputs[i].n_ids; t++)
            cr_assert_eq(a->outputs[i].ids[t], b->outputs[i].ids[t],
                         "%s: sample %d differs at token %d", what, i, t);
    }
    cr_assert_eq(a->n_scores, b->n_scores, "%s: scores", what);
    if (a->n_scores)
        cr_assert_eq(memcmp(a->scores, b->scores, (size_t)a->n_scores * sizeof(float)), 0,
                     "%s: scores differ", what);
    cr_assert_eq(a->n_logits, b->n_logits, "%s: logits", what);
    if (a->n_logits)
        cr_assert_eq(memcmp(a->logits, b->logits, (size_t)a->n_logits * sizeof(float)), 0,
                     "%s: logits differ", what);
    cr_assert_eq(a->completion_tokens, b->completion_tokens, "%s: completion tokens", what);
    cr_assert_eq(a->prompt_tokens, b->prompt_tokens, "%s: prompt tokens", what);
}

/* A mixed workload: generate jobs (greedy and sampled, n up to 5, some sharing prompt
 * prefixes), score jobs whose conversations share prefixes, and a logits job. */
static struct te_job *te_workload(int *n_out)
{
    enum { N = 14 };
    struct te_job *js = calloc(N, sizeof *js);
    cr_assert_not_null(js);
    int32_t common[TE_MAX_LEN];
    te_tokens(common, TE_MAX_LEN, 99, FK_VOCAB);
    for (int i = 0; i < N; i++) {
        struct te_job *j = &js[i];
        j->id = 100 + (uint64_t)i;
        j->n_convs = 1;
        if (i % 5 == 3) {
            j->kind = ENGINE_JOB_SCORE;
            j->n_convs = 3 + i % 4;
            int shared = 20 + 7 * i;
            for (int c = 0; c < j->n_convs; c++) {
                j->lens[c] = shared + 1 + (c * 5) % 17;
                memcpy(j->ids[c], common, (size_t)shared * sizeof(int32_t));
                te_tokens(j->ids[c] + shared, j->lens[c] - shared, 1000 + (uint64_t)(i * 10 + c),
                          FK_VOCAB);
            }
        } else if (i == 7) {
            j->kind = ENGINE_JOB_LOGITS;
            j->lens[0] = 45;
            te_tokens(j->ids[0], 45, 7, FK_VOCAB);
        } else {
            j->kind = ENGINE_JOB_GENERATE;
            j->n = 1 + (i * 3) % 5;
            j->lens[0] = 9 + (i * 23) % 90;
            /* even jobs continue a shared document, odd ones their own text */
            if (i % 2 == 0)
                memcpy(j->ids[0], common, (size_t)j->lens[0] * sizeof(int32_t));
            else
                te_tokens(j->ids[0], j->lens[0], 500 + (uint64_t)i, FK_VOCAB);
            j->sp.temperature = i % 3 == 0 ? 0.0f : 0.9f;
            j->sp.top_p = i % 4 == 1 ? 0.8f : 1.0f;
            j->sp.top_k = i % 4 == 2 ? 20 : 0;
            j->sp.seed = 42 + (uint64_t)i;
            j->sp.max_tokens = 6 + (i * 13) % 50;
            j->sp.ignore_eos = i % 2;
        }
    }
    *n_out = N;
    return js;
}

/* Each job alone on a roomy engine. */
static struct engine_result **te_reference(const struct te_job *js, int n)
{
    struct engine_result **ref = calloc((size_t)n, sizeof *ref);
    cr_assert_not_null(ref);
    for (int i = 0; i < n; i++) {
        struct engine *e = fk_engine(512, 8, 512, -1, NULL);
        te_add(e, &js[i]);
        te_drain(e);
        ref[i] = te_take(e, js[i].id);
        cr_assert_eq(ref[i]->status, ENGINE_JOB_OK);
        engine_destroy(&e);
    }
    return ref;
}

static void te_free_results(struct engine_result **rs, int n)
{
    for (int i = 0; i < n; i++)
        engine_result_free(&rs[i]);
    free(rs);
}

/* ======================================================================================== */
/* the block allocator and its prefix cache, against a plain model                          */

static void kv_content(int32_t *toks, int c)
{
    for (int i = 0; i < BT; i++)
        toks[i] = c * BT + i;
}

Test(kvblocks, cache_lookups_and_evictions_follow_a_plain_model)
{
    enum { NB = 64, STEPS = 30000, MAXC = STEPS };
    struct kvblocks *kb = NULL;
    char err[128];
    cr_assert_eq(kvblocks_new(NB, &kb, err, sizeof err), 0, "%s", err);
    int refs[NB] = {0}, content[NB], released_at[NB] = {0};
    int *owner = malloc(MAXC * sizeof *owner);
    for (int b = 0; b < NB; b++)
        content[b] = -1;
    for (int c = 0; c < MAXC; c++)
        owner[c] = -1;
    int next_c = 0, evictions = 0, hits = 0;
    uint64_t x = 12345;
    for (int step = 1; step <= STEPS; step++) {
        x = fk_mix(x + 0x9E3779B97F4A7C15ull);
        int op = (int)(x % 4);
        int32_t toks[BT];
        if (op == 0) {
            int clean_free = 0, oldest = -1;
            for (int b = 0; b < NB; b++) {
                clean_free += refs[b] == 0 && content[b] < 0;
                if (refs[b] == 0 && content[b] >= 0 &&
                    (oldest < 0 || released_at[b] < released_at[oldest]))
                    oldest = b;
            }
            int id = kvblocks_alloc(kb);
            if (id < 0) {
                cr_assert(clean_free == 0 && oldest < 0, "step %d: alloc failed with blocks free",
                          step);
                continue;
            }
            cr_assert_eq(refs[id], 0, "step %d: handed out held block %d", step, id);
            if (clean_free)
                cr_assert_lt(content[id], 0, "step %d: evicted while clean blocks were free",
                             step);
            else
                cr_assert_eq(id, oldest, "step %d: evicted %d, not the least recent %d", step,
                             id, oldest);
            if (content[id] >= 0) {
                owner[content[id]] = -1;
                content[id] = -1;
                evictions++;
            }
            refs[id] = 1;
        } else if (op == 1) { /* publish a held, unpublished block under fresh content */
            int b = (int)((x >> 8) % NB);
            if (refs[b] == 0 || content[b] >= 0 || next_c >= MAXC)
                continue;
            kv_content(toks, next_c);
            kvblocks_publish(kb, b, kvblocks_key(0, toks), 0, toks);
            content[b] = next_c;
            owner[next_c++] = b;
        } else if (op == 2) { /* release a held block */
            int b = (int)((x >> 8) % NB);
            if (refs[b] == 0)
                continue;
            int freed = kvblocks_unref(kb, b);
            cr_assert_eq(freed, refs[b] == 1);
            if (--refs[b] == 0)
                released_at[b] = step;
        } else if (next_c > 0) { /* look up some content published earlier */
            int c = (int)((x >> 8) % (uint64_t)next_c);
            kv_content(toks, c);
            int id = kvblocks_lookup(kb, kvblocks_key(0, toks), 0, toks);
            cr_assert_eq(id, owner[c], "step %d: content %d found in %d, expected %d", step, c,
                         id, owner[c]);
            if (id >= 0) {
                refs[id]++;
                hits++;
            }
        }
        int n_free = 0;
        for (int b = 0; b < NB; b++)
            n_free += refs[b] == 0;
        cr_assert_eq(kvblocks_n_free(kb), n_free, "step %d", step);
    }
    cr_assert_gt(evictions, 100, "the test never evicted");
    cr_assert_gt(hits, 100, "the test never hit");
    /* a different previous key or different tokens never match */
    int id = kvblocks_alloc(kb);
    if (id >= 0) {
        int32_t toks[BT];
        kv_content(toks, MAXC + 1);
        kvblocks_publish(kb, id, kvblocks_key(7, toks), 7, toks);
        cr_assert_eq(kvblocks_lookup(kb, kvblocks_key(8, toks), 8, toks), -1);
        toks[3]++;
        cr_assert_eq(kvblocks_lookup(kb, kvblocks_key(7, toks), 7, toks), -1);
    }
    free(owner);
    kvblocks_destroy(&kb);
    cr_assert_null(kb);
}

/* ======================================================================================== */
/* scheduling tests on the fake backend                                                      */

Test(engine_sched, batch_and_memory_pressure_never_change_results)
{
    int n;
    struct te_job *js = te_workload(&n);
    struct engine_result **ref = te_reference(js, n);

    /* 24 blocks (384 positions) for 14 jobs of up to 5 samples: constant preemption. Jobs
     * arrive over time, three at once, so they join a running batch. */
    struct fake *f;
    struct engine *e = fk_engine(24, 8, 48, -1, &f);
    int next = 0;
    for (int step = 0; next < n || engine_pending(e) > 0; step++) {
        cr_assert_lt(step, 100000);
        if (step % 4 == 0)
            for (int k = 0; k < 3 && next < n; k++)
                te_add(e, &js[next++]);
        te_step(e);
    }
    cr_assert_eq(f->violation[0], '\0', "%s", f->violation);
    for (int i = 0; i < n; i++) {
        struct engine_result *r = te_take(e, js[i].id);
        char what[64];
        snprintf(what, sizeof what, "job %d", i);
        te_same_result(r, ref[i], what);
        engine_result_free(&r);
    }
    struct engine_stats st;
    engine_get_stats(e, &st);
    cr_assert_gt(st.preemptions, 0, "the pool was never short: the test lost its point");
    cr_assert_gt(st.copied_blocks, 0);
    cr_assert_gt(f->max_seqs_seen, 1, "no step ever batched two sequences");
    cr_assert_eq(engine_kv_blocks_free(e), engine_kv_blocks_total(e), "blocks leaked");
    engine_destroy(&e);
    cr_assert_null(e);
    te_free_results(ref, n);
    free(js);
}

Test(engine_sched, n_samples_share_one_prefill_and_copy_the_partial_block)
{
    struct te_job j = {.id = 1, .kind = ENGINE_JOB_GENERATE, .n_convs = 1, .lens = {37}};
    te_tokens(j.ids[0], 37, 5, FK_VOCAB);
    j.sp = (struct engine_sampling){.temperature = 1.0f, .top_p = 1.0f, .seed = 3,
                                    .max_tokens = 8, .ignore_eos = 1};
    struct engine_stats st[2];
    struct engine_result *r[2];
    const int ns[2] = {1, 16};
    for (int v = 0; v < 2; v++) {
        struct engine *e = fk_engine(256, 16, 256, -1, NULL);
        j.n = ns[v];
        te_add(e, &j);
        te_drain(e);
        r[v] = te_take(e, 1);
        engine_get_stats(e, &st[v]);
        cr_assert_eq(engine_kv_blocks_free(e), engine_kv_blocks_total(e));
        engine_destroy(&e);
    }
    cr_assert_eq(st[0].prompt_tokens, 37);
    cr_assert_eq(st[1].prompt_tokens, 37, "16 samples prefilled %llu prompt tokens, not 37",
                 (unsigned long long)st[1].prompt_tokens);
    cr_assert_eq(st[1].decode_tokens, 16 * 7);
    /* 37 = 2 full blocks + 5 positions: 15 samples copy the shared partial block; the last
     * one to write finds itself its only holder and writes in place. */
    cr_assert_eq(st[0].copied_blocks, 0);
    cr_assert_eq(st[1].copied_blocks, 15);
    cr_assert_eq(r[1]->n_outputs, 16);
    cr_assert_eq(r[1]->completion_tokens, 16 * 8);
    /* sample 0 draws from stream 0 in both runs; the others differ from it */
    cr_assert_eq(memcmp(r[0]->outputs[0].ids, r[1]->outputs[0].ids, 8 * sizeof(int32_t)), 0);
    int differ = 0;
    for (int i = 1; i < 16; i++)
        differ += memcmp(r[1]->outputs[0].ids, r[1]->outputs[i].ids, 8 * sizeof(int32_t)) != 0;
    cr_assert_gt(differ, 10, "the samples did not draw independently");
    engine_result_free(&r[0]);
    engine_result_free(&r[1]);
}

Test(engine_sched, score_conversations_share_their_common_prefix)
{
    struct te_job j = {.id = 9, .kind = ENGINE_JOB_SCORE, .n_convs = 5};
    int32_t common[60];
    te_tokens(common, 60, 11, FK_VOCAB);
    int total = 0;
    for (int c = 0; c < 5; c++) {
        j.lens[c] = 60 + 3 + c;
        memcpy(j.ids[c], common, sizeof common);
        te_tokens(j.ids[c] + 60, 3 + c, 20 + (uint64_t)c, FK_VOCAB);
        total += j.lens[c];
    }
    /* max_seqs 2: the five conversations take turns in two slots */
    struct engine *e = fk_engine(64, 2, 64, -1, NULL);
    te_add(e, &j);
    te_drain(e);
    struct engine_result *r = te_take(e, 9);
    struct engine_stats st;
    engine_get_stats(e, &st);
    /* the 60 shared tokens round down to 48 (3 blocks), forwarded once */
    cr_assert_eq(st.prompt_tokens, (uint64_t)(48 + total - 5 * 48), "forwarded %llu",
                 (unsigned long long)st.prompt_tokens);
    cr_assert_eq(r->prompt_tokens, total);
    engine_destroy(&e);

    /* each score equals the one computed alone */
    for (int c = 0; c < 5; c++) {
        struct te_job one = {.id = 1, .kind = ENGINE_JOB_SCORE, .n_convs = 1,
                             .lens = {j.lens[c]}};
        memcpy(one.ids[0], j.ids[c], (size_t)j.lens[c] * sizeof(int32_t));
        e = fk_engine(64, 2, 64, -1, NULL);
        te_add(e, &one);
        te_drain(e);
        struct engine_result *r1 = te_take(e, 1);
        cr_assert_eq(r1->scores[0], r->scores[c], "conversation %d", c);
        engine_result_free(&r1);
        engine_destroy(&e);
    }
    engine_result_free(&r);
}

/* Runs `j` to completion and returns its result and the stats it added. */
static struct engine_result *te_run(struct engine *e, const struct te_job *j,
                                    struct engine_stats *delta)
{
    struct engine_stats a, b;
    engine_get_stats(e, &a);
    te_add(e, j);
    te_drain(e);
    engine_get_stats(e, &b);
    delta->prompt_tokens = b.prompt_tokens - a.prompt_tokens;
    delta->cached_tokens = b.cached_tokens - a.cached_tokens;
    return te_take(e, j->id);
}

Test(engine_sched, later_jobs_reuse_cached_prefix_blocks_with_identical_results)
{
    /* Two score jobs and two generate jobs over one 80-token prompt c0..c4 (5 blocks). Then
     * score job 4 = [d, c1, c2, c3, c4, ...]: its blocks after d hold cached tokens but follow
     * another prefix, so none may be reused. Then job 5 = [d, c2, c3, c4, ...]: d is cached
     * (from job 4) and so are blocks of c2's tokens, but never after d at position 1. */
    int32_t common[80], d[BT];
    te_tokens(common, 80, 123, FK_VOCAB);
    te_tokens(d, BT, 999, FK_VOCAB);
    struct te_job js[6];
    for (int i = 0; i < 6; i++) {
        js[i] = (struct te_job){.id = (uint64_t)i + 1, .n_convs = 1, .lens = {100}};
        memcpy(js[i].ids[0], common, sizeof common);
        te_tokens(js[i].ids[0] + 80, 20, 200 + (uint64_t)(i % 2), FK_VOCAB);
        if (i < 2 || i >= 4) {
            js[i].kind = ENGINE_JOB_SCORE;
            if (i == 4)
                memcpy(js[i].ids[0], d, sizeof d);
            if (i == 5) {
                memcpy(js[i].ids[0], d, sizeof d);
                memcpy(js[i].ids[0] + BT, common + 2 * BT, (80 - 2 * BT) * sizeof(int32_t));
            }
        } else {
            js[i].kind = ENGINE_JOB_GENERATE;
            js[i].n = 3;
            js[i].lens[0] = 90;
            js[i].sp = (struct engine_sampling){.temperature = 0.9f, .top_p = 0.9f, .seed = 4,
                                                .max_tokens = 30};
        }
    }
    struct engine *on = fk_engine(64, 4, 64, -1, NULL);
    struct engine *off = fk_engine_opt(64, 4, 64, -1, 1, NULL);
    struct engine_stats d_on[6], d_off[6];
    for (int i = 0; i < 6; i++) {
        struct engine_result *a = te_run(on, &js[i], &d_on[i]);
        struct engine_result *b = te_run(off, &js[i], &d_off[i]);
        te_same_result(a, b, "cache on vs off");
        cr_assert_eq(d_off[i].cached_tokens, 0, "the cache was off");
        cr_assert_eq(d_on[i].prompt_tokens + d_on[i].cached_tokens, d_off[i].prompt_tokens);
        engine_result_free(&a);
        engine_result_free(&b);
    }
    cr_assert_eq(d_on[0].cached_tokens, 0, "the first job found an empty cache");
    /* the second score job shares the 80-token prompt: its 5 blocks come from the cache */
    cr_assert_eq(d_on[1].cached_tokens, 80);
    cr_assert_eq(d_on[1].prompt_tokens, 20);
    /* the generate jobs' 90-token prompts share 5 full blocks with the score jobs */
    cr_assert_eq(d_on[2].cached_tokens, 80);
    cr_assert_eq(d_on[3].cached_tokens, 80);
    cr_assert_eq(d_on[4].cached_tokens, 0, "blocks were reused after a different prefix");
    cr_assert_eq(d_on[5].cached_tokens, BT, "only the first block may be reused");
    cr_assert_eq(engine_kv_blocks_free(on), engine_kv_blocks_total(on),
                 "cached blocks must count as free");
    engine_destroy(&on);
    engine_destroy(&off);
}

Test(engine_sched, a_short_job_joins_and_leaves_while_a_long_one_runs)
{
    struct engine *e = fk_engine(256, 8, 128, -1, NULL);
    struct te_job lng = {.id = 1, .kind = ENGINE_JOB_GENERATE, .n = 2, .n_convs = 1,
                         .lens = {50}};
    te_tokens(lng.ids[0], 50, 1, FK_VOCAB);
    lng.sp = (struct engine_sampling){.temperature = 0.8f, .top_p = 1.0f, .seed = 1,
                                      .max_tokens = 300, .ignore_eos = 1};
    struct te_job sht = {.id = 2, .kind = ENGINE_JOB_GENERATE, .n = 1, .n_convs = 1,
                         .lens = {12}};
    te_tokens(sht.ids[0], 12, 2, FK_VOCAB);
    sht.sp = (struct engine_sampling){.temperature = 0.0f, .top_p = 1.0f, .max_tokens = 5,
                                      .ignore_eos = 1};
    te_add(e, &lng);
    for (int i = 0; i < 10; i++)
        te_step(e);
    te_add(e, &sht);
    struct engine_result *r = NULL;
    int steps = 0;
    while (engine_take_result(e, 2, &r) == 0) {
        te_step(e);
        steps++;
        cr_assert_lt(steps, 50);
        struct engine_result *l = NULL;
        cr_assert_eq(engine_take_result(e, 1, &l), 0, "the long job finished first");
    }
    /* one step to prefill and draw the first id, then one per further id */
    cr_assert_eq(steps, 5, "the short job took %d steps", steps);
    cr_assert_eq(r->outputs[0].n_ids, 5);
    cr_assert_eq(r->outputs[0].finish, ENGINE_FINISH_LENGTH);
    engine_result_free(&r);
    te_drain(e);
    r = te_take(e, 1);
    cr_assert_eq(r->outputs[0].n_ids, 300);
    cr_assert_eq(r->outputs[1].n_ids, 300);
    engine_result_free(&r);
    engine_destroy(&e);
}

Test(engine_sched, cancel_frees_blocks_at_once_and_reports_partial_ids)
{
    struct engine *e = fk_engine(64, 8, 64, -1, NULL);
    struct te_job a = {.id = 1, .kind = ENGINE_JOB_GENERATE, .n = 4, .n_convs = 1,
                       .lens = {40}};
    te_tokens(a.ids[0], 40, 1, FK_VOCAB);
    a.sp = (struct engine_sampling){.temperature = 1.0f, .top_p = 1.0f, .seed = 9,
                                    .max_tokens = 200, .ignore_eos = 1};
    struct te_job b = a;
    b.id = 2;
    b.n = 2;
    struct te_job c = a;
    c.id = 3;
    c.n = 4;
    te_add(e, &a);
    te_add(e, &b);
    te_add(e, &c); /* 10 samples > 8 slots: c waits in the queue */
    for (int i = 0; i < 12; i++)
        te_step(e);
    cr_assert_lt(engine_kv_blocks_free(e), engine_kv_blocks_total(e));

    cr_assert_eq(engine_cancel(e, 3), 0, "cancel a queued job");
    cr_assert_eq(engine_cancel(e, 1), 0, "cancel a running job");
    struct engine_result *r = NULL;
    cr_assert_eq(engine_next_result(e, &r), 1);
    cr_assert_eq(r->job_id, 3);
    cr_assert_eq(r->status, ENGINE_JOB_CANCELLED);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(r->outputs[i].n_ids, 0);
    engine_result_free(&r);
    r = te_take(e, 1);
    cr_assert_eq(r->status, ENGINE_JOB_CANCELLED);
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(r->outputs[i].finish, ENGINE_FINISH_CANCELLED);
        cr_assert(r->outputs[i].n_ids > 0 && r->outputs[i].n_ids < 200, "sample %d: %d ids", i,
                  r->outputs[i].n_ids);
    }
    engine_result_free(&r);

    cr_assert_eq(engine_cancel(e, 2), 0);
    cr_assert_eq(engine_kv_blocks_free(e), engine_kv_blocks_total(e),
                 "cancelling every job left %d blocks in use",
                 engine_kv_blocks_total(e) - engine_kv_blocks_free(e));
    cr_assert_eq(engine_pending(e), 0);
    cr_assert_eq(engine_cancel(e, 2), 1, "a finished job's result is still waiting");
    r = te_take(e, 2);
    engine_result_free(&r);
    cr_assert_eq(engine_cancel(e, 2), -1, "unknown id");
    cr_assert_eq(te_step(e), 0, "nothing left to run");

    /* the engine carries on: a new job after the cancels matches a fresh engine's */
    te_add(e, &b);
    te_drain(e);
    r = te_take(e, 2);
    struct engine *fresh = fk_engine(64, 8, 64, -1, NULL);
    te_add(fresh, &b);
    te_drain(fresh);
    struct engine_result *rf = te_take(fresh, 2);
    te_same_result(r, rf, "after cancel");
    engine_result_free(&r);
    engine_result_free(&rf);
    engine_destroy(&fresh);
    engine_destroy(&e);
}

Test(engine_sched, pool_exhaustion_waits_then_completes)
{
    /* 8 blocks = 128 positions; each job needs up to 100 of them */
    struct te_job js[4];
    for (int i = 0; i < 4; i++) {
        js[i] = (struct te_job){.id = (uint64_t)i + 1, .kind = ENGINE_JOB_GENERATE, .n = 1,
                                .n_convs = 1, .lens = {40}};
        te_tokens(js[i].ids[0], 40, 70 + (uint64_t)i, FK_VOCAB);
        js[i].sp = (struct engine_sampling){.temperature = 0.7f, .top_p = 0.9f, .seed = 5,
                                            .max_tokens = 61, .ignore_eos = 1};
    }
    struct engine_result **ref = NULL;
    ref = calloc(4, sizeof *ref);
    for (int i = 0; i < 4; i++) {
        struct engine *e = fk_engine(8, 4, 64, -1, NULL);
        te_add(e, &js[i]);
        te_drain(e);
        ref[i] = te_take(e, js[i].id);
        engine_destroy(&e);
    }
    struct fake *f;
    struct engine *e = fk_engine(8, 4, 64, -1, &f);
    for (int i = 0; i < 4; i++)
        te_add(e, &js[i]);
    te_drain(e);
    cr_assert_eq(f->violation[0], '\0', "%s", f->violation);
    for (int i = 0; i < 4; i++) {
        struct engine_result *r = te_take(e, js[i].id);
        te_same_result(r, ref[i], "pool exhaustion");
        cr_assert_eq(r->outputs[0].n_ids, 61);
        engine_result_free(&r);
    }
    cr_assert_eq(engine_kv_blocks_free(e), 8);
    engine_destroy(&e);
    te_free_results(ref, 4);
}

struct te_events {
    int n;
    int32_t tok[64];
    int finished_at;
    enum engine_finish finish;
};

static void te_on_token(void *ud, uint64_t job_id, int sample, int32_t token, int finished,
                        enum engine_finish finish)
{
    struct te_events *ev = ud;
    (void)job_id;
    if (sample != 0 || ev->n >= 64)
        return;
    ev->tok[ev->n++] = token;
    if (finished) {
        ev->finished_at = ev->n;
        ev->finish = finish;
    }
}

Test(engine_sched, eos_stops_a_sample_and_tokens_stream)
{
    struct te_job j = {.id = 1, .kind = ENGINE_JOB_GENERATE, .n = 1, .n_convs = 1,
                       .lens = {20}};
    te_tokens(j.ids[0], 20, 3, FK_VOCAB);
    j.sp = (struct engine_sampling){.temperature = 0.0f, .top_p = 1.0f, .max_tokens = 10};

    struct engine *e = fk_engine(64, 4, 64, -1, NULL);
    struct te_events ev = {0};
    engine_set_token_callback(e, te_on_token, &ev);
    te_add(e, &j);
    te_drain(e);
    struct engine_result *r = te_take(e, 1);
    cr_assert_eq(r->outputs[0].finish, ENGINE_FINISH_LENGTH);
    cr_assert_eq(r->outputs[0].n_ids, 10);
    cr_assert_eq(ev.n, 10, "streamed %d ids", ev.n);
    cr_assert_eq(memcmp(ev.tok, r->outputs[0].ids, 10 * sizeof(int32_t)), 0);
    cr_assert_eq(ev.finished_at, 10);
    int32_t third = r->outputs[0].ids[2];
    engine_result_free(&r);
    engine_destroy(&e);

    /* make the third greedy id an EOS: the sample stops there, without it */
    e = fk_engine(64, 4, 64, third, NULL);
    struct te_events ev2 = {0};
    engine_set_token_callback(e, te_on_token, &ev2);
    te_add(e, &j);
    te_drain(e);
    r = te_take(e, 1);
    cr_assert_eq(r->outputs[0].finish, ENGINE_FINISH_STOP);
    cr_assert_eq(r->outputs[0].n_ids, 2);
    cr_assert_eq(r->completion_tokens, 3);
    cr_assert_eq(ev2.n, 3);
    cr_assert_eq(ev2.tok[2], third);
    cr_assert_eq(ev2.finish, ENGINE_FINISH_STOP);
    engine_result_free(&r);

    /* ignore_eos runs past it */
    j.sp.ignore_eos = 1;
    j.id = 2;
    te_add(e, &j);
    te_drain(e);
    r = te_take(e, 2);
    cr_assert_eq(r->outputs[0].n_ids, 10);
    cr_assert_eq(r->outputs[0].ids[2], third);
    engine_result_free(&r);
    engine_destroy(&e);
}

Test(engine_sched, backend_failure_fails_the_batch_jobs_and_the_engine_goes_on)
{
    struct fake *f;
    struct engine *e = fk_engine(64, 4, 64, -1, &f);
    struct te_job j = {.id = 1, .kind = ENGINE_JOB_GENERATE, .n = 2, .n_convs = 1,
                       .lens = {30}};
    te_tokens(j.ids[0], 30, 8, FK_VOCAB);
    j.sp = (struct engine_sampling){.temperature = 0.5f, .top_p = 1.0f, .max_tokens = 20,
                                    .ignore_eos = 1};
    f->fail_at = 3;
    te_add(e, &j);
    char err[256] = "";
    int rc = 0;
    for (int i = 0; i < 10 && rc >= 0; i++)
        rc = engine_step(e, err, sizeof err);
    cr_assert_lt(rc, 0);
    cr_assert(strstr(err, "injected"), "%s", err);
    struct engine_result *r = te_take(e, 1);
    cr_assert_eq(r->status, ENGINE_JOB_FAILED);
    cr_assert(strstr(r->error, "injected"), "%s", r->error);
    engine_result_free(&r);
    cr_assert_eq(engine_kv_blocks_free(e), engine_kv_blocks_total(e));

    j.id = 2;
    te_add(e, &j);
    te_drain(e);
    r = te_take(e, 2);
    cr_assert_eq(r->status, ENGINE_JOB_OK);
    engine_result_free(&r);
    engine_destroy(&e);
}

Test(engine_sched, bad_requests_are_refused_naming_the_field_or_limit)
{
    struct engine *e = fk_engine(8, 4, 64, -1, NULL); /* 128 KV positions, max_seq_len 2048 */
    char err[256];
    static int32_t big[2100];
    struct engine_sampling sp = {.temperature = 0.7f, .top_p = 0.9f, .max_tokens = 10};

#define TE_REFUSED(call, needle)                                                           \
    do {                                                                                   \
        err[0] = '\0';                                                                     \
        cr_assert_lt((call), 0, "accepted: " #call);                                       \
        cr_assert(strstr(err, needle), "error '%s' does not mention '%s'", err, needle);   \
    } while (0)

    TE_REFUSED(engine_add_generate(e, 1, big, 2048, 1, &sp, err, sizeof err),
               "prompt is 2048 tokens; the model's limit is 2048 (max_position_embeddings)");
    TE_REFUSED(engine_add_generate(e, 1, big, 200, 1, &sp, err, sizeof err), "kv_tokens");
    struct engine_sampling lots = sp;
    lots.max_tokens = 100;
    TE_REFUSED(engine_add_generate(e, 1, big, 100, 1, &lots, err, sizeof err), "max_tokens");
    TE_REFUSED(engine_add_generate(e, 1, big, 0, 1, &sp, err, sizeof err), "prompt is empty");
    TE_REFUSED(engine_add_generate(e, 1, big, 10, 0, &sp, err, sizeof err), "n is 0");
    TE_REFUSED(engine_add_generate(e, 1, big, 10, 5, &sp, err, sizeof err), "max_seqs");
    struct engine_sampling bad = sp;
    bad.temperature = -1;
    TE_REFUSED(engine_add_generate(e, 1, big, 10, 1, &bad, err, sizeof err), "temperature");
    bad = sp;
    bad.top_p = 0;
    TE_REFUSED(engine_add_generate(e, 1, big, 10, 1, &bad, err, sizeof err), "top_p");
    bad = sp;
    bad.top_k = -3;
    TE_REFUSED(engine_add_generate(e, 1, big, 10, 1, &bad, err, sizeof err), "top_k");
    bad = sp;
    bad.max_tokens = 0;
    TE_REFUSED(engine_add_generate(e, 1, big, 10, 1, &bad, err, sizeof err), "max_tokens");
    int32_t oov[3] = {1, FK_VOCAB, 2};
    TE_REFUSED(engine_add_generate(e, 1, oov, 3, 1, &sp, err, sizeof err), "index 1");
    TE_REFUSED(engine_add_generate(e, 1ull << 63, big, 10, 1, &sp, err, sizeof err), "reserved");

    cr_assert_eq(engine_add_generate(e, 7, big, 10, 1, &sp, err, sizeof err), 0, "%s", err);
    TE_REFUSED(engine_add_generate(e, 7, big, 10, 1, &sp, err, sizeof err), "already in use");
    const int32_t *convs[2] = {big, big};
    int lens[2] = {5, 0};
    TE_REFUSED(engine_add_score(e, 8, convs, lens, 2, err, sizeof err), "conversation 1");
    TE_REFUSED(engine_add_score(e, 8, convs, lens, 0, err, sizeof err), "empty");
    TE_REFUSED(engine_add_logits(e, 8, big, 129, err, sizeof err), "kv_tokens");
    cr_assert_eq(engine_pending(e), 1, "a refused job was queued");
    engine_destroy(&e);

    /* engine parameters */
    struct fake *f = calloc(1, sizeof *f);
    f->base.ops = &fk_ops;
    f->base.cfg = &f->cfg;
    f->cfg.vocab_size = 8;
    f->cfg.max_seq_len = 64;
    f->base.n_kv_blocks = 4;
    struct backend *be = &f->base;
    struct engine_params p = {.max_seqs = 8, .max_batch_tokens = 8};
    TE_REFUSED(engine_new_with_backend(&be, &p, &e, err, sizeof err), "max_batch_tokens");
    cr_assert_null(be);
    cr_assert_null(e);
#undef TE_REFUSED
}

/* ======================================================================================== */
/* the real CPU backend against Hugging Face                                                 */

struct te_real {
    struct checkpoint *ck;
    struct engine *e;
    json_t *ref;
};

static struct te_real te_open(const char *model, int max_seqs, int kv_tokens,
                              int max_batch_tokens)
{
    struct te_real t = {0};
    char err[512] = "";
    char rel[256];
    snprintf(rel, sizeof rel, "hf-reference/%s", model);
    cr_assert_eq(checkpoint_open(tu_shared(rel), &t.ck, err, sizeof err), 0, "%s", err);
    struct engine_params p = {.backend = "cpu", .max_seqs = max_seqs, .kv_tokens = kv_tokens,
                              .max_batch_tokens = max_batch_tokens, .n_threads = 2};
    cr_assert_eq(engine_new(t.ck, &p, &t.e, err, sizeof err), 0, "%s", err);
    snprintf(rel, sizeof rel, "hf-reference/%s/reference_shared.json", model);
    json_error_t je;
    t.ref = json_load_file(tu_shared(rel), 0, &je);
    cr_assert_not_null(t.ref, "%s: %s", rel, je.text);
    return t;
}

static void te_close(struct te_real *t)
{
    engine_destroy(&t->e);
    checkpoint_destroy(&t->ck);
    json_decref(t->ref);
}

static void te_greedy_matches_reference(const char *model)
{
    /* 256-token steps: the ~600-token case is prefilled in three chunks while the others
     * decode beside it */
    struct te_real t = te_open(model, 8, 4096, 256);
    const json_t *cases = json_object_get(t.ref, "greedy");
    int n_cases = (int)json_array_size(cases);
    cr_assert_geq(n_cases, 5);
    struct engine_sampling sp = {.temperature = 0, .top_p = 1, .max_tokens = 24,
                                 .ignore_eos = 1};
    int long_prompt = 0;
    for (int c = 0; c < n_cases; c++) {
        int n;
        int32_t *ids = hfref_ids(json_object_get(json_array_get(cases, (size_t)c),
                                                   "input_ids"), &n);
        if (n > 600)
            long_prompt = 1;
        char err[256] = "";
        cr_assert_eq(engine_add_generate(t.e, (uint64_t)c, ids, n, 1, &sp, err, sizeof err), 0,
                     "%s", err);
        free(ids);
    }
    cr_assert(long_prompt, "the reference lost its 600+ token prompt");
    te_drain(t.e);
    for (int c = 0; c < n_cases; c++) {
        const json_t *cs = json_array_get(cases, (size_t)c);
        int n_want;
        int32_t *want = hfref_ids(json_object_get(cs, "generated_ids"), &n_want);
        const json_t *margins = json_object_get(cs, "top1_top2_margin");
        struct engine_result *r = te_take(t.e, (uint64_t)c);
        cr_assert_eq(r->outputs[0].n_ids, 24);
        cr_assert_eq(r->outputs[0].finish, ENGINE_FINISH_LENGTH);
        /* where HF's top two were nearly tied, float rounding may pick the other one: compare
         * up to the first such step */
        int upto = n_want;
        for (int s = 0; s < n_want; s++)
            if (json_real_value(json_array_get(margins, (size_t)s)) < 0.05) {
                upto = s;
                break;
            }
        for (int s = 0; s < upto; s++)
            cr_assert_eq(r->outputs[0].ids[s], want[s], "%s case %d step %d: %d, HF %d", model,
                         c, s, r->outputs[0].ids[s], want[s]);
        engine_result_free(&r);
        free(want);
    }
    te_close(&t);
}

Test(engine_real, greedy_matches_hf_llama31)
{
    te_greedy_matches_reference("tiny-llama31");
}

Test(engine_real, greedy_matches_hf_llama3_tied)
{
    te_greedy_matches_reference("tiny-llama3-tied");
}

/* |got - want| <= 1e-3 * max(1, |want|): absolute near zero (a relative bound means nothing
 * for a score of -0.12), relative for large scores. The f32 engine agrees with transformers to
 * about 1e-4 relative, so this leaves a 10x margin, while scoring the wrong position or
 * vocabulary row is off by whole units. */
static int te_close_enough(double got, double want)
{
    return fabs(got - want) <= 1e-3 * fmax(1.0, fabs(want));
}

static void te_reward_matches_reference(const char *model)
{
    struct te_real t = te_open(model, 4, 2048, 128);
    const json_t *cases = json_object_get(t.ref, "reward");
    int n = (int)json_array_size(cases);
    cr_assert(n >= 2 && n <= 16);
    int32_t *convs[16];
    int lens[16];
    for (int i = 0; i < n; i++)
        convs[i] = hfref_ids(json_object_get(json_array_get(cases, (size_t)i), "input_ids"),
                               &lens[i]);
    float scores[16];
    char err[256] = "";
    cr_assert_eq(engine_score(t.e, (const int32_t *const *)convs, lens, n, scores, err,
                              sizeof err), 0, "%s", err);
    for (int i = 0; i < n; i++) {
        double want = json_real_value(json_object_get(json_array_get(cases, (size_t)i),
                                                      "score_logit0"));
        cr_assert(te_close_enough(scores[i], want), "%s reward %d: %.6f, HF %.6f", model, i,
                  (double)scores[i], want);
    }
    /* Again one conversation per job: the prompts' blocks now come from the prefix cache, and
     * the scores must not move by a bit. */
    struct engine_stats before, after;
    engine_get_stats(t.e, &before);
    for (int i = 0; i < n; i++) {
        float one;
        const int32_t *c1[1] = {convs[i]};
        cr_assert_eq(engine_score(t.e, c1, &lens[i], 1, &one, err, sizeof err), 0, "%s", err);
        cr_assert_eq(one, scores[i], "%s reward %d: %.9g alone, %.9g in one job", model, i,
                     (double)one, (double)scores[i]);
        free(convs[i]);
    }
    engine_get_stats(t.e, &after);
    cr_assert_gt(after.cached_tokens, before.cached_tokens, "no block came from the cache");
    te_close(&t);
}

Test(engine_real, reward_scores_match_hf_in_one_job)
{
    te_reward_matches_reference("tiny-llama31");
    te_reward_matches_reference("tiny-llama3-tied");
}

Test(engine_real, last_position_logits_match_hf)
{
    struct te_real t = te_open("tiny-llama31", 4, 2048, 128);
    const json_t *pc = json_array_get(json_object_get(t.ref, "prefill"), 1);
    int n;
    int32_t *ids = hfref_ids(json_object_get(pc, "input_ids"), &n);
    size_t off = (size_t)json_integer_value(json_object_get(pc, "last_logits_offset_bytes"));
    int count = (int)json_integer_value(json_object_get(pc, "last_logits_count"));
    const struct model_config *cfg = engine_config(t.e);
    cr_assert_eq(count, cfg->vocab_size);
    size_t len;
    char *raw = tu_read_file(tu_shared("hf-reference/tiny-llama31/reference_shared_last_logits.f32"),
                             &len);
    cr_assert_not_null(raw);
    cr_assert_geq(len, off + (size_t)count * 4);
    float *want = malloc((size_t)count * sizeof *want);
    memcpy(want, raw + off, (size_t)count * sizeof *want);
    float *got = malloc((size_t)count * sizeof *got);
    char err[256] = "";
    cr_assert_eq(engine_logits(t.e, ids, n, got, err, sizeof err), 0, "%s", err);
    int worst = 0;
    for (int v = 0; v < count; v++)
        if (fabsf(got[v] - want[v]) > fabsf(got[worst] - want[worst]))
            worst = v;
    cr_assert(te_close_enough(got[worst], want[worst]), "logit %d: %f, HF %f", worst,
              (double)got[worst], (double)want[worst]);
    free(got);
    free(want);
    free(raw);
    free(ids);
    te_close(&t);
}

static const json_t *te_case_ids(const json_t *ref, const char *set, int i)
{
    return json_object_get(json_array_get(json_object_get(ref, set), (size_t)i), "input_ids");
}

Test(engine_real, a_seeded_request_gives_the_same_tokens_alone_and_in_a_batch)
{
    const struct engine_sampling sp = {.temperature = 0.9f, .top_p = 0.95f, .top_k = 40,
                                       .seed = 7, .max_tokens = 12};
    struct engine_result *alone;
    int n;
    int32_t *ids;
    {
        struct te_real t = te_open("tiny-llama31", 20, 8192, 128);
        ids = hfref_ids(te_case_ids(t.ref, "greedy", 2), &n);
        char err[256] = "";
        cr_assert_eq(engine_generate(t.e, ids, n, 2, &sp, &alone, err, sizeof err), 0, "%s",
                     err);
        te_close(&t);
    }
    struct te_real t = te_open("tiny-llama31", 20, 8192, 128);
    /* 16 other requests, before and after it, mixing prompts, parameters and lengths */
    for (int i = 0; i < 17; i++) {
        char err[256] = "";
        if (i == 8) {
            cr_assert_eq(engine_add_generate(t.e, 99, ids, n, 2, &sp, err, sizeof err), 0, "%s",
                         err);
            continue;
        }
        int m;
        int32_t *other = hfref_ids(te_case_ids(t.ref, i % 3 ? "greedy" : "prefill", i % 5),
                                     &m);
        struct engine_sampling osp = {.temperature = (float)(i % 4) * 0.4f, .top_p = 0.9f,
                                      .top_k = i % 3 * 10, .seed = (uint64_t)i,
                                      .max_tokens = 4 + i % 11, .ignore_eos = i % 2};
        if (i % 5 == 4) {
            const int32_t *convs[2] = {other, ids};
            int lens[2] = {m, n};
            cr_assert_eq(engine_add_score(t.e, (uint64_t)i, convs, lens, 2, err, sizeof err),
                         0, "%s", err);
        } else {
            cr_assert_eq(engine_add_generate(t.e, (uint64_t)i, other, m, 1, &osp, err,
                                             sizeof err), 0, "%s", err);
        }
        free(other);
        if (i % 3 == 0)
            te_step(t.e); /* some join a batch already running */
    }
    te_drain(t.e);
    struct engine_result *batched = te_take(t.e, 99);
    te_same_result(batched, alone, "seeded request in a batch of 16");
    engine_result_free(&batched);
    engine_result_free(&alone);
    free(ids);
    te_close(&t);
}

Test(engine_real, sixteen_samples_cost_one_prefill)
{
    struct engine_stats st[2];
    int n = 0;
    for (int v = 0; v < 2; v++) {
        struct te_real t = te_open("tiny-llama3-tied", 16, 4096, 256);
        int32_t *ids = hfref_ids(te_case_ids(t.ref, "greedy", 3), &n);
        struct engine_sampling sp = {.temperature = 1.0f, .top_p = 1.0f, .seed = 1,
                                     .max_tokens = 4, .ignore_eos = 1};
        struct engine_result *r;
        char err[256] = "";
        cr_assert_eq(engine_generate(t.e, ids, n, v ? 16 : 1, &sp, &r, err, sizeof err), 0,
                     "%s", err);
        cr_assert_eq(r->n_outputs, v ? 16 : 1);
        for (int i = 0; i < r->n_outputs; i++)
            cr_assert_eq(r->outputs[i].n_ids, 4);
        engine_get_stats(t.e, &st[v]);
        cr_assert_eq(engine_kv_blocks_free(t.e), engine_kv_blocks_total(t.e));
        engine_result_free(&r);
        free(ids);
        te_close(&t);
    }
    cr_assert_eq(st[0].prompt_tokens, (uint64_t)n);
    cr_assert_eq(st[1].prompt_tokens, st[0].prompt_tokens, "n=16 forwarded %llu prompt tokens",
                 (unsigned long long)st[1].prompt_tokens);
    cr_assert_eq(st[1].decode_tokens, 16 * st[0].decode_tokens);
}

Test(engine_real, memory_pressure_waits_and_matches_unpressured_runs)
{
    /* 8 blocks: three jobs of two samples of up to 66 tokens cannot all hold their KV at
     * once */
    const struct engine_sampling sp = {.temperature = 0.8f, .top_p = 1.0f, .top_k = 40,
                                       .seed = 3, .max_tokens = 28, .ignore_eos = 1};
    struct engine_result *ref[3];
    int32_t *ids[3];
    int lens[3];
    struct te_real t = te_open("tiny-llama31", 8, 4096, 128);
    for (int i = 0; i < 3; i++) {
        ids[i] = hfref_ids(te_case_ids(t.ref, "greedy", i + 1), &lens[i]);
        char err[256] = "";
        cr_assert_eq(engine_generate(t.e, ids[i], lens[i], 2, &sp, &ref[i], err, sizeof err), 0,
                     "%s", err);
    }
    te_close(&t);

    t = te_open("tiny-llama31", 8, 8 * BT, 64);
    cr_assert_eq(engine_kv_tokens(t.e), 128);
    for (int i = 0; i < 3; i++) {
        char err[256] = "";
        cr_assert_eq(engine_add_generate(t.e, (uint64_t)i, ids[i], lens[i], 2, &sp, err,
                                         sizeof err), 0, "%s", err);
    }
    te_drain(t.e);
    struct engine_stats st;
    engine_get_stats(t.e, &st);
    cr_assert_gt(st.preemptions, 0);
    for (int i = 0; i < 3; i++) {
        struct engine_result *r = te_take(t.e, (uint64_t)i);
        te_same_result(r, ref[i], "under memory pressure");
        engine_result_free(&r);
        engine_result_free(&ref[i]);
        free(ids[i]);
    }
    cr_assert_eq(engine_kv_blocks_free(t.e), 8);
    te_close(&t);
}

Test(engine_real, an_over_long_prompt_is_refused_with_the_model_limit)
{
    struct te_real t = te_open("tiny-llama31", 4, 2048, 128);
    int limit = engine_config(t.e)->max_seq_len;
    int32_t *ids = calloc((size_t)limit, sizeof *ids);
    struct engine_sampling sp = {.temperature = 0, .top_p = 1, .max_tokens = 1};
    char err[256] = "", want[160];
    cr_assert_lt(engine_add_generate(t.e, 1, ids, limit, 1, &sp, err, sizeof err), 0);
    snprintf(want, sizeof want, "prompt is %d tokens; the model's limit is %d "
             "(max_position_embeddings)", limit, limit);
    cr_assert(strstr(err, want), "%s", err);
    /* shorter than the model's limit but longer than this engine's KV pool */
    cr_assert_lt(engine_add_generate(t.e, 1, ids, 3000, 1, &sp, err, sizeof err), 0);
    cr_assert(strstr(err, "kv_tokens"), "%s", err);
    free(ids);
    te_close(&t);
}
