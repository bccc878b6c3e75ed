/* checkpoint.h — a Hugging Face Llama model directory, memory-mapped, validated, as a
 * struct model_config plus struct model_weights views.
 *
 * Owns the file mappings (or, for random weights, the heap buffers) that every tensor view
 * points into. Never copies weights into heap memory when loading from disk.
 */
#ifndef ITS_CHECKPOINT_H
#define ITS_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"

struct checkpoint;

/* Opens model directory `dir`: config.json (transformers 4.x or 5.x key layout),
 * generation_config.json if present (its eos ids join the config's), and model.safetensors
 * or model.safetensors.index.json + shards. Every tensor's name, dtype and shape is checked
 * against the config. Returns 0, or negative with err naming the file and tensor. */
int checkpoint_open(const char *dir, struct checkpoint **out, char *err, size_t err_len);

/* Random weights of shape `cfg` in `dtype`, created in memory (benchmarks). Deterministic in
 * `seed`. Returns 0, or negative (e.g. out of memory) with err filled. */
int checkpoint_new_random(const struct model_config *cfg, enum dtype dtype, uint64_t seed,
                          struct checkpoint **out, char *err, size_t err_len);

void checkpoint_destroy(struct checkpoint **ck);

const struct model_config *checkpoint_config(const struct checkpoint *ck);
const struct model_weights *checkpoint_weights(const struct checkpoint *ck);
/* The directory it was opened from; NULL for random weights. */
const char *checkpoint_dir(const struct checkpoint *ck);

/* Fills `out` with the shape of a named real model ("llama-3.2-1b", "llama-3.2-3b",
 * "llama-3.1-8b", "llama-3.1-70b"), or of the tiny test model ("tiny-llama-3": the shape of
 * hf-reference/tiny-llama31). Returns 0, or -1 for an unknown name. */
int model_shape_by_name(const char *name, struct model_config *out);
/* Comma-separated list of the names model_shape_by_name knows (for error messages). */
const char *model_shape_names(void);

#endif
