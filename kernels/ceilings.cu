/* ceilings.cu — kern_ceilings (kern.h): what this device can do at best, measured, so that a
 * benchmark is judged against the machine it ran on rather than a datasheet.
 *
 * Two ceilings (docs/BENCHMARKS.md, "GPU"):
 *  - copy bandwidth: a 1 GiB device-to-device cudaMemcpyAsync, timed with events, median of
 *    KCEIL_REPS after KCEIL_WARMUP, counting bytes read plus bytes written (2 GiB per copy):
 *    the rate a memory-bound kernel (batch-1 decode) can approach.
 *  - bf16 GEMM rate: cublasGemmEx 8192 x 8192 x 8192, bf16 inputs and output, f32 compute,
 *    on random data filled by a kernel (never zeros: zeros run faster than real data), median
 *    TFLOP/s of KCEIL_REPS after KCEIL_WARMUP: the rate batched prefill and decode approach.
 * Plus what identifies the device: name, multiprocessors, memory, driver and runtime versions.
 *
 * Owns, for one call, a stream, two events, a cuBLAS handle and the buffers (about 2.4 GiB),
 * all freed before it returns. Every call is checked with KTRY/KTRY_BLAS (kcheck.h): an error
 * is reported through err with file:line and the call, never aborts. Leaves the calling
 * thread's current device set to `device`.
 */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kcheck.h"
#include "kern.h"

#define KCEIL_COPY_BYTES ((size_t)1 << 30)
#define KCEIL_GEMM_N 8192
#define KCEIL_WARMUP 3
#define KCEIL_REPS 15

/* Uniform values in [-1, 1) from a hash of (seed, index): cheap, deterministic, never all
 * zero. Grid-stride, so any launch size covers n. */
static __global__ void kceil_fill_bf16(__nv_bfloat16 *x, size_t n, uint32_t seed)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 0x9E3779B1u ^ (uint32_t)(i >> 32) * 0x85EBCA77u ^ seed;
        h ^= h >> 16;
        h *= 0x7FEB352Du;
        h ^= h >> 15;
        h *= 0x846CA68Bu;
        h ^= h >> 16;
        float u = (float)(h >> 8) * (1.0f / 8388608.0f) - 1.0f; /* [-1, 1) */
        x[i] = __float2bfloat16(u);
    }
}

static int kceil_cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static float kceil_median(float *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, kceil_cmp_float);
    return n % 2 ? v[n / 2] : 0.5f * (v[n / 2 - 1] + v[n / 2]);
}

extern "C" int kern_ceilings(int device, struct kern_ceilings *c, char *err, size_t err_len)
{
    /* Everything the fail path frees is declared before the first KTRY (a goto may not jump
     * over an initialisation in C++). */
    cudaStream_t stream = NULL;
    cudaEvent_t ev0 = NULL, ev1 = NULL;
    cublasHandle_t blas = NULL;
    void *src = NULL, *dst = NULL;
    __nv_bfloat16 *ga = NULL, *gb = NULL, *gc = NULL;
    float ms[KCEIL_REPS];
    cudaDeviceProp prop;
    size_t mem_free = 0, mem_total = 0;
    const size_t gn = KCEIL_GEMM_N;
    const size_t gemm_elems = gn * gn;
    const float alpha = 1.0f, beta = 0.0f;
    int rc = -1;

    memset(c, 0, sizeof *c);
    if (kern_probe(device, err, err_len) < 0)
        return -1;
    KTRY(cudaSetDevice(device));
    KTRY(cudaGetDeviceProperties(&prop, device));
    snprintf(c->device_name, sizeof c->device_name, "%.127s", prop.name);
    c->sm_count = prop.multiProcessorCount;
    KTRY(cudaDriverGetVersion(&c->driver_version));
    KTRY(cudaRuntimeGetVersion(&c->runtime_version));
    /* Free memory as found, before this function takes any. */
    KTRY(cudaMemGetInfo(&mem_free, &mem_total));
    c->mem_free = mem_free;
    c->mem_total = mem_total;
    if (mem_free < 2 * KCEIL_COPY_BYTES + 3 * gemm_elems * sizeof(__nv_bfloat16) + (64u << 20)) {
        snprintf(err, err_len, "ceilings need about %zu MiB of free device memory; %zu MiB "
                 "free", (2 * KCEIL_COPY_BYTES + 3 * gemm_elems * 2) >> 20, mem_free >> 20);
        goto fail;
    }

    KTRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    KTRY(cudaEventCreate(&ev0));
    KTRY(cudaEventCreate(&ev1));

    /* -- copy bandwidth ------------------------------------------------------------------- */
    KTRY(cudaMalloc(&src, KCEIL_COPY_BYTES));
    KTRY(cudaMalloc(&dst, KCEIL_COPY_BYTES));
    kceil_fill_bf16<<<4 * prop.multiProcessorCount, 256, 0, stream>>>(
        (__nv_bfloat16 *)src, KCEIL_COPY_BYTES / sizeof(__nv_bfloat16), 1u);
    KTRY_LAUNCH();
    for (int i = 0; i < KCEIL_WARMUP; i++)
        KTRY(cudaMemcpyAsync(dst, src, KCEIL_COPY_BYTES, cudaMemcpyDeviceToDevice, stream));
    for (int i = 0; i < KCEIL_REPS; i++) {
        KTRY(cudaEventRecord(ev0, stream));
        KTRY(cudaMemcpyAsync(dst, src, KCEIL_COPY_BYTES, cudaMemcpyDeviceToDevice, stream));
        KTRY(cudaEventRecord(ev1, stream));
        KTRY(cudaEventSynchronize(ev1));
        KTRY(cudaEventElapsedTime(&ms[i], ev0, ev1));
    }
    {
        float med = kceil_median(ms, KCEIL_REPS);
        if (!(med > 0)) {
            snprintf(err, err_len, "copy timing gave %g ms", (double)med);
            goto fail;
        }
        c->copy_gb_s = 2.0 * (double)KCEIL_COPY_BYTES / (med * 1e-3) / 1e9;
    }
    KTRY(cudaFree(src));
    src = NULL;
    KTRY(cudaFree(dst));
    dst = NULL;

    /* -- bf16 GEMM -------------------------------------------------------------------------- */
    KTRY(cudaMalloc((void **)&ga, gemm_elems * sizeof *ga));
    KTRY(cudaMalloc((void **)&gb, gemm_elems * sizeof *gb));
    KTRY(cudaMalloc((void **)&gc, gemm_elems * sizeof *gc));
    kceil_fill_bf16<<<4 * prop.multiProcessorCount, 256, 0, stream>>>(ga, gemm_elems, 2u);
    KTRY_LAUNCH();
    kceil_fill_bf16<<<4 * prop.multiProcessorCount, 256, 0, stream>>>(gb, gemm_elems, 3u);
    KTRY_LAUNCH();
    KTRY_BLAS(cublasCreate(&blas));
    KTRY_BLAS(cublasSetStream(blas, stream));
    for (int i = 0; i < KCEIL_WARMUP + KCEIL_REPS; i++) {
        int timed = i >= KCEIL_WARMUP;
        if (timed)
            KTRY(cudaEventRecord(ev0, stream));
        KTRY_BLAS(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)gn, (int)gn, (int)gn, &alpha,
                               ga, CUDA_R_16BF, (int)gn, gb, CUDA_R_16BF, (int)gn, &beta, gc,
                               CUDA_R_16BF, (int)gn, CUBLAS_COMPUTE_32F,
                               CUBLAS_GEMM_DEFAULT));
        if (timed) {
            KTRY(cudaEventRecord(ev1, stream));
            KTRY(cudaEventSynchronize(ev1));
            KTRY(cudaEventElapsedTime(&ms[i - KCEIL_WARMUP], ev0, ev1));
        }
    }
    KTRY(cudaStreamSynchronize(stream));
    {
        float med = kceil_median(ms, KCEIL_REPS);
        if (!(med > 0)) {
            snprintf(err, err_len, "GEMM timing gave %g ms", (double)med);
            goto fail;
        }
        c->bf16_tflops = 2.0 * (double)gn * (double)gn * (double)gn / (med * 1e-3) / 1e12;
    }
    rc = 0;
fail:
    /* Best effort: an error here cannot be reported over the first one. */
    if (blas)
        cublasDestroy(blas);
    cudaFree(src);
    cudaFree(dst);
    cudaFree(ga);
    cudaFree(gb);
    cudaFree(gc);
    if (ev0)
        cudaEventDestroy(ev0);
    if (ev1)
        cudaEventDestroy(ev1);
    if (stream)
        cudaStreamDestroy(stream);
    return rc;
}
