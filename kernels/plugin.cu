/* plugin.cu — entry points of libits_cuda.so: ABI version, device probe, backend open, kernel
 * self-tests.
 *
 * Owns nothing long-lived itself: each backend it opens owns its device memory (backend_cuda.cu).
 * Never exits or aborts: a missing driver or device is reported to itsw through err, which says
 * so to the user. (kern_ceilings lives in ceilings.cu.)
 */
#include <cuda_runtime.h>
#include <stdio.h>

#include "backend_cuda.h"
#include "kern.h"
#include "kst.h"

extern "C" int kern_plugin_abi(void)
{
    return KERN_PLUGIN_ABI;
}

extern "C" int kern_probe(int device, char *err, size_t err_len)
{
    int n = 0;
    cudaError_t rc = cudaGetDeviceCount(&n);
    if (rc != cudaSuccess) {
        snprintf(err, err_len, "cudaGetDeviceCount: %s (%s)", cudaGetErrorString(rc),
                 cudaGetErrorName(rc));
        return -1;
    }
    if (n == 0) {
        snprintf(err, err_len, "no CUDA device found");
        return -1;
    }
    if (device < 0 || device >= n) {
        snprintf(err, err_len, "device %d does not exist (%d CUDA device%s)", device, n,
                 n == 1 ? "" : "s");
        return -1;
    }
    return n;
}

extern "C" int kern_backend_open(const struct model_config *cfg, const struct model_weights *w,
                                 const struct backend_params *p, struct backend **out,
                                 char *err, size_t err_len)
{
    *out = NULL;
    if (!p) {
        snprintf(err, err_len, "cuda backend: no parameters");
        return -1;
    }
    if (!w) {
        snprintf(err, err_len, "cuda backend: no weights (kern_backend_open_random draws them)");
        return -1;
    }
    if (kern_probe(p->device, err, err_len) < 0)
        return -1;
    return cuda_backend_open(cfg, w, 0, p, out, err, err_len);
}

extern "C" int kern_backend_open_random(const struct model_config *cfg, unsigned long long seed,
                                        const struct backend_params *p, struct backend **out,
                                        char *err, size_t err_len)
{
    *out = NULL;
    if (!p) {
        snprintf(err, err_len, "cuda backend: no parameters");
        return -1;
    }
    if (kern_probe(p->device, err, err_len) < 0)
        return -1;
    return cuda_backend_open(cfg, NULL, seed, p, out, err, err_len);
}

extern "C" int kern_selftest(int device, unsigned long long seed, char *report,
                             size_t report_len, int *n_checks)
{
    if (n_checks)
        *n_checks = 0;
    if (kern_probe(device, report, report_len) < 0)
        return -1;
    return kst_run(device, seed, report, report_len, n_checks);
}
