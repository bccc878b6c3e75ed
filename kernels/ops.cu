/* ops.cu — the small kernels of the cuda forward pass (ops.h) and kst_suite_core, which checks
 * each of them, and the GEMM paths (gemm.h), against host references on random data.
 *
 * Owns nothing: every buffer is the caller's. Kernels are deliberately plain (one block per row
 * or a grid-stride loop): they move a few bytes per token against the GEMMs' megabytes, so
 * clarity wins over the last microsecond. Launch errors abort (kcheck.h); the self-test suite
 * synchronises after every launch and records device errors as failed checks instead.
 */
#include "ops.h"

#include <cuda_fp16.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "gemm.h"
#include "kcheck.h"
#include "rope.h"
#include "kst.h"

#define KOPS_THREADS 256

/* ---- reductions ------------------------------------------------------------------------------ */

static __device__ __forceinline__ float kops_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result. */
static __device__ float kops_block_sum(float v)
{
    __shared__ float part[32];
    __shared__ float total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = kops_warp_sum(v);
    if (lane == 0)
        part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0f;
        s = kops_warp_sum(s);
        if (lane == 0)
            total = s;
    }
    __syncthreads();
    return total;
}

static unsigned kops_blocks(size_t n, unsigned threads)
{
    size_t b = (n + threads - 1) / threads;
    /* grid-stride loops cover the rest; 65535 * 256 elements per pass is plenty */
    return (unsigned)(b < 65535 ? (b ? b : 1) : 65535);
}

/* ---- embedding ------------------------------------------------------------------------------- */

static __global__ void kops_embed_kernel(const __nv_bfloat16 *table, const int32_t *ids, int dim,
                                         float *x)
{
    const size_t r = blockIdx.x;
    const __nv_bfloat16 *src = table + (size_t)ids[r] * (size_t)dim;
    float *dst = x + r * (size_t)dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        dst[i] = __bfloat162float(src[i]);
}

void kops_embed(const __nv_bfloat16 *table, const int32_t *ids, int n_rows, int dim, float *x,
                cudaStream_t stream)
{
    if (n_rows <= 0)
        return;
    kops_embed_kernel<<<n_rows, KOPS_THREADS, 0, stream>>>(table, ids, dim, x);
    KLAUNCH();
}

/* ---- RMSNorm --------------------------------------------------------------------------------- */

static __global__ void kops_rmsnorm_kernel(const float *x, const int32_t *rows, int dim,
                                           const float *w, float eps, __nv_bfloat16 *y)
{
    const size_t i = blockIdx.x;
    const size_t r = rows ? (size_t)rows[i] : i;
    const float *xr = x + r * (size_t)dim;
    float ss = 0.0f;
    for (int d = threadIdx.x; d < dim; d += blockDim.x)
        ss += xr[d] * xr[d];
    ss = kops_block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    __nv_bfloat16 *yr = y + i * (size_t)dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x)
        yr[d] = __float2bfloat16(w[d] * (xr[d] * inv));
}

void kops_rmsnorm(const float *x, const int32_t *rows, int n_rows, int dim, const float *w,
                  float eps, __nv_bfloat16 *y, cudaStream_t stream)
{
    if (n_rows <= 0)
        return;
    kops_rmsnorm_kernel<<<n_rows, KOPS_THREADS, 0, stream>>>(x, rows, dim, w, eps, y);
    KLAUNCH();
}

/* ---- RoPE + KV write ------------------------------------------------------------------------- */

/* One block per token. The token's cos/sin (head_dim/2 of each) are computed once into shared
 * memory; then the block walks q pairs, k pairs and v elements as one flat index space. */
static __global__ void kops_rope_kv_kernel(const __nv_bfloat16 *qkv, const int32_t *tok_pos,
                                           const int32_t *tok_blk, const float *inv_freq,
                                           int n_heads, int n_kv_heads, int head_dim,
                                           __nv_bfloat16 *q, struct kops_kv_dst dst)
{
    extern __shared__ float kops_cs[]; /* cos[half], sin[half] */
    const int half = head_dim / 2;
    float *cs = kops_cs, *sn = kops_cs + half;
    const size_t t = blockIdx.x;
    const int pos = tok_pos[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        /* the angle rounded to f32 first, as transformers and the CPU backend compute it */
        float a = (float)pos * inv_freq[i];
        float s, c;
        sincosf(a, &s, &c);
        cs[i] = c;
        sn[i] = s;
    }
    __syncthreads();

    const size_t q_dim = (size_t)n_heads * head_dim, kv_dim = (size_t)n_kv_heads * head_dim;
    const __nv_bfloat16 *row = qkv + t * (q_dim + 2 * kv_dim);
    __nv_bfloat16 *qo = q + t * q_dim;
    __nv_bfloat16 *kbase = dst.kv + (size_t)tok_blk[t] * dst.block_stride +
                           (size_t)dst.layer * dst.layer_stride +
                           (size_t)(pos % KATT_BLOCK) * head_dim;
    __nv_bfloat16 *vbase = kbase + (size_t)n_kv_heads * dst.head_stride;

    const int n_q = n_heads * half, n_k = n_kv_heads * half, n_v = n_kv_heads * head_dim;
    for (int it = threadIdx.x; it < n_q + n_k + n_v; it += blockDim.x) {
        if (it < n_q + n_k) {
            const bool is_q = it < n_q;
            const int j = is_q ? it : it - n_q;
            const int h = j / half, i = j % half;
            const __nv_bfloat16 *src = row + (is_q ? 0 : q_dim) + (size_t)h * head_dim;
            float a = __bfloat162float(src[i]), b = __bfloat162float(src[i + half]);
            float lo = a * cs[i] - b * sn[i], hi = b * cs[i] + a * sn[i];
            __nv_bfloat16 *o = is_q ? qo + (size_t)h * head_dim
                                    : kbase + (size_t)h * dst.head_stride;
            o[i] = __float2bfloat16(lo);
            o[i + half] = __float2bfloat16(hi);
        } else {
            const int j = it - n_q - n_k;
            const int g = j / head_dim, d = j % head_dim;
            vbase[(size_t)g * dst.head_stride + d] = row[q_dim + kv_dim + (size_t)j];
        }
    }
}

void kops_rope_kv(const __nv_bfloat16 *qkv, int n_tokens, const int32_t *tok_pos,
                  const int32_t *tok_blk, const float *inv_freq, int n_heads, int n_kv_heads,
                  int head_dim, __nv_bfloat16 *q, const struct kops_kv_dst *dst,
                  cudaStream_t stream)
{
    if (n_tokens <= 0)
        return;
    size_t smem = (size_t)head_dim * sizeof(float);
    kops_rope_kv_kernel<<<n_tokens, 128, smem, stream>>>(qkv, tok_pos, tok_blk, inv_freq,
                                                         n_heads, n_kv_heads, head_dim, q, *dst);
    KLAUNCH();
}

/* ---- SwiGLU ---------------------------------------------------------------------------------- */

static __global__ void kops_swiglu_kernel(const __nv_bfloat16 *gu, size_t n_rows, int ffn,
                                          __nv_bfloat16 *h)
{
    const size_t n = n_rows * (size_t)ffn;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        const size_t r = e / (size_t)ffn, j = e % (size_t)ffn;
        const __nv_bfloat16 *gr = gu + r * 2 * (size_t)ffn;
        float g = __bfloat162float(gr[j]), u = __bfloat162float(gr[ffn + j]);
        h[e] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
    }
}

void kops_swiglu(const __nv_bfloat16 *gu, int n_rows, int ffn, __nv_bfloat16 *h,
                 cudaStream_t stream)
{
    if (n_rows <= 0)
        return;
    size_t n = (size_t)n_rows * (size_t)ffn;
    kops_swiglu_kernel<<<kops_blocks(n, KOPS_THREADS), KOPS_THREADS, 0, stream>>>(
        gu, (size_t)n_rows, ffn, h);
    KLAUNCH();
}

/* ---- conversions ----------------------------------------------------------------------------- */

static __device__ __forceinline__ float kops_load(const void *src, int t, size_t i)
{
    if (t == DTYPE_F32)
        return ((const float *)src)[i];
    if (t == DTYPE_F16)
        return __half2float(((const __half *)src)[i]);
    return __bfloat162float(((const __nv_bfloat16 *)src)[i]);
}

static __global__ void kops_to_bf16_kernel(const void *src, int t, size_t n, __nv_bfloat16 *dst)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        if (t == DTYPE_BF16)
            dst[i] = ((const __nv_bfloat16 *)src)[i]; /* bit copy: NaN payloads kept */
        else
            dst[i] = __float2bfloat16(kops_load(src, t, i));
    }
}

static __global__ void kops_to_f32_kernel(const void *src, int t, size_t n, float *dst)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = kops_load(src, t, i);
}

void kops_to_bf16(const void *src, enum dtype t, size_t n, __nv_bfloat16 *dst,
                  cudaStream_t stream)
{
    if (n == 0)
        return;
    kops_to_bf16_kernel<<<kops_blocks(n, KOPS_THREADS), KOPS_THREADS, 0, stream>>>(src, (int)t,
                                                                                   n, dst);
    KLAUNCH();
}

void kops_to_f32(const void *src, enum dtype t, size_t n, float *dst, cudaStream_t stream)
{
    if (n == 0)
        return;
    kops_to_f32_kernel<<<kops_blocks(n, KOPS_THREADS), KOPS_THREADS, 0, stream>>>(src, (int)t,
                                                                                  n, dst);
    KLAUNCH();
}

/* ---- random weights -------------------------------------------------------------------------- */

static __host__ __device__ __forceinline__ unsigned long long kops_mix(unsigned long long z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A value of distribution `dist` for element i of the stream `key`. */
static __device__ __forceinline__ float kops_draw(unsigned long long key, size_t i, int dist)
{
    unsigned long long h = kops_mix(key + (unsigned long long)i);
    if (dist == KOPS_UNIFORM)
        return (float)(h >> 40) * (2.0f / 16777216.0f) - 1.0f; /* [-1, 1) */
    /* four 16-bit uniforms in [0, 1): their sum has mean 2, variance 4/12 */
    float s = 0.0f;
    for (int k = 0; k < 4; k++)
        s += (float)((h >> (16 * k)) & 0xFFFFu) * (1.0f / 65536.0f);
    return (s - 2.0f) * 1.7320508f; /* * sqrt(3): unit variance */
}

static __global__ void kops_fill_kernel(void *dst, int is_bf16, size_t n, unsigned long long key,
                                        int dist, float scale, float offset)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = offset + scale * kops_draw(key, i, dist);
        if (is_bf16)
            ((__nv_bfloat16 *)dst)[i] = __float2bfloat16(v);
        else
            ((float *)dst)[i] = v;
    }
}

static void kops_fill(void *dst, int is_bf16, size_t n, unsigned long long seed,
                      unsigned long long tensor_id, enum kops_dist dist, float scale,
                      float offset, cudaStream_t stream)
{
    if (n == 0)
        return;
    unsigned long long key = kops_mix(seed ^ kops_mix(tensor_id));
    kops_fill_kernel<<<kops_blocks(n, KOPS_THREADS), KOPS_THREADS, 0, stream>>>(
        dst, is_bf16, n, key, (int)dist, scale, offset);
    KLAUNCH();
}

void kops_fill_bf16(__nv_bfloat16 *dst, size_t n, unsigned long long seed,
                    unsigned long long tensor_id, enum kops_dist dist, float scale, float offset,
                    cudaStream_t stream)
{
    kops_fill(dst, 1, n, seed, tensor_id, dist, scale, offset, stream);
}

void kops_fill_f32(float *dst, size_t n, unsigned long long seed, unsigned long long tensor_id,
                   enum kops_dist dist, float scale, float offset, cudaStream_t stream)
{
    kops_fill(dst, 0, n, seed, tensor_id, dist, scale, offset, stream);
}

/* ---- FWD_LOGIT0 ------------------------------------------------------------------------------ */

static __global__ void kops_row_dot_kernel(const __nv_bfloat16 *x, int dim,
                                           const __nv_bfloat16 *w, float *out)
{
    const __nv_bfloat16 *xr = x + (size_t)blockIdx.x * (size_t)dim;
    float s = 0.0f;
    for (int d = threadIdx.x; d < dim; d += blockDim.x)
        s += __bfloat162float(xr[d]) * __bfloat162float(w[d]);
    s = kops_block_sum(s);
    if (threadIdx.x == 0)
        out[blockIdx.x] = s;
}

void kops_row_dot(const __nv_bfloat16 *x, int n_rows, int dim, const __nv_bfloat16 *w_row,
                  float *out, cudaStream_t stream)
{
    if (n_rows <= 0)
        return;
    kops_row_dot_kernel<<<n_rows, KOPS_THREADS, 0, stream>>>(x, dim, w_row, out);
    KLAUNCH();
}

/* ---- host ------------------------------------------------------------------------------------ */

/* ============================================================================================ */
/* self-tests                                                                                    */

int kst_cuda(struct kst *t, cudaError_t rc, const char *file, int line, const char *call)
{
    if (rc == cudaSuccess)
        return 0;
    kst_check(t, 0, "%s:%d: %s: %s (%s)", file, line, call, cudaGetErrorString(rc),
              cudaGetErrorName(rc));
    return -1;
}

int kst_sync(struct kst *t, cudaStream_t s, const char *file, int line, const char *what)
{
    cudaError_t rc = cudaStreamSynchronize(s);
    if (rc == cudaSuccess)
        rc = cudaGetLastError();
    return kst_cuda(t, rc, file, line, what);
}

void kst_to_bf16(const float *x, size_t n, __nv_bfloat16 *y)
{
    for (size_t i = 0; i < n; i++)
        y[i] = __float2bfloat16(x[i]);
}

void kst_from_bf16(const __nv_bfloat16 *x, size_t n, float *y)
{
    for (size_t i = 0; i < n; i++)
        y[i] = __bfloat162float(x[i]);
}

static const char *kst_dtype(enum dtype t)
{
    return t == DTYPE_F32 ? "F32" : t == DTYPE_F16 ? "F16" : "BF16";
}

/* bf16 0xFFFF is a NaN: an element a kernel forgot to write fails kst_rel_err. */
#define KST_POISON 0xFF

/* Tolerance for a bf16 output of f32 math: one rounding (2^-9 relative at worst, far less in
 * the norm of a random vector) plus f32 accumulation. */
#define KST_TOL_BF16 6e-3

static void kst_embed(struct kst *t, cudaStream_t s)
{
    const int vocab = 37, dim = 100, n = 13;
    float *h_tab = (float *)malloc(sizeof(float) * vocab * dim);
    __nv_bfloat16 *h_tab16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * vocab * dim);
    float *h_out = (float *)malloc(sizeof(float) * n * dim);
    double *ref = (double *)malloc(sizeof(double) * n * dim);
    int32_t ids[n];
    __nv_bfloat16 *d_tab = NULL;
    int32_t *d_ids = NULL;
    float *d_x = NULL;
    float r[n];
    kst_fill_uniform(t, h_tab, (size_t)vocab * dim, -2.0f, 2.0f);
    kst_to_bf16(h_tab, (size_t)vocab * dim, h_tab16);
    kst_fill_uniform(t, r, n, 0.0f, (float)vocab);
    for (int i = 0; i < n; i++)
        ids[i] = (int32_t)r[i];
    ids[0] = vocab - 1;
    for (int i = 0; i < n; i++)
        for (int d = 0; d < dim; d++)
            ref[(size_t)i * dim + d] = __bfloat162float(h_tab16[(size_t)ids[i] * dim + d]);
    if (KST_CUDA(t, cudaMalloc(&d_tab, sizeof(__nv_bfloat16) * vocab * dim)) ||
        KST_CUDA(t, cudaMalloc(&d_ids, sizeof ids)) ||
        KST_CUDA(t, cudaMalloc(&d_x, sizeof(float) * n * dim)) ||
        KST_CUDA(t, cudaMemcpy(d_tab, h_tab16, sizeof(__nv_bfloat16) * vocab * dim,
                               cudaMemcpyHostToDevice)) ||
        KST_CUDA(t, cudaMemcpy(d_ids, ids, sizeof ids, cudaMemcpyHostToDevice)) ||
        KST_CUDA(t, cudaMemset(d_x, KST_POISON, sizeof(float) * n * dim)))
        goto out;
    kops_embed(d_tab, d_ids, n, dim, d_x, s);
    if (KST_SYNC(t, s, "kops_embed") ||
        KST_CUDA(t, cudaMemcpy(h_out, d_x, sizeof(float) * n * dim, cudaMemcpyDeviceToHost)))
        goto out;
    {
        double e = kst_rel_err(h_out, ref, (size_t)n * dim);
        kst_check(t, e == 0.0, "embed (%d rows, dim %d): rel err %.3g, expected exact", n, dim,
                  e);
    }
out:
    cudaFree(d_tab);
    cudaFree(d_ids);
    cudaFree(d_x);
    free(h_tab);
    free(h_tab16);
    free(h_out);
    free(ref);
}

static void kst_rmsnorm_case(struct kst *t, cudaStream_t s, int n_src, int dim, int gather)
{
    const int n = gather ? (n_src + 1) / 2 : n_src;
    const float eps = 1e-5f;
    float *h_x = (float *)malloc(sizeof(float) * n_src * dim);
    float *h_w = (float *)malloc(sizeof(float) * dim);
    __nv_bfloat16 *h_y16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * n * dim);
    float *h_y = (float *)malloc(sizeof(float) * n * dim);
    double *ref = (double *)malloc(sizeof(double) * n * dim);
    int32_t *rows = (int32_t *)malloc(sizeof(int32_t) * n);
    float *d_x = NULL, *d_w = NULL;
    int32_t *d_rows = NULL;
    __nv_bfloat16 *d_y = NULL;
    kst_fill_uniform(t, h_x, (size_t)n_src * dim, -3.0f, 3.0f);
    kst_fill_uniform(t, h_w, (size_t)dim, 0.5f, 1.5f);
    for (int i = 0; i < n; i++)
        rows[i] = gather ? n_src - 1 - 2 * i : i;
    for (int i = 0; i < n; i++) {
        const float *xr = h_x + (size_t)rows[i] * dim;
        double ss = 0;
        for (int d = 0; d < dim; d++)
            ss += (double)xr[d] * xr[d];
        double inv = 1.0 / sqrt(ss / dim + eps);
        for (int d = 0; d < dim; d++)
            ref[(size_t)i * dim + d] = (double)h_w[d] * xr[d] * inv;
    }
    if (KST_CUDA(t, cudaMalloc(&d_x, sizeof(float) * n_src * dim)) ||
        KST_CUDA(t, cudaMalloc(&d_w, sizeof(float) * dim)) ||
        KST_CUDA(t, cudaMalloc(&d_rows, sizeof(int32_t) * n)) ||
        KST_CUDA(t, cudaMalloc(&d_y, sizeof(__nv_bfloat16) * n * dim)) ||
        KST_CUDA(t, cudaMemcpy(d_x, h_x, sizeof(float) * n_src * dim, cudaMemcpyHostToDevice)) ||
        KST_CUDA(t, cudaMemcpy(d_w, h_w, sizeof(float) * dim, cudaMemcpyHostToDevice)) ||
        KST_CUDA(t, cudaMemcpy(d_rows, rows, sizeof(int32_t) * n, cudaMemcpyHostToDevice)) ||
        KST_CUDA(t, cudaMemset(d_y, KST_POISON, sizeof(__nv_bfloat16) * n * dim)))
        goto out;
    kops_rmsnorm(d_x, gather ? d_rows : NULL, n, dim, d_w, eps, d_y, s);
    if (KST_SYNC(t, s, "kops_rmsnorm") ||
        KST_CUDA(t, cudaMemcpy(h_y16, d_y, sizeof(__nv_bfloat16) * n * dim,
                               cudaMemcpyDeviceToHost)))
        goto out;
    kst_from_bf16(h_y16, (size_t)n * dim, h_y);
    {
        double e = kst_rel_err(h_y, ref, (size_t)n * dim);
        kst_check(t, e < KST_TOL_BF16, "rmsnorm (%d rows%s, dim %d): rel err %.3g > %.1g", n,
                  gather ? " gathered" : "", dim, e, KST_TOL_BF16);
    }
out:
    cudaFree(d_x);
    cudaFree(d_w);
    cudaFree(d_rows);
    cudaFree(d_y);
    free(h_x);
    free(h_w);
    free(h_y16);
    free(h_y);
    free(ref);
    free(rows);
}

static void kst_rope_case(struct kst *t, cudaStream_t s, int n_heads, int n_kv, int hd, int n_tok)
{
    struct model_config c;
    memset(&c, 0, sizeof c);
    c.head_dim = hd;
    c.rope_theta = 500000.0f;
    c.rope_kind = ROPE_LLAMA3;
    c.rope_factor = 8.0f;
    c.rope_low_freq_factor = 1.0f;
    c.rope_high_freq_factor = 4.0f;
    c.rope_original_max_pos = 8192;
    const int half = hd / 2, n_layers = 2, layer = 1, n_blocks = n_tok + 1;
    const size_t q_dim = (size_t)n_heads * hd, kv_dim = (size_t)n_kv * hd;
    const size_t row = q_dim + 2 * kv_dim;
    const size_t head_stride = (size_t)KATT_BLOCK * hd, layer_stride = 2 * n_kv * head_stride,
                 block_stride = n_layers * layer_stride, pool = n_blocks * block_stride;
    float *h_in = (float *)malloc(sizeof(float) * n_tok * row);
    __nv_bfloat16 *h_in16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * n_tok * row);
    __nv_bfloat16 *h_q16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * n_tok * q_dim);
    __nv_bfloat16 *h_pool16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * pool);
    float *h_q = (float *)malloc(sizeof(float) * n_tok * q_dim);
    float *h_kv = (float *)malloc(sizeof(float) * n_tok * 2 * kv_dim);
    double *ref_q = (double *)malloc(sizeof(double) * n_tok * q_dim);
    double *ref_kv = (double *)malloc(sizeof(double) * n_tok * 2 * kv_dim);
    float *inv = (float *)malloc(sizeof(float) * half);
    int32_t *pos = (int32_t *)malloc(sizeof(int32_t) * n_tok);
    int32_t *blk = (int32_t *)malloc(sizeof(int32_t) * n_tok);
    float *r = (float *)malloc(sizeof(float) * n_tok);
    __nv_bfloat16 *d_in = NULL, *d_q = NULL, *d_pool = NULL;
    int32_t *d_pos = NULL, *d_blk = NULL;
    float *d_inv = NULL;
    struct kops_kv_dst dst;
    size_t stray = 0;

    rope_inv_freq(&c, inv);
    kst_fill_uniform(t, h_in, (size_t)n_tok * row, -1.0f, 1.0f);
    kst_to_bf16(h_in, (size_t)n_tok * row, h_in16);
    kst_fill_uniform(t, r, (size_t)n_tok, 0.0f, 131072.0f);
    for (int i = 0; i < n_tok; i++) {
        pos[i] = i == 0 ? 0 : (int32_t)r[i];
        blk[i] = n_blocks - 1 - i; /* one block per token: no two tokens share a slot */
    }
    for (int i = 0; i < n_tok; i++) {
        const __nv_bfloat16 *src = h_in16 + (size_t)i * row;
        for (int h = 0; h < n_heads + n_kv; h++) {
            const __nv_bfloat16 *v = src + (size_t)h * hd;
            double *o = h < n_heads ? ref_q + (size_t)i * q_dim + (size_t)h * hd
                                    : ref_kv + (size_t)i * 2 * kv_dim + (size_t)(h - n_heads) * hd;
            for (int j = 0; j < half; j++) {
                double a = __bfloat162float(v[j]), b = __bfloat162float(v[j + half]);
                double ang = (double)((float)pos[i] * inv[j]);
                o[j] = a * cos(ang) - b * sin(ang);
                o[j + half] = b * cos(ang) + a * sin(ang);
            }
        }
        for (size_t j = 0; j < kv_dim; j++)
            ref_kv[(size_t)i * 2 * kv_dim + kv_dim + j] =
                __bfloat162float(src[q_dim + kv_dim + j]);
    }
    if (KST_CUDA(t, cudaMalloc(&d_in, sizeof(__nv_bfloat16) * n_tok * row)) ||
        KST_CUDA(t, cudaMalloc(&d_q, sizeof(__nv_bfloat16) * n_tok * q_dim)) ||
        KST_CUDA(t, cudaMalloc(&d_pool, sizeof(__nv_bfloat16) * pool)) ||
        KST_CUDA(t, cudaMalloc(&d_pos, sizeof(int32_t) * n_tok)) ||
        KST_CUDA(t, cudaMalloc(&d_blk, sizeof(int32_t) * n_tok)) ||
        KST_CUDA(t, cudaMalloc(&d_inv, sizeof(float) * half)) ||
        KST_CUDA(t, cudaMemcpy(d_in, h_in16, sizeof(__nv_bfloat16) * n_tok * row,
                               cudaMemcpyHostToDevice)) ||
        KST_CUDA(t, cudaMemcpy(d_pos, pos, sizeof(int32_t) * n_tok, cudaMemcpyHostToDevice)) ||
        KST_CUDA(t, cudaMemcpy(d_blk, blk, sizeof(int32_t) * n_tok, cudaMemcpyHostToDevice)) ||
        KST_CUDA(t, cudaMemcpy(d_inv, inv, sizeof(float) * half, cudaMemcpyHostToDevice)) ||
        KST_CUDA(t, cudaMemset(d_q, KST_POISON, sizeof(__nv_bfloat16) * n_tok * q_dim)) ||
        KST_CUDA(t, cudaMemset(d_pool, KST_POISON, sizeof(__nv_bfloat16) * pool)))
        goto out;
    dst.kv = d_pool;
    dst.block_stride = block_stride;
    dst.layer_stride = layer_stride;
    dst.head_stride = head_stride;
    dst.layer = layer;
    kops_rope_kv(d_in, n_tok, d_pos, d_blk, d_inv, n_heads, n_kv, hd, d_q, &dst, s);
    if (KST_SYNC(t, s, "kops_rope_kv") ||
        KST_CUDA(t, cudaMemcpy(h_q16, d_q, sizeof(__nv_bfloat16) * n_tok * q_dim,
                               cudaMemcpyDeviceToHost)) ||
        KST_CUDA(t, cudaMemcpy(h_pool16, d_pool, sizeof(__nv_bfloat16) * pool,
                               cudaMemcpyDeviceToHost)))
        goto out;
    kst_from_bf16(h_q16, (size_t)n_tok * q_dim, h_q);
    for (int i = 0; i < n_tok; i++) {
        const __nv_bfloat16 *b = h_pool16 + (size_t)blk[i] * block_stride +
                                 (size_t)layer * layer_stride + (size_t)(pos[i] % KATT_BLOCK) * hd;
        for (int g = 0; g < 2 * n_kv; g++) /* K heads, then V heads */
            for (int d = 0; d < hd; d++)
                h_kv[(size_t)i * 2 * kv_dim + (size_t)g * hd + d] =
                    __bfloat162float(b[(size_t)g * head_stride + d]);
    }
    /* Nothing else in the pool may change: count written elements outside the targets. */
    {
        size_t written = 0;
        for (size_t e = 0; e < pool; e++) {
            unsigned short bits;
            memcpy(&bits, &h_pool16[e], 2);
            written += bits != 0xFFFF;
        }
        stray = written - (size_t)n_tok * 2 * kv_dim;
    }
    {
        double eq = kst_rel_err(h_q, ref_q, (size_t)n_tok * q_dim);
        double ek = kst_rel_err(h_kv, ref_kv, (size_t)n_tok * 2 * kv_dim);
        kst_check(t, eq < KST_TOL_BF16, "rope q (%d heads, head_dim %d, %d tokens): rel err %.3g",
                  n_heads, hd, n_tok, eq);
        kst_check(t, ek < KST_TOL_BF16,
                  "rope k + v into KV pages (%d kv heads, head_dim %d, %d tokens): rel err %.3g",
                  n_kv, hd, n_tok, ek);
        kst_check(t, stray == 0, "rope kv write: %zu pool elements written outside their slots",
                  stray);
    }
out:
    cudaFree(d_in);
    cudaFree(d_q);
    cudaFree(d_pool);
    cudaFree(d_pos);
    cudaFree(d_blk);
    cudaFree(d_inv);
    free(h_in);
    free(h_in16);
    free(h_q16);
    free(h_pool16);
    free(h_q);
    free(h_kv);
    free(ref_q);
    free(ref_kv);
    free(inv);
    free(pos);
    free(blk);
    free(r);
}

static void kst_swiglu(struct kst *t, cudaStream_t s, int n, int ffn)
{
    const size_t in_n = (size_t)n * 2 * ffn, out_n = (size_t)n * ffn;
    float *h_in = (float *)malloc(sizeof(float) * in_n);
    __nv_bfloat16 *h_in16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * in_n);
    __nv_bfloat16 *h_out16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * out_n);
    float *h_out = (float *)malloc(sizeof(float) * out_n);
    double *ref = (double *)malloc(sizeof(double) * out_n);
    __nv_bfloat16 *d_in = NULL, *d_out = NULL;
    kst_fill_uniform(t, h_in, in_n, -6.0f, 6.0f);
    kst_to_bf16(h_in, in_n, h_in16);
    for (int r = 0; r < n; r++)
        for (int j = 0; j < ffn; j++) {
            double g = __bfloat162float(h_in16[(size_t)r * 2 * ffn + j]);
            double u = __bfloat162float(h_in16[(size_t)r * 2 * ffn + ffn + j]);
            ref[(size_t)r * ffn + j] = g / (1.0 + exp(-g)) * u;
        }
    if (KST_CUDA(t, cudaMalloc(&d_in, sizeof(__nv_bfloat16) * in_n)) ||
        KST_CUDA(t, cudaMalloc(&d_out, sizeof(__nv_bfloat16) * out_n)) ||
        KST_CUDA(t, cudaMemcpy(d_in, h_in16, sizeof(__nv_bfloat16) * in_n,
                               cudaMemcpyHostToDevice)) ||
        KST_CUDA(t, cudaMemset(d_out, KST_POISON, sizeof(__nv_bfloat16) * out_n)))
        goto out;
    kops_swiglu(d_in, n, ffn, d_out, s);
    if (KST_SYNC(t, s, "kops_swiglu") ||
        KST_CUDA(t, cudaMemcpy(h_out16, d_out, sizeof(__nv_bfloat16) * out_n,
                               cudaMemcpyDeviceToHost)))
        goto out;
    kst_from_bf16(h_out16, out_n, h_out);
    {
        double e = kst_rel_err(h_out, ref, out_n);
        kst_check(t, e < KST_TOL_BF16, "swiglu (%d rows, ffn %d): rel err %.3g", n, ffn, e);
    }
out:
    cudaFree(d_in);
    cudaFree(d_out);
    free(h_in);
    free(h_in16);
    free(h_out16);
    free(h_out);
    free(ref);
}

/* Conversions are exact functions: every output must equal the host's own conversion. */
static void kst_convert(struct kst *t, cudaStream_t s)
{
    const size_t n = 1031;
    float *h_f = (float *)malloc(sizeof(float) * n);
    void *h_src = malloc(sizeof(float) * n);
    __nv_bfloat16 *h_b = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * n);
    float *h_o = (float *)malloc(sizeof(float) * n);
    void *d_src = NULL;
    __nv_bfloat16 *d_b = NULL;
    float *d_f = NULL;
    if (KST_CUDA(t, cudaMalloc(&d_src, sizeof(float) * n)) ||
        KST_CUDA(t, cudaMalloc(&d_b, sizeof(__nv_bfloat16) * n)) ||
        KST_CUDA(t, cudaMalloc(&d_f, sizeof(float) * n)))
        goto out;
    for (int dt = 0; dt < 3; dt++) {
        enum dtype ty = (enum dtype)dt;
        kst_fill_uniform(t, h_f, n, -100.0f, 100.0f);
        size_t esz = ty == DTYPE_F32 ? 4 : 2;
        for (size_t i = 0; i < n; i++) {
            if (ty == DTYPE_F32)
                ((float *)h_src)[i] = h_f[i];
            else if (ty == DTYPE_F16)
                ((__half *)h_src)[i] = __float2half(h_f[i]);
            else
                ((__nv_bfloat16 *)h_src)[i] = __float2bfloat16(h_f[i]);
        }
        if (KST_CUDA(t, cudaMemcpy(d_src, h_src, esz * n, cudaMemcpyHostToDevice)) ||
            KST_CUDA(t, cudaMemset(d_b, KST_POISON, sizeof(__nv_bfloat16) * n)) ||
            KST_CUDA(t, cudaMemset(d_f, KST_POISON, sizeof(float) * n)))
            goto out;
        kops_to_bf16(d_src, ty, n, d_b, s);
        kops_to_f32(d_src, ty, n, d_f, s);
        if (KST_SYNC(t, s, "kops_to_bf16/kops_to_f32") ||
            KST_CUDA(t, cudaMemcpy(h_b, d_b, sizeof(__nv_bfloat16) * n,
                                   cudaMemcpyDeviceToHost)) ||
            KST_CUDA(t, cudaMemcpy(h_o, d_f, sizeof(float) * n, cudaMemcpyDeviceToHost)))
            goto out;
        size_t bad_b = 0, bad_f = 0;
        for (size_t i = 0; i < n; i++) {
            float want = ty == DTYPE_F32   ? ((float *)h_src)[i]
                         : ty == DTYPE_F16 ? __half2float(((__half *)h_src)[i])
                                           : __bfloat162float(((__nv_bfloat16 *)h_src)[i]);
            __nv_bfloat16 wb = __float2bfloat16(want);
            bad_b += memcmp(&wb, &h_b[i], 2) != 0;
            bad_f += memcmp(&want, &h_o[i], 4) != 0;
        }
        kst_check(t, bad_b == 0, "convert %s -> bf16: %zu of %zu values differ", kst_dtype(ty),
                  bad_b, n);
        kst_check(t, bad_f == 0, "convert %s -> f32: %zu of %zu values differ", kst_dtype(ty),
                  bad_f, n);
    }
out:
    cudaFree(d_src);
    cudaFree(d_b);
    cudaFree(d_f);
    free(h_f);
    free(h_src);
    free(h_b);
    free(h_o);
}

/* Random weights: the range, the first two moments and determinism. */
static void kst_fill(struct kst *t, cudaStream_t s)
{
    const size_t n = 200003;
    float *h = (float *)malloc(sizeof(float) * n);
    float *h2 = (float *)malloc(sizeof(float) * n);
    __nv_bfloat16 *hb = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * n);
    float *d = NULL;
    __nv_bfloat16 *db = NULL;
    if (KST_CUDA(t, cudaMalloc(&d, sizeof(float) * n)) ||
        KST_CUDA(t, cudaMalloc(&db, sizeof(__nv_bfloat16) * n)))
        goto out;
    for (int dist = 0; dist < 2; dist++) {
        const float scale = dist == KOPS_UNIFORM ? 0.25f : 1.0f, offset = dist ? 0.0f : 1.0f;
        kops_fill_f32(d, n, t->seed, 7, (enum kops_dist)dist, scale, offset, s);
        if (KST_SYNC(t, s, "kops_fill_f32") ||
            KST_CUDA(t, cudaMemcpy(h, d, sizeof(float) * n, cudaMemcpyDeviceToHost)))
            goto out;
        kops_fill_bf16(db, n, t->seed, 7, (enum kops_dist)dist, scale, offset, s);
        if (KST_SYNC(t, s, "kops_fill_bf16") ||
            KST_CUDA(t, cudaMemcpy(hb, db, sizeof(__nv_bfloat16) * n, cudaMemcpyDeviceToHost)))
            goto out;
        kops_fill_f32(d, n, t->seed, 7, (enum kops_dist)dist, scale, offset, s);
        if (KST_SYNC(t, s, "kops_fill_f32") ||
            KST_CUDA(t, cudaMemcpy(h2, d, sizeof(float) * n, cudaMemcpyDeviceToHost)))
            goto out;
        double sum = 0, sq = 0;
        size_t out_of_range = 0, bf_mismatch = 0;
        for (size_t i = 0; i < n; i++) {
            double v = h[i] - offset;
            sum += v;
            sq += v * v;
            if (!isfinite(h[i]) || (dist == KOPS_UNIFORM && fabs(v) > scale * 1.0001) ||
                (dist == KOPS_NORMAL && fabs(v) > 3.5 * scale))
                out_of_range++;
            __nv_bfloat16 want = __float2bfloat16(h[i]);
            bf_mismatch += memcmp(&want, &hb[i], 2) != 0;
        }
        double mean = sum / n, var = sq / n - mean * mean;
        double want_var = dist == KOPS_UNIFORM ? scale * scale / 3.0 : scale * scale;
        kst_check(t, out_of_range == 0, "fill %s: %zu values out of range",
                  dist ? "normal" : "uniform", out_of_range);
        kst_check(t, fabs(mean) < 0.02 * scale && fabs(var / want_var - 1.0) < 0.03,
                  "fill %s: mean %.4g, variance %.4g, expected 0 and %.4g",
                  dist ? "normal" : "uniform", mean, var, want_var);
        kst_check(t, memcmp(h, h2, sizeof(float) * n) == 0 && bf_mismatch == 0,
                  "fill %s: not deterministic (f32 repeat differs or %zu bf16 values differ)",
                  dist ? "normal" : "uniform", bf_mismatch);
    }
out:
    cudaFree(d);
    cudaFree(db);
    free(h);
    free(h2);
    free(hb);
}

static void kst_row_dot(struct kst *t, cudaStream_t s, int n, int dim)
{
    float *hx = (float *)malloc(sizeof(float) * n * dim);
    float *hw = (float *)malloc(sizeof(float) * dim);
    __nv_bfloat16 *hx16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * n * dim);
    __nv_bfloat16 *hw16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * dim);
    float *ho = (float *)malloc(sizeof(float) * n);
    double *ref = (double *)malloc(sizeof(double) * n);
    __nv_bfloat16 *dx = NULL, *dw = NULL;
    float *dout = NULL;
    kst_fill_uniform(t, hx, (size_t)n * dim, -1.0f, 1.0f);
    kst_fill_uniform(t, hw, (size_t)dim, -1.0f, 1.0f);
    kst_to_bf16(hx, (size_t)n * dim, hx16);
    kst_to_bf16(hw, (size_t)dim, hw16);
    for (int r = 0; r < n; r++) {
        double acc = 0;
        for (int d = 0; d < dim; d++)
            acc += (double)__bfloat162float(hx16[(size_t)r * dim + d]) *
                   __bfloat162float(hw16[d]);
        ref[r] = acc;
    }
    if (KST_CUDA(t, cudaMalloc(&dx, sizeof(__nv_bfloat16) * n * dim)) ||
        KST_CUDA(t, cudaMalloc(&dw, sizeof(__nv_bfloat16) * dim)) ||
        KST_CUDA(t, cudaMalloc(&dout, sizeof(float) * n)) ||
        KST_CUDA(t, cudaMemcpy(dx, hx16, sizeof(__nv_bfloat16) * n * dim,
                               cudaMemcpyHostToDevice)) ||
        KST_CUDA(t, cudaMemcpy(dw, hw16, sizeof(__nv_bfloat16) * dim, cudaMemcpyHostToDevice)) ||
        KST_CUDA(t, cudaMemset(dout, KST_POISON, sizeof(float) * n)))
        goto out;
    kops_row_dot(dx, n, dim, dw, dout, s);
    if (KST_SYNC(t, s, "kops_row_dot") ||
        KST_CUDA(t, cudaMemcpy(ho, dout, sizeof(float) * n, cudaMemcpyDeviceToHost)))
        goto out;
    {
        double e = kst_rel_err(ho, ref, (size_t)n);
        kst_check(t, e < 1e-5, "row dot / FWD_LOGIT0 (%d rows, dim %d): rel err %.3g", n, dim,
                  e);
    }
out:
    cudaFree(dx);
    cudaFree(dw);
    cudaFree(dout);
    free(hx);
    free(hw);
    free(hx16);
    free(hw16);
    free(ho);
    free(ref);
}

void kst_suite_core(struct kst *t)
{
    cudaStream_t s = NULL;
    /* A blocking stream: the cases fill inputs and poison outputs with plain cudaMemcpy /
     * cudaMemset on the legacy default stream, which a non-blocking stream would not wait for
     * (a late poison memset would then overwrite a kernel's correct output). */
    if (KST_CUDA(t, cudaStreamCreateWithFlags(&s, cudaStreamDefault)))
        return;
    kst_embed(t, s);
    kst_rmsnorm_case(t, s, 7, 64, 0);
    kst_rmsnorm_case(t, s, 9, 100, 1);
    kst_rmsnorm_case(t, s, 3, 4099, 0);
    kst_rope_case(t, s, 4, 2, 16, 11);
    kst_rope_case(t, s, 6, 2, 64, 5);
    kst_rope_case(t, s, 8, 8, 128, 3);
    kst_swiglu(t, s, 5, 333);
    kst_swiglu(t, s, 1, 8192);
    kst_convert(t, s);
    kst_fill(t, s);
    kst_row_dot(t, s, 6, 1000);
    kst_row_dot(t, s, 1, 8192);
    kgemm_selftest(t, s);
    cudaStreamDestroy(s);
}
