/* attention.h — causal attention of one forward call over the paged KV cache, on the device.
 *
 * Layout of the KV pool (owned by the backend, bf16): n_kv_blocks blocks, each one contiguous
 * slab of (n_layers, 2 [K, V], n_kv_heads, KATT_BLOCK positions, head_dim) so that a block
 * copy is one memcpy. Element (block b, layer l, K|V, head g, slot j, d) is at
 *     kv + b*block_stride + l*layer_stride + (is_v ? n_kv_heads*head_stride : 0)
 *        + g*head_stride + j*head_dim + d
 * with head_stride = KATT_BLOCK*head_dim, layer_stride = 2*n_kv_heads*head_stride,
 * block_stride = n_layers*layer_stride.
 *
 * The K/V of the call's new positions are already written (after RoPE) when katt_forward
 * runs; it only reads the cache. Query token i of sequence s (row seqs[s].tok0 + i) attends
 * over positions [0, seqs[s].pos + i] of that sequence, through its block table.
 *
 * Shared prefixes: sequences listed consecutively in one group share their first
 * n_shared_blocks block ids (the n samples of one prompt, or many candidates scored after one
 * prefix). For decode rows (n_new == 1) the kernel reads each shared K/V page once per group
 * and step, for all the group's queries together (cascade attention: partial softmax over the
 * shared part, partials over each sequence's own part, merged with the log-sum-exp rule).
 * A sequence in no group, or a group of one, is plain paged attention.
 *
 * Graph capture: the launch configuration depends only on n_seqs, n_tokens and ctx_bound, never
 * on the contents of seqs/groups/tables, so a captured decode step can be replayed after the
 * descriptors in device memory are rewritten, as long as n_seqs, n_tokens and ctx_bound hold.
 */
#ifndef ITS_ATTENTION_H
#define ITS_ATTENTION_H

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#define KATT_BLOCK 16 /* == BACKEND_BLOCK_TOKENS */

struct katt_seq {
    int32_t tok0;   /* row of the sequence's first new token in q and out */
    int32_t n_new;  /* new tokens, >= 1 (1 for a decode step) */
    int32_t pos;    /* positions already cached before this call */
    int32_t table0; /* offset of its block table in `tables` */
};

struct katt_group {
    int32_t seq0;            /* first sequence (index into seqs) */
    int32_t n_seqs;          /* consecutive sequences in the group; 0 = unused slot */
    int32_t n_shared_blocks; /* leading block ids identical in all their tables */
};

struct katt_args {
    const __nv_bfloat16 *q;  /* (n_tokens, n_heads, head_dim), RoPE applied */
    __nv_bfloat16 *out;      /* (n_tokens, n_heads * head_dim) */
    const __nv_bfloat16 *kv; /* pool base */
    size_t block_stride, layer_stride, head_stride; /* elements, see the layout above */
    int layer;
    const int32_t *tables;          /* device: every sequence's block table, concatenated */
    const struct katt_seq *seqs;    /* device: n_seqs descriptors */
    int n_seqs;
    int n_tokens;                   /* rows of q/out: sum of n_new */
    const struct katt_group *groups;/* device: n_seqs slots (unused ones have n_seqs 0) */
    int ctx_bound;                  /* >= pos + n_new of every sequence */
    int n_heads, n_kv_heads, head_dim; /* 16, 32, 64 or 128 (hf-reference models use 16) */
    float scale;                    /* 1 / sqrt(head_dim) */
    void *workspace;                /* katt_workspace_bytes(...) bytes of device memory */
};

/* Device workspace katt_forward needs for calls of up to max_seqs sequences, max_tokens rows
 * and contexts of up to max_ctx positions. */
size_t katt_workspace_bytes(int max_seqs, int max_tokens, int n_heads, int head_dim, int max_ctx);

/* Enqueues the attention of every sequence of the call on `stream`. Launch errors abort
 * (kcheck.h policy); argument errors are the backend's to catch before the call. */
void katt_forward(const struct katt_args *a, cudaStream_t stream);

#endif
