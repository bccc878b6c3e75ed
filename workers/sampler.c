/* sampler.c — next-token choice over one row of logits: argmax, or a draw after temperature,
 * top-k and top-p filtering with the counter-based uniform of draw.h (the function is defined
 * in sampler.h).
 *
 * Owns scratch arrays sized for the vocabulary. Nothing ever sorts the whole vocabulary: a
 * draw is "the shortest prefix of the descending-probability order whose mass reaches a
 * target" twice over (the top-p nucleus, then the token the uniform lands on), found with a
 * mass histogram over the probabilities' float bits and three-way partitioning of the one
 * bin the edge falls in, in expected linear time. Never allocates per call, never prints,
 * never reads global state: a draw is a pure function of its inputs.
 */
#include "sampler.h"

#include "draw.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct sampler_cand {
    float v; /* a logit, then an unnormalised probability */
    int32_t id;
};

/* Probability mass histogram bins: a probability's float bits >> 20 (sign, exponent and three
 * mantissa bits), so bins are ordered like the values and each spans a ratio of at most
 * 1.125. Probabilities are <= 1, whose bits >> 20 is 0x3f8. */
#define SAMPLER_BINS 1024
#define SAMPLER_LANES 4 /* interleaved histograms: consecutive adds to one bin do not chain */

struct sampler {
    int n_vocab;
    struct sampler_cand *cand; /* (n_vocab) */
    float *prob;               /* (n_vocab) probabilities, or the top-k heap */
    double *hist;              /* (SAMPLER_LANES, SAMPLER_BINS) */
};

/* Below this many candidates a plain sort beats further partitioning. */
#define SAMPLER_SMALL 32

int sampler_check_params(const struct sampler_params *p, char *err, size_t err_len)
{
    if (!isfinite(p->temperature) || p->temperature < 0) {
        snprintf(err, err_len, "temperature is %g; it must be a finite number >= 0 (0 = greedy)",
                 (double)p->temperature);
        return -1;
    }
    /* logits are scaled by 1 / temperature in float: a temperature so small that this
     * overflows would turn every probability into NaN */
    if (p->temperature > 0 && !isfinite(1.0f / p->temperature)) {
        snprintf(err, err_len, "temperature is %g; a temperature above 0 must be at least %g "
                 "(0 = greedy)", (double)p->temperature, (double)(1.0f / FLT_MAX));
        return -1;
    }
    if (!(p->top_p > 0 && p->top_p <= 1)) {
        snprintf(err, err_len, "top_p is %g; it must be in (0, 1] (1 = off)", (double)p->top_p);
        return -1;
    }
    if (p->top_k < 0) {
        snprintf(err, err_len, "top_k is %d; it must be >= 0 (0 = off)", p->top_k);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* vector kernels: AVX2 + FMA where the build targets it (x86-64-v3), plain C otherwise. Both
 * give every probability bitwise as draw_prob does (the device sampler computes it too). */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SAMPLER_AVX2 1
#endif

#ifdef SAMPLER_AVX2
/* draw_exp_neg (draw.h) on 8 lanes, operation for operation. */
static __m256 sampler_exp_neg8(__m256 x)
{
    __m256 ok = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                                  23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), ok);
}
#endif

/* The largest non-NaN value; -inf when there is none. */
static float sampler_max(const float *l, int n)
{
    float m = -INFINITY;
    int i = 0;
#ifdef SAMPLER_AVX2
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= n; i += 8)
        vm = _mm256_max_ps(_mm256_loadu_ps(l + i), vm); /* NaN in the first operand: keeps vm */
    float lane[8];
    _mm256_storeu_ps(lane, vm);
    for (int k = 0; k < 8; k++)
        m = lane[k] > m ? lane[k] : m;
#endif
    for (; i < n; i++)
        m = l[i] > m ? l[i] : m;
    return m;
}

/* prob[i] = exp((l[i] - m) * inv_t), 0 for NaN and -inf. Returns the total. Both paths give
 * every element bitwise the same value (the same float operations in the same order). */
static double sampler_exp_pass(const float *l, int n, float m, float inv_t, float *prob)
{
    double total = 0;
    int i = 0;
#ifdef SAMPLER_AVX2
    __m256 vm = _mm256_set1_ps(m), vt = _mm256_set1_ps(inv_t);
    __m256d acc = _mm256_setzero_pd();
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(l + i), vm), vt);
        __m256 p = sampler_exp_neg8(x);
        _mm256_storeu_ps(prob + i, p);
        acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(p)));
        acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(p, 1)));
    }
    double lane[4];
    _mm256_storeu_pd(lane, acc);
    total = (lane[0] + lane[1]) + (lane[2] + lane[3]);
#endif
    for (; i < n; i++) {
        prob[i] = draw_prob(l[i], m, inv_t);
        total += prob[i];
    }
    return total;
}

int32_t sampler_argmax(const float *logits, int n)
{
    if (n < 1)
        return -1;
    float m = sampler_max(logits, n);
    int i = 0;
#ifdef SAMPLER_AVX2
    __m256 vm = _mm256_set1_ps(m);
    for (; i + 8 <= n; i += 8) {
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(logits + i), vm,
                                                    _CMP_EQ_OQ));
        if (mask)
            return i + __builtin_ctz((unsigned)mask);
    }
#endif
    for (; i < n; i++)
        if (logits[i] == m)
            return i;
    return -1; /* every entry is NaN */
}

int sampler_new(int n_vocab, struct sampler **out, char *err, size_t err_len)
{
    *out = NULL;
    if (n_vocab < 1) {
        snprintf(err, err_len, "sampler: vocab_size is %d; it must be >= 1", n_vocab);
        return -1;
    }
    struct sampler *s = calloc(1, sizeof *s);
    if (!s)
        goto fail;
    s->n_vocab = n_vocab;
    s->cand = malloc((size_t)n_vocab * sizeof *s->cand);
    s->prob = malloc((size_t)n_vocab * sizeof *s->prob);
    s->hist = malloc(SAMPLER_LANES * SAMPLER_BINS * sizeof *s->hist);
    if (!s->cand || !s->prob || !s->hist)
        goto fail;
    *out = s;
    return 0;
fail:
    sampler_destroy(&s);
    snprintf(err, err_len, "sampler: out of memory for a vocabulary of %d", n_vocab);
    return -1;
}

void sampler_destroy(struct sampler **s)
{
    if (!s || !*s)
        return;
    free((*s)->cand);
    free((*s)->prob);
    free((*s)->hist);
    free(*s);
    *s = NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* selection                                                                                 */

/* Descending by value, then ascending by id: the order Hugging Face's sort would give when
 * ties are broken by position, and in any case a fixed one. */
static int sampler_cmp_desc(const void *a, const void *b)
{
    const struct sampler_cand *x = a, *y = b;
    if (x->v != y->v)
        return x->v > y->v ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static int sampler_cmp_id(const void *a, const void *b)
{
    const struct sampler_cand *x = a, *y = b;
    return (x->id > y->id) - (x->id < y->id);
}

static void sampler_swap(struct sampler_cand *a, struct sampler_cand *b)
{
    struct sampler_cand t = *a;
    *a = *b;
    *b = t;
}

static float sampler_median3(float a, float b, float c)
{
    if (a > b) {
        float t = a;
        a = b;
        b = t;
    }
    if (b > c)
        b = c;
    return a > b ? a : b;
}

/* Three-way partition of c[lo, hi) around `pivot` (Dijkstra): afterwards [lo, *gt_end) holds
 * values > pivot, [*gt_end, *eq_end) values == pivot, [*eq_end, hi) values < pivot. */
static void sampler_partition(struct sampler_cand *c, int lo, int hi, float pivot, int *gt_end,
                              int *eq_end)
{
    int gt = lo, i = lo, lt = hi;
    while (i < lt) {
        if (c[i].v > pivot)
            sampler_swap(&c[gt++], &c[i++]);
        else if (c[i].v < pivot)
            sampler_swap(&c[i], &c[--lt]);
        else
            i++;
    }
    *gt_end = gt;
    *eq_end = lt;
}

/* Whether a cumulative mass `acc` has reached `target`: >= for the top-p nucleus (the
 * shortest prefix whose mass reaches top_p), > for the draw (the first token whose cumulative
 * mass exceeds u x K). */
static int sampler_reached(double acc, double target, int strict)
{
    return strict ? acc > target : acc >= target;
}

/* Among c[lo, n), all after c[0, lo) in the order (descending p, then ascending id) and with
 * c[0, lo) holding mass `kept`: moves the shortest prefix of c[0, n) in that order whose mass
 * reaches `target` (see sampler_reached) to c[0, ret), its last element in the order at
 * c[ret - 1], and returns ret. Returns -1 when all of c[0, n) falls short (only rounding can
 * do that; c is then permuted). */
static int sampler_prefix(struct sampler_cand *c, int lo, int n, double kept, double target,
                          int strict)
{
    int hi = n;
    while (hi - lo > SAMPLER_SMALL) {
        int gt, eq;
        float pivot = sampler_median3(c[lo].v, c[lo + (hi - lo) / 2].v, c[hi - 1].v);
        sampler_partition(c, lo, hi, pivot, &gt, &eq);
        double g = 0;
        for (int i = lo; i < gt; i++)
            g += c[i].v;
        if (sampler_reached(kept + g, target, strict)) {
            hi = gt;
            continue;
        }
        double e = 0;
        for (int i = gt; i < eq; i++)
            e += c[i].v;
        if (sampler_reached(kept + g + e, target, strict)) {
            /* The edge lies among equal values: they follow one another in id order. */
            kept += g;
            qsort(c + gt, (size_t)(eq - gt), sizeof *c, sampler_cmp_id);
            for (int i = gt; i < eq; i++) {
                kept += c[i].v;
                if (sampler_reached(kept, target, strict))
                    return i + 1;
            }
            return eq; /* rounding between the group's sum and the running one */
        }
        kept += g + e;
        lo = eq;
    }
    qsort(c + lo, (size_t)(hi - lo), sizeof *c, sampler_cmp_desc);
    for (int i = lo; i < hi; i++) {
        kept += c[i].v;
        if (sampler_reached(kept, target, strict))
            return i + 1;
    }
    /* Short: after a narrowing (hi < n) only by rounding, and then the whole narrowed group
     * (whose last in order is c[hi - 1], sorted above) is the prefix. */
    return hi < n ? hi : -1;
}

static void sampler_sift_down(float *h, int k, int i)
{
    for (;;) {
        int a = 2 * i + 1, b = a + 1, m = i;
        if (a < k && h[a] < h[m])
            m = a;
        if (b < k && h[b] < h[m])
            m = b;
        if (m == i)
            return;
        float t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* The k-th largest finite logit (a min-heap of the k largest, in `heap`), or -inf when fewer
 * than k are finite. One pass whose branch is rarely taken once the heap is warm. */
static float sampler_kth_largest(const float *l, int n, int k, float *heap)
{
    int m = 0, i = 0;
    for (; i < n && m < k; i++)
        if (l[i] > -INFINITY && l[i] < INFINITY)
            heap[m++] = l[i];
    if (m < k)
        return -INFINITY;
    for (int j = k / 2 - 1; j >= 0; j--)
        sampler_sift_down(heap, k, j);
    for (; i < n; i++)
        if (l[i] > heap[0] && l[i] < INFINITY) {
            heap[0] = l[i];
            sampler_sift_down(heap, k, 0);
        }
    return heap[0];
}

/* The last element of c[0, n) in the order that has a positive probability (the draw's
 * answer when rounding left u x K at or past the cumulative total); c[0].id when none has. */
static int32_t sampler_last_positive(const struct sampler_cand *c, int n)
{
    int best = -1;
    for (int i = 0; i < n; i++)
        if (c[i].v > 0 && (best < 0 || c[i].v < c[best].v ||
                           (c[i].v == c[best].v && c[i].id > c[best].id)))
            best = i;
    return c[best < 0 ? 0 : best].id;
}

/* Fills s->hist with the probability mass of s->prob per bin. */
static void sampler_histogram(struct sampler *s)
{
    int n = s->n_vocab;
    const float *p = s->prob;
    double *h = s->hist;
    memset(h, 0, SAMPLER_LANES * SAMPLER_BINS * sizeof *h);
    union {
        float f;
        uint32_t u;
    } bits;
    int i = 0;
    for (; i + SAMPLER_LANES <= n; i += SAMPLER_LANES)
        for (int k = 0; k < SAMPLER_LANES; k++) {
            bits.f = p[i + k];
            h[k * SAMPLER_BINS + (bits.u >> 20)] += p[i + k];
        }
    for (; i < n; i++) {
        bits.f = p[i];
        h[bits.u >> 20] += p[i];
    }
}

/* Over the whole vocabulary (probabilities in s->prob, their histogram in s->hist): the last
 * element in the order of the shortest prefix whose mass reaches `target`. The histogram
 * finds the bin the edge falls in; everything in higher bins lies before it, and only that
 * bin's tokens are gathered (into s->cand, in id order) and partitioned. Returns the element
 * in *edge with *mass the prefix's mass, or -1 when the whole vocabulary falls short (only
 * rounding can do that). */
static int sampler_search(struct sampler *s, double target, int strict,
                          struct sampler_cand *edge, double *mass)
{
    const double *h = s->hist;
    double above = 0;
    int bin = -1;
    for (int b = SAMPLER_BINS - 1; b >= 0; b--) {
        double m = 0;
        for (int k = 0; k < SAMPLER_LANES; k++)
            m += h[k * SAMPLER_BINS + b];
        if (sampler_reached(above + m, target, strict)) {
            bin = b;
            break;
        }
        above += m;
    }
    if (bin < 0)
        return -1;
    int n = s->n_vocab, n_bin = 0;
    const float *p = s->prob;
    struct sampler_cand *c = s->cand;
    union {
        float f;
        uint32_t u;
    } bits;
    for (int i = 0; i < n; i++) {
        bits.f = p[i];
        /* branch-free: every token is written, only the bin's advance */
        c[n_bin].v = p[i];
        c[n_bin].id = i;
        n_bin += (int)(bits.u >> 20) == bin;
    }
    int k = sampler_prefix(c, 0, n_bin, above, target, strict);
    if (k > 0) {
        *edge = c[k - 1];
        double m = above;
        for (int i = 0; i < k; i++)
            m += c[i].v;
        *mass = m;
    } else { /* rounding between the bin's histogram sum and the running one: the whole bin */
        edge->id = sampler_last_positive(c, n_bin);
        edge->v = p[edge->id];
        double m = above;
        for (int i = 0; i < n_bin; i++)
            m += c[i].v;
        *mass = m;
    }
    return 0;
}

/* Whether candidate a comes after b in the order. */
static int sampler_after(const struct sampler_cand *a, const struct sampler_cand *b)
{
    return a->v < b->v || (a->v == b->v && a->id > b->id);
}

int sampler_sample(struct sampler *s, const float *logits, const struct sampler_params *p,
                   const struct sampler_key *key, int32_t *token, char *err, size_t err_len)
{
    int n = s->n_vocab;
    if (p->temperature == 0 || p->top_k == 1) {
        int32_t best = sampler_argmax(logits, n);
        if (best < 0 || !(logits[best] > -INFINITY))
            goto no_finite;
        *token = best;
        return 0;
    }
    float max_v = sampler_max(logits, n);
    if (!isfinite(max_v))
        goto no_finite;
    float inv_t = 1.0f / p->temperature;
    double u = draw_uniform(key->seed, key->stream, key->step);

    if (p->top_k > 0) {
        /* top-k: the k largest (ties at the edge kept) become the candidates, in id order */
        float thr = sampler_kth_largest(logits, n, p->top_k, s->prob);
        struct sampler_cand *c = s->cand;
        int m = 0;
        double total = 0;
        for (int i = 0; i < n; i++)
            if (logits[i] >= thr && logits[i] > -INFINITY) {
                c[m].v = draw_prob(logits[i], max_v, inv_t);
                c[m].id = i;
                total += c[m].v;
                m++;
            }
        if (p->top_p < 1) {
            int k = sampler_prefix(c, 0, m, 0.0, (double)p->top_p * total, 0);
            if (k > 0)
                m = k;
        }
        double kept = 0;
        for (int i = 0; i < m; i++)
            kept += c[i].v;
        int k = sampler_prefix(c, 0, m, 0.0, u * kept, 1);
        *token = k > 0 ? c[k - 1].id : sampler_last_positive(c, m);
        return 0;
    }

    double total = sampler_exp_pass(logits, n, max_v, inv_t, s->prob);
    sampler_histogram(s);
    double kept = total;
    struct sampler_cand nucleus_edge = {.v = 0.0f, .id = INT32_MAX}, pick;
    if (p->top_p < 1 &&
        sampler_search(s, (double)p->top_p * total, 0, &nucleus_edge, &kept) != 0) {
        kept = total; /* rounding: the nucleus is everything */
        nucleus_edge = (struct sampler_cand){.v = 0.0f, .id = INT32_MAX};
    }
    double unused;
    if (sampler_search(s, u * kept, 1, &pick, &unused) != 0) {
        /* rounding: the last token with any mass */
        for (int i = 0; i < n; i++) {
            s->cand[i].v = s->prob[i];
            s->cand[i].id = i;
        }
        pick.id = sampler_last_positive(s->cand, n);
        pick.v = s->prob[pick.id];
    }
    /* The draw's prefix and the nucleus were summed in different orders: never step past the
     * nucleus's edge by rounding. */
    *token = sampler_after(&pick, &nucleus_edge) ? nucleus_edge.id : pick.id;
    return 0;

no_finite:
    snprintf(err, err_len, "sampler: the logits hold no finite value (vocab_size %d)", n);
    return -1;
}
