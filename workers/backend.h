/* backend.h — the compute interface every backend (cpu, cuda) implements, and how the engine
 * opens one by name.
 *
 * A backend owns the device copies of the weights it needs, its scratch buffers and the KV
 * cache storage: a pool of fixed-size blocks of BACKEND_BLOCK_TOKENS positions each. Which
 * block belongs to which sequence is the engine's business (block tables of int ids); the
 * backend only reads and writes the blocks a forward call names. It knows nothing of
 * sampling policy, requests or jobs.
 */
#ifndef ITS_BACKEND_H
#define ITS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"

#define BACKEND_BLOCK_TOKENS 16

struct backend;

struct backend_params {
    int n_kv_blocks;   /* KV pool size in blocks; 0 = derive from kv_tokens */
    int kv_tokens;     /* KV pool size in positions, rounded up to whole blocks */
    int max_batch_tokens; /* most tokens one forward call may carry (sizes scratch) */
    int max_batch_seqs;   /* most sequences one forward call may carry */
    int n_threads;     /* cpu: worker threads for the matrix work; 0 = online cores */
    int device;        /* cuda: device ordinal */
};

enum fwd_output {
    FWD_NONE = 0,    /* nothing (a prefill chunk whose logits nobody needs) */
    FWD_LAST = 1,    /* vocab_size floats: logits of the last new position */
    FWD_ALL = 2,     /* n_tokens * vocab_size floats: logits of every new position */
    FWD_LOGIT0 = 3,  /* 1 float: logit of vocabulary id 0 at the last new position (scoring) */
    FWD_SAMPLE = 4,  /* 1 int32 in `token`: the id drawn from the last new position's logits
                      * under `sample`; only backends with BACKEND_CAP_SAMPLE accept it */
};

/* What FWD_SAMPLE draws with. The draw is a pure function of the logits, these parameters and
 * (seed, stream, step) — the same function the engine's host sampler computes (sampler.h) — so
 * a backend that samples on its device picks what the host would have picked from the same
 * logits, up to floating-point summation order. */
struct fwd_sample {
    float temperature; /* 0 = greedy */
    float top_p;       /* (0, 1]; 1 = off */
    int top_k;         /* >= 0; 0 = off */
    uint64_t seed;     /* the request's seed */
    uint64_t stream;   /* the sample's index within its job */
    uint64_t step;     /* the index of the token being drawn within the sample */
};

/* backend.caps bits */
#define BACKEND_CAP_SAMPLE 1u /* forward accepts FWD_SAMPLE */

/* One sequence's share of a forward call. Its first `pos` positions are already in the KV
 * blocks; the call writes K/V for positions [pos, pos + n_tokens) and attends causally over
 * [0, pos + n_tokens). block_table[i] holds positions [i*BLOCK, (i+1)*BLOCK); it has
 * n_blocks entries, which must cover pos + n_tokens positions (a backend reads no entry at or
 * past n_blocks, and rejects a call whose table is too short). Blocks may be shared read-only
 * between sequences (prefix sharing) as long as no call writes into a shared block. */
struct fwd_seq {
    const int32_t *tokens;      /* n_tokens ids, each < vocab_size */
    int n_tokens;               /* >= 1 */
    int pos;                    /* >= 0 */
    const int32_t *block_table; /* n_blocks ids, each in 0..n_kv_blocks-1 */
    int n_blocks;               /* entries in block_table; must be
                                 * >= ceil((pos + n_tokens) / BACKEND_BLOCK_TOKENS) */
    enum fwd_output output;
    float *out;                 /* caller-owned, sized per `output` (unused for FWD_SAMPLE) */
    const struct fwd_sample *sample; /* FWD_SAMPLE only */
    int32_t *token;                  /* FWD_SAMPLE only: caller-owned, receives the drawn id */
};

struct backend_ops {
    const char *name;
    /* Runs every sequence of `seqs` one step; 0 or negative with err filled. */
    int (*forward)(struct backend *be, const struct fwd_seq *seqs, int n_seqs,
                   char *err, size_t err_len);
    /* Copies all layers' K/V of block `src` into block `dst` (copy-on-write). */
    int (*copy_block)(struct backend *be, int src, int dst, char *err, size_t err_len);
    void (*destroy)(struct backend *be);
};

/* Every backend embeds this header first. */
struct backend {
    const struct backend_ops *ops;
    const struct model_config *cfg; /* borrowed from the checkpoint, which outlives us */
    int n_kv_blocks;
    unsigned caps;                  /* BACKEND_CAP_* */
};

struct checkpoint;

/* Opens backend `name` ("cpu" or "cuda") over the checkpoint's weights. The checkpoint must
 * outlive the backend. "cuda" is loaded from the libits_cuda.so plugin at run time; where the
 * plugin, driver or device is missing, it fails with err saying which. */
int backend_open(const char *name, const struct checkpoint *ck, const struct backend_params *p,
                 struct backend **out, char *err, size_t err_len);
/* Opens backend `name` with random weights of cfg's shape that the backend creates itself, on
 * its device (benchmarks and load tests of big shapes: no host copy of the weights is made).
 * Only "cuda" supports it; other names fail with err saying so. `cfg` is copied: it need not
 * outlive the backend. */
int backend_open_random(const char *name, const struct model_config *cfg, uint64_t seed,
                        const struct backend_params *p, struct backend **out, char *err,
                        size_t err_len);
/* Frees the backend and clears *be; NULL-safe. */
void backend_destroy(struct backend **be);

#endif
