/* rope.h — rotary position embedding frequencies of a Llama config, shared by every backend.
 *
 * One definition, compiled once from plain C and linked into both the engine and the cuda
 * plugin, so that the CPU and GPU backends rotate by bit-identical angles.
 */
#ifndef ITS_ROPE_H
#define ITS_ROPE_H

#include "model.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Writes head_dim / 2 inverse frequencies: theta^(-2i/head_dim), rescaled per Llama 3.1
 * (factor, low/high frequency factors, original context) when rope_kind is ROPE_LLAMA3, in
 * float32 exactly as transformers' _compute_llama3_parameters. */
void rope_inv_freq(const struct model_config *c, float *inv_freq);

#ifdef __cplusplus
}
#endif

#endif
