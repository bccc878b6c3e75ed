/* gemm.cu — y = x · Wᵀ through cuBLAS or a hand-written GEMV (gemm.h), and their self-tests.
 *
 * Owns the cuBLAS handle and its workspace of one struct kgemm. Never allocates after
 * kgemm_init, so every call can be captured into a CUDA graph. Launch and cuBLAS errors abort
 * (kcheck.h forward-path policy); the self-test records them as failed checks instead.
 */
#include "gemm.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kcheck.h"
#include "kenv.h"
#include "kst.h"
#include "ops.h"

#define KGEMV_WARPS 8 /* rows of W per block: one per warp */
#define KGEMV_UNROLL 4 /* 16-byte loads of W in flight per lane */

/* ---- GEMV ------------------------------------------------------------------------------------ */

static __device__ __forceinline__ float kgemv_dot8(const uint4 a, const uint4 b, float s)
{
    const __nv_bfloat162 *a2 = reinterpret_cast<const __nv_bfloat162 *>(&a);
    const __nv_bfloat162 *b2 = reinterpret_cast<const __nv_bfloat162 *>(&b);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float2 fa = __bfloat1622float2(a2[j]), fb = __bfloat1622float2(b2[j]);
        s = fmaf(fa.x, fb.x, s);
        s = fmaf(fa.y, fb.y, s);
    }
    return s;
}

/* One warp per output column r (a row of W): lane l takes the 16-byte chunks l, l+32, ... of
 * the row, KGEMV_UNROLL of them loaded before any is used, each dotted with the same chunk of
 * all M rows of x (x is small and stays in L1/L2; W is streamed once with evict-first loads). */
template <int M, bool F32_OUT>
static __global__ void __launch_bounds__(KGEMV_WARPS * 32)
    kgemv_kernel(const __nv_bfloat16 *x, int k, const __nv_bfloat16 *w, int n, void *y,
                 int accumulate)
{
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * KGEMV_WARPS + (threadIdx.x >> 5);
    if (r >= n)
        return; /* the whole warp leaves together: no shuffle below is left short */
    const int k8 = k >> 3;
    const uint4 *wr = reinterpret_cast<const uint4 *>(w + (size_t)r * (size_t)k);
    const uint4 *xr = reinterpret_cast<const uint4 *>(x);
    float acc[M];
#pragma unroll
    for (int mi = 0; mi < M; mi++)
        acc[mi] = 0.0f;

    int i = lane;
    for (; i + 32 * (KGEMV_UNROLL - 1) < k8; i += 32 * KGEMV_UNROLL) {
        uint4 wv[KGEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < KGEMV_UNROLL; u++)
            wv[u] = __ldcs(wr + i + 32 * u);
#pragma unroll
        for (int u = 0; u < KGEMV_UNROLL; u++)
#pragma unroll
            for (int mi = 0; mi < M; mi++)
                acc[mi] = kgemv_dot8(wv[u], __ldg(xr + (size_t)mi * k8 + i + 32 * u), acc[mi]);
    }
    for (; i < k8; i += 32) {
        uint4 wv = __ldcs(wr + i);
#pragma unroll
        for (int mi = 0; mi < M; mi++)
            acc[mi] = kgemv_dot8(wv, __ldg(xr + (size_t)mi * k8 + i), acc[mi]);
    }
#pragma unroll
    for (int mi = 0; mi < M; mi++)
        for (int o = 16; o > 0; o >>= 1)
            acc[mi] += __shfl_xor_sync(0xffffffffu, acc[mi], o);
    if (lane != 0)
        return;
#pragma unroll
    for (int mi = 0; mi < M; mi++) {
        const size_t at = (size_t)mi * (size_t)n + (size_t)r;
        if (F32_OUT) {
            float *yf = static_cast<float *>(y);
            yf[at] = accumulate ? yf[at] + acc[mi] : acc[mi];
        } else {
            __nv_bfloat16 *yb = static_cast<__nv_bfloat16 *>(y);
            float v = accumulate ? __bfloat162float(yb[at]) + acc[mi] : acc[mi];
            yb[at] = __float2bfloat16(v);
        }
    }
}

template <int M>
static void kgemv_launch(const __nv_bfloat16 *x, int k, const __nv_bfloat16 *w, int n, void *y,
                         enum kgemm_out yt, int accumulate, cudaStream_t s)
{
    const unsigned blocks = (unsigned)((n + KGEMV_WARPS - 1) / KGEMV_WARPS);
    if (yt == KGEMM_OUT_F32)
        kgemv_kernel<M, true><<<blocks, KGEMV_WARPS * 32, 0, s>>>(x, k, w, n, y, accumulate);
    else
        kgemv_kernel<M, false><<<blocks, KGEMV_WARPS * 32, 0, s>>>(x, k, w, n, y, accumulate);
    KLAUNCH();
}

void kgemm_gemv(const struct kgemm *g, const __nv_bfloat16 *x, int m, int k,
                const __nv_bfloat16 *w, int n, void *y, enum kgemm_out yt, int accumulate)
{
    if (m <= 0 || n <= 0)
        return;
    if (m > KGEMM_GEMV_MAX_M || k % 8 != 0 || ((uintptr_t)x | (uintptr_t)w) % 16 != 0) {
        fprintf(stderr, "itsw: cuda: %s:%d: kgemm_gemv: m %d, k %d, x %p, w %p outside its "
                "contract (m <= %d, k %% 8 == 0, 16-byte aligned)\n", __FILE__, __LINE__, m, k,
                (const void *)x, (const void *)w, KGEMM_GEMV_MAX_M);
        abort();
    }
    switch (m) {
    case 1: kgemv_launch<1>(x, k, w, n, y, yt, accumulate, g->stream); break;
    case 2: kgemv_launch<2>(x, k, w, n, y, yt, accumulate, g->stream); break;
    case 3: kgemv_launch<3>(x, k, w, n, y, yt, accumulate, g->stream); break;
    default: kgemv_launch<4>(x, k, w, n, y, yt, accumulate, g->stream); break;
    }
}

/* ---- cuBLAS ---------------------------------------------------------------------------------- */

/* Row-major y (m, n) is column-major yᵀ (n, m) = W (n, k) · xᵀ (k, m): W's row-major storage is
 * column-major Wᵀ (k, n), hence op T on it with ld k; x's is column-major xᵀ (k, m), op N. */
void kgemm_blas(const struct kgemm *g, const __nv_bfloat16 *x, int m, int k,
                const __nv_bfloat16 *w, int n, void *y, enum kgemm_out yt, int accumulate)
{
    if (m <= 0 || n <= 0)
        return;
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    KBLAS(cublasGemmEx(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w, CUDA_R_16BF, k, x,
                       CUDA_R_16BF, k, &beta, y,
                       yt == KGEMM_OUT_F32 ? CUDA_R_32F : CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT));
}

int kgemm_uses_gemv(const struct kgemm *g, const __nv_bfloat16 *x, int m, int k,
                    const __nv_bfloat16 *w)
{
    return g->gemv && m >= 1 && m <= KGEMM_GEMV_MAX_M && k % 8 == 0 &&
           ((uintptr_t)x | (uintptr_t)w) % 16 == 0;
}

void kgemm_run(const struct kgemm *g, const __nv_bfloat16 *x, int m, int k,
               const __nv_bfloat16 *w, int n, void *y, enum kgemm_out yt, int accumulate)
{
    if (kgemm_uses_gemv(g, x, m, k, w))
        kgemm_gemv(g, x, m, k, w, n, y, yt, accumulate);
    else
        kgemm_blas(g, x, m, k, w, n, y, yt, accumulate);
}

int kgemm_init(struct kgemm *g, cudaStream_t stream, char *err, size_t err_len)
{
    memset(g, 0, sizeof *g);
    g->stream = stream;
    g->gemv = !kenv_off("ITS_CUDA_GEMV") && !kenv_on("ITS_CUDA_SIMPLE");
    KTRY_BLAS(cublasCreate(&g->blas));
    /* The stream first: cublasSetStream resets a user workspace to cuBLAS's own pool. */
    KTRY_BLAS(cublasSetStream(g->blas, stream));
    KTRY(cudaMalloc(&g->workspace, KGEMM_WORKSPACE_BYTES));
    KTRY_BLAS(cublasSetWorkspace(g->blas, g->workspace, KGEMM_WORKSPACE_BYTES));
    return 0;
fail:
    return -1;
}

void kgemm_deinit(struct kgemm *g)
{
    if (!g)
        return;
    if (g->blas)
        cublasDestroy(g->blas);
    if (g->workspace)
        cudaFree(g->workspace);
    memset(g, 0, sizeof *g);
}

/* ---- self-test ------------------------------------------------------------------------------- */

struct kgemm_case {
    int m, n, k;
};

static void kgemm_check_case(struct kst *t, struct kgemm *g, const struct kgemm_case *c,
                             int use_gemv, enum kgemm_out yt, int accumulate)
{
    const size_t xn = (size_t)c->m * c->k, wn = (size_t)c->n * c->k, yn = (size_t)c->m * c->n;
    float *hx = (float *)malloc(sizeof(float) * xn), *hw = (float *)malloc(sizeof(float) * wn);
    float *hy0 = (float *)malloc(sizeof(float) * yn), *hy = (float *)malloc(sizeof(float) * yn);
    __nv_bfloat16 *hx16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * xn);
    __nv_bfloat16 *hw16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * wn);
    __nv_bfloat16 *hy16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * yn);
    double *ref = (double *)malloc(sizeof(double) * yn);
    __nv_bfloat16 *dx = NULL, *dw = NULL;
    void *dy = NULL;
    const size_t ysz = yt == KGEMM_OUT_F32 ? 4 : 2;
    kst_fill_uniform(t, hx, xn, -1.0f, 1.0f);
    kst_fill_uniform(t, hw, wn, -1.0f, 1.0f);
    kst_fill_uniform(t, hy0, yn, -4.0f, 4.0f);
    kst_to_bf16(hx, xn, hx16);
    kst_to_bf16(hw, wn, hw16);
    if (yt == KGEMM_OUT_BF16) { /* the accumulated start value as the device will see it */
        kst_to_bf16(hy0, yn, hy16);
        kst_from_bf16(hy16, yn, hy0);
    }
    for (int i = 0; i < c->m; i++)
        for (int j = 0; j < c->n; j++) {
            double acc = accumulate ? (double)hy0[(size_t)i * c->n + j] : 0.0;
            for (int l = 0; l < c->k; l++)
                acc += (double)__bfloat162float(hx16[(size_t)i * c->k + l]) *
                       (double)__bfloat162float(hw16[(size_t)j * c->k + l]);
            ref[(size_t)i * c->n + j] = acc;
        }
    if (KST_CUDA(t, cudaMalloc(&dx, sizeof(__nv_bfloat16) * xn)) ||
        KST_CUDA(t, cudaMalloc(&dw, sizeof(__nv_bfloat16) * wn)) ||
        KST_CUDA(t, cudaMalloc(&dy, ysz * yn)) ||
        KST_CUDA(t, cudaMemcpy(dx, hx16, sizeof(__nv_bfloat16) * xn, cudaMemcpyHostToDevice)) ||
        KST_CUDA(t, cudaMemcpy(dw, hw16, sizeof(__nv_bfloat16) * wn, cudaMemcpyHostToDevice)))
        goto out;
    if (accumulate) {
        if (KST_CUDA(t, cudaMemcpy(dy, yt == KGEMM_OUT_F32 ? (void *)hy0 : (void *)hy16,
                                   ysz * yn, cudaMemcpyHostToDevice)))
            goto out;
    } else if (KST_CUDA(t, cudaMemset(dy, 0xFF, ysz * yn))) { /* NaN poison */
        goto out;
    }
    if (use_gemv)
        kgemm_gemv(g, dx, c->m, c->k, dw, c->n, dy, yt, accumulate);
    else
        kgemm_blas(g, dx, c->m, c->k, dw, c->n, dy, yt, accumulate);
    if (KST_SYNC(t, g->stream, use_gemv ? "kgemm_gemv" : "kgemm_blas"))
        goto out;
    if (yt == KGEMM_OUT_F32) {
        if (KST_CUDA(t, cudaMemcpy(hy, dy, ysz * yn, cudaMemcpyDeviceToHost)))
            goto out;
    } else {
        if (KST_CUDA(t, cudaMemcpy(hy16, dy, ysz * yn, cudaMemcpyDeviceToHost)))
            goto out;
        kst_from_bf16(hy16, yn, hy);
    }
    {
        const double tol = yt == KGEMM_OUT_F32 ? 1e-4 : 6e-3;
        double e = kst_rel_err(hy, ref, yn);
        kst_check(t, e < tol, "gemm %s m %d n %d k %d -> %s%s: rel err %.3g > %.1g",
                  use_gemv ? "gemv" : "cublas", c->m, c->n, c->k,
                  yt == KGEMM_OUT_F32 ? "f32" : "bf16", accumulate ? " (+=)" : "", e, tol);
    }
out:
    cudaFree(dx);
    cudaFree(dw);
    cudaFree(dy);
    free(hx);
    free(hw);
    free(hy0);
    free(hy);
    free(hx16);
    free(hw16);
    free(hy16);
    free(ref);
}

void kgemm_selftest(struct kst *t, cudaStream_t stream)
{
    char err[256];
    size_t err_len = sizeof err;
    struct kgemm g;
    if (kgemm_init(&g, stream, err, err_len) != 0) {
        kst_check(t, 0, "kgemm_init: %s", err);
        kgemm_deinit(&g);
        return;
    }
    /* Ragged shapes: n not a multiple of the 8 rows a GEMV block takes, k not a multiple of
     * the 128 chunks of the unrolled loop (tails), k not a multiple of 8 (cuBLAS only). */
    static const struct kgemm_case cases[] = {
        {1, 257, 64}, {2, 1000, 4104}, {3, 77, 520}, {4, 33, 2056}, {1, 129, 8},
        {1, 50, 100}, {5, 300, 200}, {37, 129, 1000}, {64, 96, 4096},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const struct kgemm_case *c = &cases[i];
        const int gemv_ok = c->m <= KGEMM_GEMV_MAX_M && c->k % 8 == 0;
        for (int path = 0; path <= gemv_ok; path++) {
            kgemm_check_case(t, &g, c, path, KGEMM_OUT_F32, 0);
            kgemm_check_case(t, &g, c, path, KGEMM_OUT_F32, 1);
            kgemm_check_case(t, &g, c, path, KGEMM_OUT_BF16, 0);
        }
    }
    kgemm_deinit(&g);
}
