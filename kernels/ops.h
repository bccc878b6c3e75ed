/* ops.h — the element-wise and row-wise kernels of the cuda forward pass: embedding gather,
 * RMSNorm, RoPE fused with the KV-page write, SwiGLU, dtype conversion, device-side random
 * weights and the single-column dot of FWD_LOGIT0.
 *
 * Every launcher enqueues on `stream` and returns at once; launch errors abort (kcheck.h
 * forward-path policy). Shapes are row-major and written on every argument; sizes that can
 * pass 2^31 elements are size_t. Alignment: none beyond the element type's own is assumed.
 * Precision: inputs are read as bf16/f32, all arithmetic is f32, outputs rounded once.
 */
#ifndef ITS_OPS_H
#define ITS_OPS_H

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "model.h"

/* x[r, :] = f32(table[ids[r], :]). table (vocab, dim) bf16; ids (n_rows) device int32, each
 * already checked to be < vocab; x (n_rows, dim) f32. */
void kops_embed(const __nv_bfloat16 *table, const int32_t *ids, int n_rows, int dim, float *x,
                cudaStream_t stream);

/* y[i, :] = bf16(w * (x[r, :] * rsqrt(mean(x[r, :]^2) + eps))) with r = rows[i] (rows NULL:
 * r = i), as transformers' LlamaRMSNorm in f32. x (any, dim) f32, w (dim) f32, y (n_rows, dim)
 * bf16 dense. The residual add that precedes each norm happens in the GEMM that produces the
 * delta (beta = 1 into the f32 residual), so this kernel only reads x. */
void kops_rmsnorm(const float *x, const int32_t *rows, int n_rows, int dim, const float *w,
                  float eps, __nv_bfloat16 *y, cudaStream_t stream);

/* Where one layer's K/V rows go: the pool layout of attention.h. */
struct kops_kv_dst {
    __nv_bfloat16 *kv; /* pool base */
    size_t block_stride, layer_stride, head_stride; /* elements */
    int layer;
};

/* RoPE (HF rotate-half: element i pairs with i + head_dim/2) on the q and k parts of
 * qkv (n_tokens, (n_heads + 2*n_kv_heads) * head_dim) bf16, at angle tok_pos[t] * inv_freq[i]
 * (f32 product, as the CPU backend). Rotated q goes to q (n_tokens, n_heads*head_dim) bf16;
 * rotated k and the untouched v go into the KV pool at block tok_blk[t], slot
 * tok_pos[t] % KATT_BLOCK of layer dst->layer. inv_freq (head_dim/2) f32 device;
 * tok_pos, tok_blk (n_tokens) int32 device. qkv is not modified. */
void kops_rope_kv(const __nv_bfloat16 *qkv, int n_tokens, const int32_t *tok_pos,
                  const int32_t *tok_blk, const float *inv_freq, int n_heads, int n_kv_heads,
                  int head_dim, __nv_bfloat16 *q, const struct kops_kv_dst *dst,
                  cudaStream_t stream);

/* h[r, j] = bf16(silu(g) * u), g = gu[r, j], u = gu[r, ffn + j]: gu (n_rows, 2*ffn) bf16 is the
 * output of the concatenated gate|up GEMM; h (n_rows, ffn) bf16. */
void kops_swiglu(const __nv_bfloat16 *gu, int n_rows, int ffn, __nv_bfloat16 *h,
                 cudaStream_t stream);

/* dst[i] = convert(src[i]) for n elements of dtype F32, F16 or BF16 (checkpoint weights).
 * bf16 output rounds to nearest even; f32 output is exact. */
void kops_to_bf16(const void *src, enum dtype t, size_t n, __nv_bfloat16 *dst,
                  cudaStream_t stream);
void kops_to_f32(const void *src, enum dtype t, size_t n, float *dst, cudaStream_t stream);

/* Random weights from a counter-based hash of (seed, tensor_id, index): the same values on
 * every device and launch shape. */
enum kops_dist {
    KOPS_UNIFORM = 0, /* offset + U(-scale, scale) */
    KOPS_NORMAL = 1,  /* offset + scale * (approximately N(0, 1): a scaled sum of 4 uniforms) */
};
void kops_fill_bf16(__nv_bfloat16 *dst, size_t n, unsigned long long seed,
                    unsigned long long tensor_id, enum kops_dist dist, float scale, float offset,
                    cudaStream_t stream);
void kops_fill_f32(float *dst, size_t n, unsigned long long seed, unsigned long long tensor_id,
                   enum kops_dist dist, float scale, float offset, cudaStream_t stream);

/* out[r] = sum_d f32(x[r, d]) * f32(w_row[d]): FWD_LOGIT0, one column of the LM head without
 * the rest. x (n_rows, dim) bf16, w_row (dim) bf16, out (n_rows) f32. */
void kops_row_dot(const __nv_bfloat16 *x, int n_rows, int dim, const __nv_bfloat16 *w_row,
                  float *out, cudaStream_t stream);

/* ---- for the self-test suites (kst.h) of ops.cu and gemm.cu --------------------------------- */
struct kst;
/* Records a failed check "file:line: call: reason" when rc is an error; returns 0 or -1. */
int kst_cuda(struct kst *t, cudaError_t rc, const char *file, int line, const char *call);
/* Synchronises `s` and records any launch or execution error; returns 0 or -1. */
int kst_sync(struct kst *t, cudaStream_t s, const char *file, int line, const char *what);
#define KST_CUDA(t, call) kst_cuda((t), (call), __FILE__, __LINE__, #call)
#define KST_SYNC(t, s, what) kst_sync((t), (s), __FILE__, __LINE__, (what))
/* Host conversions with the device's rounding (round to nearest even). */
void kst_to_bf16(const float *x, size_t n, __nv_bfloat16 *y);
void kst_from_bf16(const __nv_bfloat16 *x, size_t n, float *y);

#endif
