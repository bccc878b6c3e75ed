/* draw.h — what a sampled token is drawn with, computed bit for bit alike on the host and on a
 * CUDA device: the uniform, a pure function of (seed, stream, step), and each token's
 * unnormalised probability.
 *
 * Counter-based, so nothing is carried from one draw to the next: the engine names a draw by
 * the request's seed, the sample's index within its job (stream) and the index of the token
 * being drawn within that sample (step), and a backend that samples on its device computes
 * the very same number from the same three values. Owns nothing; header only, so that
 * workers/ (C: sampler.c) and kernels/ (CUDA: sample.cu) compile the same code.
 *
 * The function: a 64-bit state built from the three values by three rounds of the SplitMix64
 * finaliser (Stafford's "mix13" constants, a bijection of 64-bit words):
 *     x = mix(seed + G1);  x = mix(x + (stream + 1) * G2);  x = mix(x + (step + 1) * G3)
 * with odd constants G1..G3, and the top 53 bits of x scaled into [0, 1). For a fixed
 * (seed, stream), step -> x is SplitMix64's own output sequence (a Weyl sequence of gamma G3
 * through the finaliser, which passes BigCrush) started at a point that depends on seed and
 * stream through two more full mixes; a change in any of the three values therefore reaches
 * every output bit.
 */
#ifndef ITS_DRAW_H
#define ITS_DRAW_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define DRAW_FN static inline __host__ __device__
#else
#define DRAW_FN static inline
#endif

/* SplitMix64's finaliser: a bijection on 64-bit words with full avalanche. */
DRAW_FN uint64_t draw_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* 64 random bits for draw (seed, stream, step). */
DRAW_FN uint64_t draw_bits(uint64_t seed, uint64_t stream, uint64_t step)
{
    uint64_t x = draw_mix64(seed + 0x9E3779B97F4A7C15ull);
    x = draw_mix64(x + (stream + 1) * 0xD1B54A32D192ED03ull);
    return draw_mix64(x + (step + 1) * 0xDB4F0B9175AE2165ull);
}

/* A uniform double in [0, 1) with 53 random bits (a multiple of 2^-53; 0 is possible, 1 is
 * not). */
DRAW_FN double draw_uniform(uint64_t seed, uint64_t stream, uint64_t step)
{
    return (double)(draw_bits(seed, stream, step) >> 11) * 0x1.0p-53;
}

/* exp(x) for x <= 0 by Cody-Waite reduction and a degree-6 polynomial (about 2 ulp); 0 below
 * -87.3 (where float underflows) and for NaN. Every step is one correctly rounded float
 * operation written out (fmaf where fused, no a * b + c left for a compiler to contract), so
 * any IEEE machine gives the same bits; sampler.c's AVX2 copy performs the same operations. */
DRAW_FN float draw_exp_neg(float x)
{
    if (!(x >= -87.3f))
        return 0.0f;
    float n = nearbyintf(x * 1.44269504f);
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    float pr = p * r;
    float y = fmaf(pr, r, r) + 1.0f;
    union {
        uint32_t u;
        float f;
    } sc;
    sc.u = (uint32_t)((int32_t)n + 127) << 23; /* x >= -87.3 keeps n >= -126: a normal scale */
    return y * sc.f;
}

/* A token's unnormalised probability: exp((logit - max) * inv_t), where max is the row's
 * largest non-NaN logit (finite) and inv_t = 1.0f / temperature rounded to float; in (0, 1],
 * exactly 1 for the max, 0 for NaN and -inf logits (and where it underflows). */
DRAW_FN float draw_prob(float logit, float max, float inv_t)
{
    return draw_exp_neg((logit - max) * inv_t);
}

#undef DRAW_FN

#endif
