/* kst.cu — the kernel self-test harness (kst.h) and the runner behind kern_selftest (kern.h).
 *
 * Owns nothing past one call: kst_run makes the device current, creates its context, runs each
 * module's suite in turn and writes the report. Suites record device errors as failed checks
 * (file:line), so one broken kernel never hides the others. Never aborts on its own account.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "kcheck.h"
#include "kst.h"

static void kst_append(struct kst *t, const char *fmt, ...)
{
    if (!t->report || t->report_len == 0 || t->used + 1 >= t->report_len)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(t->report + t->used, t->report_len - t->used, fmt, ap);
    va_end(ap);
    if (n > 0)
        t->used += (size_t)n < t->report_len - t->used ? (size_t)n : t->report_len - t->used - 1;
}

void kst_check(struct kst *t, int ok, const char *fmt, ...)
{
    t->checks++;
    if (ok)
        return;
    t->failures++;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    kst_append(t, "%s: %s\n", t->suite ? t->suite : "?", msg);
}

double kst_rel_err(const float *a, const double *b, size_t n)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]))
            return INFINITY;
        double d = (double)a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    if (den == 0.0)
        return num == 0.0 ? 0.0 : INFINITY;
    return sqrt(num / den);
}

/* splitmix64: small, good enough for test inputs, and the same on every host. */
static unsigned long long kst_next(unsigned long long *s)
{
    unsigned long long z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void kst_fill_uniform(struct kst *t, float *x, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++) {
        double u = (double)(kst_next(&t->seed) >> 11) * (1.0 / 9007199254740992.0);
        x[i] = lo + (float)(u * (double)(hi - lo));
        if (x[i] >= hi) /* rounding of lo + u*(hi-lo) can land on hi */
            x[i] = lo;
    }
}

int kst_run(int device, unsigned long long seed, char *report, size_t report_len,
            int *n_checks)
{
    char *err = report;
    size_t err_len = report_len;
    struct kst t;
    memset(&t, 0, sizeof t);
    if (n_checks)
        *n_checks = 0;
    if (report && report_len)
        report[0] = '\0';
    int n_dev = 0;
    KTRY(cudaGetDeviceCount(&n_dev));
    if (device < 0 || device >= n_dev) {
        snprintf(report, report_len, "device %d does not exist (%d CUDA device%s)", device,
                 n_dev, n_dev == 1 ? "" : "s");
        return -1;
    }
    KTRY(cudaSetDevice(device));
    KTRY(cudaFree(0)); /* creates the context now, so a broken device fails here, plainly */

    t.report = report;
    t.report_len = report_len;
    t.seed = seed ? seed : 1;
    {
        static const struct {
            const char *name;
            void (*run)(struct kst *);
        } suites[] = {
            {"core", kst_suite_core},
            {"attention", kst_suite_attention},
            {"sample", kst_suite_sample},
        };
        for (size_t i = 0; i < sizeof suites / sizeof suites[0]; i++) {
            t.suite = suites[i].name;
            suites[i].run(&t);
            /* A sticky error from one suite would fail every later check for no reason of
             * theirs: name it once and stop. */
            cudaError_t rc = cudaDeviceSynchronize();
            if (rc != cudaSuccess) {
                kst_check(&t, 0, "after the suite: %s (%s); later suites not run",
                          cudaGetErrorString(rc), cudaGetErrorName(rc));
                break;
            }
            /* A non-sticky error the suite recorded (a failed copy, an allocation) stays the
             * runtime's last error until read: clear it, or the next suite's first launch check
             * (KLAUNCH, which aborts) would report it and end the whole run. */
            (void)cudaGetLastError();
        }
    }
    t.suite = "summary";
    kst_append(&t, "kernel self-tests on device %d: %d checks, %d failed\n", device, t.checks,
               t.failures);
    if (n_checks)
        *n_checks = t.checks;
    return t.failures;

fail:
    return -1;
}
