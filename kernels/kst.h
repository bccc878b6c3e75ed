/* kst.h — kernel self-tests: every device kernel checked against a host reference on random
 * data, in one call, so that a first run on a GPU shows every broken kernel at once.
 *
 * kern_selftest (kern.h) runs each module's suite below in turn on one device and returns the
 * failures. A suite draws fresh random inputs (never zeros), poisons outputs before each
 * launch (so an unwritten element fails), compares with a float64 or float32 host reference
 * by the relative error ||out - ref|| / ||ref|| (or exact equality where the function is
 * exact, e.g. argmax ids), and records one line per check. Device errors inside a suite are
 * recorded as failures with file:line (KTRY-style), never abort.
 */
#ifndef ITS_KST_H
#define ITS_KST_H

#include <stddef.h>

struct kst {
    char *report;      /* caller's buffer: one line per failed check, then a summary */
    size_t report_len;
    size_t used;
    int checks;
    int failures;
    const char *suite; /* set by the runner before each suite; prefixes every line */
    unsigned long long seed;
};

/* Records one check: `ok` false counts a failure and appends "suite: <message>\n". */
void kst_check(struct kst *t, int ok, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* ||a - b||_2 / ||b||_2 over n values; a NaN or Inf anywhere in `a` gives +Inf. */
double kst_rel_err(const float *a, const double *b, size_t n);

/* Uniform random floats in [lo, hi) from t->seed (advanced), for inputs. */
void kst_fill_uniform(struct kst *t, float *x, size_t n, float lo, float hi);

/* The runner behind kern_selftest (kern.h), in kst.cu: makes `device` current, runs every suite
 * below and writes the report. Same returns as kern_selftest. */
int kst_run(int device, unsigned long long seed, char *report, size_t report_len,
            int *n_checks);

/* The suites, one per module; each defined beside its kernels. */
void kst_suite_core(struct kst *t);      /* kernels/ops.cu: norm, rope, swiglu, embed, gemm */
void kst_suite_attention(struct kst *t); /* kernels/attention.cu */
void kst_suite_sample(struct kst *t);    /* kernels/sample.cu */

#endif
