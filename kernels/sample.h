/* sample.h — drawing next tokens on the device, so only ids cross to the host.
 *
 * Semantics are the host sampler's (workers/sampler.h), row by row: greedy (argmax, lowest id
 * on ties) when temperature is 0 or top_k is 1; otherwise logits / temperature, keep the top_k
 * largest (0 = all), softmax, keep the smallest most-probable set with mass >= top_p, and pick
 * by the uniform u = draw_uniform(seed, stream, step) (workers/draw.h) on the renormalised
 * cumulative distribution in descending-probability order. NaN logits never win; a row with
 * no finite logit gives token -1.
 */
#ifndef ITS_SAMPLE_H
#define ITS_SAMPLE_H

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

struct ksample_row {
    float temperature;
    float top_p;
    int32_t top_k;
    int32_t pad_;
    uint64_t seed, stream, step;
};

/* Device workspace ksample needs for up to max_rows rows of `vocab` logits. */
size_t ksample_workspace_bytes(int max_rows, int vocab);

/* logits: device (n_rows, vocab) f32, may be overwritten; rows: device (n_rows);
 * tokens: device (n_rows) int32 out. Enqueued on `stream`; launch errors abort (kcheck.h). */
void ksample(float *logits, int n_rows, int vocab, const struct ksample_row *rows,
             int32_t *tokens, void *workspace, cudaStream_t stream);

#endif
