/* kcheck.h — checking every CUDA runtime and cuBLAS call in the plugin.
 *
 * Two policies, by where the call is:
 *  - opening, self-tests, measurements (anything that can report to a caller): KTRY/KTRY_BLAS
 *    write "file:line: call: reason" into the caller's err buffer and make the function
 *    return -1 through a `goto fail` the function provides.
 *  - the forward path of a running backend: KCUDA/KBLAS abort the worker with the same
 *    message on stderr. A failed launch or copy mid-step leaves the device state unknown;
 *    the worker's device layer is the one place allowed to fail fast (itsd re-dispatches the
 *    worker's jobs and systemd restarts it).
 * KLAUNCH() checks a kernel launch (cudaGetLastError) under the abort policy.
 */
#ifndef ITS_KCHECK_H
#define ITS_KCHECK_H

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

const char *kcheck_cublas_name(cublasStatus_t st); /* defined in kcheck.cu */

#define KCUDA(call)                                                                              \
    do {                                                                                         \
        cudaError_t kc_rc_ = (call);                                                             \
        if (kc_rc_ != cudaSuccess) {                                                             \
            fprintf(stderr, "itsw: cuda: %s:%d: %s: %s (%s)\n", __FILE__, __LINE__, #call,       \
                    cudaGetErrorString(kc_rc_), cudaGetErrorName(kc_rc_));                       \
            abort();                                                                             \
        }                                                                                        \
    } while (0)

#define KBLAS(call)                                                                              \
    do {                                                                                         \
        cublasStatus_t kc_st_ = (call);                                                          \
        if (kc_st_ != CUBLAS_STATUS_SUCCESS) {                                                   \
            fprintf(stderr, "itsw: cuda: %s:%d: %s: %s\n", __FILE__, __LINE__, #call,            \
                    kcheck_cublas_name(kc_st_));                                                 \
            abort();                                                                             \
        }                                                                                        \
    } while (0)

#define KLAUNCH() KCUDA(cudaGetLastError())

/* Reporting forms: need `char *err, size_t err_len` in scope and a `fail:` label. */
#define KTRY(call)                                                                               \
    do {                                                                                         \
        cudaError_t kc_rc_ = (call);                                                             \
        if (kc_rc_ != cudaSuccess) {                                                             \
            snprintf(err, err_len, "%s:%d: %s: %s (%s)", __FILE__, __LINE__, #call,              \
                     cudaGetErrorString(kc_rc_), cudaGetErrorName(kc_rc_));                      \
            goto fail;                                                                           \
        }                                                                                        \
    } while (0)

#define KTRY_BLAS(call)                                                                          \
    do {                                                                                         \
        cublasStatus_t kc_st_ = (call);                                                          \
        if (kc_st_ != CUBLAS_STATUS_SUCCESS) {                                                   \
            snprintf(err, err_len, "%s:%d: %s: %s", __FILE__, __LINE__, #call,                   \
                     kcheck_cublas_name(kc_st_));                                                \
            goto fail;                                                                           \
        }                                                                                        \
    } while (0)

#define KTRY_LAUNCH() KTRY(cudaGetLastError())

#endif
