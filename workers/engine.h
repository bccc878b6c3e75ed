/* engine.h — the inference engine: jobs of token ids in, sampled token ids and scores out,
 * run by a continuous-batching scheduler over one backend and a paged, prefix-shared KV cache.
 *
 * Owns the backend it runs on, the KV block bookkeeping, the sampler and every job until its
 * result is taken. Knows nothing of text, chat formats, sockets or the ITS method: callers
 * tokenize above it. Single-threaded: one caller thread drives every function of one engine
 * (the worker daemon steps it from its loop). Never prints, never exits.
 *
 * How a job runs:
 * - generate (prompt, n samples): the prompt is prefilled ONCE (in chunks of at most
 *   max_batch_tokens - max_seqs tokens); then the n samples fork: each holds the prompt's KV
 *   blocks read-only (refcounted), and the partly filled last block is copied per sample
 *   (copy-on-write) before a sample writes into it. Each draw's uniform is a pure function of
 *   (seed, sample index, token index) (draw.h), so a sample's tokens depend only on the
 *   prompt, the parameters and the seed, never on what else shares the batch (given a
 *   batch-invariant backend). A backend with BACKEND_CAP_SAMPLE draws on its device
 *   (FWD_SAMPLE, the same function), except the first ids of a job of several samples, which
 *   the host draws from the shared prefill's one row of logits.
 * - score (conversations): the longest common prefix, rounded down to whole KV blocks, is
 *   prefilled once and shared; then each conversation's suffix; each yields the logit of
 *   vocabulary id 0 at its last position (the Nemotron Reward/Select convention).
 * - logits (prompt): all vocab_size logits at the last position.
 * - across jobs: every full KV block is published under a key naming its whole prefix of
 *   tokens; a later sequence whose tokens begin the same way takes those blocks instead of
 *   prefilling them (until their memory is needed, least recently used first). Edit jobs that
 *   share a conversation and draft, or score jobs that share a prompt, prefill it once.
 * Each engine_step() admits queued jobs while sequence slots and KV blocks allow, builds one
 * batch of decode tokens and prefill chunks (oldest jobs first), runs one forward, samples and
 * retires what finished, so jobs join and leave the batch between steps. When KV blocks run
 * out, the youngest work is preempted (its blocks dropped, recomputed later) so the oldest
 * always progresses; nothing fails for lack of memory once a job has been accepted.
 */
#ifndef ITS_ENGINE_H
#define ITS_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "model.h"

struct checkpoint;
struct engine;

#define ENGINE_DEFAULT_MAX_SEQS 16
#define ENGINE_DEFAULT_KV_TOKENS 32768
#define ENGINE_DEFAULT_MAX_BATCH_TOKENS 512

struct engine_params {
    const char *backend;  /* "cpu" (also when NULL) or "cuda" */
    int max_seqs;         /* sequences alive at once (samples + conversations); 0 = default.
                           * A generate job's n may not exceed it. */
    int kv_tokens;        /* KV pool size in token positions (rounded up to whole blocks of
                           * BACKEND_BLOCK_TOKENS); 0 = default */
    int max_batch_tokens; /* tokens one step may forward; must exceed max_seqs because each
                           * step keeps max_seqs tokens of room for decodes; 0 = default
                           * (the larger of 512 and 2 * max_seqs) */
    int n_threads;        /* cpu backend threads; 0 = every online core */
    int device;           /* cuda device ordinal */
    int prefix_cache_off; /* nonzero: never reuse KV blocks across jobs */
};

struct engine_sampling {
    float temperature; /* >= 0; 0 = greedy */
    float top_p;       /* (0, 1]; 1 = off */
    int top_k;         /* >= 0; 0 = off */
    uint64_t seed;     /* sample i's t-th token is drawn with draw_uniform(seed, i, t) */
    int max_tokens;    /* >= 1: most tokens generated per sample (the stop token included) */
    int ignore_eos;    /* nonzero: do not stop on the model's EOS ids */
};

enum engine_job_kind {
    ENGINE_JOB_GENERATE = 0,
    ENGINE_JOB_SCORE = 1,
    ENGINE_JOB_LOGITS = 2,
};

enum engine_status {
    ENGINE_JOB_OK = 0,
    ENGINE_JOB_CANCELLED = 1,
    ENGINE_JOB_FAILED = 2, /* the backend or the sampler failed; error says why */
};

enum engine_finish {
    ENGINE_FINISH_STOP = 0,      /* drew an EOS id (not included in ids) */
    ENGINE_FINISH_LENGTH = 1,    /* max_tokens reached, or the model's context is full */
    ENGINE_FINISH_CANCELLED = 2, /* cancelled (or failed) before it finished */
};

/* "stop", "length", "cancelled". */
const char *engine_finish_name(enum engine_finish f);

struct engine_output {
    const int32_t *ids; /* n_ids generated ids, without the EOS that stopped the sample;
                         * points into the result's storage */
    int n_ids;
    enum engine_finish finish;
};

/* A finished job, owned by the caller once taken; free with engine_result_free. */
struct engine_result {
    uint64_t job_id;
    enum engine_job_kind kind;
    enum engine_status status;
    char error[256];               /* ENGINE_JOB_FAILED: what failed */
    int n_outputs;                 /* generate: n samples, in sample order */
    struct engine_output *outputs;
    int n_scores;                  /* score: one per conversation, in input order; NaN for a
                                    * conversation a cancel or failure left unscored */
    float *scores;
    int n_logits;                  /* logits: vocab_size floats of the last position */
    float *logits;
    int prompt_tokens;             /* input ids of the job (every conversation counted) */
    int completion_tokens;         /* ids drawn over all samples, stop tokens included */
    int32_t *ids_storage_;         /* private: what outputs[].ids point into */
};

/* Frees a result and clears *r; NULL-safe. */
void engine_result_free(struct engine_result **r);

struct engine_stats {
    uint64_t prompt_tokens;  /* input positions forwarded (prompts, conversations), counting
                              * shared prefixes once and recomputation after preemption again */
    uint64_t cached_tokens;  /* positions taken from the prefix cache instead of forwarded */
    uint64_t decode_tokens;  /* generated positions forwarded */
    uint64_t steps;          /* engine_step calls that ran a forward */
    uint64_t preemptions;    /* sequences whose KV was dropped to be recomputed later */
    uint64_t copied_blocks;  /* copy-on-write block copies */
    uint64_t jobs_done;      /* jobs finished, cancelled or failed */
};

/* Opens backend params->backend over `ck` and builds an engine on it; `ck` must outlive the
 * engine. params NULL = all defaults. Returns 0 with *out set, or negative with err naming the
 * bad parameter or what failed to open. */
int engine_new(const struct checkpoint *ck, const struct engine_params *params,
               struct engine **out, char *err, size_t err_len);

/* As engine_new over an already open backend, which the engine takes over: *be is cleared
 * whether or not this succeeds (on failure the backend is destroyed). params->backend,
 * n_threads and device are ignored; kv_tokens is ignored in favour of (*be)->n_kv_blocks.
 * Used by tests and benchmarks. */
int engine_new_with_backend(struct backend **be, const struct engine_params *params,
                            struct engine **out, char *err, size_t err_len);

/* Destroys the engine, every job and every result not taken, and the backend; clears *e;
 * NULL-safe. */
void engine_destroy(struct engine **e);

/* Capacity, as announced to the orchestrator. */
const struct model_config *engine_config(const struct engine *e);
int engine_max_seqs(const struct engine *e);
/* Longest prompt + output one sequence may reach: the model's max_seq_len, or the KV pool if
 * smaller. */
int engine_max_context(const struct engine *e);
int engine_kv_tokens(const struct engine *e); /* KV pool size in positions */
int engine_kv_blocks_total(const struct engine *e);
/* Blocks no sequence holds (cached ones included: they are reclaimed as needed). */
int engine_kv_blocks_free(const struct engine *e);
const char *engine_backend_name(const struct engine *e);
void engine_get_stats(const struct engine *e, struct engine_stats *out);

/* Job ids are the caller's; one may not be reused while its job is queued, running or has a
 * result not taken. Ids >= 2^63 are reserved for the synchronous helpers below.
 *
 * Every add function copies its inputs, checks them, and on success queues the job (it runs
 * as engine_step is called). Errors name the field or limit, for example "prompt is 9000
 * tokens; the model's limit is 8192 (max_position_embeddings)". Returns 0 or negative. */

/* n samples (1..max_seqs) continuing `prompt` (n_prompt ids, each < vocab_size), sharing one
 * prefill. The prompt must be shorter than the model's max_seq_len, and prompt plus
 * max_tokens (capped at max_seq_len) must fit the KV pool. */
int engine_add_generate(struct engine *e, uint64_t job_id, const int32_t *prompt, int n_prompt,
                        int n, const struct engine_sampling *sampling, char *err,
                        size_t err_len);

/* One score per conversation: convs[i] holds conv_lens[i] ids (1..max_seq_len, fitting the KV
 * pool). Conversations sharing a prefix share its prefill. */
int engine_add_score(struct engine *e, uint64_t job_id, const int32_t *const *convs,
                     const int *conv_lens, int n_convs, char *err, size_t err_len);

/* All logits at the last position of `prompt` (1..max_seq_len ids). */
int engine_add_logits(struct engine *e, uint64_t job_id, const int32_t *prompt, int n_prompt,
                      char *err, size_t err_len);

/* Cancels a queued or running job: its sequences and KV blocks are freed at once and its
 * result (status ENGINE_JOB_CANCELLED, with the ids generated so far, finish "cancelled")
 * becomes ready to take. Returns 0, 1 when the job had already finished (nothing changes), or
 * -1 for an unknown id. */
int engine_cancel(struct engine *e, uint64_t job_id);

/* One scheduler step (see the top of this file). Returns 1 when a batch ran, 0 when there was
 * nothing to run, negative with err filled when the backend failed (the jobs of that batch
 * then finish as ENGINE_JOB_FAILED; others are untouched) or the scheduler found no runnable
 * sequence while jobs wait (an internal error). */
int engine_step(struct engine *e, char *err, size_t err_len);

/* Jobs queued or running (0 = engine_step has nothing to do). */
int engine_pending(const struct engine *e);

/* Takes the result of job_id. Returns 1 with *out set (the caller owns it), 0 with *out NULL
 * when the job has not finished yet, -1 for an unknown id. */
int engine_take_result(struct engine *e, uint64_t job_id, struct engine_result **out);
/* Takes the oldest finished result of any job. Returns 1 with *out set, 0 when none. */
int engine_next_result(struct engine *e, struct engine_result **out);

/* Streaming: called during engine_step for every id drawn, in order per sample. `finished`
 * is nonzero when this draw ended the sample, with `finish` saying why (for
 * ENGINE_FINISH_STOP the id is the EOS drawn, which the result leaves out). The callback must
 * not call into the engine. fn NULL turns it off. */
typedef void (*engine_token_fn)(void *ud, uint64_t job_id, int sample, int32_t token,
                                int finished, enum engine_finish finish);
void engine_set_token_callback(struct engine *e, engine_token_fn fn, void *ud);

/* Synchronous helpers for the command line: each queues one job, steps the engine until that
 * job finishes (running any other queued jobs alongside) and returns its outcome.
 * engine_generate: *out gets the result (caller frees); a failed job returns negative with
 * err filled and no result. */
int engine_generate(struct engine *e, const int32_t *prompt, int n_prompt, int n,
                    const struct engine_sampling *sampling, struct engine_result **out,
                    char *err, size_t err_len);
/* scores_out: n_convs floats. */
int engine_score(struct engine *e, const int32_t *const *convs, const int *conv_lens,
                 int n_convs, float *scores_out, char *err, size_t err_len);
/* logits_out: vocab_size floats. */
int engine_logits(struct engine *e, const int32_t *prompt, int n_prompt, float *logits_out,
                  char *err, size_t err_len);

#endif
