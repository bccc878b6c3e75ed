/* fwd_check.h — the validation every backend shares: model config and weight views at open,
 * and the arguments of one forward call.
 *
 * Plain C with no I/O and no allocation, so that the CPU backend and the cuda plugin
 * (libits_cuda.so, which compiles this file too) refuse exactly the same inputs with exactly
 * the same messages. Never prints, never exits.
 */
#ifndef ITS_FWD_CHECK_H
#define ITS_FWD_CHECK_H

#include <stddef.h>

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Hyperparameters a Llama forward can run: positive sizes, GQA divisibility, an even head_dim,
 * sane eps/theta and llama3 RoPE scaling. Returns 0, or -1 with err naming the fields. */
int fwd_check_config(const struct model_config *c, char *err, size_t err_len);

/* Every weight view present, of a supported dtype (F32, F16, BF16) and of the shape the config
 * implies. Returns 0, or -1 with err naming the tensor (model.layers.N.<name>). */
int fwd_check_weights(const struct model_config *c, const struct model_weights *w, char *err,
                      size_t err_len);

/* Per-block stamps that catch a block written by one sequence and used by another within one
 * call. The backend owns both arrays, n_kv_blocks entries each, zero-initialised. */
struct fwd_stamps {
    unsigned *blk_call; /* (n_kv_blocks) call id of the last call that wrote the block */
    int *blk_writer;    /* (n_kv_blocks) the sequence that wrote it in that call */
    unsigned call_id;
};

/* Validates a forward call against be->cfg, be->n_kv_blocks and be->caps: 1..max_seqs
 * sequences, at most max_tokens tokens in all, positions below max_ctx, token ids in the
 * vocabulary, known output kinds (FWD_SAMPLE only where be->caps has BACKEND_CAP_SAMPLE, with
 * `sample` and `token` set), a block table long enough and inside the pool, and no block both
 * written by one sequence and used by another. Returns 0 with *n_tokens_out = the call's
 * tokens, or -1 with err naming the sequence and field. Updates the stamps. */
int fwd_check_call(const struct backend *be, const struct fwd_seq *seqs, int n_seqs,
                   int max_seqs, int max_tokens, int max_ctx, struct fwd_stamps *st,
                   int *n_tokens_out, char *err, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif
