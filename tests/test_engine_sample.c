/* test_engine_sample.c — the engine's device-sampling path (FWD_SAMPLE) against its host path.
 *
 * A backend with BACKEND_CAP_SAMPLE is given ids instead of logits. The one here wraps the
 * real CPU backend on ../shared/hf-reference/tiny-llama31: it answers FWD_SAMPLE by asking the
 * CPU backend for the last position's logits and drawing with the host sampler under the
 * parameters and key the engine sent (as a device backend does on its device). The engine
 * must then produce exactly the tokens of its host path (plain CPU backend, FWD_LAST and the
 * host sampler) for the same seed: which proves it fills fwd_sample with the job's parameters,
 * the request's seed, the sample's index as stream and the token's index as step, and takes
 * the token from `token`.
 */
#include <criterion/criterion.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "checkpoint.h"
#include "engine.h"
#include "sampler.h"
#include "testutil.h"

#define ES_MAX_SEQS 8
#define ES_BATCH_TOKENS 128
#define ES_KV_TOKENS 4096

struct es_backend {
    struct backend base;  /* caps = BACKEND_CAP_SAMPLE */
    struct backend *cpu;  /* owned */
    struct sampler *sampler;
    struct fwd_seq *seqs; /* (ES_MAX_SEQS) the call as passed on to the CPU backend */
    float *logits;        /* (ES_MAX_SEQS, vocab_size) */
    int *n_draws;         /* test-owned: FWD_SAMPLE sequences served */
    int *n_last;          /* test-owned: FWD_LAST sequences served */
};

static int es_forward(struct backend *be, const struct fwd_seq *seqs, int n_seqs, char *err,
                      size_t err_len)
{
    struct es_backend *b = (struct es_backend *)be;
    if (n_seqs < 1 || n_seqs > ES_MAX_SEQS) {
        snprintf(err, err_len, "es backend: %d sequences", n_seqs);
        return -1;
    }
    size_t vocab = (size_t)be->cfg->vocab_size;
    for (int s = 0; s < n_seqs; s++) {
        b->seqs[s] = seqs[s];
        if (seqs[s].output == FWD_SAMPLE) {
            if (!seqs[s].sample || !seqs[s].token) {
                snprintf(err, err_len, "es backend: FWD_SAMPLE without sample or token");
                return -1;
            }
            b->seqs[s].output = FWD_LAST;
            b->seqs[s].out = b->logits + (size_t)s * vocab;
            b->seqs[s].sample = NULL;
            b->seqs[s].token = NULL;
        } else if (seqs[s].output == FWD_LAST) {
            (*b->n_last)++;
        }
    }
    if (b->cpu->ops->forward(b->cpu, b->seqs, n_seqs, err, err_len) != 0)
        return -1;
    for (int s = 0; s < n_seqs; s++) {
        if (seqs[s].output != FWD_SAMPLE)
            continue;
        const struct fwd_sample *fs = seqs[s].sample;
        struct sampler_params p = {.temperature = fs->temperature, .top_p = fs->top_p,
                                   .top_k = fs->top_k};
        struct sampler_key key = {.seed = fs->seed, .stream = fs->stream, .step = fs->step};
        if (sampler_check_params(&p, err, err_len) != 0 ||
            sampler_sample(b->sampler, b->logits + (size_t)s * vocab, &p, &key, seqs[s].token,
                           err, err_len) != 0)
            return -1;
        (*b->n_draws)++;
    }
    return 0;
}

static int es_copy_block(struct backend *be, int src, int dst, char *err, size_t err_len)
{
    struct es_backend *b = (struct es_backend *)be;
    return b->cpu->ops->copy_block(b->cpu, src, dst, err, err_len);
}

static void es_destroy(struct backend *be)
{
    struct es_backend *b = (struct es_backend *)be;
    backend_destroy(&b->cpu);
    sampler_destroy(&b->sampler);
    free(b->seqs);
    free(b->logits);
    free(b);
}

static const struct backend_ops es_ops = {
    .name = "cpu+sample",
    .forward = es_forward,
    .copy_block = es_copy_block,
    .destroy = es_destroy,
};

/* An engine over the CPU backend, wrapped in the sampling backend when `sampling`. */
static struct engine *es_engine(const struct checkpoint *ck, int sampling, int *n_draws,
                                int *n_last)
{
    char err[512] = "";
    struct backend_params bp = {.kv_tokens = ES_KV_TOKENS, .max_batch_tokens = ES_BATCH_TOKENS,
                                .max_batch_seqs = ES_MAX_SEQS, .n_threads = 2};
    struct backend *be = NULL;
    cr_assert_eq(backend_open("cpu", ck, &bp, &be, err, sizeof err), 0, "%s", err);
    if (sampling) {
        struct es_backend *b = calloc(1, sizeof *b);
        cr_assert_not_null(b);
        b->base.ops = &es_ops;
        b->base.cfg = be->cfg;
        b->base.n_kv_blocks = be->n_kv_blocks;
        b->base.caps = BACKEND_CAP_SAMPLE;
        b->cpu = be;
        b->n_draws = n_draws;
        b->n_last = n_last;
        b->seqs = calloc(ES_MAX_SEQS, sizeof *b->seqs);
        b->logits = malloc((size_t)ES_MAX_SEQS * (size_t)be->cfg->vocab_size * sizeof(float));
        cr_assert(b->seqs && b->logits);
        cr_assert_eq(sampler_new(be->cfg->vocab_size, &b->sampler, err, sizeof err), 0, "%s",
                     err);
        be = &b->base;
    }
    struct engine_params p = {.max_seqs = ES_MAX_SEQS, .max_batch_tokens = ES_BATCH_TOKENS};
    struct engine *e = NULL;
    cr_assert_eq(engine_new_with_backend(&be, &p, &e, err, sizeof err), 0, "%s", err);
    return e;
}

/* input_ids of reference case i of set "greedy" (caller frees). */
static int32_t *es_prompt(int i, int *n)
{
    json_error_t je;
    json_t *ref = json_load_file(tu_shared("hf-reference/tiny-llama31/reference_shared.json"), 0,
                                 &je);
    cr_assert_not_null(ref, "reference_shared.json: %s", je.text);
    const json_t *arr = json_object_get(json_array_get(json_object_get(ref, "greedy"),
                                                       (size_t)i), "input_ids");
    cr_assert(json_is_array(arr));
    *n = (int)json_array_size(arr);
    int32_t *ids = malloc((size_t)*n * sizeof *ids);
    for (int k = 0; k < *n; k++)
        ids[k] = (int32_t)json_integer_value(json_array_get(arr, (size_t)k));
    json_decref(ref);
    return ids;
}

static void es_same(const struct engine_result *a, const struct engine_result *b,
                    const char *what)
{
    cr_assert_eq(a->n_outputs, b->n_outputs, "%s", what);
    for (int i = 0; i < a->n_outputs; i++) {
        const struct engine_output *x = &a->outputs[i], *y = &b->outputs[i];
        cr_assert_eq(x->n_ids, y->n_ids, "%s: sample %d has %d ids on the host path, %d on "
                     "the device path", what, i, x->n_ids, y->n_ids);
        cr_assert_arr_eq(x->ids, y->ids, (size_t)x->n_ids * sizeof *x->ids,
                         "%s: sample %d differs", what, i);
        cr_assert_eq(x->finish, y->finish, "%s: sample %d", what, i);
    }
    cr_assert_eq(a->completion_tokens, b->completion_tokens, "%s", what);
}

/* Runs the same requests (prompts 0..2, n samples each, in one engine: they batch together)
 * on the host path and the sampling path; checks equal results and who drew what. */
static void es_compare(const struct engine_sampling *sp, int n, const char *what)
{
    char err[512] = "";
    struct checkpoint *ck = NULL;
    cr_assert_eq(checkpoint_open(tu_shared("hf-reference/tiny-llama31"), &ck, err, sizeof err), 0,
                 "%s", err);
    enum { JOBS = 3 };
    struct engine_result *res[2][JOBS];
    int n_draws = 0, n_last = 0;
    for (int path = 0; path < 2; path++) {
        struct engine *e = es_engine(ck, path, &n_draws, &n_last);
        for (int j = 0; j < JOBS; j++) {
            int len;
            int32_t *ids = es_prompt(j, &len);
            cr_assert_eq(engine_add_generate(e, (uint64_t)j, ids, len, n, sp, err, sizeof err),
                         0, "%s", err);
            free(ids);
        }
        while (engine_pending(e) > 0)
            cr_assert_geq(engine_step(e, err, sizeof err), 0, "%s", err);
        for (int j = 0; j < JOBS; j++) {
            cr_assert_eq(engine_take_result(e, (uint64_t)j, &res[path][j]), 1);
            cr_assert_eq(res[path][j]->status, ENGINE_JOB_OK, "%s", res[path][j]->error);
        }
        engine_destroy(&e);
    }
    int completion = 0;
    for (int j = 0; j < JOBS; j++) {
        char where[128];
        snprintf(where, sizeof where, "%s, prompt %d", what, j);
        es_same(res[0][j], res[1][j], where);
        completion += res[1][j]->completion_tokens;
    }
    /* Every draw but the fork's (one row of logits shared by n > 1 samples) was the backend's */
    int host_draws = n > 1 ? JOBS * n : 0;
    cr_assert_eq(n_draws, completion - host_draws, "%s: the backend drew %d of %d ids", what,
                 n_draws, completion);
    cr_assert_eq(n_last, n > 1 ? JOBS : 0, "%s: %d FWD_LAST rows on the sampling path", what,
                 n_last);
    for (int path = 0; path < 2; path++)
        for (int j = 0; j < JOBS; j++)
            engine_result_free(&res[path][j]);
    checkpoint_destroy(&ck);
}

Test(engine_sample, greedy_tokens_match_the_host_path)
{
    const struct engine_sampling sp = {.temperature = 0.0f, .top_p = 1.0f, .top_k = 0,
                                       .seed = 5, .max_tokens = 10};
    es_compare(&sp, 4, "greedy, n 4");
}

Test(engine_sample, sampled_tokens_match_the_host_path)
{
    const struct engine_sampling sp = {.temperature = 0.8f, .top_p = 0.9f, .top_k = 50,
                                       .seed = 7, .max_tokens = 12};
    es_compare(&sp, 4, "T 0.8 top_p 0.9 top_k 50, n 4");
}

Test(engine_sample, a_single_sample_is_drawn_by_the_backend_from_its_first_token)
{
    const struct engine_sampling sp = {.temperature = 0.8f, .top_p = 0.9f, .top_k = 50,
                                       .seed = 11, .max_tokens = 8, .ignore_eos = 1};
    es_compare(&sp, 1, "T 0.8 top_p 0.9 top_k 50, n 1");
}

Test(engine_sample, samples_of_one_seed_differ_and_a_seed_repeats)
{
    /* the point of the comparison above: the draws are live, and keyed by the sample */
    char err[512] = "";
    struct checkpoint *ck = NULL;
    cr_assert_eq(checkpoint_open(tu_shared("hf-reference/tiny-llama31"), &ck, err, sizeof err), 0,
                 "%s", err);
    const struct engine_sampling sp = {.temperature = 0.8f, .top_p = 0.9f, .top_k = 50,
                                       .seed = 7, .max_tokens = 12, .ignore_eos = 1};
    int len, n_draws = 0, n_last = 0;
    int32_t *ids = es_prompt(1, &len);
    struct engine_result *r[2];
    for (int k = 0; k < 2; k++) {
        struct engine *e = es_engine(ck, 1, &n_draws, &n_last);
        cr_assert_eq(engine_generate(e, ids, len, 4, &sp, &r[k], err, sizeof err), 0, "%s", err);
        engine_destroy(&e);
    }
    es_same(r[0], r[1], "the same seed twice");
    int differ = 0;
    for (int i = 1; i < 4; i++)
        differ += memcmp(r[0]->outputs[0].ids, r[0]->outputs[i].ids,
                         (size_t)r[0]->outputs[0].n_ids * sizeof(int32_t)) != 0;
    cr_assert_gt(differ, 0, "four samples of one seed gave the same tokens");
    engine_result_free(&r[0]);
    engine_result_free(&r[1]);
    free(ids);
    checkpoint_destroy(&ck);
}
