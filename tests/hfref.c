/* hfref.c — see hfref.h. */
#include "hfref.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "testutil.h"

void hfref_open(struct hfref *r, const char *model)
{
    char rel[256], err[512];
    snprintf(rel, sizeof rel, "hf-reference/%s", model);
    cr_assert_eq(checkpoint_open(tu_shared(rel), &r->ck, err, sizeof err), 0, "%s", err);
    r->cfg = checkpoint_config(r->ck);

    snprintf(rel, sizeof rel, "hf-reference/%s/reference_shared.json", model);
    json_error_t jerr;
    r->root = json_load_file(tu_shared(rel), 0, &jerr);
    cr_assert_not_null(r->root, "%s: %s", rel, jerr.text);

    snprintf(rel, sizeof rel, "hf-reference/%s/reference_shared_last_logits.f32", model);
    size_t len = 0;
    r->last = (float *)tu_read_file(tu_shared(rel), &len);
    cr_assert_not_null(r->last, "cannot read %s", rel);
    r->n_last = len / sizeof(float);
}

void hfref_close(struct hfref *r)
{
    json_decref(r->root);
    free(r->last);
    checkpoint_destroy(&r->ck);
}

json_t *hfref_cases(const struct hfref *r, const char *kind)
{
    json_t *a = json_object_get(r->root, kind);
    cr_assert(json_is_array(a) && json_array_size(a) > 0, "reference has no %s cases", kind);
    return a;
}

const float *hfref_last_logits(const struct hfref *r, const json_t *c)
{
    size_t off = (size_t)json_integer_value(json_object_get(c, "last_logits_offset_bytes"));
    size_t cnt = (size_t)json_integer_value(json_object_get(c, "last_logits_count"));
    cr_assert_eq(cnt, (size_t)r->cfg->vocab_size);
    cr_assert(off % sizeof(float) == 0 && off / sizeof(float) + cnt <= r->n_last,
              "last logits out of the .f32 file");
    return r->last + off / sizeof(float);
}

int32_t *hfref_ids(const json_t *arr, int *n)
{
    cr_assert(json_is_array(arr));
    *n = (int)json_array_size(arr);
    int32_t *ids = malloc(((size_t)*n + 1) * sizeof *ids);
    cr_assert_not_null(ids);
    for (int i = 0; i < *n; i++)
        ids[i] = (int32_t)json_integer_value(json_array_get(arr, (size_t)i));
    return ids;
}

double hfref_max_abs(const float *a, int n)
{
    double m = 0;
    for (int i = 0; i < n; i++)
        m = fabs((double)a[i]) > m ? fabs((double)a[i]) : m;
    return m;
}

void hfref_expect_close(const float *got, const float *want, int n, double rel_tol,
                        const char *what)
{
    double tol = rel_tol * hfref_max_abs(want, n), worst = 0;
    int at = 0;
    for (int i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        if (!(d <= worst)) {
            worst = d;
            at = i;
        }
    }
    cr_expect(worst <= tol, "%s: max |diff| %g at id %d (got %g, want %g) > tol %g", what,
              worst, at, (double)got[at], (double)want[at], tol);
}
