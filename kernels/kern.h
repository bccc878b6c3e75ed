/* kern.h — the C face of the CUDA plugin (libits_cuda.so): everything itsw may call in it.
 *
 * itsw never links CUDA. It dlopen()s libits_cuda.so when a user asks for the cuda backend
 * and looks up the symbols below, so that a binary built with CUDA still starts on a machine
 * without a driver, toolkit or GPU. Plain C types only; C++ stays inside the kernels/ .cu files.
 */
#ifndef ITS_KERN_H
#define ITS_KERN_H

#include <stddef.h>

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature below changes, so a stale plugin is refused by name. */
#define KERN_PLUGIN_ABI 2

typedef int (*kern_abi_fn)(void);
/* Returns KERN_PLUGIN_ABI as the plugin was built. */
int kern_plugin_abi(void);

typedef int (*kern_probe_fn)(int device, char *err, size_t err_len);
/* Checks that a driver is present and `device` exists. Returns the number of devices (> 0),
 * or negative with err holding the CUDA runtime's own reason (no driver, no device, ...). */
int kern_probe(int device, char *err, size_t err_len);

typedef int (*kern_backend_open_fn)(const struct model_config *cfg,
                                    const struct model_weights *w,
                                    const struct backend_params *p, struct backend **out,
                                    char *err, size_t err_len);
/* Opens the cuda backend over host weight views (copied to the device). Returns 0, or
 * negative with err filled. */
int kern_backend_open(const struct model_config *cfg, const struct model_weights *w,
                      const struct backend_params *p, struct backend **out, char *err,
                      size_t err_len);

typedef int (*kern_backend_open_random_fn)(const struct model_config *cfg, unsigned long long seed,
                                           const struct backend_params *p,
                                           struct backend **out, char *err, size_t err_len);
/* Opens the cuda backend with random bf16 weights of cfg's shape created on the device
 * (benchmarks: no host copy of an 8B or 70B model is ever made). Weights are drawn so that
 * activations stay finite through every layer (norm weights near 1, matrices scaled by
 * 1/sqrt(fan_in)). Returns 0, or negative with err filled. */
int kern_backend_open_random(const struct model_config *cfg, unsigned long long seed,
                             const struct backend_params *p, struct backend **out, char *err,
                             size_t err_len);

typedef int (*kern_selftest_fn)(int device, unsigned long long seed, char *report,
                                size_t report_len, int *n_checks);
/* Runs every kernel self-test suite (kst.h) on `device`. Returns the number of failed checks
 * (0 = all passed) with report holding one line per failure and a summary, or negative with
 * report holding why the tests could not run (no device, ...). *n_checks gets the checks run. */
int kern_selftest(int device, unsigned long long seed, char *report, size_t report_len,
                  int *n_checks);

struct kern_ceilings {
    double copy_gb_s;     /* device-to-device copy, bytes read + written per second / 1e9 */
    double bf16_tflops;   /* cuBLAS bf16 GEMM (f32 accumulate), 8192^3, random data */
    char device_name[128];
    int sm_count;
    size_t mem_total, mem_free;
    int driver_version, runtime_version;
};

typedef int (*kern_ceilings_fn)(int device, struct kern_ceilings *c, char *err, size_t err_len);
/* Measures the two ceilings a benchmark is judged against (medians of timed repeats after a
 * warm-up, device events). Returns 0, or negative with err filled. */
int kern_ceilings(int device, struct kern_ceilings *c, char *err, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif
