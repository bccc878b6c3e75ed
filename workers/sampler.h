/* sampler.h — picks the next token from a row of logits: greedy, or temperature with top-k and
 * top-p (Hugging Face semantics), driven by a counter-based uniform (draw.h).
 *
 * Owns only its scratch buffers (sized by the vocabulary). A draw is a pure function of the
 * logits, the parameters and the draw's key, so that a sample's tokens never depend on what
 * else shares the batch, and a device that samples (kernels/sample.h) can pick the same token
 * from the same logits. Never allocates per call, never prints.
 *
 * The function, exactly (the device sampler implements the same definition):
 *  - greedy when temperature is 0 or top_k is 1: the largest logit, the lowest id on ties;
 *  - otherwise, with m the largest non-NaN logit (a row whose m is not finite has no draw):
 *    p[i] = exp((logit[i] - m) * (1 / temperature)) in float, computed by one fixed sequence
 *    of float operations (sampler.c, sampler_exp_neg), 0 for NaN and -inf logits;
 *  - the candidates are every id (top_k 0) or those whose logit is >= the top_k-th largest
 *    finite logit (ties at the edge kept; all finite logits when fewer than top_k are);
 *  - the ORDER is descending p, ties broken by lower id;
 *  - top_p < 1 keeps the shortest prefix of that order whose mass reaches top_p x the
 *    candidates' mass (Hugging Face's TopPLogitsWarper), at least one token;
 *  - with u = draw_uniform(key) and K the kept mass, the token is the first in that order
 *    whose cumulative mass exceeds u x K (should rounding leave none, the last kept token
 *    with a positive probability).
 * Masses are sums in double; their summation order is not part of the definition, so two
 * implementations may differ where a cumulative mass lies within rounding of a boundary.
 */
#ifndef ITS_SAMPLER_H
#define ITS_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

struct sampler_params {
    float temperature; /* 0 = greedy (argmax); otherwise > 0, logits are divided by it */
    float top_p;       /* (0, 1]; 1 = off. Keeps the smallest most-probable set with mass >= top_p */
    int top_k;         /* >= 0; 0 = off. Keeps the top_k largest logits (ties at the edge kept) */
};

/* Names one draw (draw.h): the request's seed, the sample's index within its job (stream) and
 * the index of the token being drawn within the sample (step). */
struct sampler_key {
    uint64_t seed;
    uint64_t stream;
    uint64_t step;
};

/* Checks temperature (finite, >= 0), top_p (in (0, 1]) and top_k (>= 0). Returns 0, or -1
 * with err naming the field and the accepted range. */
int sampler_check_params(const struct sampler_params *p, char *err, size_t err_len);

/* Index of the largest of n logits, the lowest index on ties; NaN entries never win.
 * Returns -1 when n < 1 or every entry is NaN. */
int32_t sampler_argmax(const float *logits, int n);

struct sampler;

/* A sampler for vocabularies of n_vocab entries (scratch of 12 bytes per entry). Returns 0
 * with *out set, or negative with err filled (bad size, out of memory). */
int sampler_new(int n_vocab, struct sampler **out, char *err, size_t err_len);
/* Frees the sampler and clears *s; NULL-safe. */
void sampler_destroy(struct sampler **s);

/* Draws one token from `logits` (n_vocab floats, read only) under params `p` (checked with
 * sampler_check_params first) with the uniform draw_uniform(key) (the function above; greedy
 * ignores the key). Order of filtering as in Hugging Face generate: temperature, then top-k,
 * then top-p on the renormalised remainder. Returns 0 with *token set, or -1 with err filled
 * when the logits hold no finite value (sampling also refuses a +inf logit, whose
 * probabilities are undefined). */
int sampler_sample(struct sampler *s, const float *logits, const struct sampler_params *p,
                   const struct sampler_key *key, int32_t *token, char *err, size_t err_len);

#endif
