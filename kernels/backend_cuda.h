/* backend_cuda.h — the cuda backend: struct backend_ops (backend.h) over one CUDA device, bf16
 * weights and KV cache, f32 residual stream and accumulation.
 *
 * Used by plugin.cu only; itsw reaches it through kern_backend_open / _open_random (kern.h).
 */
#ifndef ITS_BACKEND_CUDA_H
#define ITS_BACKEND_CUDA_H

#include <stddef.h>

#include "backend.h"

/* Opens the cuda backend on device p->device. With `w`, the weights are those host views
 * (F32, F16 or BF16, each checked against cfg as the CPU backend does), uploaded in chunks
 * through a pinned staging buffer and converted to bf16 on the device; without (`w` NULL),
 * random weights of cfg's shape are drawn on the device from `seed`. cfg is copied. The KV
 * pool has p->n_kv_blocks blocks (or p->kv_tokens positions rounded up), else as many as fit in
 * the memory left after weights and scratch minus a reserve (docs/engine.md). Returns 0 with
 * *out set, or -1 with err naming the parameter, tensor or CUDA call that failed; nothing is
 * left allocated on failure. */
int cuda_backend_open(const struct model_config *cfg, const struct model_weights *w,
                      unsigned long long seed, const struct backend_params *p,
                      struct backend **out, char *err, size_t err_len);

#endif
