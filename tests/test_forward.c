/* test_forward.c — the CPU backend's forward pass against Hugging Face transformers
 * (../shared/hf-reference), its batch invariance, paged KV cache, error returns, the numeric
 * kernels under it, and the bench / roofline measurements.
 *
 * Reads the reference models and their recorded logits; writes nothing. Every comparison with
 * the reference uses the README's bound: max |diff| <= 1e-3 * max |ref| (an f32 engine over the
 * same bf16 weights lands near 1e-5). Batch, chunking, thread count and prefix sharing must
 * change no bit, so those comparisons are memcmp.
 */
#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cpu.h"
#include "bench.h"
#include "checkpoint.h"
#include "cpu_matmul.h"
#include "roofline.h"
#include "hfref.h"
#include "testutil.h"

#define ERR_LEN 512
#define REL_TOL 1e-3

/* ---- reference data ------------------------------------------------------------------------ */

/* The reference's top-5 tokens have our logits within tol, and our 5 highest logits equal its
 * 5 highest within tol: together, the same top 5 up to genuine near-ties. */
static void expect_top5(const float *row, int vocab, json_t *ids, json_t *vals, double tol,
                        const char *what, int pos)
{
    double want[5], got[5] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    for (int r = 0; r < 5; r++) {
        int id = (int)json_integer_value(json_array_get(ids, (size_t)r));
        want[r] = json_real_value(json_array_get(vals, (size_t)r));
        cr_assert(id >= 0 && id < vocab);
        cr_expect(fabs((double)row[id] - want[r]) <= tol,
                  "%s pos %d: top%d id %d logit %g, reference %g", what, pos, r + 1, id,
                  (double)row[id], want[r]);
    }
    for (int i = 0; i < vocab; i++) {
        double v = row[i];
        if (v <= got[4])
            continue;
        int r = 4;
        while (r > 0 && got[r - 1] < v) {
            got[r] = got[r - 1];
            r--;
        }
        got[r] = v;
    }
    for (int r = 0; r < 5; r++)
        cr_expect(fabs(got[r] - want[r]) <= tol, "%s pos %d: our top%d logit %g, reference %g",
                  what, pos, r + 1, got[r], want[r]);
}

/* ---- backend helpers ----------------------------------------------------------------------- */

static struct backend *open_be(const struct hfref *r, int max_tokens, int max_seqs, int n_blocks,
                               int n_threads)
{
    struct backend_params p = {.n_kv_blocks = n_blocks,
                               .max_batch_tokens = max_tokens,
                               .max_batch_seqs = max_seqs,
                               .n_threads = n_threads};
    struct backend *be = NULL;
    char err[ERR_LEN];
    cr_assert_eq(backend_cpu_open(r->ck, &p, &be, err, sizeof err), 0, "%s", err);
    cr_assert_not_null(be);
    return be;
}

static void be_close(struct backend **be)
{
    (*be)->ops->destroy(*be);
    *be = NULL;
}

/* Block ids handed out in order; a table covers `n_pos` positions. */
static int32_t *new_table(int *next_block, int n_pos)
{
    int nb = (n_pos + BACKEND_BLOCK_TOKENS - 1) / BACKEND_BLOCK_TOKENS;
    int32_t *t = malloc((size_t)nb * sizeof *t);
    cr_assert_not_null(t);
    for (int i = 0; i < nb; i++)
        t[i] = (int32_t)(*next_block)++;
    return t;
}

static int blocks_for(int n_pos)
{
    return (n_pos + BACKEND_BLOCK_TOKENS - 1) / BACKEND_BLOCK_TOKENS;
}

static void fwd_ok(struct backend *be, const struct fwd_seq *s, int n)
{
    char err[ERR_LEN] = "";
    int rc = be->ops->forward(be, s, n, err, sizeof err);
    cr_assert_eq(rc, 0, "forward: %s", err);
}

static float *logits_alloc(const struct hfref *r, int rows)
{
    float *p = malloc((size_t)rows * (size_t)r->cfg->vocab_size * sizeof *p);
    cr_assert_not_null(p, "out of memory for %d logit rows", rows);
    return p;
}

/* Runs ids[0..n) of one sequence in one call with private blocks, logits per `out_kind`. */
static float *run_alone(const struct hfref *r, struct backend *be, const int32_t *ids, int n,
                        enum fwd_output out_kind)
{
    int next = 0;
    int32_t *table = new_table(&next, n);
    int rows = out_kind == FWD_ALL ? n : 1;
    float *out = logits_alloc(r, rows);
    struct fwd_seq s = {.tokens = ids, .n_tokens = n, .pos = 0, .block_table = table,
                        .n_blocks = blocks_for(n), .output = out_kind, .out = out};
    fwd_ok(be, &s, 1);
    free(table);
    return out;
}

/* ---- against Hugging Face ------------------------------------------------------------------ */

static void check_prefill(const char *model)
{
    struct hfref r;
    hfref_open(&r, model);
    json_t *cases = hfref_cases(&r, "prefill");
    const int V = r.cfg->vocab_size;
    struct backend *be = open_be(&r, 1024, 8, blocks_for(1024), 0);
    for (size_t c = 0; c < json_array_size(cases); c++) {
        json_t *cs = json_array_get(cases, c);
        int n;
        int32_t *ids = hfref_ids(json_object_get(cs, "input_ids"), &n);
        const float *want = hfref_last_logits(&r, cs);
        float *all = run_alone(&r, be, ids, n, FWD_ALL);
        char what[128];
        snprintf(what, sizeof what, "%s prefill case %zu (%d tokens) last logits", model, c, n);
        hfref_expect_close(all + (size_t)(n - 1) * V, want, V, REL_TOL, what);

        double tol = REL_TOL * hfref_max_abs(want, V);
        json_t *t5i = json_object_get(cs, "top5_ids"), *t5v = json_object_get(cs, "top5_logits");
        cr_assert_eq((int)json_array_size(t5i), n);
        snprintf(what, sizeof what, "%s prefill case %zu", model, c);
        for (int p = 0; p < n; p++)
            expect_top5(all + (size_t)p * V, V, json_array_get(t5i, (size_t)p),
                        json_array_get(t5v, (size_t)p), tol, what, p);
        free(all);
        free(ids);
    }
    be_close(&be);
    hfref_close(&r);
}

Test(forward, prefill_matches_hf_llama31)
{
    check_prefill("tiny-llama31");
}

Test(forward, prefill_matches_hf_llama3_tied)
{
    check_prefill("tiny-llama3-tied");
}

/* Prefill in chunks of 7, the last 3 tokens one by one: the same bits as one call, and so the
 * reference's logits. */
static void check_chunked(const char *model)
{
    struct hfref r;
    hfref_open(&r, model);
    json_t *cases = hfref_cases(&r, "prefill");
    const int V = r.cfg->vocab_size;
    struct backend *be = open_be(&r, 1024, 4, 2 * blocks_for(1024), 0);
    for (size_t c = 0; c < json_array_size(cases); c++) {
        json_t *cs = json_array_get(cases, c);
        int n;
        int32_t *ids = hfref_ids(json_object_get(cs, "input_ids"), &n);
        float *whole = run_alone(&r, be, ids, n, FWD_LAST);

        int next = blocks_for(1024); /* blocks the one-call run did not use */
        int32_t *table = new_table(&next, n);
        float *out = logits_alloc(&r, 1);
        int pos = 0;
        while (pos < n) {
            int len = n - pos > 3 ? (n - 3 - pos < 7 ? n - 3 - pos : 7) : 1;
            struct fwd_seq s = {.tokens = ids + pos, .n_tokens = len, .pos = pos,
                                .block_table = table, .n_blocks = blocks_for(n),
                                .output = pos + len == n ? FWD_LAST : FWD_NONE, .out = out};
            fwd_ok(be, &s, 1);
            pos += len;
        }
        cr_expect(memcmp(out, whole, (size_t)V * sizeof *out) == 0,
                  "%s case %zu: chunked prefill differs from one call", model, c);
        char what[128];
        snprintf(what, sizeof what, "%s chunked case %zu", model, c);
        hfref_expect_close(out, hfref_last_logits(&r, cs), V, REL_TOL, what);
        free(out);
        free(table);
        free(whole);
        free(ids);
    }
    be_close(&be);
    hfref_close(&r);
}

Test(forward, chunked_prefill_llama31)
{
    check_chunked("tiny-llama31");
}

Test(forward, chunked_prefill_llama3_tied)
{
    check_chunked("tiny-llama3-tied");
}

/* Greedy decoding one token per call, fed transformers' own continuation: at every step whose
 * top-1/top-2 margin is too wide for rounding to flip (>= 0.05) our argmax is its token, and
 * our margin is its margin. */
static void check_greedy(const char *model)
{
    struct hfref r;
    hfref_open(&r, model);
    json_t *cases = hfref_cases(&r, "greedy");
    const int V = r.cfg->vocab_size;
    struct backend *be = open_be(&r, 1024, 1, blocks_for(1024 + 32), 0);
    float *out = logits_alloc(&r, 1);
    int compared = 0;
    for (size_t c = 0; c < json_array_size(cases); c++) {
        json_t *cs = json_array_get(cases, c);
        int n, n_gen;
        int32_t *ids = hfref_ids(json_object_get(cs, "input_ids"), &n);
        int32_t *gen = hfref_ids(json_object_get(cs, "generated_ids"), &n_gen);
        json_t *margins = json_object_get(cs, "top1_top2_margin");
        int next = 0;
        int32_t *table = new_table(&next, n + n_gen);
        struct fwd_seq s = {.tokens = ids, .n_tokens = n, .pos = 0, .block_table = table,
                            .n_blocks = blocks_for(n + n_gen), .output = FWD_LAST, .out = out};
        fwd_ok(be, &s, 1);
        for (int step = 0; step < n_gen; step++) {
            double margin = json_real_value(json_array_get(margins, (size_t)step));
            int best = 0, second = -1;
            for (int i = 1; i < V; i++) {
                if (out[i] > out[best]) {
                    second = best;
                    best = i;
                } else if (second < 0 || out[i] > out[second]) {
                    second = i;
                }
            }
            if (margin >= 0.05) {
                double tol = REL_TOL * hfref_max_abs(out, V);
                cr_expect_eq(best, gen[step], "%s greedy case %zu step %d: id %d, reference %d",
                             model, c, step, best, (int)gen[step]);
                cr_expect(fabs((double)out[best] - out[second] - margin) <= 2 * tol,
                          "%s greedy case %zu step %d: margin %g, reference %g", model, c, step,
                          (double)(out[best] - out[second]), margin);
                compared++;
            }
            s = (struct fwd_seq){.tokens = gen + step, .n_tokens = 1, .pos = n + step,
                                 .block_table = table, .n_blocks = blocks_for(n + n_gen),
                                 .output = FWD_LAST, .out = out};
            fwd_ok(be, &s, 1);
        }
        free(table);
        free(gen);
        free(ids);
    }
    cr_expect_gt(compared, 50, "%s: only %d greedy steps had a clear margin", model, compared);
    free(out);
    be_close(&be);
    hfref_close(&r);
}

Test(forward, greedy_matches_hf_llama31)
{
    check_greedy("tiny-llama31");
}

Test(forward, greedy_matches_hf_llama3_tied)
{
    check_greedy("tiny-llama3-tied");
}

/* FWD_LOGIT0 is the reward models' score: the reference's score_logit0, and bitwise the
 * first logit of FWD_LAST for the same input. */
Test(forward, reward_logit0_matches_hf)
{
    const char *models[] = {"tiny-llama31", "tiny-llama3-tied"};
    for (int m = 0; m < 2; m++) {
        struct hfref r;
        hfref_open(&r, models[m]);
        json_t *cases = hfref_cases(&r, "reward");
        struct backend *be = open_be(&r, 256, 1, blocks_for(256), 0);
        for (size_t c = 0; c < json_array_size(cases); c++) {
            json_t *cs = json_array_get(cases, c);
            int n;
            int32_t *ids = hfref_ids(json_object_get(cs, "input_ids"), &n);
            double want = json_real_value(json_object_get(cs, "score_logit0"));
            float *score = run_alone(&r, be, ids, n, FWD_LOGIT0);
            float *last = run_alone(&r, be, ids, n, FWD_LAST);
            double tol = REL_TOL * hfref_max_abs(last, r.cfg->vocab_size);
            cr_expect(fabs(score[0] - want) <= tol, "%s reward case %zu: %g, reference %g",
                      models[m], c, (double)score[0], want);
            cr_expect(memcmp(score, last, sizeof *score) == 0,
                      "%s reward case %zu: LOGIT0 %.9g != LAST[0] %.9g", models[m], c,
                      (double)score[0], (double)last[0]);
            free(last);
            free(score);
            free(ids);
        }
        be_close(&be);
        hfref_close(&r);
    }
}

/* ---- batch invariance ---------------------------------------------------------------------- */

/* Every prefill case of a model in ONE call, in the given order, each with its own output
 * kind, compared bitwise with the case run alone. */
static void check_batched(const char *model, int n_threads, int reverse)
{
    struct hfref r;
    hfref_open(&r, model);
    json_t *cases = hfref_cases(&r, "prefill");
    const int V = r.cfg->vocab_size;
    int nc = (int)json_array_size(cases);
    cr_assert(nc <= 8);
    static const enum fwd_output kinds[] = {FWD_ALL, FWD_LAST, FWD_LOGIT0, FWD_ALL, FWD_LAST,
                                            FWD_LAST, FWD_ALL, FWD_LOGIT0};
    int32_t *ids[8], *tables[8];
    int n[8], total = 0;
    float *alone[8], *batched[8];
    struct backend *be = open_be(&r, 1024, 8, 4 * blocks_for(1024), n_threads);
    int next = 2 * blocks_for(1024);
    for (int c = 0; c < nc; c++) {
        ids[c] = hfref_ids(json_object_get(json_array_get(cases, (size_t)c), "input_ids"), &n[c]);
        total += n[c];
        alone[c] = run_alone(&r, be, ids[c], n[c], kinds[c]);
        tables[c] = new_table(&next, n[c]);
        batched[c] = logits_alloc(&r, kinds[c] == FWD_ALL ? n[c] : 1);
    }
    cr_assert(total <= 1024);
    struct fwd_seq seqs[8];
    for (int i = 0; i < nc; i++) {
        int c = reverse ? nc - 1 - i : i;
        seqs[i] = (struct fwd_seq){.tokens = ids[c], .n_tokens = n[c], .pos = 0,
                                   .block_table = tables[c], .n_blocks = blocks_for(n[c]),
                                   .output = kinds[c], .out = batched[c]};
    }
    fwd_ok(be, seqs, nc);
    for (int c = 0; c < nc; c++) {
        size_t floats = kinds[c] == FWD_ALL    ? (size_t)n[c] * V
                        : kinds[c] == FWD_LAST ? (size_t)V
                                               : 1;
        cr_expect(memcmp(alone[c], batched[c], floats * sizeof(float)) == 0,
                  "%s: case %d (%d tokens, output %d) differs in a batch of %d (threads %d%s)",
                  model, c, n[c], (int)kinds[c], nc, n_threads, reverse ? ", reversed" : "");
        free(ids[c]);
        free(tables[c]);
        free(alone[c]);
        free(batched[c]);
    }
    be_close(&be);
    hfref_close(&r);
}

Test(forward, batched_equals_alone_llama31)
{
    check_batched("tiny-llama31", 0, 0);
}

Test(forward, batched_equals_alone_llama3_tied_reversed)
{
    check_batched("tiny-llama3-tied", 0, 1);
}

/* Thread count decides only who computes which columns: 1, 2 and 3 threads give the same
 * bits (3 oversubscribes a 2-core machine, which must still be correct). */
Test(forward, thread_count_changes_no_bit)
{
    struct hfref r;
    hfref_open(&r, "tiny-llama31");
    json_t *cs = json_array_get(hfref_cases(&r, "prefill"), 3);
    int n;
    int32_t *ids = hfref_ids(json_object_get(cs, "input_ids"), &n);
    float *first = NULL;
    for (int th = 1; th <= 3; th++) {
        struct backend *be = open_be(&r, 64, 2, blocks_for(64), th);
        cr_assert_eq(backend_cpu_threads(be), th);
        float *out = run_alone(&r, be, ids, n, FWD_ALL);
        if (!first)
            first = out;
        else {
            cr_expect(memcmp(first, out, (size_t)n * r.cfg->vocab_size * sizeof(float)) == 0,
                      "%d threads differ from 1", th);
            free(out);
        }
        be_close(&be);
    }
    free(first);
    free(ids);
    hfref_close(&r);
}

/* Decode steps of several sequences batched together (a continuous-batching step: one prefill
 * chunk plus single decode tokens) equal each sequence decoded alone. */
Test(forward, mixed_prefill_and_decode_batch)
{
    struct hfref r;
    hfref_open(&r, "tiny-llama3-tied");
    json_t *cases = hfref_cases(&r, "prefill");
    const int V = r.cfg->vocab_size;
    int n0, n1, n2;
    int32_t *a = hfref_ids(json_object_get(json_array_get(cases, 0), "input_ids"), &n0);
    int32_t *b = hfref_ids(json_object_get(json_array_get(cases, 1), "input_ids"), &n1);
    int32_t *c = hfref_ids(json_object_get(json_array_get(cases, 2), "input_ids"), &n2);
    struct backend *be = open_be(&r, 128, 4, 64, 0);
    int next = 0;
    int32_t *ta = new_table(&next, n0 + 1), *tb = new_table(&next, n1 + 1);
    int32_t *tc = new_table(&next, n2);
    float *la = logits_alloc(&r, 1), *lb = logits_alloc(&r, 1), *lc = logits_alloc(&r, 1);
    /* a and b prefilled (all but the last token), then decode their last token while c's
     * whole prompt prefills in the same call. */
    const int nba = blocks_for(n0 + 1), nbb = blocks_for(n1 + 1), nbc = blocks_for(n2);
    struct fwd_seq pre[2] = {
        {.tokens = a, .n_tokens = n0 - 1, .pos = 0, .block_table = ta, .n_blocks = nba,
         .output = FWD_NONE},
        {.tokens = b, .n_tokens = n1 - 1, .pos = 0, .block_table = tb, .n_blocks = nbb,
         .output = FWD_NONE},
    };
    fwd_ok(be, pre, 2);
    struct fwd_seq step[3] = {
        {.tokens = a + n0 - 1, .n_tokens = 1, .pos = n0 - 1, .block_table = ta,
         .n_blocks = nba, .output = FWD_LAST, .out = la},
        {.tokens = c, .n_tokens = n2, .pos = 0, .block_table = tc, .n_blocks = nbc,
         .output = FWD_LAST, .out = lc},
        {.tokens = b + n1 - 1, .n_tokens = 1, .pos = n1 - 1, .block_table = tb,
         .n_blocks = nbb, .output = FWD_LAST, .out = lb},
    };
    fwd_ok(be, step, 3);
    float *wa = run_alone(&r, be, a, n0, FWD_LAST);
    float *wb = run_alone(&r, be, b, n1, FWD_LAST);
    float *wc = run_alone(&r, be, c, n2, FWD_LAST);
    cr_expect(memcmp(la, wa, (size_t)V * sizeof(float)) == 0, "decode of a differs");
    cr_expect(memcmp(lb, wb, (size_t)V * sizeof(float)) == 0, "decode of b differs");
    cr_expect(memcmp(lc, wc, (size_t)V * sizeof(float)) == 0, "prefill of c differs");
    free(wa);
    free(wb);
    free(wc);
    free(la);
    free(lb);
    free(lc);
    free(ta);
    free(tb);
    free(tc);
    free(a);
    free(b);
    free(c);
    be_close(&be);
    hfref_close(&r);
}

/* ---- paged KV cache: prefix sharing and copy-on-write -------------------------------------- */

/* A 40-token prefix is prefilled once into blocks 0-2; sequence B gets the two full blocks
 * shared and a copy of the partial third (copy_block); then A and B continue with different
 * tokens in one call. Each equals its whole prompt run alone in fresh blocks. */
Test(forward, shared_prefix_blocks)
{
    struct hfref r;
    hfref_open(&r, "tiny-llama31");
    json_t *cases = hfref_cases(&r, "prefill");
    const int V = r.cfg->vocab_size;
    int nl, no;
    int32_t *lng = hfref_ids(json_object_get(json_array_get(cases, 4), "input_ids"), &nl);
    int32_t *oth = hfref_ids(json_object_get(json_array_get(cases, 3), "input_ids"), &no);
    enum { PREFIX = 40, SUFFIX = 30, TOTAL = PREFIX + SUFFIX };
    cr_assert(nl >= TOTAL && no >= SUFFIX);
    int32_t seq_a[TOTAL], seq_b[TOTAL];
    memcpy(seq_a, lng, sizeof seq_a);
    memcpy(seq_b, lng, PREFIX * sizeof *seq_b);
    memcpy(seq_b + PREFIX, oth, SUFFIX * sizeof *seq_b);

    struct backend *be = open_be(&r, 128, 2, 64, 0);
    char err[ERR_LEN];
    int32_t ta[] = {0, 1, 2, 3, 4}, tb[] = {0, 1, 5, 6, 7};
    struct fwd_seq pre = {.tokens = seq_a, .n_tokens = PREFIX, .pos = 0, .block_table = ta,
                          .n_blocks = 5, .output = FWD_NONE};
    fwd_ok(be, &pre, 1);
    cr_assert_eq(be->ops->copy_block(be, 2, 5, err, sizeof err), 0, "%s", err);

    float *la = logits_alloc(&r, SUFFIX), *lb = logits_alloc(&r, SUFFIX);
    struct fwd_seq both[2] = {
        {.tokens = seq_a + PREFIX, .n_tokens = SUFFIX, .pos = PREFIX, .block_table = ta,
         .n_blocks = 5, .output = FWD_ALL, .out = la},
        {.tokens = seq_b + PREFIX, .n_tokens = SUFFIX, .pos = PREFIX, .block_table = tb,
         .n_blocks = 5, .output = FWD_ALL, .out = lb},
    };
    fwd_ok(be, both, 2);

    /* Alone, in blocks far from the ones above. */
    int32_t fa[] = {20, 21, 22, 23, 24}, fb[] = {30, 31, 32, 33, 34};
    float *wa = logits_alloc(&r, TOTAL), *wb = logits_alloc(&r, TOTAL);
    struct fwd_seq s = {.tokens = seq_a, .n_tokens = TOTAL, .block_table = fa, .n_blocks = 5,
                        .output = FWD_ALL, .out = wa};
    fwd_ok(be, &s, 1);
    s = (struct fwd_seq){.tokens = seq_b, .n_tokens = TOTAL, .block_table = fb, .n_blocks = 5,
                         .output = FWD_ALL, .out = wb};
    fwd_ok(be, &s, 1);
    size_t bytes = (size_t)SUFFIX * V * sizeof(float);
    cr_expect(memcmp(la, wa + (size_t)PREFIX * V, bytes) == 0, "A over shared blocks differs");
    cr_expect(memcmp(lb, wb + (size_t)PREFIX * V, bytes) == 0, "B over shared blocks differs");
    cr_expect(memcmp(la, lb, (size_t)V * sizeof(float)) != 0, "A and B did not diverge");

    /* A sequence writing into the shared block 2 that A reads in the same call (it forgot
     * its copy) is rejected, naming the block. */
    int32_t forgot[] = {0, 1, 2};
    int32_t tok = seq_b[PREFIX];
    struct fwd_seq clash[2] = {
        {.tokens = &tok, .n_tokens = 1, .pos = TOTAL, .block_table = ta, .n_blocks = 5,
         .output = FWD_NONE},
        {.tokens = &tok, .n_tokens = 1, .pos = PREFIX, .block_table = forgot, .n_blocks = 3,
         .output = FWD_NONE},
    };
    err[0] = '\0';
    cr_expect_neq(be->ops->forward(be, clash, 2, err, sizeof err), 0);
    cr_expect(strstr(err, "block 2 is read by sequence 0 while sequence 1 writes it") != NULL,
              "error does not name the block: %s", err);

    free(la);
    free(lb);
    free(wa);
    free(wb);
    free(lng);
    free(oth);
    be_close(&be);
    hfref_close(&r);
}

/* ---- errors -------------------------------------------------------------------------------- */

static void expect_error(struct backend *be, const struct fwd_seq *s, int n, const char *needle)
{
    char err[ERR_LEN] = "";
    int rc = be->ops->forward(be, s, n, err, sizeof err);
    cr_expect_lt(rc, 0, "forward accepted a call that should fail with '%s'", needle);
    cr_expect(strstr(err, needle) != NULL, "error '%s' does not mention '%s'", err, needle);
}

Test(forward, bad_calls_are_errors)
{
    struct hfref r;
    hfref_open(&r, "tiny-llama3-tied");
    const int V = r.cfg->vocab_size;
    struct backend *be = open_be(&r, 32, 2, 8, 0);
    int32_t toks[40] = {1, 2, 3};
    int32_t table[3] = {0, 1, 2};
    float *out = logits_alloc(&r, 1);

    struct fwd_seq s = {.tokens = toks, .n_tokens = 3, .block_table = table, .n_blocks = 3,
                        .output = FWD_LAST, .out = out};
    toks[1] = V;
    expect_error(be, &s, 1, "token 1 is id 128256");
    toks[1] = -5;
    expect_error(be, &s, 1, "token 1 is id -5");
    toks[1] = 2;

    int32_t neg_table[2] = {0, -1};
    s.block_table = neg_table;
    s.n_blocks = 2;
    s.pos = 14; /* positions 14..16 need two blocks */
    expect_error(be, &s, 1, "block_table[1] = -1 is negative");
    int32_t far_table[2] = {0, 8};
    s.block_table = far_table;
    expect_error(be, &s, 1, "block_table[1] = 8");
    /* A table one entry short for positions 14..16: the call fails on its length, naming
     * n_blocks, before reading the entry past it (poisoned: read, it would be reported as
     * outside the pool, as it is once n_blocks claims it). */
    int32_t poisoned[2] = {0, INT32_MAX};
    s.block_table = poisoned;
    s.n_blocks = 1;
    expect_error(be, &s, 1, "positions 0..16 need 2 blocks, n_blocks is 1");
    s.n_blocks = 2;
    expect_error(be, &s, 1, "block_table[1] = 2147483647, outside the KV pool");
    s.block_table = table;
    s.n_blocks = 3;
    s.pos = 0;

    s.n_tokens = 33;
    expect_error(be, &s, 1, "max_batch_tokens 32");
    struct fwd_seq two[3] = {s, s, s};
    two[0].n_tokens = two[1].n_tokens = 20;
    two[1].block_table = table + 1;
    two[1].n_blocks = 2;
    expect_error(be, two, 2, "max_batch_tokens 32");
    two[0].n_tokens = two[1].n_tokens = two[2].n_tokens = 1;
    expect_error(be, two, 3, "max_batch_seqs");
    s.n_tokens = 0;
    expect_error(be, &s, 1, "n_tokens 0");
    s.n_tokens = 3;
    s.pos = -1;
    expect_error(be, &s, 1, "pos -1");
    s.pos = 8 * BACKEND_BLOCK_TOKENS - 1; /* beyond the 8-block pool */
    expect_error(be, &s, 1, "context limit");
    s.pos = 0;
    s.out = NULL;
    expect_error(be, &s, 1, "out is NULL");
    s.out = out;
    two[0] = two[1] = s;
    two[0].n_tokens = two[1].n_tokens = 1;
    expect_error(be, two, 2, "written by sequences 0 and 1");

    char err[ERR_LEN];
    cr_expect_lt(be->ops->copy_block(be, 0, 8, err, sizeof err), 0);
    cr_expect(strstr(err, "0..7") != NULL, "%s", err);
    cr_expect_lt(be->ops->copy_block(be, -1, 0, err, sizeof err), 0);

    /* After all that, a good call still works and matches a fresh backend. */
    fwd_ok(be, &s, 1);
    struct backend *fresh = open_be(&r, 32, 2, 8, 0);
    float *want = run_alone(&r, fresh, toks, 3, FWD_LAST);
    cr_expect(memcmp(out, want, (size_t)V * sizeof(float)) == 0);
    free(want);
    be_close(&fresh);
    free(out);
    be_close(&be);
    hfref_close(&r);
}

Test(forward, bad_params_are_errors)
{
    struct hfref r;
    hfref_open(&r, "tiny-llama3-tied");
    struct backend *be = NULL;
    char err[ERR_LEN];
    struct backend_params p = {.n_kv_blocks = 4, .max_batch_tokens = 0, .max_batch_seqs = 1};
    cr_expect_lt(backend_cpu_open(r.ck, &p, &be, err, sizeof err), 0);
    cr_expect(strstr(err, "max_batch_tokens") != NULL, "%s", err);
    p = (struct backend_params){.max_batch_tokens = 8, .max_batch_seqs = 1};
    cr_expect_lt(backend_cpu_open(r.ck, &p, &be, err, sizeof err), 0);
    cr_expect(strstr(err, "KV pool") != NULL, "%s", err);
    p = (struct backend_params){.kv_tokens = 17, .max_batch_tokens = 8, .max_batch_seqs = 1,
                                .n_threads = 1};
    cr_assert_eq(backend_cpu_open(r.ck, &p, &be, err, sizeof err), 0, "%s", err);
    cr_expect_eq(be->n_kv_blocks, 2, "kv_tokens 17 rounds up to 2 blocks");
    be_close(&be);
    /* A pool larger than the machine's memory is an error naming it, not an abort or a
     * lazily overcommitted mapping that gets the process killed later. */
    p = (struct backend_params){.n_kv_blocks = INT32_MAX / 4, .max_batch_tokens = 8,
                                .max_batch_seqs = 1};
    cr_expect_lt(backend_cpu_open(r.ck, &p, &be, err, sizeof err), 0);
    cr_expect(strstr(err, "KV pool of 536870911 blocks needs") != NULL, "%s", err);
    cr_expect_null(be);
    setenv("ITS_CPU_ISA", "sse9", 1);
    p.n_kv_blocks = 4;
    cr_expect_lt(backend_cpu_open(r.ck, &p, &be, err, sizeof err), 0);
    cr_expect(strstr(err, "ITS_CPU_ISA") != NULL, "%s", err);
    unsetenv("ITS_CPU_ISA");
    hfref_close(&r);
}

/* ---- every instruction set ----------------------------------------------------------------- */

/* The portable and AVX2 paths (and AVX-512 where present) each match the reference; chunked
 * runs match one-call runs bitwise within each path. */
Test(forward, every_isa_matches_hf)
{
    struct hfref r;
    hfref_open(&r, "tiny-llama31");
    json_t *cs = json_array_get(hfref_cases(&r, "prefill"), 3);
    const int V = r.cfg->vocab_size;
    int n;
    int32_t *ids = hfref_ids(json_object_get(cs, "input_ids"), &n);
    static const enum cpu_isa isas[] = {CPU_ISA_GENERIC, CPU_ISA_AVX2, CPU_ISA_AVX512};
    for (int i = 0; i < 3; i++) {
        if (!cpu_isa_supported(isas[i]))
            continue;
        setenv("ITS_CPU_ISA", cpu_isa_name(isas[i]), 1);
        struct backend *be = open_be(&r, 64, 2, 16, 0);
        cr_assert_str_eq(backend_cpu_isa(be), cpu_isa_name(isas[i]));
        float *whole = run_alone(&r, be, ids, n, FWD_LAST);
        char what[64];
        snprintf(what, sizeof what, "isa %s", cpu_isa_name(isas[i]));
        hfref_expect_close(whole, hfref_last_logits(&r, cs), V, REL_TOL, what);

        int32_t table[4] = {8, 9, 10, 11};
        float *out = logits_alloc(&r, 1);
        struct fwd_seq s = {.tokens = ids, .n_tokens = n - 5, .block_table = table,
                            .n_blocks = 4, .output = FWD_NONE};
        fwd_ok(be, &s, 1);
        s = (struct fwd_seq){.tokens = ids + n - 5, .n_tokens = 5, .pos = n - 5,
                             .block_table = table, .n_blocks = 4, .output = FWD_LAST,
                             .out = out};
        fwd_ok(be, &s, 1);
        cr_expect(memcmp(out, whole, (size_t)V * sizeof(float)) == 0, "%s: chunked differs",
                  what);
        free(out);
        free(whole);
        be_close(&be);
    }
    unsetenv("ITS_CPU_ISA");
    free(ids);
    hfref_close(&r);
}

/* f32 and f16 checkpoints run through the same forward pass as bf16 ones: finite logits, and
 * batch invariance holds for every storage type. */
Test(forward, random_weights_every_dtype)
{
    struct model_config c;
    cr_assert_eq(model_shape_by_name("llama-3.2-1b", &c), 0);
    c.vocab_size = 512;
    c.dim = 96;
    c.ffn_dim = 200;
    c.n_layers = 2;
    c.n_heads = 6;
    c.n_kv_heads = 2;
    c.head_dim = 16;
    c.bos_id = 1;
    c.n_eos = 1;
    c.eos_ids[0] = 2;
    static const enum dtype dts[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16};
    for (int d = 0; d < 3; d++) {
        struct checkpoint *ck = NULL;
        char err[ERR_LEN];
        cr_assert_eq(checkpoint_new_random(&c, dts[d], 7, &ck, err, sizeof err), 0, "%s", err);
        struct backend_params p = {.n_kv_blocks = 8, .max_batch_tokens = 64, .max_batch_seqs = 2};
        struct backend *be = NULL;
        cr_assert_eq(backend_cpu_open(ck, &p, &be, err, sizeof err), 0, "%s", err);
        int32_t toks[40];
        for (int i = 0; i < 40; i++)
            toks[i] = (int32_t)((i * 37 + 11) % c.vocab_size);
        int32_t ta[] = {0, 1, 2}, tb[] = {4, 5};
        float alone[512], a2[512], b2[512];
        struct fwd_seq s = {.tokens = toks, .n_tokens = 33, .block_table = ta, .n_blocks = 3,
                            .output = FWD_LAST, .out = alone};
        fwd_ok(be, &s, 1);
        struct fwd_seq two[2] = {
            {.tokens = toks + 7, .n_tokens = 20, .block_table = tb, .n_blocks = 2,
             .output = FWD_LAST, .out = b2},
            {.tokens = toks, .n_tokens = 33, .block_table = ta, .n_blocks = 3,
             .output = FWD_LAST, .out = a2},
        };
        fwd_ok(be, two, 2);
        int finite = 1;
        for (int i = 0; i < c.vocab_size; i++)
            finite &= isfinite(alone[i]) && isfinite(b2[i]);
        cr_expect(finite, "%s: non-finite logits", dtype_name(dts[d]));
        cr_expect(hfref_max_abs(alone, c.vocab_size) > 0, "%s: all-zero logits",
                  dtype_name(dts[d]));
        cr_expect(memcmp(alone, a2, sizeof alone) == 0, "%s: batched differs from alone",
                  dtype_name(dts[d]));
        be->ops->destroy(be);
        checkpoint_destroy(&ck);
    }
}

/* ---- kernels ------------------------------------------------------------------------------- */

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Weights that bf16, f16 and f32 all hold exactly (8 significant bits, small exponent), so the
 * three storage types must give the same bits. Shapes have k and n tails on purpose. */
Test(cpu_kernels, matmul_invariant_and_exact_across_dtypes)
{
    enum { K = 100, N = 37, M = 9 };
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    static float x[M * K], wf[N * K], want[M][N];
    static uint16_t wb[N * K], wh[N * K];
    for (int i = 0; i < M * K; i++)
        x[i] = (float)((int)(rng_next(&seed) % 2001) - 1000) / 377.0f;
    for (int i = 0; i < N * K; i++) {
        int v = (int)(rng_next(&seed) % 255) - 127; /* v / 64: exact in all three types */
        wf[i] = (float)v / 64.0f;
        uint32_t bits;
        memcpy(&bits, &wf[i], sizeof bits);
        wb[i] = (uint16_t)(bits >> 16);
        /* f16: sign, exponent (bias 15), 10-bit mantissa */
        int a = v < 0 ? -v : v;
        uint16_t h = 0;
        if (a) {
            int e = 0;
            while ((a >> e) > 1)
                e++;
            h = (uint16_t)(((e - 6 + 15) << 10) | (((a << 10) >> e) & 0x3ff));
        }
        wh[i] = (uint16_t)(h | (v < 0 ? 0x8000 : 0));
        cr_assert_eq(cpu_f16_to_f32(wh[i]), wf[i], "f16 encoding of %d/64", v);
        cr_assert_eq(cpu_bf16_to_f32(wb[i]), wf[i]);
    }
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0;
            for (int k = 0; k < K; k++)
                s += (double)x[i * K + k] * wf[j * K + k];
            want[i][j] = (float)s;
        }

    static const enum cpu_isa isas[] = {CPU_ISA_GENERIC, CPU_ISA_AVX2, CPU_ISA_AVX512};
    const void *ws[3] = {wf, wb, wh};
    const enum dtype dts[3] = {DTYPE_F32, DTYPE_BF16, DTYPE_F16};
    for (int ii = 0; ii < 3; ii++) {
        if (!cpu_isa_supported(isas[ii]))
            continue;
        enum cpu_isa isa = isas[ii];
        float ref1[M][N]; /* each row computed alone (m = 1, all columns at once, f32) */
        for (int i = 0; i < M; i++) {
            float *yr[1] = {ref1[i]};
            struct cpu_mm mm = {.x = x + i * K, .ldx = K, .m = 1, .w = wf, .wtype = DTYPE_F32,
                                .k = K, .n = N, .y = yr};
            cpu_mm_cols(isa, &mm, 0, N);
            for (int j = 0; j < N; j++)
                cr_expect(fabsf(ref1[i][j] - want[i][j]) <= 1e-5f * (1 + fabsf(want[i][j])),
                          "%s: (%d,%d) = %g, exact %g", cpu_isa_name(isa), i, j,
                          (double)ref1[i][j], (double)want[i][j]);
        }
        for (int d = 0; d < 3; d++) {
            for (int m = 1; m <= M; m++) {
                for (int split = 1; split <= 5; split += 2) {
                    float y[M][N];
                    float *yr[M];
                    memset(y, 0xff, sizeof y);
                    for (int i = 0; i < m; i++)
                        yr[i] = y[i];
                    /* rows M-m..M-1, so a row is in a different tile slot for each m */
                    struct cpu_mm mm = {.x = x + (M - m) * K, .ldx = K, .m = m, .w = ws[d],
                                        .wtype = dts[d], .k = K, .n = N, .y = yr};
                    for (int s = 0; s < split; s++)
                        cpu_mm_cols(isa, &mm, N * s / split, N * (s + 1) / split);
                    for (int i = 0; i < m; i++)
                        cr_expect(memcmp(y[i], ref1[M - m + i], sizeof y[i]) == 0,
                                  "%s %s: row %d of a %d-row batch (%d column pieces) differs "
                                  "from the row alone",
                                  cpu_isa_name(isa), dtype_name(dts[d]), M - m + i, m, split);
                }
            }
        }
        /* accumulate adds the rounded dot to what is there */
        float y0[N], *yr[1] = {y0};
        for (int j = 0; j < N; j++)
            y0[j] = 0.5f;
        struct cpu_mm mm = {.x = x, .ldx = K, .m = 1, .w = wb, .wtype = DTYPE_BF16, .k = K,
                            .n = N, .y = yr, .accumulate = 1};
        cpu_mm_cols(isa, &mm, 0, N);
        for (int j = 0; j < N; j++)
            cr_expect_eq(y0[j], 0.5f + ref1[0][j]);
    }
}

Test(cpu_kernels, dot_and_axpy)
{
    static const enum cpu_isa isas[] = {CPU_ISA_GENERIC, CPU_ISA_AVX2, CPU_ISA_AVX512};
    float a[37], b[37], y[37];
    for (int i = 0; i < 37; i++) {
        a[i] = (float)(i % 7) - 3.0f;
        b[i] = (float)(i % 5) * 0.5f;
    }
    for (int ii = 0; ii < 3; ii++) {
        if (!cpu_isa_supported(isas[ii]))
            continue;
        for (int n = 0; n <= 37; n++) {
            double s = 0;
            for (int i = 0; i < n; i++)
                s += (double)a[i] * b[i];
            cr_expect_eq(cpu_dot(isas[ii], a, b, n), (float)s, "%s dot n=%d",
                         cpu_isa_name(isas[ii]), n);
            for (int i = 0; i < 37; i++)
                y[i] = 1.0f;
            cpu_axpy(isas[ii], 2.0f, a, y, n);
            for (int i = 0; i < 37; i++)
                cr_expect_eq(y[i], i < n ? 1.0f + 2.0f * a[i] : 1.0f, "%s axpy n=%d i=%d",
                             cpu_isa_name(isas[ii]), n, i);
        }
    }
}

/* ---- bench and roofline -------------------------------------------------------------------- */

Test(cpu_bench, roofline_measures_bandwidth)
{
    double gb_s = 0;
    char err[ERR_LEN];
    cr_assert_eq(roofline_read_bandwidth(0, 64u << 20, 2, &gb_s, err, sizeof err), 0, "%s", err);
    cr_expect(gb_s > 0.1 && gb_s < 10000, "bandwidth %g GB/s", gb_s);
    cr_expect_lt(roofline_read_bandwidth(0, 0, 1, &gb_s, err, sizeof err), 0);

    struct model_config c;
    cr_assert_eq(model_shape_by_name("llama-3.2-1b", &c), 0);
    double bytes = roofline_decode_bytes(&c, DTYPE_BF16);
    /* 1.236 B parameters, the tied embedding read once as lm_head: about 2.47 GB in bf16 */
    cr_expect(bytes > 2.3e9 && bytes < 2.6e9, "llama-3.2-1b decode bytes %g", bytes);
}

Test(cpu_bench, small_shape_runs)
{
    struct model_config c;
    cr_assert_eq(model_shape_by_name("llama-3.2-1b", &c), 0);
    /* the real shape's structure, shrunk so the test takes milliseconds */
    c.vocab_size = 1000;
    c.dim = 128;
    c.ffn_dim = 256;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 32;
    c.bos_id = 1;
    c.n_eos = 1;
    c.eos_ids[0] = 2;
    struct bench_params p = {.dtype = DTYPE_BF16, .prefill_tokens = 32, .decode_steps = 4,
                             .decode_batch = 4, .roofline_bytes = 32u << 20,
                             .roofline_passes = 1};
    struct bench_result res;
    char err[ERR_LEN];
    cr_assert_eq(bench_run_config(&c, "tiny", &p, &res, err, sizeof err), 0, "%s", err);
    cr_expect_gt(res.prefill_tok_s, 0);
    cr_expect_gt(res.decode_b1_tok_s, 0);
    cr_expect_gt(res.decode_batch_tok_s, 0);
    cr_expect_gt(res.bandwidth_gb_s, 0);
    cr_expect_gt(res.roofline_b1_tok_s, 0);
    cr_expect(fabs(res.roofline_ratio - res.decode_b1_tok_s / res.roofline_b1_tok_s) < 1e-9);
    cr_expect_eq(res.weight_bytes_per_step, roofline_decode_bytes(&c, DTYPE_BF16));
    cr_expect_str_eq(res.shape, "tiny");

    p.shape = "no-such-model";
    cr_expect_lt(bench_run(&p, &res, err, sizeof err), 0);
    cr_expect(strstr(err, "no-such-model") != NULL, "%s", err);
}
