/* cuda_tools.h — the CUDA plugin's tools beside the backend: the device probe, the kernel
 * self-tests and the ceiling measurements, called through libits_cuda.so.
 *
 * Defined in backend.c, beside the plugin loader they share: each call loads the plugin on
 * first use (never unloaded) and checks its ABI once. Where the plugin, its libraries, the
 * driver or the device is missing, the call fails with "cuda backend unavailable: <why>", the
 * same words backend_open("cuda") uses, so a caller (a test, `itsw selftest`) can show or skip
 * on that reason. Never prints, never aborts. Not thread-safe on the first call (the plugin
 * lookup): call from one thread, as itsw and the tests do.
 */
#ifndef ITS_CUDA_TOOLS_H
#define ITS_CUDA_TOOLS_H

#include <stddef.h>

#include "kern.h"

/* Number of CUDA devices (> 0) when `device` exists, or negative with err saying why not. */
int cuda_probe(int device, char *err, size_t err_len);

/* Runs every kernel self-test on `device` with inputs drawn from `seed`. Returns the number of
 * failed checks (0 = all passed) with `report` holding one line per failure and a summary, and
 * *n_checks the checks run; or negative with `report` saying why the tests could not run
 * ("cuda backend unavailable: ..." when there is no plugin, driver or device). */
int cuda_selftest(int device, unsigned long long seed, char *report, size_t report_len,
                  int *n_checks);

/* Measures the device's copy bandwidth and bf16 GEMM rate (kern_ceilings). Returns 0 with *c
 * filled, or negative with err filled. Takes a few seconds and needs about 2.5 GiB of free
 * device memory. */
int cuda_ceilings(int device, struct kern_ceilings *c, char *err, size_t err_len);

#endif
