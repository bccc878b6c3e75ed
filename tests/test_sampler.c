/* test_sampler.c — the next-token sampler and its counter-based uniform: greedy, temperature,
 * top-k, top-p against brute-force references (frequencies, and the exact token the
 * definition in sampler.h picks for a given draw), determinism of (seed, stream, step), the
 * statistics of draw_uniform, and parameter errors that name the field.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "draw.h"
#include "sampler.h"

static struct sampler *ts_new(int n_vocab)
{
    char err[256] = "";
    struct sampler *s = NULL;
    cr_assert_eq(sampler_new(n_vocab, &s, err, sizeof err), 0, "%s", err);
    return s;
}

/* Gaussian-ish logits of spread `scale` (stream 999 of draw.h, which no test draws with). */
static void ts_fill_logits(float *l, int n, uint64_t seed, float scale)
{
    for (int i = 0; i < n; i++) {
        double a = draw_uniform(seed, 999, 3 * (uint64_t)i),
               b = draw_uniform(seed, 999, 3 * (uint64_t)i + 1),
               c = draw_uniform(seed, 999, 3 * (uint64_t)i + 2);
        l[i] = (float)((a + b + c - 1.5) * 2.0) * scale;
    }
}

/* Draws with key (seed, stream, step) and advances the key's step, as the engine does. */
static int32_t ts_draw(struct sampler *s, const float *l, float t, float top_p, int top_k,
                       struct sampler_key *key)
{
    struct sampler_params p = {.temperature = t, .top_p = top_p, .top_k = top_k};
    char err[256] = "";
    int32_t tok = -1;
    cr_assert_eq(sampler_sample(s, l, &p, key, &tok, err, sizeof err), 0, "%s", err);
    key->step++;
    return tok;
}

Test(sampler, argmax_is_first_max_and_skips_nan)
{
    float l[6] = {1.0f, NAN, 3.0f, -2.0f, 3.0f, 0.5f};
    cr_assert_eq(sampler_argmax(l, 6), 2);
    float all_nan[3] = {NAN, NAN, NAN};
    cr_assert_eq(sampler_argmax(all_nan, 3), -1);
}

Test(sampler, greedy_is_argmax_whatever_the_key)
{
    enum { V = 128256 };
    float *l = malloc(V * sizeof *l);
    struct sampler *s = ts_new(V);
    for (uint64_t seed = 1; seed <= 5; seed++) {
        ts_fill_logits(l, V, seed, 3.0f);
        int32_t want = 0;
        for (int i = 1; i < V; i++)
            if (l[i] > l[want])
                want = i;
        struct sampler_key r = {.seed = seed};
        for (int k = 0; k < 4; k++) {
            r.stream = (uint64_t)k;
            cr_assert_eq(ts_draw(s, l, 0.0f, 1.0f, 0, &r), want);
        }
        /* top_k = 1 and a tiny top_p are greedy too, at any temperature */
        cr_assert_eq(ts_draw(s, l, 1.5f, 1.0f, 1, &r), want);
        for (int k = 0; k < 20; k++)
            cr_assert_eq(ts_draw(s, l, 1.0f, 1e-6f, 0, &r), want, "top_p tiny, draw %d", k);
    }
    sampler_destroy(&s);
    cr_assert_null(s);
    free(l);
}

/* Draws N tokens from a small vocabulary and checks every frequency against `want` within
 * five standard deviations (a false alarm is about one in a million per token). */
static void ts_check_freq(const float *l, int n, float t, float top_p, int top_k,
                          const double *want)
{
    enum { N = 200000 };
    struct sampler *s = ts_new(n);
    struct sampler_key r = {.seed = 1234};
    int count[16] = {0};
    for (int i = 0; i < N; i++) {
        int32_t tok = ts_draw(s, l, t, top_p, top_k, &r);
        cr_assert(tok >= 0 && tok < n);
        count[tok]++;
    }
    for (int i = 0; i < n; i++) {
        double f = (double)count[i] / N;
        double sd = sqrt(want[i] * (1 - want[i]) / N);
        if (want[i] == 0)
            cr_assert_eq(count[i], 0, "token %d was filtered out but drawn %d times", i, count[i]);
        else
            cr_assert(fabs(f - want[i]) <= 5 * sd + 1e-9, "token %d: frequency %.5f, want %.5f",
                      i, f, want[i]);
    }
    sampler_destroy(&s);
}

Test(sampler, frequencies_follow_softmax_of_logits_over_temperature)
{
    const float l[6] = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f, 0.0f};
    const float t = 0.7f;
    double want[6], z = 0;
    for (int i = 0; i < 6; i++)
        z += want[i] = exp((double)l[i] / t);
    for (int i = 0; i < 6; i++)
        want[i] /= z;
    ts_check_freq(l, 6, t, 1.0f, 0, want);
}

Test(sampler, top_k_keeps_the_k_largest_renormalised)
{
    const float l[6] = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f, 0.0f};
    double want[6] = {0}, z = 0;
    const int keep[3] = {1, 4, 0}; /* the three largest logits */
    for (int i = 0; i < 3; i++)
        z += want[keep[i]] = exp((double)l[keep[i]]);
    for (int i = 0; i < 6; i++)
        want[i] /= z;
    ts_check_freq(l, 6, 1.0f, 1.0f, 3, want);
}

Test(sampler, top_k_keeps_ties_at_the_edge)
{
    /* torch.topk's threshold keeps every logit equal to the k-th largest */
    const float l[5] = {3.0f, 2.0f, 2.0f, 2.0f, 1.0f};
    double want[5] = {0}, z = 0;
    for (int i = 0; i < 4; i++)
        z += want[i] = exp((double)l[i]);
    for (int i = 0; i < 5; i++)
        want[i] /= z;
    ts_check_freq(l, 5, 1.0f, 1.0f, 2, want);
}

Test(sampler, top_p_keeps_the_smallest_set_reaching_the_mass)
{
    /* probabilities 0.5, 0.3, 0.15, 0.05 (shuffled): with top_p 0.85 the nucleus is the
     * first three (0.5 + 0.3 < 0.85 <= 0.95), renormalised over 0.95 */
    const float l[4] = {logf(0.15f), logf(0.5f), logf(0.05f), logf(0.3f)};
    const double want[4] = {0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95};
    ts_check_freq(l, 4, 1.0f, 0.85f, 0, want);
    /* with top_p 0.45 the top token's mass alone reaches it: greedy */
    const double want_top[4] = {0, 1, 0, 0};
    ts_check_freq(l, 4, 1.0f, 0.45f, 0, want_top);
}

Test(sampler, top_k_then_top_p_on_the_renormalised_rest)
{
    /* top_k 3 leaves 0.5, 0.3, 0.15 -> 0.526, 0.316, 0.158; top_p 0.8 then keeps two */
    const float l[4] = {logf(0.15f), logf(0.5f), logf(0.05f), logf(0.3f)};
    const double want[4] = {0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8};
    ts_check_freq(l, 4, 1.0f, 0.8f, 3, want);
}

static int ts_cmp_desc(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* Draws over a full 128,256-entry vocabulary must stay inside the brute-force top-p and top-k
 * sets (edges found by sorting everything). `want_small` says which top-p path the logits are
 * meant to take: a nucleus of at most 64 tokens (the probe) or a larger one (the histogram). */
static void ts_full_vocab(float scale, float top_p, int want_small)
{
    enum { V = 128256, DRAWS = 300 };
    float *l = malloc(V * sizeof *l);
    float *sorted = malloc(V * sizeof *sorted);
    ts_fill_logits(l, V, 77, scale);
    memcpy(sorted, l, V * sizeof *l);
    qsort(sorted, V, sizeof *sorted, ts_cmp_desc);
    const float t = 0.8f;
    const int top_k = 50;
    double z = 0;
    for (int i = 0; i < V; i++)
        z += exp((double)(sorted[i] - sorted[0]) / t);
    double acc = 0;
    float nucleus_edge = sorted[0];
    int nucleus_n = 0;
    for (int i = 0; i < V && acc < top_p * z; i++) {
        acc += exp((double)(sorted[i] - sorted[0]) / t);
        nucleus_edge = sorted[i];
        nucleus_n++;
    }
    if (want_small)
        cr_assert(nucleus_n > 1 && nucleus_n <= 64, "nucleus of %d: not the probe path",
                  nucleus_n);
    else
        cr_assert(nucleus_n > 64 && nucleus_n < V / 2, "nucleus of %d: not the histogram path",
                  nucleus_n);
    float k_edge = sorted[top_k - 1];

    struct sampler *s = ts_new(V);
    struct sampler_key r = {.seed = 5};
    int non_argmax = 0, below_k_edge = 0;
    for (int i = 0; i < DRAWS; i++) {
        int32_t a = ts_draw(s, l, t, top_p, 0, &r);
        cr_assert(l[a] >= nucleus_edge, "top_p draw %d: logit %f below the edge %f", i, l[a],
                  nucleus_edge);
        int32_t b = ts_draw(s, l, t, 1.0f, top_k, &r);
        cr_assert(l[b] >= k_edge, "top_k draw %d: logit %f below the edge %f", i, l[b], k_edge);
        non_argmax += l[a] < sorted[0];
        below_k_edge += ts_draw(s, l, t, 1.0f, 0, &r) < 0; /* plain temperature: in range */
    }
    cr_assert_eq(below_k_edge, 0);
    cr_assert(non_argmax > 0, "top_p never drew anything but the argmax");
    sampler_destroy(&s);
    free(sorted);
    free(l);
}

Test(sampler, full_vocabulary_top_p_small_nucleus)
{
    ts_full_vocab(12.0f, 0.6f, 1);
}

Test(sampler, full_vocabulary_top_p_large_nucleus)
{
    ts_full_vocab(2.0f, 0.8f, 0);
}

Test(sampler, full_vocabulary_frequencies_follow_softmax)
{
    /* three strong tokens over a flat tail of 128,253: their frequencies, and the tail's,
     * must match softmax(l / T) computed in double */
    enum { V = 128256, N = 8000 };
    float *l = malloc(V * sizeof *l);
    ts_fill_logits(l, V, 8, 0.5f);
    const int strong[3] = {17, 64000, 128255};
    const float sv[3] = {12.0f, 11.0f, 10.5f};
    for (int i = 0; i < 3; i++)
        l[strong[i]] = sv[i];
    const float t = 1.0f;
    double z = 0, want[4] = {0};
    for (int i = 0; i < V; i++)
        z += exp((double)l[i] / t);
    for (int i = 0; i < 3; i++)
        want[i] = exp((double)sv[i] / t) / z;
    want[3] = 1 - want[0] - want[1] - want[2];
    cr_assert(want[3] > 0.2 && want[3] < 0.8, "tail mass %f: the test lost its point", want[3]);
    struct sampler *s = ts_new(V);
    struct sampler_key r = {.seed = 11};
    int count[4] = {0};
    for (int i = 0; i < N; i++) {
        int32_t tok = ts_draw(s, l, t, 1.0f, 0, &r);
        int g = 3;
        for (int k = 0; k < 3; k++)
            if (tok == strong[k])
                g = k;
        count[g]++;
    }
    for (int g = 0; g < 4; g++) {
        double f = (double)count[g] / N, sd = sqrt(want[g] * (1 - want[g]) / N);
        cr_assert(fabs(f - want[g]) <= 5 * sd, "group %d: frequency %.4f, want %.4f", g, f,
                  want[g]);
    }
    sampler_destroy(&s);
    free(l);
}

Test(sampler, same_seed_and_stream_give_the_same_tokens)
{
    enum { V = 1000, N = 64 };
    float l[V];
    ts_fill_logits(l, V, 3, 2.0f);
    struct sampler *s = ts_new(V);
    int32_t a[N], b[N], c[N];
    struct sampler_key ra = {.seed = 42, .stream = 3}, rb = ra, rc = {.seed = 42, .stream = 4};
    for (int i = 0; i < N; i++) {
        a[i] = ts_draw(s, l, 1.0f, 0.95f, 40, &ra);
        c[i] = ts_draw(s, l, 1.0f, 0.95f, 40, &rc);
    }
    for (int i = 0; i < N; i++)
        b[i] = ts_draw(s, l, 1.0f, 0.95f, 40, &rb);
    cr_assert_arr_eq(a, b, sizeof a);
    cr_assert(memcmp(a, c, sizeof a) != 0, "another stream of the same seed repeated the tokens");
    sampler_destroy(&s);
}

/* ---------------------------------------------------------------------------------------- */
/* draw_uniform                                                                              */

Test(draw, uniform_has_the_mean_variance_and_spread_of_u01)
{
    enum { N = 1000000, BINS = 16 };
    double sum = 0, sum2 = 0, prev = -1;
    int count[BINS] = {0};
    for (int i = 0; i < N; i++) {
        double u = draw_uniform(7, 0, (uint64_t)i);
        cr_assert(u >= 0 && u < 1, "draw %d: %.17g", i, u);
        cr_assert(u != prev, "draws %d and %d are equal", i - 1, i);
        cr_assert_eq(u, ldexp(floor(ldexp(u, 53)), -53), "draw %d is not a multiple of 2^-53", i);
        prev = u;
        sum += u;
        sum2 += (u - 0.5) * (u - 0.5);
        count[(int)(u * BINS)]++;
    }
    /* five standard deviations: var(mean) = 1/12N, var((u - 1/2)^2) = 1/80 - 1/144 */
    double mean = sum / N, var = sum2 / N;
    cr_assert(fabs(mean - 0.5) < 5 * sqrt(1.0 / 12 / N), "mean %.6f", mean);
    cr_assert(fabs(var - 1.0 / 12) < 5 * sqrt((1.0 / 80 - 1.0 / 144) / N), "variance %.6f", var);
    double want = (double)N / BINS, sd = sqrt(want * (1 - 1.0 / BINS));
    for (int b = 0; b < BINS; b++)
        cr_assert(fabs(count[b] - want) < 5 * sd, "bin %d holds %d of %d", b, count[b], N);
}

/* Pearson correlation of two sequences of n uniforms. */
static double ts_corr(const double *a, const double *b, int n)
{
    double ma = 0, mb = 0;
    for (int i = 0; i < n; i++) {
        ma += a[i];
        mb += b[i];
    }
    ma /= n;
    mb /= n;
    double sab = 0, saa = 0, sbb = 0;
    for (int i = 0; i < n; i++) {
        sab += (a[i] - ma) * (b[i] - mb);
        saa += (a[i] - ma) * (a[i] - ma);
        sbb += (b[i] - mb) * (b[i] - mb);
    }
    return sab / sqrt(saa * sbb);
}

Test(draw, neighbouring_streams_seeds_and_steps_are_uncorrelated)
{
    enum { N = 200000 };
    double *base = malloc(N * sizeof *base), *other = malloc(N * sizeof *other);
    for (int i = 0; i < N; i++)
        base[i] = draw_uniform(42, 3, (uint64_t)i);
    /* the neighbours a careless mix would correlate with (seed, stream, step) */
    const struct {
        int64_t dseed, dstream, dstep;
        const char *what;
    } nb[] = {{0, 1, 0, "next stream"},        {1, 0, 0, "next seed"},
              {0, 0, 1, "next step"},          {1, -1, 0, "seed + 1, stream - 1"},
              {0, 1, -1, "stream + 1, step - 1"}, {-39, 39, 0, "seed and stream swapped"}};
    double bound = 5 / sqrt((double)N);
    for (size_t k = 0; k < sizeof nb / sizeof nb[0]; k++) {
        for (int i = 0; i < N; i++)
            other[i] = draw_uniform((uint64_t)(42 + nb[k].dseed), (uint64_t)(3 + nb[k].dstream),
                                    (uint64_t)(i + 1 + nb[k].dstep));
        /* the step shift is applied on top of i + 1, so "next step" is a lag of 2 */
        double r = ts_corr(base, other, N);
        cr_assert(fabs(r) < bound, "%s: correlation %.5f (bound %.5f)", nb[k].what, r, bound);
        int same = 0;
        for (int i = 0; i < N; i++)
            same += base[i] == other[i];
        cr_assert(same <= 1, "%s: %d equal values", nb[k].what, same);
    }
    /* a lag of one step within the stream */
    double r = ts_corr(base, base + 1, N - 1);
    cr_assert(fabs(r) < bound, "lag 1: correlation %.5f", r);
    free(base);
    free(other);
}

Test(draw, distinct_triples_give_distinct_bits_and_a_triple_always_the_same)
{
    enum { S = 40 };
    uint64_t *v = malloc((size_t)S * S * S * sizeof *v);
    int n = 0;
    for (uint64_t a = 0; a < S; a++)
        for (uint64_t b = 0; b < S; b++)
            for (uint64_t c = 0; c < S; c++) {
                v[n++] = draw_bits(a, b, c);
                cr_assert_eq(draw_bits(a, b, c), v[n - 1]);
            }
    for (int i = 0; i < n; i++) /* a 64-bit collision among 64,000 would be a broken mix */
        for (int j = i + 1; j < n; j++)
            if (v[i] == v[j])
                cr_assert_fail("triples %d and %d give the same bits", i, j);
    free(v);
}

/* ---------------------------------------------------------------------------------------- */
/* the exact token                                                                           */

struct ts_pv {
    float p;
    int32_t id;
};

static int ts_cmp_pv(const void *a, const void *b)
{
    const struct ts_pv *x = a, *y = b;
    if (x->p != y->p)
        return x->p > y->p ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static int ts_cmp_float_desc(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* sampler.h's definition by brute force (sort everything, walk in order). *margin gets how
 * close, relative to the mass involved, a cumulative sum that decided the answer came to its
 * target: where it is within rounding, summation order may decide either way. */
static int32_t ts_reference(const float *l, int n, const struct sampler_params *sp, double u,
                            double *margin)
{
    float m = -INFINITY;
    for (int i = 0; i < n; i++)
        m = l[i] > m ? l[i] : m;
    cr_assert(isfinite(m));
    float thr = -INFINITY;
    if (sp->top_k > 0) {
        float *f = malloc((size_t)n * sizeof *f);
        int nf = 0;
        for (int i = 0; i < n; i++)
            if (isfinite(l[i]))
                f[nf++] = l[i];
        qsort(f, (size_t)nf, sizeof *f, ts_cmp_float_desc);
        if (nf >= sp->top_k)
            thr = f[sp->top_k - 1];
        free(f);
    }
    float inv_t = 1.0f / sp->temperature;
    struct ts_pv *c = malloc((size_t)n * sizeof *c);
    int nc = 0;
    for (int i = 0; i < n; i++)
        if (sp->top_k == 0 || (l[i] >= thr && l[i] > -INFINITY))
            c[nc++] = (struct ts_pv){draw_prob(l[i], m, inv_t), i};
    qsort(c, (size_t)nc, sizeof *c, ts_cmp_pv);
    double total = 0;
    for (int i = 0; i < nc; i++)
        total += c[i].p;
    *margin = INFINITY;
    if (sp->top_p < 1) {
        double target = (double)sp->top_p * total, acc = 0;
        for (int i = 0; i < nc; i++) {
            double before = acc;
            acc += c[i].p;
            if (acc >= target) {
                *margin = fmin(fabs(acc - target), fabs(before - target)) / total;
                nc = i + 1;
                break;
            }
        }
    }
    double kept = 0;
    for (int i = 0; i < nc; i++)
        kept += c[i].p;
    double target = u * kept, acc = 0;
    int32_t tok = -1;
    for (int i = 0; i < nc; i++) {
        double before = acc;
        acc += c[i].p;
        if (acc > target) {
            *margin = fmin(*margin, fmin(fabs(acc - target), fabs(before - target)) / kept);
            tok = c[i].id;
            break;
        }
    }
    if (tok < 0) { /* rounding: the last token with mass */
        *margin = 0;
        for (int i = nc - 1; i >= 0 && tok < 0; i--)
            if (c[i].p > 0)
                tok = c[i].id;
    }
    free(c);
    return tok;
}

/* Random rows, some with ties (logits on a grid), NaN and -inf entries, under many parameter
 * sets: the sampler must pick exactly the reference's token, except where the deciding sum
 * lies within rounding of its target. */
static void ts_exact(int n, int rows, uint64_t seed)
{
    static const float temps[] = {0.5f, 0.8f, 1.0f, 1.7f};
    static const float top_ps[] = {1.0f, 0.95f, 0.9f, 0.5f, 0.2f};
    const int top_ks[] = {0, 0, 2, 5, 50, n + 3};
    float *l = malloc((size_t)n * sizeof *l);
    struct sampler *s = ts_new(n);
    int mismatches = 0;
    for (int r = 0; r < rows; r++) {
        uint64_t rs = seed * 1000003 + (uint64_t)r;
        float scale = (float)(0.3 + 8 * draw_uniform(rs, 1001, 0));
        ts_fill_logits(l, n, rs, scale);
        int kind = r % 4;
        for (int i = 0; i < n; i++) {
            if (kind == 1) /* a grid: ties everywhere, at every edge */
                l[i] = roundf(l[i] * 2.0f) * 0.5f;
            if (kind == 2 && draw_uniform(rs, 1002, (uint64_t)i) < 0.05)
                l[i] = draw_uniform(rs, 1003, (uint64_t)i) < 0.5 ? NAN : -INFINITY;
        }
        struct sampler_params sp = {.temperature = temps[r % 4],
                                    .top_p = top_ps[(r / 4) % 5],
                                    .top_k = top_ks[(r / 20) % 6]};
        if (sp.top_k == 1)
            sp.top_k = 2;
        struct sampler_key key = {.seed = seed, .stream = (uint64_t)r % 7, .step = (uint64_t)r};
        double margin;
        int32_t want = ts_reference(l, n, &sp, draw_uniform(key.seed, key.stream, key.step),
                                    &margin);
        int32_t got = ts_draw(s, l, sp.temperature, sp.top_p, sp.top_k, &key);
        if (got != want) {
            mismatches++;
            cr_assert(margin < 1e-9, "n %d row %d (T %g, top_p %g, top_k %d): token %d, the "
                      "definition gives %d (margin %.3g)", n, r, (double)sp.temperature,
                      (double)sp.top_p, sp.top_k, got, want, margin);
        }
    }
    cr_assert(mismatches <= rows / 1000, "%d of %d rows differ (all at rounding boundaries)",
              mismatches, rows);
    sampler_destroy(&s);
    free(l);
}

Test(sampler, draws_pick_exactly_the_token_the_definition_names)
{
    ts_exact(7, 600, 1);
    ts_exact(100, 1200, 2);
    ts_exact(1000, 1200, 3);
    ts_exact(5003, 480, 4);
}

Test(sampler, draws_pick_exactly_the_token_the_definition_names_full_vocabulary)
{
    ts_exact(128256, 120, 5);
}

Test(sampler, a_small_uniform_picks_the_most_probable_token)
{
    /* u near 0 lands on the first token of the order; the top-p edge ties go to lower ids */
    enum { V = 9 };
    const float l[V] = {1.0f, 3.0f, 2.0f, 3.0f, 0.5f, 2.0f, NAN, -INFINITY, 2.0f};
    struct sampler *s = ts_new(V);
    int seen_low = 0;
    for (uint64_t step = 0; step < 20000; step++) {
        double u = draw_uniform(9, 0, step);
        struct sampler_key key = {.seed = 9, .stream = 0, .step = step};
        int32_t tok = ts_draw(s, l, 1.0f, 1.0f, 0, &key);
        if (u < 0.05) { /* p(1) = p(3) = the largest: id 1 comes first */
            cr_assert_eq(tok, 1, "u %.4f", u);
            seen_low++;
        }
        cr_assert(tok != 6 && tok != 7, "drew a NaN or -inf logit");
        /* top_p reached by ids 1 and 3 alone (0.30 of the mass each): never a 2.0 */
        key.step = step;
        tok = ts_draw(s, l, 1.0f, 0.5f, 0, &key);
        cr_assert(tok == 1 || tok == 3, "top_p 0.5 drew %d", tok);
        key.step = step;
        tok = ts_draw(s, l, 1.0f, 0.2f, 0, &key);
        cr_assert_eq(tok, 1, "top_p 0.2 keeps the first of the tied pair");
    }
    cr_assert_gt(seen_low, 100);
    sampler_destroy(&s);
}

Test(sampler, sampling_refuses_an_infinite_logit)
{
    const float l[3] = {0.0f, INFINITY, 1.0f};
    struct sampler *s = ts_new(3);
    struct sampler_params hot = {.temperature = 1.0f, .top_p = 1.0f, .top_k = 0};
    struct sampler_key key = {0};
    char err[256];
    int32_t tok;
    cr_assert_lt(sampler_sample(s, l, &hot, &key, &tok, err, sizeof err), 0);
    cr_assert(strstr(err, "finite"), "%s", err);
    hot.top_k = 2;
    cr_assert_lt(sampler_sample(s, l, &hot, &key, &tok, err, sizeof err), 0);
    hot.temperature = 0; /* greedy has an answer: the infinite logit */
    cr_assert_eq(sampler_sample(s, l, &hot, &key, &tok, err, sizeof err), 0, "%s", err);
    cr_assert_eq(tok, 1);
    sampler_destroy(&s);
}

Test(sampler, bad_parameters_name_the_field)
{
    char err[256];
    struct sampler_params ok = {.temperature = 0.7f, .top_p = 0.9f, .top_k = 0};
    cr_assert_eq(sampler_check_params(&ok, err, sizeof err), 0);
    struct sampler_params p = ok;
    p.temperature = -0.1f;
    cr_assert_lt(sampler_check_params(&p, err, sizeof err), 0);
    cr_assert(strstr(err, "temperature"), "%s", err);
    p = ok;
    p.temperature = NAN;
    cr_assert_lt(sampler_check_params(&p, err, sizeof err), 0);
    cr_assert(strstr(err, "temperature"), "%s", err);
    p = ok;
    p.temperature = 1e-39f; /* denormal: 1 / temperature overflows, every probability NaN */
    cr_assert_lt(sampler_check_params(&p, err, sizeof err), 0);
    cr_assert(strstr(err, "temperature"), "%s", err);
    p.temperature = 1e-37f; /* small but usable */
    cr_assert_eq(sampler_check_params(&p, err, sizeof err), 0, "%s", err);
    p = ok;
    p.top_p = 0.0f;
    cr_assert_lt(sampler_check_params(&p, err, sizeof err), 0);
    cr_assert(strstr(err, "top_p"), "%s", err);
    p.top_p = 1.5f;
    cr_assert_lt(sampler_check_params(&p, err, sizeof err), 0);
    cr_assert(strstr(err, "top_p"), "%s", err);
    p = ok;
    p.top_k = -1;
    cr_assert_lt(sampler_check_params(&p, err, sizeof err), 0);
    cr_assert(strstr(err, "top_k"), "%s", err);

    struct sampler *s = NULL;
    cr_assert_lt(sampler_new(0, &s, err, sizeof err), 0);
    cr_assert_null(s);
    sampler_destroy(&s); /* NULL-safe */

    s = ts_new(3);
    const float nan3[3] = {NAN, NAN, -INFINITY};
    struct sampler_key r = {.seed = 1};
    int32_t tok;
    struct sampler_params hot = {.temperature = 1.0f, .top_p = 1.0f, .top_k = 0};
    cr_assert_lt(sampler_sample(s, nan3, &hot, &r, &tok, err, sizeof err), 0);
    cr_assert(strstr(err, "finite"), "%s", err);
    sampler_destroy(&s);
}
