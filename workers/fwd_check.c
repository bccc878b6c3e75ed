/* fwd_check.c — validation shared by every backend (fwd_check.h): the model at open, the
 * arguments of each forward call.
 *
 * Moved out of backend_cpu.c unchanged so that the cuda plugin refuses the same inputs with the
 * same messages. Pure functions over their arguments (plus the caller's stamp arrays); never
 * prints, never allocates.
 */
#include "fwd_check.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>

#define FWD_BLOCK BACKEND_BLOCK_TOKENS

static int fwd_check_tensor(const struct tensor *t, int layer, const char *name, int64_t d0,
                            int64_t d1, char *err, size_t err_len)
{
    char where[96];
    if (layer >= 0)
        snprintf(where, sizeof where, "model.layers.%d.%s", layer, name);
    else
        snprintf(where, sizeof where, "%s", name);
    if (!t->data) {
        snprintf(err, err_len, "%s: no data", where);
        return -1;
    }
    if (t->dtype != DTYPE_F32 && t->dtype != DTYPE_F16 && t->dtype != DTYPE_BF16) {
        snprintf(err, err_len, "%s: unsupported dtype %d", where, (int)t->dtype);
        return -1;
    }
    int ok = d1 == 0 ? (t->n_dims == 1 && t->shape[0] == d0) ||
                           (t->n_dims == 2 && t->shape[0] == d0 && t->shape[1] == 1)
                     : t->n_dims == 2 && t->shape[0] == d0 && t->shape[1] == d1;
    if (!ok) {
        if (d1 == 0)
            snprintf(err, err_len, "%s: shape (%lld, %lld), expected (%lld)", where,
                     (long long)t->shape[0], (long long)t->shape[1], (long long)d0);
        else
            snprintf(err, err_len, "%s: shape (%lld, %lld), expected (%lld, %lld)", where,
                     (long long)t->shape[0], (long long)t->shape[1], (long long)d0,
                     (long long)d1);
        return -1;
    }
    return 0;
}

int fwd_check_config(const struct model_config *c, char *err, size_t err_len)
{
    if (c->vocab_size < 1 || c->dim < 1 || c->ffn_dim < 1 || c->n_layers < 1 ||
        c->n_heads < 1 || c->n_kv_heads < 1 || c->head_dim < 2 || c->max_seq_len < 1) {
        snprintf(err, err_len,
                 "model config: vocab_size %d, dim %d, ffn_dim %d, n_layers %d, n_heads %d, "
                 "n_kv_heads %d, head_dim %d, max_seq_len %d must all be positive",
                 c->vocab_size, c->dim, c->ffn_dim, c->n_layers, c->n_heads, c->n_kv_heads,
                 c->head_dim, c->max_seq_len);
        return -1;
    }
    if (c->n_heads % c->n_kv_heads != 0) {
        snprintf(err, err_len, "model config: n_heads %d is not a multiple of n_kv_heads %d",
                 c->n_heads, c->n_kv_heads);
        return -1;
    }
    if (c->head_dim % 2 != 0) {
        snprintf(err, err_len, "model config: head_dim %d must be even (RoPE pairs)",
                 c->head_dim);
        return -1;
    }
    if ((int64_t)c->n_heads * c->head_dim > (1 << 20) || c->dim > (1 << 20) ||
        c->ffn_dim > (1 << 22)) {
        snprintf(err, err_len, "model config: dimensions too large (dim %d, ffn_dim %d)",
                 c->dim, c->ffn_dim);
        return -1;
    }
    if (!(c->norm_eps >= 0.0f) || !(c->rope_theta > 0.0f)) {
        snprintf(err, err_len, "model config: rms_norm_eps %g / rope_theta %g out of range",
                 (double)c->norm_eps, (double)c->rope_theta);
        return -1;
    }
    if (c->rope_kind == ROPE_LLAMA3 &&
        (!(c->rope_factor > 0.0f) || !(c->rope_high_freq_factor > c->rope_low_freq_factor) ||
         !(c->rope_low_freq_factor > 0.0f) || c->rope_original_max_pos < 1)) {
        snprintf(err, err_len,
                 "model config: llama3 rope_scaling factor %g, low_freq_factor %g, "
                 "high_freq_factor %g, original_max_position_embeddings %d out of range",
                 (double)c->rope_factor, (double)c->rope_low_freq_factor,
                 (double)c->rope_high_freq_factor, c->rope_original_max_pos);
        return -1;
    }
    if (c->rope_kind != ROPE_DEFAULT && c->rope_kind != ROPE_LLAMA3) {
        snprintf(err, err_len, "model config: unknown rope kind %d", (int)c->rope_kind);
        return -1;
    }
    return 0;
}

int fwd_check_weights(const struct model_config *c, const struct model_weights *w,
                             char *err, size_t err_len)
{
    int64_t qd = (int64_t)c->n_heads * c->head_dim, kvd = (int64_t)c->n_kv_heads * c->head_dim;
    if (fwd_check_tensor(&w->embed, -1, "model.embed_tokens.weight", c->vocab_size, c->dim, err,
                         err_len) ||
        fwd_check_tensor(&w->final_norm, -1, "model.norm.weight", c->dim, 0, err, err_len) ||
        fwd_check_tensor(&w->lm_head, -1, "lm_head.weight", c->vocab_size, c->dim, err,
                         err_len))
        return -1;
    if (!w->layers) {
        snprintf(err, err_len, "model weights: no layers");
        return -1;
    }
    for (int l = 0; l < c->n_layers; l++) {
        const struct layer_weights *L = &w->layers[l];
        if (fwd_check_tensor(&L->attn_norm, l, "input_layernorm.weight", c->dim, 0, err,
                             err_len) ||
            fwd_check_tensor(&L->wq, l, "self_attn.q_proj.weight", qd, c->dim, err, err_len) ||
            fwd_check_tensor(&L->wk, l, "self_attn.k_proj.weight", kvd, c->dim, err, err_len) ||
            fwd_check_tensor(&L->wv, l, "self_attn.v_proj.weight", kvd, c->dim, err, err_len) ||
            fwd_check_tensor(&L->wo, l, "self_attn.o_proj.weight", c->dim, qd, err, err_len) ||
            fwd_check_tensor(&L->mlp_norm, l, "post_attention_layernorm.weight", c->dim, 0, err,
                             err_len) ||
            fwd_check_tensor(&L->w_gate, l, "mlp.gate_proj.weight", c->ffn_dim, c->dim, err,
                             err_len) ||
            fwd_check_tensor(&L->w_up, l, "mlp.up_proj.weight", c->ffn_dim, c->dim, err,
                             err_len) ||
            fwd_check_tensor(&L->w_down, l, "mlp.down_proj.weight", c->dim, c->ffn_dim, err,
                             err_len))
            return -1;
    }
    return 0;
}

int fwd_check_call(const struct backend *be, const struct fwd_seq *seqs, int n_seqs,
                   int max_seqs, int max_tokens, int max_ctx, struct fwd_stamps *st,
                   int *n_tokens_out, char *err, size_t err_len)
{
    const struct model_config *c = be->cfg;
    if (!seqs || n_seqs < 1 || n_seqs > max_seqs) {
        snprintf(err, err_len, "forward: %d sequences, expected 1..%d (max_batch_seqs)", n_seqs,
                 max_seqs);
        return -1;
    }
    int total = 0;
    for (int s = 0; s < n_seqs; s++) {
        const struct fwd_seq *q = &seqs[s];
        if (q->n_tokens < 1 || !q->tokens) {
            snprintf(err, err_len, "sequence %d: n_tokens %d, expected >= 1 tokens", s,
                     q->n_tokens);
            return -1;
        }
        if (q->n_tokens > max_tokens - total) {
            snprintf(err, err_len,
                     "sequence %d: %d tokens bring the call to %lld tokens, more than "
                     "max_batch_tokens %d",
                     s, q->n_tokens, (long long)total + q->n_tokens, max_tokens);
            return -1;
        }
        total += q->n_tokens;
        if (q->pos < 0) {
            snprintf(err, err_len, "sequence %d: pos %d is negative", s, q->pos);
            return -1;
        }
        int64_t end = (int64_t)q->pos + q->n_tokens;
        if (end > max_ctx) {
            snprintf(err, err_len,
                     "sequence %d: positions up to %lld exceed the context limit %d "
                     "(max_seq_len %d, KV pool %lld positions)",
                     s, (long long)end, max_ctx, c->max_seq_len,
                     (long long)be->n_kv_blocks * FWD_BLOCK);
            return -1;
        }
        for (int i = 0; i < q->n_tokens; i++) {
            if (q->tokens[i] < 0 || q->tokens[i] >= c->vocab_size) {
                snprintf(err, err_len, "sequence %d: token %d is id %d, outside vocabulary 0..%d",
                         s, i, (int)q->tokens[i], c->vocab_size - 1);
                return -1;
            }
        }
        if (q->output == FWD_SAMPLE) {
            if (!(be->caps & BACKEND_CAP_SAMPLE)) {
                snprintf(err, err_len,
                         "sequence %d: output FWD_SAMPLE, but the %s backend does not sample "
                         "(ask for FWD_LAST and sample on the host)",
                         s, be->ops && be->ops->name ? be->ops->name : "?");
                return -1;
            }
            if (!q->sample || !q->token) {
                snprintf(err, err_len, "sequence %d: output FWD_SAMPLE needs sample and token "
                         "(%s is NULL)", s, !q->sample ? "sample" : "token");
                return -1;
            }
            const struct fwd_sample *sp = q->sample;
            if (!(sp->temperature >= 0.0f && sp->temperature <= 1e30f) ||
                (sp->temperature > 0.0f && !isfinite(1.0f / sp->temperature)) ||
                !(sp->top_p > 0.0f && sp->top_p <= 1.0f) || sp->top_k < 0) {
                snprintf(err, err_len,
                         "sequence %d: sample temperature %g, top_p %g, top_k %d: expected "
                         "temperature 0 or in [1/FLT_MAX, 1e30], top_p in (0, 1], top_k >= 0",
                         s, (double)sp->temperature, (double)sp->top_p, sp->top_k);
                return -1;
            }
        } else if (q->output != FWD_NONE && q->output != FWD_LAST && q->output != FWD_ALL &&
                   q->output != FWD_LOGIT0) {
            snprintf(err, err_len, "sequence %d: unknown output kind %d", s, (int)q->output);
            return -1;
        } else if (q->output != FWD_NONE && !q->out) {
            snprintf(err, err_len, "sequence %d: output requested but out is NULL", s);
            return -1;
        }
        if (!q->block_table) {
            snprintf(err, err_len, "sequence %d: no block_table", s);
            return -1;
        }
        /* Checked before any entry is read: entries at or past n_blocks may not exist. */
        int nb = (int)((end + FWD_BLOCK - 1) / FWD_BLOCK);
        if (q->n_blocks < nb) {
            snprintf(err, err_len,
                     "sequence %d: block_table is too short: positions 0..%lld need %d blocks, "
                     "n_blocks is %d",
                     s, (long long)end - 1, nb, q->n_blocks);
            return -1;
        }
        for (int b = 0; b < nb; b++) {
            int32_t id = q->block_table[b];
            if (id < 0) {
                snprintf(err, err_len, "sequence %d: block_table[%d] = %d is negative", s, b,
                         (int)id);
                return -1;
            }
            if (id >= be->n_kv_blocks) {
                snprintf(err, err_len,
                         "sequence %d: block_table[%d] = %d, outside the KV pool 0..%d", s, b,
                         (int)id, be->n_kv_blocks - 1);
                return -1;
            }
        }
    }

    /* No block may be written by one sequence and used by another in the same call: a shared
     * prefix block must be read-only (the engine copies it first, copy_block). */
    if (++st->call_id == 0)
        st->call_id = 1;
    for (int s = 0; s < n_seqs; s++) {
        const struct fwd_seq *q = &seqs[s];
        int b0 = q->pos / FWD_BLOCK, b1 = (q->pos + q->n_tokens - 1) / FWD_BLOCK;
        for (int b = b0; b <= b1; b++) {
            int id = q->block_table[b];
            if (st->blk_call[id] == st->call_id && st->blk_writer[id] != s) {
                snprintf(err, err_len, "block %d is written by sequences %d and %d in one call",
                         id, st->blk_writer[id], s);
                return -1;
            }
            st->blk_call[id] = st->call_id;
            st->blk_writer[id] = s;
        }
    }
    for (int s = 0; s < n_seqs; s++) {
        const struct fwd_seq *q = &seqs[s];
        int nb = (int)(((int64_t)q->pos + q->n_tokens + FWD_BLOCK - 1) / FWD_BLOCK);
        for (int b = 0; b < nb; b++) {
            int id = q->block_table[b];
            if (st->blk_call[id] == st->call_id && st->blk_writer[id] != s) {
                snprintf(err, err_len,
                         "block %d is read by sequence %d while sequence %d writes it in the "
                         "same call (shared blocks are read-only)",
                         id, s, st->blk_writer[id]);
                return -1;
            }
        }
    }
    *n_tokens_out = total;
    return 0;
}
