/* gemm.h — y = x · Wᵀ for nn.Linear-layout bf16 weights, on the device.
 *
 * x (m, k) bf16 row-major, W (n, k) bf16 row-major (PyTorch's (out_features, in_features)),
 * y (m, n) row-major, bf16 or f32, accumulated in f32. Two paths:
 *  - cuBLAS (cublasGemmEx, CUBLAS_COMPUTE_32F, tensor cores) for any m, into a workspace owned
 *    here so that calls can be captured in CUDA graphs;
 *  - a hand-written GEMV for m <= KGEMM_GEMV_MAX_M (decode steps of small batches), which is
 *    purely memory-bound: each warp streams one row of W with 16-byte loads, four in flight per
 *    lane, against the m rows of x, and reduces with shuffles.
 * The choice (kgemm_uses_gemv) is deliberately simple: m <= 4, k a multiple of 8 and both x and
 * W 16-byte aligned, unless ITS_CUDA_GEMV=0 or ITS_CUDA_SIMPLE=1 is set at kgemm_init. A GPU
 * session measures whether it beats cuBLAS at m = 1..4 (docs/engine.md).
 * One kgemm per stream; calls enqueue and return; launch and cuBLAS errors abort (kcheck.h).
 */
#ifndef ITS_GEMM_H
#define ITS_GEMM_H

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stddef.h>

#define KGEMM_GEMV_MAX_M 4
#define KGEMM_WORKSPACE_BYTES ((size_t)32 << 20)

struct kgemm {
    cublasHandle_t blas;
    cudaStream_t stream; /* borrowed: every call runs on it (cublasSetStream is done once) */
    void *workspace;     /* KGEMM_WORKSPACE_BYTES of device memory, for cuBLAS */
    int gemv;            /* the GEMV path may be used */
};

enum kgemm_out {
    KGEMM_OUT_BF16 = 0,
    KGEMM_OUT_F32 = 1,
};

/* Creates the cuBLAS handle bound to `stream` with its own workspace. Returns 0, or -1 with err
 * filled (file:line: call: reason); g is then safe to kgemm_deinit. */
int kgemm_init(struct kgemm *g, cudaStream_t stream, char *err, size_t err_len);
/* Frees the handle and workspace; accepts a zeroed or half-initialised g. */
void kgemm_deinit(struct kgemm *g);

/* y = x · Wᵀ (accumulate 0) or y += x · Wᵀ (accumulate 1), by the path kgemm_uses_gemv picks. */
void kgemm_run(const struct kgemm *g, const __nv_bfloat16 *x, int m, int k,
               const __nv_bfloat16 *w, int n, void *y, enum kgemm_out yt, int accumulate);
int kgemm_uses_gemv(const struct kgemm *g, const __nv_bfloat16 *x, int m, int k,
                    const __nv_bfloat16 *w);
/* The two paths themselves (self-tests compare both). kgemm_gemv requires m in 1..4, k % 8 == 0
 * and 16-byte aligned x and w. */
void kgemm_blas(const struct kgemm *g, const __nv_bfloat16 *x, int m, int k,
                const __nv_bfloat16 *w, int n, void *y, enum kgemm_out yt, int accumulate);
void kgemm_gemv(const struct kgemm *g, const __nv_bfloat16 *x, int m, int k,
                const __nv_bfloat16 *w, int n, void *y, enum kgemm_out yt, int accumulate);

struct kst;
/* Self-test cases of both paths against a host f64 reference (part of kst_suite_core). */
void kgemm_selftest(struct kst *t, cudaStream_t stream);

#endif
