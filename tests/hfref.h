/* hfref.h — the Hugging Face reference data of ../shared/hf-reference/<model>: the checkpoint,
 * reference_shared.json and the last-position logits file, as the engine and backend tests
 * read them. Test-only code.
 */
#ifndef ITS_HFREF_H
#define ITS_HFREF_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "checkpoint.h"

struct hfref {
    struct checkpoint *ck;
    const struct model_config *cfg;
    json_t *root; /* reference_shared.json */
    float *last;  /* every prefill case's last-position logits, back to back */
    size_t n_last;
};

/* Opens hf-reference/<model> (tiny-llama31, tiny-llama3-tied); fails the calling test when
 * any part is missing or unreadable. */
void hfref_open(struct hfref *r, const char *model);
void hfref_close(struct hfref *r);

/* The non-empty array `kind` of the reference ("prefill", "greedy", "reward"); fails the test
 * otherwise. */
json_t *hfref_cases(const struct hfref *r, const char *kind);

/* The reference's last-position logits (vocab_size floats, inside r->last) of one element of
 * the "prefill" array; fails the test when its offsets do not fit the .f32 file. */
const float *hfref_last_logits(const struct hfref *r, const json_t *prefill_case);

/* A JSON array of integers as a heap int32 array (one spare slot); *n gets its length. */
int32_t *hfref_ids(const json_t *arr, int *n);

/* max |a[i]| over n floats. */
double hfref_max_abs(const float *a, int n);

/* Expects max |got - want| <= rel_tol * max |want| over n values (NaN fails), naming `what`,
 * the worst id and both values when it does not hold. */
void hfref_expect_close(const float *got, const float *want, int n, double rel_tol,
                        const char *what);

#endif
