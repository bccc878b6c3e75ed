/* sample.cu — next-token choice on the device (sample.h): greedy and seeded temperature /
 * top-k / top-p draws, one CTA per row, so that only ids cross to the host; and
 * kst_suite_sample, which checks them against host references.
 *
 * The function is the host sampler's (workers/sampler.h defines it): probabilities from
 * draw_prob (draw.h, the same float operations bit for bit), candidates by the top_k-th
 * largest logit (ties kept), the order "descending probability, then ascending id", the top-p
 * nucleus as the shortest prefix of that order reaching top_p of the mass, and the token as the
 * first of that order whose cumulative mass exceeds u x (kept mass), u = draw_uniform(seed,
 * stream, step). Nothing is sorted: every edge (the top-k threshold, the nucleus edge, the
 * drawn token) is a search over the 32-bit keys of the values for the largest key t whose
 * "mass of everything at or above t" F(t) exceeds an integer threshold; each pass over the row
 * sums F at 15 probes in registers and narrows the key range 16-fold, so a search takes at most
 * 8 passes; ties at the found value are then counted off in id order.
 *
 * Masses are fixed point, round(p x 2^43) in 64-bit integers (a row of up to 2^20 entries
 * cannot overflow): integer sums are exact in any order, so every pass of a search sees the
 * same F, the block reductions are deterministic, and thresholds (ceil(top_p x K) - 1,
 * floor(u x K)) are computed exactly with 128-bit products. WHERE IT MAY DIFFER from the host
 * (which sums doubles in the order): only where a cumulative mass lies within the rounding of
 * the fixed point (at most n x 2^-44, ~7e-9 at 128k entries, relative to a kept mass >= 1) of
 * its target, or where a token's probability is below 2^-44 (its fixed-point mass is 0, so the
 * device never draws it; the host could, with probability below 1e-13 per row).
 *
 * The algorithm (ks_draw_row) is written once over a "row" that supplies block-wide passes:
 * ks_dev_row runs them with the CTA (16-byte loads, warp shuffles, shared memory), ks_host_row
 * runs them in a plain loop, so the same code also runs on the host: the self-test compares the
 * device with that host run token for token (exact), and with a brute-force mirror of
 * sampler.c's definition (sort, walk) up to rounding at boundaries.
 *
 * Owns nothing: logits (overwritten with probabilities), rows and tokens are the caller's.
 * ITS_CUDA_SIMPLE=1 selects plain bisection (one probe per pass, up to 32 passes per search)
 * instead of 15 probes per pass. Launch errors abort (kcheck.h); the suite records device
 * errors as failed checks.
 */
#include "sample.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "draw.h"
#include "kcheck.h"
#include "kenv.h"
#include "kst.h"

#define KS_THREADS 512
#define KS_WARPS (KS_THREADS / 32)
#define KS_PROBES 15           /* keys one search pass tries: the range shrinks 16-fold */
#define KS_KEY_ONE 0x3f800000u /* bits of 1.0f: no probability is larger */
#define KS_FX_SCALE 0x1p43f    /* fixed-point masses: round(p * 2^43) */
#define KS_MAX_VOCAB (1 << 20) /* sums of up to 2^20 masses <= 2^63 fit 64 bits */

#define KS_HD static __host__ __device__ __forceinline__

typedef unsigned long long ks_u64;

/* ---- exact helpers, host and device alike ------------------------------------------------- */

KS_HD uint32_t ks_bits(float f)
{
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}

KS_HD float ks_float(uint32_t u)
{
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

KS_HD bool ks_finite(float v)
{
    return v > -INFINITY && v < INFINITY;
}

/* A logit's key: unsigned order = float order, -0 as +0 (they compare equal as floats). */
KS_HD uint32_t ks_key(float v)
{
    uint32_t u = ks_bits(v == 0.0f ? 0.0f : v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

KS_HD float ks_unkey(uint32_t k)
{
    return ks_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

/* A probability's fixed-point mass (p in [0, 1]: p * 2^43 is exact, then round to nearest). */
KS_HD ks_u64 ks_fx(float p)
{
#ifdef __CUDA_ARCH__
    return __float2ull_rn(p * KS_FX_SCALE);
#else
    return (ks_u64)llrintf(p * KS_FX_SCALE);
#endif
}

KS_HD float ks_recip(float t)
{
#ifdef __CUDA_ARCH__
    return __fdiv_rn(1.0f, t);
#else
    return 1.0f / t; /* as sampler.c: IEEE division */
#endif
}

KS_HD void ks_mul128(ks_u64 a, ks_u64 b, ks_u64 *hi, ks_u64 *lo)
{
#ifdef __CUDA_ARCH__
    *hi = __umul64hi(a, b);
#else
    *hi = (ks_u64)(((unsigned __int128)a * b) >> 64);
#endif
    *lo = a * b;
}

/* floor((hi:lo) / 2^s) for 1 <= s (the quotient must fit 64 bits); *exact = no remainder. */
KS_HD ks_u64 ks_shr128(ks_u64 hi, ks_u64 lo, int s, bool *exact)
{
    if (s < 64) {
        *exact = (lo & ((1ull << s) - 1)) == 0;
        return (hi << (64 - s)) | (lo >> s);
    }
    if (s < 128) {
        *exact = lo == 0 && (hi & ((1ull << (s - 64)) - 1)) == 0;
        return hi >> (s - 64);
    }
    *exact = (hi | lo) == 0;
    return 0;
}

/* The integer T with F >= top_p * K  <=>  F > T for integer F: ceil(top_p * K) - 1, exactly
 * (top_p in (0, 1) is mant * 2^-s with s >= 24). */
KS_HD ks_u64 ks_top_p_threshold(ks_u64 k, float top_p)
{
    uint32_t b = ks_bits(top_p), e = (b >> 23) & 0xffu;
    ks_u64 mant = e ? ((b & 0x7fffffu) | 0x800000u) : (b & 0x7fffffu);
    int s = e ? 150 - (int)e : 149;
    ks_u64 hi, lo;
    ks_mul128(k, mant, &hi, &lo);
    bool exact;
    ks_u64 q = ks_shr128(hi, lo, s, &exact);
    return exact && q > 0 ? q - 1 : q;
}

/* floor(u * K) for u = u53 * 2^-53: the draw's target, exactly. */
KS_HD ks_u64 ks_draw_threshold(ks_u64 k, ks_u64 u53)
{
    ks_u64 hi, lo;
    ks_mul128(k, u53, &hi, &lo);
    bool exact;
    return ks_shr128(hi, lo, 53, &exact);
}

/* ---- the algorithm, over a row that supplies the passes -----------------------------------
 * A Row has (every member called by all threads of the CTA alike, results the same in all):
 *   int32_t argmax()          lowest id of the largest logit, NaN never; -1 when none > -inf
 *   float max_logit()         the largest non-NaN logit (-inf when none)
 *   sum<N>(f, out)            out[j] = sum over entries of what f(v, i, acc) adds to acc[j]
 *   transform(g)              every entry v becomes g(v)
 *   int32_t nth(key, j)       the j-th smallest id (from 1) whose entry's bits are `key`
 */

/* The largest key t in [lo, hi] with F(t) > T, F(t) = the sum of weight(v) over entries whose
 * key (set by weight) is >= t. Requires F(lo) > T and F(hi + 1) <= T; then t is the key of an
 * entry. */
#pragma nv_exec_check_disable
template <int P, class Row, class W>
__host__ __device__ uint32_t ks_search(Row &row, uint32_t lo, uint32_t hi, ks_u64 t, W weight)
{
    while (lo < hi) {
        const uint32_t d = hi - lo;
        const uint32_t step = d / (P + 1) + 1; /* P * step < 2^32 for any d */
        const uint32_t lo_ = lo, hi_ = hi;
        ks_u64 f[P + 1]; /* f[0]: above hi; f[j]: keys in [lo + j * step, hi] */
        row.template sum<P + 1>(
            [=](float v, int, ks_u64(&a)[P + 1]) {
                uint32_t key;
                ks_u64 w = weight(v, &key);
                if (key > hi_) {
                    a[0] += w;
                } else if (key >= lo_) {
                    uint32_t off = key - lo_;
#pragma unroll
                    for (int j = 1; j <= P; j++)
                        a[j] += off >= (uint32_t)j * step ? w : 0;
                }
            },
            f);
        int best = 0;
#pragma unroll
        for (int j = 1; j <= P; j++)
            if ((ks_u64)j * step <= d && f[0] + f[j] > t)
                best = j; /* F falls with the key: the reaching probes are 1..best */
        if (best == 0) {
            hi = lo + step - 1;
        } else {
            if (best < P && (ks_u64)(best + 1) * step <= d)
                hi = lo + (uint32_t)(best + 1) * step - 1;
            lo += (uint32_t)best * step;
        }
    }
    return lo;
}

/* The probability entries' weight: their key is their bits, their weight the fixed point. */
struct ks_prob_weight {
    __host__ __device__ ks_u64 operator()(float p, uint32_t *key) const
    {
        *key = ks_bits(p);
        return ks_fx(p);
    }
};

/* The finite logits' weight for the top-k count: 1 each. */
struct ks_count_weight {
    __host__ __device__ ks_u64 operator()(float v, uint32_t *key) const
    {
        bool f = ks_finite(v);
        *key = f ? ks_key(v) : 0u;
        return f ? 1u : 0u;
    }
};

/* At the found probability key: how many of its ties the prefix takes to pass T (at least 1,
 * at most all of them), and the mass before them. Returns 0 when no entry has the key (which
 * ks_search's contract rules out). */
#pragma nv_exec_check_disable
template <class Row>
__host__ __device__ ks_u64 ks_ties(Row &row, uint32_t key, ks_u64 t, ks_u64 *above)
{
    ks_u64 s[2];
    row.template sum<2>(
        [=](float p, int, ks_u64(&a)[2]) {
            uint32_t k = ks_bits(p);
            a[0] += k > key ? ks_fx(p) : 0;
            a[1] += k == key ? 1u : 0u;
        },
        s);
    *above = s[0];
    ks_u64 n_eq = s[1], q = ks_fx(ks_float(key));
    if (n_eq == 0)
        return 0;
    ks_u64 j = (q == 0 || s[0] > t) ? 1 : (t - s[0]) / q + 1;
    return j < 1 ? 1 : (j > n_eq ? n_eq : j);
}

/* One row's token (sample.h). Every pass is the row's; all threads return the same. */
#pragma nv_exec_check_disable
template <int P, class Row>
__host__ __device__ int32_t ks_draw_row(Row &row, const struct ksample_row &r)
{
    if (r.temperature == 0.0f || r.top_k == 1)
        return row.argmax();
    const float m = row.max_logit();
    if (!ks_finite(m))
        return -1; /* nothing finite, or +inf: no distribution (the host refuses the same) */

    float thr = -INFINITY;
    if (r.top_k > 0) {
        ks_u64 n_fin[1];
        row.template sum<1>([](float v, int, ks_u64(&a)[1]) { a[0] += ks_finite(v) ? 1u : 0u; },
                            n_fin);
        if (n_fin[0] > (ks_u64)r.top_k) /* else every finite logit is a candidate */
            thr = ks_unkey(ks_search<P>(row, 0u, ks_key(m), (ks_u64)r.top_k - 1,
                                        ks_count_weight()));
    }

    const float inv_t = ks_recip(r.temperature);
    row.transform([=](float v) {
        return v >= thr && v > -INFINITY ? draw_prob(v, m, inv_t) : 0.0f;
    });
    ks_u64 total[1];
    row.template sum<1>([](float p, int, ks_u64(&a)[1]) { a[0] += ks_fx(p); }, total);
    ks_u64 kept = total[0]; /* >= 2^43: the max's probability is exactly 1 */

    /* nucleus edge: the j1-th tie at key1 (none: key 0, which every probability key follows) */
    uint32_t key1 = 0;
    ks_u64 j1 = ~0ull;
    if (r.top_p < 1.0f) {
        ks_u64 t1 = ks_top_p_threshold(kept, r.top_p), above;
        key1 = ks_search<P>(row, 1u, KS_KEY_ONE, t1, ks_prob_weight());
        j1 = ks_ties(row, key1, t1, &above);
        if (j1 == 0)
            return -1; /* unreachable (see ks_search); never a made-up id */
        kept = above + j1 * ks_fx(ks_float(key1));
    }

    ks_u64 t2 = ks_draw_threshold(kept, draw_bits(r.seed, r.stream, r.step) >> 11), above2;
    uint32_t key2 = ks_search<P>(row, 1u, KS_KEY_ONE, t2, ks_prob_weight());
    ks_u64 j2 = ks_ties(row, key2, t2, &above2);
    if (j2 == 0)
        return -1; /* unreachable */
    /* t2 < kept, so the draw's prefix ends inside the nucleus; kept as a guard. */
    if (key2 < key1 || (key2 == key1 && j2 > j1)) {
        key2 = key1;
        j2 = j1;
    }
    return row.nth(key2, j2);
}

/* ---- the device row: one CTA -------------------------------------------------------------- */

/* Calls f(v, i) for every entry of l[0, n), each thread its own fixed subset (the same in
 * every pass), with 16-byte loads for the aligned body. l must be 4-byte aligned (any float
 * pointer is); nothing more is assumed. */
template <class F>
static __device__ __forceinline__ void ks_for_each(const float *l, int n, F f)
{
    int head = (int)(((16u - ((unsigned)(uintptr_t)l & 15u)) & 15u) >> 2);
    head = head < n ? head : n;
    for (int i = threadIdx.x; i < head; i += KS_THREADS)
        f(l[i], i);
    const float4 *v = reinterpret_cast<const float4 *>(l + head);
    const int nv = (n - head) >> 2;
    for (int j = threadIdx.x; j < nv; j += KS_THREADS) {
        float4 x = v[j];
        int i = head + 4 * j;
        f(x.x, i);
        f(x.y, i + 1);
        f(x.z, i + 2);
        f(x.w, i + 3);
    }
    for (int i = head + 4 * nv + threadIdx.x; i < n; i += KS_THREADS)
        f(l[i], i);
}

/* As ks_for_each, storing g(v) back in place. */
template <class G>
static __device__ __forceinline__ void ks_transform_each(float *l, int n, G g)
{
    int head = (int)(((16u - ((unsigned)(uintptr_t)l & 15u)) & 15u) >> 2);
    head = head < n ? head : n;
    for (int i = threadIdx.x; i < head; i += KS_THREADS)
        l[i] = g(l[i]);
    float4 *v = reinterpret_cast<float4 *>(l + head);
    const int nv = (n - head) >> 2;
    for (int j = threadIdx.x; j < nv; j += KS_THREADS) {
        float4 x = v[j];
        x.x = g(x.x);
        x.y = g(x.y);
        x.z = g(x.z);
        x.w = g(x.w);
        v[j] = x;
    }
    for (int i = head + 4 * nv + threadIdx.x; i < n; i += KS_THREADS)
        l[i] = g(l[i]);
}

struct ks_dev_row {
    float *l;
    int n;
    ks_u64 *part; /* shared (KS_WARPS, KS_PROBES + 1) */
    float *fpart; /* shared (KS_WARPS) */
    int *ipart;   /* shared (KS_WARPS + 1) */

    __device__ int32_t argmax()
    {
        float bv = -INFINITY;
        int bi = INT32_MAX;
        ks_for_each(l, n, [&](float v, int i) {
            if (v > bv || (v == bv && i < bi)) {
                bv = v;
                bi = i;
            }
        });
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            fpart[warp] = bv;
            ipart[warp] = bi;
        }
        __syncthreads();
        bv = fpart[0];
        bi = ipart[0];
        for (int w = 1; w < KS_WARPS; w++)
            if (fpart[w] > bv || (fpart[w] == bv && ipart[w] < bi)) {
                bv = fpart[w];
                bi = ipart[w];
            }
        __syncthreads();
        return bi == INT32_MAX || !(bv > -INFINITY) ? -1 : bi;
    }

    __device__ float max_logit()
    {
        float m = -INFINITY;
        ks_for_each(l, n, [&](float v, int) { m = fmaxf(m, v); }); /* fmaxf drops NaN */
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (int o = 16; o > 0; o >>= 1)
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0)
            fpart[warp] = m;
        __syncthreads();
        m = fpart[0];
        for (int w = 1; w < KS_WARPS; w++)
            m = fmaxf(m, fpart[w]);
        __syncthreads();
        return m;
    }

    template <int N, class F>
    __device__ void sum(F f, ks_u64 (&out)[N])
    {
        ks_u64 a[N];
#pragma unroll
        for (int j = 0; j < N; j++)
            a[j] = 0;
        ks_for_each(l, n, [&](float v, int i) { f(v, i, a); });
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
        for (int j = 0; j < N; j++) {
            for (int o = 16; o > 0; o >>= 1)
                a[j] += __shfl_xor_sync(0xffffffffu, a[j], o);
            if (lane == 0)
                part[warp * N + j] = a[j];
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < N; j++) {
            ks_u64 s = 0;
            for (int w = 0; w < KS_WARPS; w++)
                s += part[w * N + j];
            out[j] = s;
        }
        __syncthreads();
    }

    template <class G>
    __device__ void transform(G g)
    {
        ks_transform_each(l, n, g);
        __syncthreads(); /* nth reads entries other threads wrote */
    }

    __device__ int32_t nth(uint32_t key, ks_u64 j)
    {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        ks_u64 seen = 0;
        for (int base = 0; base < n; base += KS_THREADS) {
            const int i = base + (int)threadIdx.x;
            const bool hit = i < n && ks_bits(l[i]) == key;
            const int cnt = __syncthreads_count(hit);
            if (seen + (ks_u64)cnt < j) {
                seen += (ks_u64)cnt;
                continue;
            }
            const unsigned ball = __ballot_sync(0xffffffffu, hit);
            if (lane == 0)
                ipart[warp] = __popc(ball);
            __syncthreads();
            int before = __popc(ball & ((1u << lane) - 1u));
            for (int w = 0; w < warp; w++)
                before += ipart[w];
            if (hit && seen + (ks_u64)before + 1 == j)
                ipart[KS_WARPS] = i;
            __syncthreads();
            const int id = ipart[KS_WARPS];
            __syncthreads();
            return id;
        }
        return -1;
    }
};

template <int P>
__global__ void __launch_bounds__(KS_THREADS)
    ks_kernel(float *logits, int vocab, const struct ksample_row *rows, int32_t *tokens)
{
    __shared__ ks_u64 part[KS_WARPS * (KS_PROBES + 1)];
    __shared__ float fpart[KS_WARPS];
    __shared__ int ipart[KS_WARPS + 1];
    ks_dev_row row = {logits + (size_t)blockIdx.x * (size_t)vocab, vocab, part, fpart, ipart};
    const struct ksample_row r = rows[blockIdx.x];
    const int32_t tok = ks_draw_row<P>(row, r);
    if (threadIdx.x == 0)
        tokens[blockIdx.x] = tok;
}

/* Launches plain bisection (`simple`: one probe per pass) or the 15-probe search over n_rows
 * CTAs; returns the launch's error (cudaGetLastError), so that the self-test can record it where
 * ksample aborts. */
static cudaError_t ks_launch(bool simple, float *logits, int n_rows, int vocab,
                             const struct ksample_row *rows, int32_t *tokens, cudaStream_t stream)
{
    if (simple)
        ks_kernel<1><<<(unsigned)n_rows, KS_THREADS, 0, stream>>>(logits, vocab, rows, tokens);
    else
        ks_kernel<KS_PROBES>
            <<<(unsigned)n_rows, KS_THREADS, 0, stream>>>(logits, vocab, rows, tokens);
    return cudaGetLastError();
}

size_t ksample_workspace_bytes(int max_rows, int vocab)
{
    (void)max_rows;
    (void)vocab;
    return 0; /* one CTA per row keeps everything in registers and shared memory */
}

void ksample(float *logits, int n_rows, int vocab, const struct ksample_row *rows,
             int32_t *tokens, void *workspace, cudaStream_t stream)
{
    (void)workspace;
    if (n_rows <= 0 || vocab <= 0)
        return;
    if (vocab > KS_MAX_VOCAB) { /* the fixed-point masses would overflow: a caller's bug */
        fprintf(stderr, "itsw: cuda: %s:%d: ksample: vocab %d exceeds %d\n", __FILE__, __LINE__,
                vocab, KS_MAX_VOCAB);
        abort();
    }
    KCUDA(ks_launch(kenv_on("ITS_CUDA_SIMPLE"), logits, n_rows, vocab, rows, tokens,
                    stream));
}

/* ---- host references ---------------------------------------------------------------------- */

/* The same algorithm run on the host: a plain loop per pass over a copy of the row. */
struct ks_host_row {
    float *l;
    int n;

    int32_t argmax()
    {
        float bv = -INFINITY;
        int bi = -1;
        for (int i = 0; i < n; i++)
            if (l[i] > bv || (l[i] == bv && bi < 0)) {
                bv = l[i];
                bi = i;
            }
        return bi < 0 || !(bv > -INFINITY) ? -1 : bi;
    }

    float max_logit()
    {
        float m = -INFINITY;
        for (int i = 0; i < n; i++)
            m = l[i] > m ? l[i] : m;
        return m;
    }

    template <int N, class F>
    void sum(F f, ks_u64 (&out)[N])
    {
        for (int j = 0; j < N; j++)
            out[j] = 0;
        for (int i = 0; i < n; i++)
            f(l[i], i, out);
    }

    template <class G>
    void transform(G g)
    {
        for (int i = 0; i < n; i++)
            l[i] = g(l[i]);
    }

    int32_t nth(uint32_t key, ks_u64 j)
    {
        for (int i = 0; i < n; i++)
            if (ks_bits(l[i]) == key && --j == 0)
                return i;
        return -1;
    }
};

/* ks_draw_row on the host; `scratch` (vocab floats) receives the probabilities. */
static int32_t ks_host_draw(const float *logits, int vocab, const struct ksample_row *r,
                            float *scratch)
{
    memcpy(scratch, logits, (size_t)vocab * sizeof *scratch);
    ks_host_row row = {scratch, vocab};
    return ks_draw_row<KS_PROBES>(row, *r);
}

struct ks_pv {
    float p;
    int32_t id;
};

static int ks_cmp_pv(const void *a, const void *b)
{
    const ks_pv *x = (const ks_pv *)a, *y = (const ks_pv *)b;
    if (x->p != y->p)
        return x->p > y->p ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static int ks_cmp_desc(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* A brute-force mirror of workers/sampler.c's definition (sampler.h): sort the candidates by
 * (probability desc, id asc), sum in double in that order, walk. *margin gets how close
 * (relative to the mass involved) a deciding cumulative sum came to its target; a device
 * choice may differ from this one only where that is within rounding. `scratch` holds vocab
 * floats and vocab ks_pv. */
static int32_t ks_ref_row(const float *l, int n, const struct ksample_row *r, double *margin,
                          void *scratch)
{
    *margin = INFINITY;
    if (r->temperature == 0.0f || r->top_k == 1) {
        int best = -1;
        for (int i = 0; i < n; i++)
            if (l[i] == l[i] && (best < 0 || l[i] > l[best]))
                best = i;
        return best < 0 || !(l[best] > -INFINITY) ? -1 : best;
    }
    float m = -INFINITY;
    for (int i = 0; i < n; i++)
        m = l[i] > m ? l[i] : m;
    if (!ks_finite(m))
        return -1;
    float *f = (float *)scratch;
    ks_pv *c = (ks_pv *)(f + n);
    float thr = -INFINITY;
    if (r->top_k > 0) {
        int nf = 0;
        for (int i = 0; i < n; i++)
            if (ks_finite(l[i]))
                f[nf++] = l[i];
        qsort(f, (size_t)nf, sizeof *f, ks_cmp_desc);
        if (nf >= r->top_k)
            thr = f[r->top_k - 1];
    }
    const float inv_t = 1.0f / r->temperature;
    int nc = 0;
    for (int i = 0; i < n; i++)
        if (r->top_k == 0 || (l[i] >= thr && l[i] > -INFINITY)) {
            c[nc].p = draw_prob(l[i], m, inv_t);
            c[nc].id = i;
            nc++;
        }
    qsort(c, (size_t)nc, sizeof *c, ks_cmp_pv);
    double total = 0;
    for (int i = 0; i < nc; i++)
        total += c[i].p;
    if (r->top_p < 1.0f) {
        double target = (double)r->top_p * total, acc = 0;
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
    double target = draw_uniform(r->seed, r->stream, r->step) * kept, acc = 0;
    for (int i = 0; i < nc; i++) {
        double before = acc;
        acc += c[i].p;
        if (acc > target) {
            *margin = fmin(*margin, fmin(fabs(acc - target), fabs(before - target)) / kept);
            return c[i].id;
        }
    }
    *margin = 0; /* rounding: the last candidate with mass */
    for (int i = nc - 1; i >= 0; i--)
        if (c[i].p > 0)
            return c[i].id;
    return c[0].id;
}

/* ---- self-test suite ---------------------------------------------------------------------- */

static int ks_try(struct kst *t, cudaError_t rc, const char *file, int line, const char *call)
{
    if (rc == cudaSuccess)
        return 0;
    kst_check(t, 0, "%s:%d: %s: %s (%s)", file, line, call, cudaGetErrorString(rc),
              cudaGetErrorName(rc));
    return -1;
}
#define KS_TRY(t, call) ks_try((t), (call), __FILE__, __LINE__, #call)

/* Fills row r of a case: logits of several kinds (spread, ties on a grid, NaN and -inf
 * sprinkled, one peak, and the degenerate rows) and its parameters. */
static void ks_make_row(struct kst *t, float *l, int n, int r, struct ksample_row *p, float *tmp)
{
    static const float temps[] = {0.5f, 0.8f, 1.0f, 1.7f};
    static const float top_ps[] = {1.0f, 0.95f, 0.9f, 0.5f};
    const int top_ks[] = {0, 50, 1000, n + 3, 0};
    kst_fill_uniform(t, tmp, 4, 0.0f, 1.0f);
    float scale = 0.3f + 8.0f * tmp[0];
    kst_fill_uniform(t, l, (size_t)n, -scale, scale);
    const int kind = r % 7;
    for (int i = 0; i < n; i++) {
        if (kind == 1)
            l[i] = roundf(l[i] * 2.0f) * 0.5f; /* a grid: ties at every edge */
        if (kind == 2 && (i * 2654435761u + (unsigned)r) % 23u == 0)
            l[i] = i % 2 ? NAN : -INFINITY;
    }
    if (kind == 3)
        l[(int)(tmp[1] * (float)(n - 1))] += 12.0f; /* a peak */
    if (r % 21 == 4) { /* degenerate rows: all NaN, all -inf, a +inf */
        const int deg = (r / 21) % 3;
        for (int i = 0; i < n; i++)
            l[i] = deg == 0 ? NAN : (deg == 1 ? -INFINITY : l[i]);
        if (deg == 2)
            l[n / 2] = INFINITY;
    }
    memset(p, 0, sizeof *p);
    if (r % 5 == 0) {
        p->temperature = r % 10 == 0 ? 0.0f : 0.7f;
        p->top_p = 1.0f;
        p->top_k = r % 10 == 0 ? 0 : 1;
    } else {
        p->temperature = temps[r % 4];
        p->top_p = top_ps[(r / 3) % 4];
        p->top_k = top_ks[(r / 2) % 5];
    }
    p->seed = t->seed;
    p->stream = (uint64_t)r;
    p->step = (uint64_t)r * 7u + 3u;
}

/* One case: n_rows rows of `vocab`, the device buffer starting `offset` floats into its
 * allocation (rows of an odd vocab start at every alignment anyway). Runs both kernels: the
 * 15-probe one, and plain bisection (ITS_CUDA_SIMPLE=1, the fallback on a GPU day) on a fresh
 * copy of the logits (the first run overwrote them). */
static void ks_case(struct kst *t, cudaStream_t s, int vocab, int n_rows, int offset)
{
    const size_t n = (size_t)n_rows * (size_t)vocab;
    float *h_l = (float *)malloc(n * sizeof(float));
    struct ksample_row *h_rows = (struct ksample_row *)calloc((size_t)n_rows, sizeof *h_rows);
    int32_t *h_tok = (int32_t *)malloc(2 * (size_t)n_rows * sizeof(int32_t)); /* fast, simple */
    void *scratch = malloc((size_t)vocab * (sizeof(float) + sizeof(ks_pv)));
    float *d_l = NULL;
    struct ksample_row *d_rows = NULL;
    int32_t *d_tok = NULL;
    if (!h_l || !h_rows || !h_tok || !scratch) {
        kst_check(t, 0, "vocab %d: host out of memory", vocab);
        goto out;
    }
    for (int r = 0; r < n_rows; r++) {
        float tmp[4];
        ks_make_row(t, h_l + (size_t)r * vocab, vocab, r, &h_rows[r], tmp);
    }
    if (KS_TRY(t, cudaMalloc(&d_l, (n + (size_t)offset) * sizeof(float))) ||
        KS_TRY(t, cudaMalloc(&d_rows, (size_t)n_rows * sizeof *d_rows)) ||
        KS_TRY(t, cudaMalloc(&d_tok, 2 * (size_t)n_rows * sizeof *d_tok)) ||
        KS_TRY(t, cudaMemcpyAsync(d_l + offset, h_l, n * sizeof(float), cudaMemcpyHostToDevice,
                                  s)) ||
        KS_TRY(t, cudaMemcpyAsync(d_rows, h_rows, (size_t)n_rows * sizeof *d_rows,
                                  cudaMemcpyHostToDevice, s)) ||
        KS_TRY(t, cudaMemsetAsync(d_tok, 0x7f, 2 * (size_t)n_rows * sizeof *d_tok, s)) ||
        KS_TRY(t, ks_launch(false, d_l + offset, n_rows, vocab, d_rows, d_tok, s)) ||
        KS_TRY(t, cudaMemcpyAsync(d_l + offset, h_l, n * sizeof(float), cudaMemcpyHostToDevice,
                                  s)) ||
        KS_TRY(t, ks_launch(true, d_l + offset, n_rows, vocab, d_rows, d_tok + n_rows, s)) ||
        KS_TRY(t, cudaStreamSynchronize(s)) ||
        KS_TRY(t, cudaMemcpy(h_tok, d_tok, 2 * (size_t)n_rows * sizeof *h_tok,
                             cudaMemcpyDeviceToHost)))
        goto out;
    {
        int greedy_bad = 0, emul_bad = 0, simple_bad = 0, sampled = 0, differ = 0, far = 0;
        int first = -1;
        int32_t first_got = 0, first_want = 0;
        double first_margin = 0;
        for (int r = 0; r < n_rows; r++) {
            const float *l = h_l + (size_t)r * vocab;
            const struct ksample_row *p = &h_rows[r];
            double margin;
            int32_t want = ks_ref_row(l, vocab, p, &margin, scratch);
            int32_t emul = ks_host_draw(l, vocab, p, (float *)scratch);
            int32_t got = h_tok[r];
            emul_bad += got != emul;
            simple_bad += h_tok[n_rows + r] != emul;
            if (p->temperature == 0.0f || p->top_k == 1 || want < 0) {
                greedy_bad += got != want;
                if (got != want && first < 0) {
                    first = r;
                    first_got = got;
                    first_want = want;
                    first_margin = 0;
                }
                continue;
            }
            sampled++;
            if (got != want) {
                differ++;
                if (!(margin < 1e-6)) {
                    far++;
                    if (first < 0) {
                        first = r;
                        first_got = got;
                        first_want = want;
                        first_margin = margin;
                    }
                }
            }
        }
        kst_check(t, greedy_bad == 0 && far == 0,
                  "ksample vocab %d, %d rows (offset %d): %d greedy/degenerate rows wrong, %d "
                  "sampled rows away from any boundary wrong; first row %d: token %d, host %d "
                  "(T %g top_p %g top_k %d, margin %.3g)", vocab, n_rows, offset, greedy_bad,
                  far, first, (int)first_got, (int)first_want,
                  first >= 0 ? (double)h_rows[first].temperature : 0.0,
                  first >= 0 ? (double)h_rows[first].top_p : 0.0,
                  first >= 0 ? h_rows[first].top_k : 0, first_margin);
        kst_check(t, (size_t)differ * 1000 <= (size_t)sampled,
                  "ksample vocab %d: %d of %d sampled rows differ from the host (> 0.1%%)", vocab,
                  differ, sampled);
        kst_check(t, emul_bad == 0,
                  "ksample vocab %d: %d of %d rows differ from the same algorithm run on the "
                  "host (exact by construction: a device-mechanics bug)", vocab, emul_bad, n_rows);
        kst_check(t, simple_bad == 0,
                  "ksample vocab %d: %d of %d rows of the simple kernel (ITS_CUDA_SIMPLE=1) "
                  "differ from the same algorithm run on the host", vocab, simple_bad, n_rows);
    }
out:
    /* Every error above is recorded; clear the runtime's last error so that it does not
     * surface in a later launch check (ksample's KCUDA aborts). */
    (void)cudaGetLastError();
    cudaFree(d_l);
    cudaFree(d_rows);
    cudaFree(d_tok);
    free(h_l);
    free(h_rows);
    free(h_tok);
    free(scratch);
}

void kst_suite_sample(struct kst *t)
{
    cudaStream_t s = NULL;
    if (KS_TRY(t, cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)))
        return;
    kst_check(t, ksample_workspace_bytes(256, 128256) == 0, "ksample_workspace_bytes");
    ks_case(t, s, 1, 10, 0);
    ks_case(t, s, 7, 64, 1);
    ks_case(t, s, 1000, 700, 0);
    ks_case(t, s, 4099, 300, 3);   /* ragged: rows start at every alignment */
    ks_case(t, s, 32000, 150, 1);  /* misaligned base */
    ks_case(t, s, 128256, 48, 0);
    ks_case(t, s, 128257, 16, 2);
    cudaStreamDestroy(s);
}
